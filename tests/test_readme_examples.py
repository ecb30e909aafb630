"""The README's worked examples (its ``>>>`` blocks) run as doctests: the
numbers it shows are the numbers curoi gives. They were worked out by hand
in the README's text (sample positions and bilinear averages), not copied
from curoi's output."""

import doctest
import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"


def _examples():
    text = README.read_text()
    return [block for block in re.findall(r"```python\n(.*?)```", text, re.S)
            if block.lstrip().startswith(">>>")]


def test_the_readme_has_examples():
    assert len(_examples()) >= 3


def test_readme_examples_run_as_shown():
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    # One test of all the blocks, in order: later blocks use earlier names.
    test = parser.get_doctest("\n".join(_examples()), {}, "README examples",
                              str(README), 0)
    with np.printoptions(legacy=False):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 10
    assert result.failed == 0

"""The README's two commands are what CI and users run: keep them honest."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands():
    """The indented command lines of the README, in order."""
    text = (ROOT / "README.md").read_text()
    return [m.group(1) for m in re.finditer(r"^    (python3 .+)$", text, re.M)]


def test_ci_runs_the_readme_test_command():
    commands = _readme_commands()
    assert len(commands) >= 2, commands
    demo, tests = commands[0], commands[1]
    assert "python3 -m curoi" in demo
    assert "pytest" in tests and '".[test]"' in tests
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines, "'.ci/run' must run the README's test command verbatim"


def test_demo_prints_the_worked_example_and_the_backend():
    # Expected numbers from DESIGN.md's worked example (torchvision and mmcv
    # conventions, box (0, 3, 6, 7)), not from curoi.
    done = subprocess.run(
        [sys.executable, "-m", "curoi"], capture_output=True, text=True,
        cwd=ROOT, env=dict(os.environ), timeout=600,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.search(r"on (CPU|GPU) \(", out), out
    assert out.count("[[0.85, 0.96], [0.97, 0.96]]") == 2, out
    assert "(512, 256, 7, 7) float32" in out, out

"""examples/plot_conventions.py draws what the conventions really do.

Its numbers come from curoi, its geometry from the README's formulas; here
both are held against tests/reference.py and hand computation, and the
drawing's annotations against the reference values.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import reference

matplotlib = pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "plot_conventions.py"
BOX = np.array([[0.0, 0.0, 3.0, 6.0, 7.0]])
FEATURES = reference.WORKED_EXAMPLE_MAP[None, None]
TITLES = ('roi_pool, convention="torchvision"', 'roi_pool, convention="mmcv"',
          "roi_align, aligned=False", "roi_align, aligned=True")


@pytest.fixture(scope="module")
def plot_conventions():
    spec = importlib.util.spec_from_file_location("plot_conventions", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def panels(plot_conventions):
    return {panel["title"]: panel for panel in plot_conventions.panels()}


def _reference_values(title):
    if title.startswith("roi_pool"):
        convention = title.split('"')[1]
        values, argmax = reference.roi_pool(FEATURES, BOX, 2, convention=convention)
        return values[0, 0], argmax[0, 0]
    aligned = title.endswith("True")
    values = reference.roi_align(FEATURES, BOX, 2, sampling_ratio=2, aligned=aligned)
    return values[0, 0], None


def test_the_script_writes_a_small_png_and_prints_the_worked_example(tmp_path):
    output = tmp_path / "figures" / "conventions.png"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    done = subprocess.run([sys.executable, str(SCRIPT), str(output)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert output.stat().st_size < 200_000
    # DESIGN.md's worked example, both roi_pool conventions.
    assert done.stdout.count("[['0.85', '0.96'], ['0.97', '0.96']]") == 2, done.stdout


def test_the_panels_values_equal_the_reference(plot_conventions, panels):
    np.testing.assert_array_equal(plot_conventions.WORKED_MAP, reference.WORKED_EXAMPLE_MAP)
    assert plot_conventions.BOX == tuple(BOX[0, 1:])
    assert tuple(panels) == TITLES
    for title, panel in panels.items():
        expected, argmax = _reference_values(title)
        np.testing.assert_allclose(panel["values"], expected, rtol=0, atol=1e-12,
                                   err_msg=title)
        if argmax is not None:
            np.testing.assert_array_equal(panel["argmax"], argmax, err_msg=title)


def test_the_figure_annotates_the_reference_values(plot_conventions):
    import matplotlib.pyplot as plt

    figure = plot_conventions.draw(None)
    try:
        shown = [text.get_text() for text in figure.findobj(matplotlib.text.Text)
                 if text.get_gid() == "result"]
    finally:
        plt.close(figure)
    expected = []
    for title in TITLES:
        values, _ = _reference_values(title)
        digits = 2 if title.startswith("roi_pool") else 3
        expected += [f"{v:.{digits}f}" for v in values.ravel()]
    assert shown == expected


def test_roi_pool_bins_are_drawn_where_the_readme_puts_them(panels):
    # README: 7 columns in bins of 3.5 span columns 0-3 and 3-6; 5 rows in
    # bins of 2.5 span rows 3-5 and 5-7 (half-open pixel ranges here).
    by_hand = [(3, 6, 0, 4), (3, 6, 3, 7), (5, 8, 0, 4), (5, 8, 3, 7)]
    for title in TITLES[:2]:
        panel = panels[title]
        # The drawing centres pixel p on p, so its edges are p -/+ 0.5.
        drawn = [tuple(int(edge + 0.5) for edge in b) for b in panel["bins"]]
        assert drawn == by_hand, title
        assert tuple(edge + 0.5 for edge in panel["region"]) == (0, 3, 7, 8), title
        # Each drawn bin's maximum is the value the panel annotates.
        for (h0, h1, w0, w1), value in zip(by_hand, panel["values"].ravel()):
            assert reference.WORKED_EXAMPLE_MAP[h0:h1, w0:w1].max() == value, title


@pytest.mark.parametrize("aligned, xs, ys", [
    # start = x1 - offset, bin = 6/2 by 4/2, samples at (i + 0.5) * bin / 2.
    (False, (0.75, 2.25, 3.75, 5.25), (3.5, 4.5, 5.5, 6.5)),
    (True, (0.25, 1.75, 3.25, 4.75), (3.0, 4.0, 5.0, 6.0)),
])
def test_roi_align_samples_are_drawn_where_the_formula_puts_them(panels, aligned, xs, ys):
    panel = panels[f"roi_align, aligned={aligned}"]
    drawn = sorted({x for points in panel["samples"] for x, _ in points}), \
        sorted({y for points in panel["samples"] for _, y in points})
    np.testing.assert_allclose(drawn[0], xs, atol=1e-12)
    np.testing.assert_allclose(drawn[1], ys, atol=1e-12)
    # The mean of the bilinear map at each bin's drawn samples is the value
    # the panel annotates for that bin.
    height, width = reference.WORKED_EXAMPLE_MAP.shape
    for points, value in zip(panel["samples"], panel["values"].ravel()):
        assert len(points) == 4
        interpolated = [sum(w * reference.WORKED_EXAMPLE_MAP[r, c]
                            for r, c, w in reference._bilinear_taps(y, x, height, width))
                        for x, y in points]
        assert np.mean(interpolated) == pytest.approx(value, abs=1e-12)


@pytest.mark.parametrize("box", [(0.0, 3.0, 6.0, 7.0), (0.4, 3.6, 6.4, 7.4)])
def test_roi_pool_conventions_agree_here_and_part_for_fractional_corners(plot_conventions, box):
    # The README says so beside the figure; the reference decides the bins.
    drawn = {}
    for convention in ("torchvision", "mmcv"):
        bins, _ = plot_conventions.pool_bins(convention, box)
        expected = reference._pool_bins((0.0,) + box, 8, 8, 2, 2, 1.0, convention)
        assert bins == [b for row in expected for b in row], convention
        drawn[convention] = bins
    integer_corners = all(float(v).is_integer() for v in box)
    assert (drawn["torchvision"] == drawn["mmcv"]) == integer_corners

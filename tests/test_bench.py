"""`python3 -m curoi bench`: the command runs, and its tables, JSON and plot
have the promised shape. Speed is not asserted here (the benchmark measures
it); the workloads are shrunk with the hidden --quick option."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from curoi import _bench

BOX_ROWS = [
    "roi_align forward, sampling_ratio 2",
    "roi_align forward, sampling_ratio 2, NHWC",
    "roi_align forward, adaptive",
    "roi_align backward, sampling_ratio 2",
    "roi_align backward, sampling_ratio 2, NHWC",
    "roi_align backward, adaptive",
    "roi_align backward, deterministic, sampling_ratio 2",
    "roi_pool forward",
    "roi_pool forward, NHWC",
    "roi_pool backward",
    "roi_pool backward, int64 argmax",
    "roi_align forward, max, sampling_ratio 2",
    "roi_align backward, max, sampling_ratio 2",
    "roi_align_rotated forward, sampling_ratio 2",
    "roi_align_rotated backward, sampling_ratio 2",
    "roi_align_rotated boxes backward, sampling_ratio 2",
    # --quick: one output channel per bin, C = 1 x 7 x 7
    "ps_roi_pool forward, C = 49",
    "ps_roi_pool backward, C = 49",
    "ps_roi_align forward, C = 49, sampling_ratio 2",
    "ps_roi_align backward, C = 49, sampling_ratio 2",
    "roi_align boxes backward, sampling_ratio 2",
    "prroi_pool forward",
    "prroi_pool backward",
    "prroi_pool boxes backward",
    "roi_spp forward, levels 1, 2, 4",
    "roi_spp backward, levels 1, 2, 4",
]


def _table(text, title_start):
    """The Markdown table under the heading that starts with title_start."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("### " + title_start))
    table = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--repeat", "2", "--threads", "1,2",
            "--workload", "W1,FPN,crop,tiny,stress", "--json", str(folder / "figures.json")]
    try:
        import matplotlib  # noqa: F401
        argv += ["--plot", str(folder / "figures.png")]
    except ImportError:
        pass
    stdout, stderr = io.StringIO(), io.StringIO()
    assert _bench.main(argv, stdout=stdout, stderr=stderr) == 0
    return folder, stdout.getvalue(), stderr.getvalue()


def test_box_workload_table(quick_run):
    _, out, _ = quick_run
    table = _table(out, "W1:")
    header, rule, rows = table[0], table[1], table[2:]
    assert header[:3] == ["operation", "threads", "curoi ms"]
    assert all(set(cell) == {"-"} for cell in rule)
    # Every row at each thread count, curoi's figure a positive number.
    assert [(r[0], r[1]) for r in rows] == [(op, t) for t in "12" for op in BOX_ROWS]
    assert all(float(r[2]) > 0 for r in rows)
    assert all(len(r) == len(header) for r in rows)
    # 1 and 2 threads measured: the speedup column, filled at 2 threads only.
    assert header[-1] == "curoi 1 thread / this"
    assert all(r[-1] == "" for r in rows if r[1] == "1")
    assert all(float(r[-1]) > 0 for r in rows if r[1] == "2")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return
    peer = header.index("onnxruntime ms")
    assert header[peer + 1] == "curoi / onnxruntime"
    measured = {r[0] for r in rows if r[peer]}
    assert measured == {"roi_align forward, sampling_ratio 2",
                        "roi_align forward, adaptive", "roi_pool forward"}


def test_pyramid_table_compares_one_launch_with_per_level_launches(quick_run):
    _, out, _ = quick_run
    table = _table(out, "FPN:")
    header, rows = table[0], table[2:]
    assert [(r[0], r[1]) for r in rows] == [
        (f"multiscale_roi_align {d}, 4 levels", t) for t in "12"
        for d in ("forward", "backward")]
    peer = header.index("per-level launches ms")
    assert header[peer + 1] == "curoi / per-level launches"
    assert all(float(r[peer]) > 0 and float(r[peer + 1]) > 0 for r in rows)


def test_per_level_launches_pool_what_the_one_launch_pools():
    # The bench's per-level baseline is only a fair peer if it computes the
    # same thing: the FPN operations' results agree.
    ops = _bench.pyramid_operations(_bench.WORKLOADS["FPN"], "float32", 1, quick=True)
    for op in ops:
        one, per_level = op.contenders["curoi"](), op.contenders["per-level launches"]()
        if isinstance(one, list):
            for a, b in zip(one, per_level):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(one, per_level)


def test_crop_table_against_tensorflow(quick_run):
    _, out, _ = quick_run
    table = _table(out, "crop:")
    header, rows = table[0], table[2:]
    assert [(r[0], r[1]) for r in rows] == [
        (op, t) for t in "12" for op in ("crop_and_resize forward, NHWC, 7x7",
                                         "crop_and_resize backward, image and boxes, NHWC")]
    assert all(float(r[2]) > 0 for r in rows)
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return
    # At the thread count TensorFlow's pools were first set to (or none,
    # where another test of this process had set them to another count).
    peer = header.index("tensorflow ms") if "tensorflow ms" in header else None
    if peer is not None:
        assert {r[1] for r in rows if r[peer]} == {"1"}
        assert header[peer + 1] == "curoi / tensorflow"


def test_tiny_and_stress_tables(quick_run):
    _, out, _ = quick_run
    tiny = _table(out, "tiny:")
    assert tiny[0][2] == "curoi us"
    assert {r[0] for r in tiny[2:]} >= {"roi_align call, NumPy"}
    stress = _table(out, "stress:")
    labels = [r[0] for r in stress[2:]]
    assert "roi_align forward, 1e9-px boxes, adaptive" in labels
    assert "roi_align forward, sampling_ratio 2**31-1" in labels
    assert "fixed point ms" in stress[0]


def test_json_holds_the_raw_figures(quick_run):
    folder, _, _ = quick_run
    figures = json.loads((folder / "figures.json").read_text())
    assert {"curoi", "device", "cores", "repeat", "peers", "results"} <= set(figures)
    assert figures["repeat"] == 2
    first = figures["results"][0]
    assert {"workload", "dtype", "threads", "operation", "unit", "curoi", "peers",
            "samples"} <= set(first)
    assert len(first["samples"]["curoi"]) == 2
    assert first["curoi"] == pytest.approx(np.median(first["samples"]["curoi"]))
    workloads = {r["workload"] for r in figures["results"]}
    assert workloads == {"W1", "FPN", "crop", "tiny", "stress"}


def test_plot_is_a_png(quick_run):
    pytest.importorskip("matplotlib")
    folder, _, _ = quick_run
    assert (folder / "figures.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_goes_to_stderr(quick_run):
    _, out, err = quick_run
    assert "[" + "#" * 30 + "]" in err
    assert "#" * 30 not in out


def test_plot_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="pip install"):
        _bench.write_plot(tmp_path / "x.png", [])


def test_ratios_in_the_table():
    # curoi 2 ms against a peer at 4 ms is 0.50; 4 ms at 1 thread and 2 ms
    # at 2 threads is a speedup of 2.00.
    results = [
        {"operation": "op", "threads": 1, "unit": "ms", "curoi": 4.0,
         "peers": {"peer": 4.0}},
        {"operation": "op", "threads": 2, "unit": "ms", "curoi": 2.0,
         "peers": {"peer": 4.0}},
    ]
    lines = _bench.format_table(results).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["operation", "threads", "curoi ms", "peer ms", "curoi / peer",
                        "curoi 1 thread / this"]
    assert cells[2] == ["op", "1", "4.00", "4.00", "1.00", ""]
    assert cells[3] == ["op", "2", "2.00", "4.00", "0.50", "2.00"]


def test_detection_boxes_follow_the_workload_definition():
    rng = np.random.default_rng(1)
    boxes = _bench.detection_boxes(rng, 4000, 2)
    assert boxes.shape == (4000, 5) and boxes.dtype == np.float32
    assert set(np.unique(boxes[:, 0])) == {0.0, 1.0}
    x1, y1, x2, y2 = boxes[:, 1:].T
    assert (x1 >= 0).all() and (x2 <= 1088).all() and (x1 <= x2).all()
    assert (y1 >= 0).all() and (y2 <= 800).all() and (y1 <= y2).all()
    # Clipping only shrinks a box: no side exceeds 800 px, and boxes well
    # inside the image keep their log-uniform size, so both ends are seen.
    widths = x2 - x1
    assert widths.max() <= 800 + 1e-3
    assert (widths < 40).any() and (widths > 600).any()


def test_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "curoi", "bench", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--workload" in done.stdout
    assert "--quick" not in done.stdout
    done = subprocess.run([sys.executable, "-m", "curoi", "bench", "--threads", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--threads" in done.stderr and "'0'" in done.stderr
    done = subprocess.run([sys.executable, "-m", "curoi", "bench", "--workload", "W9"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "W1, W2, tiny, stress" in done.stderr


def test_rows_picks_rows_by_name():
    # Case-insensitive substrings separated by "|" (row names hold commas); a
    # row matching any is timed, the others are not even built into the
    # tables.
    argv = ["--quick", "--repeat", "1", "--threads", "1", "--workload", "W1",
            "--rows", "ROI_POOL BACKWARD| align forward|adaptive"]
    stdout, stderr = io.StringIO(), io.StringIO()
    assert _bench.main(argv, stdout=stdout, stderr=stderr) == 0
    rows = [r[0] for r in _table(stdout.getvalue(), "W1:")[2:]]
    assert rows == [op for op in BOX_ROWS
                    if "roi_pool backward" in op or "align forward" in op
                    or "adaptive" in op]
    assert "ps_roi_pool backward, C = 49" in rows  # a substring, anywhere
    assert "roi_pool forward" not in rows and rows
    # Progress counts only the chosen rows: 2 rounds (warm-up, 1 repeat) each.
    assert f"{2 * len(rows)}/{2 * len(rows)}" in stderr.getvalue()


def test_rows_that_match_nothing_say_so():
    with pytest.raises(SystemExit, match="--rows: no row of W1 .*'no such row'"):
        _bench.main(["--quick", "--repeat", "1", "--workload", "W1", "--rows",
                     "no such row"], stdout=io.StringIO(), stderr=io.StringIO())
    with pytest.raises(SystemExit) as error:
        _bench.parser().parse_args(["--rows", " | "])
    assert error.value.code == 2


def test_rows_select_a_name_with_a_comma():
    argv = ["--quick", "--repeat", "1", "--threads", "1", "--workload", "W1",
            "--rows", "forward, NHWC"]
    stdout = io.StringIO()
    assert _bench.main(argv, stdout=stdout, stderr=io.StringIO()) == 0
    rows = [r[0] for r in _table(stdout.getvalue(), "W1:")[2:]]
    assert rows == [op for op in BOX_ROWS if "forward, nhwc" in op.lower()]
    assert rows


def test_rows_help_lists_the_row_names_and_times_nothing():
    stdout, stderr = io.StringIO(), io.StringIO()
    assert _bench.main(["--quick", "--workload", "W1", "--rows", "help"],
                       stdout=stdout, stderr=stderr) == 0
    lines = stdout.getvalue().splitlines()
    assert lines[0] == "W1:"
    assert [line.strip() for line in lines[1:]] == BOX_ROWS
    assert stderr.getvalue() == ""  # no progress: nothing was timed


def test_plot_without_matplotlib_stops_before_the_run(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    stderr = io.StringIO()
    with pytest.raises(SystemExit, match=r'--plot needs matplotlib.*pip install -e "\.\[plot\]"'):
        _bench.main(["--quick", "--repeat", "1", "--workload", "W1",
                     "--plot", str(tmp_path / "figures.png")],
                    stdout=io.StringIO(), stderr=stderr)
    assert stderr.getvalue() == ""  # no row was timed first


def test_the_kernel_report_table():
    pytest.importorskip("cupy")
    from curoi import _kernel_report, _kernels

    try:
        _kernel_report.nvrtc_module()
    except _kernel_report.KernelReportError as error:
        pytest.skip(str(error))
    out = io.StringIO()
    rows = _bench._print_kernel_report(out)
    # Every kernel of every family, for each dtype and architecture.
    expected = (len(_kernels.SIGNATURES) * len(_kernel_report.DTYPES)
                * len(_kernel_report.ARCHS))
    assert len(rows) == expected
    table = [line for line in out.getvalue().splitlines() if line.startswith("|")]
    assert len(table) == 2 + expected
    assert {"kernel", "arch", "f64_instructions", "registers", "spill_store_bytes",
            "spill_load_bytes", "stack_bytes"} <= set(rows[0])

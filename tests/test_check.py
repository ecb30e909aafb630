"""`python3 -m curoi check`: the GPU verification command. Its GPU steps need
a device; what runs here is everything around them, so that the command
works the first time a GPU is at hand: the arguments, the plan (the commands
each step would run), the summary it writes, the steps that run on any
machine, the parsers of the steps' outputs, and the sanitizers' target (the
same calls on NumPy arrays)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from curoi import _check, _gpu

REPO = Path(__file__).resolve().parents[1]


def _check_main(*argv, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "curoi", "check", *argv],
                          capture_output=True, text=True, cwd=str(cwd), timeout=300)


def test_the_dry_run_writes_the_whole_plan(tmp_path):
    done = _check_main("--device", "cuda", "--out", str(tmp_path), "--dry-run")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] and summary["ok"]
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == list(_check.STEPS)
    assert all(s["status"] == "planned" for s in steps.values())
    tests = steps["tests"]["command"]
    assert " -m pytest " in tests and " -m cuda " in tests and "pytest.xml" in tests
    for tool in ("memcheck", "racecheck"):
        command = steps[tool]["command"]
        assert f"--tool {tool}" in command and "--error-exitcode 1" in command
        assert command.endswith("-m curoi check --sanitizer-target")
    bench = steps["bench"]["command"]
    assert "--device cuda" in bench and "--workload W1,W2,FPN" in bench
    # The whole check ends within 8 minutes: steps that would start later
    # are skipped (test_steps_past_the_deadline_are_skipped).
    assert summary["deadline_s"] <= 8 * 60
    assert done.stdout.count("plan: ") == len(_check.STEPS)


def test_arguments_are_checked(tmp_path):
    done = _check_main("--device", "cuda")
    assert done.returncode == 2 and "--out DIR is required" in done.stderr
    done = _check_main("--out", str(tmp_path), "--steps", "tests,bogus")
    assert done.returncode == 2 and "unknown step 'bogus'" in done.stderr
    done = _check_main("--out", str(tmp_path), "--device", "cpu")
    assert done.returncode == 2 and "invalid choice" in done.stderr
    done = _check_main("--out", str(tmp_path), "--deadline", "0")
    assert done.returncode == 2 and "--deadline" in done.stderr
    # The tests step needs the checkout's tests: outside it, a clear error.
    done = _check_main("--out", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and "source checkout" in done.stderr


@pytest.mark.skipif(_gpu.device_count() > 0, reason="a CUDA device is present")
def test_without_a_device_the_check_says_so_and_stops(tmp_path):
    done = _check_main("--out", str(tmp_path), "--steps", "environment,compile,bench")
    assert done.returncode == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    environment, compile_, bench = summary["steps"]
    assert environment["status"] == "failed"
    assert "no usable CUDA device" in environment["summary"]["reason"]
    assert environment["summary"]["packages"]["numpy"] == np.__version__
    assert compile_["status"] == bench["status"] == "skipped"
    assert not summary["ok"]
    assert "==== environment" in (tmp_path / "check.log").read_text()


def test_steps_past_the_deadline_are_skipped(tmp_path):
    steps = _check.plan(tmp_path)
    summary = _check.run(steps, tmp_path, deadline=5)
    assert [s["status"] for s in summary["steps"]] == ["skipped"] * len(_check.STEPS)
    assert "deadline" in summary["steps"][0]["summary"]["reason"]


def test_the_cuda_marker_selects_the_gpu_suites():
    done = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-m", "cuda",
                           "tests/test_torch.py", "tests/test_jax.py",
                           "tests/test_tensorflow.py", "tests/test_gpu.py",
                           "tests/test_gpu_integration.py"],
                          capture_output=True, text=True, cwd=str(REPO), timeout=300)
    assert done.returncode in (0, 5), done.stdout[-2000:] + done.stderr[-2000:]
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert any("test_torch.py::test_cuda_on_a_side_stream" in c for c in collected)
    assert any("test_jax.py::test_gpu_jit_matches_cpu" in c for c in collected)
    # No CPU test is selected.
    assert not any("test_torch.py::test_training" in c for c in collected)


def test_the_pytest_summary_counts_what_ran(tmp_path):
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import pytest
        def test_ok(): pass
        def test_bad(): assert 1 == 2, "one is not two"
        def test_skip(): pytest.skip("no")
    """))
    xml = tmp_path / "out.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={xml}", str(tmp_path / "test_sample.py")],
                   capture_output=True, cwd=str(tmp_path), timeout=120)
    counts = _check._pytest_summary(xml)
    assert (counts["tests"], counts["passed"], counts["failures"], counts["skipped"]) \
        == (3, 1, 1, 1)
    assert "test_bad" in counts["failed_tests"][0] and "one is not two" in \
        counts["failed_tests"][0]


def test_the_sanitizer_and_bench_summaries(tmp_path):
    log = tmp_path / "memcheck.log"
    log.write_text("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n")
    assert _check._sanitizer_summary(log)["summary"] == "========= ERROR SUMMARY: 0 errors"
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"device": "CUDA X", "results": [
        {"workload": "W1", "dtype": "float32", "operation": "roi_align forward",
         "curoi": 0.05, "peers": {"torchvision": 0.25}}]}))
    rows = _check._bench_summary(bench)["rows"]
    assert rows == [{"workload": "W1", "dtype": "float32", "operation": "roi_align forward",
                     "curoi_ms": 0.05, "torchvision_ms": 0.25, "curoi/torchvision": 0.2}]


def test_the_sanitizers_target_runs_every_operator():
    # The same calls as on the GPU, on NumPy arrays: their arguments are right.
    assert _check.sanitizer_target(np) > 100

"""The adversarial suites (test_adversarial.py, and the suites of the
position-sensitive, rotated, box-gradient, spatial pyramid, Precise RoI
Pooling, crop-and-resize and multiscale kernels: test_ps_roi_kernels.py,
test_roi_align_rotated_kernels.py, test_roi_align_rotated_boxes_backward.py,
test_roi_align_boxes_backward.py, test_roi_spp_kernels.py,
test_prroi_pool_kernels.py, test_crop_and_resize_kernels.py,
test_multiscale_roi_align_kernels.py) under AddressSanitizer and
UndefinedBehaviorSanitizer, with the CPU's loops and with the GPU's side by side
(CUROI_CPU_LOOPS=gpu, see test_gpu_loops.py).

CUROI_SANITIZE makes curoi build its CPU library instrumented (under its own
cache key). Python itself is not instrumented, so the ASan runtime has to be
the first library of the process: the suite runs in a subprocess started with
LD_PRELOAD of the compiler's libasan (libubsan comes in as a dependency of the
instrumented library). float-cast-overflow is asked for explicitly because
GCC's "undefined" leaves it out, and converting an out-of-range float to an
integer is the undefined behaviour that hostile boxes invite. Reports go to
files under tmp_path (log_path), so that pytest's output capture in the
subprocess cannot swallow them; any such file fails the test.

The driver records which kernels the suite launched: every family's forward
and backward (and box gradient, where it has one) must be among them, so
that a new family is not silently left out of the sanitized run.

Two more tests show that the harness can fail: the sanitized library refuses
to load without the runtime, and an out-of-bounds write (the kernel handed an
output buffer one row too small through the internal launcher) is reported
and ends the process.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from curoi import _cpu, _kernels, _sources

SANITIZERS = "address,undefined,float-cast-overflow"
REPO = Path(__file__).resolve().parents[1]


def _runtime(name):
    argv = _cpu.compiler_command()
    if argv is None:
        return None
    try:
        done = subprocess.run(argv + [f"-print-file-name={name}"], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    path = done.stdout.strip()
    # A compiler without the library prints the bare name back.
    return path if os.path.isabs(path) and os.path.exists(path) else None


LIBASAN = _runtime("libasan.so")
pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or LIBASAN is None,
    reason="the C++ compiler has no AddressSanitizer runtime (libasan.so)")


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory):
    """Environment for a sanitized subprocess: a private cache shared by the
    tests of this module (the instrumented library is built once) and a
    folder for sanitizer reports."""
    root = tmp_path_factory.mktemp("sanitized")
    logs = root / "reports"
    logs.mkdir()
    env = dict(os.environ)
    env.update(
        CUROI_SANITIZE=SANITIZERS,
        CUROI_CACHE_DIR=str(root / "cache"),
        LD_PRELOAD=LIBASAN,
        ASAN_OPTIONS=f"detect_leaks=0:halt_on_error=1:abort_on_error=0:log_path={logs}/asan",
        UBSAN_OPTIONS=f"halt_on_error=1:print_stacktrace=1:log_path={logs}/ubsan",
        PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")]
                                                  if p]),
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env, logs


def _reports(logs):
    return {p.name: p.read_text(errors="replace") for p in logs.iterdir()}


def _clear(logs):
    for p in logs.iterdir():
        p.unlink()


# The suites that run under the sanitizers: hostile boxes, sizes and argmax
# for every kernel family. They import only NumPy, curoi and the references
# (test_crop_and_resize_kernels.py skips its TensorFlow comparisons here).
SUITES = ("test_adversarial.py", "test_channel_tiles.py", "test_ps_roi_kernels.py",
          "test_roi_align_rotated_kernels.py", "test_roi_align_rotated_boxes_backward.py",
          "test_roi_align_boxes_backward.py",
          "test_roi_spp_kernels.py", "test_prroi_pool_kernels.py",
          "test_crop_and_resize_kernels.py", "test_multiscale_roi_align_kernels.py")

# Records which kernels the suite launches, so that a family the suite
# forgets is noticed rather than silently left out of the sanitized run.
DRIVER = textwrap.dedent("""
    import ctypes, json, sys
    import pytest
    import curoi
    from curoi import _cpu
    launched = set()
    launch = _cpu.launch
    def recording_launch(family, direction, dtype_name, args):
        launched.add(family + "_" + direction)
        return launch(family, direction, dtype_name, args)
    _cpu.launch = recording_launch
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-rf"] + %(suites)r)
    info = curoi.backend_info()["cpu"]
    print(json.dumps({"rc": int(rc), "info": info, "launched": sorted(launched),
                      "asan_init": hasattr(ctypes.CDLL(None), "__asan_init")}))
    sys.exit(int(rc))
""")


@pytest.fixture(scope="module")
def suite_runs(sanitized):
    """The SUITES under the sanitizers with the CPU's loops and with the
    GPU's (CUROI_CPU_LOOPS), in two processes at once, each with its own
    report folder: {loops: (done, env, reports folder)}. The two libraries
    build one after the other (the cache folder's lock), each on every core;
    the suites then run side by side."""
    env, logs = sanitized
    suites = [str(REPO / "tests" / name) for name in SUITES]
    started = {}
    for loops in ("cpu", "gpu"):
        folder = logs.parent / f"reports-{loops}"
        folder.mkdir()
        run_env = dict(env, CUROI_CPU_LOOPS=loops)
        for name in ("ASAN_OPTIONS", "UBSAN_OPTIONS"):
            run_env[name] = run_env[name].replace(f"log_path={logs}/", f"log_path={folder}/")
            assert f"log_path={folder}/" in run_env[name]
        started[loops] = (subprocess.Popen(
            [sys.executable, "-c", DRIVER % {"suites": suites}], env=run_env, cwd=str(REPO),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), run_env, folder)
    runs = {}
    try:
        for loops, (proc, run_env, folder) in started.items():
            out, err = proc.communicate(timeout=600)
            runs[loops] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                           run_env, folder)
    finally:
        for proc, _, _ in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return runs


def _adversarial_suite_under_sanitizers(runs, loops):
    """The SUITES' run with the sanitized library built with the CPU's or
    the GPU's loops: fail on any report."""
    done, env, logs = runs[loops]
    output = done.stdout + done.stderr
    assert not _reports(logs), _reports(logs)
    for marker in ("AddressSanitizer", "runtime error:", "SUMMARY: "):
        assert marker not in output, output[-4000:]
    # A failing case fails here too (its summary is in the message).
    assert done.returncode == 0, output[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert " passed" in done.stdout and " failed" not in done.stdout, done.stdout[-2000:]
    # The suite ran against the instrumented library, with ASan live.
    assert result["asan_init"]
    info = result["info"]
    assert info["sanitize"] == SANITIZERS
    library = Path(info["library"])
    assert library.parent == Path(env["CUROI_CACHE_DIR"])
    data = library.read_bytes()
    assert b"__asan_report_store" in data and b"__ubsan_handle_" in data
    assert b"__ubsan_handle_float_cast_overflow" in data
    assert info["loops"] == loops
    # Every family's forward and backward (and gradient with respect to the
    # boxes, in one or two passes, where it has one) ran under the sanitizers.
    expected = {f"{family}_{direction}" for family in _sources.FAMILIES
                for direction in ("forward", "backward", "boxes_backward",
                                  "boxes_backward_finish")
                if direction in _kernels.directions(family)}
    assert expected <= set(result["launched"]), sorted(expected - set(result["launched"]))


def test_adversarial_suite_passes_under_asan_and_ubsan(suite_runs):
    _adversarial_suite_under_sanitizers(suite_runs, "cpu")


def test_adversarial_suite_passes_under_asan_and_ubsan_with_the_gpu_loops(suite_runs):
    # The GPU's loop code, run serially on the CPU (its own library, under
    # its own cache key): out-of-bounds indexing in the GPU-only branches
    # shows up here, not only as wrong values.
    _adversarial_suite_under_sanitizers(suite_runs, "gpu")


OUT_OF_BOUNDS = textwrap.dedent("""
    import numpy as np
    from curoi import _cpu
    x = np.ones((1, 1, 8, 8), np.float32)
    rois = np.array([[0, 0, 0, 7, 7]], np.float32)
    # 64 x 64 outputs need 4096 floats; give the kernel a row and 8 floats
    # fewer. The buffer is large enough that NumPy takes it from malloc,
    # which ASan watches, not from its small-block cache. ASan rounds it up
    # to its 16 KiB size class with 32 bytes to spare, poisoned: the first
    # write past the end lands there whatever lies beyond the chunk (a
    # buffer that fills its chunk exactly may end where ASan's heap mapping
    # does, and the write past it is reported as a SEGV instead).
    out = np.empty(4096 - 72, np.float32)
    _cpu.launch("roi_align", "forward", "float32",
                (x, rois, 1, 1, 1, 8, 8, 64, 64, 1.0, 2, 1, 0, 1, out))
    print("no report")
""")


def test_harness_reports_an_out_of_bounds_write(sanitized):
    env, logs = sanitized
    _clear(logs)
    done = subprocess.run([sys.executable, "-c", OUT_OF_BOUNDS], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=120)
    reports = "\n".join(_reports(logs).values())
    assert done.returncode != 0, (done.stdout, done.stderr)
    assert "no report" not in done.stdout
    assert "AddressSanitizer: heap-buffer-overflow" in reports, (reports, done.stderr)
    assert "roi_align_forward" in reports  # the stack names the kernel
    _clear(logs)


def test_sanitized_library_without_the_runtime_says_what_to_do(sanitized, tmp_path):
    env, _ = sanitized
    env = {k: v for k, v in env.items() if k != "LD_PRELOAD"}
    script = ("import numpy as np, curoi\n"
              "curoi.roi_align(np.ones((1, 1, 2, 2), np.float32),"
              " np.array([[0, 0, 0, 1, 1]], np.float32), 1)\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "RuntimeError" in done.stderr and "LD_PRELOAD" in done.stderr, done.stderr
    assert "libasan" in done.stderr


def test_sanitize_value_is_checked(monkeypatch):
    monkeypatch.setenv("CUROI_SANITIZE", "address; rm -rf /")
    with pytest.raises(ValueError, match="CUROI_SANITIZE"):
        _cpu.sanitize_flags()
    monkeypatch.setenv("CUROI_SANITIZE", SANITIZERS)
    flags = _cpu.sanitize_flags()
    assert f"-fsanitize={SANITIZERS}" in flags and "-fno-sanitize-recover=all" in flags
    assert "-g" in flags and "-fno-omit-frame-pointer" in flags
    monkeypatch.delenv("CUROI_SANITIZE")
    assert _cpu.sanitize_flags() == ()

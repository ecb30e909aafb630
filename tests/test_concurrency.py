"""Many Python threads using curoi at once (CPU backend).

ctypes releases the GIL while a kernel runs, so calls from several threads
really overlap (their parallel loops take turns on curoi's one pool of
worker threads, while the rest of each call runs). Results must equal a serial
run: forward outputs and argmax exactly (each output element is computed by
one thread, in a fixed order), backward passes to float rounding (their
atomic adds may sum in another order; README, "Bad boxes, precision").

The first call of a process builds the library; several threads making that
first call at once must build it exactly once. That is checked in a fresh
process with an empty cache and a compiler wrapper that logs every build.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import curoi

THREADS = 8
REPO = Path(__file__).resolve().parents[1]


def _case(seed=0):
    rng = np.random.default_rng(seed)
    n, c, h, w = 2, 4, 24, 31
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    k = 64
    corners = np.sort(rng.uniform(-4, 34, (k, 2, 2)), axis=1).reshape(k, 4)
    boxes = np.concatenate([rng.integers(0, n, (k, 1)), corners], axis=1).astype(np.float32)
    gy = rng.standard_normal((k, c, 5, 6)).astype(np.float32)
    return x, boxes, gy


def _all_ops(x, boxes, gy):
    y_align = curoi.roi_align(x, boxes, (5, 6), 0.75, 0, True)
    g_align = curoi.roi_align_backward(gy, boxes, x.shape, (5, 6), 0.75, 0, True)
    y_pool, argmax = curoi.roi_pool(x, boxes, (5, 6), 0.75, convention="mmcv",
                                    return_argmax=True)
    g_pool = curoi.roi_pool_backward(gy, argmax, boxes, x.shape)
    return y_align, g_align, y_pool, argmax, g_pool


def _in_threads(fn, count=THREADS, repeat=3):
    """Run fn() in ``count`` threads released together; return their results
    (re-raising the first error)."""
    barrier = threading.Barrier(count)
    results, errors = [None] * count, []

    def work(i):
        try:
            barrier.wait()
            results[i] = [fn() for _ in range(repeat)]
        except BaseException as error:  # reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return [r for per_thread in results for r in per_thread]


def test_threads_give_the_serial_results():
    x, boxes, gy = _case()
    serial = _all_ops(x, boxes, gy)
    assert np.count_nonzero(serial[0]) > serial[0].size // 2  # not vacuous
    names = ("roi_align", "roi_align_backward", "roi_pool", "argmax", "roi_pool_backward")
    for got in _in_threads(lambda: _all_ops(x, boxes, gy)):
        for name, g, e in zip(names, got, serial):
            if name.endswith("backward"):
                np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=name)
            else:
                np.testing.assert_array_equal(g, e, err_msg=name)


def test_threads_with_different_inputs_do_not_mix():
    # Each thread its own features and boxes: a result computed from another
    # thread's arguments (shared state in the launcher) would show.
    cases = [_case(seed) for seed in range(THREADS)]
    serial = [curoi.roi_align(x, b, (5, 6), 0.75, 2, False) for x, b, _ in cases]
    index = iter(range(THREADS))
    lock = threading.Lock()

    def one():
        with lock:
            i = next(index)
        x, b, _ = cases[i]
        return i, [curoi.roi_align(x, b, (5, 6), 0.75, 2, False) for _ in range(5)]

    for i, ys in _in_threads(one, repeat=1):
        for y in ys:
            np.testing.assert_array_equal(y, serial[i])


FIRST_CALL = r"""
import json, sys, threading
import numpy as np
import curoi
x = (np.arange(8)[None, :] + 10 * np.arange(8)[:, None]).astype(np.float32)[None, None]
boxes = np.array([[0, 1, 1, 5, 5]], np.float32)
barrier = threading.Barrier(8)
out = [None] * 8
def work(i):
    barrier.wait()
    out[i] = curoi.roi_align(x, boxes, 2, 1.0, 2, True).ravel().tolist()
threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"y": out, "library": curoi.backend_info()["cpu"]["library"]}))
"""


def test_threads_making_the_first_call_build_once(tmp_path):
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    log = tmp_path / "builds.log"
    wrapper = tmp_path / "logging-c++"
    # Logs builds (the link, the one command with -shared; not the compiles
    # of each source, the compiler probe or the --version queries that key
    # the cache), then runs
    # the real compiler.
    wrapper.write_text(
        "#!/bin/sh\n"
        f'case " $* " in *curoi-probe*) ;; *" -shared "*) echo build >> "{log}";; esac\n'
        f'exec "{compiler}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    cache = tmp_path / "cache"
    env = dict(os.environ, CUROI_CACHE_DIR=str(cache), CXX=str(wrapper))
    env.pop("CUROI_SANITIZE", None)
    done = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Worked example of test_cpu_backend.py: ramp x + 10 y, box (1, 1, 5, 5),
    # aligned, 2 x 2 samples at whole pixels: bin means 1.5 and 3.5.
    assert result["y"] == [[16.5, 18.5, 36.5, 38.5]] * 8
    assert log.read_text().count("build") == 1
    # One line on stderr says what is built and where it is kept, once.
    assert done.stderr.count("curoi: building its CPU kernels") == 1, done.stderr
    assert str(cache) in done.stderr
    libraries = [p.name for p in cache.iterdir()]
    assert libraries == [Path(result["library"]).name], libraries

"""The CPU backend's thread count: CUROI_NUM_THREADS, set_num_threads and
get_num_threads, and the default of the cores available."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import curoi
import reference


def _python(code, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "CUROI_NUM_THREADS"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, env=full_env, timeout=300)


@pytest.fixture
def restore_threads():
    before = curoi.get_num_threads()
    yield
    curoi.set_num_threads(before)


def test_default_is_the_cores_this_process_may_use():
    done = _python("import curoi; print(curoi.get_num_threads())")
    assert done.returncode == 0, done.stderr
    expected = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count())
    assert int(done.stdout) == expected


def test_environment_variable_sets_the_count():
    done = _python("import curoi; print(curoi.get_num_threads(), "
                   "curoi.backend_info()['cpu']['threads'])",
                   CUROI_NUM_THREADS="3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "3"]


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_environment_variable_is_an_error_naming_it(value):
    done = _python("import curoi; curoi.get_num_threads()", CUROI_NUM_THREADS=value)
    assert done.returncode != 0
    assert "ValueError" in done.stderr and "CUROI_NUM_THREADS" in done.stderr


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"),
                    reason="counts threads through Linux's /proc/self/task")
@pytest.mark.parametrize("threads", [1, 3])
def test_kernels_run_on_that_many_threads(threads):
    # The pool keeps its worker threads after a parallel loop: a fresh
    # process gains exactly threads - 1 of them on its first kernel call.
    code = """
        import os
        import numpy as np
        import curoi
        x = np.ones((1, 4, 32, 32), np.float32)
        boxes = np.array([[0, 0, 0, 31, 31]] * 64, np.float32)
        curoi.roi_align(x[:, :, :0], boxes, 7)   # builds and loads, no launch
        before = len(os.listdir("/proc/self/task"))
        curoi.roi_align(x, boxes, 7, sampling_ratio=2)
        print(len(os.listdir("/proc/self/task")) - before)
    """
    done = _python(code, CUROI_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS="1",
                   OMP_NUM_THREADS="1")
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == threads - 1


def test_set_num_threads_changes_the_count_and_not_the_numbers(restore_threads):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 15, 11))
    boxes = reference.random_boxes(rng, 2, 15, 11, 1.0, 40)
    results = []
    for threads in (1, 2, 4):
        curoi.set_num_threads(threads)
        assert curoi.get_num_threads() == threads
        assert curoi.backend_info()["cpu"]["threads"] == threads
        results.append(curoi.roi_align(x, boxes, (2, 3), sampling_ratio=2))
    expected = reference.roi_align(x, boxes, (2, 3), 1.0, 2, False)
    for got in results:
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("value, error", [
    (0, ValueError), (-1, ValueError), (2**31, ValueError),
    (1.5, TypeError), ("2", TypeError), (True, TypeError), (None, TypeError),
])
def test_set_num_threads_rejects_bad_values(value, error, restore_threads):
    before = curoi.get_num_threads()
    with pytest.raises(error, match="num_threads"):
        curoi.set_num_threads(value)
    assert curoi.get_num_threads() == before

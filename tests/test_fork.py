"""curoi in every process model: forked children (os.fork, multiprocessing,
PyTorch's DataLoader workers), spawn and forkserver, and beside PyTorch's own
CPU threads.

An OpenMP-style thread pool does not survive fork(): a forked child's first
parallel loop would wait for ever for the parent's worker threads. Each test
runs in a subprocess with a timeout, so that a hang fails the test instead of
stalling the suite. Expected values are the NumPy reference's (or, for the
children, the parent's serial results, themselves checked against it).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import seed_cache

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TIMEOUT = 120

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"),
                                reason="fork() is POSIX only")

# Shared by every script: a case, the four ops (deterministic or not), and a
# check against the NumPy reference.
_PRELUDE = """
import os, sys, threading, time
import numpy as np
import curoi
import reference

def case(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 16, 24, 31))
    boxes = reference.random_boxes(rng, 2, 24, 31, 0.75, 120)
    gy = rng.standard_normal((len(boxes), 16, 5, 6))
    return x, boxes, gy

def ops(x, boxes, gy, deterministic=False):
    y_align = curoi.roi_align(x, boxes, (5, 6), 0.75, 2, True)
    g_align = curoi.roi_align_backward(gy, boxes, x.shape, (5, 6), 0.75, 2, True,
                                       deterministic=deterministic)
    y_pool, argmax = curoi.roi_pool(x, boxes, (5, 6), 0.75, return_argmax=True)
    g_pool = curoi.roi_pool_backward(gy, argmax, boxes, x.shape,
                                     deterministic=deterministic)
    return [y_align, g_align, y_pool, argmax, g_pool]

def expected(x, boxes, gy):
    y_pool, argmax = reference.roi_pool(x, boxes, (5, 6), 0.75, "torchvision")
    return [reference.roi_align(x, boxes, (5, 6), 0.75, 2, True),
            reference.roi_align_backward(gy, boxes, x.shape, (5, 6), 0.75, 2, True),
            y_pool, argmax,
            reference.roi_pool_backward(gy, argmax, boxes, x.shape)]

def check(got, want):
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)

def fork_and_wait(child, timeout=60):
    # Runs child() in a forked process; returns its exit status (124 when it
    # did not finish in time: the parent kills it rather than waiting).
    pid = os.fork()
    if pid == 0:
        try:
            child()
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return 124
"""


def _run(code, env=None, timeout=TIMEOUT):
    full_env = {k: v for k, v in os.environ.items() if k != "CUROI_NUM_THREADS"}
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS), str(REPO), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    script = _PRELUDE + textwrap.dedent(code)
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True,
                              text=True, env=full_env, timeout=timeout, cwd=TESTS)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"hung: no result within {timeout} s\n{error.stdout}\n{error.stderr}")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.parametrize("parent_threads", [None, 1, 2])
def test_forked_child_computes_whatever_the_parent_did(parent_threads):
    # None: the parent imported curoi and never called a kernel before fork.
    _run(f"""
        x, boxes, gy = case()
        want = expected(x, boxes, gy)
        parent_threads = {parent_threads!r}
        if parent_threads is not None:
            curoi.set_num_threads(parent_threads)
            check(ops(x, boxes, gy), want)
            check(ops(x, boxes, gy, deterministic=True), want)

        def child():
            # A child does not inherit the parent's thread count.
            assert curoi.get_num_threads() == 1, curoi.get_num_threads()
            check(ops(x, boxes, gy), want)
            check(ops(x, boxes, gy, deterministic=True), want)
            curoi.set_num_threads(3)   # a child may ask for more threads
            check(ops(x, boxes, gy), want)

            def grandchild():
                curoi.set_num_threads(2)
                check(ops(x, boxes, gy), want)
            assert fork_and_wait(grandchild) == 0
            check(ops(x, boxes, gy), want)

        assert fork_and_wait(child) == 0
        assert fork_and_wait(child) == 0
        # The parent keeps working, on the threads it had.
        if parent_threads is not None:
            assert curoi.get_num_threads() == parent_threads
        check(ops(x, boxes, gy), want)
        print("ok")
    """)


def test_child_thread_count_comes_from_the_environment():
    out = _run("""
        x, boxes, gy = case()
        curoi.set_num_threads(1)
        ops(x, boxes, gy)
        def child():
            print("child", curoi.get_num_threads(), flush=True)
            check(ops(x, boxes, gy), expected(x, boxes, gy))
        assert fork_and_wait(child) == 0
    """, env={"CUROI_NUM_THREADS": "3"})
    assert "child 3" in out


def test_fork_while_another_thread_is_inside_a_kernel():
    _run("""
        curoi.set_num_threads(2)
        rng = np.random.default_rng(1)
        big = rng.standard_normal((2, 64, 64, 64)).astype(np.float32)
        big_boxes = reference.random_boxes(rng, 2, 64, 64, 1.0, 400).astype(np.float32)
        serial = curoi.roi_align(big, big_boxes, 7, 1.0, 8)
        x, boxes, gy = case()
        want = expected(x, boxes, gy)
        stop = threading.Event()
        errors = []

        def busy():
            while not stop.is_set():
                if not np.array_equal(curoi.roi_align(big, big_boxes, 7, 1.0, 8), serial):
                    errors.append("background result changed")

        worker = threading.Thread(target=busy)
        worker.start()
        try:
            for _ in range(6):
                time.sleep(0.05)   # forks land at different points of the kernel
                def child():
                    check(ops(x, boxes, gy), want)
                    curoi.set_num_threads(2)
                    check(ops(x, boxes, gy), want)
                assert fork_and_wait(child) == 0
        finally:
            stop.set()
            worker.join()
        assert not errors, errors
        check(ops(x, boxes, gy), want)
        print("ok")
    """)


def test_multiprocessing_fork_pool_maps_over_batches():
    _run("""
        import multiprocessing as mp

        def work(seed):
            x, boxes, gy = case(seed)
            return ops(x, boxes, gy)

        if __name__ == "__main__":
            curoi.set_num_threads(2)
            work(0)   # the parent's pool of threads exists before the fork
            with mp.get_context("fork").Pool(2) as pool:
                results = pool.map(work, range(6))
            for seed, got in enumerate(results):
                check(got, expected(*case(seed)))
            check(work(7), expected(*case(7)))
            print("ok")
    """)


def test_spawn_and_forkserver_reuse_the_cached_library(tmp_path):
    # The cache holds the library (the session's, copied in); the parent and
    # the fresh interpreters of the workers must all load that file, and
    # none of them may build or replace it.
    library = seed_cache(tmp_path / "cache")
    before = library.stat().st_ino, library.stat().st_mtime_ns
    # Workers are fresh interpreters that import this file: a real module.
    (tmp_path / "fork_worker.py").write_text(_PRELUDE + textwrap.dedent("""
        def work(seed):
            x, boxes, gy = case(seed)
            return ops(x, boxes, gy), curoi.backend_info()["cpu"]["library"]
    """))
    out = _run(f"""
        import multiprocessing as mp
        sys.path.insert(0, {str(tmp_path)!r})
        import fork_worker

        if __name__ == "__main__":
            fork_worker.work(0)
            mine = curoi.backend_info()["cpu"]["library"]
            for method in ("spawn", "forkserver"):
                with mp.get_context(method).Pool(2) as pool:
                    results = pool.map(fork_worker.work, range(4))
                for seed, (got, library) in enumerate(results):
                    check(got, expected(*case(seed)))
                    assert library == mine, (method, library, mine)
            assert mine == {str(library)!r}, mine
            print("ok")
    """, env={"CUROI_CACHE_DIR": str(tmp_path / "cache")})
    assert "ok" in out
    assert sorted((tmp_path / "cache").iterdir()) == [library]
    assert (library.stat().st_ino, library.stat().st_mtime_ns) == before


def test_torch_dataloader_workers():
    pytest.importorskip("torch")
    _run("""
        import torch
        import curoi.torch as ct

        class Crops(torch.utils.data.Dataset):
            def __len__(self):
                return 8
            def __getitem__(self, i):
                x, boxes, _ = case(i)
                return ct.roi_align(torch.from_numpy(x), torch.from_numpy(boxes),
                                    (5, 6), 0.75, 2, True)

        if __name__ == "__main__":
            curoi.set_num_threads(2)
            data = Crops()
            before = data[0]    # the main process calls before the workers fork
            loader = torch.utils.data.DataLoader(
                data, batch_size=None, num_workers=2, timeout=60)
            for i, got in enumerate(loader):
                x, boxes, _ = case(i)
                want = reference.roi_align(x, boxes, (5, 6), 0.75, 2, True)
                np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(data[0], before, rtol=0, atol=0)  # and after
            print("ok")
    """)


def test_beside_torch_threads_neither_hangs_nor_multiplies_threads():
    pytest.importorskip("torch")
    out = _run("""
        import torch
        torch.set_num_threads(2)
        curoi.set_num_threads(2)
        x, boxes, gy = case()
        want = expected(x, boxes, gy)
        a = torch.randn(256, 256, dtype=torch.float64)
        product = a @ a

        def curoi_worker_threads():
            names = []
            for task in os.listdir("/proc/self/task"):
                try:
                    with open(f"/proc/self/task/{task}/comm") as f:
                        names.append(f.read().strip())
                except OSError:
                    pass
            return names.count("curoi-worker")

        # Interleaved in one thread.
        for _ in range(3):
            check(ops(x, boxes, gy), want)
            torch.testing.assert_close(a @ a, product, rtol=0, atol=0)

        # Concurrently from two Python threads, for a few seconds.
        stop = time.monotonic() + 3
        errors, most = [], [0]
        def with_curoi():
            while time.monotonic() < stop:
                try:
                    check(ops(x, boxes, gy), want)
                except AssertionError as error:
                    errors.append(error)
                most[0] = max(most[0], curoi_worker_threads())
        def with_torch():
            while time.monotonic() < stop:
                if not torch.equal(a @ a, product):
                    errors.append("torch matmul changed")
                torch.nn.functional.conv2d(torch.randn(1, 8, 32, 32),
                                           torch.randn(8, 8, 3, 3))
        threads = [threading.Thread(target=with_curoi),
                   threading.Thread(target=with_torch)]
        for t in threads: t.start()
        for t in threads: t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "hung"
        assert not errors, errors[:3]
        # curoi ran on its 2 threads (the caller and one worker) throughout,
        # and neither library changed the other's setting.
        assert torch.get_num_threads() == 2 and curoi.get_num_threads() == 2
        curoi.set_num_threads(1)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        assert curoi.get_num_threads() == 1
        print("workers", most[0])
    """)
    assert "workers 1" in out


def test_cuda_refuses_clearly_in_a_child_forked_after_cuda():
    # Without a GPU, mark this process as a CUDA user the way a GPU call
    # would; the child's GPU path must then raise, not touch CUDA or hang.
    out = _run("""
        import curoi._gpu as gpu
        gpu._cuda_used = True
        def child():
            try:
                gpu.require_cupy()
            except gpu.CudaAfterForkError as error:
                assert "spawn" in str(error) and "fork" in str(error)
                print("refused", flush=True)
                return
            raise AssertionError("CUDA was not refused")
        assert fork_and_wait(child) == 0
        def cpu_child():
            check(ops(*case()), expected(*case()))   # the CPU path still works
        assert fork_and_wait(cpu_child) == 0
    """)
    assert "refused" in out

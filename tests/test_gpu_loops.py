"""The correctness suites against the GPU's loop code, run on the CPU.

The kernel sources have two loop structures around shared formulas: the
GPU's (one thread per output element or per bin and tile of channels,
grid-stride loops, scatter adds), which
NVRTC always compiles, and the CPU's (work items on a thread pool, per-box
weight tables). CUROI_CPU_LOOPS=gpu builds the CPU library with the GPU's
loops, run serially, so that the code every GPU executes is checked here
against the independent references without a GPU.

The suites run in subprocesses (one per core: the GPU loops are serial)
with that variable and a private cache folder. Each subprocess reports which
library it loaded; a probe then shows
that the harness can tell the builds apart: with several threads asked for,
the CPU loops start curoi's worker threads while the GPU loops, serial by
construction, start none, and the two builds are different files that give
the same numbers up to rounding.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# Forward and backward of both ops, every convention, adaptive, fixed and
# dense sampling, the plain and the fixed-point (deterministic) backward
# sums, adversarial boxes, and the property and onnxruntime comparisons.
# None of them depends on the CPU's loop structure, so none is deselected;
# the thread-count determinism tests hold trivially when the loops are serial.
SUITES = (
    "test_roi_align.py",
    "test_roi_pool.py",
    "test_channel_tiles.py",   # the families tiled by channels, every split
    "test_adversarial.py",
    "test_determinism.py",
    "test_properties.py",
    "test_onnxruntime.py",
    "test_onnx_roi_align.py",   # the max modes' kernels (roi_align_max.cu)
    "test_roi_align_max_kernels.py",
    "test_channels_last.py",    # NHWC == NCHW transposed, bit for bit
    "test_ps_roi_kernels.py",   # ps_roi_pool.cu and ps_roi_align.cu
    "test_roi_align_rotated_kernels.py",  # roi_align_rotated.cu
    "test_roi_align_rotated_boxes_backward.py",  # its box gradient
    "test_roi_align_boxes_backward.py",  # roi_align_boxes.cuh
    "test_roi_spp_kernels.py",  # roi_spp.cu
    "test_prroi_pool_kernels.py",  # prroi_pool.cu, box gradient included
    "test_crop_and_resize_kernels.py",  # crop_and_resize.cu
    "test_multiscale_roi_align_kernels.py",  # multiscale_roi_align.cu
)

# Run in both builds: an roi_align forward and backward big enough that the
# CPU loops hand it to the thread pool, on 4 threads. Reports the library and
# the number of curoi's worker threads alive afterwards (Linux names them in
# /proc), and saves the forward's result.
PROBE = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import curoi

    def workers():
        tasks = "/proc/self/task"
        if not os.path.isdir(tasks):
            return None
        names = []
        for task in os.listdir(tasks):
            try:
                with open(os.path.join(tasks, task, "comm")) as f:
                    names.append(f.read().strip())
            except OSError:
                pass  # a thread that ended meanwhile
        return names.count("curoi-worker")

    def probe(result_path):
        rng = np.random.default_rng(7)
        x = rng.standard_normal((2, 8, 24, 24)).astype(np.float32)
        corners = np.sort(rng.uniform(-2, 26, (64, 2, 2)), axis=1)
        boxes = np.concatenate([rng.integers(0, 2, (64, 1)),
                                corners[:, 0], corners[:, 1]], axis=1)
        boxes = boxes.astype(np.float32)
        curoi.set_num_threads(4)
        y = curoi.roi_align(x, boxes, 7, sampling_ratio=2, aligned=True)
        curoi.roi_align_backward(np.ones_like(y), boxes, x.shape, output_size=7,
                                 sampling_ratio=2, aligned=True)
        np.save(result_path, y)
        return {"workers": workers(), "info": curoi.backend_info()["cpu"],
                "module": curoi.__file__}
""")

DRIVER = PROBE + textwrap.dedent("""
    import pytest
    from curoi import _cpu
    _cpu.library()  # load it now, so that the suites all run against it
    before = curoi.backend_info()["cpu"]
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-rfE"] + %(suites)r)
    report = probe(%(result)r)
    report.update(rc=int(rc), before=before)
    print(json.dumps(report))
    sys.exit(int(rc))
""")


def _environment(loops, cache=None):
    env = dict(os.environ)
    env.update(
        CUROI_CPU_LOOPS=loops,
        PYTHONPATH=os.pathsep.join(
            [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        PYTHONDONTWRITEBYTECODE="1",
    )
    if cache is not None:
        env["CUROI_CACHE_DIR"] = str(cache)
    # The probe sets its own thread count; the suites start from the default.
    env.pop("CUROI_NUM_THREADS", None)
    return env


def _last_json_line(done):
    output = done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, output[-4000:]
    return json.loads(lines[-1])


def _shards(suites, count):
    """The suites dealt into ``count`` groups of about equal size, largest
    first: the GPU loops run serially, so each group gets a core of its own
    (the first process to need the library builds it, the others wait for
    that build on the cache folder's lock)."""
    sizes = {name: (REPO / "tests" / name).stat().st_size for name in suites}
    groups = [[] for _ in range(count)]
    for name in sorted(suites, key=sizes.get, reverse=True):
        min(groups, key=lambda g: sum(sizes[n] for n in g)).append(name)
    return [g for g in groups if g]


@pytest.fixture(scope="module")
def gpu_loops_run(tmp_path_factory):
    """The suites and the probe in subprocesses built with the GPU loops,
    one per core (at most 4), sharing one private cache: [(done, suites)],
    the folder and the first process's probe result."""
    from curoi import _cpu
    root = tmp_path_factory.mktemp("gpu_loops")
    env = _environment("gpu", root / "cache")
    runs = []
    for i, group in enumerate(_shards(SUITES, min(4, _cpu._available_cores()))):
        suites = [str(REPO / "tests" / name) for name in group]
        script = DRIVER % {"suites": suites, "result": str(root / f"probe-{i}.npy")}
        runs.append((subprocess.Popen([sys.executable, "-c", script], env=env, cwd=str(REPO),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True), group))
    results = []
    try:
        for proc, group in runs:
            out, err = proc.communicate(timeout=900)
            results.append((subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                            group))
    finally:
        for proc, _ in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results, root, root / "probe-0.npy"


def test_every_suite_runs_in_one_shard():
    for count in (1, 2, 3, 4):
        groups = _shards(SUITES, count)
        assert sorted(n for g in groups for n in g) == sorted(SUITES)
        assert len(groups) == min(count, len(SUITES))


def test_correctness_suites_pass_with_the_gpu_loops(gpu_loops_run):
    results, root, _ = gpu_loops_run
    assert sorted(n for _, group in results for n in group) == sorted(SUITES)
    libraries = set()
    for done, group in results:
        output = done.stdout + done.stderr
        # A failing case fails here, its summary in the message.
        assert done.returncode == 0, (group, output[-6000:])
        assert " passed" in done.stdout and " failed" not in done.stdout, output[-4000:]
        report = _last_json_line(done)
        assert Path(report["module"]).resolve().parent == REPO / "curoi"
        # The suites ran against the GPU-loops build, loaded before them and
        # not replaced.
        for info in (report["before"], report["info"]):
            assert info["loops"] == "gpu"
            assert Path(info["library"]).parent == root / "cache"
        assert report["before"]["library"] == report["info"]["library"]
        libraries.add(report["info"]["library"])
    assert len(libraries) == 1  # one build, shared


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"),
                    reason="counting threads by name needs Linux's /proc")
def test_the_gpu_loops_build_is_told_apart_from_the_cpu_loops(gpu_loops_run, tmp_path):
    (done, _), *_ = gpu_loops_run[0]
    gpu_result = gpu_loops_run[2]
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    gpu = _last_json_line(done)
    # The same probe with the CPU loops, in the cache the rest of the suite uses.
    cpu_result = tmp_path / "cpu_loops_probe.npy"
    script = PROBE + f"print(json.dumps(probe({str(cpu_result)!r})))\n"
    cpu_done = subprocess.run([sys.executable, "-c", script], env=_environment("cpu"),
                              cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert cpu_done.returncode == 0, cpu_done.stderr[-4000:]
    cpu = _last_json_line(cpu_done)
    assert cpu["info"]["loops"] == "cpu"
    # The CPU loops share the work among worker threads; the GPU loops run
    # every element on the calling thread (after the whole suites, too).
    assert cpu["workers"] >= 1
    assert gpu["workers"] == 0
    # Two different binaries: the cache key differs and so does the content
    # digest at the end of the name.
    cpu_library, gpu_library = Path(cpu["info"]["library"]), Path(gpu["info"]["library"])
    assert cpu_library != gpu_library
    assert cpu_library.stem.rsplit("-", 1)[1] != gpu_library.stem.rsplit("-", 1)[1]
    # Both compute the same thing, in a different order of float operations.
    np.testing.assert_allclose(np.load(gpu_result), np.load(cpu_result),
                               rtol=1e-5, atol=1e-6)


def test_cpu_loops_value_is_checked(monkeypatch):
    from curoi import _cpu
    monkeypatch.setenv("CUROI_CPU_LOOPS", "cuda")
    with pytest.raises(ValueError, match="CUROI_CPU_LOOPS.*'cpu'.*'gpu'.*'cuda'"):
        _cpu.loops_flags()
    monkeypatch.setenv("CUROI_CPU_LOOPS", "gpu")
    assert _cpu.loops_flags() == ("gpu", ("-DCUROI_GPU_LOOPS",))
    monkeypatch.setenv("CUROI_CPU_LOOPS", " ")
    assert _cpu.loops_flags() == ("cpu", ())
    monkeypatch.delenv("CUROI_CPU_LOOPS")
    assert _cpu.loops_flags() == ("cpu", ())


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_tiles_cut_the_work_per_output_element(gpu_loops_run):
    # callgrind's count on the GPU-loops build (in the suites' cache: built
    # once): a thread per bin and tile of channels against one channel a
    # thread, the structure of torchvision's kernels.
    from curoi import _kernel_work
    _, root, _ = gpu_loops_run
    rows = _kernel_work.report(cases=_kernel_work.CASES[:2], cache=root / "cache")
    (_, _, _, forward, forward_single), (_, _, _, backward, backward_single) = rows
    assert 0 < forward < 0.4 * forward_single
    assert 0 < backward < 0.5 * backward_single

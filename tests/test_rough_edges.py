"""Rough edges a new user hit: a C compiler as CXX, a warm cache without a
compiler, `python3 -m curoi build`, fractional batch indices, and the
messages and warnings of misused arguments."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import curoi
from conftest import seed_cache

# Hand computation (see test_cpu_backend.py): RoI Align of the ramp
# x + 10 y over box (1, 1, 5, 5), aligned, 2x2 bins, 2x2 samples.
EXPECTED = [16.5, 18.5, 36.5, 38.5]
SCRIPT = r"""
import json, sys
import numpy as np
import curoi
ramp = (np.arange(8)[None, :] + 10 * np.arange(8)[:, None]).astype(np.float32)[None, None]
try:
    y = curoi.roi_align(ramp, np.array([[0, 1, 1, 5, 5]], np.float32), 2, 1.0, 2, True)
except Exception as error:
    print(json.dumps({"error": type(error).__name__, "message": str(error)}))
    sys.exit(3)
print(json.dumps({"y": y.ravel().tolist()}))
"""


def _run(cache, **env):
    full = dict(os.environ, CUROI_CACHE_DIR=str(cache))
    full.pop("CUROI_SANITIZE", None)
    for key, value in env.items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=full,
                          capture_output=True, text=True, timeout=300)
    return done, json.loads(done.stdout.strip().splitlines()[-1])


def test_c_compiler_is_caught_before_the_build_and_nothing_is_cached(tmp_path):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc")
    cache = tmp_path / "cache"
    done, result = _run(cache, CXX=gcc)
    assert done.returncode == 3, done.stderr
    assert "C++ compiler" in result["message"] and "g++" in result["message"], result
    # The probe caught it: the long build never started, nothing was kept.
    assert "building its CPU kernels" not in done.stderr
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.parametrize("cxx", [None, "/no/such/c++"])
def test_warm_cache_is_used_without_a_compiler(tmp_path, cxx):
    cache = tmp_path / "cache"
    seed_cache(cache)
    env = {"CXX": cxx}
    if cxx is None:  # no compiler on PATH either
        env["PATH"] = str(tmp_path / "empty")
    done, result = _run(cache, **env)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert result["y"] == EXPECTED
    assert "building" not in done.stderr


def test_another_compiler_gets_a_library_of_its_own():
    from curoi import _cpu
    flags = _cpu._FLAGS
    cxx = shutil.which("g++") or shutil.which("c++")
    clang = shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    assert _cpu._library_stem([cxx], flags).startswith(_cpu._build_key(flags) + "-")
    assert _cpu._library_stem([cxx], flags) != _cpu._library_stem([cxx, "-g0"], flags)
    if clang:
        assert _cpu._library_stem([cxx], flags) != _cpu._library_stem([clang], flags)


def test_crop_and_resize_boxes_message():
    image = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(ValueError) as info:
        curoi.crop_and_resize(image, np.zeros((2, 5), np.float32),
                              np.zeros(2, np.int32), 2)
    message = str(info.value)
    assert "[K, 4]" in message and "(y1, x1, y2, x2)" in message, message
    assert "list" not in message and "(," not in message, message


def test_torch_tensor_that_requires_grad_warns_once():
    torch = pytest.importorskip("torch")
    from curoi import _interop
    _interop._warned_graph = False
    x = torch.rand(1, 1, 4, 4, requires_grad=True)
    boxes = torch.tensor([[0, 0, 0, 3, 3.0]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        curoi.roi_align(x, boxes, 2)
        curoi.roi_align(x, boxes, 2)
    messages = [str(w.message) for w in caught if "curoi.torch" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in caught]


def test_num_threads_above_the_cores_warns(tmp_path):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count()
    code = ("import curoi, warnings; warnings.simplefilter('always');"
            "curoi.get_num_threads(); import curoi._cpu as c; c._num_threads = None;"
            "print(curoi.get_num_threads())")
    env = dict(os.environ, CUROI_NUM_THREADS=str(cores + 5))
    done = subprocess.run([sys.executable, "-c", code], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == str(cores + 5)
    # Read twice from the environment, warned once.
    assert done.stderr.count("RuntimeWarning") == 1, done.stderr
    assert f"the {cores} cores" in done.stderr, done.stderr
    env["CUROI_NUM_THREADS"] = str(cores)
    done = subprocess.run([sys.executable, "-c", code], env=env,
                          capture_output=True, text=True, timeout=120)
    assert "CUROI_NUM_THREADS" not in done.stderr


def test_tf_variable_hint():
    tf = pytest.importorskip("tensorflow")
    v = tf.Variable(np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(TypeError, match=r"tf\.convert_to_tensor\(v\)"):
        curoi.roi_align(v, np.zeros((1, 5), np.float32), 2)


def _module(args, cache, **env):
    full = dict(os.environ, CUROI_CACHE_DIR=str(cache), **env)
    full.pop("CUROI_SANITIZE", None)
    return subprocess.run([sys.executable, "-m", "curoi"] + args, env=full,
                          capture_output=True, text=True, timeout=600)


def test_build_command_names_the_library_that_calls_then_load(tmp_path):
    # A warm cache: `build` finds the library, says where it is, builds
    # nothing; a process started afterwards with that cache loads it.
    cache = tmp_path / "cache"
    seeded = seed_cache(cache)
    done = _module(["build"], cache)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(seeded)
    assert "building" not in done.stderr
    loaded, result = _run(cache, PATH=str(tmp_path / "empty"))  # no compiler
    assert loaded.returncode == 0, loaded.stderr
    assert result["y"] == EXPECTED


def test_build_command_with_arguments_shows_the_usage(tmp_path):
    done = _module(["build", "now"], tmp_path / "cache")
    assert done.returncode == 2
    assert "python3 -m curoi build" in done.stderr
    assert not (tmp_path / "cache").exists()  # nothing was built


def test_fractional_batch_index_is_truncated_toward_zero():
    # torchvision's and detectron2's kernels convert the batch index to an
    # integer (C++'s truncation): 0.7 reads image 0, 1.99 image 1. Below 0
    # (even -0.5) or from N on the box reads nothing.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 8, 9)).astype(np.float32)
    corners = [1.2, 0.5, 6.8, 7.1]
    boxes = np.array([[0.7] + corners, [1.99] + corners, [-0.5] + corners,
                      [2.0] + corners], np.float32)
    whole = np.array([[0] + corners, [1] + corners], np.float32)
    for op in (lambda b: curoi.roi_align(x, b, 2, 1.0, 2, True),
               lambda b: curoi.roi_pool(x, b, 2, 1.0)):
        got, want = op(boxes), op(whole)
        np.testing.assert_array_equal(got[:2], want)
        assert want.any() and not got[2:].any()


def test_install_hints_say_it_as_the_readme_installs(monkeypatch):
    # Not `pip install curoi[...]`, which needs a published package.
    from curoi import _gpu, _kernel_report
    monkeypatch.setattr(_gpu, "cupy_or_none", lambda: None)
    with pytest.raises(RuntimeError, match=r'pip install -e "\.\[cuda12\]"'):
        _gpu.require_cupy()
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs", None)  # import fails
    with pytest.raises(_kernel_report.KernelReportError, match=r'pip install -e "\.\[cuda12\]"'):
        _kernel_report.nvrtc_module()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert 'pip install -e ".[cuda12]"' in readme and "pip install curoi[" not in readme

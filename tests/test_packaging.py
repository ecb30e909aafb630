"""The wheel carries the kernel sources, and an installed copy finds them.

The wheel is built from a copy of the working tree (so the build leaves no
build/ folder in the repository and concurrent runs do not collide),
installed into a private folder with ``pip install --target``, and imported
from there in a process that cannot see the repository. About 5 s.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ("roi_align.cu", "roi_pool.cu", "curoi_common.cuh")
TIMEOUT = 60  # each step; the whole test takes a few seconds


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """(path of the built wheel, pip's output)."""
    pytest.importorskip("setuptools")
    base = tmp_path_factory.mktemp("packaging")
    source = base / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        ".benchmarks", ".hypothesis", "*.so"))
    out = base / "wheels"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=base)
    assert done.returncode == 0, done.stdout + done.stderr
    [path] = out.glob("curoi-*.whl")
    return path, done.stdout + done.stderr


def test_wheel_contains_the_kernel_sources(wheel):
    path, _ = wheel
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        for kernel in KERNELS:
            member = f"curoi/cuda_src/{kernel}"
            assert member in names, sorted(names)
            # The very files of the checkout, not stale or empty copies.
            assert archive.read(member) == (ROOT / "cuda_src" / kernel).read_bytes(), member
    # Only inside the package: no top-level cuda_src/ or tests/ in site-packages.
    assert not any(n.startswith(("cuda_src/", "tests/")) for n in names), sorted(names)


def test_wheel_build_reports_no_packaging_problems(wheel):
    # setuptools' complaints about the data-only package curoi.cuda_src
    # (a package without __init__.py, files absent from package_data) or a
    # missing README would show up here.
    _, log = wheel
    suspicious = [line for line in log.splitlines()
                  if ("warn" in line.lower() or "deprecat" in line.lower())
                  and "byte-compiling is disabled" not in line]
    assert not suspicious, "\n".join(suspicious)


def test_installed_copy_finds_its_kernels_and_runs(wheel, tmp_path):
    path, _ = wheel
    target = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
         str(target), str(path)],
        capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "elsewhere"  # not the repository: it cannot be imported
    run_dir.mkdir()
    script = """if True:
        import json, numpy as np, curoi
        # A constant map averages to itself wherever the box lies on it, and
        # its maximum is the constant.
        x = np.full((1, 2, 6, 5), 3.25, np.float32)
        boxes = np.array([[0, 0.5, 1.0, 3.5, 4.0], [0, 1, 1, 2, 2]], np.float32)
        align = curoi.roi_align(x, boxes, 2, 1.0, 2, True).ravel().tolist()
        pool = curoi.roi_pool(x, boxes, 3).ravel().tolist()
        print(json.dumps({"file": curoi.__file__, "info": curoi.backend_info(),
                          "align": align, "pool": pool}))
    """
    env = dict(os.environ, PYTHONPATH=str(target), CUROI_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", script], cwd=run_dir, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # The installed copy was imported, not the editable one in the repository.
    assert Path(result["file"]).resolve().is_relative_to(target.resolve()), result["file"]
    kernel_dir = Path(result["info"]["kernel_dir"]).resolve()
    assert kernel_dir == (target / "curoi" / "cuda_src").resolve(), kernel_dir
    library = Path(result["info"]["cpu"]["library"])
    assert library.parent == tmp_path / "cache"  # built on first use, in the given cache
    assert result["align"] == [3.25] * (2 * 2 * 2 * 2)
    assert result["pool"] == [3.25] * (2 * 2 * 3 * 3)

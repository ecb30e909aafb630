"""The CPU backend's on-disk cache of the compiled kernel library.

Each scenario runs in fresh Python processes (a library, once loaded, stays
loaded) with CUROI_CACHE_DIR pointing into tmp_path, so nothing here touches
the user's cache. The value every process computes is hand-computable:
RoI Align of the ramp f(y, x) = x + 10 y over box (1, 1, 5, 5), aligned, 2x2
bins with 2x2 samples, samples at whole pixels 1, 2 | 3, 4 on each axis:
bin means 1.5 and 3.5, so [16.5, 18.5, 36.5, 38.5].
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import curoi
from conftest import seed_cache

EXPECTED = [16.5, 18.5, 36.5, 38.5]

# argv[1]: optional folder for a start barrier (write ready-<pid>, wait for go).
SCRIPT = r"""
import json, os, sys, time
import numpy as np
import curoi
before = curoi.backend_info()["cpu"]  # before the first call: nothing loaded
if len(sys.argv) > 1:
    sync = sys.argv[1]
    open(os.path.join(sync, "ready-%d" % os.getpid()), "w").close()
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(sync, "go")) and time.time() < deadline:
        time.sleep(0.002)
ramp = (np.arange(8)[None, :] + 10 * np.arange(8)[:, None]).astype(np.float32)[None, None]
try:
    y = curoi.roi_align(ramp, np.array([[0, 1, 1, 5, 5]], np.float32), 2, 1.0, 2, True)
except Exception as error:
    print(json.dumps({"error": type(error).__name__, "message": str(error),
                      "runtime_error": isinstance(error, RuntimeError),
                      "info": curoi.backend_info()["cpu"]}))
    sys.exit(3)
print(json.dumps({"y": y.ravel().tolist(), "info": curoi.backend_info()["cpu"],
                  "before": before}))
"""


def _env(cache, **extra):
    env = dict(os.environ, CUROI_CACHE_DIR=str(cache))
    env.update(extra)
    return env


def _run(cache, *args, **extra_env):
    done = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args)],
                          env=_env(cache, **extra_env), capture_output=True, text=True,
                          timeout=120)
    return done


def _result(done):
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _libraries(cache):
    return sorted(p for p in Path(cache).iterdir() if p.name.startswith("curoi-cpu-"))


# ---------------------------------------------------------- concurrency
def test_many_processes_build_an_empty_cache_at_once(tmp_path):
    cache, sync = tmp_path / "cache", tmp_path / "sync"
    cache.mkdir()
    sync.mkdir()
    count = 6
    env = _env(cache)
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(sync)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(count)]
    try:
        # Release all of them at the same moment, once each has imported
        # curoi, so that their first calls all find the cache empty.
        deadline = time.time() + 60
        while len(list(sync.glob("ready-*"))) < count and time.time() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.01)
        assert not any(cache.iterdir()), "someone built before the start signal"
        (sync / "go").touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["y"] == EXPECTED for r in results), results
    # The library is built on first use, into the cache folder that
    # backend_info names before and after.
    assert all(r["before"]["library"] is None for r in results)
    assert all(r["before"]["cache_dir"] == r["info"]["cache_dir"] == str(cache)
               for r in results)
    # Everyone loaded the same, final file ...
    paths = {r["info"]["library"] for r in results}
    assert len(paths) == 1, paths
    # ... and the folder holds exactly that library, without leftovers of the
    # builds that lost the race (temporary files, partial outputs).
    assert sorted(p.name for p in cache.iterdir()) == [Path(paths.pop()).name]


# ------------------------------------------------------ missing compiler
def test_missing_compiler_names_cxx_and_what_to_install(tmp_path):
    missing = str(tmp_path / "no-such-dir" / "no-such-c++")
    done = _run(tmp_path / "cache", CXX=missing)
    assert done.returncode == 3, (done.stdout, done.stderr)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    message = result["message"]
    assert result["runtime_error"], result
    assert "CXX" in message and missing in message, message
    # It says what to install, not just that something is missing.
    assert "install" in message.lower() and "g++" in message, message
    # backend_info agrees that there is no compiler, and nothing was written.
    assert result["info"]["compiler"] is None
    assert not (tmp_path / "cache").exists() or not _libraries(tmp_path / "cache")


def test_compiler_that_fails_gives_the_command(tmp_path):
    # A CXX that exists but cannot build (here `false`): the error shows the
    # command that failed, so the user can see which compiler was used.
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` program")
    done = _run(tmp_path / "cache", CXX=false)
    assert done.returncode == 3, (done.stdout, done.stderr)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["runtime_error"]
    # (the command of the first source that failed: one per kernel family)
    assert false in result["message"] and re.search(r"\w+\.cu\b", result["message"]), result
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir())  # no temporary left over


# ------------------------------------------------------- damaged cache
def _build_once(cache):
    """A cache holding the library that a fresh process uses. Built once by
    this process (the library of the session) and copied in, rather than
    compiled again for each test; the fresh process then loading that very
    file shows it is the one its own build would have made."""
    seeded = seed_cache(cache)
    first = _result(_run(cache))
    assert first["y"] == EXPECTED
    [library] = _libraries(cache)
    assert library == seeded and Path(first["info"]["library"]) == library
    return library


def _assert_rebuilt(cache, library):
    second = _result(_run(cache))
    assert second["y"] == EXPECTED
    assert Path(second["info"]["library"]) == library
    assert library.read_bytes()[:4] == b"\x7fELF"  # a real library again
    assert sorted(p.name for p in cache.iterdir()) == [library.name]
    # The repaired file is then used as it is.
    inode = library.stat().st_ino, library.stat().st_mtime_ns
    third = _result(_run(cache))
    assert third["y"] == EXPECTED
    assert (library.stat().st_ino, library.stat().st_mtime_ns) == inode


def _damage(library, damage):
    data = library.read_bytes()
    library.write_bytes({"garbage": b"this is not a shared library\n" * 64, "empty": b"",
                         "truncated": data[:len(data) // 2]}[damage])


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated"])
def test_damaged_library_is_removed_not_loaded(tmp_path, monkeypatch, damage):
    # Loading a truncated library can kill the process (SIGBUS): the lookup
    # must reject every kind of damage before loading, and remove the file.
    from curoi import _cpu
    cache = tmp_path / "cache"
    library = _build_once(cache)
    stem = library.name.rsplit("-", 1)[0]
    monkeypatch.setenv("CUROI_CACHE_DIR", str(cache))
    assert _cpu._cached_library(stem) == library  # intact: found
    _damage(library, damage)
    assert _cpu._cached_library(stem) is None
    assert not library.exists()


def test_damaged_library_is_rebuilt(tmp_path):
    # The whole repair, in fresh processes (one kind of damage: the lookup
    # above treats them alike).
    cache = tmp_path / "cache"
    library = _build_once(cache)
    _damage(library, "truncated")
    _assert_rebuilt(cache, library)


# ------------------------------------------------ compiler without OpenMP
def test_the_build_needs_no_openmp(monkeypatch):
    # The kernels' threads are curoi's own (std::thread), so a compiler
    # without OpenMP (like Apple clang) builds the same library: no flag of
    # any build variant asks for it. (That the library runs its kernels on
    # several threads is test_num_threads.py's.)
    from curoi import _cpu
    for loops in ("cpu", "gpu"):
        monkeypatch.setenv("CUROI_CPU_LOOPS", loops)
        monkeypatch.setenv("CUROI_SANITIZE", "address,undefined")
        flags = _cpu._FLAGS + _cpu.loops_flags()[1] + _cpu.sanitize_flags()
        assert not [f for f in flags if "openmp" in f.lower() or "gomp" in f], flags
        assert "-pthread" in flags


# --------------------------------------------------------- backend_info
def test_backend_info_reports_cache_dir_and_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CUROI_CACHE_DIR", str(tmp_path / "here"))
    info = curoi.backend_info()
    assert info["cpu"]["cache_dir"] == str(tmp_path / "here")
    compiler = info["cpu"]["compiler"]
    assert compiler and shutil.which(compiler.split()[0]), compiler
    assert info["cpu"]["compiler_version"]
    kernel_dir = Path(info["kernel_dir"])
    for name in ("roi_align.cu", "roi_pool.cu", "curoi_common.cuh"):
        assert (kernel_dir / name).is_file(), name
    # Reporting builds nothing.
    assert not (tmp_path / "here").exists()


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("CUROI_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert curoi.backend_info()["cpu"]["cache_dir"] == str(tmp_path / "xdg" / "curoi")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert curoi.backend_info()["cpu"]["cache_dir"] == \
        str(tmp_path / "home" / ".cache" / "curoi")
    monkeypatch.setenv("CUROI_CACHE_DIR", "~/elsewhere")  # ~ is expanded
    assert curoi.backend_info()["cpu"]["cache_dir"] == str(tmp_path / "home" / "elsewhere")


def test_backend_info_honours_cxx(monkeypatch):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("CXX", compiler)
    assert curoi.backend_info()["cpu"]["compiler"] == compiler


# ------------------------------------------------ unusable cache folder
def _unusable_cache_dirs(tmp_path):
    # Root ignores permission bits, so chmod cannot make a folder read-only
    # here: a path below a regular file cannot be created by anyone, and
    # /proc refuses new entries even to root.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    return {"below-a-file": blocker / "cache", "proc": Path("/proc") / "curoi-cache"}


@pytest.mark.parametrize("kind", ["below-a-file", "proc"])
def test_unusable_cache_dir_falls_back_to_a_temporary_folder(tmp_path, kind):
    wanted = _unusable_cache_dirs(tmp_path)[kind]
    if kind == "proc" and not Path("/proc/self").exists():
        pytest.skip("no /proc on this system")
    done = _run(wanted)
    result = _result(done)
    assert result["y"] == EXPECTED  # the library still builds, loads, computes
    used = Path(result["info"]["cache_dir"])
    # backend_info names the folder actually used, and the library is in it.
    assert used != wanted and Path(result["info"]["library"]).parent == used
    assert used.name.startswith("curoi-cache-")
    # One warning, naming the folder it could not use and the one it used,
    # pointing at the caller's line.
    assert done.stderr.count("RuntimeWarning") == 1, done.stderr
    assert str(wanted) in done.stderr and str(used) in done.stderr, done.stderr
    assert "<string>:" in done.stderr
    assert not wanted.exists()
    # The temporary folder goes away with the process.
    assert not used.exists()


def test_read_only_cache_with_the_library_is_used_without_a_warning(tmp_path):
    # A shared, prebuilt cache that this process may not write to: the
    # library in it is loaded as is, and no fallback happens. /proc stands
    # in for "not writable", so build into a folder and move the check to
    # the lookup: an intact library is found before writability matters.
    cache = tmp_path / "cache"
    library = _build_once(cache)
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c",
         "from curoi import _cpu\n"
         "_cpu._use_writable_cache_dir = lambda: (_ for _ in ()).throw(\n"
         "    AssertionError('a cached library must not need a writable folder'))\n"
         + SCRIPT],
        env=_env(cache), capture_output=True, text=True, timeout=120)
    result = _result(done)
    assert result["y"] == EXPECTED
    assert Path(result["info"]["library"]) == library
    assert result["info"]["cache_dir"] == str(cache)

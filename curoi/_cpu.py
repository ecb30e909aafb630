"""CPU backend: the kernel sources compiled by the host C++ compiler.

The library is built once per version of the sources, compiler and flags,
cached on disk, and loaded with ctypes. Several processes may build it at the
same time: each writes a private temporary file and renames it into place, so
a reader only ever sees a complete library.
"""

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

from . import _kernels, _sources

_FLAGS = (
    "-O3",
    "-std=c++17",
    "-fPIC",
    "-shared",
    "-DCUROI_WITH_F32",
    "-DCUROI_WITH_F64",
)
_OPENMP_FLAG = "-fopenmp"

_lock = threading.Lock()
_library = None
_functions = {}


class CompilerNotFoundError(RuntimeError):
    """No C++ compiler is available to build the CPU backend."""


def cache_dir() -> Path:
    """Where compiled CPU libraries are kept: $CUROI_CACHE_DIR, else
    $XDG_CACHE_HOME/curoi, else ~/.cache/curoi."""
    configured = os.environ.get("CUROI_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "curoi"


def compiler_command():
    """The C++ compiler as an argv list: $CXX if set, else the first of
    c++, g++, clang++ on PATH; None if there is none."""
    configured = os.environ.get("CXX")
    if configured:
        argv = shlex.split(configured)
        if argv and shutil.which(argv[0]):
            return argv
        return None
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def _compiler_version(argv):
    try:
        done = subprocess.run(
            argv + ["--version"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def _missing_compiler_error():
    configured = os.environ.get("CXX")
    where = f"CXX={configured!r} does not name a program on PATH" if configured \
        else "none of c++, g++, clang++ is on PATH"
    return CompilerNotFoundError(
        "curoi's CPU backend compiles its kernels with a C++ compiler, and "
        f"{where}. Install one (Debian/Ubuntu: `apt install g++`; Fedora: "
        "`dnf install gcc-c++`; macOS: `xcode-select --install`; conda: "
        "`conda install cxx-compiler`) or point CXX at it."
    )


def _library_path(argv, flags):
    key = hashlib.sha256()
    for part in (
        _sources.sources_digest(),
        "\0".join(argv),
        _compiler_version(argv),
        "\0".join(flags),
        sys.platform,
    ):
        key.update(part.encode())
        key.update(b"\n")
    suffix = ".dll" if sys.platform == "win32" else ".so"
    return cache_dir() / f"curoi-cpu-{key.hexdigest()[:24]}{suffix}"


def _compile(argv, flags, target: Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=target.suffix,
                               dir=target.parent)
    os.close(fd)
    sources = [str(_sources.source_path(f)) for f in _sources.FAMILIES]
    cmd = argv + ["-x", "c++"] + list(flags) + \
        ["-I", str(_sources.kernel_dir())] + sources + ["-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                "building curoi's CPU kernels failed:\n  "
                + " ".join(shlex.quote(c) for c in cmd) + "\n" + done.stderr
            )
        os.replace(tmp, target)  # atomic: readers see all of it or nothing
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build_and_load():
    argv = compiler_command()
    if argv is None:
        raise _missing_compiler_error()
    attempts = [_FLAGS + (_OPENMP_FLAG,), _FLAGS]
    last_error = None
    for flags in attempts:
        path = _library_path(argv, flags)
        if not path.exists():
            try:
                _compile(argv, flags, path)
            except RuntimeError as error:
                last_error = error
                continue
        try:
            library = ctypes.CDLL(str(path))
        except OSError:
            # A damaged file (a disk error, a copy cut short): build afresh.
            _compile(argv, flags, path)
            library = ctypes.CDLL(str(path))
        if _OPENMP_FLAG not in flags:
            warnings.warn(
                "curoi's CPU kernels were built without OpenMP (the compiler "
                f"rejected {_OPENMP_FLAG}) and will use one core. "
                f"The error was:\n{last_error}",
                RuntimeWarning,
                stacklevel=3,
            )
        return library, path
    raise last_error


def library():
    """The loaded CPU library, built on first use."""
    global _library
    with _lock:
        if _library is None:
            _library = _build_and_load()
        return _library[0]


def library_path():
    """Path of the loaded CPU library, or None if not loaded yet."""
    return None if _library is None else str(_library[1])


_C_TYPES = {
    _kernels.PTR: ctypes.c_void_p,
    _kernels.I64: ctypes.c_int64,
    _kernels.I32: ctypes.c_int,
}


def _function(name, acc_is_double):
    fn = _functions.get(name)
    if fn is None:
        fn = getattr(library(), name)
        kinds = _kernels.SIGNATURES[name.rsplit("_", 1)[0]]
        acc = ctypes.c_double if acc_is_double else ctypes.c_float
        fn.argtypes = [_C_TYPES.get(kind, acc) for kind in kinds]
        fn.restype = None
        _functions[name] = fn
    return fn


def launch(family, direction, dtype_name, args):
    """Run one kernel on NumPy arrays (C-contiguous); ctypes releases the
    GIL for the duration of the call."""
    if dtype_name not in _kernels.CPU_DTYPES:
        raise AssertionError(f"no CPU kernel for {dtype_name}")
    name = _kernels.kernel_name(family, direction, dtype_name)
    fn = _function(name, dtype_name == "float64")
    kinds = _kernels.SIGNATURES[f"{family}_{direction}"]
    values = [
        arg.ctypes.data if kind == _kernels.PTR else arg
        for kind, arg in zip(kinds, args)
    ]
    fn(*values)


def info():
    argv = compiler_command()
    return {
        "compiler": None if argv is None else " ".join(argv),
        "compiler_version": None if argv is None
        else (_compiler_version(argv).splitlines() or [""])[0],
        "cache_dir": str(cache_dir()),
        "library": library_path(),
        "threads": os.cpu_count(),
    }

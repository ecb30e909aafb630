"""CPU backend: the kernel sources compiled by the host C++ compiler.

The library is built once per version of the sources, compiler and flags,
cached on disk, and loaded with ctypes. Several processes may build it at the
same time: each writes a private temporary file and renames it into place, so
a reader only ever sees a complete library. The file's name ends with a digest
of its content, checked before loading, so a file damaged later (a disk
error, a copy cut short) is rebuilt rather than loaded.

Testing aid: $CUROI_CPU_LOOPS chooses which loops of the kernel sources the
library is built with. ``cpu`` (the default) is the CPU's own loop structure
(work items on the thread pool, per-box weight tables); ``gpu`` compiles the
GPU's loops instead (-DCUROI_GPU_LOOPS: one "thread" per output element, or
per bin and tile of channels, and scatter adds, exactly the code NVRTC
compiles), run serially on the calling
thread whatever the thread count, so that the GPU's loop code runs in CI on a
machine without a GPU. The choice is part of the cache key, so the two
builds never replace each other; backend_info()["cpu"]["loops"] says which
one is loaded. It is not meant for users: the GPU loops are slow on a CPU.
"""

import atexit
import ctypes
import hashlib
import numbers
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
    # Nothing reads errno: without it, llrint, floor and ceil compile to
    # single instructions instead of library calls.
    "-fno-math-errno",
    "-fPIC",
    "-shared",
    # The kernels' thread pool (curoi_common.cuh) uses std::thread.
    "-pthread",
    "-DCUROI_WITH_F32",
    "-DCUROI_WITH_F64",
)

# CUROI_SANITIZE="address,undefined" (any -fsanitize= list) builds the
# library instrumented, for the test suite's sanitizer run. The flags are
# part of the cache key, so the instrumented build never replaces the
# ordinary one. -O1 overrides -O3: the usual level for readable reports.
_SANITIZE_ENV = "CUROI_SANITIZE"


def sanitize_flags():
    """Extra compiler flags that $CUROI_SANITIZE asks for (empty if unset)."""
    value = os.environ.get(_SANITIZE_ENV, "").strip()
    if not value:
        return ()
    if not all(part.replace("-", "_").isidentifier() for part in value.split(",")):
        raise ValueError(
            f"{_SANITIZE_ENV} must be a comma-separated list of sanitizers "
            f"such as 'address,undefined', got {value!r}"
        )
    return (
        f"-fsanitize={value}",
        "-fno-sanitize-recover=all",  # the first report ends the process
        "-fno-omit-frame-pointer",
        "-g",
        "-O1",
    )


def _check_sanitizer_runtime(flags):
    """An ASan-instrumented library cannot run in a process whose first
    library is not the ASan runtime (Python is not instrumented): the
    runtime would abort the process on load. Say what to do instead."""
    if not any(f.startswith("-fsanitize=") and "address" in f for f in flags):
        return
    if not hasattr(ctypes.CDLL(None), "__asan_init"):
        raise RuntimeError(
            f"{_SANITIZE_ENV} asks for AddressSanitizer, whose runtime must be "
            "loaded before Python starts: run with LD_PRELOAD=$(c++ "
            "-print-file-name=libasan.so) and ASAN_OPTIONS=detect_leaks=0"
        )

# CUROI_CPU_LOOPS="gpu" builds the GPU's loop structure for the CPU (see the
# module docstring); part of the cache key like the sanitizer flags.
_LOOPS_ENV = "CUROI_CPU_LOOPS"
_LOOPS_FLAGS = {"cpu": (), "gpu": ("-DCUROI_GPU_LOOPS",)}


def _requested_loops():
    """$CUROI_CPU_LOOPS as written, "cpu" when unset or blank."""
    return os.environ.get(_LOOPS_ENV, "").strip() or "cpu"


def loops_flags():
    """Which loops $CUROI_CPU_LOOPS asks for ("cpu" or "gpu") and the
    compiler flags that build them."""
    value = _requested_loops()
    if value not in _LOOPS_FLAGS:
        raise ValueError(
            f"{_LOOPS_ENV} must be 'cpu' (the CPU's own loops, the default) or "
            f"'gpu' (the GPU's loops run serially, for tests), got {value!r}"
        )
    return value, _LOOPS_FLAGS[value]


_lock = threading.Lock()
_library = None
_library_sanitize = None  # the -fsanitize= list of the loaded library
_library_loops = None  # "cpu" or "gpu": the loops of the loaded library
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


# A cache folder that cannot be created or written (read-only home, a path
# below a file) is replaced, for this process, by a private temporary folder:
# configured folder -> folder used instead.
_fallback_dirs = {}


def _library_dir() -> Path:
    """The folder that libraries are looked up in and built into: cache_dir(),
    unless this process had to fall back from it."""
    wanted = cache_dir()
    return _fallback_dirs.get(wanted, wanted)


def _use_writable_cache_dir():
    """Make sure _library_dir() can be written, else fall back (once per
    process and folder) to a new temporary folder, with a RuntimeWarning
    that names both. The temporary folder is removed at exit: a loaded
    library stays usable after its file is gone."""
    wanted = cache_dir()
    if wanted in _fallback_dirs:
        return
    try:
        wanted.mkdir(parents=True, exist_ok=True)
        # Permission bits do not tell (root ignores them, a read-only mount
        # does not show in them): try to create a file.
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=wanted)
        os.close(fd)
        os.unlink(probe)
        return
    except OSError as error:
        reason = error.strerror or str(error)
    used = Path(tempfile.mkdtemp(prefix="curoi-cache-"))
    atexit.register(shutil.rmtree, used, True)
    _fallback_dirs[wanted] = used
    _warn_from_caller(
        f"curoi cannot use the cache folder {wanted} ({reason}); this process "
        f"builds its CPU library in {used} instead, and removes it at exit. "
        "Set CUROI_CACHE_DIR to a writable folder to keep the build."
    )


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


def _build_key(flags):
    """First part of a library's name: the sources and flags, not the
    compiler, so that a process without a compiler can still find a library
    built for these sources (a prebuilt cache in a Docker image)."""
    key = hashlib.sha256()
    for part in (_sources.sources_digest(), "\0".join(flags), sys.platform):
        key.update(part.encode())
        key.update(b"\n")
    return f"curoi-cpu-{key.hexdigest()[:24]}"


def _library_stem(argv, flags):
    """Name of the library for these sources, compiler and flags, without
    the content digest and suffix that the built file adds: the build key,
    then a key of the compiler (its command and version), so that another
    compiler builds a library of its own."""
    key = hashlib.sha256()
    for part in ("\0".join(argv), _compiler_version(argv)):
        key.update(part.encode())
        key.update(b"\n")
    return f"{_build_key(flags)}-{key.hexdigest()[:12]}"


_SUFFIX = ".dll" if sys.platform == "win32" else ".so"


def _content_digest(data):
    return hashlib.sha256(data).hexdigest()[:16]


def _cached_library(stem):
    """A cached library whose name starts with ``stem`` and whose content
    matches the digest in its name, the newest if several (a build key
    alone matches every compiler's). A file that does not match (cut short,
    damaged) is removed, never loaded: loading a truncated library can kill
    the process with SIGBUS."""
    found = []
    for path in _library_dir().glob(f"{stem}-*{_SUFFIX}"):
        try:
            intact = _content_digest(path.read_bytes()) == path.stem.rsplit("-", 1)[1]
            if intact:
                found.append((path.stat().st_mtime, path.name, path))
                continue
        except OSError:
            pass
        try:
            path.unlink()
        except OSError:
            pass
    return max(found)[2] if found else None


class _FolderLock:
    """An exclusive lock on the cache folder across processes (flock on
    the folder itself, so that nothing but libraries is ever left there):
    concurrent first calls wait for one build instead of each compiling.
    Where flock does not exist the builds run side by side, each finishing
    with an atomic rename, which is also safe."""

    def __init__(self, folder):
        self._folder, self._fd = folder, None

    def __enter__(self):
        try:
            import fcntl

            self._fd = os.open(self._folder, os.O_RDONLY)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            self.__exit__()
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


def _compile(argv, flags, stem):
    """Build the library into the cache (unless another process has just
    done so); return its path. Each family's source compiles to an object of
    its own, as many at once as the process has cores, then one link."""
    folder = _library_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with _FolderLock(folder):
        path = _cached_library(stem)
        if path is not None:
            return path
        work = tempfile.mkdtemp(prefix=".build-", dir=folder)
        try:
            _check_compiler(work, argv)
            print(f"curoi: building its CPU kernels with {' '.join(argv)} "
                  f"(once; about a minute), cached in {folder}",
                  file=sys.stderr, flush=True)
            return _compile_in(work, folder, argv, flags, stem)
        finally:
            shutil.rmtree(work, ignore_errors=True)


# A C++ program that a C driver (CXX=gcc, CXX=cc) compiles and links into
# a shared library without complaint, but which then fails to load: its
# RTTI and std::string need libstdc++, which only a C++ driver links in.
_PROBE = r"""
#include <string>
struct Base { virtual ~Base() {} };
struct Derived : Base {};
extern "C" int curoi_probe(int n) {
    Base *b = new Derived;
    int ok = dynamic_cast<Derived *>(b) != nullptr;
    delete b;
    return ok + static_cast<int>(std::to_string(n).size());
}
"""


def _not_cxx_error(argv, reason):
    return RuntimeError(
        f"curoi's CPU backend needs a C++ compiler, but CXX={' '.join(argv)!r} "
        "builds a library that does not load (" + reason.strip() + "); it "
        "looks like a C compiler. Set CXX to a C++ compiler: g++ or "
        "clang++ (for gcc, CXX=g++; for clang, CXX=clang++).")


def _load_check(path, argv):
    """Load a freshly built library; raise, naming the compiler, if it does
    not load, so that such a library never enters the cache."""
    try:
        ctypes.CDLL(str(path))
    except OSError as error:
        raise _not_cxx_error(argv, str(error)) from None


def _check_compiler(work, argv):
    """Build and load a small C++ probe before the long build, so that a C
    compiler is caught in a second. A probe that does not compile is left to
    the real build, whose error shows the failing command."""
    source = os.path.join(work, "curoi-probe.cpp")
    with open(source, "w") as f:
        f.write(_PROBE)
    target = os.path.join(work, "curoi-probe" + _SUFFIX)
    try:
        done = subprocess.run(
            argv + ["-x", "c++", "-std=c++17", "-fPIC", "-shared", source, "-o", target],
            capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError):
        return
    if done.returncode == 0:
        _load_check(target, argv)


def _run_compiler(cmds, parallel):
    """Run compiler commands, ``parallel`` at a time; raise on the first
    failure with its command line and messages."""
    pending, running = list(cmds), []
    while pending or running:
        while pending and len(running) < parallel:
            cmd = pending.pop(0)
            running.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                  stderr=subprocess.PIPE, text=True)))
        cmd, proc = running.pop(0)
        _, err = proc.communicate()
        if proc.returncode != 0:
            for _, other in running:
                other.kill()
                other.wait()
            raise RuntimeError(
                "building curoi's CPU kernels failed:\n  "
                + " ".join(shlex.quote(c) for c in cmd) + "\n" + err)


def _compile_in(work, folder, argv, flags, stem):
    include = ["-I", str(_sources.kernel_dir())]
    compile_flags = [f for f in flags if f != "-shared"]
    objects, cmds = [], []
    for family in _sources.FAMILIES:
        obj = os.path.join(work, family + ".o")
        objects.append(obj)
        cmds.append(argv + ["-x", "c++"] + compile_flags + include
                    + ["-c", str(_sources.source_path(family)), "-o", obj])
    _run_compiler(cmds, _available_cores())
    tmp = os.path.join(work, "library" + _SUFFIX)
    _run_compiler([argv + list(flags) + objects + ["-o", tmp]], 1)
    _load_check(tmp, argv)
    with open(tmp, "rb") as f:
        digest = _content_digest(f.read())
    target = folder / f"{stem}-{digest}{_SUFFIX}"
    os.replace(tmp, target)  # atomic: readers see all of it or nothing
    return target


def _warn_from_caller(message):
    """Warn at the first frame outside curoi, where the user called it."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RuntimeWarning, stacklevel=level)


def _build_and_load():
    argv = compiler_command()
    global _library_sanitize, _library_loops
    loops, loop_flags = loops_flags()
    sanitize = sanitize_flags()
    _check_sanitizer_runtime(sanitize)
    _library_sanitize = sanitize[0].split("=", 1)[1] if sanitize else None
    _library_loops = loops
    flags = _FLAGS + loop_flags + sanitize
    if argv is None:
        # Without a compiler, any intact library built for these sources
        # and flags will do (a cache warmed by `python3 -m curoi build`).
        path = _cached_library(_build_key(flags))
        if path is None:
            raise _missing_compiler_error()
        return ctypes.CDLL(str(path)), path
    stem = _library_stem(argv, flags)
    # A library already in the cache is used even when the folder is read
    # only (a shared, prebuilt cache); building needs a writable one.
    path = _cached_library(stem)
    if path is None:
        _use_writable_cache_dir()
        path = _compile(argv, flags, stem)
    return ctypes.CDLL(str(path)), path


def library():
    """The loaded CPU library, built on first use."""
    global _library
    with _lock:
        if _library is None:
            loaded = _build_and_load()
            _store_num_threads(loaded[0], get_num_threads())
            _library = loaded
        return _library[0]


# ------------------------------------------------------------ thread count
_NUM_THREADS_ENV = "CUROI_NUM_THREADS"
_num_threads = None  # None until set or first read from the environment
_warned_threads = False  # warned once that $CUROI_NUM_THREADS exceeds the cores


def _available_cores():
    """Cores this process may run on (its CPU affinity where the OS has
    one: a container or taskset may allow fewer than os.cpu_count())."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def _threads_from_environment():
    text = os.environ.get(_NUM_THREADS_ENV, "").strip()
    if not text:
        return _available_cores()
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(
            f"{_NUM_THREADS_ENV} must be a positive integer (threads for "
            f"curoi's CPU kernels), got {text!r}"
        )
    global _warned_threads
    cores = _available_cores()
    if value > cores and not _warned_threads:
        _warned_threads = True
        _warn_from_caller(
            f"{_NUM_THREADS_ENV}={value} is more than the {cores} cores this "
            "process may run on: the extra threads only wait for a core, and a "
            f"call can take longer. Set {_NUM_THREADS_ENV} to {cores} or fewer.")
    return value


def get_num_threads():
    """Threads the CPU kernels use: set by set_num_threads, else
    $CUROI_NUM_THREADS, else the cores available to this process; in a
    process forked from one that imported curoi, $CUROI_NUM_THREADS or 1."""
    global _num_threads
    if _num_threads is None:
        _num_threads = _threads_from_environment()
    return _num_threads


def set_num_threads(num_threads):
    """Use ``num_threads`` threads in the CPU kernels from now on, in every
    Python thread (like torch.set_num_threads)."""
    global _num_threads
    if not isinstance(num_threads, numbers.Integral) or isinstance(num_threads, bool):
        raise TypeError(f"num_threads must be an int, got {num_threads!r}")
    if not 1 <= num_threads <= 2**31 - 1:
        raise ValueError(
            f"num_threads must be between 1 and 2**31 - 1, got {num_threads}")
    with _lock:
        _num_threads = int(num_threads)
        if _library is not None:
            _store_num_threads(_library[0], _num_threads)


def _store_num_threads(lib, value):
    # The kernels read this variable at each launch (curoi_common.cuh).
    ctypes.c_int.in_dll(lib, "curoi_num_threads").value = value


def _threads_in_forked_child():
    """A forked child's thread count until it sets one: $CUROI_NUM_THREADS
    if set (and valid), else 1. A parent's count is not inherited: N forked
    workers (a DataLoader's, a multiprocessing pool's) would otherwise each
    run as many threads as the parent, N times more than there are cores."""
    try:
        return _threads_from_environment() \
            if os.environ.get(_NUM_THREADS_ENV, "").strip() else 1
    except ValueError:
        return 1


def _after_fork_in_child():
    # Only the forking thread survives fork(): a lock that another thread held
    # stays locked for ever in the child, so start with fresh ones. The
    # kernels' worker threads are replaced by the library's own fork handler.
    global _lock, _num_threads
    _lock = threading.Lock()
    _num_threads = _threads_in_forked_child()
    if _library is not None:
        _store_num_threads(_library[0], _num_threads)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def library_path():
    """Path of the loaded CPU library, or None if not loaded yet."""
    return None if _library is None else str(_library[1])


_C_TYPES = {
    _kernels.PTR: ctypes.c_void_p,
    _kernels.I64: ctypes.c_int64,
    _kernels.I32: ctypes.c_int,
}


# A by-value struct as ctypes passes it: only its size and alignment matter
# to the calling convention (the kernels' structs are larger than 16 bytes,
# which every ABI curoi builds for passes in memory, and 8-byte aligned).
_STRUCT_TYPES = {
    struct: type(struct.name, (ctypes.Structure,),
                 {"_fields_": [("words", ctypes.c_uint64 * (struct.dtype.itemsize // 8))]})
    for struct in _kernels.STRUCTS
}


def _c_type(kind, acc):
    if isinstance(kind, _kernels.Struct):
        return _STRUCT_TYPES[kind]
    return _C_TYPES.get(kind, acc)


def _function(name, acc_is_double):
    fn = _functions.get(name)
    if fn is None:
        fn = getattr(library(), name)
        kinds = _kernels.SIGNATURES[name.rsplit("_", 1)[0]]
        acc = ctypes.c_double if acc_is_double else ctypes.c_float
        fn.argtypes = [_c_type(kind, acc) for kind in kinds]
        fn.restype = None
        _functions[name] = fn
    return fn


def address(array):
    """The address of a C-contiguous NumPy array's first element. ctypes reads
    a writable buffer's address in well under a microsecond, numpy's
    ``.ctypes.data`` takes two; read-only and empty arrays take the latter."""
    if array.flags.writeable and array.size:
        return ctypes.addressof(ctypes.c_char.from_buffer(array))
    return array.ctypes.data


_kernels_by_key = {}
_launchers = {}  # (family, direction, dtype) -> (function, positions of the arrays)


def kernel(family, direction, dtype_name):
    """The ctypes function of one kernel, for callers that pass pointers as
    integers themselves (the small-call fast paths): a dict lookup once
    cached."""
    return _kernel((family, direction, dtype_name))


def _kernel(key):
    family, direction, dtype_name = key
    fn = _kernels_by_key.get(key)
    if fn is None:
        fn = _function(_kernels.kernel_name(family, direction, dtype_name),
                       dtype_name == "float64")
        _kernels_by_key[key] = fn
    return fn


def launch(family, direction, dtype_name, args):
    """Run one kernel on NumPy arrays (C-contiguous); ctypes releases the
    GIL for the duration of the call."""
    key = (family, direction, dtype_name)
    found = _launchers.get(key)
    if found is None:
        if dtype_name not in _kernels.CPU_DTYPES:
            raise AssertionError(f"no CPU kernel for {dtype_name}")
        kinds = _kernels.SIGNATURES[f"{family}_{direction}"]
        pointers = tuple(i for i, kind in enumerate(kinds) if kind == _kernels.PTR)
        structs = tuple((i, _STRUCT_TYPES[kind]) for i, kind in enumerate(kinds)
                        if isinstance(kind, _kernels.Struct))
        found = _launchers[key] = (_kernel(key), pointers, structs)
    fn, pointers, structs = found
    args = list(args)
    for i in pointers:
        if args[i] is not None:
            args[i] = address(args[i])
    for i, struct in structs:
        args[i] = struct.from_buffer_copy(args[i].tobytes())
    fn(*args)


def info():
    argv = compiler_command()
    return {
        "compiler": None if argv is None else " ".join(argv),
        "compiler_version": None if argv is None
        else (_compiler_version(argv).splitlines() or [""])[0],
        "cache_dir": str(_library_dir()),
        # The loaded library's sanitizers; before loading, what it would get.
        "sanitize": _library_sanitize if _library is not None
        else os.environ.get(_SANITIZE_ENV, "").strip() or None,
        # Likewise the loop structure ("cpu" or "gpu", see the docstring).
        "loops": _library_loops if _library is not None else _requested_loops(),
        "library": library_path(),
        "threads": get_num_threads(),
    }

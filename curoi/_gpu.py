"""GPU backend: the kernel sources compiled by NVRTC through CuPy.

One ``cupy.RawModule`` per (device, kernel family, element type), compiled on
first use and held in memory (CuPy also keeps the cubin on disk). Each module
holds a single element type, so float32 and float64 kernels need no CUDA
headers; float16 and bfloat16 need ``cuda_fp16.h``/``cuda_bf16.h``, found
where the CUDA runtime wheel (or a CUDA toolkit) put them.
"""

import functools
import os
import sys
import threading

import numpy as np

from . import _kernels, _sources

_THREADS_PER_BLOCK = 256
# The grid-stride loop covers any size; more blocks than this only add
# scheduling overhead.
_MAX_BLOCKS = 65536

_lock = threading.Lock()
_modules = {}


def cupy_or_none():
    try:
        import cupy
    except ImportError:
        return None
    return cupy


# Whether this process has used CUDA through curoi, and whether it was forked
# from a process that had: CUDA does not survive fork(), and a child that
# touches it can fail obscurely or hang.
_cuda_used = False
_forked_after_cuda = False


class CudaAfterForkError(RuntimeError):
    """CUDA was asked for in a process forked after CUDA was initialised."""


def _after_fork_in_child():
    global _lock, _forked_after_cuda
    _lock = threading.Lock()
    torch = sys.modules.get("torch")
    torch_cuda = False
    if torch is not None:
        try:
            torch_cuda = bool(torch.cuda.is_initialized())
        except Exception:
            pass
    _forked_after_cuda = _forked_after_cuda or _cuda_used or torch_cuda


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_not_forked():
    if _forked_after_cuda:
        raise CudaAfterForkError(
            "curoi cannot use CUDA in this process: it was forked from a "
            "process that had already initialised CUDA, and CUDA does not "
            "survive fork(). Start processes that use the GPU with the "
            "'spawn' or 'forkserver' method (multiprocessing.set_start_method, "
            "or multiprocessing_context= of torch's DataLoader)."
        )


def require_cupy():
    """CuPy, for an array on a CUDA device. Marks this process as a CUDA
    user, so that its forked children refuse CUDA with a clear error."""
    global _cuda_used
    _check_not_forked()
    cupy = cupy_or_none()
    if cupy is None:
        raise RuntimeError(
            "this array is on a CUDA device, and curoi runs CUDA kernels "
            "through CuPy, which is not installed. Install curoi with the "
            "extra for your CUDA version, in curoi's folder: "
            "`pip install -e \".[cuda12]\"` or `pip install -e \".[cuda13]\"`."
        )
    _cuda_used = True
    return cupy


@functools.lru_cache(maxsize=None)
def cuda_include_dirs():
    """Folders holding cuda_fp16.h and cuda_bf16.h, for half-precision
    kernels: the CUDA runtime wheel's headers or a CUDA toolkit's."""
    found = []
    try:
        from cuda import pathfinder

        folder = pathfinder.find_nvidia_header_directory("cudart")
        if folder:
            found.append(str(folder))
    except Exception:  # pathfinder absent or finds nothing: try CuPy's view
        pass
    if not found:
        try:
            from cupy.cuda import get_cuda_path

            root = get_cuda_path()
            if root and os.path.isfile(os.path.join(root, "include", "cuda_fp16.h")):
                found.append(os.path.join(root, "include"))
        except Exception:
            pass
    return tuple(found)


def compile_options(dtype_name):
    """NVRTC options for one module: the same for the GPU backend and for the
    CI check that compiles every variant to a cubin."""
    options = [
        "--std=c++17",
        f"-DCUROI_WITH_{_kernels.SUFFIXES[dtype_name].upper()}",
        "-I" + str(_sources.kernel_dir()),
    ]
    if dtype_name in ("float16", "bfloat16"):
        dirs = cuda_include_dirs()
        if not dirs:
            raise RuntimeError(
                f"{dtype_name} kernels need the CUDA headers cuda_fp16.h and "
                "cuda_bf16.h, and none were found. Install them with "
                "`pip install \"cuda-toolkit[cudart]\"` (curoi's cuda12 "
                "extra does) or install a CUDA toolkit."
            )
        options += ["-I" + d for d in dirs]
    return tuple(options)


def module_source(family):
    """The text NVRTC compiles. It starts with a hash of all kernel files, so
    that CuPy's on-disk cache, keyed by this text, notices a changed header."""
    return (
        f"// curoi kernel sources {_sources.sources_digest()}\n"
        + _sources.read_source(family)
    )


# ------------------------------------------------------ architectures
#: The oldest GPU architecture (compute capability as major * 10 + minor)
#: curoi builds its kernels for, by NVRTC's major version. Its kernels need
#: sm_60 at least (atomicAdd on doubles, for the float64 backward); they are
#: built and checked from sm_70 (Volta) with CUDA 12's NVRTC (the cuda12
#: extra), and CUDA 13's NVRTC (the cuda13 extra) starts at sm_75 (Turing).
MINIMUM_ARCH = {12: 70, 13: 75}


def minimum_arch(nvrtc_major):
    """The oldest compute capability this NVRTC major version builds for."""
    if nvrtc_major in MINIMUM_ARCH:
        return MINIMUM_ARCH[nvrtc_major]
    # Newer NVRTC releases drop old architectures, never add them back.
    known = max(MINIMUM_ARCH) if nvrtc_major > max(MINIMUM_ARCH) else min(MINIMUM_ARCH)
    return MINIMUM_ARCH[known]


def checked_archs(nvrtc_major):
    """The architectures every kernel is compiled for in the checks: the
    oldest supported one, Ampere (native bfloat16) and Hopper."""
    return tuple(f"sm_{arch}" for arch in (minimum_arch(nvrtc_major), 80, 90))


def nvrtc_version():
    """(major, minor) of the NVRTC that CuPy loads."""
    from cupy_backends.cuda.libs import nvrtc

    return tuple(nvrtc.getVersion())


class UnsupportedDeviceError(RuntimeError):
    """The CUDA device is older than the kernels are built for."""


def unsupported_device_message(device_id, name, capability, nvrtc):
    """Why device ``device_id`` (``name``, compute capability ``capability``
    as major * 10 + minor) cannot run curoi's kernels with NVRTC version
    ``nvrtc`` (major, minor), or None when it can."""
    floor = minimum_arch(nvrtc[0])
    if capability >= floor:
        return None
    advice = ("Use the cuda12 extra (CUDA 12's NVRTC builds for sm_70 and newer) "
              "with a driver for CUDA 12."
              if capability >= MINIMUM_ARCH[12] else
              "The float64 backward needs sm_60 at least, and curoi is built and "
              f"checked from sm_{MINIMUM_ARCH[12]} (Volta): run on a newer GPU or "
              "on the CPU (NumPy or CPU tensors).")
    return (f"CUDA device {device_id} ({name}, sm_{capability}) is older than curoi "
            f"supports with NVRTC {nvrtc[0]}.{nvrtc[1]}, which builds its kernels "
            f"for sm_{floor} and newer. {advice}")


_checked_devices = set()


def _check_device(cupy, device_id):
    if device_id in _checked_devices:
        return
    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"]
    if isinstance(name, bytes):
        name = name.decode()
    message = unsupported_device_message(
        device_id, name, 10 * int(props["major"]) + int(props["minor"]), nvrtc_version())
    if message is not None:
        raise UnsupportedDeviceError(message)
    _checked_devices.add(device_id)


def _module(cupy, device_id, family, dtype_name):
    key = (device_id, family, dtype_name)
    module = _modules.get(key)
    if module is None:
        with _lock:
            module = _modules.get(key)
            if module is None:
                _check_device(cupy, device_id)
                _check_not_capturing(cupy)
                with cupy.cuda.Device(device_id):
                    module = cupy.RawModule(
                        code=module_source(family),
                        options=compile_options(dtype_name),
                    )
                    module.compile()
                _modules[key] = module
    return module


def _check_not_capturing(cupy):
    """A kernel module is compiled and loaded on its first use, which a CUDA
    graph being captured on the current stream cannot record."""
    stream = cupy.cuda.get_current_stream()
    try:
        capturing = stream.is_capturing()
    except Exception:  # a CuPy or driver that cannot tell: try anyway
        return
    if capturing:
        raise RuntimeError(
            "curoi compiles each kernel on its first use, which cannot happen "
            "while a CUDA graph is being captured: call the operation once "
            "before capturing (a warm-up run, as torch.cuda.graph's "
            "documentation recommends), then capture")


def launch(family, direction, dtype_name, args, total):
    """Launch one kernel on CuPy arrays, on the current device and stream."""
    cupy = require_cupy()
    device_id = cupy.cuda.Device().id
    module = _module(cupy, device_id, family, dtype_name)
    kernel = module.get_function(_kernels.kernel_name(family, direction, dtype_name))
    acc = np.float64 if dtype_name == "float64" else np.float32
    kinds = _kernels.SIGNATURES[f"{family}_{direction}"]
    values = []
    for kind, arg in zip(kinds, args):
        if kind == _kernels.I64:
            arg = np.int64(arg)
        elif kind == _kernels.I32:
            arg = np.int32(arg)
        elif kind == _kernels.ACC:
            arg = acc(arg)
        elif arg is None:  # an optional output the kernel leaves alone
            arg = np.uint64(0)
        # A Struct's value, a one-element structured NumPy array, is passed
        # by value as it is.
        values.append(arg)
    blocks = min(-(-total // _THREADS_PER_BLOCK), _MAX_BLOCKS)
    kernel((blocks,), (_THREADS_PER_BLOCK,), tuple(values))


def info():
    cupy = cupy_or_none()
    if cupy is None:
        return {"cupy": None, "devices": [], "note": "CuPy is not installed"}
    result = {"cupy": cupy.__version__, "devices": []}
    try:
        from cupy_backends.cuda.libs import nvrtc

        result["nvrtc"] = "%d.%d" % nvrtc.getVersion()
    except Exception as error:
        result["nvrtc"] = f"unavailable ({error})"
    try:
        runtime = cupy.cuda.runtime
        result["cuda_runtime"] = runtime.runtimeGetVersion()
        result["cuda_driver"] = runtime.driverGetVersion()
        for i in range(runtime.getDeviceCount()):
            props = runtime.getDeviceProperties(i)
            name = props["name"]
            if isinstance(name, bytes):
                name = name.decode()
            result["devices"].append(
                f"{i}: {name} (sm_{props['major']}{props['minor']})"
            )
    except Exception as error:
        result["note"] = f"no usable CUDA device ({error})"
    result["include_dirs"] = list(cuda_include_dirs())
    try:
        result["minimum_arch"] = f"sm_{minimum_arch(nvrtc_version()[0])}"
    except Exception:  # no NVRTC: nothing can be compiled anyway
        result["minimum_arch"] = None
    return result


def device_count():
    cupy = cupy_or_none()
    if cupy is None:
        return 0
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0

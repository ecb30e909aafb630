from . import _cpu, _gpu, _sources


def backend_info():
    """What curoi can run on here: a dict with ``cpu`` (compiler, cache
    folder, loaded library, threads), ``gpu`` (CuPy, NVRTC and CUDA
    versions, devices, header folders for half precision) and
    ``kernel_dir``. Builds and compiles nothing."""
    return {
        "kernel_dir": str(_sources.kernel_dir()),
        "cpu": _cpu.info(),
        "gpu": _gpu.info(),
    }

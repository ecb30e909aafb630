"""Every GPU kernel variant compiles with NVRTC, on a machine without a GPU.

The GPU backend hands ``curoi._gpu.module_source(family)`` and
``curoi._gpu.compile_options(dtype)`` to ``cupy.RawModule``. Here the very
same text and options go to NVRTC directly (through
``cupy_backends.cuda.libs.nvrtc``: ``cupy.cuda.compiler`` asks the driver for
the device's architecture and so needs a GPU), once per target architecture.
A typo in a GPU-only branch (``#if defined(__CUDACC_RTC__)``, the fp16/bf16
specialisations) never reaches the CPU backend's compiler, so only this test
catches it without a device.
"""

import pytest

pytest.importorskip("cupy")
nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")

from curoi import _gpu, _kernel_report, _kernels, _sources  # noqa: E402

try:
    NVRTC_VERSION = nvrtc.getVersion()
except Exception as error:  # CuPy without its NVRTC library
    pytest.skip(f"CuPy is installed but NVRTC cannot be loaded: {error}",
                allow_module_level=True)

FAMILIES = _sources.FAMILIES


def _directions(family):
    """Every kernel the backends may launch for a family (forward, backward,
    the deterministic backward and its finishing pass)."""
    return _kernels.directions(family)

DTYPES = tuple(_kernels.SUFFIXES)
# The oldest architecture this NVRTC builds curoi for (sm_70 with CUDA 12,
# sm_75 with CUDA 13; bfloat16 conversions are emulated in software below
# sm_80), the first with native bfloat16, and the generation of the H100/H200
# machines the GPU suite runs on.
ARCHS = _gpu.checked_archs(NVRTC_VERSION[0])


def test_the_matrix_is_what_the_backend_offers():
    # If a family or a dtype is added to the package, the parametrisation
    # below picks it up; this pins the minimum that must be there.
    assert set(FAMILIES) >= {"roi_pool", "roi_align", "roi_align_max"}
    assert set(DTYPES) >= {"float32", "float64", "float16", "bfloat16"}
    for family in ("roi_pool", "roi_align", "roi_align_max"):
        assert {"forward", "backward", "backward_fixed"} <= set(_directions(family))
    for family in FAMILIES:
        assert "forward" in _directions(family) or family in _sources.SHARED_FAMILIES
    assert _directions("fixed_point") == ["scale"]


def _compile(source, name, options):
    """NVRTC compile; returns (cubin or None, log, error or None)."""
    prog = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, list(options))
        except nvrtc.NVRTCError as error:
            return None, nvrtc.getProgramLog(prog), error
        return nvrtc.getCUBIN(prog), nvrtc.getProgramLog(prog), None
    finally:
        nvrtc.destroyProgram(prog)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_module_compiles_to_cubin(family, dtype, arch):
    # The kernel report (tests/test_kernel_report.py) compiles the very same
    # source and options, plus ptxas's verbose report, once per process: this
    # test shares that compile instead of repeating it.
    try:
        compiled = _kernel_report.compile_module(family, dtype, arch)
    except _kernel_report.KernelReportError as error:
        pytest.fail(f"NVRTC {NVRTC_VERSION} failed on {family} {dtype} {arch}: {error}")
    cubin, log = compiled.cubin, compiled.log
    # A cubin (machine code, not PTX): an ELF image.
    assert isinstance(cubin, bytes) and cubin[:4] == b"\x7fELF", (
        f"{family} {dtype} {arch}: NVRTC returned no ELF cubin; log:\n{log}"
    )
    # Both kernels of the module, under the exact names the launcher asks
    # for (extern "C", so unmangled). Symbol names sit NUL-terminated in the
    # ELF string table: matching "\0name\0" keeps roi_pool_forward_f16 from
    # being found inside roi_pool_forward_bf16's name.
    for direction in _directions(family):
        symbol = _kernels.kernel_name(family, direction, dtype).encode()
        assert b"\0" + symbol + b"\0" in cubin, (
            f"{family} {dtype} {arch}: kernel {symbol.decode()} missing from "
            f"the cubin; NVRTC log:\n{log}"
        )
    # One element type per module: float32/float64 modules must not need the
    # half-precision headers, so no other dtype's kernels may be in there.
    for other in DTYPES:
        if other == dtype:
            continue
        for direction in _directions(family):
            symbol = _kernels.kernel_name(family, direction, other).encode()
            assert b"\0" + symbol + b"\0" not in cubin, (
                f"{family} {dtype} {arch}: unexpected kernel {symbol.decode()}"
            )


# cupy.RawModule (CuPy 14, cupy/cuda/compiler.py) appends these to the
# options it is given before calling NVRTC. They change how unannotated
# functions and float32 denormals are compiled, so compile once more with
# them, for the newest architecture.
_CUPY_ADDED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_module_compiles_with_the_options_cupy_adds(family, dtype):
    options = (tuple(_gpu.compile_options(dtype)) + _CUPY_ADDED_OPTIONS
               + ("--gpu-architecture=sm_90",))
    cubin, log, error = _compile(_gpu.module_source(family), f"{family}.cu", options)
    assert error is None, f"NVRTC failed on {family} {dtype} ({error}):\n{log}"
    for direction in _directions(family):
        symbol = _kernels.kernel_name(family, direction, dtype).encode()
        assert b"\0" + symbol + b"\0" in cubin, log


def test_single_and_double_compile_without_cuda_headers(monkeypatch):
    # float32/float64 modules need no CUDA headers (a bare NVRTC install
    # suffices); half precision needs cuda_fp16.h/cuda_bf16.h and must say
    # how to get them when they are missing.
    monkeypatch.setattr(_gpu, "cuda_include_dirs", lambda: ())
    for dtype in ("float32", "float64"):
        options = tuple(_gpu.compile_options(dtype)) + ("--gpu-architecture=sm_80",)
        cubin, log, error = _compile(_gpu.module_source("roi_align"), "roi_align.cu",
                                     options)
        assert error is None, f"{dtype} without CUDA headers ({error}):\n{log}"
    for dtype in ("float16", "bfloat16"):
        with pytest.raises(RuntimeError, match="pip install"):
            _gpu.compile_options(dtype)


def test_compile_errors_reach_the_log():
    # The failure path above relies on NVRTC raising and keeping a log; make
    # sure a broken source does exactly that, so a real failure is readable.
    bad = _gpu.module_source("roi_pool") + "\nthis is not C++;\n"
    options = tuple(_gpu.compile_options("float32")) + ("--gpu-architecture=sm_80",)
    cubin, log, error = _compile(bad, "broken.cu", options)
    assert error is not None and cubin is None
    assert "error" in log.lower()

"""The static GPU check: float64 instructions and register spills per kernel,
read from NVRTC's PTX and ptxas's report, on a machine without a GPU.

First the counting itself, on hand-written PTX and on tiny kernels whose
float64 operations and spills are known, so that the real check below can
fail; then the real check on every kernel the GPU backend compiles.
"""

import pytest

pytest.importorskip("cupy")

from curoi import _kernel_report, _kernels, _sources  # noqa: E402

try:
    _kernel_report.nvrtc_module()
except _kernel_report.KernelReportError as error:
    pytest.skip(str(error), allow_module_level=True)


# Hand-written PTX: a predicated double add, a conversion from double, a
# double division in a device function called over several lines, a
# comment and declarations that name f64 without being instructions, and
# an entry with none.
HAND_WRITTEN_PTX = """
.version 8.8
.target sm_80
.address_size 64

.extern .func (.param .b32 func_retval0) vprintf(.param .b64 p0, .param .b64 p1);

.func  (.param .f64 func_retval0) half_of(
    .param .f64 half_of_param_0
)
{
    .reg .f64   %fd<4>;
    ld.param.f64    %fd1, [half_of_param_0];   // one
    div.rn.f64  %fd2, %fd1, 0d4000000000000000;   // two, a division
    st.param.f64    [func_retval0+0], %fd2;   // three
    ret;
}

.visible .entry uses_doubles(
    .param .u64 uses_doubles_param_0,
    .param .f64 uses_doubles_param_1
)
{
    .reg .pred  %p<2>;
    .reg .f32   %f<3>;
    .reg .f64   %fd<5>;
    .reg .b64   %rd<3>;

    // add.f64 in a comment is not an instruction
    ld.param.u64    %rd1, [uses_doubles_param_0];
    ld.global.f32   %f1, [%rd1];
    setp.gt.f32 %p1, %f1, 0f00000000;
    @%p1 bra    $L__BB0_2;
    cvt.f64.f32 %fd1, %f1;
$L__BB0_2:
    @!%p1 add.f64   %fd2, %fd1, %fd1;
    { // callseq 0, 0
    .reg .b32 temp_param_reg;
    .param .b64 param0;
    st.param.f64    [param0+0], %fd2;
    .param .b64 retval0;
    call.uni (retval0),
    half_of,
    (
    param0
    );
    ld.param.f64    %fd3, [retval0+0];
    } // callseq 0
    cvt.rn.f32.f64  %f2, %fd3;
    st.global.f32   [%rd1], %f2;
    ret;
}

.visible .entry single_only(
    .param .u64 single_only_param_0
)
{
    .reg .f32   %f<3>;
    .reg .b64   %rd<2>;
    ld.param.u64    %rd1, [single_only_param_0];
    ld.global.f32   %f1, [%rd1];
    add.f32 %f2, %f1, %f1;
    st.global.f32   [%rd1], %f2;
    ret;
}
"""


def test_counting_on_hand_written_ptx():
    counts = _kernel_report.count_f64_instructions(HAND_WRITTEN_PTX)
    # Entries only; the device function's 3 instructions are charged to the
    # entry that calls it: cvt.f64.f32, add.f64, st.param.f64,
    # ld.param.f64, cvt.rn.f32.f64 in the entry, plus 3 in half_of.
    assert counts == {"uses_doubles": (5 + 3, 1), "single_only": (0, 0)}


def test_the_call_graph_follows_calls_over_several_lines():
    graph = _kernel_report.ptx_call_graph(HAND_WRITTEN_PTX)
    assert graph["uses_doubles"] == {"uses_doubles", "half_of"}
    assert graph["single_only"] == {"single_only"}


PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'big' for 'sm_80'
ptxas info    : Function properties for big
ptxas         .     368 bytes stack frame, 1328 bytes spill stores, 1336 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 368 bytes cumulative stack size, 372 bytes cmem[0]
ptxas info    : Compiling entry function 'small' for 'sm_80'
ptxas info    : Function properties for small
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers, 368 bytes cmem[0]
ptxas info    : Function properties for _Z5thirdd
ptxas         .     16 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads
"""


def test_ptxas_log_parsing():
    parsed = _kernel_report.parse_ptxas_log(PTXAS_LOG)
    assert parsed == {
        "big": {"registers": 24, "stack": 368, "spill_stores": 1328,
                "spill_loads": 1336},
        "small": {"registers": 10, "stack": 0, "spill_stores": 0, "spill_loads": 0},
        "_Z5thirdd": {"stack": 16, "spill_stores": 4, "spill_loads": 8},
    }


TINY_KERNELS = r"""
extern "C" __global__ void only_float(const float* in, float* out) {
  int i = threadIdx.x;
  out[i] = in[i] * 2.0f + 1.0f;
}
// Three widenings, two double adds, one narrowing: 6 float64 instructions
// (a sum of three cannot be folded back into float arithmetic).
extern "C" __global__ void six_doubles(const float* a, const float* b,
                                       const float* c, float* out) {
  int i = threadIdx.x;
  out[i] = (float)((double)a[i] + (double)b[i] + (double)c[i]);
}
__device__ __noinline__ double third(double v) { return v / 3.0; }
// The one division sits in a function left out of line.
extern "C" __global__ void calls_a_division(const double* in, double* out) {
  int i = threadIdx.x;
  out[i] = third(in[i]);
}
// 40 values live across a loop: more than 24 registers can hold.
extern "C" __global__ void many_live_values(const float* in, float* out, int n) {
  float acc[40];
#pragma unroll
  for (int j = 0; j < 40; ++j) acc[j] = in[j * 32 + threadIdx.x];
  for (int k = 0; k < n; ++k) {
#pragma unroll
    for (int j = 0; j < 40; ++j) acc[j] = acc[j] * acc[(j + 1) % 40] + in[k];
  }
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < 40; ++j) s += acc[j];
  out[threadIdx.x] = s;
}
"""


def _tiny_report(options):
    compiled = _kernel_report.compile_source(TINY_KERNELS, "tiny.cu", options, "sm_80")
    return {row.kernel: row for row in _kernel_report.analyse(compiled, "float32", "sm_80")}


def test_counts_on_tiny_kernels():
    rows = _tiny_report([])
    assert rows["only_float"].f64_instructions == 0
    assert rows["six_doubles"].f64_instructions == 6
    assert rows["six_doubles"].f64_divisions == 0
    assert rows["calls_a_division"].f64_divisions == 1
    for row in rows.values():
        assert row.registers is not None and row.registers > 0, row
        assert row.spill_bytes == 0, row


def test_a_register_limit_forces_spills_and_the_report_sees_them():
    # 24 is the lowest limit ptxas accepts on sm_80.
    rows = _tiny_report(["--maxrregcount=24"])
    spilling = rows["many_live_values"]
    assert spilling.registers <= 24
    assert spilling.spill_store_bytes > 0 and spilling.spill_load_bytes > 0
    assert spilling.stack_bytes > 0
    assert rows["only_float"].spill_bytes == 0


def test_compile_errors_carry_the_log():
    with pytest.raises(_kernel_report.KernelReportError, match="error"):
        _kernel_report.compile_source("this is not C++;", "broken.cu", [], "sm_80")


def test_the_table_has_one_line_per_kernel():
    rows = list(_tiny_report([]).values())
    lines = _kernel_report.format_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].startswith("| kernel") and "f64 instr" in lines[0]
    assert all(line.count("|") == lines[0].count("|") for line in lines)


# The real check, on every kernel the GPU backend compiles.

SINGLE_AND_HALF = ("float32", "float16", "bfloat16")


def _f64_cases():
    for family in _sources.FAMILIES:
        # Only the plain kernels: the deterministic ones (*_fixed*) scale
        # terms into an int64 fixed-point sum through double on purpose.
        for direction in ("forward", "backward", "boxes_backward", "boxes_finish"):
            if f"{family}_{direction}" not in _kernels.SIGNATURES:
                continue
            for dtype in SINGLE_AND_HALF:
                for arch in _kernel_report.ARCHS:
                    yield pytest.param(family, direction, dtype, arch,
                                       id=f"{family}_{direction}-{dtype}-{arch}")


def _row(family, dtype, arch, name):
    rows = {row.kernel: row for row in _kernel_report.module_report(family, dtype, arch)}
    assert name in rows, f"{name} missing from the PTX of {family} {dtype} {arch}"
    return rows[name]


@pytest.mark.parametrize("family, direction, dtype, arch", _f64_cases())
def test_single_and_half_precision_kernels_have_no_float64(family, direction, dtype,
                                                          arch):
    name = _kernels.kernel_name(family, direction, dtype)
    row = _row(family, dtype, arch, name)
    assert row.f64_instructions == 0, (
        f"{name} on {arch}: {row.f64_instructions} float64 instructions "
        f"({row.f64_divisions} divisions)"
    )


@pytest.mark.parametrize("arch", _kernel_report.ARCHS)
@pytest.mark.parametrize("dtype", _kernel_report.DTYPES)
@pytest.mark.parametrize("family", _sources.FAMILIES)
def test_no_kernel_spills(family, dtype, arch):
    rows = _kernel_report.module_report(family, dtype, arch)
    expected = {_kernels.kernel_name(family, direction, dtype)
                for direction in _kernels.directions(family)}
    assert {row.kernel for row in rows} == expected
    for row in rows:
        assert row.registers is not None, f"ptxas reported nothing for {row.kernel}"
        assert row.spill_bytes == 0, (
            f"{row.kernel} on {arch} spills: {row.spill_store_bytes} bytes stored, "
            f"{row.spill_load_bytes} loaded, {row.registers} registers"
        )

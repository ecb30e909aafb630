"""The tables passed to kernels by value (curoi._kernels.Struct) have the
layout of their C structs, on both compilers: the host C++ compiler of the
CPU backend and NVRTC of the GPU backend. A mismatch would hand the kernels
shifted addresses and sizes, so each member's offset and the struct's size
are asserted at compile time, from the NumPy dtype."""

import shutil
import subprocess

import pytest

from curoi import _gpu, _kernels, _sources

# The kernel source each struct is defined in.
_SOURCES = {"MultiscaleLevels": "multiscale_roi_align", "RoiSppLevels": "roi_spp"}


def _assertions(struct, offsets=True):
    """Static assertions of the struct's size and each member's size and
    offset. NVRTC has no offsetof: there the members' sizes, in the dtype's
    order, and a size with no room for padding pin the offsets (and the
    host compiler checks them directly)."""
    lines = [f"static_assert(sizeof({struct.name}) == {struct.dtype.itemsize}, "
             f"\"size of {struct.name}\");"]
    for name in struct.dtype.names:
        dtype, offset = struct.dtype.fields[name][:2]
        lines.append(f"static_assert(sizeof((({struct.name}*)0)->{name}) == "
                     f"{dtype.itemsize}, \"size of {struct.name}::{name}\");")
        if offsets:
            lines.append(f"static_assert(offsetof({struct.name}, {name}) == {offset}, "
                         f"\"offset of {struct.name}::{name}\");")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("struct", _kernels.STRUCTS, ids=lambda s: s.name)
def test_the_dtype_has_no_padding(struct):
    end = 0
    for name in struct.dtype.names:
        dtype, offset = struct.dtype.fields[name][:2]
        assert offset == end, name
        end += dtype.itemsize
    assert end == struct.dtype.itemsize and end % 8 == 0


def test_every_struct_has_its_source():
    assert {s.name for s in _kernels.STRUCTS} == set(_SOURCES)


@pytest.mark.parametrize("struct", _kernels.STRUCTS, ids=lambda s: s.name)
def test_layout_on_the_host_compiler(struct, tmp_path):
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    source = tmp_path / "layout.cc"
    source.write_text(f'#include <cstddef>\n#include "{_SOURCES[struct.name]}.cu"\n'
                      + _assertions(struct))
    done = subprocess.run(
        [compiler, "-std=c++17", "-fsyntax-only", "-DCUROI_WITH_F32", "-DCUROI_WITH_F64",
         "-I", str(_sources.kernel_dir()), str(source)],
        capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("struct", _kernels.STRUCTS, ids=lambda s: s.name)
def test_layout_on_nvrtc(struct):
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    source = _gpu.module_source(_SOURCES[struct.name]) + "\n" + _assertions(
        struct, offsets=False)
    program = nvrtc.createProgram(source, "layout.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(program, list(_gpu.compile_options("float32"))
                                 + ["--gpu-architecture=sm_90"])
        except nvrtc.NVRTCError as error:
            pytest.fail(f"{error}:\n{nvrtc.getProgramLog(program)}")
    finally:
        nvrtc.destroyProgram(program)


def test_a_broken_assertion_fails():
    # The checks above can fail: a wrong size is a compile error.
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    source = (_gpu.module_source("roi_spp")
              + "\nstatic_assert(sizeof(RoiSppLevels) == 1, \"size\");\n")
    program = nvrtc.createProgram(source, "layout.cu", [], [])
    try:
        with pytest.raises(nvrtc.NVRTCError):
            nvrtc.compileProgram(program, list(_gpu.compile_options("float32"))
                                 + ["--gpu-architecture=sm_90"])
    finally:
        nvrtc.destroyProgram(program)

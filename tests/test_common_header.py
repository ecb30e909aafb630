"""Helpers of cuda_src/curoi_common.cuh that only the GPU build calls,
compiled here by the host compiler and checked against Python arithmetic.

curoi_output_index locates an output element for the GPU's one-thread-per-
element loop (the CPU loops over bins instead), with a 32-bit branch for
outputs below 2^32 elements and a 64-bit one above; both branches run here. curoi_channel_tile gives a thread of the tiled
GPU loops its bin and its channels; together the threads of a launch must
cover every output element exactly once.
"""

import ctypes
import subprocess

import numpy as np
import pytest

from curoi import _cpu, _sources

_HARNESS = r"""
#include "curoi_common.cuh"

extern "C" void locate(const int64_t* index, int64_t count, int64_t total,
                       int64_t channels, int64_t pooled_h, int64_t pooled_w,
                       int64_t* out) {
  for (int64_t i = 0; i < count; ++i) {
    const CuroiOutputIndex at =
        curoi_output_index(index[i], total, channels, pooled_h, pooled_w);
    out[4 * i] = at.k;
    out[4 * i + 1] = at.c;
    out[4 * i + 2] = at.ph;
    out[4 * i + 3] = at.pw;
  }
}

extern "C" void tiles(int64_t threads, int64_t channels, int64_t groups,
                      int64_t pooled_h, int64_t pooled_w, int channels_last,
                      int64_t* out) {
  for (int64_t i = 0; i < threads; ++i) {
    const CuroiChannelTile t =
        channels_last ? curoi_channel_tile<true>(i, threads, channels, groups,
                                                 pooled_h, pooled_w)
                      : curoi_channel_tile<false>(i, threads, channels, groups,
                                                  pooled_h, pooled_w);
    const int64_t v[6] = {t.k, t.ph, t.pw, t.first, t.step, t.count};
    for (int j = 0; j < 6; ++j) out[6 * i + j] = v[j];
  }
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    argv = _cpu.compiler_command()
    if argv is None:
        pytest.skip("no C++ compiler")
    folder = tmp_path_factory.mktemp("header")
    source = folder / "harness.cpp"
    source.write_text(_HARNESS)
    library = folder / "harness.so"
    done = subprocess.run(
        argv + ["-std=c++17", "-O2", "-fPIC", "-shared",
                "-I", str(_sources.kernel_dir()), str(source), "-o", str(library)],
        capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return ctypes.CDLL(str(library))


@pytest.fixture(scope="module")
def locate(harness):
    function = harness.locate
    function.restype = None
    function.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_void_p]

    def run(index, k, c, ph, pw):
        index = np.ascontiguousarray(index, dtype=np.int64)
        out = np.empty((len(index), 4), np.int64)
        function(index.ctypes.data, len(index), k * c * ph * pw, c, ph, pw,
                 out.ctypes.data)
        return out
    return run


def _expected(index, c, ph, pw):
    index = [int(i) for i in index]
    return np.array([(i // (c * ph * pw), i // (ph * pw) % c, i // pw % ph, i % pw)
                     for i in index], np.int64)


@pytest.mark.parametrize("shape", [
    (3, 5, 7, 7),                  # small: the 32-bit branch
    (512, 256, 7, 7),              # a detection batch
    (4, 2**20, 31, 33),            # just under 2^32 elements
    (3, 2**20, 33, 65),            # past 2^32 elements: the 64-bit branch
    (1, 1, 2**31 - 1, 2**31 - 1),  # the largest output_size, past 2^61
])
def test_output_index_matches_integer_arithmetic(locate, shape):
    k, c, ph, pw = shape
    total = k * c * ph * pw
    rng = np.random.default_rng(0)
    index = np.concatenate([
        np.arange(min(total, 1000)),
        total - 1 - np.arange(min(total, 1000)),
        rng.integers(0, total, 2000, dtype=np.int64),
        [2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1],
    ])
    index = index[(index >= 0) & (index < total)]
    np.testing.assert_array_equal(locate(index, k, c, ph, pw),
                                  _expected(index, c, ph, pw))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("k, c, ph, pw", [
    (1, 1, 1, 1), (3, 17, 7, 7), (2, 490, 3, 3), (1024, 256, 7, 7),
    (1, 256, 7, 7), (5, 3, 2, 5),
])
def test_channel_tiles_cover_each_output_once(harness, channels_last, k, c, ph, pw):
    from curoi import _ops
    function = harness.tiles
    function.restype = None
    function.argtypes = [ctypes.c_int64] * 5 + [ctypes.c_int, ctypes.c_void_p]
    groups = _ops.channel_groups(k * ph * pw, c)
    threads = k * ph * pw * groups
    out = np.empty((threads, 6), np.int64)
    function(threads, c, groups, ph, pw, int(channels_last), out.ctypes.data)
    kk, yy, xx, first, step, count = out.T
    assert (count >= 1).all() or channels_last  # NCHW groups are never empty
    assert count.max() <= _ops.MAX_CHANNEL_TILE
    seen = np.zeros((k, c, ph, pw), np.int64)
    for row in out:
        channels = row[3] + row[4] * np.arange(row[5])
        seen[row[0], channels, row[1], row[2]] += 1
    np.testing.assert_array_equal(seen, 1)
    # Coalescing: neighbouring threads differ in the fastest output index.
    if channels_last:
        np.testing.assert_array_equal(first[:groups], np.arange(groups))
    else:
        np.testing.assert_array_equal(xx[:pw], np.arange(pw))
    if k * c * ph * pw < _ops.TILE_THREADS:
        assert count.max() == 1  # a small call gets a thread per channel
    else:
        assert threads >= _ops.TILE_THREADS  # and a large one fills the GPU

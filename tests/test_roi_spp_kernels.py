"""Spatial pyramid pooling over boxes (SPPnet), at the kernel level:
curoi._ops.roi_spp_forward/_backward on the CPU (and, from test_gpu_loops.py,
with the GPU's loop code; from test_sanitizers.py, under AddressSanitizer and
UndefinedBehaviorSanitizer, so this file imports only NumPy, curoi and the
references).

For each box and level l, RoI Pool's l x l bins (both conventions); the
output row is the levels' [C, l, l] blocks in turn. Expected values come
from the reference's roi_pool concatenated level by level (max), a direct
mean over the reference's bins (avg), hand computation, and the adjoint
identity; layouts, thread counts and the two backward sums are checked as the
properties they are.
"""

import numpy as np
import pytest

import curoi
import reference as ref
from curoi import _cpu, _ops
from test_adversarial import EXTREME, UNUSABLE, ZOO

DTYPES = (np.float32, np.float64)
CONVENTIONS = ("torchvision", "mmcv")
MODES = ("max", "avg")
LEVELS = (1, 2, 4)


# ------------------------------------------------------------------ helpers
def _rois(boxes, dtype):
    acc = np.float64 if dtype == np.float64 else np.float32
    return np.ascontiguousarray(np.asarray(boxes, np.float64).reshape(-1, 5), acc)


def _nhwc(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def _nchw(a):
    return np.ascontiguousarray(np.moveaxis(a, -1, 1))


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view({4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def spp(x, boxes, levels=LEVELS, scale=1.0, convention="torchvision", mode="max",
        channels_last=False, bins=None, with_argmax=True):
    """Forward of NCHW x run in either layout: (out, argmax or None)."""
    levels = np.asarray(levels, np.int64)
    if bins is None:
        bins = int(sum(max(int(v), 0) ** 2 for v in levels))
    k, c = len(boxes), x.shape[1]
    out = np.full((k, c * bins), np.nan, x.dtype)
    argmax = np.full(out.shape, -7, np.int32) if with_argmax else None
    _ops.roi_spp_forward(_nhwc(x) if channels_last else np.ascontiguousarray(x),
                         _rois(boxes, x.dtype), levels, out, argmax, scale,
                         convention, mode, channels_last=channels_last)
    return out, argmax


def spp_backward(g, argmax, boxes, shape, levels=LEVELS, scale=1.0,
                 convention="torchvision", mode="max", deterministic=False,
                 channels_last=False):
    n, c, h, w = shape
    gx = np.full((n, h, w, c) if channels_last else (n, c, h, w), np.nan, g.dtype)
    if argmax is not None:
        argmax = np.ascontiguousarray(argmax)
    _ops.roi_spp_backward(np.ascontiguousarray(g), argmax, _rois(boxes, g.dtype),
                          np.asarray(levels, np.int64), gx, scale, convention, mode,
                          deterministic=deterministic, channels_last=channels_last)
    return _nchw(gx) if channels_last else gx


def _random_case(seed, dtype):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 3)), int(rng.integers(1, 5))
    h, w = (int(v) for v in rng.integers(3, 13, 2))
    scale = (1.0, 0.5, 0.25, 1 / 3)[seed % 4]
    # A permutation per plane: no ties, so the argmax is the reference's too
    # in float32.
    x = ref.permutation_map(rng, (n, c, h, w), dtype)
    boxes = ref.random_boxes(rng, n, h, w, scale, int(rng.integers(1, 9)))
    ref.spoil_boxes(rng, boxes, n)
    return rng, x, _rois(boxes, dtype).astype(np.float64), scale


@pytest.fixture
def restore_threads():
    before = curoi.get_num_threads()
    yield
    curoi.set_num_threads(before)


# ------------------------------------------------------- hand computations
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_by_hand(dtype, channels_last):
    # Pixel (h, w) of channel c holds 100*c + 10*h + w. The box covers
    # columns and rows 0-3 (torchvision: corners rounded, inclusive ends,
    # size 4): level 1 is the whole 4 x 4, level 2 four 2 x 2 blocks.
    c_, h_, w_ = np.meshgrid(np.arange(2), np.arange(5), np.arange(6), indexing="ij")
    x = (100.0 * c_ + 10.0 * h_ + w_)[None].astype(dtype)
    boxes = [[0, 0.2, 0.4, 2.6, 3.3]]  # rounds to 0, 0, 3, 3
    y, arg = spp(x, boxes, (1, 2), mode="max", channels_last=channels_last)
    # Row: level 1 [C=2, 1, 1], then level 2 [C=2, 2, 2].
    want_max = [33, 133, 11, 13, 31, 33, 111, 113, 131, 133]
    want_arg = [3 * 6 + 3] * 2 + [1 * 6 + 1, 1 * 6 + 3, 3 * 6 + 1, 3 * 6 + 3] * 2
    np.testing.assert_array_equal(y[0], want_max)
    np.testing.assert_array_equal(arg[0], want_arg)
    y, arg = spp(x, boxes, (1, 2), mode="avg", channels_last=channels_last)
    # Means: 10 * mean(h) + mean(w) + 100 c.
    want_avg = [16.5, 116.5, 5.5, 7.5, 25.5, 27.5, 105.5, 107.5, 125.5, 127.5]
    np.testing.assert_array_equal(y[0], want_avg)
    assert (arg == -7).all()  # avg leaves argmax alone
    # The average's gradient spreads 1/4 of each level-2 entry, 1/16 of the
    # level-1 entry, over its pixels.
    g = np.zeros((1, 10), dtype)
    g[0, 0] = 16.0   # level 1, channel 0
    g[0, 5] = 4.0    # level 2, channel 0, bin (1, 1)
    gx = spp_backward(g, None, boxes, x.shape, (1, 2), mode="avg",
                      channels_last=channels_last)
    want = np.zeros(x.shape)
    want[0, 0, :4, :4] = 1.0
    want[0, 0, 2:4, 2:4] += 1.0
    np.testing.assert_array_equal(gx, want)


@pytest.mark.parametrize("mode", MODES)
def test_the_row_is_the_levels_blocks_in_turn(mode):
    # Against the reference's roi_pool (max) level by level, reshaped and
    # concatenated, here spelled out with the kernel's own roi_pool.
    rng, x, boxes, scale = _random_case(3, np.float64)
    y, _ = spp(x, boxes, LEVELS, scale, "mmcv", mode)
    first = 0
    for l in LEVELS:
        block = y[:, first:first + x.shape[1] * l * l].reshape(len(boxes), -1, l, l)
        if mode == "max":
            out = np.empty((len(boxes), x.shape[1], l, l))
            _ops.roi_pool_forward(x, _rois(boxes, x.dtype), out, None, scale, "mmcv")
            np.testing.assert_array_equal(block, out)
        first += x.shape[1] * l * l
    assert first == y.shape[1]


# ---------------------------------------------------------- the reference
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(5))
def test_matches_the_reference(seed, dtype, convention, mode, channels_last):
    rng, x, boxes, scale = _random_case(seed, dtype)
    levels = ((1, 2, 4), (3,), (1, 3, 2), (2, 5))[seed % 4]
    y, arg = spp(x, boxes, levels, scale, convention, mode, channels_last)
    want, want_arg = ref.roi_spp(x, boxes, levels, scale, convention, mode)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-6,
                                                                        atol=1e-5)
    np.testing.assert_allclose(y, want, **tol)
    if mode == "max":
        np.testing.assert_array_equal(arg, want_arg)
    g = rng.standard_normal(y.shape).astype(dtype)
    gx = spp_backward(g, arg, boxes, x.shape, levels, scale, convention, mode,
                      channels_last=channels_last)
    np.testing.assert_allclose(
        gx, ref.roi_spp_backward(g, want_arg, boxes, levels, x.shape, scale,
                                 convention, mode),
        **(tol if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(4))
def test_backward_is_the_adjoint_of_the_forward(seed, mode):
    # avg is linear; max, its argmax held, gathers x[argmax]: either way
    # <backward(g), x> == <g, forward(x)>.
    rng, x, boxes, scale = _random_case(40 + seed, np.float64)
    # And a box over the whole map, so that something is read.
    boxes = np.vstack([boxes, [0, 0, 0, x.shape[3] / scale, x.shape[2] / scale]])
    y, arg = spp(x, boxes, LEVELS, scale, "torchvision", mode)
    g = rng.standard_normal(y.shape)
    gx = spp_backward(g, arg, boxes, x.shape, LEVELS, scale, "torchvision", mode)
    assert float(np.sum(gx * x)) == pytest.approx(float(np.sum(g * y)), rel=1e-12,
                                                  abs=1e-12)
    assert np.abs(gx).max() > 0


# --------------------------------------- layouts, sums and thread counts
def _many_boxes(dtype, seed=5, k=70):
    rng = np.random.default_rng(seed)
    n, c, h, w = 2, 24, 9, 11
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    boxes = ref.random_boxes(rng, n, h, w, 1.0, k)
    bins = sum(l * l for l in LEVELS)
    g = rng.standard_normal((k, c * bins)).astype(dtype)
    return x, boxes, g


def _all(x, boxes, g, deterministic=False, channels_last=False):
    results = {}
    for mode in MODES:
        for convention in CONVENTIONS:
            y, arg = spp(x, boxes, LEVELS, 1.0, convention, mode, channels_last)
            results[f"{mode}-{convention}"] = y
            results[f"{mode}-{convention}-argmax"] = arg
            results[f"{mode}-{convention}-grad"] = spp_backward(
                g, arg, boxes, x.shape, LEVELS, 1.0, convention, mode,
                deterministic=deterministic, channels_last=channels_last)
    return results


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nhwc_is_nchw_bit_for_bit(dtype, deterministic, monkeypatch):
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", deterministic)
    x, boxes, g = _many_boxes(dtype)
    nchw = _all(x, boxes, g, deterministic)
    nhwc = _all(x, boxes, g, deterministic, channels_last=True)
    for name in nchw:
        assert np.array_equal(_bits(nchw[name]), _bits(nhwc[name])), name
        if not name.endswith("argmax"):
            assert not np.isnan(nchw[name]).any(), name  # every element written


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("sum_method", ["cpu-sum", "fixed-point"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_on_any_number_of_threads(dtype, sum_method, channels_last,
                                            monkeypatch, restore_threads):
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", sum_method == "fixed-point")
    x, boxes, g = _many_boxes(dtype)
    runs = []
    for threads in (1, 3, 2):
        curoi.set_num_threads(threads)
        runs.append(_all(x, boxes, g, True, channels_last))
    for other in runs[1:]:
        for name in runs[0]:
            assert np.array_equal(_bits(runs[0][name]), _bits(other[name])), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_fixed_point_backward_matches_the_plain_one(dtype, monkeypatch):
    x, boxes, g = _many_boxes(dtype)
    plain = _all(x, boxes, g)
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", True)
    fixed = _all(x, boxes, g, deterministic=True)
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == np.float64 else dict(rtol=1e-5,
                                                                        atol=1e-6)
    for mode in MODES:
        for convention in CONVENTIONS:
            name = f"{mode}-{convention}"
            np.testing.assert_allclose(fixed[name + "-grad"], plain[name + "-grad"], **tol)
            np.testing.assert_allclose(
                fixed[name + "-grad"],
                ref.roi_spp_backward(g, plain[name + "-argmax"], boxes, LEVELS, x.shape,
                                     1.0, convention, mode), **tol)


# ---------------------------------------------------------------- adversarial
N, H, W = 2, 5, 7
NAMES = list(ZOO)


def _zoo(names=NAMES):
    return np.array([ZOO[n] for n in names], np.float64)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_box_zoo(dtype, convention, mode, channels_last):
    rng = np.random.default_rng(2)
    x = ref.permutation_map(rng, (N, 2, H, W), dtype)
    y, arg = spp(x, _zoo(), LEVELS, 1.0, convention, mode, channels_last)
    assert np.isfinite(y).all()
    exact = [k for k, n in enumerate(NAMES) if not (n in EXTREME and dtype == np.float32)]
    want, want_arg = ref.roi_spp(x, _zoo()[exact], LEVELS, 1.0, convention, mode)
    np.testing.assert_allclose(y[exact], want, rtol=1e-6, atol=1e-6)
    if mode == "max":
        np.testing.assert_array_equal(arg[exact], want_arg)
        assert ((arg >= -1) & (arg < H * W)).all()
    for k, name in enumerate(NAMES):
        if name in UNUSABLE:
            assert not y[k].any(), name
            if mode == "max":
                assert (arg[k] == -1).all(), name
    assert np.abs(y[NAMES.index("inside")]).max() > 0  # not vacuous
    g = rng.standard_normal(y.shape).astype(dtype)
    g[[k for k in range(len(NAMES)) if k not in exact]] = 0
    gx = spp_backward(g, arg, _zoo(), x.shape, LEVELS, 1.0, convention, mode,
                      channels_last=channels_last)
    np.testing.assert_allclose(
        gx, ref.roi_spp_backward(g[exact], want_arg, _zoo()[exact], LEVELS, x.shape,
                                 1.0, convention, mode), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_unusable_boxes_send_no_gradient(mode):
    bad = sorted(UNUSABLE)
    bins = sum(l * l for l in LEVELS)
    g = np.ones((len(bad), 2 * bins))
    arg = np.zeros(g.shape, np.int32)  # names a pixel: must still be ignored
    assert not spp_backward(g, arg, _zoo(bad), (N, 2, H, W), mode=mode).any()


def test_argmax_outside_the_plane_passes_nothing():
    g = np.ones((1, 2 * 5))
    boxes = _zoo(["inside"])
    for bad in (-1, -5, H * W, 2**31 - 1, -(2**31)):
        arg = np.full(g.shape, bad, np.int32)
        assert not spp_backward(g, arg, boxes, (N, 2, H, W), (1, 2)).any()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_odd_levels_and_rows(mode, channels_last):
    # Levels of 0 or less have no bins; a row longer than the levels' bins
    # ends in 0 (argmax -1); a row shorter cuts the levels; a level too large
    # to exist is cut too, without overflow.
    rng = np.random.default_rng(7)
    x = ref.permutation_map(rng, (N, 3, H, W), np.float64)
    boxes = _zoo(["inside", "whole-map", "batch-nan", "partly-out"])
    full, full_arg = ref.roi_spp(x, boxes, (2, 3), 1.0, "torchvision", mode)
    y, arg = spp(x, boxes, (0, 2, -4, 3), mode=mode, channels_last=channels_last)
    np.testing.assert_array_equal(y, full)
    longer, longer_arg = spp(x, boxes, (2, 3), mode=mode, bins=20,
                             channels_last=channels_last)
    np.testing.assert_array_equal(longer[:, :full.shape[1]], full)
    assert not longer[:, full.shape[1]:].any()
    for cut in (5, 13, 1):
        shorter, shorter_arg = spp(x, boxes, (2, 3), mode=mode, bins=cut,
                                   channels_last=channels_last)
        np.testing.assert_array_equal(shorter, full[:, :3 * cut])
        if mode == "max":
            np.testing.assert_array_equal(shorter_arg, full_arg[:, :3 * cut])
    if mode == "max":
        np.testing.assert_array_equal(arg, full_arg)
        assert (longer_arg[:, full.shape[1]:] == -1).all()
    huge, _ = spp(x, boxes, (2**40, 2**62), mode=mode, bins=6,
                  channels_last=channels_last)
    assert np.isfinite(huge).all()
    g = rng.standard_normal(longer.shape)
    gx = spp_backward(g, longer_arg, boxes, x.shape, (2, 3), mode=mode,
                      channels_last=channels_last)
    np.testing.assert_allclose(gx, ref.roi_spp_backward(g[:, :full.shape[1]], full_arg,
                                                        boxes, (2, 3), x.shape, 1.0,
                                                        "torchvision", mode),
                               rtol=1e-12, atol=1e-12)
    gx = spp_backward(g[:, :18], longer_arg[:, :18], boxes, x.shape, (2**40, 2**62),
                      mode=mode, channels_last=channels_last)
    assert np.isfinite(gx).all()


def test_no_boxes_channels_or_pixels():
    levels = np.array(LEVELS, np.int64)
    for k, c, h, w in ((0, 2, H, W), (3, 0, H, W), (3, 2, 0, W), (3, 2, H, 0)):
        x = np.ones((N, c, h, w))
        boxes = _zoo(["inside", "whole-map", "partly-out"])[:k]
        for mode in MODES:
            y, arg = spp(x, boxes, levels, mode=mode)
            assert y.shape == (k, c * 21) and not y.any()
            if mode == "max":
                assert (arg == -1).all()
            gx = spp_backward(np.ones(y.shape), arg, boxes, x.shape, mode=mode)
            assert not gx.any()


def test_kernels_called_with_nothing_to_do_return_cleanly():
    # Direct ctypes calls: no levels, no bins, no boxes.
    x = np.zeros((1, 2, 6, 6), np.float32)
    boxes = np.array([[0, 1, 1, 4, 4]], np.float32)
    out = np.zeros((1, 2 * 5), np.float32)
    arg = np.zeros(out.shape, np.int32)
    grad = np.zeros(x.shape, np.float32)
    for levels, bins in (((), 5), ((1, 2), 0)):
        table = _ops.spp_levels(levels)
        for cl in (0, 1):
            _cpu.launch("roi_spp", "forward", "float32",
                        (x, boxes, table, 1, 1, 2, 6, 6, bins, 1.0, 0, 0, cl, out, arg))
            _cpu.launch("roi_spp", "backward", "float32",
                        (out, arg, boxes, table, 1, 1, 2, 6, 6, bins, 1.0, 0, 0, cl, grad))
    assert not grad.any() and not out.any()


def test_a_level_count_beyond_the_table_reads_only_the_table():
    # The kernels clamp the table's count to the levels it holds: a count of
    # 1000 (or below 0) reads the 16 entries (or none), never past them.
    x = np.ones((1, 2, 6, 6), np.float32)
    boxes = np.array([[0, 0, 0, 5, 5]], np.float32)
    for count, expected in ((1000, 16), (-3, 0)):
        table = _ops.spp_levels([1] * 16)
        table["count"] = count
        out = np.full((1, 2 * 17), -7.0, np.float32)
        arg = np.zeros(out.shape, np.int32)
        _cpu.launch("roi_spp", "forward", "float32",
                    (x, boxes, table, 1, 1, 2, 6, 6, 17, 1.0, 0, 0, 0, out, arg))
        # Each 1x1 level pools the whole map (1.0); entries past the levels
        # are 0 with argmax -1.
        np.testing.assert_array_equal(out[0, :2 * expected], 1.0)
        np.testing.assert_array_equal(out[0, 2 * expected:], 0.0)
        np.testing.assert_array_equal(arg[0, 2 * expected:], -1)

"""RoI Align's max modes at the kernel level (roi_align_max.cu, driven
through curoi._ops ahead of their public API), on the CPU loops (and the GPU
loops in tests/test_gpu_loops.py, which runs this file).

"interpolated" is mmcv's RoIAlign with pool_mode "max": each bin's largest
bilinear sample, argmax the winner's index iy * grid_w + ix in the bin's
sampling grid (-1: none, or off the map), and a backward that sends each
output's gradient to the four pixels of its winning sample. "onnx" is ONNX
RoiAlign's mode "max" (tested against ONNX itself in
test_onnx_roi_align.py); here its channels-last kernels.

Expected values come from the NumPy reference in tests/reference.py (written
from the formulas, not from the kernels), from hand computation and from
finite differences; never from the code under test, except where a test
checks a stated property relating two curoi results (channels-last equals
NCHW transposed, one thread equals three, the fixed-point sum equals the
plain one up to its rounding).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import curoi
import reference as ref
from curoi import _ops

REPO = Path(__file__).resolve().parents[1]
DTYPES = [np.float32, np.float64]
TOL = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=1e-5, atol=1e-5)}


def _acc(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def nhwc(a):
    return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))


def nchw(a):
    return np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2))


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view({4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def forward(x, boxes, output_size, scale=1.0, ratio=2, aligned=True,
            mode="interpolated", channels_last=False, with_argmax=True):
    """The max-mode forward on x (NCHW, or NHWC with channels_last):
    (output, argmax or None) in x's layout."""
    x = np.ascontiguousarray(x)
    boxes = np.ascontiguousarray(boxes, dtype=_acc(x.dtype))
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    c = x.shape[3] if channels_last else x.shape[1]
    shape = (len(boxes), ph, pw, c) if channels_last else (len(boxes), c, ph, pw)
    out = np.full(shape, 7, x.dtype)  # not zeros: the kernel must write all
    argmax = np.full(shape, 7, np.int64) if with_argmax else None
    _ops.roi_align_max_forward(x, boxes, out, argmax, scale, ratio, aligned, mode,
                               channels_last=channels_last)
    return out, argmax


def backward(g, argmax, boxes, input_shape, scale=1.0, ratio=2, aligned=True,
             deterministic=False, channels_last=False):
    """The interpolated mode's backward, grad_input in g's dtype."""
    g = np.ascontiguousarray(g)
    grad = np.full(input_shape, np.nan, _acc(g.dtype))  # zeroed by the wrapper
    _ops.roi_align_max_backward(g, np.ascontiguousarray(argmax, np.int64),
                                np.ascontiguousarray(boxes, dtype=_acc(g.dtype)), grad,
                                scale, ratio, aligned, deterministic=deterministic,
                                channels_last=channels_last)
    return grad


def case(dtype, seed=0, n=2, c=3, h=7, w=9, k=25, scale=0.5, spoil=True):
    """Random features and boxes of every kind (inside, across the edges,
    outside, tiny, empty, reversed), some made unusable."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    boxes = ref.random_boxes(rng, n, h, w, scale, k)
    if spoil:
        for _ in range(3):
            ref.spoil_boxes(rng, boxes, n, probability=1.0)
    return x, boxes.astype(_acc(dtype))


@pytest.fixture(params=[1, 3], ids=lambda t: f"threads={t}")
def threads(request):
    before = curoi.get_num_threads()
    curoi.set_num_threads(request.param)
    yield request.param
    curoi.set_num_threads(before)


@pytest.fixture(params=["plain", "fixed-point"])
def summation(request, monkeypatch):
    """The CPU's own sum (deterministic=False), and the GPU's int64
    fixed-point sum run through the CPU backend (deterministic=True)."""
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", request.param == "fixed-point")
    return request.param == "fixed-point"


# --------------------------------------------------------------------------
# forward against the reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("ratio", [0, 2, 80])
def test_forward_matches_the_reference(ratio, aligned):
    # ratio 80 on a small map packs more than 64 samples per side closer than
    # a quarter pixel: the kernel visits two per pixel zone (a bilinear value
    # is linear along an axis between pixel centres), the reference all.
    x, boxes = case(np.float64, seed=21 + ratio + int(aligned))
    y, argmax = forward(x, boxes, (2, 3), 0.5, ratio, aligned)
    y_ref, argmax_ref = ref.roi_align_max_interpolated(x, boxes, (2, 3), 0.5, ratio,
                                                       aligned)
    np.testing.assert_allclose(y, y_ref, **TOL[np.float64])
    np.testing.assert_array_equal(argmax, argmax_ref)
    assert (argmax >= 0).any() and (argmax == -1).any() and (y != 0).any()


@pytest.mark.parametrize("ratio", [0, 2])
def test_float32_forward_is_a_maximum_of_the_reference_samples(ratio):
    # float32 rounds values and positions: near-ties may pick another sample
    # than float64 does, but the value is the maximum and the winner's
    # float64 value is that maximum too, within float32's rounding.
    x, boxes = case(np.float32, seed=3)
    y, argmax = forward(x, boxes, (2, 3), 0.5, ratio, True)
    y_ref, _ = ref.roi_align_max_interpolated(x, boxes, (2, 3), 0.5, ratio, True)
    np.testing.assert_allclose(y, y_ref, **TOL[np.float32])
    at_winner = ref.roi_align_max_interpolated_gather(x, argmax, boxes, (2, 3), 0.5,
                                                      ratio, True)
    np.testing.assert_allclose(at_winner, y_ref, **TOL[np.float32])
    assert (argmax >= 0).sum() > 10


def test_ties_go_to_the_first_sample_by_hand():
    # A constant map: every sample on it reads 5, so the first one wins
    # (index 0). Box [0, 0, 4, 4] on 4 x 4, not aligned, one bin, ratio 2:
    # samples at 1 and 3 along each axis, all on the map.
    x = np.full((1, 2, 4, 4), 5.0)
    y, argmax = forward(x, [[0, 0, 0, 4, 4]], 1, ratio=2, aligned=False)
    np.testing.assert_array_equal(y, 5.0)
    np.testing.assert_array_equal(argmax, 0)
    # A negative map and a box half off it, [-4, 0, 4, 4]: x samples at
    # -4 + (0.5, 1.5) * 8 / 2 = -2 (off the map: value 0) and 2, so the
    # off-map sample's 0, the first candidate, beats every -1 on the map,
    # and it is reported as -1 (its value depends on no pixel).
    x = np.full((1, 1, 4, 4), -1.0)
    y, argmax = forward(x, [[0, -4, 0, 4, 4]], 1, ratio=2, aligned=False)
    np.testing.assert_array_equal(y, 0.0)
    np.testing.assert_array_equal(argmax, -1)
    # The same box on a map of zeros but two pixels: the on-map samples
    # (y, x) = (1, 2) and (3, 2) read 2 and 7 there (weight 1: whole pixel
    # positions, row 3 the last), and the second wins: iy 1, ix 1.
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 2], x[0, 0, 3, 2] = 2.0, 7.0
    y, argmax = forward(x, [[0, -4, 0, 4, 4]], 1, ratio=2, aligned=False)
    np.testing.assert_array_equal(y.ravel(), [7.0])
    np.testing.assert_array_equal(argmax.ravel(), [1 * 2 + 1])  # iy 1, ix 1


def test_nan_beats_every_number_and_the_first_nan_wins_by_hand():
    # Box [0, 0, 4, 4] on 4 x 4, not aligned, ratio 2: samples (1, 1),
    # (1, 3), (3, 1), (3, 3) with weight 1 on those pixels (3 is the last
    # row/column, read as the edge value), and weight 0 on (2, 2), (2, 3)...
    # which still counts: 0 * NaN is NaN.
    x = np.zeros((1, 3, 4, 4))
    x[:, :, 1, 1] = 100.0
    x[0, 0, 3, 3] = np.nan   # only sample 3 touches it: NaN wins over 100
    x[0, 1, 3, 1] = np.nan   # sample 2 ...
    x[0, 1, 3, 3] = np.nan   # ... and 3: the first NaN wins
    x[0, 2, 2, 2] = np.nan   # sample 0 touches it with weight 0
    y, argmax = forward(x, [[0, 0, 0, 4, 4]], 1, ratio=2, aligned=False)
    assert np.isnan(y).all()
    np.testing.assert_array_equal(argmax.ravel(), [3, 2, 0])
    y_ref, argmax_ref = ref.roi_align_max_interpolated(x, np.array([[0, 0, 0, 4, 4]]), 1,
                                                       1.0, 2, False)
    np.testing.assert_array_equal(argmax, argmax_ref)


def test_bins_without_samples_give_zero_and_pass_nothing():
    # Aligned and reversed (x2 < x1): adaptive sampling gives a negative grid,
    # no samples at all; an argmax forged to 0 must pass nothing either.
    x = np.random.default_rng(4).standard_normal((1, 2, 5, 6)) + 3
    boxes = [[0, 4, 3, 1, 1]]
    y, argmax = forward(x, boxes, (2, 2), ratio=0, aligned=True)
    assert not y.any() and (argmax == -1).all()
    g = backward(np.ones(y.shape), np.zeros(y.shape, np.int64), boxes, x.shape,
                 ratio=0, aligned=True)
    assert not g.any()


# --------------------------------------------------------------------------
# channels-last: NCHW transposed, bit for bit
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["interpolated", "onnx"])
@pytest.mark.parametrize("aligned,ratio", [(True, 2), (False, 0), (True, 80)])
def test_channels_last_forward_is_nchw_transposed_bitwise(dtype, mode, aligned, ratio,
                                                          threads):
    # C = 6: the NCHW CPU loops run a 4-channel pass and single channels.
    x, boxes = case(dtype, seed=5, c=6, k=40)
    expected, expected_argmax = forward(x, boxes, (3, 2), 0.5, ratio, aligned, mode)
    got, got_argmax = forward(nhwc(x), boxes, (3, 2), 0.5, ratio, aligned, mode,
                              channels_last=True)
    assert np.array_equal(bits(got), bits(nhwc(expected)))
    np.testing.assert_array_equal(got_argmax, nhwc(expected_argmax))
    # The argmax is optional in either layout, and does not change the values.
    alone, _ = forward(nhwc(x), boxes, (3, 2), 0.5, ratio, aligned, mode,
                       channels_last=True, with_argmax=False)
    assert np.array_equal(bits(alone), bits(got))


def test_channels_last_forward_matches_the_reference():
    x, boxes = case(np.float64, seed=6)
    y, argmax = forward(nhwc(x), boxes, (2, 3), 0.5, 0, False, channels_last=True)
    y_ref, argmax_ref = ref.roi_align_max_interpolated(x, boxes, (2, 3), 0.5, 0, False)
    np.testing.assert_allclose(nchw(y), y_ref, **TOL[np.float64])
    np.testing.assert_array_equal(nchw(argmax), argmax_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_backward_is_nchw_transposed_bitwise(dtype, summation, threads):
    x, boxes = case(dtype, seed=7, c=6, k=60, spoil=False)
    y, argmax = forward(x, boxes, (3, 2), 0.5, 2, True)
    g = np.random.default_rng(8).standard_normal(y.shape).astype(dtype)
    expected = backward(g, argmax, boxes, x.shape, 0.5, 2, True, summation)
    got = backward(nhwc(g), nhwc(argmax), boxes, nhwc(x).shape, 0.5, 2, True, summation,
                   channels_last=True)
    assert np.array_equal(bits(got), bits(nhwc(expected)))
    assert np.count_nonzero(expected) > 20


# --------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned,ratio", [(True, 2), (False, 0), (True, 0), (False, 80)])
def test_backward_matches_the_reference(dtype, aligned, ratio, summation):
    x, boxes = case(dtype, seed=9)
    y, argmax = forward(x, boxes, (2, 3), 0.5, ratio, aligned)
    g = np.random.default_rng(10).standard_normal(y.shape).astype(dtype)
    got = backward(g, argmax, boxes, x.shape, 0.5, ratio, aligned, summation)
    assert got.dtype == dtype
    expected = ref.roi_align_max_interpolated_backward(g, argmax, boxes, x.shape, (2, 3),
                                                       0.5, ratio, aligned)
    np.testing.assert_allclose(got, expected, **TOL[dtype])
    assert np.count_nonzero(expected) > 10


def test_backward_is_the_adjoint_of_the_forward():
    # With the winners fixed the forward is linear in x: y = M x, and the
    # backward is M^T, so <backward(g), x> = <g, y>.
    for seed, (aligned, ratio) in enumerate([(True, 2), (False, 0), (True, 80)]):
        x, boxes = case(np.float64, seed=30 + seed, spoil=False)
        y, argmax = forward(x, boxes, (2, 3), 0.5, ratio, aligned)
        g = np.random.default_rng(seed).standard_normal(y.shape)
        grad = backward(g, argmax, boxes, x.shape, 0.5, ratio, aligned)
        lhs, rhs = float(np.vdot(grad, x)), float(np.vdot(g, y))
        assert abs(lhs - rhs) <= 1e-12 * np.abs(g).sum() * np.abs(x).max(), (lhs, rhs)
        assert abs(rhs) > 1


@pytest.mark.parametrize("aligned,ratio", [(True, 2), (False, 0), (True, 3)])
def test_backward_agrees_with_finite_differences(aligned, ratio):
    # A random map has no ties; a step small enough keeps every winner (checked),
    # so the forward is linear along the step and the central difference is
    # the directional derivative up to rounding.
    x, boxes = case(np.float64, seed=40, spoil=False)
    rng = np.random.default_rng(41)
    d = rng.standard_normal(x.shape)
    y, argmax = forward(x, boxes, (2, 3), 0.5, ratio, aligned)
    g = rng.standard_normal(y.shape)
    eps = 1e-6
    y_plus, argmax_plus = forward(x + eps * d, boxes, (2, 3), 0.5, ratio, aligned)
    y_minus, argmax_minus = forward(x - eps * d, boxes, (2, 3), 0.5, ratio, aligned)
    np.testing.assert_array_equal(argmax_plus, argmax)
    np.testing.assert_array_equal(argmax_minus, argmax)
    numeric = (np.vdot(g, y_plus) - np.vdot(g, y_minus)) / (2 * eps)
    analytic = np.vdot(backward(g, argmax, boxes, x.shape, 0.5, ratio, aligned), d)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-7)
    assert abs(analytic) > 1


def test_backward_by_hand():
    # 3 x 3 map, box [0.5, -0.25, 2.5, 0.75] not aligned, one bin, ratio 1:
    # one sample, at the box centre (y, x) = (0.25, 1.5), with weights
    # (1 - 0.25)(1 - 0.5) = 0.375 on (0, 1) and on (0, 2), 0.25 * 0.5 =
    # 0.125 on (1, 1) and on (1, 2).
    x = np.arange(9.0).reshape(1, 1, 3, 3)
    boxes = [[0, 0.5, -0.25, 2.5, 0.75]]
    y, argmax = forward(x, boxes, 1, ratio=1, aligned=False)
    np.testing.assert_allclose(y.ravel(), [0.375 * 1 + 0.375 * 2 + 0.125 * 4 + 0.125 * 5])
    assert argmax.ravel().tolist() == [0]
    grad = backward(np.full(y.shape, 2.0), argmax, boxes, x.shape, ratio=1, aligned=False)
    expected = np.zeros((3, 3))
    expected[0, 1] = expected[0, 2] = 0.75
    expected[1, 1] = expected[1, 2] = 0.25
    np.testing.assert_allclose(grad[0, 0], expected, rtol=1e-15)


def test_backward_ignores_argmax_it_cannot_trust():
    # Grid 2 x 2 per bin (ratio 2): valid indices are 0 .. 3. Everything else
    # passes nothing, and so does an in-range index of a sample off the map
    # (the box reaches past the left edge: ix 0 lies at x = -3).
    x = np.zeros((2, 2, 5, 7))
    boxes = np.array([[0, 1.2, 0.7, 5.3, 3.9], [1, -5, 0, 3, 4], [2, 1, 1, 4, 4],
                      [np.nan, 1, 1, 4, 4]])
    shape = (len(boxes), 2, 2, 3)
    garbage = [-1, -5, 4, 5, 2**31, 2**40, 2**63 - 1, -(2**63), 0, 1, 2, 3]
    argmax = np.resize(np.array(garbage, np.int64), shape)
    g = np.random.default_rng(12).standard_normal(shape)
    got = backward(g, argmax, boxes, x.shape, 1.0, 2, False)
    expected = ref.roi_align_max_interpolated_backward(g, argmax, boxes, x.shape, (2, 3),
                                                       1.0, 2, False)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    assert np.count_nonzero(expected) > 0
    # Only the valid indices of the usable boxes send anything.
    cleaned = np.where((argmax >= 0) & (argmax < 4), argmax, -1)
    cleaned[2:] = -1
    np.testing.assert_allclose(
        got, ref.roi_align_max_interpolated_backward(g, cleaned, boxes[:2], x.shape, (2, 3),
                                                     1.0, 2, False), rtol=1e-12, atol=1e-15)
    # Box 1's first column of bins samples x = -5 + (0.5, 1.5) * (8 / 3) / 2,
    # both below -1: indices 0 and 2 (ix 0) name samples off the map.
    off = np.full(shape, -1, np.int64)
    off[1, :, :, 0] = [0, 2]
    assert not backward(g, off, boxes, x.shape, 1.0, 2, False).any()


# --------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_one_thread_and_three_give_the_same_bits(dtype, channels_last, summation):
    # Enough boxes and channels that the CPU loops hand work to the pool.
    x, boxes = case(dtype, seed=13, n=2, c=16, h=12, w=14, k=120, spoil=False)
    if channels_last:
        x = nhwc(x)
    results = []
    before = curoi.get_num_threads()
    try:
        for count in (1, 3):
            curoi.set_num_threads(count)
            y, argmax = forward(x, boxes, (3, 3), 0.5, 2, True, channels_last=channels_last)
            g = np.random.default_rng(14).standard_normal(y.shape).astype(dtype)
            grad = backward(g, argmax, boxes, x.shape, 0.5, 2, True, summation,
                            channels_last=channels_last)
            results.append((y, argmax, grad))
    finally:
        curoi.set_num_threads(before)
    (y1, a1, g1), (y3, a3, g3) = results
    assert np.array_equal(bits(y1), bits(y3))
    np.testing.assert_array_equal(a1, a3)
    assert np.array_equal(bits(g1), bits(g3))
    assert np.count_nonzero(g1) > 100


@pytest.mark.parametrize("dtype", DTYPES)
def test_fixed_point_sum_equals_the_plain_sum_rounded(dtype, monkeypatch):
    x, boxes = case(dtype, seed=15, k=80, spoil=False)
    y, argmax = forward(x, boxes, (2, 3), 0.5, 0, True)
    g = np.random.default_rng(16).standard_normal(y.shape).astype(dtype)
    plain = backward(g, argmax, boxes, x.shape, 0.5, 0, True)
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", True)
    fixed = backward(g, argmax, boxes, x.shape, 0.5, 0, True, deterministic=True)
    # Every term is rounded to a multiple of 2^-e, 2^-e <= 4 * max|g| * terms
    # * 2^-61 (terms = K * PH * PW bounds the terms of one sum, 4 per bin):
    # half that per term at most, in float64; float32 also rounds the
    # plain sum's partial sums.
    terms = y.shape[0] * y.shape[2] * y.shape[3]
    bound = 4 * terms * 4 * np.abs(g).max() * terms * 2.0**-62
    if dtype == np.float32:
        np.testing.assert_allclose(fixed, plain, **TOL[np.float32])
    else:
        np.testing.assert_allclose(fixed, plain, rtol=0, atol=bound)
    np.testing.assert_allclose(fixed, ref.roi_align_max_interpolated_backward(
        g, argmax, boxes, x.shape, (2, 3), 0.5, 0, True), **TOL[dtype])
    # Non-finite gradients land where the plain sum puts them.
    g[tuple(np.argwhere(argmax >= 0)[0])] = np.inf
    fixed = backward(g, argmax, boxes, x.shape, 0.5, 0, True, deterministic=True)
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", False)
    plain = backward(g, argmax, boxes, x.shape, 0.5, 0, True)
    np.testing.assert_array_equal(np.isfinite(fixed), np.isfinite(plain))
    assert not np.isfinite(fixed).all()


# --------------------------------------------------------------------------
# work and sizes
# --------------------------------------------------------------------------


def test_no_boxes_channels_or_pixels():
    for n, c, h, w, k in ((2, 3, 5, 6, 0), (2, 0, 5, 6, 3), (2, 3, 0, 6, 3), (0, 3, 5, 6, 3)):
        x = np.ones((n, c, h, w), np.float32)
        boxes = np.tile(np.array([[0, 1, 1, 4, 4]], np.float32), (k, 1))
        for channels_last in (False, True):
            xs = nhwc(x) if channels_last else x
            y, argmax = forward(xs, boxes, (2, 2), channels_last=channels_last)
            assert not y.any() and (argmax == -1).all()
            g = backward(np.ones(y.shape, np.float32), np.zeros(y.shape, np.int64), boxes,
                         xs.shape, channels_last=channels_last)
            assert g.shape == xs.shape and not g.any()


# Bounded work whatever the box and sampling_ratio: a huge sampling_ratio
# (about 4.6e18 samples per bin) and boxes 1e10 and 1e20 pixels wide must come
# back at once. Run in a subprocess with a timeout, so that a hang fails.
HUGE_RATIO = 2**31 - 1
RAMP = (0.37, -1.3, 2.0)  # A, B, K of the map A*y + B*x + K
HUGE_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, %(tests)r)
    from test_roi_align_max_kernels import forward, backward
    A, B, K = %(ramp)r
    R = %(ratio)d
    H, W = 6, 8
    out = {}
    ys, xs = np.mgrid[0:H, 0:W]
    for dt in (np.float32, np.float64):
        name = np.dtype(dt).name
        ramp = (A * ys + B * xs + K).astype(dt)[None, None]
        y, argmax = forward(ramp, [[0, 1, 1, 5.5, 4]], (2, 3), 1.0, R, False)
        g = backward(np.ones(y.shape, dt), argmax, [[0, 1, 1, 5.5, 4]], ramp.shape,
                     1.0, R, False)
        out[name + "-ramp"] = [y.tolist(), argmax.tolist(), g.tolist()]
        positive = (np.arange(H * W).reshape(1, 1, H, W) %% 7 + 1).astype(dt)
        for box in ([0, -1e10, -1e10, 1e10, 1e10], [0, -1e20, -1e20, 1e20, 1e20],
                    [0, 1e20, 1e20, -1e20, -1e20], [0, 0, 0, 1e20, 3]):
            for aligned in (False, True):
                y, argmax = forward(positive, [box], 1, 1.0, 0, aligned)
                g = backward(np.ones(y.shape, dt), argmax, [box], positive.shape, 1.0, 0,
                             aligned)
                out["%%s-%%g-%%g-%%d" %% (name, box[1], box[3], aligned)] = [
                    y.tolist(), argmax.tolist(), g.tolist()]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def huge_results():
    script = HUGE_SCRIPT % {"tests": str(REPO / "tests"), "ramp": RAMP,
                            "ratio": HUGE_RATIO}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True,
                              text=True, timeout=60, env=env, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        pytest.fail("the max modes on huge boxes and sampling ratios did not finish in 60 s")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_huge_sampling_ratio_on_a_ramp_takes_the_bin_corner(huge_results, dt):
    # Box (1, 1)-(5.5, 4), not aligned: bins 1.5 x 1.5 from (y, x) = (1, 1),
    # inside the map, where bilinear interpolation of a linear map is exact.
    # A > 0 and B < 0: the largest sample is the last row's first column,
    # half a sample step (0.75 / R) inside the bin's corner (y high, x low).
    y, argmax, g = huge_results[dt + "-ramp"]
    a, b, k = RAMP
    ph, pw = np.meshgrid(np.arange(2), np.arange(3), indexing="ij")
    step = 0.75 / HUGE_RATIO
    corner = a * (1 + (ph + 1) * 1.5 - step) + b * (1 + pw * 1.5 + step) + k
    np.testing.assert_allclose(np.array(y)[0, 0], corner,
                               atol=1e-5 if dt == "float32" else 1e-9)
    g = np.array(g)[0, 0]
    assert (g >= 0).all()
    np.testing.assert_allclose(g.sum(), 6.0, rtol=1e-6)  # weights sum to 1 per bin
    if dt == "float64":
        # The winner is sample (R - 1, 0) of every bin; its gradient goes to
        # the pixels around the bin's corner (y just below 1 + 1.5 (ph + 1),
        # x just above 1 + 1.5 pw).
        np.testing.assert_array_equal(argmax, np.full((1, 1, 2, 3), (HUGE_RATIO - 1)
                                                      * HUGE_RATIO))
        # Rows: y = 2.5 (rows 2 and 3, 0.5 each) and 4 (row 4); columns:
        # x = 1 (column 1), 2.5 (2 and 3, 0.5 each) and 4 (column 4).
        expected = np.zeros((6, 8))
        expected[2:4, 1] = expected[2:4, 4] = 0.5
        expected[2:4, 2:4] = 0.25
        expected[4, 1] = expected[4, 4] = 1.0
        expected[4, 2:4] = 0.5
        np.testing.assert_allclose(g, expected, atol=1e-8)
    else:
        assert (np.array(argmax) >= 0).all()


def _sample_values_on_half_pixels(plane, positions_y, positions_x):
    h, w = plane.shape
    return [sum(wt * plane[r, c] for r, c, wt in ref._bilinear_taps(py, px, h, w))
            for py in positions_y for px in positions_x]


@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_huge_boxes_are_bounded(huge_results, dt):
    h, w = 6, 8
    plane = (np.arange(h * w).reshape(h, w) % 7 + 1).astype(np.float64)
    for key, (y, argmax, g) in huge_results.items():
        if not key.startswith(dt + "-") or key.endswith("ramp"):
            continue
        y, argmax, g = np.array(y), np.array(argmax), np.array(g)
        # A maximum of samples of a map in [1, 7], or 0 off the map.
        assert ((y == 0) | ((y >= 1) & (y <= 7))).all(), key
        assert (argmax >= -1).all(), key
        assert np.isfinite(g).all() and (g >= 0).all() and g.sum() <= 1 + 1e-6, key
    if dt == "float64":
        # 2e10 pixels per side, adaptive: 2e10 samples per axis, a grid of
        # 4e20, more than an int64 indexes. The samples on the map lie on
        # half pixels (-0.5 reads row 0, 7.5 the last column); the value is
        # their maximum, and the winner is reported as -1: no gradient.
        y, argmax, g = huge_results["float64--1e+10-1e+10-0"]
        half = np.arange(-1, 9) + 0.5
        assert y[0][0][0][0] == pytest.approx(
            max(_sample_values_on_half_pixels(plane, half[:7], half)), rel=1e-5)
        assert argmax[0][0][0][0] == -1 and not np.any(g)

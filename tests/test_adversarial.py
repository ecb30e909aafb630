"""Adversarial inputs: curoi must neither crash, hang, read or write out of
bounds, nor return a wrong number, whatever the boxes, sizes and argmax say.

Runs on its own with the ordinary CPU build and, from test_sanitizers.py,
under AddressSanitizer and UndefinedBehaviorSanitizer, where any stray access
or undefined conversion ends the process. So it imports only NumPy and curoi
(no torch or JAX under an ASan runtime) and keeps its cases small.

Expected values come from tests/reference.py (float64, written from the
formulas) wherever it can compute the case, and otherwise from properties
that any correct result has: RoI Align is a weighted average whose weights are
non-negative and sum to at most 1 per bin, so each output lies between
min(0, min x) and max(0, max x), and the gradient of a non-negative
grad_output is non-negative and sums to at most sum(grad_output).
"""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import curoi
import reference
from curoi import _cpu, _ops

N, C, H, W = 2, 2, 5, 7
OUT = (2, 3)
ALIGN_CONFIGS = [pytest.param(aligned, ratio, id=f"aligned={aligned}-ratio={ratio}")
                 for aligned in (True, False) for ratio in (0, 2)]
CONVENTIONS = ("torchvision", "mmcv")
DTYPES = (np.float32, np.float64)
# (rtol, atol): float64 differs from the float64 reference only by summation
# order; float32 also by rounding the box and sample coordinates.
TOL = {np.float32: (1e-4, 2e-5), np.float64: (1e-10, 1e-12)}
REPO = Path(__file__).resolve().parents[1]

# Every kind of box that a caller can send: name -> (batch index, x1, y1, x2, y2).
ZOO = {
    "inside": [0, 1.2, 0.7, 5.3, 3.9],
    "other-image": [1, 0.5, 0.5, 6.5, 4.5],
    "whole-map": [1, 0, 0, W, H],
    "partly-out": [0, -3, -2, 4, 9],
    "edge-band": [1, -1.4, -1.3, 0.55, 0.6],  # samples between -1 and 0
    "batch-negative": [-1, 1, 1, 4, 4],
    "batch-minus-half": [-0.5, 1, 1, 4, 4],
    "batch-N": [N, 1, 1, 4, 4],
    "batch-100": [100, 1, 1, 4, 4],
    "batch-1e30": [1e30, 1, 1, 4, 4],
    "batch-2**63": [2.0**63, 1, 1, 4, 4],
    "batch-nan": [np.nan, 1, 1, 4, 4],
    "batch-inf": [np.inf, 1, 1, 4, 4],
    "batch--inf": [-np.inf, 1, 1, 4, 4],
    "x1-nan": [0, np.nan, 1, 4, 4],
    "y1-inf": [0, 1, np.inf, 4, 4],
    "x2--inf": [0, 1, 1, -np.inf, 4],
    "y2-nan": [1, 1, 1, 4, np.nan],
    "far-right-1e9": [0, 1e9, 1, 1e9 + 5, 3],
    "far-1e20": [1, 1e20, 1e20, 1e20, 1e20],
    "far-left-1e20": [0, -1e20, -1e20, -1e20, -1e20],
    "around-map-1e9": [0, -1e9, -1e9, 1e9, 1e9],
    "around-map-1e20": [1, -1e20, -1e20, 1e20, 1e20],
    "to-1e20": [0, 0, 0, 1e20, 3],
    "reversed": [0, 5, 4, 1, 1],
    "reversed-huge": [1, 1e20, 1e20, -1e20, -1e20],
    "zero-width": [0, 2, 1, 2, 4],
    "point": [1, 3, 3, 3, 3],
    "point-at-far-corner": [0, W, H, W, H],
}
UNUSABLE = {name for name, box in ZOO.items()
            if not all(map(math.isfinite, box)) or not 0 <= box[0] < N}
# Boxes so large that adaptive sampling means ~1e9 samples per bin side: the
# reference (a Python loop over every sample) cannot compute those.
HUGE = {name for name, box in ZOO.items() if name not in UNUSABLE
        and max(abs(box[3] - box[1]), abs(box[4] - box[2])) > 1e4}
# Boxes with a corner beyond 1e6: float32 spaces its values more than 1/16
# pixel apart there, so the box that float32 features see (their boxes are
# float32) is not the one the float64 reference sees, and a bin edge can move
# by a pixel. Those are compared with the reference in float64 only.
EXTREME = {name for name, box in ZOO.items() if name not in UNUSABLE
           and max(abs(v) for v in box[1:]) > 1e6}
NAMES = list(ZOO)


def rand(shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def rois(names, dtype):
    return np.array([ZOO[n] for n in names], dtype=dtype)


def assert_close(got, expected, dtype, what=""):
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=rtol, atol=atol,
                               err_msg=what)


def assert_average_bounds(y, x, what=""):
    """Each output is a sub-convex combination of map values (see the
    module docstring)."""
    y = np.asarray(y, np.float64)
    assert np.isfinite(y).all(), what
    tol = 1e-5 * max(1.0, float(np.abs(x).max()))
    assert (y >= min(0.0, float(x.min())) - tol).all(), what
    assert (y <= max(0.0, float(x.max())) + tol).all(), what


# ------------------------------------------------------------ roi_align
@pytest.mark.parametrize("aligned,ratio", ALIGN_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_roi_align_forward_box_zoo(dtype, aligned, ratio):
    x = rand((N, C, H, W), dtype)
    y = curoi.roi_align(x, rois(NAMES, dtype), OUT, 1.0, ratio, aligned)
    assert y.shape == (len(NAMES), C) + OUT and y.dtype == dtype
    for k, name in enumerate(NAMES):
        if name in UNUSABLE:
            assert not y[k].any(), name  # reads nothing: zeros, no NaN
        elif (name in HUGE and ratio <= 0) or (name in EXTREME and dtype == np.float32):
            assert_average_bounds(y[k], x, name)
        else:
            expected = reference.roi_align(x, rois([name], np.float64), OUT, 1.0, ratio,
                                           aligned)
            assert_close(y[k:k + 1], expected, dtype, name)
    # Not vacuous: the boxes on the map read something.
    assert np.abs(y[NAMES.index("inside")]).min() > 0


@pytest.mark.parametrize("aligned,ratio", ALIGN_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_roi_align_backward_box_zoo(dtype, aligned, ratio):
    boxes = rois(NAMES, dtype)
    gy = rand((len(NAMES), C) + OUT, dtype, seed=1)
    # Boxes whose gradient the reference cannot compute get zero gradient
    # here (they still run every access) and are checked on their own below.
    skip = [k for k, n in enumerate(NAMES) if n in HUGE and ratio <= 0]
    gy[skip] = 0
    gx = curoi.roi_align_backward(gy, boxes, (N, C, H, W), OUT, 1.0, ratio, aligned)
    assert gx.shape == (N, C, H, W) and gx.dtype == dtype
    usable = [n for n in NAMES if n not in UNUSABLE and NAMES.index(n) not in skip]
    keep = [NAMES.index(n) for n in usable]
    expected = reference.roi_align_backward(gy[keep], rois(usable, np.float64),
                                            (N, C, H, W), OUT, 1.0, ratio, aligned)
    assert_close(gx, expected, dtype)
    assert np.count_nonzero(expected) > 0
    # Unusable boxes alone send nothing, whatever their gradient.
    bad = sorted(UNUSABLE)
    gx = curoi.roi_align_backward(np.ones((len(bad), C) + OUT, dtype), rois(bad, dtype),
                                  (N, C, H, W), OUT, 1.0, ratio, aligned)
    assert not gx.any()
    if skip:
        huge = [NAMES[k] for k in skip]
        g = np.ones((len(huge), C) + OUT, dtype)
        gx = curoi.roi_align_backward(g, rois(huge, dtype), (N, C, H, W), OUT, 1.0, ratio,
                                      aligned).astype(np.float64)
        assert np.isfinite(gx).all() and (gx >= 0).all()
        assert gx.sum() <= g.size * (1 + 1e-5)


# ------------------------------------------------------------- roi_pool
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_roi_pool_forward_and_backward_box_zoo(dtype, convention):
    x = rand((N, C, H, W), dtype, seed=2)
    boxes = rois(NAMES, dtype)
    y, argmax = curoi.roi_pool(x, boxes, OUT, 1.0, convention=convention,
                               return_argmax=True)
    want_y, want_argmax = reference.roi_pool(x, rois(NAMES, np.float64), OUT, 1.0,
                                             convention)
    # A maximum is one of the inputs: exact, and so is where it is.
    exact = [k for k, n in enumerate(NAMES) if not (n in EXTREME and dtype == np.float32)]
    np.testing.assert_array_equal(y[exact], want_y[exact].astype(dtype))
    np.testing.assert_array_equal(argmax[exact], want_argmax[exact])
    # Elsewhere: each output is the map value at its argmax, or 0 with -1.
    assert ((argmax >= -1) & (argmax < H * W)).all()
    batch = rois(NAMES, np.float64)[:, 0]
    for k in sorted(set(range(len(NAMES))) - set(exact)):
        plane = x[int(batch[k])].reshape(C, H * W)
        at = argmax[k].reshape(C, -1)
        picked = np.take_along_axis(plane, np.maximum(at, 0), axis=1)
        np.testing.assert_array_equal(y[k].reshape(C, -1), np.where(at >= 0, picked, 0),
                                      err_msg=NAMES[k])
    for name in UNUSABLE:
        assert (argmax[NAMES.index(name)] == -1).all(), name
    assert (argmax >= 0).sum() > 10  # not vacuous
    gy = rand(y.shape, dtype, seed=3)
    gx = curoi.roi_pool_backward(gy, argmax, boxes, (N, C, H, W))
    assert_close(gx, reference.roi_pool_backward(gy, argmax, rois(NAMES, np.float64),
                                                 (N, C, H, W)), dtype)


def test_forged_argmax_on_unusable_boxes_sends_nothing():
    # argmax points into the plane, but the boxes' batch indices are
    # unusable: the box alone must stop the gradient.
    bad = sorted(UNUSABLE)
    g = np.ones((len(bad), C) + OUT, np.float32)
    gx = curoi.roi_pool_backward(g, np.zeros(g.shape, np.int64), rois(bad, np.float32),
                                 (N, C, H, W))
    assert not gx.any()


GARBAGE_ARGMAX = [-5, -1, H * W, H * W + 1, 2**31, 2**40, 2**63 - 1, -(2**63)]


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint64, np.int16])
def test_roi_pool_backward_ignores_garbage_argmax(dtype):
    boxes = rois(["inside", "other-image"], np.float32)
    info = np.iinfo(dtype)
    garbage = [v for v in GARBAGE_ARGMAX if info.min <= v <= info.max]
    valid = [0, 3, H * W - 1, 17]
    values = np.array((garbage + valid) * 4, dtype=np.int64)[: 2 * C * OUT[0] * OUT[1]]
    argmax = values.reshape((2, C) + OUT)
    gy = rand(argmax.shape, np.float32, seed=4)
    gx = curoi.roi_pool_backward(gy, argmax.astype(dtype), boxes, (N, C, H, W))
    # Expected: the valid entries scattered by the reference, the rest ignored.
    cleaned = np.where((argmax >= 0) & (argmax < H * W), argmax, -1)
    assert (cleaned >= 0).any() and (cleaned == -1).any()
    expected = reference.roi_pool_backward(gy, cleaned, boxes, (N, C, H, W))
    assert_close(gx, expected, np.float32)


def test_roi_pool_backward_with_huge_unsigned_argmax():
    # uint64 values above 2**63 become negative as int64: ignored, not used
    # as huge offsets.
    boxes = rois(["inside"], np.float32)
    argmax = np.full((1, C) + OUT, 2**64 - 3, np.uint64)
    argmax[0, 0, 0, 0] = 4
    gy = np.ones(argmax.shape, np.float32)
    gx = curoi.roi_pool_backward(gy, argmax, boxes, (N, C, H, W))
    expected = np.zeros((N, C, H * W))
    expected[0, 0, 4] = 1
    np.testing.assert_array_equal(gx, expected.reshape(N, C, H, W))


# ------------------------------------------------------ roi_align max modes
# roi_align_max.cu through curoi._ops, ahead of its public API: the ONNX and
# the interpolated (mmcv) max modes forward in both layouts, and the
# interpolated mode's backward with the forward's argmax and with forged
# ones.
MAX_MODES = ("onnx", "interpolated")


def _align_max(x, boxes, mode, aligned, ratio, channels_last=False):
    c = x.shape[3] if channels_last else x.shape[1]
    shape = (len(boxes),) + OUT + (c,) if channels_last else (len(boxes), c) + OUT
    y = np.empty(shape, x.dtype)
    argmax = np.empty(shape, np.int64)
    _ops.roi_align_max_forward(np.ascontiguousarray(x), boxes, y, argmax, 1.0, ratio,
                               aligned, mode, channels_last=channels_last)
    return y, argmax


def _align_max_backward(g, argmax, boxes, aligned, ratio, deterministic=False):
    gx = np.empty((N, C, H, W), g.dtype)
    _ops.roi_align_max_backward(g, np.ascontiguousarray(argmax, np.int64), boxes, gx,
                                1.0, ratio, aligned, deterministic=deterministic)
    return gx


@pytest.mark.parametrize("aligned,ratio", ALIGN_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_roi_align_max_box_zoo(dtype, aligned, ratio, monkeypatch):
    x = rand((N, C, H, W), dtype, seed=13)
    boxes = rois(NAMES, dtype)
    for mode in MAX_MODES:
        y, argmax = _align_max(x, boxes, mode, aligned, ratio)
        y_last, argmax_last = _align_max(x.transpose(0, 2, 3, 1), boxes, mode, aligned,
                                         ratio, channels_last=True)
        np.testing.assert_array_equal(y_last, y.transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(argmax_last, argmax.transpose(0, 2, 3, 1))
        # Each output is a (weighted) map value or 0: finite and bounded.
        assert np.isfinite(y).all() and (np.abs(y) <= np.abs(x).max()).all(), mode
        assert (argmax >= -1).all(), mode
        for name in UNUSABLE:
            k = NAMES.index(name)
            assert not y[k].any() and (argmax[k] == -1).all(), (mode, name)
    # The interpolated mode against the reference wherever it can enumerate
    # the samples (and float32 sees the boxes the reference sees).
    known = [k for k, n in enumerate(NAMES) if n not in UNUSABLE
             and not (n in HUGE and ratio <= 0) and not (n in EXTREME and dtype == np.float32)]
    want_y, want_argmax = reference.roi_align_max_interpolated(
        x, rois([NAMES[k] for k in known], np.float64), OUT, 1.0, ratio, aligned)
    assert_close(y[known], want_y, dtype)
    if dtype == np.float64:
        np.testing.assert_array_equal(argmax[known], want_argmax)
    assert (argmax[known] >= 0).sum() > 10  # not vacuous
    # The backward, with the forward's argmax and with forged ones, against
    # the reference (which recomputes the named sample, whatever the box).
    exact = [k for k, n in enumerate(NAMES) if not (n in EXTREME and dtype == np.float32)]
    forged = np.resize(np.array(GARBAGE_ARGMAX + [0, 3, 5, 17], np.int64), argmax.shape)
    for winners in (argmax, forged):
        g = np.zeros(y.shape, dtype)
        g[exact] = rand((len(exact),) + y.shape[1:], dtype, seed=14)
        expected = reference.roi_align_max_interpolated_backward(
            g, winners, rois(NAMES, np.float64), (N, C, H, W), OUT, 1.0, ratio, aligned)
        assert_close(_align_max_backward(g, winners, boxes, aligned, ratio), expected, dtype)
        # The GPU's fixed-point kernels, run through the CPU backend.
        monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", True)
        assert_close(_align_max_backward(g, winners, boxes, aligned, ratio, True), expected,
                     dtype)
        monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", False)
        assert expected.any()
        # Every box, extreme ones included: each gradient goes to at most
        # four pixels with weights summing to at most 1.
        gx = _align_max_backward(np.ones(y.shape, dtype), winners, boxes, aligned, ratio)
        assert np.isfinite(gx).all() and (gx >= 0).all()
        assert gx.sum() <= y.size * (1 + 1e-5)


# ------------------------------------------------------------ sizes
@pytest.mark.parametrize("output_size", [0, (0, 2), (2, 0), (0, 0)])
def test_zero_output_size_is_a_value_error(output_size):
    x, boxes = rand((N, C, H, W), np.float32), rois(["inside"], np.float32)
    calls = {
        "roi_align": lambda: curoi.roi_align(x, boxes, output_size),
        "roi_pool": lambda: curoi.roi_pool(x, boxes, output_size),
        "roi_align_backward": lambda: curoi.roi_align_backward(
            np.ones((1, C, 2, 2), np.float32), boxes, x.shape, output_size),
    }
    for op, call in calls.items():
        with pytest.raises(ValueError, match="output_size"):
            call()


def _check_every_op_against_the_reference(x, boxes, output_size, align_cases, seed):
    """roi_align forward and backward for each (aligned, sampling_ratio) in
    align_cases, and roi_pool forward and backward in both conventions, all
    against the NumPy reference (float64)."""
    for aligned, ratio in align_cases:
        y = curoi.roi_align(x, boxes, output_size, 1.0, ratio, aligned)
        np.testing.assert_allclose(
            y, reference.roi_align(x, boxes, output_size, 1.0, ratio, aligned),
            rtol=1e-10, atol=1e-12)
        g = rand(y.shape, np.float64, seed=seed)
        np.testing.assert_allclose(
            curoi.roi_align_backward(g, boxes, x.shape, output_size, 1.0, ratio, aligned),
            reference.roi_align_backward(g, boxes, x.shape, output_size, 1.0, ratio,
                                         aligned),
            rtol=1e-10, atol=1e-12)
    h, w = x.shape[2:]
    for convention in CONVENTIONS:
        y, argmax = curoi.roi_pool(x, boxes, output_size, convention=convention,
                                   return_argmax=True)
        want_y, want_argmax = reference.roi_pool(x, boxes, output_size, 1.0, convention)
        np.testing.assert_array_equal(y, want_y)
        np.testing.assert_array_equal(argmax, want_argmax)
        assert (argmax < h * w).all()
        g = rand(y.shape, np.float64, seed=seed + 1)
        np.testing.assert_allclose(
            curoi.roi_pool_backward(g, argmax, boxes, x.shape),
            reference.roi_pool_backward(g, want_argmax, boxes, x.shape), rtol=1e-12)


@pytest.mark.parametrize("output_size", [(1, 4096), (4096, 1), (64, 64)])
def test_large_output_size_on_a_small_map(output_size):
    x = rand((1, 1, 3, 4), np.float64, seed=5)
    names = ["inside", "partly-out", "reversed", "batch-nan"]
    boxes = rois(names, np.float64)
    boxes[:, 0] = np.minimum(boxes[:, 0], 0)  # one image here
    _check_every_op_against_the_reference(x, boxes, output_size,
                                          [(True, 0), (False, 2)], seed=6)


@pytest.mark.parametrize("hw", [(1, 1), (1, 6), (5, 1)], ids=lambda s: "x".join(map(str, s)))
def test_maps_one_pixel_high_or_wide(hw):
    h, w = hw
    x = rand((1, C, h, w), np.float64, seed=8)
    boxes = np.array([[0, 0, 0, w, h], [0, -0.7, -0.7, 0.3, 0.3], [0, 0.2, 0.1, w - 0.4, h],
                      [0, -2, -2, w + 2, h + 2], [0, w, h, w + 1, h + 1]], np.float64)
    _check_every_op_against_the_reference(
        x, boxes, OUT, [(a, r) for a in (True, False) for r in (0, 2)], seed=9)


@pytest.mark.parametrize("shape", [(N, 0, H, W), (0, C, H, W), (0, 0, 0, 0)],
                         ids=lambda s: "x".join(map(str, s)))
def test_no_channels_or_no_images_with_boxes(shape):
    # N = 0: every box's batch index is out of range, so all read nothing.
    x = np.zeros(shape, np.float32)
    boxes = rois(["inside", "other-image", "batch-nan"], np.float32)
    k, c = len(boxes), shape[1]
    y = curoi.roi_align(x, boxes, OUT, 1.0, 2, True)
    assert y.shape == (k, c) + OUT and not y.any()
    y, argmax = curoi.roi_pool(x, boxes, OUT, return_argmax=True)
    assert y.shape == argmax.shape == (k, c) + OUT
    assert not y.any() and (argmax == -1).all()
    g = np.ones((k, c) + OUT, np.float32)
    for gx in (curoi.roi_align_backward(g, boxes, shape, OUT, 1.0, 2, True),
               curoi.roi_pool_backward(g, np.zeros(g.shape, np.int64), boxes, shape)):
        assert gx.shape == shape and not gx.any()


def test_no_boxes():
    x = rand((N, C, H, W), np.float32)
    none = np.zeros((0, 5), np.float32)
    assert curoi.roi_align(x, none, OUT).shape == (0, C) + OUT
    y, argmax = curoi.roi_pool(x, none, OUT, return_argmax=True)
    assert y.shape == argmax.shape == (0, C) + OUT
    g = np.zeros((0, C) + OUT, np.float32)
    assert not curoi.roi_align_backward(g, none, x.shape, OUT).any()
    assert not curoi.roi_pool_backward(g, argmax, none, x.shape).any()


def test_most_negative_sampling_ratio_is_adaptive():
    x = rand((N, C, H, W), np.float64, seed=11)
    boxes = rois(["inside", "partly-out", "reversed"], np.float64)
    y = curoi.roi_align(x, boxes, OUT, 1.0, -(2**31 - 1), False)
    np.testing.assert_allclose(y, reference.roi_align(x, boxes, OUT, 1.0, 0, False),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale", [1e38, 3e38])
def test_scaled_box_that_overflows_float32_reads_nothing(scale):
    # With float32 features the box is scaled in float32: 5 * 1e38 is inf.
    # Both boxes lie far off the map (right/below, left/above), as float64
    # arithmetic shows, so they must read nothing rather than the whole map.
    x = rand((1, 1, H, W), np.float32, seed=12)
    boxes = np.array([[0, 1, 1, 5, 5], [0, -1, -1, -5, -5]], np.float32)
    for aligned, ratio in [(True, 0), (False, 0), (True, 2), (False, 2)]:
        y = curoi.roi_align(x, boxes, OUT, scale, ratio, aligned)
        assert not y.any(), (aligned, ratio, y)
        g = curoi.roi_align_backward(np.ones(y.shape, np.float32), boxes, x.shape, OUT,
                                     scale, ratio, aligned)
        assert not g.any(), (aligned, ratio)
    for convention in CONVENTIONS:
        y, argmax = curoi.roi_pool(x, boxes, OUT, scale, convention=convention,
                                   return_argmax=True)
        assert not y.any() and (argmax == -1).all(), (convention, y, argmax)


# ----------------------------------------------- huge sampling_ratio
# 2**31 - 1 samples per bin side on a box a few pixels wide: about 4.6e18
# samples per bin. The result must come back at once (dense sampling is summed
# per pixel in closed form) and be the limit of the average, which on a linear
# ramp f(y, x) = A*y + B*X + K is the ramp at the bin centre for a bin inside
# [0, H-1] x [0, W-1] (bilinear interpolation is exact for linear functions
# there and the sample grid is symmetric about the centre). It runs in a
# subprocess with a timeout, so that a hang fails instead of blocking CI.
HUGE_RATIO = 2**31 - 1
RAMP = (0.37, -1.3, 2.0)  # A, B, K
HUGE_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import curoi
    A, B, K = %(ramp)r
    R = %(ratio)d
    H, W = 6, 8
    out = {}
    def timed(name, call):
        start = time.perf_counter()
        result = call()
        out[name] = {"seconds": time.perf_counter() - start,
                     "value": np.asarray(result, np.float64).tolist()}
    for dt in ("float32", "float64"):
        ys, xs = np.mgrid[0:H, 0:W]
        ramp = (A * ys + B * xs + K).astype(dt)[None, None]
        const = np.full((1, 1, H, W), 5.0, dt)
        inside = np.array([[0, 1, 1, 5.5, 4], [0, 1.5, 1.5, 6, 4.5]], dt)
        timed(dt + "-ramp-legacy", lambda: curoi.roi_align(ramp, inside[:1], (2, 3), 1.0, R, False))
        timed(dt + "-ramp-aligned", lambda: curoi.roi_align(ramp, inside[1:], (2, 3), 1.0, R, True))
        timed(dt + "-const-whole", lambda: curoi.roi_align(
            const, np.array([[0, 0, 0, W, H]], dt), (2, 3), 1.0, R, False))
        timed(dt + "-const-half-out", lambda: curoi.roi_align(
            const, np.array([[0, 0, 0, 2 * W, H]], dt), 1, 1.0, R, False))
        timed(dt + "-outside", lambda: curoi.roi_align(
            const, np.array([[0, 100, 100, 103, 103], [0, np.nan, 0, 3, 3]], dt), (2, 3), 1.0,
            R, True))
        g = np.arange(1, 7, dtype=dt).reshape(1, 1, 2, 3)
        timed(dt + "-backward", lambda: curoi.roi_align_backward(
            g, inside[:1], (1, 1, H, W), (2, 3), 1.0, R, False))
        timed(dt + "-backward-outside", lambda: curoi.roi_align_backward(
            g, np.array([[0, 100, 100, 103, 103]], dt), (1, 1, H, W), (2, 3), 1.0, R, True))
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def huge_ratio_results():
    script = HUGE_SCRIPT % {"ramp": RAMP, "ratio": HUGE_RATIO}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True,
                              text=True, timeout=45, env=env, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        pytest.fail(f"sampling_ratio={HUGE_RATIO} on a small box did not finish in 45 s")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ramp_at_bin_centres(y0, x0, bin_h, bin_w, out):
    a, b, k = RAMP
    ph, pw = np.meshgrid(np.arange(out[0]), np.arange(out[1]), indexing="ij")
    return a * (y0 + (ph + 0.5) * bin_h) + b * (x0 + (pw + 0.5) * bin_w) + k


DENSE_TOL = {"float32": 1e-4, "float64": 1e-7}


@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_huge_sampling_ratio_returns_at_once(huge_ratio_results, dt):
    for name, r in huge_ratio_results.items():
        if name.startswith(dt):
            assert r["seconds"] < 5, (name, r["seconds"])


@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_huge_sampling_ratio_on_a_ramp_gives_the_bin_centre(huge_ratio_results, dt):
    tol = DENSE_TOL[dt]
    # Box (1, 1)-(5.5, 4), legacy: bins 1.5 x 1.5 from (y, x) = (1, 1).
    got = np.array(huge_ratio_results[dt + "-ramp-legacy"]["value"])[0, 0]
    np.testing.assert_allclose(got, _ramp_at_bin_centres(1, 1, 1.5, 1.5, (2, 3)), atol=tol)
    # Box (1.5, 1.5)-(6, 4.5), aligned: shifted by -0.5, so the same bins.
    got = np.array(huge_ratio_results[dt + "-ramp-aligned"]["value"])[0, 0]
    np.testing.assert_allclose(got, _ramp_at_bin_centres(1, 1, 1.5, 1.5, (2, 3)), atol=tol)


@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_huge_sampling_ratio_on_a_constant_map(huge_ratio_results, dt):
    tol = DENSE_TOL[dt]
    got = np.array(huge_ratio_results[dt + "-const-whole"]["value"])
    np.testing.assert_allclose(got, np.full((1, 1, 2, 3), 5.0), atol=tol)
    # A box twice the map's width: the samples past x = W add 0 but count, and
    # (R + 1) / 2 of the R columns of samples lie on the map.
    got = np.array(huge_ratio_results[dt + "-const-half-out"]["value"])
    np.testing.assert_allclose(got, [[[[5.0 * (HUGE_RATIO + 1) / (2 * HUGE_RATIO)]]]],
                               atol=tol)
    assert not np.array(huge_ratio_results[dt + "-outside"]["value"]).any()


@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_huge_sampling_ratio_backward_moments(huge_ratio_results, dt):
    # The backward is the forward's transpose: <grad_input, f> equals
    # <grad_output, roi_align(f)> for every map f. With f = 1, y, x (the bins
    # lie inside the map) that fixes the gradient's total and centre of mass.
    gx = np.array(huge_ratio_results[dt + "-backward"]["value"])[0, 0]
    g = np.arange(1, 7, dtype=np.float64).reshape(2, 3)
    ys, xs = np.mgrid[0:6, 0:8]
    ph, pw = np.meshgrid(np.arange(2), np.arange(3), indexing="ij")
    cy, cx = 1 + (ph + 0.5) * 1.5, 1 + (pw + 0.5) * 1.5
    rtol = 10 * DENSE_TOL[dt]
    assert (gx >= -DENSE_TOL[dt]).all()
    np.testing.assert_allclose(gx.sum(), g.sum(), rtol=rtol)
    np.testing.assert_allclose((gx * ys).sum(), (g * cy).sum(), rtol=rtol)
    np.testing.assert_allclose((gx * xs).sum(), (g * cx).sum(), rtol=rtol)
    assert not np.array(huge_ratio_results[dt + "-backward-outside"]["value"]).any()


# ------------------------------------------------------ 64-bit indexing
# Features [2, 1, 47000, 47000] float32: 4.4e9 elements (17.7 GB), a sparse
# file mapped read-only, so that only the pages written (a 4 x 4 patch in the
# last image's bottom-right corner) are ever backed by memory. The patch's
# flat index is above 2**32 and its index inside the plane (also roi_pool's
# argmax) above 2**31: a 32-bit offset anywhere would read or write elsewhere.
BIG = (2, 1, 47000, 47000)
BIG_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    import curoi
    path, n, c, h, w = sys.argv[1], *map(int, sys.argv[2:6])
    x = np.memmap(path, np.float32, "r", shape=(n, c, h, w))
    boxes = np.array([[1, w - 3.5, h - 3.5, w + 0.5, h + 0.5]], np.float32)
    out = {}
    out["align"] = curoi.roi_align(x, boxes, 2, 1.0, 2, False).tolist()
    y, argmax = curoi.roi_pool(x, boxes, 2, return_argmax=True)
    out["pool"], out["argmax"] = y.tolist(), argmax.tolist()
    g = np.array([[[[1.0, 2.0], [3.0, 4.0]]]], np.float32)
    # The backward's grad_input would be 17.7 GB of real memory once zeroed:
    # run the kernels themselves on sparse, memory-mapped outputs instead
    # (a fresh file reads as zeros, as the kernels expect).
    from curoi import _cpu
    gx = np.memmap(path + ".gx", np.float32, "w+", shape=x.shape)
    gp = np.memmap(path + ".gp", np.float32, "w+", shape=x.shape)
    _cpu.launch("roi_align", "backward", "float32",
                (g, boxes, 1, n, c, h, w, 2, 2, 1.0, 2, 0, 0, 1, gx))
    _cpu.launch("roi_pool", "backward", "float32",
                (g, np.ascontiguousarray(argmax, np.int64), boxes, 1, n, c, h, w, 2, 2, 0, 0,
                 gp))
    plane = h * w
    for name, grad in (("align_grad", gx), ("pool_grad", gp)):
        flat = grad.reshape(-1)
        out[name] = np.asarray(grad[1, 0, h - 4:, w - 4:]).tolist()
        # Where a 32-bit offset of the patch would land: must stay zero.
        start = plane + (h - 4) * w + (w - 4)
        wrapped = [start % 2**32, (start - plane) % 2**31 + plane, (h - 4) * w % 2**31]
        out[name + "_wrapped"] = [float(np.abs(flat[i:i + 4 * w]).max()) for i in wrapped]
    # The peak of this process's own memory: VmHWM, since ru_maxrss keeps,
    # across exec, the size of the parent it was forked from (a pytest that
    # has imported TensorFlow is over 1 GB).
    try:
        with open("/proc/self/status") as status:
            peak = [l for l in status if l.startswith("VmHWM:")][0]
        out["maxrss_mb"] = int(peak.split()[1]) / 1024
    except (OSError, IndexError):
        out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))
""")


@pytest.mark.skipif(bool(os.environ.get("CUROI_SANITIZE")),
                    reason="ASan shadows a 17.7 GB allocation with 2.2 GB of real memory")
def test_flat_index_beyond_2_to_the_32(tmp_path):
    n, c, h, w = BIG
    path = tmp_path / "features.f32"
    try:
        x = np.memmap(path, np.float32, "w+", shape=BIG)
        patch = np.arange(16, dtype=np.float32).reshape(4, 4) * 0.25 - 1.0
        x[1, 0, h - 4:, w - 4:] = patch
        x.flush()
        del x
        used = path.stat().st_blocks * 512
    except OSError as error:
        pytest.skip(f"the temporary filesystem cannot hold a 17.7 GB sparse file: {error}")
    if used > 64 * 2**20:
        pytest.skip(f"the temporary filesystem does not keep files sparse ({used} bytes used)")
    assert (n * c * h * w) > 2**32 and h * w > 2**31
    done = subprocess.run([sys.executable, "-c", BIG_SCRIPT, str(path), *map(str, BIG)],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout.strip().splitlines()[-1])
    # Only a few pages were touched: no copy of the features or gradients.
    assert r["maxrss_mb"] < 1024, r["maxrss_mb"]
    # Expected values: the same box on the 4 x 4 patch alone (shifted by the
    # patch's corner). Its samples lie in the patch or past the map's edge,
    # which the patch shares, so the reference sees the same taps.
    local = np.array([[0, 0.5, 0.5, 4.5, 4.5]])
    p = patch.astype(np.float64)[None, None]
    np.testing.assert_allclose(r["align"], reference.roi_align(p, local, 2, 1.0, 2, False),
                               rtol=1e-6)
    want_y, want_argmax = reference.roi_pool(p, local, 2, 1.0)
    np.testing.assert_array_equal(r["pool"], want_y)
    # argmax is h * W + w in the whole plane: above 2**31.
    rows, cols = np.divmod(want_argmax, 4)
    full = (rows + h - 4) * w + (cols + w - 4)
    assert (full > 2**31).all()
    np.testing.assert_array_equal(r["argmax"], full)
    g = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    np.testing.assert_allclose(r["align_grad"],
                               reference.roi_align_backward(g, local, p.shape, 2, 1.0, 2,
                                                            False)[0, 0], rtol=1e-6)
    np.testing.assert_allclose(r["pool_grad"],
                               reference.roi_pool_backward(g, want_argmax, local, p.shape)[0, 0])
    assert np.sum(r["pool_grad"]) == 10 and abs(np.sum(r["align_grad"]) - 10) < 1e-4
    assert r["align_grad_wrapped"] == [0, 0, 0] and r["pool_grad_wrapped"] == [0, 0, 0]


def test_kernels_called_with_nothing_to_do_return_cleanly():
    # The public functions never launch a kernel on empty work, but the
    # kernels themselves must not divide by an empty count either (a direct
    # ctypes call with K = 0 or C = 0 used to raise SIGFPE).
    x = np.zeros((1, 4, 6, 6), np.float32)
    boxes = np.array([[0, 1, 1, 4, 4]], np.float32)
    out = np.zeros((1, 4, 2, 2), np.float32)
    argmax = np.zeros((1, 4, 2, 2), np.int64)
    grad = np.zeros(x.shape, np.float32)
    for k, c in ((0, 4), (1, 0), (0, 0)):
        _cpu.launch("roi_align", "forward", "float32",
                    (x, boxes, k, 1, c, 6, 6, 2, 2, 1.0, 2, 0, 0, 1, out))
        _cpu.launch("roi_align", "backward", "float32",
                    (out, boxes, k, 1, c, 6, 6, 2, 2, 1.0, 2, 0, 0, 1, grad))
        _cpu.launch("roi_pool", "forward", "float32",
                    (x, boxes, k, 1, c, 6, 6, 2, 2, 1.0, 0, 0, 0, 1, out, argmax))
        _cpu.launch("roi_pool", "backward", "float32",
                    (out, argmax, boxes, k, 1, c, 6, 6, 2, 2, 0, 0, grad))
        for channels_last in (0, 1):
            _cpu.launch("roi_align_max", "forward", "float32",
                        (x, boxes, k, 1, c, 6, 6, 2, 2, 1.0, 2, 0, 1, channels_last, 1, out,
                         argmax))
            _cpu.launch("roi_align_max", "backward", "float32",
                        (out, argmax, boxes, k, 1, c, 6, 6, 2, 2, 1.0, 2, 0, channels_last, 1,
                         grad))
    assert not grad.any()

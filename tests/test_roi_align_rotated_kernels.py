"""Rotated RoI Align kernels (cuda_src/roi_align_rotated.cu) through the
kernel-level wrappers curoi._ops.roi_align_rotated_forward/_backward, on the
CPU backend (and, from test_gpu_loops.py, with the GPU's loop code).

Expected values come from the independent NumPy reference
(tests/reference.py, written from detectron2's and mmcv's formulas), from
hand computation, from RoI Align on axis-aligned boxes (angle 0) and on
turned maps (quarter turns), and from the adjoint identity and finite
differences; never from the kernels themselves, except where a test checks
a stated property relating two kernel results (layouts, thread counts,
conventions).

Only NumPy and curoi are imported (with the reference), so that
test_sanitizers.py can run this file under AddressSanitizer.
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

REPO = Path(__file__).resolve().parents[1]
CONVENTIONS = ("detectron2", "mmcv")
DTYPES = (np.float32, np.float64)
# (rtol, atol) against the float64 reference: float64 differs by summation
# order only; float32 also by rounding the box, sin/cos and the coordinates.
TOL = {np.float32: (1e-5, 1e-5), np.float64: (1e-12, 1e-12)}


def pair(o):
    return (o, o) if isinstance(o, int) else tuple(o)


def nhwc(a):
    return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view({4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def rois_for(boxes, dtype):
    """Boxes in the accumulation dtype of features of `dtype`."""
    return np.ascontiguousarray(boxes, dtype=np.float64 if dtype == np.float64
                                else np.float32)


def forward(x, boxes, output_size, scale=1.0, ratio=2, convention="detectron2",
            aligned=True, clockwise=False, channels_last=False):
    """The kernel's forward on NCHW features x, returned NCHW."""
    x = np.ascontiguousarray(x)
    ph, pw = pair(output_size)
    k, c = len(boxes), x.shape[1]
    rois = rois_for(boxes, x.dtype)
    if channels_last:
        out = np.full((k, ph, pw, c), np.nan, x.dtype)
        _ops.roi_align_rotated_forward(nhwc(x), rois, out, scale, ratio, convention,
                                       aligned, clockwise, channels_last=True)
        return np.ascontiguousarray(out.transpose(0, 3, 1, 2))
    out = np.full((k, c, ph, pw), np.nan, x.dtype)
    _ops.roi_align_rotated_forward(x, rois, out, scale, ratio, convention, aligned,
                                   clockwise)
    return out


def backward(g, boxes, shape, scale=1.0, ratio=2, convention="detectron2",
             aligned=True, clockwise=False, deterministic=False, channels_last=False):
    """The kernel's backward for NCHW grad_output g, returned NCHW."""
    g = np.ascontiguousarray(g)
    rois = rois_for(boxes, g.dtype)
    n, c, h, w = shape
    if channels_last:
        gx = np.zeros((n, h, w, c), g.dtype)
        _ops.roi_align_rotated_backward(nhwc(g), rois, gx, scale, ratio, convention,
                                        aligned, clockwise, deterministic,
                                        zeroed=True, channels_last=True)
        return np.ascontiguousarray(gx.transpose(0, 3, 1, 2))
    gx = np.full(shape, np.nan, g.dtype)  # zeroed=False: the wrapper clears it
    _ops.roi_align_rotated_backward(g, rois, gx, scale, ratio, convention, aligned,
                                    clockwise, deterministic)
    return gx


def assert_close(got, expected, dtype, what=""):
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=rtol,
                               atol=atol, err_msg=what)


def random_rotated_boxes(rng, n_images, height, width, k, convention):
    """[k, 6] boxes: centres on, near and off the map, sizes from zero and
    sub-pixel to larger than the map (some negative), angles over several
    turns, some exact quarter turns."""
    boxes = np.empty((k, 6))
    for i in range(k):
        kind = rng.integers(6)
        if kind == 0:    # well inside
            cx, cy = rng.uniform(1, width - 1), rng.uniform(1, height - 1)
            w, h = rng.uniform(1, 0.6 * width), rng.uniform(1, 0.6 * height)
        elif kind == 1:  # across an edge
            cx, cy = rng.uniform(-3, width + 3), rng.uniform(-3, height + 3)
            w, h = rng.uniform(1, 1.5 * width), rng.uniform(1, 1.5 * height)
        elif kind == 2:  # off the map
            cx = rng.choice([-1, 1]) * rng.uniform(width + 8, 3 * width) + width / 2
            cy = rng.uniform(-height, 2 * height)
            w, h = rng.uniform(0, 6), rng.uniform(0, 6)
        elif kind == 3:  # under a pixel, or empty
            cx, cy = rng.uniform(-1, width + 1), rng.uniform(-1, height + 1)
            w, h = rng.uniform(0, 0.8) * rng.integers(2), rng.uniform(0, 0.8)
        elif kind == 4:  # larger than the map
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            w, h = rng.uniform(width, 3 * width), rng.uniform(height, 3 * height)
        else:            # negative sizes (reversed boxes)
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            w, h = rng.uniform(-6, 4), rng.uniform(-6, 1)
        turn = 360.0 if convention == "detectron2" else 2 * math.pi
        angle = rng.uniform(-2 * turn, 2 * turn)
        if rng.random() < 0.2:
            angle = turn / 4 * int(rng.integers(-4, 5))
        boxes[i] = (rng.integers(n_images), cx, cy, w, h, angle)
    return boxes


# --------------------------------------------------------------------------
# hand-computed cases
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("ratio", [1, 2, 3, 0])
def test_constant_map(dtype, convention, ratio):
    """Every sample of these boxes lands in [0, H-1] x [0, W-1] (the box's
    half diagonal is shorter than its centre's distance to the edges), its
    bilinear weights sum to 1, so each bin averages the constant."""
    x = np.full((2, 3, 12, 14), 2.75, dtype)
    turn = 360.0 if convention == "detectron2" else 2 * math.pi
    boxes = np.array([[0, 7.3, 6.2, 6.0, 4.0, 0.1 * turn],
                      [1, 6.0, 5.5, 3.3, 7.1, -0.3 * turn],
                      [1, 8.1, 6.4, 1.2, 0.9, 1.7 * turn],
                      [0, 7.0, 6.0, 5.0, 5.0, 0.25 * turn]])
    y = forward(x, boxes, (3, 2), ratio=ratio, convention=convention)
    np.testing.assert_allclose(y, 2.75, rtol=1e-6 if dtype == np.float32 else 1e-14)


# A ramp f(y, x) = A*y + B*x + C. Bilinear interpolation reproduces it
# wherever all four taps are on the map, and a bin's sample grid is symmetric
# about the bin centre in box coordinates, a symmetry that turning keeps:
# the bin average is f at the turned bin centre,
#   (yy, xx) = (-h/2 + (ph + 0.5) h/PH, -w/2 + (pw + 0.5) w/PW),
#   y = yy cos t - xx sin t + cy,  x = yy sin t + xx cos t + cx.
RAMP = (0.75, -0.3125, 2.0)


def ramp_map(dtype, h=14, w=16):
    a, b, c = RAMP
    ys, xs = np.mgrid[0:h, 0:w]
    plane = a * ys + b * xs + c
    return np.stack([np.stack([plane, 2 * plane + 1])]).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ratio", [1, 2, 4, 0])
@pytest.mark.parametrize("convention,aligned", [("detectron2", True), ("mmcv", True),
                                                ("mmcv", False)])
def test_linear_ramp_gives_the_turned_bin_centre(dtype, ratio, convention, aligned):
    x = ramp_map(dtype)
    degrees = [0.0, 17.0, 90.0, 135.0, -60.0, 200.0]
    out = (2, 3)
    for angle_deg in degrees:
        angle = angle_deg if convention == "detectron2" else math.radians(angle_deg)
        box = [0, 7.7, 6.9, 5.2, 4.4, angle]
        y = forward(x, np.array([box]), out, ratio=ratio, convention=convention,
                    aligned=aligned)
        offset = 0.5 if aligned else 0.0
        cx, cy, w, h = box[1] - offset, box[2] - offset, box[3], box[4]
        t = math.radians(angle_deg)
        a, b, c = RAMP
        expected = np.empty(out)
        for ph in range(out[0]):
            for pw in range(out[1]):
                yy = -h / 2 + (ph + 0.5) * h / out[0]
                xx = -w / 2 + (pw + 0.5) * w / out[1]
                ym = yy * math.cos(t) - xx * math.sin(t) + cy
                xm = yy * math.sin(t) + xx * math.cos(t) + cx
                # the guard on the test data: every sample well inside
                assert 3 < ym < 10 and 3 < xm < 12
                expected[ph, pw] = a * ym + b * xm + c
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12)
        np.testing.assert_allclose(y[0, 0], expected, err_msg=str(angle_deg), **tol)
        np.testing.assert_allclose(y[0, 1], 2 * expected + 1, err_msg=str(angle_deg),
                                   **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_quarter_turn_counter_clockwise_by_hand(dtype):
    """A 4 x 2 box (w x h) centred on map pixel (y, x) = (6, 5), one bin row
    and two bin columns, one sample each (at xx = -1 and xx = +1, yy = 0).
    Turned by +90 degrees (detectron2; pi/2 in mmcv, counter-clockwise):
    y = -xx + 6 and x = 5, so the first bin reads the map at (7, 5) and the
    second at (5, 5). On the map f(y, x) = 10*y + x that is 75 and 55.
    mmcv's clockwise=True with pi/2 turns the other way: 55 and 75."""
    ys, xs = np.mgrid[0:12, 0:10]
    x = (10.0 * ys + xs).astype(dtype)[None, None]
    box = [0, 5.5, 6.5, 4.0, 2.0]  # centre (5, 6) on the map after -0.5
    y = forward(x, np.array([box + [90.0]]), (1, 2), ratio=1)
    np.testing.assert_allclose(y.ravel(), [75.0, 55.0], rtol=1e-6)
    y = forward(x, np.array([box + [math.pi / 2]]), (1, 2), ratio=1, convention="mmcv")
    np.testing.assert_allclose(y.ravel(), [75.0, 55.0], rtol=1e-6)
    y = forward(x, np.array([box + [math.pi / 2]]), (1, 2), ratio=1, convention="mmcv",
                clockwise=True)
    np.testing.assert_allclose(y.ravel(), [55.0, 75.0], rtol=1e-6)
    # mmcv not aligned: no half-pixel shift, the centre is (6.5, 5.5):
    # (7.5, 5.5) and (5.5, 5.5) give 80.5 and 60.5.
    y = forward(x, np.array([box + [math.pi / 2]]), (1, 2), ratio=1, convention="mmcv",
                aligned=False)
    np.testing.assert_allclose(y.ravel(), [80.5, 60.5], rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_samples_off_the_map_count_in_the_divisor(dtype):
    """A map of 4.0, 8 x 8; a box 16 wide and 1 high, not turned, centred at
    (x, y) = (0, 4), that is (-0.5, 3.5) on the map; one bin, sampling_ratio
    4: columns at xx = -6, -2, 2, 6, so x = -6.5, -2.5 (below -1: off the
    map), 1.5, 5.5; rows at y = 3.5 + (-0.375, -0.125, 0.125, 0.375), all
    on. Half of the 16 samples read 4.0: 4.0 * 8 / 16 = 2.0."""
    x = np.full((1, 1, 8, 8), 4.0, dtype)
    box = np.array([[0, 0.0, 4.0, 16.0, 1.0, 0.0]])
    y = forward(x, box, 1, ratio=4)
    np.testing.assert_allclose(y.ravel(), [2.0], rtol=1e-6)
    # Turned a half turn the same samples land mirrored about the centre:
    # the same columns are off, the same value.
    box[0, 5] = 180.0
    np.testing.assert_allclose(forward(x, box, 1, ratio=4).ravel(), [2.0], rtol=1e-6)


# --------------------------------------------------------------------------
# relations with RoI Align and between the conventions
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ratio", [1, 2, 0])
@pytest.mark.parametrize("convention,aligned", [("detectron2", True), ("mmcv", True),
                                                ("mmcv", False)])
def test_angle_zero_is_roi_align_on_the_box(dtype, ratio, convention, aligned):
    """Not turned, the box (cx, cy, w, h) samples where RoI Align samples the
    box (cx - w/2, cy - h/2, cx + w/2, cy + h/2), with the same `aligned`
    (detectron2: always aligned). Not aligned, both widen to 1 x 1 from
    different corners, so the sizes here are at least one pixel."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 11, 13)).astype(dtype)
    k, scale = 24, 0.5
    cx, cy = rng.uniform(-4, 30, k), rng.uniform(-4, 26, k)
    w, h = rng.uniform(2, 24, k), rng.uniform(2, 30, k)
    boxes = np.column_stack([rng.integers(0, 2, k), cx, cy, w, h, np.zeros(k)])
    y = forward(x, boxes, (3, 2), scale, ratio, convention, aligned)
    corners = np.column_stack([boxes[:, 0], cx - w / 2, cy - h / 2, cx + w / 2,
                               cy + h / 2])
    expected = np.empty_like(y)
    _ops.roi_align_forward(x, rois_for(corners, dtype), expected, scale, ratio,
                           aligned or convention == "detectron2")
    assert np.abs(expected).max() > 0.1
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, expected, rtol=rtol, atol=rtol)


def _turned(x, boxes, quarter_turns):
    """The map turned and the boxes moved so that RoI Align on the turned map
    samples what the rotated boxes (aligned, scale 1) sample on x: a box
    turned counter-clockwise by q quarter turns reads x at
    (cy - xx, cx + yy) for q = 1, (cy - yy, cx - xx) for q = 2 and
    (cy + xx, cx - yy) for q = 3, which is the turned map at
    (cy' + yy, cx' + xx)."""
    h, w = x.shape[2:]
    q = quarter_turns % 4
    # np.rot90 turns the array counter-clockwise as printed, k = -q undoes it:
    # turned[r, s] = x[h-1-s, r] (q = 1), x[h-1-r, w-1-s] (2), x[s, w-1-r] (3).
    turned = np.ascontiguousarray(np.rot90(x, -q, axes=(2, 3)))
    corners = []
    for b, cx, cy, bw, bh, _ in boxes:
        mx, my = cx - 0.5, cy - 0.5  # the centre on the map
        cy2, cx2 = {1: (mx, h - 1 - my), 2: (h - 1 - my, w - 1 - mx),
                    3: (w - 1 - mx, my)}[q]
        corners.append([b, cx2 - bw / 2 + 0.5, cy2 - bh / 2 + 0.5,
                        cx2 + bw / 2 + 0.5, cy2 + bh / 2 + 0.5])
    return turned, np.array(corners)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quarter_turns", [1, 2, 3, -1])
@pytest.mark.parametrize("ratio", [2, 3, 0])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_quarter_turns_are_roi_align_on_the_turned_map(dtype, quarter_turns, ratio,
                                                       convention):
    rng = np.random.default_rng(4 + quarter_turns)
    x = rng.standard_normal((2, 2, 9, 12)).astype(dtype)
    k = 16
    # Centres off the pixel lattice and sizes whose bins are not whole
    # pixels: no sample lands exactly on the cut-off lines -1, H, W, where
    # the last bit of cos(90 degrees) (6e-17 in double) would decide.
    cx = rng.integers(-2, 14, k) + 0.3173
    cy = rng.integers(-2, 11, k) + 0.3173
    w, h = rng.integers(2, 14, k) + 0.5871, rng.integers(2, 14, k) + 0.5871
    angle = quarter_turns * (90.0 if convention == "detectron2" else math.pi / 2)
    boxes = np.column_stack([rng.integers(0, 2, k), cx, cy, w, h, np.full(k, angle)])
    y = forward(x, boxes, (2, 3), 1.0, ratio, convention, aligned=True)
    turned, corners = _turned(x, boxes, quarter_turns)
    expected = np.empty_like(y)
    _ops.roi_align_forward(turned, rois_for(corners, dtype), expected, 1.0, ratio, True)
    assert np.abs(expected).max() > 0.1
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, expected, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conventions_relate_by_units_and_direction(dtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 2, 10, 11)).astype(dtype)
    k = 20
    boxes = random_rotated_boxes(rng, 2, 10, 11, k, "mmcv")
    out = (2, 3)
    mmcv = forward(x, boxes, out, 0.5, 2, "mmcv", aligned=True)
    degrees = boxes.copy()
    degrees[:, 5] = np.degrees(boxes[:, 5])
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    # Radians and degrees: the same box (up to the rounding of the angle).
    np.testing.assert_allclose(mmcv, forward(x, degrees, out, 0.5, 2, "detectron2"),
                               rtol=rtol, atol=rtol)
    # clockwise flips the angle's sign: bit for bit.
    flipped = boxes.copy()
    flipped[:, 5] *= -1
    assert np.array_equal(bits(forward(x, flipped, out, 0.5, 2, "mmcv", True, True)),
                          bits(mmcv))
    # detectron2 has neither `aligned` nor `clockwise`: both are ignored.
    plain = forward(x, degrees, out, 0.5, 2, "detectron2")
    for aligned, clockwise in [(False, False), (False, True), (True, True)]:
        assert np.array_equal(
            bits(forward(x, degrees, out, 0.5, 2, "detectron2", aligned, clockwise)),
            bits(plain))


# --------------------------------------------------------------------------
# random cases against the reference
# --------------------------------------------------------------------------


def _random_case(seed, dtype, convention, k=24):
    rng = np.random.default_rng(seed)
    n, c = 2, 3
    h, w = int(rng.integers(4, 14)), int(rng.integers(4, 14))
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    boxes = random_rotated_boxes(rng, n, h, w, k, convention)
    return rng, x, boxes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ratio", [1, 2, 0])
@pytest.mark.parametrize("convention,aligned,clockwise",
                         [("detectron2", True, False), ("mmcv", True, False),
                          ("mmcv", False, False), ("mmcv", True, True)])
def test_forward_and_backward_against_the_reference(dtype, ratio, convention, aligned,
                                                    clockwise):
    seed = 100 * ratio + 10 * CONVENTIONS.index(convention) + 2 * aligned + clockwise
    rng, x, boxes = _random_case(seed, dtype, convention)
    boxes = rois_for(boxes, dtype).astype(np.float64)  # the boxes the kernel sees
    out = (2, 3)
    args = (1.0, ratio, convention, aligned, clockwise)
    y = forward(x, boxes, out, *args)
    assert_close(y, reference.roi_align_rotated(x, boxes, out, *args), dtype)
    assert np.count_nonzero(y) > y.size // 4  # not vacuous
    g = rng.standard_normal(y.shape).astype(dtype)
    gx = backward(g, boxes, x.shape, *args)
    assert_close(gx, reference.roi_align_rotated_backward(g, boxes, x.shape, out, *args),
                 dtype)


@pytest.mark.parametrize("scale", [0.5, 0.25, 1 / 3])
def test_spatial_scale_against_the_reference(scale):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 2, 9, 10))
    boxes = random_rotated_boxes(rng, 2, 9, 10, 16, "detectron2")
    boxes[:, 1:5] /= scale
    for convention, aligned in [("detectron2", True), ("mmcv", False)]:
        y = forward(x, boxes, (3, 3), scale, 0, convention, aligned)
        assert_close(y, reference.roi_align_rotated(x, boxes, (3, 3), scale, 0,
                                                    convention, aligned), np.float64)


def test_the_reference_clip_drops_no_sample():
    """The clipped reference (used where exhaustive sampling is impossible)
    agrees with the exhaustive one on boxes far larger than the map."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 2, 7, 9))
    boxes = random_rotated_boxes(rng, 1, 7, 9, 40, "detectron2")
    boxes[:20, 3:5] *= 6
    for ratio in (0, 3):
        full = reference.roi_align_rotated(x, boxes, (2, 2), 1.0, ratio)
        clipped = reference.roi_align_rotated(x, boxes, (2, 2), 1.0, ratio, clip=True)
        np.testing.assert_allclose(clipped, full, rtol=1e-14, atol=1e-15)
        assert np.count_nonzero(full) > full.size // 2


# --------------------------------------------------------------------------
# backward: adjoint, finite differences, deterministic sums
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [2, 0])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_backward_is_the_adjoint_of_forward(ratio, convention):
    rng, x, boxes = _random_case(11 + ratio, np.float64, convention, k=30)
    out = (3, 2)
    y = forward(x, boxes, out, 1.0, ratio, convention)
    g = rng.standard_normal(y.shape)
    gx = backward(g, boxes, x.shape, 1.0, ratio, convention)
    lhs, rhs = float(np.vdot(gx, x)), float(np.vdot(g, y))
    assert abs(lhs - rhs) <= 1e-12 * (np.abs(gx).sum() * np.abs(x).max())
    # Central differences of L(x) = <g, forward(x)> along random directions.
    for _ in range(3):
        d = rng.standard_normal(x.shape)
        eps = 1e-3
        fd = (np.vdot(g, forward(x + eps * d, boxes, out, 1.0, ratio, convention))
              - np.vdot(g, forward(x - eps * d, boxes, out, 1.0, ratio, convention))) \
            / (2 * eps)
        np.testing.assert_allclose(fd, np.vdot(gx, d), rtol=1e-9)


@pytest.fixture
def restore_threads():
    before = curoi.get_num_threads()
    yield
    curoi.set_num_threads(before)


@pytest.fixture(params=["cpu-sum", "fixed-point"])
def sum_method(request, monkeypatch):
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", request.param == "fixed-point")
    return request.param


def _overlapping_case(dtype, convention="detectron2"):
    """Many overlapping boxes and channels enough for several blocks."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 9, 13, 15)).astype(dtype)
    boxes = random_rotated_boxes(rng, 2, 13, 15, 70, convention)
    g = rng.standard_normal((len(boxes), 9, 3, 4)).astype(dtype)
    return x, boxes, g


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_backward_against_the_reference(dtype, sum_method):
    x, boxes, g = _overlapping_case(dtype)
    boxes = rois_for(boxes, dtype).astype(np.float64)
    gx = backward(g, boxes, x.shape, 1.0, 2, deterministic=True)
    assert gx.dtype == dtype
    expected = reference.roi_align_rotated_backward(g, boxes, x.shape, (3, 4), 1.0, 2)
    assert_close(gx, expected, dtype)
    plain = backward(g, boxes, x.shape, 1.0, 2, deterministic=False)
    assert_close(gx, plain.astype(np.float64), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_backward_with_non_finite_gradients(dtype, sum_method):
    """inf and NaN gradients reach exactly the pixels their bins touch, as in
    the reference, and the finite rest is unchanged."""
    x, boxes, g = _overlapping_case(dtype)
    boxes = rois_for(boxes, dtype).astype(np.float64)[:12]
    g = g[:12].copy()
    g[0, 1, 0, 0], g[3, 2, 1, 1], g[5, 0, 2, 3] = np.nan, np.inf, -np.inf
    gx = backward(g, boxes, x.shape, 1.0, 2, deterministic=True)
    with np.errstate(invalid="ignore"):
        expected = reference.roi_align_rotated_backward(g, boxes, x.shape, (3, 4), 1.0, 2)
    assert np.isnan(expected).any() and np.isinf(expected).any()
    np.testing.assert_array_equal(np.isnan(gx), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(gx), np.isposinf(expected))
    finite = np.isfinite(expected)
    assert_close(gx[finite], expected[finite], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_do_not_depend_on_the_thread_count(dtype, sum_method, restore_threads):
    x, boxes, g = _overlapping_case(dtype, "mmcv")
    results = []
    for threads in (1, 3, 2):
        curoi.set_num_threads(threads)
        for layout in (False, True):
            results.append((
                forward(x, boxes, (3, 4), 0.8, 0, "mmcv", True, channels_last=layout),
                backward(g, boxes, x.shape, 0.8, 0, "mmcv", True, deterministic=True,
                         channels_last=layout),
                backward(g, boxes, x.shape, 0.8, 0, "mmcv", True, channels_last=layout)))
    for other in results[1:]:
        for got, first in zip(other, results[0]):
            assert np.array_equal(bits(got), bits(first))


# --------------------------------------------------------------------------
# channels-last
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("threads", [1, 3])
def test_channels_last_is_nchw_transposed_bit_for_bit(dtype, convention, threads,
                                                      sum_method, restore_threads):
    curoi.set_num_threads(threads)
    rng, x, boxes = _random_case(21, dtype, convention, k=40)
    x = rng.standard_normal((2, 7, 10, 9)).astype(dtype)  # lanes and a remainder
    out = (2, 3)
    for ratio, aligned in [(2, True), (0, False)]:
        args = (0.9, ratio, convention, aligned, False)
        y = forward(x, boxes, out, *args)
        y_nhwc = forward(x, boxes, out, *args, channels_last=True)
        assert np.array_equal(bits(y_nhwc), bits(y))
        g = rng.standard_normal(y.shape).astype(dtype)
        for deterministic in (False, True):
            gx = backward(g, boxes, x.shape, *args, deterministic=deterministic)
            gx_nhwc = backward(g, boxes, x.shape, *args, deterministic=deterministic,
                               channels_last=True)
            assert np.array_equal(bits(gx_nhwc), bits(gx))
    # And against the reference directly.
    boxes = rois_for(boxes, dtype).astype(np.float64)
    y_nhwc = forward(x, boxes, out, 0.9, 2, convention, channels_last=True)
    assert_close(y_nhwc, reference.roi_align_rotated(x, boxes, out, 0.9, 2, convention),
                 dtype)


# --------------------------------------------------------------------------
# adversarial boxes
# --------------------------------------------------------------------------

N, C, H, W = 2, 2, 5, 7
OUT = (2, 3)
# name -> (batch index, cx, cy, w, h, angle in degrees; radians for mmcv are
# these divided by 57.3)
ZOO = {
    "inside": [0, 3.1, 2.4, 3.0, 2.2, 30],
    "other-image": [1, 3.5, 2.5, 6.0, 4.0, -75],
    "whole-map-turned": [1, 3.5, 2.5, 9.0, 9.0, 45],
    "partly-out": [0, 0.2, 4.5, 6.0, 3.0, 120],
    "edge-band": [1, -0.4, -0.3, 1.0, 1.0, 10],
    "reversed": [0, 3.0, 2.0, -4.0, -3.0, 15],
    "reversed-width": [1, 3.0, 2.0, -4.0, 3.0, 200],
    "zero-size": [0, 2.0, 2.0, 0.0, 0.0, 33],
    "point-at-far-corner": [0, W, H, 0.0, 0.0, 0],
    "huge-angle": [1, 3.2, 2.2, 3.0, 3.0, 1e9],
    "far-right-1e9": [0, 1e9, 2, 5, 3, 10],
    "far-1e20": [1, 1e20, 1e20, 5, 5, 10],
    "around-map-1e9": [0, 3, 2, 2e9, 2e9, 20],
    "around-map-1e20": [1, 3, 2, 2e20, 2e20, 70],
    "to-1e20": [0, 5e19, 2, 1e20, 3, 0],
    "beyond-1e30": [0, 3, 2, 3e30, 3e30, 20],
    "batch-negative": [-1, 3, 2, 3, 3, 0],
    "batch-minus-half": [-0.5, 3, 2, 3, 3, 0],
    "batch-N": [N, 3, 2, 3, 3, 0],
    "batch-1e30": [1e30, 3, 2, 3, 3, 0],
    "batch-nan": [np.nan, 3, 2, 3, 3, 0],
    "batch-inf": [np.inf, 3, 2, 3, 3, 0],
    "cx-nan": [0, np.nan, 2, 3, 3, 0],
    "cy-inf": [0, 3, np.inf, 3, 3, 0],
    "w-inf": [1, 3, 2, np.inf, 3, 0],
    "h--inf": [1, 3, 2, 3, -np.inf, 0],
    "angle-nan": [0, 3, 2, 3, 3, np.nan],
    "angle-inf": [1, 3, 2, 3, 3, np.inf],
}
NAMES = list(ZOO)
UNUSABLE = {name for name, box in ZOO.items()
            if not all(map(math.isfinite, box)) or not 0 <= box[0] < N
            or max(abs(v) for v in box[1:5]) > 1e30}
# Centres or sizes beyond 1e6: float32 coordinates are a pixel apart or
# worse there, so float32 is checked against bounds only; beyond 1e12 float64
# is too, and the exhaustive and clipped references no longer apply.
FAR = {name for name, box in ZOO.items() if name not in UNUSABLE
       and max(abs(v) for v in box[1:5]) > 1e6}
ABSURD = {name for name in FAR if max(abs(v) for v in ZOO[name][1:5]) > 1e12}


def zoo(names, convention):
    boxes = np.array([ZOO[n] for n in names], np.float64)
    if convention == "mmcv":
        boxes[:, 5] /= 57.3
    return boxes


def assert_average_bounds(y, x, what=""):
    """A bin's weights are non-negative and sum to at most 1."""
    y = np.asarray(y, np.float64)
    assert np.isfinite(y).all(), what
    tol = 1e-5 * max(1.0, float(np.abs(x).max()))
    assert (y >= min(0.0, float(x.min())) - tol).all(), what
    assert (y <= max(0.0, float(x.max())) + tol).all(), what


@pytest.mark.parametrize("ratio", [0, 2])
@pytest.mark.parametrize("convention,aligned", [("detectron2", True), ("mmcv", False)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_box_zoo_forward_and_backward(dtype, convention, aligned, ratio):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    boxes = zoo(NAMES, convention)
    args = (1.0, ratio, convention, aligned, False)
    y = forward(x, boxes, OUT, *args)
    assert y.shape == (len(NAMES), C) + OUT
    # Float kernels reduce radians beyond 1e5 modulo float's 2*pi (see
    # roi_align_rotated_sincos): a float32 box turned by 1.7e7 radians is
    # checked against bounds only.
    rough = FAR | ({"huge-angle"} if convention == "mmcv" else set())
    exact = [n for n in NAMES if n not in UNUSABLE and n not in ABSURD
             and not (dtype == np.float32 and n in rough)]
    for k, name in enumerate(NAMES):
        if name in UNUSABLE:
            assert not y[k].any(), name  # reads nothing: zeros, no NaN
        else:
            assert_average_bounds(y[k], x, name)
    expected = reference.roi_align_rotated(x, zoo(exact, convention), OUT, *args,
                                           clip=True)
    keep = [NAMES.index(n) for n in exact]
    assert_close(y[keep], expected, dtype)
    assert np.abs(y[NAMES.index("inside")]).min() > 0  # not vacuous
    # Backward: each box alone against the reference where it applies,
    # otherwise finite, non-negative for a positive gradient, and no more than
    # the gradient's sum.
    g = np.abs(rng.standard_normal(y.shape)).astype(dtype) + 0.5
    gx = backward(g[keep], boxes[keep], x.shape, *args)
    want = reference.roi_align_rotated_backward(g[keep], zoo(exact, convention), x.shape,
                                                OUT, *args, clip=True)
    assert_close(gx, want, dtype)
    for name in NAMES:
        k = NAMES.index(name)
        gx = backward(g[k:k + 1], boxes[k:k + 1], x.shape, *args).astype(np.float64)
        if name in UNUSABLE:
            assert not gx.any(), name
        assert np.isfinite(gx).all() and (gx >= 0).all(), name
        assert gx.sum() <= g[k].astype(np.float64).sum() * (1 + 1e-5), name


@pytest.mark.parametrize("scale", [1e38, 3e38])
def test_scaled_box_that_overflows_float32_reads_nothing(scale):
    # With float32 features the box is scaled in float32, to inf.
    x = np.ones((1, 1, H, W), np.float32)
    boxes = np.array([[0, 3, 2, 3, 3, 10], [0, -3, -2, 3, 3, 10]])
    for convention in CONVENTIONS:
        y = forward(x, boxes, OUT, scale, 0, convention)
        assert not y.any()
        g = backward(np.ones(y.shape, np.float32), boxes, x.shape, scale, 0, convention)
        assert not g.any()


@pytest.mark.parametrize("hw", [(1, 1), (1, 6), (5, 1)], ids=lambda s: "x".join(map(str, s)))
def test_maps_one_pixel_high_or_wide(hw):
    h, w = hw
    rng = np.random.default_rng(14)
    x = rng.standard_normal((1, 2, h, w))
    boxes = np.array([[0, w / 2, h / 2, w, h, 30], [0, 0, 0, 1, 1, 45],
                      [0, w / 2, h / 2, w + 4, h + 4, -100], [0, w, h, 1, 1, 0]])
    for ratio in (0, 2):
        y = forward(x, boxes, OUT, 1.0, ratio)
        assert_close(y, reference.roi_align_rotated(x, boxes, OUT, 1.0, ratio),
                     np.float64)
        g = rng.standard_normal(y.shape)
        assert_close(backward(g, boxes, x.shape, 1.0, ratio),
                     reference.roi_align_rotated_backward(g, boxes, x.shape, OUT, 1.0,
                                                          ratio), np.float64)


def test_kernels_called_with_nothing_to_do_return_cleanly():
    """No boxes, no channels, and (called directly, past the wrapper's
    guard) a map of no pixels."""
    x = np.zeros((1, 4, 6, 6), np.float32)
    boxes = np.array([[0, 3, 3, 4, 4, 30]], np.float32)
    out = np.zeros((1, 4, 2, 2), np.float32)
    grad = np.zeros(x.shape, np.float32)
    for k, c, h, w in ((0, 4, 6, 6), (1, 0, 6, 6), (0, 0, 6, 6), (1, 4, 0, 6),
                       (1, 4, 6, 0)):
        for layout in (0, 1):
            _cpu.launch("roi_align_rotated", "forward", "float32",
                        (x, boxes, k, 1, c, h, w, 2, 2, 1.0, 2, 0, 1, 0, layout, 1, out))
            _cpu.launch("roi_align_rotated", "backward", "float32",
                        (out, boxes, k, 1, c, h, w, 2, 2, 1.0, 2, 1, 1, 0, layout, 1, grad))
    assert not grad.any() and not out.any()


# --------------------------------------------------------------------------
# bounded work on huge boxes
# --------------------------------------------------------------------------
# A box of 1e7 x 1.3e7 pixels with adaptive sampling: about 2e12 samples per
# bin, of which a few hundred land on the 12 x 16 map. Its centre is placed
# so that a corner shared by four bins lies on the map. The kernels must
# return at once; they run in a subprocess with a timeout, so that a hang
# fails rather than blocks.
HUGE_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from curoi import _ops
    spec = json.loads(sys.argv[1])
    out = {}
    for name, case in spec.items():
        x = np.array(case["x"], case["dtype"])
        boxes = np.array(case["boxes"], "float64" if case["dtype"] == "float64"
                         else "float32")
        y = np.zeros(case["out_shape"], case["dtype"])
        g = np.array(case["g"], case["dtype"])
        gx = np.zeros(x.shape, case["dtype"])
        start = time.perf_counter()
        _ops.roi_align_rotated_forward(x, boxes, y, 1.0, 0, case["convention"], True,
                                       False)
        _ops.roi_align_rotated_backward(g, boxes, gx, 1.0, 0, case["convention"], True,
                                        False)
        out[name] = {"seconds": time.perf_counter() - start, "y": y.tolist(),
                     "gx": gx.tolist()}
    print(json.dumps(out))
""")


def _huge_boxes(convention, height, width):
    """Three boxes: the map on a corner of four bins, the map inside one
    bin, and the box beside the map (reads nothing)."""
    rows = []
    for angle_deg, (ty, tx) in [(30.0, (-1 / 14, 1 / 14)), (-110.0, (0.3, -0.2)),
                                (10.0, (0.51, 0.0))]:
        w, h = 1e7, 1.3e7
        yy, xx = ty * h, tx * w  # where the map centre lies in the box
        t = math.radians(angle_deg)
        my, mx = (height - 1) / 2, (width - 1) / 2
        cy = my - (yy * math.cos(t) - xx * math.sin(t))
        cx = mx - (yy * math.sin(t) + xx * math.cos(t))
        angle = angle_deg if convention == "detectron2" else t
        rows.append([0, cx + 0.5, cy + 0.5, w, h, angle])
    return np.array(rows)


@pytest.fixture(scope="module")
def huge_results():
    rng = np.random.default_rng(15)
    x = rng.standard_normal((1, 2, 12, 16))
    spec, inputs = {}, {}
    for convention in CONVENTIONS:
        boxes = _huge_boxes(convention, 12, 16)
        g = rng.standard_normal((len(boxes), 2, 7, 7))
        for dtype in ("float32", "float64"):
            spec[f"{convention}-{dtype}"] = {
                "x": x.tolist(), "boxes": boxes.tolist(), "g": g.tolist(),
                "dtype": dtype, "convention": convention,
                "out_shape": [len(boxes), 2, 7, 7]}
        inputs[convention] = (x, boxes, g)
        # Boxes of 2e20 pixels around the map and beside it: float cannot
        # place their samples at all, but the work must stay bounded.
        absurd = np.array([[0, 7.5, 6.5, 2e20, 2e20, 70.0], [0, 1e19, -3e19, 1e20, 1e20, 45],
                           [0, 7.5, 6.5, 2e20, 3.0, 0.0], [0, 7.5, 6.5, 1e29, 1e29, 30]])
        if convention == "mmcv":
            absurd[:, 5] = np.radians(absurd[:, 5])
        for dtype in ("float32", "float64"):
            spec[f"{convention}-{dtype}-absurd"] = {
                "x": x.tolist(), "boxes": absurd.tolist(), "g": np.ones((4, 2, 7, 7)).tolist(),
                "dtype": dtype, "convention": convention, "out_shape": [4, 2, 7, 7]}
        inputs[convention + "-absurd"] = (x, absurd, None)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    try:
        done = subprocess.run([sys.executable, "-c", HUGE_SCRIPT, json.dumps(spec)],
                              capture_output=True, text=True, timeout=120, env=env,
                              cwd=str(REPO))
    except subprocess.TimeoutExpired:
        pytest.fail("rotated RoI Align on a 1e7-pixel box did not finish in 120 s")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), inputs


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_huge_box_returns_at_once(huge_results, convention):
    results, inputs = huge_results
    for dtype in ("float32", "float64"):
        for case in ("", "-absurd"):
            r = results[f"{convention}-{dtype}{case}"]
            assert r["seconds"] < 10, (dtype, case, r["seconds"])
    x = inputs[convention][0]
    for dtype in ("float32", "float64"):
        r = results[f"{convention}-{dtype}-absurd"]
        assert_average_bounds(np.array(r["y"]), x)
        gx = np.array(r["gx"])
        assert np.isfinite(gx).all() and (gx >= 0).all() and gx.sum() <= 4 * 2 * 49


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_huge_box_against_the_clipped_reference(huge_results, convention):
    results, inputs = huge_results
    x, boxes, g = inputs[convention]
    r = results[f"{convention}-float64"]
    y, gx = np.array(r["y"]), np.array(r["gx"])
    expected = reference.roi_align_rotated(x, boxes, 7, 1.0, 0, convention, clip=True)
    # The map sits on four bins of the first box, in one of the second, in
    # none of the third.
    touched = (np.abs(expected).max(axis=1) > 0).sum(axis=(1, 2))
    assert touched.tolist() == [4, 1, 0]
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-20)
    want = reference.roi_align_rotated_backward(g, boxes, x.shape, 7, 1.0, 0,
                                                convention, clip=True)
    np.testing.assert_allclose(gx, want, rtol=1e-12, atol=1e-20)
    # float32 cannot place a sample on the map to better than a pixel here:
    # the same bins, and averages within bounds.
    r32 = results[f"{convention}-float32"]
    y32 = np.array(r32["y"])
    assert ((np.abs(y32).max(axis=1) > 0) == (np.abs(expected).max(axis=1) > 0)).all()
    assert_average_bounds(y32, x)
    gx32 = np.array(r32["gx"])
    assert np.isfinite(gx32).all()
    assert np.abs(gx32).sum() <= np.abs(g).sum()

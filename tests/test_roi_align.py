"""Correctness of curoi.roi_align and curoi.roi_align_backward on the CPU.

Expected values come from hand computation, from the independent NumPy
reference in tests/reference.py (written from DESIGN.md section 3, not from
the kernels) and from finite differences; never from curoi itself, except
where a test checks a stated property that relates two curoi results (half
precision equals the float32 computation rounded).
"""


import numpy as np
import pytest

import curoi

import reference as ref

ml_dtypes = pytest.importorskip("ml_dtypes")

TOL = {np.float64: dict(rtol=1e-10, atol=1e-12),
       np.float32: dict(rtol=1e-5, atol=1e-5)}


def _pair(o):
    return (o, o) if isinstance(o, int) else o


# --------------------------------------------------------------------------
# hand-computed cases
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3, 0, -1])
def test_constant_map(dtype, aligned, sampling_ratio):
    """Bilinear weights sum to 1, so every sample inside [-1, H] x [-1, W]
    reads the constant, and the average of equal values is that value."""
    value = 3.25
    x = np.full((2, 3, 9, 11), value, dtype)
    # Boxes (in image coordinates, spatial_scale 0.5) whose samples all lie
    # within [-1, H] x [-1, W] of the 9 x 11 feature map, i.e. [-2, 18] x
    # [-2, 22] here; some reach past the map edge where clamping/edge
    # values still read the constant. All have positive extent >= 1 pixel so
    # that the adaptive grid is never empty.
    boxes = np.array([
        [0, 0.0, 0.0, 21.0, 17.0],
        [1, 3.3, 2.2, 9.9, 12.7],
        [0, -1.0, -1.0, 4.0, 3.0],     # reaches left/top of the map
        [1, 15.0, 10.0, 21.5, 17.5],   # reaches right/bottom of the map
        [1, 7.0, 7.0, 9.0, 9.5],
    ], dtype)
    y = curoi.roi_align(x, boxes, (3, 2), spatial_scale=0.5,
                        sampling_ratio=sampling_ratio, aligned=aligned)
    assert y.dtype == dtype and y.shape == (5, 3, 3, 2)
    np.testing.assert_allclose(y, value, rtol=1e-6 if dtype == np.float32
                               else 1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_of_range_samples_count_in_divisor(dtype):
    """A sample outside [-1, W] gives 0 but still counts in the divisor.

    8 x 8 map of 2.0, box x in [-4, 4], y in [2, 5], not aligned, 1 x 1 bin.
    sampling_ratio=2: x samples at -4 + (i + 0.5) * 8 / 2 = -2 (out), 2 (in);
    y samples at 2.75, 4.25 (in). 2 of 4 samples read 2.0 -> 2.0 * 2 / 4 = 1.
    Adaptive: grid_w = ceil(8 / 1) = 8, x samples at -3.5, -2.5, ..., 3.5, of
    which -3.5, -2.5, -1.5 are below -1 (out) and -0.5 clamps to 0 (in): 5 of
    8 columns; grid_h = ceil(3) = 3, all rows in -> 2.0 * 15 / 24 = 1.25.
    """
    x = np.full((1, 1, 8, 8), 2.0, dtype)
    boxes = np.array([[0, -4.0, 2.0, 4.0, 5.0]], dtype)
    y2 = curoi.roi_align(x, boxes, 1, sampling_ratio=2)
    ya = curoi.roi_align(x, boxes, 1, sampling_ratio=-1)
    np.testing.assert_allclose(y2.ravel(), [1.0], rtol=1e-6)
    np.testing.assert_allclose(ya.ravel(), [1.25], rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_of_range_boundaries(dtype):
    """The cut-off is y < -1 and y > H (strict): a sample exactly at -1 or H
    still reads the edge value; one just past it reads 0. 8 x 8 map of 5.0,
    not aligned, one sample per bin (sampling_ratio=1, at the box centre
    when the box is at least a pixel wide)."""
    x = np.full((1, 1, 8, 8), 5.0, dtype)
    boxes = np.array([
        [0, 3.0, 7.5, 4.0, 8.5],    # centre y = 8.0 = H: edge value
        [0, 3.0, 7.5, 4.0, 8.75],   # centre y = 8.125 > H: 0
        [0, 3.0, -1.5, 4.0, -0.5],  # centre y = -1.0: clamped to row 0
        [0, 3.0, -1.75, 4.0, -0.5],  # centre y = -1.125 < -1: 0
        [0, 7.5, 3.0, 8.5, 4.0],    # centre x = 8.0 = W: edge value
        [0, -1.75, 3.0, -0.5, 4.0],  # centre x = -1.125: 0
    ], dtype)
    y = curoi.roi_align(x, boxes, 1, sampling_ratio=1)
    np.testing.assert_allclose(y.ravel(), [5, 0, 5, 0, 5, 0], rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_size_box_aligned_vs_not(dtype):
    """x1 == x2, y1 == y2. Not aligned: the box is widened to 1 x 1 pixels,
    so a constant map gives the constant. Aligned: width 0, so the adaptive
    grid is ceil(0 / PW) = 0 samples and the output is 0 (divisor max(0, 1));
    a fixed grid samples the single point repeatedly and gives the constant.
    """
    x = np.full((1, 1, 6, 6), 7.0, dtype)
    boxes = np.array([[0, 3.0, 2.0, 3.0, 2.0]], dtype)
    kw = dict(output_size=2)
    np.testing.assert_allclose(
        curoi.roi_align(x, boxes, sampling_ratio=-1, aligned=False, **kw), 7.0,
        rtol=1e-6)
    np.testing.assert_allclose(
        curoi.roi_align(x, boxes, sampling_ratio=2, aligned=False, **kw), 7.0,
        rtol=1e-6)
    np.testing.assert_array_equal(
        curoi.roi_align(x, boxes, sampling_ratio=-1, aligned=True, **kw), 0.0)
    np.testing.assert_allclose(
        curoi.roi_align(x, boxes, sampling_ratio=2, aligned=True, **kw), 7.0,
        rtol=1e-6)


# A ramp f(y, x) = A*y + B*x + D*x*y + C sampled at integer pixels (linear
# plus a bilinear term, so that the corner weights are all exercised).
# Bilinear interpolation reproduces such a function exactly inside
# [0, H-1] x [0, W-1]. The sample grid of a bin is a product of rows and
# columns each symmetric about the bin centre, so mean(y) = centre_y,
# mean(x) = centre_x and mean(x*y) = centre_x * centre_y: the bin average is
# f at the bin centre, whatever the grid:
#   centre_y = start_h + (ph + 0.5) * bin_h, with
#   start_h = y1*s - (0.5 if aligned else 0),
#   bin_h = roi_h / PH, roi_h = (y2 - y1)*s, or max(roi_h, 1) if not aligned.
RAMP_A, RAMP_B, RAMP_C, RAMP_D = 0.75, -0.3125, 2.0, 0.0625
RAMP_H, RAMP_W = 12, 16


def _ramp(dtype, n=2, c=2):
    yy, xx = np.meshgrid(np.arange(RAMP_H), np.arange(RAMP_W), indexing="ij")
    plane = RAMP_A * yy + RAMP_B * xx + RAMP_D * xx * yy + RAMP_C
    x = np.empty((n, c, RAMP_H, RAMP_W))
    for i in range(n):
        for j in range(c):
            # different affine copies per image/channel to catch mix-ups
            x[i, j] = (i + 1) * plane + 10 * j
    return x.astype(dtype)


def _ramp_expected(box, output_size, s, aligned, n, c):
    ph_n, pw_n = output_size
    off = 0.5 if aligned else 0.0
    _, x1, y1, x2, y2 = box
    start_h, start_w = y1 * s - off, x1 * s - off
    roi_h, roi_w = (y2 - y1) * s, (x2 - x1) * s
    if not aligned:
        roi_h, roi_w = max(roi_h, 1.0), max(roi_w, 1.0)
    # Guard on the test data itself: every sample of the box must lie in the
    # region where bilinear interpolation of the ramp is exact.
    assert 0 <= start_h and start_h + roi_h <= RAMP_H - 1
    assert 0 <= start_w and start_w + roi_w <= RAMP_W - 1
    out = np.empty((c, ph_n, pw_n))
    for ph in range(ph_n):
        for pw in range(pw_n):
            cy = start_h + (ph + 0.5) * roi_h / ph_n
            cx = start_w + (pw + 0.5) * roi_w / pw_n
            f = RAMP_A * cy + RAMP_B * cx + RAMP_D * cx * cy + RAMP_C
            for j in range(c):
                out[j, ph, pw] = (n + 1) * f + 10 * j
    return out


RAMP_BOXES = {
    # spatial_scale -> boxes (batch, x1, y1, x2, y2) in image coordinates
    1.0: [[0, 1.0, 1.0, 13.0, 9.0], [1, 2.3, 0.7, 9.1, 3.4],
          [0, 4.2, 5.5, 4.6, 5.9],     # smaller than a pixel
          [1, 6.0, 2.0, 6.0, 2.0]],    # zero size
    0.5: [[1, 2.0, 2.0, 28.0, 20.0], [0, 7.5, 3.25, 11.0, 17.0]],
    0.25: [[0, 4.0, 4.0, 56.0, 40.0], [1, 13.0, 9.0, 27.0, 30.0]],
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 4, -1])
@pytest.mark.parametrize("scale", sorted(RAMP_BOXES))
@pytest.mark.parametrize("output_size", [(1, 1), (2, 3), (3, 2)])
def test_linear_ramp(dtype, aligned, sampling_ratio, scale, output_size):
    x = _ramp(dtype)
    boxes = np.array(RAMP_BOXES[scale], dtype)
    if aligned and sampling_ratio <= 0:
        # aligned zero-size boxes have an empty adaptive grid (output 0),
        # tested in test_zero_size_box_aligned_vs_not
        positive = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 4] > boxes[:, 2])
        boxes = boxes[positive]
    y = curoi.roi_align(x, boxes, output_size, spatial_scale=scale,
                        sampling_ratio=sampling_ratio, aligned=aligned)
    for k, box in enumerate(boxes.astype(np.float64)):
        exp = _ramp_expected(box, output_size, scale, aligned, int(box[0]),
                             x.shape[1])
        np.testing.assert_allclose(
            y[k], exp, rtol=1e-5 if dtype == np.float32 else 1e-12,
            atol=1e-4 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("aligned", [False, True])
def test_linear_ramp_edge_clamp(aligned):
    """Samples in [H-1, H] use the last row; samples in [-1, 0] use row 0.

    Not aligned: box rows 11.2..11.9 on the 12-row ramp are widened to
    11.2..12.2 (roi_h = max(0.7, 1)), and with sampling_ratio=2 the sample
    rows 11.45 and 11.95 both read row 11 (the edge value).
    Aligned: box rows -0.6..0.2 are -1.1..-0.3 in pixels, sample rows -0.9
    and -0.5 lie in [-1, 0] and are clamped to row 0.
    Columns stay inside the map, so the expected value is
    f(row used, centre x), computed by hand.
    """
    x = _ramp(np.float64, n=1, c=1)
    s = 1.0
    if not aligned:
        box = [0, 2.0, 11.2, 6.0, 11.9]
        # y samples: 11.2 + 0.25 = 11.45 and 11.2 + 0.75 = 11.95 -> row 11
        rows = [11.0, 11.0]
    else:
        box = [0, 2.0, -0.6, 6.0, 0.2]
        # start -1.1, roi 0.8: y samples -1.1 + 0.2 = -0.9 and -1.1 + 0.6 =
        # -0.5, both in [-1, 0] -> clamped to row 0
        rows = [0.0, 0.0]
    y = curoi.roi_align(x, np.array([box]), (1, 2), spatial_scale=s,
                        sampling_ratio=2, aligned=aligned)
    off = 0.5 if aligned else 0.0
    exp = []
    for pw in range(2):
        cx = box[1] - off + (pw + 0.5) * (box[3] - box[1]) / 2
        exp.append(np.mean([RAMP_A * r + RAMP_D * r * cx for r in rows])
                   + RAMP_B * cx + RAMP_C)
    np.testing.assert_allclose(y.ravel(), exp, rtol=1e-12)


# --------------------------------------------------------------------------
# random cases against the reference
# --------------------------------------------------------------------------

SCALES = [1.0, 0.5, 0.25, 1.0 / 3.0]
OUTPUT_SIZES = [1, 2, (2, 3), (3, 1), (4, 4)]


def _random_case(seed, dtype, n_max=2, c_max=3, hw_max=16, k_max=6):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, n_max + 1))
    c = int(rng.integers(1, c_max + 1))
    h = int(rng.integers(1, hw_max + 1))
    w = int(rng.integers(1, hw_max + 1))
    if rng.random() < 0.8:   # mostly non-trivial maps; sometimes 1-wide
        h, w = max(h, 4), max(w, 4)
    k = int(rng.integers(1, k_max + 1))
    scale = SCALES[rng.integers(len(SCALES))]
    output_size = OUTPUT_SIZES[rng.integers(len(OUTPUT_SIZES))]
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    boxes = ref.random_boxes(rng, n, h, w, scale, k, dtype=dtype)
    ref.spoil_boxes(rng, boxes, n)   # sometimes one invalid box
    return rng, x, boxes, scale, output_size


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("seed", range(8))
def test_forward_backward_vs_reference(dtype, aligned, sampling_ratio, seed):
    rng, x, boxes, scale, output_size = _random_case(
        1000 * seed + 10 * (sampling_ratio + 1) + aligned, dtype)
    args = (output_size, scale, sampling_ratio, aligned)
    y = curoi.roi_align(x, boxes, *args)
    y_ref = ref.roi_align(x, boxes, *args)
    assert y.dtype == dtype
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, **TOL[dtype])

    g = rng.standard_normal(y.shape).astype(dtype)
    gx = curoi.roi_align_backward(g, boxes, x.shape, *args)
    gx_ref = ref.roi_align_backward(g, boxes, x.shape, *args)
    assert gx.dtype == dtype and gx.shape == x.shape
    np.testing.assert_allclose(gx, gx_ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("aligned", [False, True])
def test_invalid_boxes_give_zero_and_no_gradient(dtype, aligned):
    """Boxes with a batch index outside [0, N) or not finite, or with a
    non-finite coordinate: output 0, no gradient, no effect on valid boxes."""
    rng = np.random.default_rng(7)
    n, c, h, w = 2, 2, 9, 10
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    nan, inf = np.nan, np.inf
    boxes = np.array([
        [0, 1.0, 1.0, 6.0, 7.0],       # valid
        [2, 1.0, 1.0, 6.0, 7.0],       # index == N
        [-1, 1.0, 1.0, 6.0, 7.0],      # negative index
        [1e9, 1.0, 1.0, 6.0, 7.0],     # far out of range
        [nan, 1.0, 1.0, 6.0, 7.0],     # NaN index
        [inf, 1.0, 1.0, 6.0, 7.0],     # infinite index
        [-inf, 1.0, 1.0, 6.0, 7.0],
        [1, nan, 1.0, 6.0, 7.0],       # NaN coordinates
        [1, 1.0, 1.0, 6.0, nan],
        [0, 1.0, inf, 6.0, 7.0],       # infinite coordinates
        [0, -inf, 1.0, inf, 7.0],
        [1, 2.5, 0.5, 8.0, 8.5],       # valid
    ], dtype)
    valid = np.zeros(len(boxes), bool)
    valid[[0, -1]] = True
    for sr in (2, -1):
        args = ((3, 2), 1.0, sr, aligned)
        y = curoi.roi_align(x, boxes, *args)
        np.testing.assert_array_equal(y[~valid], 0.0)
        np.testing.assert_allclose(y, ref.roi_align(x, boxes, *args),
                                   **TOL[dtype])
        g = rng.standard_normal(y.shape).astype(dtype)
        gx = curoi.roi_align_backward(g, boxes, x.shape, *args)
        # the gradient is that of the valid boxes alone (all finite)
        gx_valid = ref.roi_align_backward(g[valid], boxes[valid], x.shape,
                                          *args)
        assert np.all(np.isfinite(gx))
        np.testing.assert_allclose(gx, gx_valid, **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_list_of_boxes_equals_k5(dtype):
    rng = np.random.default_rng(11)
    n, c, h, w = 3, 2, 10, 12
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    per_image = [ref.random_boxes(rng, 1, h, w, 0.5, L, dtype=dtype)[:, 1:]
                 for L in (2, 0, 3)]
    k5 = np.concatenate([
        np.concatenate([np.full((len(b), 1), i, dtype), b], axis=1)
        for i, b in enumerate(per_image)])
    args = ((2, 2), 0.5, 2, True)
    y_list = curoi.roi_align(x, per_image, *args)
    y_k5 = curoi.roi_align(x, k5, *args)
    np.testing.assert_array_equal(y_list, y_k5)
    np.testing.assert_allclose(y_k5, ref.roi_align(x, k5, *args), **TOL[dtype])
    g = rng.standard_normal(y_k5.shape).astype(dtype)
    np.testing.assert_allclose(
        curoi.roi_align_backward(g, per_image, x.shape, *args),
        ref.roi_align_backward(g, k5, x.shape, *args), **TOL[dtype])


# --------------------------------------------------------------------------
# half precision on the CPU
# --------------------------------------------------------------------------

HALF = {
    "float16": (np.float16, 2.0 ** -10),
    "bfloat16": (ml_dtypes.bfloat16, 2.0 ** -7),
}


@pytest.mark.parametrize("name", sorted(HALF))
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_half_precision(name, aligned, seed):
    """Half inputs are computed in float32 and rounded once to the input
    dtype. Boxes stay float32. Checked two ways: bit-equal to curoi's own
    float32 result rounded (the documented contract), and within one half
    ulp (relative) of the float64 reference rounded the same way."""
    half, ulp = HALF[name]
    rng, x32, boxes, scale, output_size = _random_case(500 + seed,
                                                       np.float32)
    x = x32.astype(half)
    xf = x.astype(np.float32)        # the exact values the half map holds
    args = (output_size, scale, 2 if seed % 2 else -1, aligned)

    y = curoi.roi_align(x, boxes, *args)
    assert y.dtype == half and y.shape == (len(boxes), x.shape[1],
                                           *_pair(output_size))
    np.testing.assert_array_equal(
        y.astype(np.float32),
        curoi.roi_align(xf, boxes, *args).astype(half).astype(np.float32))
    y_ref = ref.roi_align(xf, boxes, *args).astype(np.float32).astype(half)
    np.testing.assert_allclose(y.astype(np.float64), y_ref.astype(np.float64),
                               rtol=ulp, atol=1e-4)

    g = rng.standard_normal(y.shape).astype(half)
    gx = curoi.roi_align_backward(g, boxes, x.shape, *args)
    assert gx.dtype == half and gx.shape == x.shape
    gx_ref = ref.roi_align_backward(g.astype(np.float32), boxes, x.shape,
                                    *args).astype(np.float32).astype(half)
    np.testing.assert_allclose(gx.astype(np.float64),
                               gx_ref.astype(np.float64), rtol=ulp, atol=1e-4)


# --------------------------------------------------------------------------
# gradients by finite differences
# --------------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_backward_matches_finite_differences(aligned, sampling_ratio):
    """Vector-Jacobian product against central differences, element by
    element, in float64. Random continuous boxes keep every sample away from
    the out-of-range cut-offs, so the forward is smooth (in fact linear) in
    the input around the evaluation point."""
    rng = np.random.default_rng(42 + sampling_ratio + 10 * aligned)
    n, c, h, w = 2, 2, 6, 7
    x = rng.standard_normal((n, c, h, w))
    boxes = ref.random_boxes(rng, n, h, w, 0.5, 4,
                             kinds=("inside", "partly_out", "tiny"))
    args = ((2, 3), 0.5, sampling_ratio, aligned)
    g = rng.standard_normal((len(boxes), c, 2, 3))
    gx = curoi.roi_align_backward(g, boxes, x.shape, *args)

    eps = 1e-3
    fd = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        xp = x.copy()
        xp[idx] += eps
        xm = x.copy()
        xm[idx] -= eps
        fp = np.sum(g * curoi.roi_align(xp, boxes, *args))
        fm = np.sum(g * curoi.roi_align(xm, boxes, *args))
        fd[idx] = (fp - fm) / (2 * eps)
    np.testing.assert_allclose(gx, fd, rtol=1e-7, atol=1e-9)
    # and the gradient is not trivially zero
    assert np.abs(gx).max() > 0.1


# --------------------------------------------------------------------------
# empty input
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16,
                                   ml_dtypes.bfloat16])
def test_no_boxes(dtype):
    x = np.ones((2, 3, 5, 6), dtype)
    for boxes in (np.zeros((0, 5), np.float32), [np.zeros((0, 4))] * 2):
        y = curoi.roi_align(x, boxes, (2, 4), sampling_ratio=2)
        assert y.shape == (0, 3, 2, 4)
        assert y.dtype == dtype
    gx = curoi.roi_align_backward(np.zeros((0, 3, 2, 4), dtype),
                                  np.zeros((0, 5), np.float32), x.shape,
                                  (2, 4), sampling_ratio=2)
    assert gx.shape == x.shape and gx.dtype == dtype
    np.testing.assert_array_equal(gx.astype(np.float64), 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("many", [False, True], ids=["few boxes", "many boxes"])
def test_cpu_backward_paths_vs_reference(dtype, sampling_ratio, many):
    """The CPU's NCHW backward adds into the planes channel by channel with
    few boxes, and into a channels-last copy of 8 channels at a time once
    the boxes' bins outnumber the pixels. Both, with 11 channels (a partial
    block), against the reference; the same bits at 1 and 3 threads and as
    the NHWC backward's, transposed."""
    rng = np.random.default_rng(50 + 2 * many + sampling_ratio)
    n, c, h, w = 2, 11, 9, 12
    # 40 boxes x 9 bins > 2 x 9 x 12 pixels > 3 boxes x 9 bins
    k = 40 if many else 3
    boxes = ref.random_boxes(rng, n, h, w, 0.5, k, dtype=dtype)
    ref.spoil_boxes(rng, boxes, n, probability=1.0)
    args = (3, 0.5, sampling_ratio, True)
    g = rng.standard_normal((k, c, 3, 3)).astype(dtype)
    gx_ref = ref.roi_align_backward(g, boxes, (n, c, h, w), *args)
    to_nhwc = lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))  # noqa: E731
    before = curoi.get_num_threads()
    results = []
    try:
        for threads in (1, 3):
            curoi.set_num_threads(threads)
            gx = curoi.roi_align_backward(g, boxes, (n, c, h, w), *args)
            np.testing.assert_allclose(gx, gx_ref, **TOL[dtype])
            gxn = curoi.roi_align_backward(to_nhwc(g), boxes, (n, h, w, c), *args,
                                           data_format="NHWC")
            assert to_nhwc(gx).tobytes() == gxn.tobytes()
            results.append(gx)
    finally:
        curoi.set_num_threads(before)
    assert results[0].tobytes() == results[1].tobytes()

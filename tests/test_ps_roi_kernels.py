"""Position-sensitive RoI Pool and RoI Align (R-FCN; torchvision's
ps_roi_pool and ps_roi_align), at the kernel level: curoi._ops on the CPU
(and, from test_gpu_loops.py, with the GPU's loop code; from
test_sanitizers.py, under AddressSanitizer and UndefinedBehaviorSanitizer, so
this file imports only NumPy, curoi and the references).

The input has C = C_out * PH * PW channels and output channel c reads, in bin
(ph, pw), input channel (c * PH + ph) * PW + pw. Expected values come from
hand computation, from the independent NumPy reference in tests/reference.py
(written from torchvision's formulas, not from the kernels) and from finite
differences; relations between two curoi results (layouts, thread counts,
the two backward sums) are checked as the properties they are.
"""

import numpy as np
import pytest

import curoi
import reference as ref
from curoi import _cpu, _ops
from test_adversarial import EXTREME, HUGE, UNUSABLE, ZOO

# float64 differs from the float64 reference only by summation order;
# float32 also by computing box and sample coordinates in float32.
TOL = {np.float64: dict(rtol=1e-12, atol=1e-12),
       np.float32: dict(rtol=1e-5, atol=1e-5)}
DTYPES = (np.float32, np.float64)


# ------------------------------------------------------------------ helpers
def _pair(o):
    return (o, o) if isinstance(o, int) else tuple(o)


def _rois(boxes, dtype):
    """Boxes in the accumulation dtype, as the kernels take them."""
    acc = np.float64 if dtype == np.float64 else np.float32
    return np.ascontiguousarray(np.asarray(boxes, np.float64).reshape(-1, 5), acc)


def _nhwc(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def _nchw(a):
    return np.ascontiguousarray(np.moveaxis(a, -1, 1))


def pool(x, boxes, output_size, scale=1.0, channels_last=False):
    """ps_roi_pool forward of NCHW x; NCHW result whatever the layout run."""
    ph, pw = _pair(output_size)
    k, c_out = len(boxes), x.shape[1] // (ph * pw)
    xs = _nhwc(x) if channels_last else np.ascontiguousarray(x)
    out = np.full((k, ph, pw, c_out) if channels_last else (k, c_out, ph, pw),
                  np.nan, x.dtype)
    _ops.ps_roi_pool_forward(xs, _rois(boxes, x.dtype), out, scale,
                             channels_last=channels_last)
    return _nchw(out) if channels_last else out


def pool_backward(g, boxes, shape, scale=1.0, deterministic=False,
                  channels_last=False):
    gs = _nhwc(g) if channels_last else np.ascontiguousarray(g)
    n, c, h, w = shape
    gx = np.full((n, h, w, c) if channels_last else (n, c, h, w), np.nan, g.dtype)
    _ops.ps_roi_pool_backward(gs, _rois(boxes, g.dtype), gx, scale,
                              deterministic=deterministic,
                              channels_last=channels_last)
    return _nchw(gx) if channels_last else gx


def align(x, boxes, output_size, scale=1.0, ratio=-1, channels_last=False):
    ph, pw = _pair(output_size)
    k, c_out = len(boxes), x.shape[1] // (ph * pw)
    xs = _nhwc(x) if channels_last else np.ascontiguousarray(x)
    out = np.full((k, ph, pw, c_out) if channels_last else (k, c_out, ph, pw),
                  np.nan, x.dtype)
    _ops.ps_roi_align_forward(xs, _rois(boxes, x.dtype), out, scale, ratio,
                              channels_last=channels_last)
    return _nchw(out) if channels_last else out


def align_backward(g, boxes, shape, scale=1.0, ratio=-1, deterministic=False,
                   channels_last=False):
    gs = _nhwc(g) if channels_last else np.ascontiguousarray(g)
    n, c, h, w = shape
    gx = np.full((n, h, w, c) if channels_last else (n, c, h, w), np.nan, g.dtype)
    _ops.ps_roi_align_backward(gs, _rois(boxes, g.dtype), gx, scale, ratio,
                               deterministic=deterministic,
                               channels_last=channels_last)
    return _nchw(gx) if channels_last else gx


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint32 if a.dtype.itemsize == 4 else np.uint64)


def _random_case(seed, dtype, k_max=8, hw_max=14):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3))
    ph, pw = ((1, 1), (2, 2), (2, 3), (3, 1), (3, 3))[rng.integers(5)]
    c = int(rng.integers(1, 4)) * ph * pw
    h, w = (int(v) for v in rng.integers(1, hw_max + 1, 2))
    if rng.random() < 0.8:  # mostly non-trivial maps; sometimes 1-wide
        h, w = max(h, 4), max(w, 4)
    scale = (1.0, 0.5, 0.25, 1 / 3)[rng.integers(4)]
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    boxes = ref.random_boxes(rng, n, h, w, scale, int(rng.integers(1, k_max + 1)))
    ref.spoil_boxes(rng, boxes, n)  # sometimes one unusable box
    return rng, x, boxes, scale, (ph, pw)


@pytest.fixture
def restore_threads():
    before = curoi.get_num_threads()
    yield
    curoi.set_num_threads(before)


# ------------------------------------------------------- hand computations
def _channel_ramp(n, c, h, w):
    """Pixel (h, w) of channel ci of image b holds 1000*b + 100*ci + 10*h + w
    (exact in float32): a value names its own position."""
    b, ci, hh, ww = np.meshgrid(*(np.arange(v) for v in (n, c, h, w)), indexing="ij")
    return (1000.0 * b + 100.0 * ci + 10.0 * hh + ww)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ps_roi_pool_by_hand(dtype, channels_last):
    # 2 output channels x 2 x 2 bins = 8 input channels, a 5 x 6 map.
    x = _channel_ramp(2, 8, 5, 6).astype(dtype)
    boxes = [
        # x: start 0, end 5, size 5, bins 2.5: columns [0, 3) and [2, 5);
        # y: start 0, end 4, size 4, bins 2: rows [0, 2) and [2, 4).
        [1, 0.0, 0.0, 5.0, 4.0],
        # The whole map: x size 6, bins [0, 3) and [3, 6) -> [3, 5) once the
        # end is clipped to W-1 = 5; y size 5, bins 2.5: rows [0, 3) and
        # [2, 5) -> [2, 4). The last row and column are never read.
        [0, 0.0, 0.0, 6.0, 5.0],
        # Corners round halves away from zero: x 2.5 -> 3, 3.5 -> 4 (size 1,
        # bins 0.5: [3, 4) and [3, 4)); y 0.5 -> 1, 1.49 -> 1 (size 0 -> 1:
        # rows [1, 2) twice). spatial_scale 0.5 of twice the corners.
        [0, 5.0, 1.0, 7.0, 2.98],
    ]
    scales = [1.0, 1.0, 0.5]
    # Per box, the bins' (rows, columns), from the comments above.
    bins = [
        {(0, 0): ((0, 2), (0, 3)), (0, 1): ((0, 2), (2, 5)),
         (1, 0): ((2, 4), (0, 3)), (1, 1): ((2, 4), (2, 5))},
        {(0, 0): ((0, 3), (0, 3)), (0, 1): ((0, 3), (3, 5)),
         (1, 0): ((2, 4), (0, 3)), (1, 1): ((2, 4), (3, 5))},
        {(0, 0): ((1, 2), (3, 4)), (0, 1): ((1, 2), (3, 4)),
         (1, 0): ((1, 2), (3, 4)), (1, 1): ((1, 2), (3, 4))},
    ]
    for k, (box, scale) in enumerate(zip(boxes, scales)):
        y = pool(x, [box], 2, scale, channels_last)
        b = int(box[0])
        for c in range(2):
            for (ph, pw), ((h0, h1), (w0, w1)) in bins[k].items():
                ci = (c * 2 + ph) * 2 + pw
                # The mean of 10*h + w over the bin is 10*mean(h) + mean(w).
                want = (1000 * b + 100 * ci + 10 * (h0 + h1 - 1) / 2
                        + (w0 + w1 - 1) / 2)
                assert y[0, c, ph, pw] == want, (k, c, ph, pw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ps_roi_pool_never_reads_the_last_row_and_column(dtype):
    # torchvision clips bin ends to H-1 and W-1 (exclusive): poisoning the
    # last row and column changes no output, and they get no gradient.
    x = np.ones((1, 4, 6, 7), dtype)
    x[:, :, -1, :] = 1e6
    x[:, :, :, -1] = 1e6
    boxes = [[0, 0, 0, 7, 6], [0, 2, 1, 8, 8], [0, 6, 5, 6, 5]]
    y = pool(x, boxes, 2)
    np.testing.assert_array_equal(y[:2], 1.0)
    # The box at the far corner: every bin starts at the clipped W-1/H-1 and
    # is empty.
    np.testing.assert_array_equal(y[2], 0.0)
    gx = pool_backward(np.ones(y.shape, dtype), boxes, x.shape)
    assert not gx[:, :, -1, :].any() and not gx[:, :, :, -1].any()
    assert gx.sum() == pytest.approx(8.0)  # 2 boxes x 4 bins read something


@pytest.mark.parametrize("dtype", DTYPES)
def test_ps_roi_pool_on_a_one_pixel_high_map_is_empty(dtype):
    # H = 1: rows are clipped to [0, 0], so every bin is empty (0).
    x = np.ones((1, 4, 1, 5), dtype)
    y = pool(x, [[0, 0, 0, 5, 1], [0, -3, -3, 9, 9]], 2)
    np.testing.assert_array_equal(y, 0.0)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("ratio", [1, 2, 0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ps_roi_align_reads_its_own_channel_per_bin(dtype, ratio, channels_last):
    # Each input channel a constant: every bin of a box whose samples all lie
    # on the map returns exactly the constant of the channel it reads.
    n, c_out, ph, pw = 2, 3, 2, 3
    c = c_out * ph * pw
    x = np.broadcast_to((7.0 * np.arange(c) - 20.0)[None, :, None, None],
                        (n, c, 8, 9)).astype(dtype)
    # aligned: the box spans x1 - 0.5 .. x2 - 0.5 in pixels.
    # The last box is 0.2 x 0.1 pixels: an adaptive grid of one sample.
    boxes = [[0, 0.5, 0.5, 8.5, 7.5], [1, 2.2, 1.3, 6.9, 5.1], [1, 4.0, 3.0, 4.2, 3.1]]
    y = align(x, boxes, (ph, pw), 1.0, ratio, channels_last)
    for k in range(len(boxes)):
        for co in range(c_out):
            for i in range(ph):
                for j in range(pw):
                    want = 7.0 * ((co * ph + i) * pw + j) - 20.0
                    np.testing.assert_allclose(y[k, co, i, j], want,
                                               rtol=1e-6 if dtype == np.float32 else 1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ps_roi_align_by_hand(dtype):
    """One bin, 2 x 2 samples (sampling_ratio 2), a map x[h, w] = 10*h + w.
    Box (1, 2)-(5, 4) shifted by -0.5: x from 0.5 to 4.5 (samples 1.5, 3.5),
    y from 1.5 to 3.5 (samples 2.0, 3.0); bilinear reproduces the ramp, so
    the mean is 10 * 2.5 + 2.5 = 27.5. A box twice as wide to the left
    (x from -3.5 to 4.5: samples -1.5, off the map, and 2.5): the sample off
    the map adds 0 but counts, (10*2.5 + 2.5) / 2 = 13.75."""
    x = (10.0 * np.arange(6)[:, None] + np.arange(7)[None, :])[None, None].astype(dtype)
    y = align(x, [[0, 1, 2, 5, 4], [0, -3, 2, 5, 4]], 1, 1.0, 2)
    np.testing.assert_allclose(y.ravel(), [27.5, 13.75], rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ps_roi_align_empty_box_adaptive_gives_zero(dtype):
    # x1 == x2: adaptive grid ceil(0 / PW) = 0 samples. torchvision divides
    # 0 by 0 (NaN); curoi gives 0 and no gradient. A fixed grid samples the
    # single point and reads the constant.
    x = np.full((1, 4, 6, 6), 5.0, dtype)
    box = [[0, 3.0, 2.0, 3.0, 2.0]]
    np.testing.assert_array_equal(align(x, box, 2, 1.0, 0), 0.0)
    np.testing.assert_allclose(align(x, box, 2, 1.0, 2), 5.0, rtol=1e-6)
    gx = align_backward(np.ones((1, 1, 2, 2), dtype), box, x.shape, 1.0, 0)
    np.testing.assert_array_equal(gx, 0.0)


# ---------------------------------------------------- against the reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(10))
def test_ps_roi_pool_matches_the_reference(dtype, seed):
    rng, x, boxes, scale, out = _random_case(100 + seed, dtype)
    y = pool(x, boxes, out, scale)
    y_ref = ref.ps_roi_pool(x, boxes, out, scale)
    assert y.shape == y_ref.shape and y.dtype == dtype
    np.testing.assert_allclose(y, y_ref, **TOL[dtype])
    g = rng.standard_normal(y.shape).astype(dtype)
    gx = pool_backward(g, boxes, x.shape, scale)
    np.testing.assert_allclose(gx, ref.ps_roi_pool_backward(g, boxes, x.shape, out, scale),
                               **TOL[dtype])
    assert np.count_nonzero(gx) or not np.count_nonzero(y_ref)


@pytest.mark.parametrize("ratio", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(6))
def test_ps_roi_align_matches_the_reference(dtype, ratio, seed):
    rng, x, boxes, scale, out = _random_case(200 + 10 * seed + ratio, dtype)
    y = align(x, boxes, out, scale, ratio)
    y_ref = ref.ps_roi_align(x, boxes, out, scale, ratio)
    assert y.shape == y_ref.shape and y.dtype == dtype
    np.testing.assert_allclose(y, y_ref, **TOL[dtype])
    g = rng.standard_normal(y.shape).astype(dtype)
    gx = align_backward(g, boxes, x.shape, scale, ratio)
    np.testing.assert_allclose(
        gx, ref.ps_roi_align_backward(g, boxes, x.shape, out, scale, ratio), **TOL[dtype])


def test_the_reference_ps_roi_align_is_roi_align_per_bin():
    # A cross-check of the reference itself: bin (ph, pw) of output channel
    # c is bin (ph, pw) of RoI Align (aligned) of input channel
    # (c * PH + ph) * PW + pw.
    rng, x, boxes, scale, out = _random_case(7, np.float64)
    ph, pw = out
    ps = ref.ps_roi_align(x, boxes, out, scale, 2)
    plain = ref.roi_align(x, boxes, out, scale, 2, aligned=True)
    for c in range(ps.shape[1]):
        for i in range(ph):
            for j in range(pw):
                np.testing.assert_array_equal(ps[:, c, i, j],
                                              plain[:, (c * ph + i) * pw + j, i, j])


# ------------------------------------------------ adjoint, finite differences
@pytest.mark.parametrize("op", ["pool", "align0", "align2"])
@pytest.mark.parametrize("seed", range(4))
def test_backward_is_the_adjoint_of_the_forward(op, seed):
    # <backward(g), x> == <g, forward(x)> for every x and g: the backward is
    # the transpose of the (linear) forward.
    rng, x, boxes, scale, out = _random_case(300 + seed, np.float64)
    g = rng.standard_normal((len(boxes), x.shape[1] // (out[0] * out[1])) + out)
    if op == "pool":
        y, gx = pool(x, boxes, out, scale), pool_backward(g, boxes, x.shape, scale)
    else:
        ratio = int(op[-1])
        y = align(x, boxes, out, scale, ratio)
        gx = align_backward(g, boxes, x.shape, scale, ratio)
    lhs, rhs = float(np.sum(gx * x)), float(np.sum(g * y))
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("op", ["pool", "align"])
def test_backward_matches_finite_differences(op):
    rng = np.random.default_rng(11)
    n, c, h, w = 2, 8, 6, 7
    x = rng.standard_normal((n, c, h, w))
    boxes = ref.random_boxes(rng, n, h, w, 0.5, 5, kinds=("inside", "partly_out", "tiny"))
    g = rng.standard_normal((len(boxes), 2, 2, 2))
    if op == "pool":
        def f(v):
            return float(np.sum(g * pool(v, boxes, 2, 0.5)))
        gx = pool_backward(g, boxes, x.shape, 0.5)
    else:
        def f(v):
            return float(np.sum(g * align(v, boxes, 2, 0.5, 2)))
        gx = align_backward(g, boxes, x.shape, 0.5, 2)
    eps = 1e-3
    fd = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        fd[idx] = (f(xp) - f(xm)) / (2 * eps)
    np.testing.assert_allclose(gx, fd, rtol=1e-7, atol=1e-9)
    assert np.abs(gx).max() > 0.1  # not trivially zero


# --------------------------------------- layouts, sums and thread counts
def _both_ops(x, boxes, out, scale, g, **kw):
    """Forward and backward of both operators (ps_roi_align adaptive and
    with 2 samples), NCHW results."""
    results = {"pool": pool(x, boxes, out, scale, kw.get("channels_last", False)),
               "pool_grad": pool_backward(g, boxes, x.shape, scale, **kw)}
    for ratio in (0, 2):
        results[f"align{ratio}"] = align(x, boxes, out, scale, ratio,
                                         kw.get("channels_last", False))
        results[f"align{ratio}_grad"] = align_backward(g, boxes, x.shape, scale, ratio,
                                                       **kw)
    return results


def _many_boxes(dtype, seed=5, k=70):
    """Many overlapping boxes on a small map: every pixel receives many terms,
    so the order of a floating-point sum shows."""
    rng = np.random.default_rng(seed)
    # Enough output channels that the CPU loops split every pass (backward
    # included) between threads.
    n, c_out, out, h, w = 2, 24, (3, 2), 9, 11
    x = rng.standard_normal((n, c_out * out[0] * out[1], h, w)).astype(dtype)
    boxes = ref.random_boxes(rng, n, h, w, 1.0, k)
    g = rng.standard_normal((k, c_out) + out).astype(dtype)
    return x, boxes, out, g


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nhwc_is_nchw_transposed_bit_for_bit(dtype, deterministic, monkeypatch):
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", deterministic)
    x, boxes, out, g = _many_boxes(dtype)
    nchw = _both_ops(x, boxes, out, 1.0, g, deterministic=deterministic)
    nhwc = _both_ops(x, boxes, out, 1.0, g, deterministic=deterministic,
                     channels_last=True)
    for name in nchw:
        assert np.array_equal(_bits(nchw[name]), _bits(nhwc[name])), name
        assert not np.isnan(nchw[name]).any(), name  # every element written


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("sum_method", ["cpu-sum", "fixed-point"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_on_any_number_of_threads(dtype, sum_method, channels_last,
                                            monkeypatch, restore_threads):
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", sum_method == "fixed-point")
    x, boxes, out, g = _many_boxes(dtype)
    runs = []
    for threads in (1, 3, 2):
        curoi.set_num_threads(threads)
        runs.append(_both_ops(x, boxes, out, 1.0, g, deterministic=True,
                              channels_last=channels_last))
    for other in runs[1:]:
        for name in runs[0]:
            assert np.array_equal(_bits(runs[0][name]), _bits(other[name])), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_fixed_point_backward_matches_the_plain_one(dtype, monkeypatch):
    # The GPU's deterministic sum (int64 fixed point), run on the CPU: the
    # same gradient within the rounding of its terms (2^-e with e from
    # max|g| and the K boxes), against the reference.
    x, boxes, out, g = _many_boxes(dtype)
    plain = _both_ops(x, boxes, out, 1.0, g)
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", True)
    fixed = _both_ops(x, boxes, out, 1.0, g, deterministic=True)
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == np.float64 else dict(rtol=1e-5,
                                                                        atol=1e-6)
    for name in ("pool_grad", "align0_grad", "align2_grad"):
        np.testing.assert_allclose(fixed[name], plain[name], **tol)
    np.testing.assert_allclose(fixed["pool_grad"],
                               ref.ps_roi_pool_backward(g, boxes, x.shape, out), **tol)
    np.testing.assert_allclose(fixed["align2_grad"],
                               ref.ps_roi_align_backward(g, boxes, x.shape, out, 1.0, 2),
                               **tol)


@pytest.mark.parametrize("sum_method", ["cpu-sum", "fixed-point"])
def test_non_finite_gradients_reach_only_their_bins(sum_method, monkeypatch):
    # inf and NaN gradients: the plain sum and the fixed-point one (which
    # routes non-finite terms through the float buffer) put them in the same
    # pixels, and nothing else turns non-finite.
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", sum_method == "fixed-point")
    x, boxes, out, g = _many_boxes(np.float64, k=6)
    g[0, 0, 0, 0] = np.inf
    g[3, 1, 2, 1] = np.nan
    gx = pool_backward(g, boxes, x.shape, deterministic=True)
    finite = g.copy()
    finite[~np.isfinite(finite)] = 0
    bad_pixels = np.zeros(x.shape, bool)
    for k, c, i, j in np.argwhere(~np.isfinite(g)):
        one = np.zeros_like(g)
        one[k, c, i, j] = 1
        bad_pixels |= ref.ps_roi_pool_backward(one, boxes, x.shape, out) != 0
    assert bad_pixels.any()
    np.testing.assert_array_equal(~np.isfinite(gx), bad_pixels)
    np.testing.assert_allclose(
        gx[~bad_pixels], ref.ps_roi_pool_backward(finite, boxes, x.shape, out)[~bad_pixels],
        rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------- adversarial
# The box zoo of test_adversarial.py (every kind of box a caller can send) on
# a map of N=2 images, 5 x 7 pixels, with 2 output channels of 2 x 3 bins.
N, H, W = 2, 5, 7
OUT = (2, 3)
C = 2 * OUT[0] * OUT[1]
NAMES = list(ZOO)


def _zoo(names=NAMES):
    return np.array([ZOO[n] for n in names], np.float64)


def assert_average_bounds(y, x, what=""):
    """Both operators average map values with non-negative weights summing
    to at most 1: each output lies between min(0, min x) and max(0, max x)."""
    y = np.asarray(y, np.float64)
    assert np.isfinite(y).all(), what
    tol = 1e-5 * max(1.0, float(np.abs(x).max()))
    assert (y >= min(0.0, float(x.min())) - tol).all(), what
    assert (y <= max(0.0, float(x.max())) + tol).all(), what


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ps_roi_pool_box_zoo(dtype, channels_last):
    x = np.random.default_rng(2).standard_normal((N, C, H, W)).astype(dtype)
    y = pool(x, _zoo(), OUT, 1.0, channels_last)
    # float32 boxes beyond 1e6 are not the float64 reference's boxes.
    exact = [k for k, n in enumerate(NAMES) if not (n in EXTREME and dtype == np.float32)]
    np.testing.assert_allclose(y[exact], ref.ps_roi_pool(x, _zoo()[exact], OUT), **TOL[dtype])
    for k, name in enumerate(NAMES):
        assert_average_bounds(y[k], x, name)
        if name in UNUSABLE:
            assert not y[k].any(), name
    assert np.abs(y[NAMES.index("inside")]).min() > 0  # not vacuous
    g = np.random.default_rng(3).standard_normal(y.shape).astype(dtype)
    g_exact = np.zeros_like(g)
    g_exact[exact] = g[exact]
    gx = pool_backward(g_exact, _zoo(), x.shape, 1.0, channels_last=channels_last)
    np.testing.assert_allclose(gx, ref.ps_roi_pool_backward(g[exact], _zoo()[exact],
                                                            x.shape, OUT), **TOL[dtype])
    # The others alone, with gradient 1: each bin sends its 1 to pixels of
    # the map, non-negative and summing to at most sum(g).
    rest = [k for k in range(len(NAMES)) if k not in exact]
    if rest:
        ones = np.ones((len(rest),) + g.shape[1:], dtype)
        gx = pool_backward(ones, _zoo()[rest], x.shape, 1.0,
                           channels_last=channels_last).astype(np.float64)
        assert np.isfinite(gx).all() and (gx >= 0).all()
        assert gx.sum() <= ones.size * (1 + 1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("ratio", [0, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ps_roi_align_box_zoo(dtype, ratio, channels_last):
    x = np.random.default_rng(4).standard_normal((N, C, H, W)).astype(dtype)
    y = align(x, _zoo(), OUT, 1.0, ratio, channels_last)
    # Huge boxes with adaptive sampling mean ~1e9 samples per bin side: the
    # reference (a loop over every sample) cannot, the kernels visit only
    # those that land on the map.
    checked = [k for k, n in enumerate(NAMES)
               if not (n in HUGE and ratio <= 0) and not (n in EXTREME and dtype == np.float32)]
    np.testing.assert_allclose(y[checked], ref.ps_roi_align(x, _zoo()[checked], OUT, 1.0, ratio),
                               **TOL[dtype])
    for k, name in enumerate(NAMES):
        assert_average_bounds(y[k], x, name)
        if name in UNUSABLE:
            assert not y[k].any(), name
    assert np.abs(y[NAMES.index("inside")]).min() > 0
    g = np.random.default_rng(5).standard_normal(y.shape).astype(dtype)
    g_checked = np.zeros_like(g)
    g_checked[checked] = g[checked]
    gx = align_backward(g_checked, _zoo(), x.shape, 1.0, ratio, channels_last=channels_last)
    np.testing.assert_allclose(
        gx, ref.ps_roi_align_backward(g[checked], _zoo()[checked], x.shape, OUT, 1.0, ratio),
        **TOL[dtype])
    # The others alone, with a non-negative gradient: a non-negative
    # gradient summing to at most sum(g) (weights total at most 1 per bin).
    rest = [k for k in range(len(NAMES)) if k not in checked]
    if rest:
        ones = np.ones((len(rest),) + g.shape[1:], dtype)
        gx = align_backward(ones, _zoo()[rest], x.shape, 1.0, ratio,
                            channels_last=channels_last).astype(np.float64)
        assert np.isfinite(gx).all() and (gx >= 0).all()
        assert gx.sum() <= ones.size * (1 + 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unusable_boxes_send_no_gradient(dtype):
    bad = sorted(UNUSABLE)
    g = np.ones((len(bad), 2) + OUT, dtype)
    assert not pool_backward(g, _zoo(bad), (N, C, H, W)).any()
    for ratio in (0, 2):
        assert not align_backward(g, _zoo(bad), (N, C, H, W), 1.0, ratio).any()


@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_not_a_multiple_of_the_bins(channels_last):
    # C = 2 * 6 + 5: the kernels read the first 12 channels as the 2 output
    # channels' maps and leave the last 5 alone (no read past the input,
    # no gradient written there).
    rng = np.random.default_rng(6)
    x = rng.standard_normal((N, C + 5, H, W))
    boxes = _zoo(["inside", "other-image", "partly-out", "whole-map"])
    for forward, backward, reference, reference_backward in (
            (pool, pool_backward, ref.ps_roi_pool, ref.ps_roi_pool_backward),
            (lambda *a: align(*a[:4], 2, *a[4:]),
             lambda g, b, s, sc, **kw: align_backward(g, b, s, sc, 2, **kw),
             lambda *a: ref.ps_roi_align(*a, 2),
             lambda *a: ref.ps_roi_align_backward(*a, 2))):
        y = forward(x, boxes, OUT, 1.0, channels_last)
        assert y.shape == (len(boxes), 2) + OUT
        np.testing.assert_allclose(y, reference(x[:, :C], boxes, OUT, 1.0), **TOL[np.float64])
        g = rng.standard_normal(y.shape)
        gx = backward(g, boxes, x.shape, 1.0, channels_last=channels_last)
        np.testing.assert_array_equal(gx[:, C:], 0.0)
        np.testing.assert_allclose(gx[:, :C], reference_backward(g, boxes, (N, C, H, W),
                                                                 OUT, 1.0),
                                   **TOL[np.float64])


@pytest.mark.parametrize("hw", [(1, 1), (1, 6), (5, 1), (2, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_small_maps(hw):
    h, w = hw
    x = np.random.default_rng(8).standard_normal((1, C, h, w))
    boxes = np.array([[0, 0, 0, w, h], [0, -0.7, -0.7, 0.3, 0.3], [0, 0.2, 0.1, w - 0.4, h],
                      [0, -2, -2, w + 2, h + 2], [0, w, h, w + 1, h + 1]])
    np.testing.assert_allclose(pool(x, boxes, OUT), ref.ps_roi_pool(x, boxes, OUT),
                               **TOL[np.float64])
    for ratio in (0, 2):
        np.testing.assert_allclose(align(x, boxes, OUT, 1.0, ratio),
                                   ref.ps_roi_align(x, boxes, OUT, 1.0, ratio),
                                   **TOL[np.float64])
        g = np.random.default_rng(9).standard_normal((len(boxes), 2) + OUT)
        np.testing.assert_allclose(align_backward(g, boxes, x.shape, 1.0, ratio),
                                   ref.ps_roi_align_backward(g, boxes, x.shape, OUT, 1.0,
                                                             ratio), **TOL[np.float64])


@pytest.mark.parametrize("output_size", [(1, 1024), (64, 64)])
def test_large_output_size_on_a_small_map(output_size):
    bins = output_size[0] * output_size[1]
    x = np.random.default_rng(10).standard_normal((1, bins, 3, 4))
    boxes = _zoo(["inside", "partly-out", "reversed", "batch-nan"])
    boxes[:, 0] = np.minimum(boxes[:, 0], 0)  # one image here
    np.testing.assert_allclose(pool(x, boxes, output_size),
                               ref.ps_roi_pool(x, boxes, output_size), **TOL[np.float64])
    np.testing.assert_allclose(align(x, boxes, output_size, 1.0, 0),
                               ref.ps_roi_align(x, boxes, output_size, 1.0, 0),
                               **TOL[np.float64])


@pytest.mark.parametrize("scale", [1e38, 3e38])
def test_scaled_box_that_overflows_float32_reads_nothing(scale):
    # float32 boxes scaled in float32: 5 * 1e38 is inf. Both boxes lie far
    # off the map, so they read nothing (rather than the clipped edge).
    x = np.random.default_rng(12).standard_normal((1, C, H, W)).astype(np.float32)
    boxes = [[0, 1, 1, 5, 5], [0, -1, -1, -5, -5]]
    ones = np.ones((2, 2) + OUT, np.float32)
    assert not pool(x, boxes, OUT, scale).any()
    assert not pool_backward(ones, boxes, x.shape, scale).any()
    for ratio in (0, 2):
        assert not align(x, boxes, OUT, scale, ratio).any()
        assert not align_backward(ones, boxes, x.shape, scale, ratio).any()


def test_huge_sampling_ratio_is_summed_in_closed_form():
    # 2**31 - 1 samples per bin side: dense sampling is summed per pixel
    # zone (roi_align_geometry.cuh), so this returns at once; on a constant
    # map inside the box the mean is the constant.
    x = np.full((1, C, H, W), 3.0)
    boxes = [[0, 1.5, 1.5, 5.5, 4.5]]
    y = align(x, boxes, OUT, 1.0, 2**31 - 1)
    np.testing.assert_allclose(y, 3.0, rtol=1e-7)
    gx = align_backward(np.ones(y.shape), boxes, x.shape, 1.0, 2**31 - 1)
    np.testing.assert_allclose(gx.sum(), y.size, rtol=1e-7)


def test_kernels_called_with_nothing_to_do_return_cleanly():
    # No boxes, no channels, fewer channels than bins, or no bins at all:
    # nothing to write, no division by zero (direct ctypes calls).
    x = np.zeros((1, 4, 6, 6), np.float32)
    boxes = np.array([[0, 1, 1, 4, 4]], np.float32)
    out = np.zeros((1, 1, 2, 2), np.float32)
    grad = np.zeros(x.shape, np.float32)
    for k, c, ph, pw in ((0, 4, 2, 2), (1, 0, 2, 2), (1, 3, 2, 2), (1, 4, 0, 2),
                         (1, 4, 2, 0), (0, 0, 0, 0)):
        for cl in (0, 1):
            _cpu.launch("ps_roi_pool", "forward", "float32",
                        (x, boxes, k, 1, c, 6, 6, ph, pw, 1.0, cl, 1, out))
            _cpu.launch("ps_roi_pool", "backward", "float32",
                        (out, boxes, k, 1, c, 6, 6, ph, pw, 1.0, cl, 1, grad))
            _cpu.launch("ps_roi_align", "forward", "float32",
                        (x, boxes, k, 1, c, 6, 6, ph, pw, 1.0, 2, cl, 1, out))
            _cpu.launch("ps_roi_align", "backward", "float32",
                        (out, boxes, k, 1, c, 6, 6, ph, pw, 1.0, 2, cl, 1, grad))
    assert not grad.any() and not out.any()


def test_no_boxes():
    x = np.ones((N, C, H, W))
    none = np.zeros((0, 5))
    assert pool(x, none, OUT).shape == (0, 2) + OUT
    assert align(x, none, OUT, 1.0, 2).shape == (0, 2) + OUT
    g = np.zeros((0, 2) + OUT)
    assert not pool_backward(g, none, x.shape).any()
    assert not align_backward(g, none, x.shape, 1.0, 2).any()


def test_most_negative_sampling_ratio_is_adaptive():
    x = np.random.default_rng(13).standard_normal((N, C, H, W))
    boxes = _zoo(["inside", "partly-out", "reversed"])
    np.testing.assert_allclose(align(x, boxes, OUT, 1.0, -(2**31 - 1)),
                               ref.ps_roi_align(x, boxes, OUT, 1.0, 0), **TOL[np.float64])


def test_torchvision_rounding_is_half_away_from_zero():
    # round(-2.5) = -3 and round(2.5) = 3 (C's round; Python's gives -2 and
    # 2): a box from x = 2.5 starts at column 3, and one from -2.5 to 1.5
    # spans -3 .. 2, size 5, so with 1 bin it reads columns [0, 2).
    x = np.zeros((1, 1, 3, 8))
    x[0, 0, :, :] = np.arange(8)
    y = pool(x, [[0, 2.5, 0, 6.2, 2], [0, -2.5, 0, 1.5, 2]], 1)
    # Box 0: columns round(2.5) = 3 .. round(6.2) = 6, size 3: [3, 6).
    np.testing.assert_array_equal(y.ravel(), [4.0, 0.5])

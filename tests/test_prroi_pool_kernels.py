"""Precise RoI Pooling (Jiang et al., ECCV 2018; mmcv's PrRoIPool), at the
kernel level: curoi._ops on the CPU (and, from test_gpu_loops.py, with the
GPU's loop code; from test_sanitizers.py, under AddressSanitizer and
UndefinedBehaviorSanitizer, so this file imports only NumPy, curoi and the
references).

A bin's value is the integral of the bilinearly interpolated map (0 beyond
the cells around it) over the bin, divided by the bin's area; corners
x * spatial_scale with no half-pixel shift. Expected values come from hand
computation, from the independent NumPy reference in tests/reference.py
(mmcv's cell-by-cell formulas, not the kernels' per-pixel weights), from
numerical quadrature and from finite differences; relations between two
curoi results (layouts, thread counts, the two backward sums) are checked as
the properties they are.
"""

import numpy as np
import pytest

import curoi
import reference as ref
from curoi import _cpu, _ops
from test_adversarial import EXTREME, UNUSABLE, ZOO

# float64 differs from the float64 reference only by the order and the form
# of its sums; float32 also by computing box coordinates in float32.
TOL = {np.float64: dict(rtol=1e-12, atol=1e-12),
       np.float32: dict(rtol=1e-5, atol=1e-5)}
# The box gradient divides differences of means by the bin's size, which
# amplifies their rounding.
BOX_TOL = {np.float64: dict(rtol=1e-11, atol=1e-11),
           np.float32: dict(rtol=1e-4, atol=2e-6)}
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
    """prroi_pool forward of NCHW x; NCHW result whatever the layout run."""
    ph, pw = _pair(output_size)
    k, c = len(boxes), x.shape[1]
    xs = _nhwc(x) if channels_last else np.ascontiguousarray(x)
    out = np.full((k, ph, pw, c) if channels_last else (k, c, ph, pw), np.nan, x.dtype)
    _ops.prroi_pool_forward(xs, _rois(boxes, x.dtype), out, scale,
                            channels_last=channels_last)
    return _nchw(out) if channels_last else out


def pool_backward(g, boxes, shape, scale=1.0, deterministic=False,
                  channels_last=False):
    gs = _nhwc(g) if channels_last else np.ascontiguousarray(g)
    n, c, h, w = shape
    gx = np.full((n, h, w, c) if channels_last else (n, c, h, w), np.nan, g.dtype)
    _ops.prroi_pool_backward(gs, _rois(boxes, g.dtype), gx, scale,
                             deterministic=deterministic, channels_last=channels_last)
    return _nchw(gx) if channels_last else gx


def boxes_backward(g, x, boxes, scale=1.0, channels_last=False):
    """The gradient with respect to the boxes, [K, 5]; NaN-filled first, so
    that an entry left unwritten shows."""
    gs = _nhwc(g) if channels_last else np.ascontiguousarray(g)
    xs = _nhwc(x) if channels_last else np.ascontiguousarray(x)
    rois = _rois(boxes, x.dtype)
    grad = np.full(rois.shape, np.nan, rois.dtype)
    _ops.prroi_pool_boxes_backward(gs, xs, rois, grad, scale, channels_last=channels_last)
    return grad


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint32 if a.dtype.itemsize == 4 else np.uint64)


def _random_case(seed, dtype, k_max=8, hw_max=14, kinds=ref.BOX_KINDS):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3))
    out = ((1, 1), (2, 2), (2, 3), (3, 1), (3, 3))[rng.integers(5)]
    c = int(rng.integers(1, 4))
    h, w = (int(v) for v in rng.integers(1, hw_max + 1, 2))
    if rng.random() < 0.8:  # mostly non-trivial maps; sometimes 1-wide
        h, w = max(h, 4), max(w, 4)
    scale = (1.0, 0.5, 0.25, 1 / 3)[rng.integers(4)]
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    boxes = ref.random_boxes(rng, n, h, w, scale, int(rng.integers(1, k_max + 1)),
                             kinds=kinds)
    if kinds == ref.BOX_KINDS:
        ref.spoil_boxes(rng, boxes, n)  # sometimes one unusable box
    return rng, x, boxes, scale, out


def _regular_boxes(rng, n, h, w, scale, k, margin=0.5):
    """Boxes on and around the map, every side at least `margin` pixels
    long and no edge within 1e-3 pixels of a pixel line: the box gradient
    is smooth there, for finite differences."""
    boxes = []
    while len(boxes) < k:
        x1, x2 = np.sort(rng.uniform(-2, w + 1, 2))
        y1, y2 = np.sort(rng.uniform(-2, h + 1, 2))
        corners = np.array([x1, y1, x2, y2])
        if x2 - x1 < margin or y2 - y1 < margin:
            continue
        if (np.abs(corners - np.round(corners)) < 1e-3).any():
            continue
        boxes.append([rng.integers(n), *(corners / scale)])
    return np.array(boxes, np.float64)


@pytest.fixture
def restore_threads():
    before = curoi.get_num_threads()
    yield
    curoi.set_num_threads(before)


# ------------------------------------------------------- hand computations
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_map_gives_the_constant_and_no_box_gradient(dtype, channels_last):
    # Within [0, H-1] x [0, W-1] the interpolated surface of a constant map
    # is that constant, so is its mean over any bin there, whatever the box:
    # the box gradient is 0.
    n, c, h, w = 2, 3, 6, 7
    x = np.broadcast_to((2.5 * np.arange(c) - 1.0)[None, :, None, None],
                        (n, c, h, w)).astype(dtype)
    boxes = [[0, 0, 0, 6, 5],            # the whole of [0, W-1] x [0, H-1]
             [1, 1.25, 0.5, 4.75, 3.0],  # bins of 1.75 x 1.25 / 1.17 pixels
             [1, 2.0, 3.0, 3.0, 4.0],    # integer edges
             [0, 5.9, 4.9, 6.0, 5.0],    # a 0.1-pixel box in the far corner
             [0, 0.3, 0.2, 0.30001, 4.8]]  # a 1e-5-pixel-wide box
    for scale, scaled in ((1.0, boxes), (0.5, [[b[0]] + [2 * v for v in b[1:]]
                                               for b in boxes])):
        for out in ((1, 1), (2, 3), (3, 2)):
            y = pool(x, scaled, out, scale, channels_last)
            want = np.broadcast_to(x[0, :, 0, 0][None, :, None, None], y.shape)
            np.testing.assert_allclose(y, want, rtol=1e-5 if dtype == np.float32 else 1e-13,
                                       atol=0)
    # The first three boxes: bins of at least a pixel, where float32's
    # rounding of the edges stays small against the bin's size.
    g = np.random.default_rng(1).standard_normal((3, c, 2, 3)).astype(dtype)
    grad = boxes_backward(g, x, boxes[:3], 1.0, channels_last)
    np.testing.assert_allclose(grad, 0.0, atol=1e-4 if dtype == np.float32 else 1e-11)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_map_gives_its_value_at_the_bin_centre(dtype, channels_last):
    # x[h, w] = A + B h + C w: the surface is that plane within
    # [0, H-1] x [0, W-1], and the mean of a plane over a rectangle is its
    # value at the centre.
    A, B, C = 0.75, -1.5, 2.0
    h, w = 7, 9
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    x = (A + B * hh + C * ww)[None, None].astype(dtype)
    PH, PW = 3, 4
    for box, scale in (([0, 1.0, 0.5, 7.0, 5.5], 1.0), ([0, 0.4, 2.2, 15.6, 10.4], 0.5)):
        _, x1, y1, x2, y2 = (v * scale for v in box)
        y = pool(x, [box], (PH, PW), scale, channels_last)
        for ph in range(PH):
            for pw in range(PW):
                cy = y1 + (y2 - y1) * (ph + 0.5) / PH
                cx = x1 + (x2 - x1) * (pw + 0.5) / PW
                # Map values up to 17: an absolute tolerance for values
                # that cancel to near 0.
                np.testing.assert_allclose(y[0, 0, ph, pw], A + B * cy + C * cx,
                                           rtol=2e-6 if dtype == np.float32 else 1e-13,
                                           atol=2e-5 if dtype == np.float32 else 1e-13)
        # With gradient 1 on every bin: bin (ph, pw)'s value moves with x1 as
        # its centre does, C (1 - (2 pw + 1) / (2 PW)) s; summed over the
        # bins, C s PH PW / 2, for x2 too; rows likewise with B.
        grad = boxes_backward(np.ones(y.shape, dtype), x, [box], scale, channels_last)
        want = [0, C * scale * PH * PW / 2, B * scale * PH * PW / 2,
                C * scale * PH * PW / 2, B * scale * PH * PW / 2]
        np.testing.assert_allclose(grad[0], want, rtol=1e-4 if dtype == np.float32 else 1e-11)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_surface_falls_to_zero_across_the_cells_around_the_map(dtype):
    # mmcv reads 0 for pixels off the map and integrates every cell the bin
    # overlaps: on a map of ones the surface rises from 0 at y = -1 to 1 at
    # y = 0 (and falls from 1 at H-1 to 0 at H), and is 0 beyond.
    h, w = 4, 5
    x = np.ones((1, 1, h, w), dtype)
    boxes = [[0, 1, -1, 3, 0],       # the ramp's mean: 1/2
             [0, 1, -1, 3, 1],       # (1/2 + 1) / 2 = 3/4
             [0, 1, h - 1, 3, h],    # the ramp down: 1/2
             [0, 1, -3, 3, -1],      # beyond: 0
             [0, 1, -2, 3, 0],       # (0 + 1/2) / 2 = 1/4
             [0, -1, -1, 0, 0],      # the corner cell: 1/2 * 1/2
             [0, -1, -1, w, h]]      # (W - 1 + 1)(H - 1 + 1) / ((W + 1)(H + 1))
    y = pool(x, boxes, 1)
    want = [0.5, 0.75, 0.5, 0.0, 0.25, 0.25, w * h / ((w + 1) * (h + 1))]
    np.testing.assert_allclose(y.ravel(), want, rtol=1e-6 if dtype == np.float32 else 1e-14)
    # Box 1 (y from -1 to 1, x from 1 to 3): moving its top edge up adds
    # f = 0 to the integral and grows the area, d/dy1 = (3/4 - 0) / 2; its
    # bottom edge, where f = 1: d/dy2 = (1 - 3/4) / 2. Its left and right
    # edges see the mean 3/4 of the bin itself: 0.
    grad = boxes_backward(np.ones((1, 1, 1, 1), dtype), x, [boxes[1]])
    np.testing.assert_allclose(grad[0], [0, 0, 0.375, 0, 0.125],
                               atol=1e-6 if dtype == np.float32 else 1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_bins_give_zero(dtype):
    # Zero width or height, or a reversed box (its size clamped to 0): 0,
    # no gradient for the input nor for the box.
    x = np.random.default_rng(2).standard_normal((1, 2, 6, 6)).astype(dtype) + 3
    boxes = [[0, 2, 1, 2, 4], [0, 1, 3, 4, 3], [0, 3, 3, 3, 3], [0, 5, 4, 1, 1],
             [0, 1, 4, 5, 1]]
    y = pool(x, boxes, 2)
    np.testing.assert_array_equal(y, 0.0)
    g = np.ones(y.shape, dtype)
    np.testing.assert_array_equal(pool_backward(g, boxes, x.shape), 0.0)
    np.testing.assert_array_equal(boxes_backward(g, x, boxes), 0.0)


# ---------------------------------------------------- against the reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(8))
def test_matches_the_reference(dtype, seed):
    rng, x, boxes, scale, out = _random_case(100 + seed, dtype)
    y = pool(x, boxes, out, scale)
    y_ref = ref.prroi_pool(x, boxes, out, scale)
    assert y.shape == y_ref.shape and y.dtype == dtype
    np.testing.assert_allclose(y, y_ref, **TOL[dtype])
    g = rng.standard_normal(y.shape).astype(dtype)
    gx = pool_backward(g, boxes, x.shape, scale)
    assert gx.dtype == dtype
    np.testing.assert_allclose(gx, ref.prroi_pool_backward(g, boxes, x.shape, out, scale),
                               **TOL[dtype])
    assert np.count_nonzero(gx) or not np.count_nonzero(y_ref)
    if dtype == np.float64:
        # Tiny and degenerate boxes included: float64 keeps them exact.
        np.testing.assert_allclose(boxes_backward(g, x, boxes, scale),
                                   ref.prroi_pool_boxes_backward(g, x, boxes, out, scale),
                                   **BOX_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(6))
def test_box_gradient_matches_the_reference(dtype, seed):
    # Boxes at least half a pixel on a side: float32's box coordinates then
    # move the differences of means that the box gradient divides by the
    # bin's size by less than its tolerance.
    rng = np.random.default_rng(150 + seed)
    n, c, h, w = 2, 3, 9, 11
    scale = (1.0, 0.5, 0.25)[seed % 3]
    out = ((1, 1), (2, 3), (3, 2))[seed % 3]
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    boxes = _regular_boxes(rng, n, h, w, scale, 8, margin=1.0)
    boxes = _rois(boxes, dtype).astype(np.float64)  # the boxes the kernels see
    g = rng.standard_normal((len(boxes), c) + out).astype(dtype)
    grad = boxes_backward(g, x, boxes, scale)
    want = ref.prroi_pool_boxes_backward(g, x, boxes, out, scale)
    assert grad.dtype == (np.float64 if dtype == np.float64 else np.float32)
    np.testing.assert_array_equal(grad[:, 0], 0.0)
    np.testing.assert_allclose(grad, want, **BOX_TOL[dtype])
    assert np.abs(want[:, 1:]).min() > 0  # not vacuous


@pytest.mark.parametrize("seed", range(4))
def test_the_reference_and_the_kernels_match_quadrature(seed):
    # The reference sums closed-form cell integrals; the quadrature
    # evaluates the zero-padded bilinear surface point by point at
    # Gauss-Legendre nodes between the pixel lines (exact for it). Both
    # agree, and the kernels with both.
    rng, x, boxes, scale, out = _random_case(400 + seed, np.float64,
                                             kinds=("inside", "partly_out", "tiny"))
    quadrature = ref.prroi_pool_quadrature(x, boxes, out, scale)
    assert np.count_nonzero(quadrature)
    np.testing.assert_allclose(ref.prroi_pool(x, boxes, out, scale), quadrature,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pool(x, boxes, out, scale), quadrature,
                               rtol=1e-12, atol=1e-12)


# ------------------------------------------------ adjoint, finite differences
@pytest.mark.parametrize("seed", range(4))
def test_backward_is_the_adjoint_of_the_forward(seed):
    # <backward(g), x> == <g, forward(x)> for every x and g: the backward is
    # the transpose of the (linear) forward.
    rng, x, boxes, scale, out = _random_case(300 + seed, np.float64)
    g = rng.standard_normal((len(boxes), x.shape[1]) + out)
    y, gx = pool(x, boxes, out, scale), pool_backward(g, boxes, x.shape, scale)
    lhs, rhs = float(np.sum(gx * x)), float(np.sum(g * y))
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)


def test_backward_matches_finite_differences():
    rng = np.random.default_rng(11)
    n, c, h, w = 2, 2, 5, 6
    x = rng.standard_normal((n, c, h, w))
    boxes = ref.random_boxes(rng, n, h, w, 0.5, 5, kinds=("inside", "partly_out", "tiny"))
    g = rng.standard_normal((len(boxes), c, 2, 3))

    def f(v):
        return float(np.sum(g * pool(v, boxes, (2, 3), 0.5)))

    gx = pool_backward(g, boxes, x.shape, 0.5)
    eps = 1e-3
    fd = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        fd[idx] = (f(xp) - f(xm)) / (2 * eps)
    np.testing.assert_allclose(gx, fd, rtol=1e-7, atol=1e-9)
    assert np.abs(gx).max() > 0.1  # not trivially zero


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_box_gradient_matches_finite_differences(seed, channels_last):
    # Central differences of the kernels' own forward in float64, on boxes
    # whose edges stay off the pixel lines (where the value's second
    # derivative jumps) and away from zero size.
    rng = np.random.default_rng(500 + seed)
    n, c, h, w = 2, 3, 6, 8
    scale = (1.0, 0.5, 2.0)[seed]
    out = ((2, 2), (1, 3), (3, 2))[seed]
    x = rng.standard_normal((n, c, h, w))
    boxes = _regular_boxes(rng, n, h, w, scale, 6)
    g = rng.standard_normal((len(boxes), c) + out)
    grad = boxes_backward(g, x, boxes, scale, channels_last)
    eps = 1e-6 / scale
    fd = np.zeros_like(grad)
    for k in range(len(boxes)):
        for j in range(1, 5):
            bp, bm = boxes.copy(), boxes.copy()
            bp[k, j] += eps
            bm[k, j] -= eps
            fd[k, j] = np.sum(g * (pool(x, bp, out, scale) - pool(x, bm, out, scale))) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7)
    assert np.abs(fd[:, 1:]).min() > 1e-4  # every coordinate matters here


# --------------------------------------- layouts, sums and thread counts
def _all_ops(x, boxes, out, g, **kw):
    """Forward, input and box gradients, NCHW results."""
    cl = kw.get("channels_last", False)
    return {"forward": pool(x, boxes, out, 1.0, cl),
            "backward": pool_backward(g, boxes, x.shape, 1.0, **kw),
            "boxes": boxes_backward(g, x, boxes, 1.0, cl)}


def _many_boxes(dtype, seed=5, k=70):
    """Many overlapping boxes on a small map: every pixel receives many terms,
    so the order of a floating-point sum shows."""
    rng = np.random.default_rng(seed)
    # Enough channels that the CPU loops split every pass between threads.
    n, c, out, h, w = 2, 24, (3, 2), 9, 11
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    boxes = ref.random_boxes(rng, n, h, w, 1.0, k)
    g = rng.standard_normal((k, c) + out).astype(dtype)
    return x, boxes, out, g


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nhwc_is_nchw_transposed_bit_for_bit(dtype, deterministic, monkeypatch):
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", deterministic)
    x, boxes, out, g = _many_boxes(dtype)
    nchw = _all_ops(x, boxes, out, g, deterministic=deterministic)
    nhwc = _all_ops(x, boxes, out, g, deterministic=deterministic, channels_last=True)
    for name in nchw:
        assert np.array_equal(_bits(nchw[name]), _bits(nhwc[name])), name
        assert not np.isnan(nchw[name]).any(), name  # every element written
    assert np.count_nonzero(nchw["boxes"][:, 1:]) > len(boxes)  # not vacuous


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
        runs.append(_all_ops(x, boxes, out, g, deterministic=True,
                             channels_last=channels_last))
    for other in runs[1:]:
        for name in runs[0]:
            assert np.array_equal(_bits(runs[0][name]), _bits(other[name])), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_fixed_point_backward_matches_the_plain_one(dtype, monkeypatch):
    # The GPU's deterministic sum (int64 fixed point), run on the CPU: the
    # same gradient within the rounding of its terms (2^-e with e from
    # max|g| and the K * PH * PW bins), against the reference.
    x, boxes, out, g = _many_boxes(dtype, k=30)
    boxes = _rois(boxes, dtype).astype(np.float64)  # the boxes the kernels see
    plain = pool_backward(g, boxes, x.shape)
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", True)
    fixed = pool_backward(g, boxes, x.shape, deterministic=True)
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fixed, plain, **tol)
    np.testing.assert_allclose(fixed, ref.prroi_pool_backward(g, boxes, x.shape, out), **tol)
    assert not np.array_equal(fixed, 0)


@pytest.mark.parametrize("sum_method", ["cpu-sum", "fixed-point"])
def test_non_finite_gradients_reach_only_their_bins(sum_method, monkeypatch):
    # inf and NaN gradients: the plain sum and the fixed-point one (which
    # routes non-finite terms through the float buffer) put them in the same
    # pixels, and nothing else turns non-finite.
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", sum_method == "fixed-point")
    x, boxes, out, g = _many_boxes(np.float64, k=6)
    g = g.copy()
    g[0, 0, 0, 0] = np.inf
    g[3, 1, 2, 1] = np.nan
    gx = pool_backward(g, boxes, x.shape, deterministic=True)
    finite = g.copy()
    finite[~np.isfinite(finite)] = 0
    bad_pixels = np.zeros(x.shape, bool)
    for k, c, i, j in np.argwhere(~np.isfinite(g)):
        one = np.zeros_like(g)
        one[k, c, i, j] = 1
        bad_pixels |= ref.prroi_pool_backward(one, boxes, x.shape, out) != 0
    np.testing.assert_array_equal(~np.isfinite(gx), bad_pixels)
    np.testing.assert_allclose(
        gx[~bad_pixels], ref.prroi_pool_backward(finite, boxes, x.shape, out)[~bad_pixels],
        rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------- adversarial
# The box zoo of test_adversarial.py (every kind of box a caller can send) on
# a map of N=2 images, 5 x 7 pixels, 3 channels, 2 x 3 bins.
N, H, W = 2, 5, 7
C = 3
OUT = (2, 3)
NAMES = list(ZOO)


def _zoo(names=NAMES):
    return np.array([ZOO[n] for n in names], np.float64)


def assert_average_bounds(y, x, what=""):
    """A bin's value averages map values with non-negative weights summing to
    at most 1: it lies between min(0, min x) and max(0, max x)."""
    y = np.asarray(y, np.float64)
    assert np.isfinite(y).all(), what
    tol = 1e-5 * max(1.0, float(np.abs(x).max()))
    assert (y >= min(0.0, float(x.min())) - tol).all(), what
    assert (y <= max(0.0, float(x.max())) + tol).all(), what


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_box_zoo(dtype, channels_last):
    # Huge boxes included: only the cells on and around the map are visited,
    # by the kernels and the reference alike.
    x = np.random.default_rng(2).standard_normal((N, C, H, W)).astype(dtype)
    y = pool(x, _zoo(), OUT, 1.0, channels_last)
    # float32 boxes beyond 1e6 are not the float64 reference's boxes.
    exact = [k for k, n in enumerate(NAMES) if not (n in EXTREME and dtype == np.float32)]
    np.testing.assert_allclose(y[exact], ref.prroi_pool(x, _zoo()[exact], OUT), **TOL[dtype])
    for k, name in enumerate(NAMES):
        assert_average_bounds(y[k], x, name)
        if name in UNUSABLE:
            assert not y[k].any(), name
    assert np.abs(y[NAMES.index("inside")]).min() > 0  # not vacuous
    assert np.abs(y[NAMES.index("around-map-1e9")]).max() > 0
    g = np.random.default_rng(3).standard_normal(y.shape).astype(dtype)
    g_exact = np.zeros_like(g)
    g_exact[exact] = g[exact]
    gx = pool_backward(g_exact, _zoo(), x.shape, 1.0, channels_last=channels_last)
    np.testing.assert_allclose(gx, ref.prroi_pool_backward(g[exact], _zoo()[exact],
                                                           x.shape, OUT), **TOL[dtype])
    # The box gradient: every row written, finite, 0 in the batch column and
    # for unusable boxes; in float64 the reference's numbers.
    grad = boxes_backward(g, x, _zoo(), 1.0, channels_last)
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[:, 0], 0.0)
    for k, name in enumerate(NAMES):
        if name in UNUSABLE:
            assert not grad[k].any(), name
    if dtype == np.float64:
        np.testing.assert_allclose(grad, ref.prroi_pool_boxes_backward(g, x, _zoo(), OUT),
                                   **BOX_TOL[dtype])
    # The others alone, with gradient 1: each bin sends its 1 to pixels of
    # the map, non-negative and summing to at most sum(g).
    rest = [k for k in range(len(NAMES)) if k not in exact]
    if rest:
        ones = np.ones((len(rest),) + g.shape[1:], dtype)
        gx = pool_backward(ones, _zoo()[rest], x.shape, 1.0,
                           channels_last=channels_last).astype(np.float64)
        assert np.isfinite(gx).all() and (gx >= 0).all()
        assert gx.sum() <= ones.size * (1 + 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unusable_boxes_send_no_gradient(dtype):
    bad = sorted(UNUSABLE)
    x = np.ones((N, C, H, W), dtype)
    g = np.ones((len(bad), C) + OUT, dtype)
    assert not pool_backward(g, _zoo(bad), x.shape).any()
    assert not boxes_backward(g, x, _zoo(bad)).any()


@pytest.mark.parametrize("hw", [(1, 1), (1, 6), (5, 1), (2, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_small_maps(hw):
    h, w = hw
    x = np.random.default_rng(8).standard_normal((1, C, h, w))
    boxes = np.array([[0, 0, 0, w, h], [0, -0.7, -0.7, 0.3, 0.3], [0, 0.2, 0.1, w - 0.4, h],
                      [0, -2, -2, w + 2, h + 2], [0, w - 1, h - 1, w + 1, h + 1]])
    y = pool(x, boxes, OUT)
    np.testing.assert_allclose(y, ref.prroi_pool(x, boxes, OUT), **TOL[np.float64])
    assert np.count_nonzero(y)
    g = np.random.default_rng(9).standard_normal(y.shape)
    np.testing.assert_allclose(pool_backward(g, boxes, x.shape),
                               ref.prroi_pool_backward(g, boxes, x.shape, OUT),
                               **TOL[np.float64])
    np.testing.assert_allclose(boxes_backward(g, x, boxes),
                               ref.prroi_pool_boxes_backward(g, x, boxes, OUT),
                               **BOX_TOL[np.float64])


def test_huge_box_visits_only_the_map():
    # A box 2e18 pixels on a side with 63 x 63 bins: each bin is 3e16 pixels
    # wide and only the cells on and around the map are visited, so this
    # returns at once. The map lies within the middle bin, which holds its
    # integral over the bin's area; the others read 0. The box gradient
    # comes from that bin alone: its value over its size, for each corner.
    x = np.random.default_rng(14).standard_normal((1, 2, 16, 16)) + 1.0
    boxes = np.array([[0, -1e18, -1e18, 1e18, 1e18]])
    y = pool(x, boxes, 63)
    np.testing.assert_allclose(y, ref.prroi_pool(x, boxes, 63), rtol=1e-12, atol=0)
    assert np.count_nonzero(y) == 2 and (y[:, :, 31, 31] > 0).all()
    g = np.ones(y.shape)
    np.testing.assert_allclose(pool_backward(g, boxes, x.shape),
                               ref.prroi_pool_backward(g, boxes, x.shape, 63),
                               rtol=1e-12, atol=0)
    grad = boxes_backward(g, x, boxes)
    np.testing.assert_allclose(grad, ref.prroi_pool_boxes_backward(g, x, boxes, 63),
                               rtol=1e-9, atol=0)
    assert (grad[0, 1:3] > 0).all() and (grad[0, 3:] < 0).all()


@pytest.mark.parametrize("scale", [1e38, 3e38])
def test_scaled_box_that_overflows_float32_reads_nothing(scale):
    # float32 boxes scaled in float32: 5 * 1e38 is inf, and a bin whose
    # edges or size are not finite is empty.
    x = np.random.default_rng(12).standard_normal((1, C, H, W)).astype(np.float32)
    boxes = [[0, 1, 1, 5, 5], [0, -1, -1, -5, -5], [0, -3, -3, 3, 3]]
    ones = np.ones((3, C) + OUT, np.float32)
    assert not pool(x, boxes, OUT, scale).any()
    assert not pool_backward(ones, boxes, x.shape, scale).any()
    assert not boxes_backward(ones, x, boxes, scale).any()


def test_kernels_called_with_nothing_to_do_return_cleanly():
    # No boxes, no channels, no bins or an empty map: nothing to read, no
    # division by zero (direct ctypes calls); the box gradient still writes
    # its rows (zeros).
    x = np.zeros((1, 4, 6, 6), np.float32)
    boxes = np.array([[0, 1, 1, 4, 4]], np.float32)
    out = np.zeros((1, 4, 2, 2), np.float32)
    grad = np.zeros(x.shape, np.float32)
    for k, c, h, ph, pw in ((0, 4, 6, 2, 2), (1, 0, 6, 2, 2), (1, 4, 6, 0, 2),
                            (1, 4, 6, 2, 0), (1, 4, 0, 2, 2), (0, 0, 0, 0, 0)):
        for cl in (0, 1):
            _cpu.launch("prroi_pool", "forward", "float32",
                        (x, boxes, k, 1, c, h, 6, ph, pw, 1.0, cl, 1, out))
            _cpu.launch("prroi_pool", "backward", "float32",
                        (out, boxes, k, 1, c, h, 6, ph, pw, 1.0, cl, 1, grad))
            grad_rois = np.full((1, 5), np.nan, np.float32)
            _cpu.launch("prroi_pool", "boxes_backward", "float32",
                        (out, x, boxes, k, 1, c, h, 6, ph, pw, 1.0, cl, grad_rois))
            assert not grad_rois.any() if k else np.isnan(grad_rois).all()
    assert not grad.any() and not out.any()


def test_no_boxes_and_empty_maps():
    x = np.ones((N, C, H, W))
    none = np.zeros((0, 5))
    assert pool(x, none, OUT).shape == (0, C) + OUT
    g = np.zeros((0, C) + OUT)
    assert not pool_backward(g, none, x.shape).any()
    assert boxes_backward(g, x, none).shape == (0, 5)
    # A map with no pixels: zeros, and the box rows written.
    empty = np.ones((N, C, 0, W))
    boxes = _zoo(["inside", "whole-map"])
    assert not pool(empty, boxes, OUT).any()
    g = np.ones((2, C) + OUT)
    np.testing.assert_array_equal(boxes_backward(g, empty, boxes), 0.0)

"""RoI Align's gradient with respect to its boxes, at the kernel level:
curoi._ops.roi_align_boxes_backward on the CPU (and, from test_gpu_loops.py,
with the GPU's loop code; from test_sanitizers.py, under AddressSanitizer and
UndefinedBehaviorSanitizer, so this file imports only NumPy, curoi and the
references).

Expected values come from finite differences of the forward (float64, on
boxes whose samples stay away from pixel edges, where the forward is
differentiable), from hand computation on maps whose slopes are known, and
from the independent NumPy reference in tests/reference.py (written from the
chain rule through each sample's position, not from the kernels). Relations
between two curoi results (layouts, thread counts) are checked as the
properties they are: the same bits.
"""

import math

import numpy as np
import pytest

import curoi
import reference as ref
from curoi import _ops
from test_adversarial import EXTREME, HUGE, UNUSABLE, ZOO

DTYPES = (np.float32, np.float64)
CONFIGS = [pytest.param(aligned, ratio, id=f"aligned={aligned}-ratio={ratio}")
           for aligned in (True, False) for ratio in (0, 1, 2, 3)]


# ------------------------------------------------------------------ helpers
def _pair(o):
    return (o, o) if isinstance(o, int) else tuple(o)


def _rois(boxes, dtype):
    acc = np.float64 if dtype == np.float64 else np.float32
    return np.ascontiguousarray(np.asarray(boxes, np.float64).reshape(-1, 5), acc)


def _nhwc(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint32 if a.dtype.itemsize == 4 else np.uint64)


def forward(x, boxes, output_size, scale=1.0, ratio=2, aligned=True):
    ph, pw = _pair(output_size)
    out = np.full((len(boxes), x.shape[1], ph, pw), np.nan, x.dtype)
    _ops.roi_align_forward(np.ascontiguousarray(x), _rois(boxes, x.dtype), out,
                           scale, ratio, aligned)
    return out


def boxes_backward(g, x, boxes, scale=1.0, ratio=2, aligned=True,
                   channels_last=False):
    """grad_rois [K, 5] for NCHW g and x, run in either layout."""
    rois = _rois(boxes, x.dtype)
    grad = np.full(rois.shape, np.nan, rois.dtype)
    if channels_last:
        _ops.roi_align_boxes_backward(_nhwc(g), _nhwc(x), rois, grad, scale, ratio,
                                      aligned, channels_last=True)
    else:
        _ops.roi_align_boxes_backward(np.ascontiguousarray(g), np.ascontiguousarray(x),
                                      rois, grad, scale, ratio, aligned)
    return grad


def _away_from_edges(box, shape, output_size, scale, ratio, aligned, margin=1e-3):
    """Whether the forward is smooth around this box: every sample at least
    ``margin`` from an integer position (pixel edges, the clamped bands, the
    ends of the map), the adaptive grid size ``size / pooled`` and the
    unaligned size (against max(size, 1)) away from their jumps."""
    n_images, _, height, width = shape
    grid = ref._roi_align_grid(np.asarray(box, np.float64), n_images, output_size,
                               scale, ratio, aligned)
    if grid is None:
        return False
    _, start_h, start_w, bin_h, bin_w, grid_h, grid_w = grid
    ph, pw = _pair(output_size)

    def off_integers(v):
        return abs(v - round(v)) > margin

    _, x1, y1, x2, y2 = box
    for size, pooled in (((x2 - x1) * scale, pw), ((y2 - y1) * scale, ph)):
        if ratio <= 0 and not off_integers(size / pooled):
            return False
        if not aligned and abs(size - 1.0) <= margin:
            return False
    positions = [ref._sample_position(start_h, p, bin_h, i, grid_h)
                 for p in range(ph) for i in range(grid_h)]
    positions += [ref._sample_position(start_w, p, bin_w, i, grid_w)
                  for p in range(pw) for i in range(grid_w)]
    return all(off_integers(v) for v in positions)


def _smooth_boxes(rng, shape, output_size, scale, ratio, aligned, k,
                  kinds=("inside", "partly_out", "tiny", "reversed")):
    n, _, h, w = shape
    found = []
    while len(found) < k:
        box = ref.random_boxes(rng, n, h, w, scale, 1, kinds=kinds)[0]
        if _away_from_edges(box, shape, output_size, scale, ratio, aligned):
            found.append(box)
    return np.array(found)


@pytest.fixture
def restore_threads():
    before = curoi.get_num_threads()
    yield
    curoi.set_num_threads(before)


# ------------------------------------------------------- hand computations
def _ramp(shape, a, b, k):
    """value = a * row + b * column + k in every plane: its slope is a along
    y and b along x everywhere strictly inside the map."""
    n, c, h, w = shape
    rows, cols = np.mgrid[0:h, 0:w]
    return np.broadcast_to(a * rows + b * cols + k, shape).copy()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ratio", [1, 2, 0])
def test_a_ramp_moves_at_half_speed_with_each_corner(ratio, dtype, channels_last):
    # All samples strictly inside the map: with grad_output 1 everywhere,
    # sum over bins and samples of a = (p + (i + 0.5)/grid)/pooled has mean
    # 1/2, so d/dy1 = d/dy2 = A * s * bins / 2 per channel, and x alike.
    a, b, s = 0.75, -1.25, 0.5
    x = _ramp((2, 3, 9, 11), a, b, 2.0).astype(dtype)
    boxes = [[1, 2.2, 3.1, 14.6, 12.9], [0, 4.1, 2.5, 5.3, 14.2]]
    g = np.ones((2, 3, 2, 3), dtype)
    grad = boxes_backward(g, x, boxes, s, ratio, True, channels_last)
    bins_channels = 3 * 6
    want = np.array([0, b, a, b, a]) * s * bins_channels / 2
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for k in range(2):
        np.testing.assert_allclose(grad[k], want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_box_narrower_than_a_pixel_moves_with_its_first_corner(dtype):
    # aligned=False: a size below 1 becomes 1, a constant, so the samples
    # follow x1 alone (d/dx1 = s per sample) and x2 moves nothing.
    a, b = 0.5, 2.0
    x = _ramp((1, 1, 8, 8), a, b, 0.0).astype(dtype)
    boxes = [[0, 2.3, 3.4, 2.9, 4.1]]  # width 0.6, height 0.7: both clamped
    grad = boxes_backward(np.ones((1, 1, 2, 2), dtype), x, boxes, 1.0, 2, False)
    np.testing.assert_allclose(grad[0], [0, 4 * b, 4 * a, 0, 0], rtol=1e-6)
    # aligned=True keeps the size, and the corners share the motion.
    grad = boxes_backward(np.ones((1, 1, 2, 2), dtype), x, boxes, 1.0, 2, True)
    np.testing.assert_allclose(grad[0], [0, 2 * b, 2 * a, 2 * b, 2 * a], rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pixel_edges_and_clamped_bands(dtype):
    # Rows hold r**2 (0, 1, 4, 9, 16), constant along x: d value/d y at an
    # integer y inside the map is the slope of the cell below it, [y, y+1];
    # at y = 0 and y = H - 1 the forward clamps, slope 0; in [-1, 0) too.
    # One sample per bin (ratio 1, one bin, aligned=False, height 1 exactly:
    # the sample sits at y1 + 0.5); d/dy1 = d/dy2 = slope / 2.
    h = 5
    x = np.broadcast_to((np.arange(h) ** 2.0)[:, None], (h, 3))[None, None]
    x = np.ascontiguousarray(x).astype(dtype)
    cases = {  # sample y -> slope
        -0.5: 0.0, 0.0: 0.0, 0.25: 1.0, 1.0: 3.0, 2.0: 5.0, 3.0: 7.0,
        3.5: 7.0, 4.0: 0.0, 4.5: 0.0, 5.5: 0.0,
    }
    boxes = np.array([[0, 0.75, y - 0.5, 1.75, y + 0.5] for y in cases])
    grad = boxes_backward(np.ones((len(boxes), 1, 1, 1), dtype), x, boxes, 1.0, 1,
                          False)
    slopes = np.array(list(cases.values()))
    np.testing.assert_array_equal(grad[:, 2], slopes / 2)
    np.testing.assert_array_equal(grad[:, 4], slopes / 2)
    np.testing.assert_array_equal(grad[:, [0, 1, 3]], 0.0)  # no slope along x
    np.testing.assert_array_equal(
        grad, ref.roi_align_boxes_backward(np.ones((len(boxes), 1, 1, 1)), x, boxes,
                                           1, 1.0, 1, False))


def test_huge_sampling_ratio_is_summed_in_closed_form():
    # 2**31 - 1 samples per side: dense axes sum their slopes per pixel cell
    # in closed form. One bin; x inside the map, so every y sample weighs 1
    # along x; y from -0.5 to 2.5 on a 4-row ramp of slope A: samples at
    # y = -0.5 + 3u (u uniform in [0, 1]) move the value for y in (0, 3)
    # minus the last row's band at 3: u in (1/6, 1). So d/dy1 = A *
    # integral of (1 - u) = A * 25/72 and d/dy2 = A * integral of u = A *
    # 35/72, d/dx1 = d/dx2 = B/2.
    a, b = 0.6, -0.4
    x = _ramp((1, 2, 4, 9), a, b, 1.0)
    boxes = [[0, 1.5, -0.5, 6.5, 2.5]]
    g = np.ones((1, 2, 1, 1))
    grad = boxes_backward(g, x, boxes, 1.0, 2**31 - 1, False)
    np.testing.assert_allclose(grad[0], 2 * np.array([0, b / 2, a * 25 / 72, b / 2,
                                                      a * 35 / 72]), rtol=1e-6)
    grad32 = boxes_backward(g.astype(np.float32), x.astype(np.float32), boxes, 1.0,
                            2**31 - 1, False)
    np.testing.assert_allclose(grad32[0], grad[0], rtol=1e-3, atol=1e-4)


def test_dense_slopes_match_the_sample_by_sample_sum():
    # 300 samples per side, a quarter pixel apart or closer: the dense path
    # (roi_align_zone_slope) against the reference's loop over every sample,
    # on a random map, the box crossing both clamped bands.
    rng = np.random.default_rng(21)
    x = rng.standard_normal((1, 2, 5, 6))
    boxes = np.array([[0, -0.8, -0.6, 6.3, 4.7]])
    g = rng.standard_normal((1, 2, 1, 1))
    grad = boxes_backward(g, x, boxes, 1.0, 300, True)
    want = ref.roi_align_boxes_backward(g, x, boxes, 1, 1.0, 300, True)
    np.testing.assert_allclose(grad, want, rtol=1e-9, atol=1e-10)


# ------------------------------------------- finite differences, reference
@pytest.mark.parametrize("aligned, ratio", CONFIGS)
def test_matches_finite_differences(aligned, ratio):
    rng = np.random.default_rng(100 + 10 * aligned + ratio)
    shape, out, scale = (2, 3, 7, 8), (2, 3), 0.5
    x = rng.standard_normal(shape)
    boxes = _smooth_boxes(rng, shape, out, scale, ratio, aligned, 5)
    g = rng.standard_normal((len(boxes), shape[1]) + out)
    grad = boxes_backward(g, x, boxes, scale, ratio, aligned)
    eps = 1e-6
    fd = np.zeros_like(grad)
    for k, j in np.ndindex(len(boxes), 4):
        plus, minus = boxes.copy(), boxes.copy()
        plus[k, j + 1] += eps
        minus[k, j + 1] -= eps
        fd[k, j + 1] = np.sum(g * (forward(x, plus, out, scale, ratio, aligned)
                                   - forward(x, minus, out, scale, ratio, aligned))) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7)
    assert np.abs(grad).max() > 0.1  # not trivially zero


@pytest.mark.parametrize("aligned, ratio", CONFIGS)
def test_the_reference_matches_finite_differences_of_the_reference(aligned, ratio):
    # The reference checked on its own, against its own forward.
    rng = np.random.default_rng(200 + 10 * aligned + ratio)
    shape, out, scale = (1, 2, 6, 7), (2, 2), 1.0
    x = rng.standard_normal(shape)
    boxes = _smooth_boxes(rng, shape, out, scale, ratio, aligned, 3)
    g = rng.standard_normal((len(boxes), shape[1]) + out)
    want = ref.roi_align_boxes_backward(g, x, boxes, out, scale, ratio, aligned)
    eps = 1e-6
    for k, j in np.ndindex(len(boxes), 4):
        plus, minus = boxes.copy(), boxes.copy()
        plus[k, j + 1] += eps
        minus[k, j + 1] -= eps
        fd = np.sum(g * (ref.roi_align(x, plus, out, scale, ratio, aligned)
                         - ref.roi_align(x, minus, out, scale, ratio, aligned))) / (2 * eps)
        assert want[k, j + 1] == pytest.approx(fd, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned, ratio", CONFIGS)
@pytest.mark.parametrize("seed", range(3))
def test_matches_the_reference(seed, aligned, ratio, dtype):
    rng = np.random.default_rng(seed)
    n, c, h, w = 2, 3, int(rng.integers(4, 10)), int(rng.integers(4, 10))
    out = ((1, 1), (2, 2), (2, 3), (3, 1))[seed % 4]
    scale = (1.0, 0.5, 1 / 3)[seed % 3]
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    boxes = ref.random_boxes(rng, n, h, w, scale, 8)
    ref.spoil_boxes(rng, boxes, n, probability=1.0)
    boxes = _rois(boxes, dtype).astype(np.float64)  # the boxes the kernel sees
    g = rng.standard_normal((len(boxes), c) + out).astype(dtype)
    grad = boxes_backward(g, x, boxes, scale, ratio, aligned)
    want = ref.roi_align_boxes_backward(g, x, boxes, out, scale, ratio, aligned)
    if dtype == np.float64:
        np.testing.assert_allclose(grad, want, rtol=1e-12, atol=1e-12)
    else:
        # float32 positions: a sample within ~1e-6 of a pixel edge may take
        # the other cell; random boxes put none there in practice.
        np.testing.assert_allclose(grad, want, rtol=1e-4,
                                   atol=1e-5 * max(1.0, np.abs(want).max()))
    assert not grad[:, 0].any()


# --------------------------------------- layouts, thread counts, the finish
def _many_boxes(dtype, seed=5, k=70):
    rng = np.random.default_rng(seed)
    n, c, out, h, w = 2, 24, (3, 2), 9, 11
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    boxes = ref.random_boxes(rng, n, h, w, 1.0, k)
    g = rng.standard_normal((k, c) + out).astype(dtype)
    return x, boxes, g


@pytest.mark.parametrize("aligned, ratio", [(True, 0), (False, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nhwc_is_nchw_bit_for_bit(dtype, aligned, ratio):
    x, boxes, g = _many_boxes(dtype)
    nchw = boxes_backward(g, x, boxes, 1.0, ratio, aligned)
    nhwc = boxes_backward(g, x, boxes, 1.0, ratio, aligned, channels_last=True)
    assert np.array_equal(_bits(nchw), _bits(nhwc))
    assert np.isfinite(nchw).all() and np.abs(nchw).max() > 0


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_on_any_number_of_threads(dtype, channels_last, restore_threads):
    x, boxes, g = _many_boxes(dtype)
    runs = []
    for threads in (1, 3, 2):
        curoi.set_num_threads(threads)
        runs.append(boxes_backward(g, x, boxes, 1.0, 0, True, channels_last))
    for other in runs[1:]:
        assert np.array_equal(_bits(runs[0]), _bits(other))


def test_the_finish_adds_each_boxes_bins_in_order():
    # The second pass alone: grad_rois[k] = (0, sum of partial[k, :]), the
    # bins added first to last (the float32 sum below is not associative:
    # 1e8 + 1 - 1e8 in float32 is 0, 1 - 1e8 + 1e8 is 0 too, 1e8 - 1e8 + 1
    # is 1).
    partial = np.zeros((2, 3, 4), np.float32)
    partial[0, :, 0] = [1e8, 1.0, -1e8]
    partial[0, :, 1] = [1e8, -1e8, 1.0]
    partial[1] = np.arange(12, dtype=np.float32).reshape(3, 4)
    grad = np.full((2, 5), np.nan, np.float32)
    _ops._run("roi_align", "boxes_backward_finish", "float32",
              (partial, 2, 3, grad), 2, False)
    np.testing.assert_array_equal(grad, [[0, 0, 1, 0, 0], [0, 12, 15, 18, 21]])


# ---------------------------------------------------------------- adversarial
N, H, W = 2, 5, 7
OUT = (2, 3)
NAMES = list(ZOO)


def _zoo(names=NAMES):
    return np.array([ZOO[n] for n in names], np.float64)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("aligned, ratio", [(True, 0), (False, 0), (True, 2), (False, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_box_zoo(dtype, aligned, ratio, channels_last):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((N, 2, H, W)).astype(dtype)
    g = rng.standard_normal((len(NAMES), 2) + OUT).astype(dtype)
    grad = boxes_backward(g, x, _zoo(), 1.0, ratio, aligned, channels_last)
    assert np.isfinite(grad).all()
    assert not grad[:, 0].any()
    for k, name in enumerate(NAMES):
        if name in UNUSABLE:
            assert not grad[k].any(), name
    # float32 positions of samples that float64 puts exactly on a pixel edge
    # (partly-out's x = -3.5 + 4.5 * 7/9 = 0) fall on either side of it.
    checked = [k for k, n in enumerate(NAMES)
               if n not in UNUSABLE and not (n in HUGE and ratio <= 0)
               and not (dtype == np.float32 and (
                   n in EXTREME or not _away_from_edges(
                       ZOO[n], (N, 2, H, W), OUT, 1.0, ratio, aligned, 1e-4)))]
    want = ref.roi_align_boxes_backward(g[checked], x, _zoo()[checked], OUT, 1.0,
                                        ratio, aligned)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-3,
                                                                        atol=1e-3)
    np.testing.assert_allclose(grad[checked], want, **tol)
    assert np.abs(grad[NAMES.index("inside"), 1:]).min() > 0  # not vacuous


def test_a_box_around_the_map_costs_what_the_map_holds():
    # Adaptive sampling on a box of 2e9 pixels would mean 1e9 samples per
    # bin side; only those that land on the map are visited. A ramp inside
    # it: the samples spread over the box, so its corners barely move it.
    x = _ramp((1, 1, H, W), 1.0, 1.0, 0.0)
    grad = boxes_backward(np.ones((1, 1) + OUT), x, _zoo(["around-map-1e9"]), 1.0, 0,
                          True)
    assert np.isfinite(grad).all() and np.abs(grad).max() < 1e-6


def test_no_boxes_and_nothing_to_do():
    x = np.ones((N, 2, H, W))
    grad = np.zeros((0, 5))
    _ops.roi_align_boxes_backward(np.zeros((0, 2) + OUT), x, grad, grad, 1.0, 2, True)
    assert grad.shape == (0, 5)
    boxes = _zoo(["inside", "whole-map"])
    for shape, out in (((N, 2, 0, W), OUT), ((N, 0, H, W), OUT), ((N, 2, H, W), (0, 3)),
                       ((N, 2, H, W), (2, 0))):
        grad = np.full((2, 5), np.nan)
        _ops.roi_align_boxes_backward(np.ones((2, shape[1]) + out), np.ones(shape),
                                      boxes, grad, 1.0, 2, True)
        np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("scale", [1e38, 3e38])
def test_scaled_box_that_overflows_float32_moves_nothing(scale):
    x = np.random.default_rng(12).standard_normal((1, 2, H, W)).astype(np.float32)
    boxes = [[0, 1, 1, 5, 5], [0, -1, -1, -5, -5]]
    for ratio in (0, 2):
        grad = boxes_backward(np.ones((2, 2) + OUT, np.float32), x, boxes, scale, ratio)
        np.testing.assert_array_equal(grad, 0.0)


def test_non_finite_features_stay_in_their_boxes():
    # A NaN in the map reaches the boxes whose samples read it, only those.
    x = np.random.default_rng(13).standard_normal((N, 2, H, W))
    x[1, 0, 2, 3] = np.nan
    boxes = _zoo(["inside", "other-image", "batch-N", "whole-map"])
    grad = boxes_backward(np.ones((4, 2) + OUT), x, boxes, 1.0, 2, True)
    assert np.isnan(grad[1]).any() and np.isnan(grad[3]).any()
    assert np.isfinite(grad[[0, 2]]).all()
    assert not math.isnan(grad[1, 0])

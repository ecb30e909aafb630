"""Rotated RoI Align's gradient with respect to its boxes, at the kernel
level: curoi._ops.roi_align_rotated_boxes_backward on the CPU (and, from
test_gpu_loops.py, with the GPU's loop code; from test_sanitizers.py, under
AddressSanitizer and UndefinedBehaviorSanitizer, so this file imports only
NumPy, curoi, the references and the rotated kernels' tests).

Expected values come from central finite differences of the forward
(float64, on boxes whose samples stay away from pixel edges, where the
forward is differentiable), from hand computation on maps whose slopes are
known, and from the independent NumPy reference in tests/reference.py
(written from the chain rule through each sample's position, not from the
kernels). Relations between two curoi results (layouts, thread counts,
conventions) are checked as the properties they are: the same bits.
"""

import math

import numpy as np
import pytest

import curoi
import reference as ref
from curoi import _ops
from test_roi_align_rotated_kernels import ABSURD, FAR, UNUSABLE, ZOO, random_rotated_boxes

DTYPES = (np.float32, np.float64)
# (convention, aligned, clockwise): detectron2 has neither flag.
CONFIGS = [pytest.param(*c, id="-".join(map(str, c))) for c in (
    ("detectron2", True, False), ("mmcv", True, False), ("mmcv", True, True),
    ("mmcv", False, False), ("mmcv", False, True))]


# ------------------------------------------------------------------ helpers
def _pair(o):
    return (o, o) if isinstance(o, int) else tuple(o)


def _rois(boxes, dtype):
    acc = np.float64 if dtype == np.float64 else np.float32
    return np.ascontiguousarray(np.asarray(boxes, np.float64).reshape(-1, 6), acc)


def _nhwc(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint32 if a.dtype.itemsize == 4 else np.uint64)


def _turn(convention):
    return 360.0 if convention == "detectron2" else 2 * math.pi


def forward(x, boxes, output_size, scale, ratio, convention, aligned, clockwise):
    ph, pw = _pair(output_size)
    out = np.full((len(boxes), x.shape[1], ph, pw), np.nan, x.dtype)
    _ops.roi_align_rotated_forward(np.ascontiguousarray(x), _rois(boxes, x.dtype), out,
                                   scale, ratio, convention, aligned, clockwise)
    return out


def boxes_backward(g, x, boxes, scale, ratio, convention="detectron2", aligned=True,
                   clockwise=False, channels_last=False):
    """grad_rois [K, 6] for NCHW g and x, run in either layout; NaN before
    the call, so that an entry the kernels leave alone shows."""
    rois = _rois(boxes, x.dtype)
    grad = np.full(rois.shape, np.nan, rois.dtype)
    if channels_last:
        g, x = _nhwc(g), _nhwc(x)
    _ops.roi_align_rotated_boxes_backward(np.ascontiguousarray(g), np.ascontiguousarray(x),
                                          rois, grad, scale, ratio, convention, aligned,
                                          clockwise, channels_last=channels_last)
    return grad


def _away_from_edges(box, shape, output_size, scale, ratio, convention, aligned,
                     clockwise, margin=1e-3):
    """Whether the forward is smooth around this box: every sample at least
    ``margin`` from an integer coordinate (pixel edges, the clamped bands,
    the ends of the map), the adaptive grid size ``size / pooled`` and
    mmcv's unaligned size (against max(size, 1)) away from their jumps."""
    n_images = shape[0]
    if ref._batch_index(box, n_images) is None:
        return False
    geometry = ref._rotated_geometry(box, scale, convention, aligned, clockwise)
    if geometry is None:
        return False
    _, _, h, w, _ = geometry
    ph, pw = _pair(output_size)

    def off_integers(v):
        return abs(v - round(v)) > margin

    if ratio <= 0 and not (off_integers(h / ph) and off_integers(w / pw)):
        return False
    if convention == "mmcv" and not aligned:
        if min(abs(box[3] * scale - 1), abs(box[4] * scale - 1)) <= margin:
            return False
    _, _, _, bins = ref._rotated_points(geometry, shape, output_size, ratio, clip=True)
    return all(off_integers(y) and off_integers(x)
               for row in bins for points in row for *_, y, x in points)


def _smooth_boxes(rng, shape, output_size, scale, ratio, config, k, tries=500):
    """k boxes (centres on and near the map, sizes from under a pixel to past
    the map, any angle) on which the forward is smooth; fails if too few of
    the candidates are."""
    n, _, h, w = shape
    convention = config[0]
    found = []
    for _ in range(tries):
        size = rng.choice([rng.uniform(0.2, 0.95), rng.uniform(1.1, 1.2 * max(h, w))])
        box = [rng.integers(n), rng.uniform(-1, w + 1) / scale,
               rng.uniform(-1, h + 1) / scale, size / scale,
               rng.uniform(0.3, 1.0) * max(h, w) / scale,
               rng.uniform(-1, 1) * _turn(convention)]
        if rng.random() < 0.5:
            box[3], box[4] = box[4], box[3]
        if _away_from_edges(box, shape, output_size, scale, ratio, *config):
            found.append(box)
            if len(found) == k:
                return np.array(found)
    pytest.fail(f"only {len(found)} of {k} boxes found away from pixel edges")


@pytest.fixture
def restore_threads():
    before = curoi.get_num_threads()
    yield
    curoi.set_num_threads(before)


# ------------------------------------------------------- hand computations
RAMP = (0.75, -0.3125, 2.0)  # f(y, x) = A*y + B*x + C


def _ramp_map(dtype, h=14, w=16):
    """Channel 0 the ramp, channel 1 twice the ramp plus 1: slopes (A, B)
    and (2A, 2B) wherever the four taps of a sample are on the map."""
    a, b, c = RAMP
    ys, xs = np.mgrid[0:h, 0:w]
    plane = a * ys + b * xs + c
    return np.stack([np.stack([plane, 2 * plane + 1])]).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ratio", [1, 2, 0])
@pytest.mark.parametrize("convention, aligned, clockwise", CONFIGS)
def test_a_ramp_moves_with_the_turned_bin_centres(convention, aligned, clockwise, ratio,
                                                  dtype):
    # On a ramp a bin's value is the ramp at its turned centre (the samples
    # are symmetric about it): with yy_c = h*((ph + 0.5)/PH - 1/2) = h*f_y,
    # xx_c = w*f_x, y_c = yy_c cos - xx_c sin + cy, x_c = yy_c sin + xx_c cos
    # + cx, value = A*y_c + B*x_c + C, so by hand
    #   d/dcx = s*B, d/dcy = s*A, d/dw = s*f_x*(B cos - A sin),
    #   d/dh = s*f_y*(A cos + B sin),
    #   d/dangle = u*(B*(yy_c cos - xx_c sin) - A*(yy_c sin + xx_c cos)),
    # u = pi/180 in degrees, 1 in radians, -1 clockwise; w (h) a constant 1
    # where mmcv's unaligned max(size, 1) picks 1 (the second box's width).
    x = _ramp_map(dtype)
    a, b, _ = RAMP
    s, out = 0.5, (2, 3)
    degrees = [17.0, -60.0, 200.0]
    unit = 1.0 if convention == "detectron2" else math.pi / 180
    boxes = np.array([[0, 15.4, 13.8, 10.4, 8.8, degrees[0] * unit],
                      [0, 16.2, 12.6, 1.4, 7.0, degrees[1] * unit],
                      [0, 14.0, 14.0, 5.0, 9.0, degrees[2] * unit]])
    rng = np.random.default_rng(1)
    g = rng.standard_normal((len(boxes), 2) + out).astype(dtype)
    grad = boxes_backward(g, x, boxes, s, ratio, convention, aligned, clockwise)
    shifted = convention == "detectron2" or aligned
    u = math.pi / 180 if convention == "detectron2" else (-1.0 if clockwise else 1.0)
    for k, box in enumerate(boxes):
        geometry = ref._rotated_geometry(box, s, convention, aligned, clockwise)
        _, _, _, bins = ref._rotated_points(geometry, x.shape, out, ratio, clip=False)
        ys = [y for row in bins for points in row for *_, y, _ in points]
        xs = [xx for row in bins for points in row for *_, xx in points]
        # The guard on the test data: every sample strictly inside.
        assert 1 < min(ys) and max(ys) < 12 and 1 < min(xs) and max(xs) < 14
        w, h = box[3] * s, box[4] * s
        dw = dh = s
        if not shifted and w < 1:
            w, dw = 1.0, 0.0
        t = u * box[5]
        cos_t, sin_t = math.cos(t), math.sin(t)
        want = np.zeros(6)
        for ph, pw in np.ndindex(*out):
            weight = g[k, 0, ph, pw] + 2 * g[k, 1, ph, pw]  # the channels' slopes
            f_y, f_x = (ph + 0.5) / out[0] - 0.5, (pw + 0.5) / out[1] - 0.5
            yy, xx = h * f_y, w * f_x
            want += weight * np.array([
                0, s * b, s * a, dw * f_x * (b * cos_t - a * sin_t),
                dh * f_y * (a * cos_t + b * sin_t),
                u * (b * (yy * cos_t - xx * sin_t) - a * (yy * sin_t + xx * cos_t))])
        tol = 1e-12 if dtype == np.float64 else 2e-5
        np.testing.assert_allclose(grad[k], want, rtol=tol, atol=tol * np.abs(want).max())
    if not shifted:
        assert grad[1, 3] == 0  # the clamped width moves nothing


@pytest.mark.parametrize("dtype", DTYPES)
def test_pixel_edges_and_clamped_bands(dtype):
    # Rows hold r**2 (0, 1, 4, 9, 16), constant along x: d value/d y at an
    # integer y inside the map is the slope of the cell below it, [y, y+1];
    # at y = 0 and y = H - 1 the forward clamps, slope 0; in [-1, 0) and
    # (H - 1, H] too, and past them the sample reads nothing. One bin, one
    # sample, at the box centre (y, x) = (cy - 0.5, 1.0) (detectron2's
    # half-pixel shift), turned by 30 degrees (which moves nothing there):
    # d/dcy = slope, and the rest 0 (no slope along x; the centre's f_x,
    # f_y, yy and xx are 0).
    h = 5
    x = np.broadcast_to((np.arange(h) ** 2.0)[:, None], (h, 3))[None, None]
    x = np.ascontiguousarray(x).astype(dtype)
    cases = {  # sample y -> slope
        -1.5: 0.0, -0.5: 0.0, 0.0: 0.0, 0.25: 1.0, 1.0: 3.0, 2.0: 5.0, 3.0: 7.0,
        3.5: 7.0, 4.0: 0.0, 4.5: 0.0, 5.5: 0.0,
    }
    boxes = np.array([[0, 1.5, y + 0.5, 1.0, 1.0, 30.0] for y in cases])
    grad = boxes_backward(np.ones((len(boxes), 1, 1, 1), dtype), x, boxes, 1.0, 1)
    np.testing.assert_array_equal(grad[:, 2], list(cases.values()))
    np.testing.assert_array_equal(grad[:, [0, 1, 3, 4, 5]], 0.0)
    np.testing.assert_array_equal(
        grad, ref.roi_align_rotated_boxes_backward(np.ones((len(boxes), 1, 1, 1)), x,
                                                   boxes, 1, 1.0, 1))


def test_a_quarter_turn_moves_the_samples_along_y_with_the_width():
    # A box turned by 90 degrees counter-clockwise: xx runs along -y
    # (y = -xx + cy, x = cx). One bin row, two bin columns, one sample each,
    # at xx = -w/4 and +w/4: y = cy + w/4 and cy - w/4. On rows r**2 the
    # slopes there are 2*floor(y) + 1. With grad_output (1, 0) only the
    # first bin counts: d/dcy = slope(cy + w/4), d/dw = slope / 4 (f_x =
    # -1/4, dy/dw = -f_x), d/dangle = (pi/180) * slope * (-(yy sin + xx
    # cos)) = 0 up to cos(90 degrees) ~ 6e-17, and in radians (mmcv) the
    # same with u = 1.
    h, w = 9, 6
    x = np.ascontiguousarray(
        np.broadcast_to((np.arange(h) ** 2.0)[:, None], (h, w))[None, None])
    g = np.array([1.0, 0.0]).reshape(1, 1, 1, 2)
    box = [0, 2.7, 4.3, 4.4, 1.0]  # centre (y, x) = (3.8, 2.2); samples at y = 4.9, 2.7
    for convention, angle in (("detectron2", 90.0), ("mmcv", math.pi / 2)):
        grad = boxes_backward(g, x, np.array([box + [angle]]), 1.0, 1, convention)
        np.testing.assert_allclose(grad[0], [0, 0, 9.0, 9.0 / 4, 0, 0], atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conventions_relate_by_units_and_direction(dtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 10, 11)).astype(dtype)
    boxes = random_rotated_boxes(rng, 2, 10, 11, 20, "mmcv")
    g = rng.standard_normal((20, 3, 2, 3)).astype(dtype)
    mmcv = boxes_backward(g, x, boxes, 0.5, 2, "mmcv", True, False)
    assert np.abs(mmcv[:, 5]).max() > 0.1
    # clockwise with the angle negated is the same box: the same bits in
    # every column but the angle's, whose sign flips with the unit's.
    flipped = boxes.copy()
    flipped[:, 5] *= -1
    clockwise = boxes_backward(g, x, flipped, 0.5, 2, "mmcv", True, True)
    assert np.array_equal(_bits(clockwise[:, :5]), _bits(mmcv[:, :5]))
    np.testing.assert_array_equal(clockwise[:, 5], -mmcv[:, 5])  # exactly (0 == -0)
    # Degrees (detectron2, the same half-pixel shift): d/d degree is
    # d/d radian times pi/180, up to the rounding of the angle.
    degrees = boxes.copy()
    degrees[:, 5] = np.degrees(boxes[:, 5])
    d2 = boxes_backward(g, x, degrees, 0.5, 2, "detectron2")
    want = mmcv * np.array([1, 1, 1, 1, 1, math.pi / 180])
    tol = 1e-10 if dtype == np.float64 else 2e-3
    np.testing.assert_allclose(d2, want, rtol=tol, atol=tol * np.abs(want).max())
    # detectron2 has neither `aligned` nor `clockwise`: both are ignored.
    for aligned, cw in ((False, False), (False, True), (True, True)):
        other = boxes_backward(g, x, degrees, 0.5, 2, "detectron2", aligned, cw)
        assert np.array_equal(_bits(other), _bits(d2))


# ------------------------------------------- finite differences, reference
@pytest.mark.parametrize("ratio", [2, 0])
@pytest.mark.parametrize("convention, aligned, clockwise", CONFIGS)
def test_matches_finite_differences(convention, aligned, clockwise, ratio):
    config = (convention, aligned, clockwise)
    rng = np.random.default_rng(100 + 10 * ratio + 2 * aligned + clockwise
                                + 50 * (convention == "mmcv"))
    shape, out, scale = (2, 3, 7, 8), (2, 3), 0.5
    x = rng.standard_normal(shape)
    boxes = _smooth_boxes(rng, shape, out, scale, ratio, config, 4)
    g = rng.standard_normal((len(boxes), shape[1]) + out)
    args = (scale, ratio) + config
    grad = boxes_backward(g, x, boxes, *args)
    eps = 1e-6
    fd = np.zeros_like(grad)
    for k, j in np.ndindex(len(boxes), 5):
        plus, minus = boxes.copy(), boxes.copy()
        plus[k, j + 1] += eps
        minus[k, j + 1] -= eps
        fd[k, j + 1] = np.sum(g * (forward(x, plus, out, *args)
                                   - forward(x, minus, out, *args))) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7)
    # Not vacuous: every column moves some box.
    assert (np.abs(grad[:, 1:]).max(axis=0) > 0.01).all()
    if convention == "mmcv" and not aligned:
        clamped = boxes[:, 3:5] * scale < 1
        assert clamped.any()
        assert not grad[:, 3:5][clamped].any()


@pytest.mark.parametrize("convention, aligned, clockwise",
                         [("detectron2", True, False), ("mmcv", False, True)])
def test_the_reference_matches_finite_differences_of_the_reference(convention, aligned,
                                                                   clockwise):
    # The reference checked on its own, against its own forward.
    config = (convention, aligned, clockwise)
    rng = np.random.default_rng(200 + aligned)
    shape, out, scale = (1, 2, 6, 7), (2, 2), 1.0
    x = rng.standard_normal(shape)
    boxes = _smooth_boxes(rng, shape, out, scale, 0, config, 2)
    g = rng.standard_normal((len(boxes), shape[1]) + out)
    want = ref.roi_align_rotated_boxes_backward(g, x, boxes, out, scale, 0, *config)
    eps = 1e-6
    for k, j in np.ndindex(len(boxes), 5):
        plus, minus = boxes.copy(), boxes.copy()
        plus[k, j + 1] += eps
        minus[k, j + 1] -= eps
        fd = np.sum(g * (ref.roi_align_rotated(x, plus, out, scale, 0, *config)
                         - ref.roi_align_rotated(x, minus, out, scale, 0, *config))
                    ) / (2 * eps)
        assert want[k, j + 1] == pytest.approx(fd, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ratio", [2, 0])
@pytest.mark.parametrize("convention, aligned, clockwise", CONFIGS)
def test_matches_the_reference(convention, aligned, clockwise, ratio, dtype):
    config = (convention, aligned, clockwise)
    rng = np.random.default_rng(300 + 10 * ratio + 2 * aligned + clockwise
                                + 50 * (convention == "mmcv"))
    n, c = 2, 3
    h, w = int(rng.integers(4, 9)), int(rng.integers(4, 9))
    out, scale = (2, 3), 0.8
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    boxes = random_rotated_boxes(rng, n, h, w, 12, convention)
    boxes[:, 1:5] /= scale
    boxes = _rois(boxes, dtype).astype(np.float64)  # the boxes the kernel sees
    g = rng.standard_normal((len(boxes), c) + out).astype(dtype)
    grad = boxes_backward(g, x, boxes, scale, ratio, *config)
    want = ref.roi_align_rotated_boxes_backward(g, x, boxes, out, scale, ratio, *config,
                                                clip=True)
    assert not grad[:, 0].any()
    # Not vacuous (many random boxes lie off the map, or have no samples).
    assert (np.abs(want[:, 1:]).max(axis=1) > 0).sum() >= 3
    if dtype == np.float64:
        np.testing.assert_allclose(grad, want, rtol=1e-10,
                                   atol=1e-10 * np.abs(want).max())
        return
    # float32 positions: a sample within ~1e-6 of a pixel edge may take the
    # other cell; only boxes whose samples keep clear of the edges compare.
    clear = [k for k, box in enumerate(boxes)
             if _away_from_edges(box, x.shape, out, scale, ratio, *config, margin=1e-4)]
    assert len(clear) >= len(boxes) // 2
    np.testing.assert_allclose(grad[clear], want[clear], rtol=1e-3,
                               atol=1e-4 * np.abs(want).max())


# --------------------------------------- layouts, thread counts, the finish
def _many_boxes(dtype, convention, seed=5, k=40):
    rng = np.random.default_rng(seed)
    n, c, out, h, w = 2, 5, (3, 2), 9, 11
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    boxes = random_rotated_boxes(rng, n, h, w, k, convention)
    g = rng.standard_normal((k, c) + out).astype(dtype)
    return x, boxes, g


@pytest.mark.parametrize("convention, aligned, ratio", [("detectron2", True, 0),
                                                        ("mmcv", False, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nhwc_is_nchw_bit_for_bit(dtype, convention, aligned, ratio):
    x, boxes, g = _many_boxes(dtype, convention)
    args = (0.9, ratio, convention, aligned, False)
    nchw = boxes_backward(g, x, boxes, *args)
    nhwc = boxes_backward(g, x, boxes, *args, channels_last=True)
    assert np.array_equal(_bits(nchw), _bits(nhwc))
    assert np.isfinite(nchw).all() and np.abs(nchw).max() > 0


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_on_any_number_of_threads(dtype, channels_last, restore_threads):
    x, boxes, g = _many_boxes(dtype, "mmcv", k=70)
    runs = []
    for threads in (1, 3, 2):
        curoi.set_num_threads(threads)
        runs.append(boxes_backward(g, x, boxes, 1.0, 0, "mmcv", True, True,
                                   channels_last))
    for other in runs[1:]:
        assert np.array_equal(_bits(runs[0]), _bits(other))


def test_the_finish_adds_each_boxes_bins_in_order():
    # The second pass alone: grad_rois[k] = (0, sum of partial[k, :]), the
    # bins added first to last (the float32 sum below is not associative:
    # 1e8 + 1 - 1e8 in float32 is 0, 1 - 1e8 + 1e8 is 0 too, 1e8 - 1e8 + 1
    # is 1).
    partial = np.zeros((2, 3, 5), np.float32)
    partial[0, :, 0] = [1e8, 1.0, -1e8]
    partial[0, :, 1] = [1e8, -1e8, 1.0]
    partial[0, :, 4] = [1.0, 1e8, -1e8]
    partial[1] = np.arange(15, dtype=np.float32).reshape(3, 5)
    grad = np.full((2, 6), np.nan, np.float32)
    _ops._run("roi_align_rotated", "boxes_backward_finish", "float32",
              (partial, 2, 3, grad), 10, False)
    np.testing.assert_array_equal(grad, [[0, 0, 1, 0, 0, 0], [0, 15, 18, 21, 24, 27]])


# ---------------------------------------------------------------- adversarial
N, C, H, W = 2, 2, 5, 7
OUT = (2, 3)
NAMES = list(ZOO)


def _zoo(names, convention):
    boxes = np.array([ZOO[n] for n in names], np.float64)
    if convention == "mmcv":
        boxes[:, 5] /= 57.3
    return boxes


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("ratio", [0, 2])
@pytest.mark.parametrize("convention, aligned", [("detectron2", True), ("mmcv", False)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_box_zoo(dtype, convention, aligned, ratio, channels_last):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    g = rng.standard_normal((len(NAMES), C) + OUT).astype(dtype)
    boxes = _zoo(NAMES, convention)
    args = (1.0, ratio, convention, aligned, False)
    grad = boxes_backward(g, x, boxes, *args, channels_last=channels_last)
    assert np.isfinite(grad).all()
    assert not grad[:, 0].any()
    for k, name in enumerate(NAMES):
        if name in UNUSABLE:
            assert not grad[k].any(), name
    # Float kernels reduce radians beyond 1e5 modulo float's 2*pi: a float32
    # box turned by 1.7e7 radians is checked for finiteness only, as are
    # boxes beyond 1e6 (float32) or 1e12 (float64), where the coordinates are
    # a pixel apart or worse.
    rough = FAR | ({"huge-angle"} if convention == "mmcv" else set())
    seen = _rois(boxes, dtype).astype(np.float64)
    checked = [k for k, n in enumerate(NAMES)
               if n not in UNUSABLE and n not in ABSURD
               and not (dtype == np.float32 and (n in rough or not _away_from_edges(
                   seen[k], x.shape, OUT, *args, margin=1e-4)))]
    want = ref.roi_align_rotated_boxes_backward(g[checked], x, seen[checked], OUT, *args,
                                                clip=True)
    tol = 1e-10 if dtype == np.float64 else 1e-3
    np.testing.assert_allclose(grad[checked], want, rtol=tol,
                               atol=tol * max(1.0, np.abs(want).max()))
    assert np.abs(grad[NAMES.index("inside"), 1:]).min() > 0  # not vacuous


def test_a_box_around_the_map_costs_what_the_map_holds():
    # Adaptive sampling on a box of 2e9 pixels would mean about 1e9 samples
    # per bin side; only those that land on the map are visited (the test
    # would not finish otherwise). A ramp inside it: the samples on the map
    # move with the box's centre as the ramp's slope says, times their share
    # of the samples, which is tiny.
    x = np.concatenate([_ramp_map(np.float64, H, W)] * N)
    boxes = _zoo(["around-map-1e9", "around-map-1e20"], "detectron2")
    grad = boxes_backward(np.ones((2, 2) + OUT), x, boxes, 1.0, 0)
    assert np.isfinite(grad).all()
    assert np.abs(grad[:, 1:3]).max() < 1e-6
    want = ref.roi_align_rotated_boxes_backward(np.ones((1, 2) + OUT), x, boxes[:1], OUT,
                                                1.0, 0, clip=True)
    np.testing.assert_allclose(grad[:1], want, rtol=1e-9, atol=1e-20)


def test_no_boxes_and_nothing_to_do():
    x = np.ones((N, C, H, W))
    grad = np.zeros((0, 6))
    _ops.roi_align_rotated_boxes_backward(np.zeros((0, C) + OUT), x, grad, grad, 1.0, 2,
                                          "detectron2", True, False)
    assert grad.shape == (0, 6)
    boxes = _zoo(["inside", "whole-map-turned"], "detectron2")
    for shape, out in (((N, C, 0, W), OUT), ((N, 0, H, W), OUT), ((N, C, H, W), (0, 3)),
                       ((N, C, H, W), (2, 0))):
        grad = np.full((2, 6), np.nan)
        _ops.roi_align_rotated_boxes_backward(np.ones((2, shape[1]) + out),
                                              np.ones(shape), boxes, grad, 1.0, 2,
                                              "detectron2", True, False)
        np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("scale", [1e38, 3e38])
def test_scaled_box_that_overflows_float32_moves_nothing(scale):
    x = np.random.default_rng(12).standard_normal((1, C, H, W)).astype(np.float32)
    boxes = [[0, 3, 2, 3, 3, 10], [0, -3, -2, 3, 3, 10]]
    for convention in ("detectron2", "mmcv"):
        for ratio in (0, 2):
            grad = boxes_backward(np.ones((2, C) + OUT, np.float32), x, boxes, scale,
                                  ratio, convention)
            np.testing.assert_array_equal(grad, 0.0)


def test_non_finite_features_stay_in_their_boxes():
    # A NaN in the map reaches the boxes whose samples read it, only those.
    x = np.random.default_rng(13).standard_normal((N, C, H, W))
    x[1, 0, 2, 3] = np.nan
    # The last box samples rows 0-2, columns 5-6 of image 1 (centre (y, x) =
    # (0.8, 5.7), one pixel square).
    boxes = np.concatenate([_zoo(["inside", "other-image", "batch-N"], "detectron2"),
                            [[1, 6.2, 1.3, 1.0, 1.0, 10.0]]])
    grad = boxes_backward(np.ones((4, C) + OUT), x, boxes, 1.0, 2)
    assert np.isnan(grad[1, 1:]).all()  # (2, 3) lies inside, under every slope
    assert np.isfinite(grad[[0, 2, 3]]).all()  # image 0; unusable; elsewhere
    assert not grad[2].any() and np.abs(grad[3]).max() > 0
    assert not math.isnan(grad[1, 0])

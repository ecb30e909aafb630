"""Crop and resize (TensorFlow's tf.image.crop_and_resize) at the kernel
level: curoi._ops on the CPU (and, from test_gpu_loops.py, with the GPU's
loop code; from test_sanitizers.py, under AddressSanitizer and
UndefinedBehaviorSanitizer, where the TensorFlow comparisons skip: TF is not
loaded into an instrumented process).

Expected values come from hand computation, from the independent NumPy
reference in tests/reference.py (written from TF's kernels, not from
curoi's), from TensorFlow itself (tf.image.crop_and_resize and its gradients
through tf.GradientTape) and from finite differences; relations between two
curoi results (layouts, thread counts, the two sums of the image gradient)
are checked as the properties they are.

Images and crops are channels-last here ([N, H, W, C], [K, PH, PW, C]: TF's
layout and the kernels' default); the NCHW kernels run on transposed copies
and their results are transposed back.
"""

import os

import numpy as np
import pytest

import curoi
import reference as ref
from curoi import _cpu, _ops

DTYPES = (np.float32, np.float64)
METHODS = ("bilinear", "nearest")
# float64 differs from the float64 reference only by summation order;
# float32 also by computing coordinates and interpolating in float32.
TOL = {np.float64: dict(rtol=1e-12, atol=1e-12),
       np.float32: dict(rtol=1e-5, atol=1e-5)}


# ------------------------------------------------------------------ helpers
def _acc(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _boxes(boxes, dtype):
    """Boxes in the accumulation dtype, as the kernels take them (float64
    boxes beyond float32's range turn infinite in float32)."""
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(np.asarray(boxes, np.float64).reshape(-1, 4),
                                    _acc(dtype))


def _rois(boxes, box_indices, dtype):
    """TensorFlow's boxes and box_indices as the kernels take them: one
    [K, 5] array (box index, y1, x1, y2, x2) in the accumulation dtype."""
    boxes = _boxes(boxes, dtype)
    rois = np.empty((boxes.shape[0], 5), boxes.dtype)
    rois[:, 0] = box_indices
    rois[:, 1:] = boxes
    return rois


def _nchw(a):
    return np.ascontiguousarray(np.moveaxis(a, -1, 1))


def _nhwc(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def crop(image, boxes, box_indices, crop_size, method="bilinear", extrapolation=0.0,
         channels_last=True):
    """The forward of channels-last ``image``; a channels-last result
    whatever the layout run."""
    k, (ph, pw), c = len(box_indices), crop_size, image.shape[-1]
    x = np.ascontiguousarray(image) if channels_last else _nchw(image)
    out = np.full((k, ph, pw, c) if channels_last else (k, c, ph, pw), np.nan, image.dtype)
    _ops.crop_and_resize_forward(x, _rois(boxes, box_indices, image.dtype), out,
                                 method, extrapolation, channels_last=channels_last)
    return out if channels_last else _nhwc(out)


def crop_backward(g, boxes, box_indices, image_shape, method="bilinear",
                  deterministic=False, channels_last=True):
    """The image gradient for channels-last ``g``, channels-last."""
    n, h, w, c = image_shape
    gs = np.ascontiguousarray(g) if channels_last else _nchw(g)
    gx = np.full((n, h, w, c) if channels_last else (n, c, h, w), np.nan, _acc(g.dtype))
    _ops.crop_and_resize_backward(gs, _rois(boxes, box_indices, g.dtype), gx,
                                  method, deterministic=deterministic,
                                  channels_last=channels_last)
    return gx if channels_last else _nhwc(gx)


def crop_boxes_backward(g, image, boxes, box_indices, method="bilinear",
                        channels_last=True):
    """The box gradient ``[K, 4]`` for channels-last ``g`` and ``image``."""
    gs = np.ascontiguousarray(g) if channels_last else _nchw(g)
    x = np.ascontiguousarray(image) if channels_last else _nchw(image)
    gb = np.full((len(box_indices), 5), np.nan, _acc(image.dtype))
    _ops.crop_and_resize_boxes_backward(gs, x, _rois(boxes, box_indices, image.dtype),
                                        gb, method, channels_last=channels_last)
    assert not gb[:, 0].any()  # the box-index column gets no gradient
    return gb[:, 1:]


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint32 if a.dtype.itemsize == 4 else np.uint64)


def _random_boxes(rng, k):
    """Normalised boxes of every kind: inside the image, partly or wholly
    outside, flipped, of zero size, tiny."""
    boxes = np.empty((k, 4))
    for i in range(k):
        for lo, hi in ((0, 2), (1, 3)):
            kind = rng.integers(6)
            if kind == 0:     # inside
                a, b = np.sort(rng.uniform(0, 1, 2))
            elif kind == 1:   # partly out
                a, b = np.sort(rng.uniform(-0.6, 1.6, 2))
            elif kind == 2:   # wholly out
                a = rng.uniform(1.1, 2.0) * rng.choice([-1, 1])
                b = a + rng.uniform(0, 0.5)
            elif kind == 3:   # flipped
                b, a = np.sort(rng.uniform(-0.2, 1.2, 2))
            elif kind == 4:   # zero size
                a = b = rng.uniform(-0.1, 1.1)
            else:             # tiny
                a = rng.uniform(0, 1)
                b = a + rng.uniform(0, 0.05)
            boxes[i, lo], boxes[i, hi] = a, b
    return boxes


def _random_case(seed, dtype, k_max=8):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4))
    h, w = (int(v) for v in rng.integers(1, 10, 2))
    if rng.random() < 0.8:  # mostly real images; sometimes one pixel wide
        h, w = max(h, 3), max(w, 3)
    c = int(rng.integers(1, 5))
    crop_size = ((1, 1), (1, 4), (3, 1), (2, 2), (4, 5), (6, 3))[rng.integers(6)]
    image = rng.standard_normal((n, h, w, c)).astype(dtype)
    k = int(rng.integers(1, k_max + 1))
    boxes = _random_boxes(rng, k)
    box_indices = rng.integers(0, n, k)
    if rng.random() < 0.3:  # sometimes an index outside [0, N)
        box_indices[rng.integers(k)] = (-1, n, n + 5)[rng.integers(3)]
    return rng, image, boxes, box_indices, crop_size


@pytest.fixture
def restore_threads():
    before = curoi.get_num_threads()
    yield
    curoi.set_num_threads(before)


# ------------------------------------------------------- hand computations
def _ramp(n, h, w, c):
    """Pixel (h, w) of channel ci of image b holds 1000*b + 100*ci + 10*h + w:
    bilinear interpolation reproduces it exactly at any point."""
    b, hh, ww, ci = np.meshgrid(*(np.arange(v) for v in (n, h, w, c)), indexing="ij")
    return 1000.0 * b + 100.0 * ci + 10.0 * hh + ww


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_crop_by_hand(dtype, channels_last):
    image = _ramp(2, 5, 9, 2).astype(dtype)
    boxes = [
        # rows 0.25*4 + y*(0.5*4/2) = 1, 2, 3; columns 0.5*8 + x*(0.5*8/2)
        # = 4, 6, 8.
        [0.25, 0.5, 0.75, 1.0],
        # Flipped: rows 3, 2, 1 and columns 8, 6, 4.
        [0.75, 1.0, 0.25, 0.5],
        # Between pixels: rows 0.1*4 + y*0.8*4/2 = 0.4, 2.0, 3.6; columns
        # 0.3*8 + x*0.2*8/2 = 2.4, 3.2, 4.0.
        [0.1, 0.3, 0.9, 0.5],
        # Partly off the image: rows -0.5*4 + y*1.0*4/2 = -2 (off), 0, 2;
        # columns 1.25*8 - x*1.0*8/2 = 10 (off), 6, 2.
        [-0.5, 1.25, 0.5, 0.25],
    ]
    box_indices = [1, 0, 1, 0]
    y = crop(image, boxes, box_indices, (3, 3), "bilinear", -5.0, channels_last)
    rows = [(1, 2, 3), (3, 2, 1), (0.4, 2.0, 3.6), (None, 0, 2)]
    cols = [(4, 6, 8), (8, 6, 4), (2.4, 3.2, 4.0), (None, 6, 2)]
    for k in range(4):
        for i, r in enumerate(rows[k]):
            for j, cc in enumerate(cols[k]):
                for ci in range(2):
                    want = (-5.0 if r is None or cc is None else
                            1000 * box_indices[k] + 100 * ci + 10 * r + cc)
                    np.testing.assert_allclose(y[k, i, j, ci], want, rtol=1e-6, atol=1e-4,
                                               err_msg=str((k, i, j, ci)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_crop_of_one_row_or_column_samples_the_box_centre(dtype):
    # crop_height == 1: in_y = 0.5*(y1+y2)*(H-1) = 0.5*(0.2+0.8)*4 = 2;
    # crop_width == 1: in_x = 0.5*(0.1+0.6)*8 = 2.8.
    image = _ramp(1, 5, 9, 1).astype(dtype)
    box = [[0.2, 0.1, 0.8, 0.6]]
    np.testing.assert_allclose(crop(image, box, [0], (1, 1)).ravel(), [22.8], rtol=1e-6)
    # One row, three columns: 0.1*8 + x*0.5*8/2 = 0.8, 2.8, 4.8.
    np.testing.assert_allclose(crop(image, box, [0], (1, 3)).ravel(), [20.8, 22.8, 24.8],
                               rtol=1e-6)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nearest_rounds_halves_away_from_zero(dtype, channels_last):
    # H = 3, box rows 0 .. 1, 5 crop rows: in_y = 0, 0.5, 1, 1.5, 2, rounded
    # (C's roundf) to 0, 1, 1, 2, 2; Python's round would give 0, 0, 1, 2, 2.
    image = _ramp(1, 3, 3, 1).astype(dtype)
    y = crop(image, [[0, 0, 1, 0]], [0], (5, 1), "nearest", 0.0, channels_last)
    np.testing.assert_array_equal(y.ravel(), [0, 10, 10, 20, 20])
    # Its gradient goes to the same rows.
    g = np.arange(1, 6, dtype=dtype).reshape(1, 5, 1, 1)
    gx = crop_backward(g, [[0, 0, 1, 0]], [0], image.shape, "nearest",
                       channels_last=channels_last)
    np.testing.assert_array_equal(gx[0, :, 0, 0], [1, 2 + 3, 4 + 5])
    assert not gx[0, :, 1:].any()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_points_off_the_image_and_bad_indices_extrapolate(dtype, method):
    image = np.ones((2, 4, 4, 3), dtype)
    boxes = [[-1.0, 0.0, -0.5, 1.0],    # every row above the image
             [0.0, 1.5, 1.0, 2.0],      # every column right of it
             [0.0, 0.0, 1.0, 1.0],      # on the image, but index 2 = N
             [0.0, 0.0, 1.0, 1.0],      # index -1
             [np.nan, 0.0, 1.0, 1.0],   # a NaN row coordinate
             [0.0, 0.0, 1.0, np.inf]]   # an infinite column coordinate
    box_indices = [0, 1, 2, -1, 0, 1]
    y = crop(image, boxes, box_indices, (3, 2), method, 2.5)
    np.testing.assert_array_equal(y[:5], 2.5)
    # The last box: x2 = inf makes the column step infinite; column 0 is
    # 0*8 + 0*inf = NaN (extrapolated) and column 1 is inf (extrapolated).
    np.testing.assert_array_equal(y[5], 2.5)
    g = np.ones(y.shape, dtype)
    assert not crop_backward(g, boxes, box_indices, image.shape, method).any()
    gb = crop_boxes_backward(g, image, boxes, box_indices, method)
    np.testing.assert_array_equal(gb, 0.0)


# ---------------------------------------------------- against the reference
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(8))
def test_forward_and_gradients_match_the_reference(dtype, method, seed):
    rng, image, boxes, box_indices, crop_size = _random_case(10 * seed + len(method), dtype)
    # The float64 reference on the boxes the kernels see (float32 for float32).
    boxes = _boxes(boxes, dtype).astype(np.float64)
    y = crop(image, boxes, box_indices, crop_size, method, -0.25)
    y_ref = ref.crop_and_resize(image, boxes, box_indices, crop_size, method, -0.25)
    assert y.shape == y_ref.shape and y.dtype == dtype
    np.testing.assert_allclose(y, y_ref, **TOL[dtype])
    g = rng.standard_normal(y.shape).astype(dtype)
    gx = crop_backward(g, boxes, box_indices, image.shape, method)
    np.testing.assert_allclose(
        gx, ref.crop_and_resize_backward(g, boxes, box_indices, image.shape, method),
        **TOL[dtype])
    gb = crop_boxes_backward(g, image, boxes, box_indices, method)
    gb_ref = ref.crop_and_resize_boxes_backward(g, image, boxes, box_indices)
    # Box gradients sum many terms of both signs: the float32 tolerance is
    # relative to the largest.
    scale = max(1.0, float(np.abs(gb_ref).max()))
    tol = TOL[dtype]
    np.testing.assert_allclose(gb, gb_ref, rtol=tol["rtol"], atol=tol["atol"] * scale)


def test_the_cases_read_the_image():
    # Not vacuous: the random cases put points on the image, have boxes
    # that read nothing, and have non-zero box gradients.
    on, off, box_grad = 0, 0, 0.0
    for seed in range(8):
        rng, image, boxes, box_indices, crop_size = _random_case(10 * seed, np.float64)
        y = ref.crop_and_resize(image, boxes, box_indices, crop_size, "bilinear", np.nan)
        on += int(np.isfinite(y).sum())
        off += int(np.isnan(y).sum())
        g = np.ones(y.shape)
        box_grad += float(np.abs(ref.crop_and_resize_boxes_backward(
            g, image, boxes, box_indices)).sum())
    assert on > 100 and off > 100 and box_grad > 1


# ------------------------------------------------ adjoint, finite differences
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", range(4))
def test_image_gradient_is_the_adjoint_of_the_forward(method, seed):
    # With extrapolation_value 0 the forward is linear in the image:
    # <backward(g), x> == <g, forward(x)> for every x and g.
    rng, image, boxes, box_indices, crop_size = _random_case(300 + seed, np.float64)
    y = crop(image, boxes, box_indices, crop_size, method, 0.0)
    g = rng.standard_normal(y.shape)
    gx = crop_backward(g, boxes, box_indices, image.shape, method)
    lhs, rhs = float(np.sum(gx * image)), float(np.sum(g * y))
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)
    assert abs(rhs) > 0 or not np.any(y)


@pytest.mark.parametrize("method", METHODS)
def test_image_gradient_matches_finite_differences(method):
    rng = np.random.default_rng(11)
    n, h, w, c = 2, 5, 6, 2
    image = rng.standard_normal((n, h, w, c))
    boxes = _random_boxes(rng, 5)
    box_indices = [0, 1, 1, 0, 1]
    g = rng.standard_normal((5, 3, 4, c))

    def f(v):
        return float(np.sum(g * crop(v, boxes, box_indices, (3, 4), method, 0.7)))

    gx = crop_backward(g, boxes, box_indices, image.shape, method)
    eps = 1e-3
    fd = np.empty_like(image)
    for idx in np.ndindex(image.shape):
        xp, xm = image.copy(), image.copy()
        xp[idx] += eps
        xm[idx] -= eps
        fd[idx] = (f(xp) - f(xm)) / (2 * eps)
    np.testing.assert_allclose(gx, fd, rtol=1e-7, atol=1e-9)
    assert np.abs(gx).max() > 0.1  # not trivially zero


@pytest.mark.parametrize("crop_size", [(3, 4), (1, 1), (1, 3)])
def test_box_gradient_matches_finite_differences(crop_size):
    # Boxes well inside the image, so that no point crosses its border
    # within eps; the bilinear derivative jumps where a coordinate crosses
    # a pixel, and central differences of width 2*eps straddle few such.
    rng = np.random.default_rng(12)
    n, h, w, c = 2, 6, 7, 3
    image = rng.standard_normal((n, h, w, c))
    k = 6
    boxes = np.empty((k, 4))
    boxes[:, :2] = rng.uniform(0.05, 0.45, (k, 2))
    boxes[:, 2:] = rng.uniform(0.55, 0.95, (k, 2))
    boxes[1] = boxes[1, [2, 3, 0, 1]]  # one flipped box
    box_indices = rng.integers(0, n, k)
    g = rng.standard_normal((k,) + crop_size + (c,))

    def f(b):
        return float(np.sum(g * crop(image, b, box_indices, crop_size, "bilinear")))

    gb = crop_boxes_backward(g, image, boxes, box_indices)
    eps = 1e-7
    fd = np.empty_like(boxes)
    for idx in np.ndindex(boxes.shape):
        bp, bm = boxes.copy(), boxes.copy()
        bp[idx] += eps
        bm[idx] -= eps
        fd[idx] = (f(bp) - f(bm)) / (2 * eps)
    np.testing.assert_allclose(gb, fd, rtol=1e-5, atol=1e-6 * np.abs(fd).max())
    assert np.abs(gb).max() > 0.1


def test_box_gradient_of_nearest_is_the_bilinear_derivative():
    # As TensorFlow: CropAndResizeGradBoxes knows only bilinear, and the
    # gradient of a nearest crop uses it.
    rng, image, boxes, box_indices, crop_size = _random_case(21, np.float64)
    g = rng.standard_normal((len(boxes),) + crop_size + image.shape[-1:])
    nearest = crop_boxes_backward(g, image, boxes, box_indices, "nearest")
    bilinear = crop_boxes_backward(g, image, boxes, box_indices, "bilinear")
    assert np.array_equal(_bits(nearest), _bits(bilinear))
    assert np.abs(bilinear).max() > 0


# --------------------------------------------------------------- TensorFlow
def load_tensorflow():
    """TensorFlow, imported by the first test that needs it, not at
    collection (see test_tensorflow.py); never in a sanitized process."""
    if os.environ.get("CUROI_SANITIZE"):
        pytest.skip("TensorFlow is not loaded into a sanitized process")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def tf():
    return load_tensorflow()


def _tf_case(seed, dtype):
    """A random case with valid indices (TF refuses others) and float32
    boxes (TF's only box dtype)."""
    rng, image, boxes, box_indices, crop_size = _random_case(seed, dtype)
    box_indices = np.abs(box_indices) % image.shape[0]
    return rng, image, boxes.astype(np.float32), box_indices.astype(np.int32), crop_size


def _tf_run(tf, image, boxes, box_indices, crop_size, method, extrapolation, g):
    """TF's crops and, through GradientTape, its gradients of sum(g * crops)
    with respect to the image and the boxes."""
    x, b = tf.constant(image), tf.constant(boxes)
    with tf.GradientTape() as tape:
        tape.watch([x, b])
        y = tf.image.crop_and_resize(x, b, box_indices, crop_size, method=method,
                                     extrapolation_value=extrapolation)
        loss = tf.reduce_sum(y * tf.constant(g, y.dtype))
    gx, gb = tape.gradient(loss, [x, b])
    # TF's CPU image gradient adds boxes from several threads without
    # ordering them: where boxes overlap its sums race (seen to be off by
    # whole terms under load). One box per call has no such race; the boxes'
    # gradients are then added here.
    gx = np.zeros(image.shape, np.float64)
    for k in range(len(boxes)):
        xk = tf.constant(image)
        with tf.GradientTape() as tape:
            tape.watch(xk)
            yk = tf.image.crop_and_resize(xk, b[k:k + 1], box_indices[k:k + 1], crop_size,
                                          method=method, extrapolation_value=extrapolation)
            loss = tf.reduce_sum(yk * tf.constant(g[k:k + 1], yk.dtype))
        gx += tape.gradient(loss, xk).numpy()
    return y.numpy(), gx, gb.numpy()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(6))
def test_matches_tensorflow(tf, dtype, method, seed):
    rng, image, boxes, box_indices, crop_size = _tf_case(500 + seed, dtype)
    y = crop(image, boxes, box_indices, crop_size, method, 0.75)
    g = rng.standard_normal(y.shape).astype(np.float32)
    y_tf, gx_tf, gb_tf = _tf_run(tf, image, boxes, box_indices, crop_size, method, 0.75, g)
    # TF computes in float32 whatever the image (its crops are float32), so
    # float64 results agree with it to float32's precision.
    np.testing.assert_allclose(y, y_tf, rtol=1e-6, atol=1e-6)
    if dtype == np.float32 and method == "nearest":
        # The same float32 coordinates, rounded the same way: the same pixels.
        np.testing.assert_array_equal(y, y_tf)
    g = g.astype(dtype)
    gx = crop_backward(g, boxes, box_indices, image.shape, method)
    np.testing.assert_allclose(gx, gx_tf, rtol=1e-5, atol=1e-5)
    gb = crop_boxes_backward(g, image, boxes, box_indices, method)
    np.testing.assert_allclose(gb, gb_tf, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(gb_tf).max()))


@pytest.mark.parametrize("method", METHODS)
def test_matches_tensorflow_with_many_boxes(tf, method):
    # Larger: many overlapping boxes, a crop bigger than the box, channels
    # that the CPU loops split between threads.
    rng = np.random.default_rng(7)
    image = rng.standard_normal((3, 11, 13, 17)).astype(np.float32)
    boxes = _random_boxes(rng, 40).astype(np.float32)
    box_indices = rng.integers(0, 3, 40).astype(np.int32)
    g = rng.standard_normal((40, 9, 14, 17)).astype(np.float32)
    y_tf, gx_tf, gb_tf = _tf_run(tf, image, boxes, box_indices, (9, 14), method, -1.0, g)
    np.testing.assert_allclose(crop(image, boxes, box_indices, (9, 14), method, -1.0), y_tf,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(crop_backward(g, boxes, box_indices, image.shape, method),
                               gx_tf, rtol=1e-5, atol=1e-5)
    gb = crop_boxes_backward(g, image, boxes, box_indices, method)
    np.testing.assert_allclose(gb, gb_tf, rtol=1e-5, atol=1e-5 * np.abs(gb_tf).max())
    assert np.abs(gb_tf).max() > 1


def test_the_reference_matches_tensorflow(tf):
    # A check of the reference itself, in float64 on float32 boxes: TF
    # rounds coordinates and results to float32, nothing more.
    rng, image, boxes, box_indices, crop_size = _tf_case(77, np.float64)
    g = rng.standard_normal((len(boxes),) + crop_size + image.shape[-1:]).astype(np.float32)
    for method in METHODS:
        y_tf, gx_tf, gb_tf = _tf_run(tf, image, boxes, box_indices, crop_size, method,
                                     0.5, g)
        np.testing.assert_allclose(
            ref.crop_and_resize(image, boxes, box_indices, crop_size, method, 0.5), y_tf,
            rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(
            ref.crop_and_resize_backward(g, boxes, box_indices, image.shape, method), gx_tf,
            rtol=1e-5, atol=1e-5)
        gb_ref = ref.crop_and_resize_boxes_backward(g, image, boxes, box_indices)
        np.testing.assert_allclose(gb_ref, gb_tf, rtol=1e-5,
                                   atol=1e-5 * max(1.0, np.abs(gb_tf).max()))


# --------------------------------------- layouts, sums and thread counts
def _all_ops(image, boxes, box_indices, crop_size, g, **kw):
    """Every kernel, both methods; channels-last results."""
    channels_last = kw.get("channels_last", True)
    results = {}
    for method in METHODS:
        results[method] = crop(image, boxes, box_indices, crop_size, method, 0.5,
                               channels_last)
        results[f"{method}_grad"] = crop_backward(g, boxes, box_indices, image.shape,
                                                  method, **kw)
    results["boxes_grad"] = crop_boxes_backward(g, image, boxes, box_indices, "bilinear",
                                                channels_last)
    return results


def _many_boxes(dtype, seed=5, k=70):
    """Many overlapping boxes on a small image: every pixel receives many
    terms, so the order of a floating-point sum shows. Enough channels that
    the CPU loops split every pass between threads."""
    rng = np.random.default_rng(seed)
    n, h, w, c, crop_size = 2, 9, 11, 24, (3, 5)
    image = rng.standard_normal((n, h, w, c)).astype(dtype)
    boxes = _random_boxes(rng, k)
    box_indices = rng.integers(0, n, k)
    box_indices[3] = n  # one box that reads nothing
    g = rng.standard_normal((k,) + crop_size + (c,)).astype(dtype)
    return image, boxes, box_indices, crop_size, g


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nhwc_and_nchw_give_the_same_bits(dtype, deterministic, monkeypatch):
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", deterministic)
    image, boxes, box_indices, crop_size, g = _many_boxes(dtype)
    nhwc = _all_ops(image, boxes, box_indices, crop_size, g, deterministic=deterministic)
    nchw = _all_ops(image, boxes, box_indices, crop_size, g, deterministic=deterministic,
                    channels_last=False)
    for name in nhwc:
        assert np.array_equal(_bits(nhwc[name]), _bits(nchw[name])), name
        assert not np.isnan(nhwc[name]).any(), name  # every element written


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("sum_method", ["cpu-sum", "fixed-point"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_on_any_number_of_threads(dtype, sum_method, channels_last,
                                            monkeypatch, restore_threads):
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", sum_method == "fixed-point")
    image, boxes, box_indices, crop_size, g = _many_boxes(dtype)
    runs = []
    for threads in (1, 3, 2):
        curoi.set_num_threads(threads)
        runs.append(_all_ops(image, boxes, box_indices, crop_size, g, deterministic=True,
                             channels_last=channels_last))
    for other in runs[1:]:
        for name in runs[0]:
            assert np.array_equal(_bits(runs[0][name]), _bits(other[name])), name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fixed_point_backward_matches_the_plain_one(dtype, method, monkeypatch):
    # The GPU's deterministic sum (int64 fixed point), run on the CPU: the
    # same gradient within the rounding of its terms, and the reference's.
    image, boxes, box_indices, crop_size, g = _many_boxes(dtype)
    boxes = _boxes(boxes, dtype).astype(np.float64)
    plain = crop_backward(g, boxes, box_indices, image.shape, method)
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", True)
    fixed = crop_backward(g, boxes, box_indices, image.shape, method, deterministic=True)
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == np.float64 else dict(rtol=1e-5,
                                                                        atol=1e-5)
    np.testing.assert_allclose(fixed, plain, **tol)
    np.testing.assert_allclose(
        fixed, ref.crop_and_resize_backward(g, boxes, box_indices, image.shape, method),
        **tol)
    assert np.abs(fixed).max() > 1


@pytest.mark.parametrize("sum_method", ["cpu-sum", "fixed-point"])
def test_non_finite_gradients_reach_only_their_pixels(sum_method, monkeypatch):
    # inf and NaN output gradients: the plain sum and the fixed-point one
    # (which routes non-finite terms through the float buffer) put them in
    # the same pixels, and nothing else turns non-finite.
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", sum_method == "fixed-point")
    image, boxes, box_indices, crop_size, g = _many_boxes(np.float64, k=6)
    boxes[:] = [0.1, 0.2, 0.7, 0.9]  # on the image: every point reads pixels
    box_indices[:] = 0
    g[0, 0, 0, 0] = np.inf
    g[3, 1, 2, 5] = np.nan
    gx = crop_backward(g, boxes, box_indices, image.shape, deterministic=True)
    bad = np.zeros(image.shape, bool)
    for k, i, j, c in np.argwhere(~np.isfinite(g)):
        one = np.zeros_like(g)
        one[k, i, j, c] = 1
        bad |= ref.crop_and_resize_backward(one, boxes, box_indices, image.shape) != 0
    assert bad.any()
    np.testing.assert_array_equal(~np.isfinite(gx), bad)
    finite = np.where(np.isfinite(g), g, 0)
    np.testing.assert_allclose(
        gx[~bad], ref.crop_and_resize_backward(finite, boxes, box_indices,
                                               image.shape)[~bad],
        rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------- adversarial
N, H, W, C = 2, 5, 7, 3
CROP = (3, 4)
BIG = 2**31 - 1
# Every kind of box a caller can send: name -> (box index, y1, x1, y2, x2).
ZOO = {
    "inside": [0, 0.1, 0.2, 0.8, 0.9],
    "other-image": [1, 0.0, 0.0, 1.0, 1.0],
    "partly-out": [0, -0.7, -0.4, 1.3, 0.6],
    "flipped": [1, 0.9, 0.8, 0.2, 0.1],
    "point": [0, 0.5, 0.5, 0.5, 0.5],
    "point-at-far-corner": [1, 1.0, 1.0, 1.0, 1.0],
    "wholly-out": [0, 1.5, -2.0, 2.5, -1.0],
    "index-negative": [-1, 0.1, 0.1, 0.9, 0.9],
    "index-N": [N, 0.1, 0.1, 0.9, 0.9],
    "index-int32-max": [BIG, 0.1, 0.1, 0.9, 0.9],
    "index-int32-min": [-BIG - 1, 0.1, 0.1, 0.9, 0.9],
    "y1-nan": [0, np.nan, 0.1, 0.9, 0.9],
    "x2-nan": [1, 0.1, 0.1, 0.9, np.nan],
    "y2-inf": [0, 0.1, 0.1, np.inf, 0.9],
    "x1--inf": [1, 0.1, -np.inf, 0.9, 0.9],
    "all-inf": [0, np.inf, np.inf, np.inf, np.inf],
    "huge-1e30": [1, -1e30, -1e30, 1e30, 1e30],
    "huge-3e38": [0, -3e38, -3e38, 3e38, 3e38],
    "far-1e20": [1, 1e20, 1e20, 1e20 + 1, 1e20 + 1],
    "reversed-huge": [0, 1e20, 1e20, -1e20, -1e20],
    "max-float64": [1, -1.7e308, 0.1, 1.7e308, 0.9],
}
NAMES = list(ZOO)
UNUSABLE = {n for n, b in ZOO.items() if not 0 <= b[0] < N}
# Boxes whose coordinates overflow float32 or lose all its precision: float32
# kernels see other boxes than the float64 reference (and may see inf where
# it sees finite numbers), so they are checked by properties only.
EXTREME = {n for n, b in ZOO.items()
           if max((abs(v) for v in b[1:] if np.isfinite(v)), default=0) > 1e6}


def _zoo(names=NAMES):
    table = np.array([ZOO[n] for n in names], np.float64)
    return table[:, 1:], table[:, 0].astype(np.int64).astype(np.int32)


def _in_range(y, image, extrapolation):
    """A crop point is a convex combination of pixels, or the extrapolation
    value."""
    y = np.asarray(y, np.float64)
    assert np.isfinite(y).all()
    tol = 1e-5 * max(1.0, float(np.abs(image).max()))
    lo = min(float(image.min()), extrapolation) - tol
    hi = max(float(image.max()), extrapolation) + tol
    return bool((y >= lo).all() and (y <= hi).all())


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_box_zoo(dtype, method, channels_last):
    image = np.random.default_rng(2).standard_normal((N, H, W, C)).astype(dtype)
    boxes, box_indices = _zoo()
    y = crop(image, boxes, box_indices, CROP, method, -9.0, channels_last)
    exact = [k for k, n in enumerate(NAMES) if not (n in EXTREME and dtype == np.float32)]
    np.testing.assert_allclose(
        y[exact], ref.crop_and_resize(image, boxes[exact], box_indices[exact], CROP,
                                      method, -9.0), **TOL[dtype])
    for k, name in enumerate(NAMES):
        assert _in_range(y[k], image, -9.0), name
        if name in UNUSABLE:
            np.testing.assert_array_equal(y[k], -9.0, err_msg=name)
    assert (y[NAMES.index("inside")] != -9.0).all()  # not vacuous
    g = np.random.default_rng(3).standard_normal(y.shape).astype(dtype)
    g_exact = np.zeros_like(g)
    g_exact[exact] = g[exact]
    gx = crop_backward(g_exact, boxes, box_indices, image.shape, method,
                       channels_last=channels_last)
    np.testing.assert_allclose(
        gx, ref.crop_and_resize_backward(g_exact, boxes, box_indices, image.shape, method),
        **TOL[dtype])
    gb = crop_boxes_backward(g, image, boxes, box_indices, method, channels_last)
    gb_ref = ref.crop_and_resize_boxes_backward(g, image, boxes, box_indices)
    scale = max(1.0, float(np.abs(gb_ref[exact]).max()))
    np.testing.assert_allclose(gb[exact], gb_ref[exact], rtol=TOL[dtype]["rtol"],
                               atol=TOL[dtype]["atol"] * scale)
    for name in UNUSABLE:
        assert not gb[NAMES.index(name)].any(), name
    # The others alone, with gradient 1: each point sends weights summing
    # to 1 to pixels of its image, so the image gradient is non-negative and
    # sums to at most the number of points.
    rest = [k for k in range(len(NAMES)) if k not in exact]
    if rest:
        ones = np.ones((len(rest),) + g.shape[1:], dtype)
        gx = crop_backward(ones, boxes[rest], box_indices[rest], image.shape, method,
                           channels_last=channels_last).astype(np.float64)
        assert np.isfinite(gx).all() and (gx >= 0).all()
        assert gx.sum() <= ones.size * (1 + 1e-5)


@pytest.mark.parametrize("hw", [(1, 1), (1, 6), (5, 1), (2, 2)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", METHODS)
def test_small_images(hw, method):
    h, w = hw
    image = np.random.default_rng(8).standard_normal((1, h, w, 2))
    boxes = np.array([[0, 0, 1, 1], [-0.7, -0.7, 0.3, 0.3], [0.2, 0.1, 0.9, 1.0],
                      [-2, -2, 3, 3], [1, 1, 2, 2], [0.4, 0.6, 0.4, 0.6]])
    box_indices = np.zeros(len(boxes), np.int32)
    for crop_size in ((1, 1), (3, 4)):
        y = crop(image, boxes, box_indices, crop_size, method, 3.0)
        np.testing.assert_allclose(
            y, ref.crop_and_resize(image, boxes, box_indices, crop_size, method, 3.0),
            **TOL[np.float64])
        g = np.random.default_rng(9).standard_normal(y.shape)
        np.testing.assert_allclose(
            crop_backward(g, boxes, box_indices, image.shape, method),
            ref.crop_and_resize_backward(g, boxes, box_indices, image.shape, method),
            **TOL[np.float64])
        np.testing.assert_allclose(
            crop_boxes_backward(g, image, boxes, box_indices, method),
            ref.crop_and_resize_boxes_backward(g, image, boxes, box_indices),
            **TOL[np.float64])
    if h == 1:
        # Rows far outside [0, 1] still read row 0: H-1 = 0 scales them away.
        wild = np.array([[-5.0, 0.2, 7.0, 0.8], [3.0, 0.1, -2.0, 0.9]])
        y = crop(image, wild, [0, 0], (3, 2), method, 3.0)
        assert (y != 3.0).all()
        np.testing.assert_allclose(y, ref.crop_and_resize(image, wild, [0, 0], (3, 2),
                                                          method, 3.0), **TOL[np.float64])


@pytest.mark.parametrize("crop_size", [(1, 1024), (64, 64)])
def test_large_crop_of_a_small_image(crop_size):
    image = np.random.default_rng(10).standard_normal((2, 3, 4, 2))
    boxes, box_indices = _zoo(["inside", "partly-out", "flipped", "index-N"])
    for method in METHODS:
        np.testing.assert_allclose(
            crop(image, boxes, box_indices, crop_size, method, 1.0),
            ref.crop_and_resize(image, boxes, box_indices, crop_size, method, 1.0),
            **TOL[np.float64])


def test_kernels_called_with_nothing_to_do_return_cleanly():
    # No boxes, no channels, no crop rows or columns, or an image without
    # pixels (TF refuses the last; the kernels extrapolate every point and
    # read nothing): direct ctypes calls, nothing written out of place.
    image = np.zeros((1, 4, 4, 3), np.float32)
    rois = np.array([[0, 0, 0, 1, 1]], np.float32)
    out = np.zeros((1, 2, 2, 3), np.float32)
    grad = np.zeros(image.shape, np.float32)
    partial = np.zeros((1, 2, 2, 4), np.float32)
    grad_rois = np.zeros((1, 5), np.float32)
    for k, c, h, w, ph, pw in ((0, 3, 4, 4, 2, 2), (1, 0, 4, 4, 2, 2), (1, 3, 4, 4, 0, 2),
                               (1, 3, 4, 4, 2, 0), (1, 3, 0, 0, 2, 2), (0, 0, 0, 0, 0, 0)):
        for cl in (0, 1):
            _cpu.launch("crop_and_resize", "backward", "float32",
                        (out, rois, k, 1, c, h, w, ph, pw, 0, cl, 1, grad))
            _cpu.launch("crop_and_resize", "boxes_backward", "float32",
                        (out, image, rois, k, 1, c, h, w, ph, pw, 0, cl, partial))
            _cpu.launch("crop_and_resize", "boxes_backward_finish", "float32",
                        (partial, k, ph * pw, grad_rois))
            _cpu.launch("crop_and_resize", "forward", "float32",
                        (image, rois, k, 1, c, h, w, ph, pw, 0.0, 0, cl, 1, out))
    assert not grad.any() and not out.any() and not grad_rois.any()
    # An image without pixels: every point extrapolates.
    _cpu.launch("crop_and_resize", "forward", "float32",
                (image, rois, 1, 1, 3, 0, 4, 2, 2, 6.0, 0, 1, 1, out))
    np.testing.assert_array_equal(out, 6.0)


def test_no_boxes():
    image = np.ones((N, H, W, C))
    none = np.zeros((0, 4))
    assert crop(image, none, [], CROP).shape == (0,) + CROP + (C,)
    g = np.zeros((0,) + CROP + (C,))
    assert not crop_backward(g, none, [], image.shape).any()
    assert crop_boxes_backward(g, image, none, []).shape == (0, 4)

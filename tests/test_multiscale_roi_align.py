"""Multiscale RoI Align's public front ends: curoi.multiscale_roi_align and
its backward (NumPy, any DLPack array), curoi.torch.multiscale_roi_align and
MultiScaleRoIAlign, curoi.jax.multiscale_roi_align.

Expected values come from the NumPy reference in tests/reference.py
(reference.multiscale_roi_align: the level rule written from torchvision's
and detectron2's formulas, reference.roi_align per level), from per-level
pooling on the boxes that the host-side rule (reference.multiscale_level,
or torchvision's published LevelMapper formula written out in the test)
assigns, and from finite differences (gradcheck). Where a test relates two
curoi results (torch or JAX against the NumPy entry point, NHWC against
NCHW, two deterministic runs) it checks the plumbing; the numbers are
checked against the references.

The pyramid is small: an image of 64 x 96 pixels, levels at strides 4 to
32 (16 x 24 down to 2 x 3 pixels), and boxes sized so that every level gets
some (canonical_scale 32 sends a box to stride 4 below 16 pixels, 8 below
32, 16 below 64 and 32 above).
"""

import math

import numpy as np
import pytest

import curoi
import reference as ref
from curoi import _ops

SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
IMAGE = (64, 96)
CANONICAL = 32
OUT = (3, 4)
EPS = {"torchvision": 1e-6, "detectron2": 1e-8}
RULES = list(EPS)
TOL = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=1e-5, atol=1e-5)}


def _acc(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def nhwc(a):
    return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))


def pyramid(dtype=np.float64, seed=0, n=2, c=3, image=IMAGE, scales=SCALES):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, c, round(image[0] * s), round(image[1] * s))).astype(dtype)
            for s in scales]


def level_boxes(rng, n=2, canonical=CANONICAL, levels=4, per_level=3, image=IMAGE):
    """``per_level`` boxes for each of ``levels`` levels (the first at stride
    4): sqrt(area) well inside the level's band of either rule (the band
    [c * 2**(k-5), c * 2**(k-4)) of stride 2**k, open below for the first
    level and above for the last), aspect ratios 1:2 to 2:1, some across
    the image's edges; in random order."""
    h, w = image
    rows = []
    for level in range(levels):
        k = 2 + level
        lo, hi = canonical * 2.0 ** (k - 4), canonical * 2.0 ** (k - 3)
        if level == 0:
            lo = lo / 4
        for _ in range(per_level):
            size = rng.uniform(lo * 1.1, hi * 0.9)
            aspect = np.exp(rng.uniform(np.log(0.5), np.log(2)))
            bw, bh = size * np.sqrt(aspect), size / np.sqrt(aspect)
            x1 = rng.uniform(-0.5 * bw, w - 0.5 * bw)  # its centre on the image
            y1 = rng.uniform(-0.5 * bh, h - 0.5 * bh)
            rows.append([rng.integers(0, n), x1, y1, x1 + bw, y1 + bh])
    boxes = np.array(rows)
    return boxes[rng.permutation(len(boxes))]


def case(dtype=np.float64, seed=0, n=2, c=3):
    rng = np.random.default_rng(seed)
    boxes = level_boxes(rng, n).astype(_acc(dtype))
    for rule in RULES:
        levels = ref.multiscale_level(boxes, SCALES, CANONICAL, 4, EPS[rule], rule)
        assert sorted(set(levels.tolist())) == [0, 1, 2, 3], (rule, levels)
    return pyramid(dtype, seed + 1, n, c), boxes


def kwargs(rule="torchvision", canonical=CANONICAL, **extra):
    return dict(canonical_scale=canonical, canonical_level=4, eps=EPS[rule],
                level_rule=rule, **extra)


def expected(features, boxes, rule, ratio, aligned, canonical=CANONICAL, dtype=np.float64):
    return ref.multiscale_roi_align(features, boxes, OUT, SCALES, ratio, aligned, canonical,
                                    4, EPS[rule], rule, level_dtype=_acc(dtype))


# ------------------------------------------------------------- forward
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [2, -1])
def test_forward_matches_reference_float64(rule, aligned, ratio):
    features, boxes = case(np.float64, seed=1)
    y = curoi.multiscale_roi_align(features, boxes, OUT, SCALES, ratio, aligned, **kwargs(rule))
    assert y.shape == (len(boxes), 3) + OUT and y.dtype == np.float64
    np.testing.assert_allclose(y, expected(features, boxes, rule, ratio, aligned),
                               **TOL[np.float64])
    assert np.abs(y).max(axis=(1, 2, 3)).min() > 0  # every box read something


@pytest.mark.parametrize("rule", RULES)
def test_forward_matches_reference_float32(rule):
    features, boxes = case(np.float32, seed=2)
    y = curoi.multiscale_roi_align(features, boxes, OUT, SCALES, 2, True, **kwargs(rule))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, expected(features, boxes, rule, 2, True, dtype=np.float32),
                               **TOL[np.float32])


def test_default_canonical_scale_and_level():
    # FPN's own rule (224 pixels at stride 16) on a 256 x 384 image, with
    # boxes for every level: the defaults are torchvision's.
    rng = np.random.default_rng(3)
    image = (256, 384)
    boxes = level_boxes(rng, 1, canonical=224, image=image)
    assert sorted(set(ref.multiscale_level(boxes, SCALES).tolist())) == [0, 1, 2, 3]
    features = pyramid(np.float64, 4, n=1, c=2, image=image)
    y = curoi.multiscale_roi_align(features, boxes, OUT, SCALES, 2)
    np.testing.assert_allclose(
        y, ref.multiscale_roi_align(features, boxes, OUT, SCALES, 2, level_dtype=np.float64),
        **TOL[np.float64])


def test_level_rule_eps_and_canonical_level_are_honoured():
    """Settings under which the rules place boxes differently (a large eps
    inside or outside the log, another canonical level): each gives the
    reference's numbers, and the level assignments differ, so a setting
    that got lost on the way would show."""
    rng = np.random.default_rng(31)
    boxes = level_boxes(rng, 2, per_level=4)
    features = pyramid(np.float64, 32)
    settings = [("torchvision", 0.4, 4), ("detectron2", 0.4, 4), ("torchvision", 0.4, 3)]
    assignments = []
    for rule, eps, level in settings:
        y = curoi.multiscale_roi_align(features, boxes, OUT, SCALES, 2, canonical_scale=32,
                                       canonical_level=level, eps=eps, level_rule=rule)
        np.testing.assert_allclose(
            y, ref.multiscale_roi_align(features, boxes, OUT, SCALES, 2, False, 32, level,
                                        eps, rule, level_dtype=np.float64),
            **TOL[np.float64])
        assignments.append(tuple(ref.multiscale_level(boxes, SCALES, 32, level, eps, rule,
                                                      np.float64)))
    assert len(set(assignments)) == len(settings)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
def test_forward_equals_roi_align_per_level(dtype, rule, data_format):
    """Each box's values are curoi.roi_align's on the level that the host
    rule (the reference's) gives it, to the bit."""
    features, boxes = case(dtype, seed=5)
    levels = ref.multiscale_level(boxes, SCALES, CANONICAL, 4, EPS[rule], rule, _acc(dtype))
    last = data_format == "NHWC"
    given = [nhwc(x) for x in features] if last else features
    y = curoi.multiscale_roi_align(given, boxes, OUT, SCALES, -1, True,
                                   **kwargs(rule, data_format=data_format))
    for level, x in enumerate(given):
        chosen = levels == level
        per_level = curoi.roi_align(x, boxes[chosen], OUT, SCALES[level], -1, True,
                                    data_format=data_format)
        np.testing.assert_array_equal(y[chosen], per_level)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nhwc_is_nchw_transposed(dtype):
    features, boxes = case(dtype, seed=6)
    y = curoi.multiscale_roi_align(features, boxes, OUT, SCALES, 2, False, **kwargs())
    y_last = curoi.multiscale_roi_align([nhwc(x) for x in features], boxes, OUT, SCALES, 2,
                                        False, **kwargs(data_format="NHWC"))
    assert y_last.shape == (len(boxes),) + OUT + (3,)
    np.testing.assert_array_equal(y_last, nhwc(y))


def test_boxes_as_a_list_per_image():
    features, boxes = case(np.float64, seed=7)
    order = np.argsort(boxes[:, 0], kind="stable")
    boxes = boxes[order]  # a list gives the boxes image by image
    per_image = [boxes[boxes[:, 0] == i, 1:] for i in range(2)]
    y = curoi.multiscale_roi_align(features, per_image, OUT, SCALES, 2, **kwargs())
    np.testing.assert_array_equal(
        y, curoi.multiscale_roi_align(features, boxes, OUT, SCALES, 2, **kwargs()))


def test_one_level_pools_every_box_from_it():
    features, boxes = case(np.float64, seed=8)
    y = curoi.multiscale_roi_align(features[1:2], boxes, OUT, [1 / 8], 2, True)
    np.testing.assert_allclose(y, ref.roi_align(features[1], boxes, OUT, 1 / 8, 2, True),
                               **TOL[np.float64])


def test_boxes_without_a_level_give_zeros():
    # x2 < x1: a negative area, no level in either library; a batch index
    # outside [0, N) reads nothing either.
    features, _ = case(np.float64, seed=9)
    boxes = np.array([[0, 40, 10, 20, 30], [2, 10, 10, 30, 30], [1, 10, 10, 30, 30]], float)
    y = curoi.multiscale_roi_align(features, boxes, OUT, SCALES, 2, **kwargs())
    assert not y[:2].any() and y[2].any()


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_is_float32_rounded_once(half):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtype = np.float16 if half == "float16" else ml_dtypes.bfloat16
    features, boxes = case(np.float32, seed=10)
    features = [x.astype(dtype) for x in features]
    y = curoi.multiscale_roi_align(features, boxes, OUT, SCALES, 2, **kwargs())
    assert y.dtype == dtype
    wide = curoi.multiscale_roi_align([x.astype(np.float32) for x in features], boxes, OUT,
                                      SCALES, 2, **kwargs())
    np.testing.assert_array_equal(y, wide.astype(dtype))


# ------------------------------------------------------------ backward
def _shapes(features):
    return [x.shape for x in features]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
def test_backward_matches_reference(rule, data_format):
    features, boxes = case(np.float64, seed=11)
    g = np.random.default_rng(12).standard_normal((len(boxes), 3) + OUT)
    want = ref.multiscale_roi_align_backward(g, boxes, _shapes(features), OUT, SCALES, -1,
                                             True, CANONICAL, 4, EPS[rule], rule,
                                             level_dtype=np.float64)
    last = data_format == "NHWC"
    grads = curoi.multiscale_roi_align_backward(
        nhwc(g) if last else g, boxes,
        [nhwc(x).shape for x in features] if last else _shapes(features), OUT, SCALES, -1,
        True, **kwargs(rule, data_format=data_format))
    assert isinstance(grads, list) and len(grads) == len(SCALES)
    for grad, w in zip(grads, want):
        assert grad.dtype == np.float64
        np.testing.assert_allclose(grad, nhwc(w) if last else w, **TOL[np.float64])
        assert np.abs(w).max() > 0  # every level receives gradient


def test_backward_is_the_adjoint_of_the_forward():
    """<forward(x), g> = sum over levels of <x_l, backward(g)_l>."""
    features, boxes = case(np.float64, seed=13)
    g = np.random.default_rng(14).standard_normal((len(boxes), 3) + OUT)
    y = curoi.multiscale_roi_align(features, boxes, OUT, SCALES, 2, False, **kwargs())
    grads = curoi.multiscale_roi_align_backward(g, boxes, _shapes(features), OUT, SCALES, 2,
                                                False, **kwargs())
    lhs = float(np.sum(y * g))
    rhs = sum(float(np.sum(x * gx)) for x, gx in zip(features, grads))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))


@pytest.mark.parametrize("summation", ["plain", "fixed-point"])
def test_deterministic_backward_is_bitwise_reproducible(summation, monkeypatch):
    # "fixed-point" runs the GPU's int64 sum (one buffer for every level)
    # through the CPU backend.
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", summation == "fixed-point")
    features, boxes = case(np.float32, seed=15)
    g = np.random.default_rng(16).standard_normal((len(boxes), 3) + OUT).astype(np.float32)
    runs = []
    for threads in (1, 2):
        before = curoi.get_num_threads()
        curoi.set_num_threads(threads)
        try:
            runs.append(curoi.multiscale_roi_align_backward(
                g, boxes, _shapes(features), OUT, SCALES, 2, True, **kwargs(),
                deterministic=True))
        finally:
            curoi.set_num_threads(before)
    want = ref.multiscale_roi_align_backward(g, boxes, _shapes(features), OUT, SCALES, 2,
                                             True, CANONICAL, 4, EPS["torchvision"])
    for a, b, w in zip(*runs, want):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
        np.testing.assert_allclose(a, w, **TOL[np.float32])


# -------------------------------------------------------------- errors
def _forward(features=None, scales=SCALES, **extra):
    if features is None:
        features = pyramid(np.float32, 0, n=2, c=3)
    boxes = np.array([[0, 1, 1, 20, 20]], np.float32)
    return curoi.multiscale_roi_align(features, boxes, OUT, scales, **extra)


def _backward(shapes=None, scales=SCALES, grad_shape=(1, 3) + OUT, **extra):
    if shapes is None:
        shapes = _shapes(pyramid(np.float32, 0, n=2, c=3))
    boxes = np.array([[0, 1, 1, 20, 20]], np.float32)
    return curoi.multiscale_roi_align_backward(np.zeros(grad_shape, np.float32), boxes,
                                               shapes, OUT, scales, **extra)


def _with(level, array):
    features = pyramid(np.float32, 0, n=2, c=3)
    features[level] = array
    return features


BAD_CALLS = [
    ("too few scales", lambda: _forward(scales=SCALES[:3]), ValueError,
     r"spatial_scales has 3 entries but features has 4 levels"),
    ("scales not a sequence", lambda: _forward(scales=0.25), TypeError,
     r"spatial_scales must be a sequence"),
    ("not a power of two", lambda: _forward(scales=[1 / 4, 1 / 8, 1 / 12, 1 / 32]),
     ValueError, r"spatial_scales\[2\] must be a power of two.*0\.0833"),
    ("zero scale", lambda: _forward(scales=[1 / 4, 1 / 8, 0.0, 1 / 32]), ValueError,
     r"spatial_scales\[2\] must be positive and finite"),
    ("infinite scale", lambda: _forward(scales=[math.inf, 1 / 8, 1 / 16, 1 / 32]), ValueError,
     r"spatial_scales\[0\] must be positive and finite"),
    ("coarsest first", lambda: _forward(scales=SCALES[::-1]), ValueError,
     r"spatial_scales must go from the finest level.*spatial_scales\[0\] = 1/32 before "
     r"spatial_scales\[1\] = 1/16"),
    ("a gap", lambda: _forward(features=pyramid(np.float32)[:3],
                               scales=[1 / 4, 1 / 8, 1 / 32]), ValueError,
     r"spatial_scales must halve.*spatial_scales\[2\] = 1/32"),
    ("mismatched C", lambda: _forward(features=_with(2, np.zeros((2, 4, 4, 6), np.float32))),
     ValueError, r"features\[2\] has C = 4 channels, but features\[0\] has C = 3"),
    ("mismatched N", lambda: _forward(features=_with(1, np.zeros((3, 3, 8, 12), np.float32))),
     ValueError, r"features\[1\] holds N = 3 images, but features\[0\] holds N = 2"),
    ("mismatched dtype", lambda: _forward(features=_with(3, np.zeros((2, 3, 2, 3)))),
     TypeError, r"features\[3\] has dtype float64, but features\[0\] has float32"),
    ("a 3-D level", lambda: _forward(features=_with(1, np.zeros((3, 8, 12), np.float32))),
     ValueError, r"features\[1\] must be a 4-D array"),
    ("integer level", lambda: _forward(features=_with(0, np.zeros((2, 3, 16, 24), np.int32))),
     TypeError, r"features\[0\] must have a floating-point dtype"),
    ("one array, not a list", lambda: _forward(features=np.zeros((2, 3, 16, 24), np.float32)),
     TypeError, r"features must be a list or tuple of arrays, one per pyramid level"),
    ("no levels", lambda: _forward(features=[], scales=[]), ValueError,
     r"features must hold at least one level"),
    ("bad level_rule", lambda: _forward(level_rule="mmdet"), ValueError,
     r"level_rule must be one of 'torchvision', 'detectron2', got 'mmdet'"),
    ("level_rule not a string", lambda: _forward(level_rule=1), TypeError,
     r"level_rule must be a string"),
    ("float canonical_level", lambda: _forward(canonical_level=4.0), TypeError,
     r"canonical_level must be an int"),
    ("negative canonical_scale", lambda: _forward(canonical_scale=-224), ValueError,
     r"canonical_scale must be positive and finite"),
    ("NaN eps", lambda: _forward(eps=math.nan), ValueError, r"eps must be finite"),
    ("bad data_format", lambda: _forward(data_format="CHWN"), ValueError,
     r"data_format must be one of 'NCHW', 'NHWC'"),
    ("bad sampling_ratio", lambda: _forward(sampling_ratio=1.5), TypeError,
     r"sampling_ratio must be an int"),
    ("backward: too many scales", lambda: _backward(scales=SCALES + [1 / 64]), ValueError,
     r"spatial_scales has 5 entries but input_shapes has 4 levels"),
    ("backward: mismatched C", lambda: _backward(
        shapes=[(2, 3, 16, 24), (2, 3, 8, 12), (2, 5, 4, 6), (2, 3, 2, 3)]), ValueError,
     r"input_shapes\[2\] has N = 2 and C = 5, but input_shapes\[0\] has N = 2 and C = 3"),
    ("backward: a shape of 3", lambda: _backward(
        shapes=[(2, 3, 16, 24), (2, 3, 8), (2, 3, 4, 6), (2, 3, 2, 3)]), TypeError,
     r"input_shapes\[1\] must be a sequence of 4 ints"),
    ("backward: no shapes", lambda: _backward(shapes=[], scales=[]), TypeError,
     r"input_shapes must be a non-empty list"),
    ("backward: grad_output's shape", lambda: _backward(grad_shape=(2, 3) + OUT), ValueError,
     r"grad_output must have shape \[K, C, PH, PW\] = \(1, 3, 3, 4\)"),
    ("backward: deterministic", lambda: _backward(deterministic=1), TypeError,
     r"deterministic must be True or False"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in BAD_CALLS],
                         ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_raise_errors_that_name_them(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --------------------------------------------------------------- torch
def _torch():
    return pytest.importorskip("torch")


def _small_case(torch, dtype, seed=20):
    """Three levels of a 32 x 48 image (8 x 12 to 2 x 3 pixels), one image
    of two channels, boxes on every level (canonical_scale 16): small enough
    for gradcheck."""
    rng = np.random.default_rng(seed)
    boxes = level_boxes(rng, 1, canonical=16, levels=3, per_level=2, image=(32, 48))
    assert sorted(set(ref.multiscale_level(boxes, SCALES[:3], 16).tolist())) == [0, 1, 2]
    features = pyramid(np.float64, seed + 1, n=1, c=2, image=(32, 48), scales=SCALES[:3])
    return ([torch.tensor(x, dtype=dtype) for x in features],
            torch.tensor(boxes, dtype=dtype))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("as_list", [False, True])
def test_torch_forward_equals_numpy(dtype, as_list):
    torch = _torch()
    import curoi.torch as ct

    features, boxes = case(getattr(np, dtype), seed=21)
    tf = [torch.from_numpy(x) for x in features]
    tb = torch.from_numpy(boxes)
    if as_list:
        tb = [tb[tb[:, 0] == i, 1:] for i in range(2)]
        boxes = boxes[np.argsort(boxes[:, 0], kind="stable")]
    y = ct.multiscale_roi_align(tf, tb, OUT, SCALES, 2, True, **kwargs())
    assert isinstance(y, torch.Tensor) and y.dtype == getattr(torch, dtype)
    np.testing.assert_array_equal(
        y.numpy(), curoi.multiscale_roi_align(features, boxes, OUT, SCALES, 2, True,
                                              **kwargs()))
    # The NumPy function gives torch tensors back for torch tensors.
    back = curoi.multiscale_roi_align(tf, torch.from_numpy(boxes), OUT, SCALES, 2, True,
                                      **kwargs())
    assert isinstance(back, torch.Tensor) and torch.equal(back, y)


def test_torch_gradcheck_on_every_level():
    torch = _torch()
    import curoi.torch as ct

    features, boxes = _small_case(torch, torch.float64)
    for rule in RULES:
        def f(*levels, rule=rule):
            return ct.multiscale_roi_align(list(levels), boxes, (2, 3), SCALES[:3], 2, False,
                                           **kwargs(rule, canonical=16))

        inputs = tuple(x.clone().requires_grad_() for x in features)
        assert torch.autograd.gradcheck(f, inputs)


def test_torch_gradients_equal_numpy_backward_and_deterministic_mode():
    torch = _torch()
    import curoi.torch as ct

    features, boxes = case(np.float32, seed=22)
    g = np.random.default_rng(23).standard_normal((len(boxes), 3) + OUT).astype(np.float32)
    want = curoi.multiscale_roi_align_backward(g, boxes, _shapes(features), OUT, SCALES, 2,
                                               True, **kwargs())
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            levels = [torch.tensor(x, requires_grad=True) for x in features]
            y = ct.multiscale_roi_align(levels, torch.from_numpy(boxes), OUT, SCALES, 2, True,
                                        **kwargs())
            (y * torch.from_numpy(g)).sum().backward()
            for x, w in zip(levels, want):
                np.testing.assert_array_equal(x.grad.numpy(), w)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_torch_channels_last_and_nhwc():
    """torch.channels_last levels and data_format="NHWC" run the NHWC
    kernels: the NCHW numbers, to the bit, forward and backward."""
    torch = _torch()
    import curoi.torch as ct

    features, boxes = case(np.float32, seed=24)
    tb = torch.from_numpy(boxes)
    plain = [torch.tensor(x, requires_grad=True) for x in features]
    y = ct.multiscale_roi_align(plain, tb, OUT, SCALES, 2, **kwargs())
    y.square().sum().backward()
    strided = [torch.tensor(x).contiguous(memory_format=torch.channels_last).requires_grad_()
               for x in features]
    y_cl = ct.multiscale_roi_align(strided, tb, OUT, SCALES, 2, **kwargs())
    assert y_cl.is_contiguous(memory_format=torch.channels_last) and not y_cl.is_contiguous()
    assert torch.equal(y_cl, y)
    y_cl.square().sum().backward()
    for a, b in zip(strided, plain):
        assert a.grad.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a.grad, b.grad)
    last = [torch.tensor(nhwc(x), requires_grad=True) for x in features]
    y_last = ct.multiscale_roi_align(last, tb, OUT, SCALES, 2, **kwargs(data_format="NHWC"))
    assert y_last.shape == (len(boxes),) + OUT + (3,)
    assert torch.equal(y_last, y.permute(0, 2, 3, 1))
    y_last.square().sum().backward()
    for a, b in zip(last, plain):
        assert torch.equal(a.grad, b.grad.permute(0, 2, 3, 1))


def test_torch_opcheck():
    torch = _torch()
    from torch.library import opcheck

    features, boxes = _small_case(torch, torch.float32)
    args = (SCALES[:3], 2, 3, 2, True, 16.0, 4, 1e-6, "torchvision")
    samples = [
        (features, boxes),
        ([x.clone().requires_grad_() for x in features], boxes),
        ([x.contiguous(memory_format=torch.channels_last) for x in features], boxes),
        ([x.double() for x in features], boxes.double()),
        (features, boxes[:0]),
    ]
    for levels, rois in samples:
        opcheck(torch.ops.curoi.multiscale_roi_align.default, (levels, rois) + args)
    n, c = features[0].shape[:2]
    heights = [x.shape[2] for x in features]
    widths = [x.shape[3] for x in features]
    grad = torch.randn(len(boxes), c, 2, 3)
    for channels_last in (False, True):
        opcheck(torch.ops.curoi.multiscale_roi_align_backward.default,
                (grad, boxes, SCALES[:3], 2, 3, n, c, heights, widths, 2, True, 16.0, 4,
                 1e-6, "torchvision", False, channels_last))


def test_torch_compile_fullgraph():
    torch = _torch()
    import curoi.torch as ct
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    features, boxes = _small_case(torch, torch.float32)

    def loss(levels, boxes):
        return ct.multiscale_roi_align(levels, boxes, (2, 3), SCALES[:3], 2,
                                       canonical_scale=16).square().sum()

    torch._dynamo.reset()
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    eager = [x.clone().requires_grad_() for x in features]
    traced = [x.clone().requires_grad_() for x in features]
    loss(eager, boxes).backward()
    value = compiled(traced, boxes)
    value.backward()
    torch.testing.assert_close(value, loss(features, boxes))
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a.grad, b.grad)
    assert "curoi.multiscale_roi_align.default" in "".join(g.code for g in backend.fw_graphs)
    assert "curoi.multiscale_roi_align_backward.default" in "".join(
        g.code for g in backend.bw_graphs)
    torch._dynamo.reset()


def _torchvision_levels(torch, boxes_per_image, scales, canonical_scale, canonical_level):
    """torchvision's LevelMapper, from its published formula: k =
    floor(lvl0 + log2(sqrt(area) / s0) + eps) in the boxes' dtype, clamped to
    [k_min, k_max] of the first and last scales, minus k_min."""
    boxes = torch.cat(boxes_per_image)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    k = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_scale)
                    + torch.tensor(1e-6, dtype=boxes.dtype))
    k_min, k_max = int(-math.log2(scales[0])), int(-math.log2(scales[-1]))
    return (torch.clamp(k, min=k_min, max=k_max) - k_min).to(torch.int64)


def test_multiscale_roi_align_module_matches_per_level_roi_align():
    torch = _torch()
    import curoi.torch as ct

    rng = np.random.default_rng(25)
    # Two images of different sizes padded to 64 x 96, with 7 and 5 boxes;
    # an extra map ("pool") that featmap_names leaves out.
    maps = pyramid(np.float32, 26, n=2, c=3)
    x = {name: torch.tensor(m, requires_grad=True)
         for name, m in zip(["0", "1", "2", "3"], maps)}
    x["pool"] = torch.randn(2, 3, 1, 2, requires_grad=True)
    boxes = level_boxes(rng, 1, per_level=3).astype(np.float32)[:, 1:]
    boxes = [torch.tensor(boxes[:7]), torch.tensor(boxes[7:])]
    image_shapes = [(64, 96), (60, 88)]
    names = ["0", "1", "2", "3"]
    module = ct.MultiScaleRoIAlign(names, 3, 2, canonical_scale=CANONICAL)
    y = module(x, boxes, image_shapes)
    assert module.scales == SCALES  # 2 ** round(log2(H_l / 64))

    levels = _torchvision_levels(torch, boxes, SCALES, CANONICAL, 4)
    assert sorted(set(levels.tolist())) == [0, 1, 2, 3]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1)
                      for i, b in enumerate(boxes)])
    want = torch.zeros(len(rois), 3, 3, 3)
    for level, name in enumerate(names):
        chosen = torch.nonzero(levels == level).squeeze(1)
        want[chosen] = ct.roi_align(x[name].detach(), rois[chosen], 3, SCALES[level], 2, False)
    assert y.shape == (12, 3, 3, 3)
    assert torch.equal(y.detach(), want)
    y.sum().backward()
    assert all(x[name].grad.abs().sum() > 0 for name in names)
    assert x["pool"].grad is None
    # The scales are kept from the first call, as torchvision keeps them.
    assert torch.equal(module(x, boxes, [(64, 96)]), y)


def test_multiscale_roi_align_module_errors():
    torch = _torch()
    import curoi.torch as ct

    x = {name: torch.zeros(1, 2, 16 // 2 ** i, 24 // 2 ** i) for i, name in enumerate("abc")}
    boxes = [torch.tensor([[1.0, 1.0, 20.0, 20.0]])]
    with pytest.raises(ValueError, match=r"x has no feature map named 'd' \(featmap_names"):
        ct.MultiScaleRoIAlign(["a", "d"], 2, 2)(x, boxes, [(64, 96)])
    with pytest.raises(ValueError, match=r"boxes must be a non-empty list of Tensor\[L, 4\]"):
        ct.MultiScaleRoIAlign(["a", "b"], 2, 2)(x, [], [(64, 96)])
    with pytest.raises(ValueError, match=r"image_shapes must be a non-empty list"):
        ct.MultiScaleRoIAlign(["a", "b"], 2, 2)(x, boxes, [])
    with pytest.raises(TypeError, match=r"x must be a dict of feature maps"):
        ct.MultiScaleRoIAlign(["a"], 2, 2)([x["a"]], boxes, [(64, 96)])
    # Maps that skip a level: torchvision would pool some boxes from the
    # wrong map and give others zeros.
    with pytest.raises(ValueError, match=r"featmap_names \['a', 'c'\].*1/4.*1/16"):
        ct.MultiScaleRoIAlign(["a", "c"], 2, 2)(x, boxes, [(64, 96)])


def test_torch_errors_name_the_level():
    torch = _torch()
    import curoi.torch as ct

    boxes = torch.tensor([[0, 1.0, 1.0, 20.0, 20.0]])
    levels = [torch.zeros(1, 2, 16, 24), torch.zeros(1, 3, 8, 12)]
    with pytest.raises(ValueError, match=r"features\[1\] has C = 3 channels"):
        ct.multiscale_roi_align(levels, boxes, 2, [1 / 4, 1 / 8])
    levels[1] = torch.zeros(1, 2, 8, 12, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"features\[1\] has dtype torch.float64"):
        ct.multiscale_roi_align(levels, boxes, 2, [1 / 4, 1 / 8])
    levels[1] = torch.zeros(1, 2, 8, 12)
    with pytest.raises(ValueError, match=r"spatial_scales has 1 entries but features has 2"):
        ct.multiscale_roi_align(levels, boxes, 2, [1 / 4])
    with pytest.raises(ValueError, match=r"spatial_scales must halve"):
        ct.multiscale_roi_align(levels, boxes, 2, [1 / 4, 1 / 16])


# ----------------------------------------------------------------- JAX
def _jax():
    return pytest.importorskip("jax")


@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
def test_jax_forward_equals_numpy_eager_and_jit(data_format):
    jax = _jax()
    import curoi.jax as cj

    features, boxes = case(np.float32, seed=30)
    if data_format == "NHWC":
        features = [nhwc(x) for x in features]
    want = curoi.multiscale_roi_align(features, boxes, OUT, SCALES, 2, True,
                                      **kwargs(data_format=data_format))
    levels = [jax.numpy.asarray(x) for x in features]
    jb = jax.numpy.asarray(boxes)

    def f(levels, boxes):
        return cj.multiscale_roi_align(levels, boxes, OUT, SCALES, 2, True,
                                       **kwargs(data_format=data_format))

    for run in (f, jax.jit(f)):
        y = run(levels, jb)
        assert isinstance(y, jax.Array) and y.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(y), want)
    # The NumPy function gives JAX arrays back for JAX arrays.
    back = curoi.multiscale_roi_align(levels, jb, OUT, SCALES, 2, True,
                                      **kwargs(data_format=data_format))
    assert isinstance(back, jax.Array)
    np.testing.assert_array_equal(np.asarray(back), want)


@pytest.mark.parametrize("deterministic", [False, True])
def test_jax_grad_equals_numpy_backward(deterministic):
    jax = _jax()
    import curoi.jax as cj

    features, boxes = case(np.float32, seed=31)
    g = np.random.default_rng(32).standard_normal((len(boxes), 3) + OUT).astype(np.float32)
    want = curoi.multiscale_roi_align_backward(g, boxes, _shapes(features), OUT, SCALES, -1,
                                               False, **kwargs("detectron2"))

    def loss(levels, boxes):
        y = cj.multiscale_roi_align(levels, boxes, OUT, SCALES, -1, False,
                                    deterministic=deterministic, **kwargs("detectron2"))
        return (y * g).sum()

    levels = tuple(jax.numpy.asarray(x) for x in features)
    grads, box_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(levels, jax.numpy.asarray(boxes))
    assert isinstance(grads, tuple) and len(grads) == 4
    for grad, w in zip(grads, want):
        assert grad.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(grad), w)
    assert not np.asarray(box_grad).any()
    # ... and the gradient is the reference's.
    ref_grads = ref.multiscale_roi_align_backward(g, boxes, _shapes(features), OUT, SCALES,
                                                  -1, False, CANONICAL, 4, 1e-8, "detectron2")
    for grad, w in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(grad), w, **TOL[np.float32])


def test_jax_errors_name_the_level():
    jax = _jax()
    import curoi.jax as cj

    levels = [jax.numpy.zeros((1, 2, 16, 24)), jax.numpy.zeros((1, 3, 8, 12))]
    boxes = jax.numpy.asarray([[0, 1.0, 1.0, 20.0, 20.0]])
    with pytest.raises(ValueError, match=r"features\[1\] has C = 3 channels"):
        cj.multiscale_roi_align(levels, boxes, 2, [1 / 4, 1 / 8])
    with pytest.raises(ValueError, match=r"spatial_scales\[1\] must be a power of two"):
        cj.multiscale_roi_align(levels[:1] * 2, boxes, 2, [1 / 4, 1 / 6])


def test_jax_vmap_over_pyramids_and_over_boxes():
    jax = _jax()
    import curoi.jax as cj
    jnp = jax.numpy

    features, boxes = case(np.float32, seed=33)
    other = [x[::-1].copy() * 2 for x in features]  # images swapped, doubled
    flipped = boxes[::-1].copy()

    def f(levels, boxes):
        return cj.multiscale_roi_align(levels, boxes, OUT, SCALES, 2, True, **kwargs())

    def numpy(levels, boxes):
        return curoi.multiscale_roi_align(levels, boxes, OUT, SCALES, 2, True, **kwargs())

    pyramids = [jnp.stack([jnp.asarray(a), jnp.asarray(b)]) for a, b in zip(features, other)]
    y = jax.vmap(f, in_axes=(0, None))(pyramids, jnp.asarray(boxes))
    np.testing.assert_array_equal(np.asarray(y[0]), numpy(features, boxes))
    np.testing.assert_array_equal(np.asarray(y[1]), numpy(other, boxes))
    box_sets = jnp.stack([jnp.asarray(boxes), jnp.asarray(flipped)])
    shared = [jnp.asarray(x) for x in features]
    y = jax.vmap(f, in_axes=(None, 0))(shared, box_sets)
    np.testing.assert_array_equal(np.asarray(y[1]), numpy(features, flipped))
    # Gradients: per pyramid for batched levels; summed over the box sets
    # for shared ones.
    g = np.random.default_rng(34).standard_normal((len(boxes), 3) + OUT).astype(np.float32)

    def backward(boxes):
        return curoi.multiscale_roi_align_backward(g, boxes, _shapes(features), OUT, SCALES,
                                                   2, True, **kwargs())

    grads = jax.grad(lambda p: (jax.vmap(f, in_axes=(0, None))(p, jnp.asarray(boxes))
                                * g).sum())(pyramids)
    for grad, want in zip(grads, backward(boxes)):
        np.testing.assert_allclose(np.asarray(grad[0]), want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(grad[1]), want, rtol=1e-6, atol=1e-6)
    grads = jax.grad(lambda s: (jax.vmap(f, in_axes=(None, 0))(s, box_sets) * g).sum())(shared)
    for grad, a, b in zip(grads, backward(boxes), backward(flipped)):
        np.testing.assert_allclose(np.asarray(grad), a + b, rtol=1e-5, atol=1e-5)

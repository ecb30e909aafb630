"""Multiscale RoI Align at the kernel level (multiscale_roi_align.cu, driven
through curoi._ops ahead of its public API), on the CPU loops (and the GPU
loops in tests/test_gpu_loops.py, which runs this file; under the
sanitizers from tests/test_sanitizers.py, so it imports only NumPy, curoi
and the references).

A feature pyramid (levels at spatial scales 2^-k_min .. 2^-k_max) and one
launch: each box is pooled by RoI Align from the level that its size
selects, torchvision's MultiScaleRoIAlign (rule "torchvision") or
detectron2's ROIPooler (rule "detectron2").

Expected values come from the NumPy reference in tests/reference.py (its
level rule written from the two libraries' formulas, its pooling
reference.roi_align), from hand computation and from finite differences;
never from the code under test, except where a test checks a stated
property relating two curoi results: the multiscale kernels equal
curoi's roi_align run per level on that level's boxes (the same code on
the same numbers: the level rule applied on the host by the reference),
channels-last equals NCHW transposed, one thread equals three, the
fixed-point sum equals the plain one up to its rounding.
"""

import numpy as np
import pytest

import curoi
import reference as ref
from curoi import _ops

DTYPES = [np.float32, np.float64]
# float32 also rounds the sample positions: a box corner near x = 1000 at
# scale 1/4 places a sample to within 2^-24 * 250 ~ 1.5e-5 pixel, and a map
# of unit normals changes by up to ~2 per pixel, so values differ from the
# float64 reference by some 1e-5 absolute however the sums are rounded.
TOL = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=1e-5, atol=1e-4)}
# FPN's pyramid P2 .. P5 of an 800 x 1088 image: strides 4 .. 32, levels of
# 200 x 272, 100 x 136, 50 x 68 and 25 x 34 pixels (k_min 2, k_max 5).
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
IMAGE = (800, 1088)
EPS = {"torchvision": 1e-6, "detectron2": 1e-8}
RULES = list(EPS)
OUT = (3, 4)


def _acc(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def nhwc(a):
    return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view({4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def forward(features, boxes, output_size=OUT, ratio=2, aligned=True, rule="torchvision",
            scales=SCALES, eps=None, canonical=(224, 4), channels_last=False):
    """The multiscale forward on ``features`` (NCHW, or NHWC with
    channels_last), in their layout."""
    dtype = features[0].dtype
    boxes = np.ascontiguousarray(np.asarray(boxes).reshape(-1, 5), dtype=_acc(dtype))
    ph, pw = output_size
    c = features[0].shape[3 if channels_last else 1]
    shape = (len(boxes), ph, pw, c) if channels_last else (len(boxes), c, ph, pw)
    out = np.full(shape, 7, dtype)  # not zeros: the kernel must write all
    _ops.multiscale_roi_align_forward(
        [np.ascontiguousarray(x) for x in features], boxes, out, scales, ratio, aligned,
        canonical[0], canonical[1], EPS[rule] if eps is None else eps, rule,
        channels_last=channels_last)
    return out


def backward(g, boxes, shapes, ratio=2, aligned=True, rule="torchvision", scales=SCALES,
             eps=None, canonical=(224, 4), deterministic=False, channels_last=False):
    """The multiscale backward: one gradient per level, in g's accumulation
    dtype."""
    g = np.ascontiguousarray(g)
    grads = [np.full(shape, np.nan, _acc(g.dtype)) for shape in shapes]  # zeroed by the wrapper
    _ops.multiscale_roi_align_backward(
        g, np.ascontiguousarray(np.asarray(boxes).reshape(-1, 5), dtype=_acc(g.dtype)), grads,
        scales, ratio, aligned, canonical[0], canonical[1],
        EPS[rule] if eps is None else eps, rule, deterministic=deterministic,
        channels_last=channels_last)
    return grads


def pyramid(dtype, seed=0, n=2, c=3, image=IMAGE, scales=SCALES):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, c, round(image[0] * s), round(image[1] * s))).astype(dtype)
            for s in scales]


def fpn_boxes(rng, k, n=2, image=IMAGE):
    """Boxes of every size an FPN pools (sqrt(area) 8 to 1100 pixels, log
    uniform: every level gets some; aspect ratios 1:3 to 3:1), some across
    the image's edges."""
    h, w = image
    size = np.exp(rng.uniform(np.log(8), np.log(1100), k))
    aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3), k))
    bw, bh = size * np.sqrt(aspect), size / np.sqrt(aspect)
    x1 = rng.uniform(-0.1 * w, w, k)
    y1 = rng.uniform(-0.1 * h, h, k)
    return np.stack([rng.integers(0, n, k), x1, y1, x1 + bw, y1 + bh], axis=1)


def odd_boxes(n=2, huge=True):
    """Boxes a caller may send besides: unusable, reversed, empty, huge
    (left out with ``huge=False``: with adaptive sampling they have some
    1e18 samples per bin side, which the reference visits one by one)."""
    boxes = np.array([
        [0, 10, 20, 10, 300],        # zero width: area 0, the lowest level
        [1, 50, 50, 50, 50],         # a point
        [0, 300, 40, 100, 400],      # x reversed: negative area, no level
        [1, 500, 500, 276, 276],     # both reversed: area 224^2, level 2
        [0, -1e20, -1e20, 1e20, 1e20],  # huge: the highest level
        [1, 1e20, 1e20, 1e20 + 1, 1e20 + 1],  # far away
        [n, 10, 10, 300, 300],       # batch index out of range
        [-1, 10, 10, 300, 300],
        [np.nan, 10, 10, 300, 300],
        [0, np.nan, 10, 300, 300],
        [1, 10, 10, np.inf, 300],
        [0, 10, -np.inf, 300, 300],
    ])
    return boxes if huge else boxes[np.abs(np.nan_to_num(boxes)).max(axis=1) < 1e6]


def case(dtype, seed=0, k=40, n=2, c=3, odd=True, huge=True):
    rng = np.random.default_rng(seed)
    boxes = fpn_boxes(rng, k, n)
    if odd:
        boxes = np.concatenate([boxes, odd_boxes(n, huge)])
        boxes = boxes[rng.permutation(len(boxes))]
    return pyramid(dtype, seed + 1, n, c), boxes.astype(_acc(dtype))


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


def host_levels(boxes, dtype, rule="torchvision", scales=SCALES, eps=None):
    boxes = np.asarray(boxes, np.float64).reshape(-1, 5)
    return ref.multiscale_level(boxes, scales, 224, 4, EPS[rule] if eps is None else eps,
                                rule, _acc(dtype))


# --------------------------------------------------------------------------
# the level rule
# --------------------------------------------------------------------------

# (width, height) in image pixels -> the level (0 .. 3 for strides 4 .. 32)
# by hand: k = floor(4 + log2(sqrt(w h) / 224)) clamped to [2, 5], level
# k - 2. Both rules agree on all of them (none lies within eps of a
# boundary).
HAND_LEVELS = [
    ((224, 224), 2),   # the canonical box: k = 4, stride 16
    ((112, 112), 1),   # k = 3
    ((56, 56), 0),     # k = 2
    ((448, 448), 3),   # k = 5
    ((448, 112), 2),   # sqrt(448 * 112) = 224
    ((223, 223), 1),   # 4 + log2(223 / 224) = 3.9935...
    ((20, 20), 0),     # k = floor(0.51) = 0, clamped to k_min = 2
    ((1000, 700), 3),  # 4 + log2(836.7 / 224) = 5.9: k = 5
    ((1080, 790), 3),  # k = 6, clamped to k_max = 5
    ((0, 300), 0),     # area 0: log2(0) = -inf, clamped to k_min
    ((-100, 300), -1),  # negative area: sqrt gives NaN, no level
]


@pytest.mark.parametrize("rule", RULES)
def test_reference_levels_by_hand(rule):
    boxes = np.array([[0, 5, 5, 5 + w, 5 + h] for (w, h), _ in HAND_LEVELS])
    expected = [level for _, level in HAND_LEVELS]
    for dtype in (np.float32, np.float64):
        np.testing.assert_array_equal(host_levels(boxes, dtype, rule), expected)


def constant_pyramid(dtype, n=2, c=2, image=IMAGE, scales=SCALES):
    """Level l holds the value l + 1 everywhere: a box's output tells which
    level it was pooled from."""
    return [np.full((n, c, round(image[0] * s), round(image[1] * s)), l + 1.0, dtype)
            for l, s in enumerate(scales)]


def level_read(out):
    """The level each box was pooled from, out of a constant pyramid's
    output (0 -> -1: nothing read)."""
    return np.round(out.reshape(len(out), -1).mean(axis=1)).astype(np.int64) - 1


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_levels_by_hand(dtype, rule):
    # Every box lies on the image, not aligned (a box of size 0 samples a
    # pixel wide): every sample reads the level's constant, so the output
    # is that constant.
    boxes = np.array([[0, 5, 5, 5 + w, 5 + h] for (w, h), _ in HAND_LEVELS])
    out = forward(constant_pyramid(dtype), boxes, (2, 2), 2, False, rule)
    np.testing.assert_array_equal(level_read(out), [level for _, level in HAND_LEVELS])
    np.testing.assert_allclose(out[[level >= 0 for _, level in HAND_LEVELS]],
                               np.round(out[[level >= 0 for _, level in HAND_LEVELS]]),
                               rtol=1e-6)
    # The box with x reversed reads nothing, even not aligned: zeros.
    assert not out[-1].any()


def test_both_corners_reversed_give_a_positive_area():
    # (x1, y1) = (500, 500), (x2, y2) = (276, 276): area (-224)^2, level 2,
    # pooled as RoI Align pools a reversed box (here not aligned: a pixel
    # wide, at the box's start).
    box = [[0, 500, 500, 276, 276]]
    pyr = constant_pyramid(np.float64)
    assert level_read(forward(pyr, box, (2, 2), 2, False)).tolist() == [2]
    # Aligned with adaptive sampling, a reversed box has no samples: zeros.
    assert not forward(pyr, box, (2, 2), 0, True).any()


def test_eps_decides_a_box_just_below_the_canonical_size():
    # 224 x 223.9997: in float64 log2(sqrt(224 * 223.9997) / 224) = -9.66e-7,
    # so torchvision's eps = 1e-6 lifts it to level 2 (k = 4) and without
    # eps it is level 1; detectron2's eps inside the log is far too small to.
    box = [[0, 5, 5, 229, 228.9997]]
    pyr = constant_pyramid(np.float64)
    assert level_read(forward(pyr, box, (2, 2), 2, False)).tolist() == [2]
    assert level_read(forward(pyr, box, (2, 2), 2, False, eps=0.0)).tolist() == [1]
    assert level_read(forward(pyr, box, (2, 2), 2, False, "detectron2")).tolist() == [1]
    assert host_levels(box, np.float64).tolist() == [2]
    assert host_levels(box, np.float64, eps=0.0).tolist() == [1]


# Boxes whose level is not the same computed in float32 (as torchvision and
# detectron2 compute it for float32 boxes) and in float64: those whose
# lvl0 + log2(s / s0) (+ eps) lies within float32's rounding of an integer
# (2^-22 to 2^-21 there). Float32 kernels follow float32, float64 kernels
# float64. Found by scanning the float32 heights next to the boundaries.
FLIPS = [
    # rule, (x2, y2) of a box from (0, 0), level in float32, in float64
    # 4 + log2(s/224) = 4 - 1.03e-6: + 1e-6 rounds up to 4 in float32.
    ("torchvision", (224, 223.9996795654297), 2, 1),
    ("torchvision", (448, 447.9992980957031), 3, 2),
    # 4 + log2(s/224) = 5 - 1e-7 rounds to 5 in float32.
    ("detectron2", (448, 447.99993896484375), 3, 2),
]


@pytest.mark.parametrize("rule, corner, level32, level64", FLIPS)
def test_float32_levels_follow_float32_arithmetic(rule, corner, level32, level64):
    box = np.array([[0, 0, 0, corner[0], corner[1]]])
    assert box.astype(np.float32).astype(np.float64).tolist() == box.tolist()
    for dtype, level in ((np.float32, level32), (np.float64, level64)):
        assert host_levels(box, dtype, rule).tolist() == [level]
        out = forward(constant_pyramid(dtype), box, (2, 2), 2, False, rule)
        assert level_read(out).tolist() == [level], dtype


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_levels_match_the_host_rule(dtype, rule):
    rng = np.random.default_rng(3)
    boxes = np.concatenate([fpn_boxes(rng, 300), odd_boxes()]).astype(_acc(dtype))
    boxes[:, 0] = 0  # every box usable unless its corners say otherwise
    out = forward(constant_pyramid(dtype, n=1, c=1), boxes, (1, 1), 1, False, rule)
    expected = host_levels(boxes, dtype, rule)
    # Unusable boxes (non-finite corners) read nothing whatever their level.
    expected[~np.isfinite(boxes).all(axis=1)] = -1
    # A sample off the image reads 0: compare where the box's one sample
    # (its centre, ratio 1, 1 x 1) lies on the image.
    cx = (boxes[:, 1] + boxes[:, 3]) / 2
    cy = (boxes[:, 2] + boxes[:, 4]) / 2
    inside = (cx >= 0) & (cx < IMAGE[1] - 32) & (cy >= 0) & (cy < IMAGE[0] - 32)
    inside |= expected == -1
    np.testing.assert_array_equal(level_read(out)[inside], expected[inside])
    assert inside.sum() > 100 and len(set(expected[inside])) == 5


def test_one_level_pools_every_box_from_it():
    # Both libraries skip the rule with one level: even a box of negative
    # area is pooled, exactly as roi_align pools it.
    x, boxes = case(np.float64, seed=4, k=20)
    x = x[2:3]
    got = forward(x, boxes, OUT, 2, False, scales=[1 / 16])
    expected = np.full(got.shape, 7.0)
    _ops.roi_align_forward(x[0], boxes, expected, 1 / 16, 2, False)
    assert np.array_equal(bits(got), bits(expected))
    negative = (boxes[:, 3] - boxes[:, 1]) * (boxes[:, 4] - boxes[:, 2]) < 0
    assert negative.any() and got[negative].any()


def test_levels_outside_the_table_read_nothing():
    # Scales 1/4 and 1/16 (not consecutive): k_min = 2, k_max = 4, and a
    # box of k = 4 has level 2, which the table lacks (torchvision leaves
    # its output zero); a box of k = 3 has level 1, pooled at 1/16.
    scales = [1 / 4, 1 / 16]
    pyr = constant_pyramid(np.float64, scales=scales)
    boxes = [[0, 5, 5, 229, 229], [0, 5, 5, 117, 117], [0, 5, 5, 61, 61]]
    out = forward(pyr, boxes, (2, 2), 2, False, scales=scales)
    assert level_read(out).tolist() == [-1, 1, 0]
    assert host_levels(boxes, np.float64, scales=scales).tolist() == [-1, 1, 0]


def test_a_level_without_pixels_reads_nothing():
    x, boxes = case(np.float64, seed=5, k=30, odd=False)
    x[1] = np.zeros((2, 3, 0, 136))
    levels = host_levels(boxes, np.float64)
    assert (levels == 1).any()
    got = forward(x, boxes)
    assert not got[levels == 1].any()
    np.testing.assert_allclose(got, ref.multiscale_roi_align(x, boxes, OUT, SCALES, 2, True,
                                                             level_dtype=np.float64),
                               **TOL[np.float64])
    g = np.random.default_rng(6).standard_normal(got.shape)
    grads = backward(g, boxes, [a.shape for a in x])
    assert grads[1].shape == (2, 3, 0, 136)
    expected = ref.multiscale_roi_align_backward(g, boxes, [a.shape for a in x], OUT, SCALES,
                                                 2, True, level_dtype=np.float64)
    for got_l, expected_l in zip(grads, expected):
        np.testing.assert_allclose(got_l, expected_l, **TOL[np.float64])


# --------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------


def roi_align_per_level(x, boxes, levels, ratio, aligned, channels_last=False, scales=SCALES):
    """curoi's roi_align on each level's boxes (levels from the host),
    zeros for the others."""
    dtype = x[0].dtype
    c = x[0].shape[3 if channels_last else 1]
    shape = (len(boxes),) + ((OUT[0], OUT[1], c) if channels_last else (c,) + OUT)
    out = np.zeros(shape, dtype)
    for level, features in enumerate(x):
        chosen = np.nonzero(levels == level)[0]
        if len(chosen):
            part = np.full((len(chosen),) + shape[1:], 7, dtype)
            _ops.roi_align_forward(features, np.ascontiguousarray(boxes[chosen]), part,
                                   scales[level], ratio, aligned, channels_last)
            out[chosen] = part
    return out


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("aligned,ratio", [(True, 2), (False, 0), (True, 0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_is_roi_align_per_level_bitwise(dtype, aligned, ratio, rule, threads):
    x, boxes = case(dtype, seed=7)
    levels = host_levels(boxes, dtype, rule)
    assert len(set(levels)) == 5  # every level, and boxes of none
    got = forward(x, boxes, OUT, ratio, aligned, rule)
    assert np.array_equal(bits(got), bits(roi_align_per_level(x, boxes, levels, ratio,
                                                              aligned)))
    assert np.count_nonzero(got) > 0.5 * got.size


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("aligned,ratio", [(True, 2), (False, 0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_the_reference(dtype, aligned, ratio, rule):
    x, boxes = case(dtype, seed=8, k=30, huge=ratio > 0)
    got = forward(x, boxes, OUT, ratio, aligned, rule)
    expected = ref.multiscale_roi_align(x, boxes, OUT, SCALES, ratio, aligned, 224, 4,
                                        EPS[rule], rule, level_dtype=_acc(dtype))
    np.testing.assert_allclose(got, expected, **TOL[dtype])
    assert np.count_nonzero(expected) > 0.5 * expected.size


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_by_hand(dtype):
    # Level l is a 16 x 16 map holding 1000 l + 20 r + c at row r, column
    # c: linear, so a bilinear sample inside it reads 1000 l + 20 y + x.
    rows, cols = np.mgrid[0:16, 0:16]
    x = [np.broadcast_to(1000.0 * l + 20 * rows + cols, (1, 1, 16, 16)).astype(dtype)
         for l in range(4)]
    # One bin, ratio 1, aligned: one sample at the box's centre times the
    # level's scale, less 0.5.
    boxes = [
        # 56 x 56 (level 0, 1/4), centre (x, y) = (7, 12) -> sample (y, x) =
        # (2.5, 1.25)
        [0, -21, -16, 35, 40],
        # 224 x 224 (level 2, 1/16), centre (40, 20) -> (0.75, 2.0)
        [0, -72, -92, 152, 132],
        # 448 x 448 (level 3, 1/32), centre (512, 0) -> (-0.5, 15.5): y
        # clamps to row 0, x past the last column reads column 15
        [0, 288, -224, 736, 224],
        # 112 x 112 (level 1, 1/8), centre (-8, 4) -> (0, -1.5): off the
        # map (x < -1), it adds nothing
        [0, -64, -52, 48, 60],
    ]
    got = forward(x, boxes, (1, 1), 1, True)
    np.testing.assert_array_equal(got.ravel(), [51.25, 2017.0, 3015.0, 0.0])
    # The first box in 2 x 2 bins of 7 map pixels from (y, x) = (-4.5,
    # -5.75), ratio 2: samples at start + 7 p + (1.75, 5.25), i.e. y in
    # (-2.75, 0.75 | 4.25, 7.75) and x in (-4, -0.5 | 3, 6.5). Bin (0, 0)
    # has one sample on the map, (0.75, -0.5 -> 0): 15, and divides by 4;
    # bin (1, 1) has four: (20 * (4.25 + 4.25 + 7.75 + 7.75) + 3 + 6.5 + 3
    # + 6.5) / 4.
    got = forward(x, boxes[:1], (2, 2), 2, True)
    assert got[0, 0, 0, 0] == 15 / 4
    assert got[0, 0, 1, 1] == (20 * 24.0 + 19) / 4


# --------------------------------------------------------------------------
# channels-last: NCHW transposed, bit for bit
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("aligned,ratio", [(True, 2), (False, 0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_forward_is_nchw_transposed_bitwise(dtype, aligned, ratio, rule,
                                                          threads):
    # C = 6: the NCHW CPU loops run a 4-channel pass and single channels.
    x, boxes = case(dtype, seed=9, c=6)
    expected = forward(x, boxes, OUT, ratio, aligned, rule)
    got = forward([nhwc(a) for a in x], boxes, OUT, ratio, aligned, rule, channels_last=True)
    assert np.array_equal(bits(got), bits(nhwc(expected)))
    assert np.count_nonzero(got) > 0.5 * got.size


@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_backward_is_nchw_transposed_bitwise(dtype, summation, threads):
    x, boxes = case(dtype, seed=10, c=6)
    g = np.random.default_rng(11).standard_normal((len(boxes), 6) + OUT).astype(dtype)
    expected = backward(g, boxes, [a.shape for a in x], deterministic=summation)
    got = backward(nhwc(g), boxes, [nhwc(a).shape for a in x], deterministic=summation,
                   channels_last=True)
    for got_l, expected_l in zip(got, expected):
        assert np.array_equal(bits(got_l), bits(nhwc(expected_l)))
        assert np.count_nonzero(expected_l) > 20


# --------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------


def roi_align_backward_per_level(g, boxes, levels, shapes, ratio, aligned):
    grads = []
    for level, shape in enumerate(shapes):
        chosen = np.nonzero(levels == level)[0]
        grad = np.zeros(shape, _acc(g.dtype))
        if len(chosen):
            _ops.roi_align_backward(np.ascontiguousarray(g[chosen]),
                                    np.ascontiguousarray(boxes[chosen]), grad,
                                    SCALES[level], ratio, aligned)
        grads.append(grad)
    return grads


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("aligned,ratio", [(True, 2), (False, 0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_is_roi_align_per_level_bitwise(dtype, aligned, ratio, rule, threads):
    x, boxes = case(dtype, seed=12)
    shapes = [a.shape for a in x]
    g = np.random.default_rng(13).standard_normal((len(boxes), 3) + OUT).astype(dtype)
    got = backward(g, boxes, shapes, ratio, aligned, rule)
    expected = roi_align_backward_per_level(g, boxes, host_levels(boxes, dtype, rule), shapes,
                                            ratio, aligned)
    for got_l, expected_l in zip(got, expected):
        assert got_l.dtype == dtype
        assert np.array_equal(bits(got_l), bits(expected_l))
        assert np.count_nonzero(expected_l) > 20


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("aligned,ratio", [(True, 2), (False, 0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_the_reference(dtype, aligned, ratio, rule, summation):
    x, boxes = case(dtype, seed=14, k=30, huge=ratio > 0)
    shapes = [a.shape for a in x]
    g = np.random.default_rng(15).standard_normal((len(boxes), 3) + OUT).astype(dtype)
    got = backward(g, boxes, shapes, ratio, aligned, rule, deterministic=summation)
    expected = ref.multiscale_roi_align_backward(g, boxes, shapes, OUT, SCALES, ratio, aligned,
                                                 224, 4, EPS[rule], rule,
                                                 level_dtype=_acc(dtype))
    for got_l, expected_l in zip(got, expected):
        np.testing.assert_allclose(got_l, expected_l, **TOL[dtype])
        assert np.count_nonzero(expected_l) > 20


@pytest.mark.parametrize("aligned,ratio", [(True, 2), (False, 0), (True, 0)])
def test_backward_is_the_adjoint_of_the_forward(aligned, ratio):
    # The forward is linear in the features: y = M x over all levels, and
    # the backward is M^T, so <backward(g), x> = <g, y>.
    for seed, rule in enumerate(RULES):
        x, boxes = case(np.float64, seed=16 + seed)
        y = forward(x, boxes, OUT, ratio, aligned, rule)
        g = np.random.default_rng(seed).standard_normal(y.shape)
        grads = backward(g, boxes, [a.shape for a in x], ratio, aligned, rule)
        lhs = sum(float(np.vdot(grad, a)) for grad, a in zip(grads, x))
        rhs = float(np.vdot(g, y))
        assert abs(lhs - rhs) <= 1e-12 * np.abs(g).sum() * max(np.abs(a).max() for a in x)
        assert abs(rhs) > 1


def test_backward_agrees_with_finite_differences():
    x, boxes = case(np.float64, seed=18)
    rng = np.random.default_rng(19)
    d = [rng.standard_normal(a.shape) for a in x]
    g = rng.standard_normal((len(boxes), 3) + OUT)
    step = 1e-3  # linear in x: any step gives the derivative up to rounding
    plus = forward([a + step * b for a, b in zip(x, d)], boxes, OUT, 0, True)
    minus = forward([a - step * b for a, b in zip(x, d)], boxes, OUT, 0, True)
    numeric = (np.vdot(g, plus) - np.vdot(g, minus)) / (2 * step)
    grads = backward(g, boxes, [a.shape for a in x], 0, True)
    analytic = sum(np.vdot(grad, b) for grad, b in zip(grads, d))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-9)
    assert abs(analytic) > 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_fixed_point_sum_equals_the_plain_sum_rounded(dtype, monkeypatch):
    x, boxes = case(dtype, seed=20)
    shapes = [a.shape for a in x]
    g = np.random.default_rng(21).standard_normal((len(boxes), 3) + OUT).astype(dtype)
    plain = backward(g, boxes, shapes)
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", True)
    fixed = backward(g, boxes, shapes, deterministic=True)
    # Every term is rounded to a multiple of 2^-e, 2^-e <= 4 * max|g| *
    # terms * 2^-61 (terms = K * PH * PW, one bound for all levels), half
    # that per term at most; at most 4 * terms terms in one sum.
    terms = len(boxes) * OUT[0] * OUT[1]
    bound = 4 * terms * 4 * np.abs(g).max() * terms * 2.0**-62
    for fixed_l, plain_l in zip(fixed, plain):
        if dtype == np.float32:
            np.testing.assert_allclose(fixed_l, plain_l, **TOL[np.float32])
        else:
            np.testing.assert_allclose(fixed_l, plain_l, rtol=0, atol=bound)
        assert np.count_nonzero(fixed_l) > 20
    # Non-finite gradients land where the plain sum puts them, level by level.
    levels = host_levels(boxes, dtype)
    usable = np.isfinite(boxes).all(axis=1) & (boxes[:, 0] >= 0) & (boxes[:, 0] < 2)
    # A box of level 3 that starts well inside the image (its samples land
    # on the map).
    inside = (boxes[:, 1] >= 0) & (boxes[:, 1] < 600) & (boxes[:, 2] >= 0) & (boxes[:, 2] < 400)
    k = np.nonzero((levels == 3) & usable & inside)[0][0]
    g[k] = np.inf
    fixed = backward(g, boxes, shapes, deterministic=True)
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", False)
    plain = backward(g, boxes, shapes)
    for level, (fixed_l, plain_l) in enumerate(zip(fixed, plain)):
        np.testing.assert_array_equal(np.isfinite(fixed_l), np.isfinite(plain_l))
        assert np.isfinite(fixed_l).all() == (level != 3)


# --------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_one_thread_and_three_give_the_same_bits(dtype, channels_last, summation):
    # Enough boxes and channels that the CPU loops hand work to the pool.
    x, boxes = case(dtype, seed=22, k=150, c=16)
    if channels_last:
        x = [nhwc(a) for a in x]
    results = []
    before = curoi.get_num_threads()
    try:
        for count in (1, 3):
            curoi.set_num_threads(count)
            y = forward(x, boxes, OUT, 2, True, channels_last=channels_last)
            g = np.random.default_rng(23).standard_normal(y.shape).astype(dtype)
            grads = backward(g, boxes, [a.shape for a in x], 2, True,
                             deterministic=summation, channels_last=channels_last)
            results.append((y, grads))
    finally:
        curoi.set_num_threads(before)
    (y1, g1), (y3, g3) = results
    assert np.array_equal(bits(y1), bits(y3))
    for a, b in zip(g1, g3):
        assert np.array_equal(bits(a), bits(b))
        assert np.count_nonzero(a) > 100


# --------------------------------------------------------------------------
# adversarial boxes and sizes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_boxes_match_the_reference(dtype, aligned):
    # Ratio 2: the reference can follow even the huge boxes (it loops over
    # every sample).
    x = pyramid(dtype, seed=24, c=2, image=(64, 96))
    rng = np.random.default_rng(24)
    boxes = np.concatenate([fpn_boxes(rng, 8, image=(64, 96)), odd_boxes()]).astype(_acc(dtype))
    y = forward(x, boxes, (2, 3), 2, aligned, scales=SCALES)
    expected = ref.multiscale_roi_align(x, boxes, (2, 3), SCALES, 2, aligned,
                                        level_dtype=_acc(dtype))
    np.testing.assert_allclose(y, expected, **TOL[dtype])
    unusable = ~np.isfinite(boxes).all(axis=1) | (boxes[:, 0] < 0) | (boxes[:, 0] >= 2)
    b = boxes.astype(np.float64)
    with np.errstate(invalid="ignore"):
        negative = (b[:, 3] - b[:, 1]) * (b[:, 4] - b[:, 2]) < 0
    assert negative.sum() == 1 and unusable.sum() == 6
    assert not y[unusable | negative].any() and y.any()
    g = np.random.default_rng(25).standard_normal(y.shape).astype(dtype)
    g[unusable | negative] = np.nan  # must go nowhere
    grads = backward(g, boxes, [a.shape for a in x], 2, aligned)
    g[unusable | negative] = 0
    expected = ref.multiscale_roi_align_backward(g, boxes, [a.shape for a in x], (2, 3),
                                                 SCALES, 2, aligned, level_dtype=_acc(dtype))
    for got_l, expected_l in zip(grads, expected):
        np.testing.assert_allclose(got_l, expected_l, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_boxes_with_adaptive_sampling_are_bounded(dtype):
    # 2e20 image pixels per side, adaptive sampling: about 1e18 samples per
    # bin side on the coarsest level, of which only those on the map are
    # visited. RoI Align is a weighted mean with weights summing to at most
    # 1 per bin: outputs within [min(0, min x), max(0, max x)], gradients of
    # ones non-negative and summing to at most the number of bins.
    x = [np.abs(a) + 1 for a in pyramid(dtype, seed=26, c=2, image=(64, 96))]
    boxes = np.array([[0, -1e20, -1e20, 1e20, 1e20], [1, -1e10, -5, 1e10, 40],
                      [0, 1e20, 1e20, -1e20, -1e20]], _acc(dtype))
    for aligned in (True, False):
        y = forward(x, boxes, (2, 3), 0, aligned)
        assert np.isfinite(y).all() and (y >= 0).all()
        assert (y <= max(a.max() for a in x)).all()
        # float32 places samples 3e8 pixels from the box's start to within
        # some 30 pixels, float64 to within 1e-7 (and those 3e18 pixels
        # away to within 512): only float64 finds the samples of the second
        # box that land on the map.
        if dtype == np.float64:
            assert y[1].any()
        grads = backward(np.ones(y.shape, dtype), boxes, [a.shape for a in x], 0, aligned)
        total = sum(float(grad.sum()) for grad in grads)
        assert all(np.isfinite(grad).all() and (grad >= 0).all() for grad in grads)
        assert 0 < total <= y.size * (1 + 1e-5)
        # Both huge boxes pool from the coarsest level only.
        assert not any(grad.any() for grad in grads[:3])


def test_no_boxes_channels_levels_or_images():
    for n, c, k in ((2, 3, 0), (2, 0, 3), (0, 3, 3)):
        x = [np.ones((n, c, 8, 12), np.float32), np.ones((n, c, 4, 6), np.float32)]
        boxes = np.tile(np.array([[0, 1, 1, 40, 40]], np.float32), (k, 1))
        for channels_last in (False, True):
            xs = [nhwc(a) for a in x] if channels_last else x
            y = forward(xs, boxes, (2, 2), scales=[1 / 4, 1 / 8], channels_last=channels_last)
            assert not y.any()
            grads = backward(np.ones(y.shape, np.float32), boxes, [a.shape for a in xs],
                             scales=[1 / 4, 1 / 8], deterministic=True,
                             channels_last=channels_last)
            assert [g.shape for g in grads] == [a.shape for a in xs]
            assert not any(g.any() for g in grads)
    # No levels at all: zeros out, nothing to write.
    out = np.full((2, 3, 2, 2), 7, np.float32)
    _ops.multiscale_roi_align_forward([], np.zeros((2, 5), np.float32), out, [], 2, True,
                                      224, 4, 1e-6, "torchvision")
    assert not out.any()

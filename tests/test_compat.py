"""curoi.torch.compat.{torchvision, detectron2, mmcv}: the other libraries'
RoI names on curoi's operators.

Each module and function is checked against the curoi.torch operator it
maps onto, called directly with the upstream convention written out (the
rois' dtype, the angle unit, ``mode``, ``convention``), numbers and
gradients; a few cases against the NumPy reference (tests/reference.py);
the level rule of detectron2's ROIPooler against a hand computation; the
argument names and defaults against the upstream documentation (written out
below); TorchScript and torch.fx against eager.
"""

import importlib.util
import inspect
import io
import os
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import curoi.torch as ct  # noqa: E402
from curoi.torch.compat import detectron2 as d2  # noqa: E402
from curoi.torch.compat import mmcv  # noqa: E402
from curoi.torch.compat import torchvision as tv  # noqa: E402

import reference as ref  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script.*is deprecated:DeprecationWarning",
    "ignore:.*torch.jit.(trace|save|load).*is deprecated:DeprecationWarning",
    "ignore:.*quantize.*deprecated:UserWarning",
    # The argument checks read shapes, which a trace takes as constants.
    "ignore::torch.jit.TracerWarning")

RNG = np.random.default_rng(19)
X = torch.tensor(RNG.standard_normal((2, 3, 12, 14)))
ROIS = torch.tensor(ref.random_boxes(RNG, 2, 12, 14, 0.5, 9))
ROTATED = torch.tensor(np.column_stack([
    RNG.integers(0, 2, 6), RNG.uniform(2, 24, 6), RNG.uniform(2, 20, 6),
    RNG.uniform(1, 12, 6), RNG.uniform(1, 9, 6), RNG.uniform(-180, 180, 6)]))
# The same boxes with the angle in radians, for mmcv.
ROTATED_RAD = torch.cat([ROTATED[:, :5], ROTATED[:, 5:] * math.pi / 180], 1)


def _value_and_grad(fn, x, rois, seed=0):
    """fn(x, rois), the gradient of a fixed random weighting of it with
    respect to x, and with respect to rois (None when it gives none)."""
    x = x.detach().clone().requires_grad_(True)
    rois = rois.detach().clone().requires_grad_(True)
    y = fn(x, rois)
    w = torch.tensor(np.random.default_rng(seed).standard_normal(tuple(y.shape)),
                     dtype=y.dtype)
    gx, gr = torch.autograd.grad((y * w).sum(), (x, rois), allow_unused=True)
    return y.detach(), gx, gr


def _assert_same(got, want):
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            assert torch.equal(g, w)


# ------------------------------------------------------------ import paths
def test_import_paths_in_a_fresh_interpreter():
    # Before curoi.torch is imported (the registration runs when it is).
    code = ("import curoi.torch.compat.mmcv as m, curoi.torch as ct\n"
            "from curoi.torch.compat import detectron2, torchvision\n"
            "import curoi.torch.compat.detectron2\n"
            "import curoi.torch.compat\n"
            "assert m is ct.compat.mmcv and detectron2 is curoi.torch.compat.detectron2\n"
            "assert torchvision.roi_align is ct.roi_align\n"
            "print(m.RoIAlign.__name__, detectron2.ROIPooler.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["RoIAlign", "ROIPooler"]


def test_torchvision_names_are_curoi_torch_s():
    names = ["roi_align", "RoIAlign", "roi_pool", "RoIPool", "ps_roi_align",
             "PSRoIAlign", "ps_roi_pool", "PSRoIPool", "MultiScaleRoIAlign"]
    assert sorted(tv.__all__) == sorted(names)
    for name in names:
        assert getattr(tv, name) is getattr(ct, name)


# ----------------------------------------------------- names and defaults
_EMPTY = inspect.Parameter.empty
# The upstream signatures, from their documentation and sources: (name,
# default or _EMPTY) in order; a keyword-only parameter is marked "*name".
UPSTREAM = [
    # torchvision.ops
    (tv.roi_align, ["input", "boxes", "output_size", ("spatial_scale", 1.0),
                    ("sampling_ratio", -1), ("aligned", False)]),
    (tv.RoIAlign, ["output_size", "spatial_scale", "sampling_ratio", ("aligned", False)]),
    (tv.roi_pool, ["input", "boxes", "output_size", ("spatial_scale", 1.0)]),
    (tv.RoIPool, ["output_size", "spatial_scale"]),
    (tv.ps_roi_align, ["input", "boxes", "output_size", ("spatial_scale", 1.0),
                       ("sampling_ratio", -1)]),
    (tv.PSRoIAlign, ["output_size", "spatial_scale", "sampling_ratio"]),
    (tv.ps_roi_pool, ["input", "boxes", "output_size", ("spatial_scale", 1.0)]),
    (tv.PSRoIPool, ["output_size", "spatial_scale"]),
    (tv.MultiScaleRoIAlign, ["featmap_names", "output_size", "sampling_ratio",
                             ("*canonical_scale", 224), ("*canonical_level", 4)]),
    # detectron2.layers, detectron2.modeling.poolers
    (d2.roi_align, ["input", "boxes", "output_size", ("spatial_scale", 1.0),
                    ("sampling_ratio", -1), ("aligned", False)]),
    (d2.ROIAlign, ["output_size", "spatial_scale", "sampling_ratio", ("aligned", True)]),
    (d2.ROIAlign.forward, ["self", "input", "rois"]),
    (d2.roi_align_rotated, ["input", "roi", "output_size", "spatial_scale",
                            "sampling_ratio"]),
    (d2.ROIAlignRotated, ["output_size", "spatial_scale", "sampling_ratio"]),
    (d2.ROIAlignRotated.forward, ["self", "input", "rois"]),
    (d2.ROIPooler, ["output_size", "scales", "sampling_ratio", "pooler_type",
                    ("canonical_box_size", 224), ("canonical_level", 4)]),
    (d2.ROIPooler.forward, ["self", "x", "box_lists"]),
    (d2.assign_boxes_to_levels, ["box_lists", "min_level", "max_level",
                                 "canonical_box_size", "canonical_level"]),
    (d2.convert_boxes_to_pooler_format, ["box_lists"]),
    # mmcv.ops
    (mmcv.roi_align, ["input", "rois", "output_size", ("spatial_scale", 1.0),
                      ("sampling_ratio", 0), ("pool_mode", "avg"), ("aligned", True)]),
    (mmcv.RoIAlign, ["output_size", ("spatial_scale", 1.0), ("sampling_ratio", 0),
                     ("pool_mode", "avg"), ("aligned", True), ("use_torchvision", False)]),
    (mmcv.RoIAlign.forward, ["self", "input", "rois"]),
    (mmcv.roi_pool, ["input", "rois", "output_size", ("spatial_scale", 1.0)]),
    (mmcv.RoIPool, ["output_size", ("spatial_scale", 1.0)]),
    (mmcv.RoIPool.forward, ["self", "input", "rois"]),
    (mmcv.roi_align_rotated, ["input", "rois", "output_size", "spatial_scale",
                              ("sampling_ratio", 0), ("aligned", True),
                              ("clockwise", False)]),
    (mmcv.RoIAlignRotated, ["output_size", "spatial_scale", ("sampling_ratio", 0),
                            ("aligned", True), ("clockwise", False)]),
    (mmcv.RoIAlignRotated.forward, ["self", "input", "rois"]),
    (mmcv.prroi_pool, ["features", "rois", "output_size", ("spatial_scale", 1.0)]),
    (mmcv.PrRoIPool, ["output_size", ("spatial_scale", 1.0)]),
    (mmcv.PrRoIPool.forward, ["self", "features", "rois"]),
]


@pytest.mark.parametrize("obj, params", UPSTREAM,
                         ids=[f"{i}-{o.__qualname__}"
                              for i, (o, _) in enumerate(UPSTREAM)])
def test_upstream_names_and_defaults(obj, params):
    # The upstream parameters come first, in order, with their defaults and
    # kinds; anything curoi adds after them has a default (so every upstream
    # call, positional or by keyword, means the same).
    got = list(inspect.signature(obj).parameters.values())
    assert len(got) >= len(params)
    for p, want in zip(got, params):
        name, default = (want, _EMPTY) if isinstance(want, str) else want
        keyword_only = name.startswith("*")
        assert p.name == name.lstrip("*")
        assert p.default == default and type(p.default) is type(default)
        assert (p.kind is p.KEYWORD_ONLY) == keyword_only
    for p in got[len(params):]:
        assert p.default is not _EMPTY, p.name


# ------------------------------------------------------------ detectron2
def test_detectron2_roi_align_is_torchvision_s_function():
    assert d2.roi_align is ct.roi_align


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_detectron2_roi_align(aligned, sampling_ratio):
    m = d2.ROIAlign((3, 4), 0.5, sampling_ratio, aligned)
    got = _value_and_grad(m, X, ROIS)
    want = _value_and_grad(lambda x, r: ct.roi_align(x, r, (3, 4), 0.5, sampling_ratio,
                                                     aligned), X, ROIS)
    _assert_same(got, want)
    assert got[2] is None  # no box gradient, as detectron2's
    np.testing.assert_allclose(
        got[0].numpy(), ref.roi_align(X.numpy(), ROIS.numpy(), (3, 4), 0.5,
                                      sampling_ratio, aligned), rtol=1e-12, atol=1e-13)


def test_detectron2_roi_align_default_is_aligned():
    assert d2.ROIAlign(2, 1.0, 0).aligned is True
    assert torch.equal(d2.ROIAlign(2, 0.5, 0)(X, ROIS), ct.roi_align(X, ROIS, 2, 0.5, 0, True))


def test_detectron2_roi_align_casts_rois_to_the_features_dtype():
    # detectron2 calls roi_align with rois.to(input.dtype): float16
    # features sample at the boxes rounded to float16.
    x = X.half()
    rois = ROIS.float() + 0.0123
    got = d2.ROIAlign(3, 0.5, 2)(x, rois)
    assert torch.equal(got, ct.roi_align(x, rois.half(), 3, 0.5, 2, True))
    assert not torch.equal(got, ct.roi_align(x, rois, 3, 0.5, 2, True))


def test_detectron2_roi_align_dequantizes():
    xq = torch.quantize_per_tensor(X[:1].float(), 0.05, 3, torch.quint8)
    got = d2.ROIAlign(3, 0.5, 2)(xq, ROIS.float())
    assert got.dtype == torch.float32
    assert torch.equal(got, ct.roi_align(xq.dequantize(), ROIS.float(), 3, 0.5, 2, True))


def test_detectron2_rois_shape_is_an_assertion():
    for m, rois in ((d2.ROIAlign(2, 1.0, 0), ROIS[:, 1:]),
                    (d2.ROIAlignRotated(2, 1.0, 0), ROIS)):
        with pytest.raises(AssertionError, match=r"rois must be a \[K, [56]\] tensor"):
            m(X, rois)
        with pytest.raises(ct.BoxesShapeError):
            m(X, rois)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_detectron2_roi_align_rotated(sampling_ratio):
    m = d2.ROIAlignRotated((3, 2), 0.5, sampling_ratio)
    got = _value_and_grad(m, X, ROTATED)
    want = _value_and_grad(lambda x, r: ct.roi_align_rotated(
        x, r, (3, 2), 0.5, sampling_ratio, "detectron2"), X, ROTATED)
    _assert_same(got, want)
    assert got[2] is None
    _assert_same(_value_and_grad(lambda x, r: d2.roi_align_rotated(x, r, (3, 2), 0.5,
                                                                   sampling_ratio),
                                 X, ROTATED), want)
    np.testing.assert_allclose(
        got[0].numpy(), ref.roi_align_rotated(X.numpy(), ROTATED.numpy(), (3, 2), 0.5,
                                              sampling_ratio, "detectron2"),
        rtol=1e-12, atol=1e-13)


def test_detectron2_roi_align_rotated_float16_runs_in_float32():
    x, rois = X.half(), ROTATED.half()
    got = d2.ROIAlignRotated(3, 0.5, 2)(x, rois)
    assert got.dtype == torch.float16
    want = ct.roi_align_rotated(x.float(), rois.float(), 3, 0.5, 2, "detectron2").half()
    assert torch.equal(got, want)


def test_detectron2_rotated_degrees_are_mmcv_radians():
    # Two conventions of one formula: detectron2's degrees, counter-clockwise,
    # and mmcv's radians with aligned=True, clockwise=False; the angles
    # differ by the rounding of the unit conversion.
    d = d2.ROIAlignRotated(3, 0.5, 2)(X, ROTATED)
    m = mmcv.RoIAlignRotated(3, 0.5, 2)(X, ROTATED_RAD)
    np.testing.assert_allclose(d.numpy(), m.numpy(), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------- ROIPooler
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]  # levels 2 to 5
# Boxes and their levels by hand: level floor(4 + log2(sqrt(area) / 224 +
# 1e-8)), clamped to [2, 5], minus 2.
#   224 x 224: log2(1 + 1e-8) > 0, level 4 -> 2;  112 x 112: log2(0.5) = -1,
#   level 3 -> 1;  100 x 100: 4 + log2(0.446) = 2.84, level 2 -> 0;
#   20 x 20: 4 - 3.49 = 0.51, clamped to 2 -> 0;  448 x 448: level 5 -> 3;
#   400 x 900 (sqrt 600): 4 + 1.42 = 5.42, level 5 -> 3;  2000 x 2000:
#   clamped to 5 -> 3;  223 x 224 (sqrt 223.5): 4 + log2(0.9978) = 3.997,
#   level 3 -> 1;  60 x 240 (sqrt 120): 4 - 0.90 = 3.10 -> 1.
HAND_BOXES = [(0, 0, 224, 224), (10, 10, 122, 122), (5, 0, 105, 100), (1, 1, 21, 21),
              (0, 0, 448, 448), (0, 0, 400, 900), (0, 0, 2000, 2000), (0, 0, 223, 224),
              (3, 3, 63, 243)]
HAND_LEVELS = [2, 1, 0, 0, 3, 3, 3, 1, 1]


def test_assign_boxes_to_levels_by_hand():
    for dtype in (torch.float32, torch.float64):
        boxes = torch.tensor(HAND_BOXES, dtype=dtype)
        got = d2.assign_boxes_to_levels([boxes[:4], boxes[4:]], 2, 5, 224, 4)
        assert got.dtype == torch.int64
        assert got.tolist() == HAND_LEVELS
    # canonical_box_size 112, canonical_level 3: the 224 box is level 4 -> 2
    # of [2, 5]; the 20 box clamps to 2 -> 0.
    got = d2.assign_boxes_to_levels([torch.tensor(HAND_BOXES[:4], dtype=torch.float64)],
                                    2, 5, 112, 3)
    assert got.tolist() == [2, 1, 0, 0]
    # Rotated boxes: the area is width x height (angle and centre unused).
    rotated = torch.tensor([[50, 50, 224, 224, 30], [9, 9, 112, 112, -60],
                            [0, 0, 600, 600, 45]], dtype=torch.float64)
    assert d2.assign_boxes_to_levels([rotated], 2, 5, 224, 4).tolist() == [2, 1, 3]
    # A negative area (x2 < x1, y2 > y1) has no level: -1.
    bad = torch.tensor([[100, 0, 50, 80]], dtype=torch.float64)
    assert d2.assign_boxes_to_levels([bad], 2, 5, 224, 4).tolist() == [-1]


def _pyramid(dtype=torch.float64, n=2, c=3, size=128, levels=4, seed=5):
    rng = np.random.default_rng(seed)
    return [torch.tensor(rng.standard_normal((n, c, size >> i, size >> i)), dtype=dtype)
            for i in range(levels)]


def _box_lists(dtype=torch.float64):
    # Image coordinates of a 512 x 512 image (the finest map is 1/4 of it),
    # the hand boxes shifted and cut to be inside it, plus the ones above.
    boxes = torch.tensor(HAND_BOXES, dtype=dtype) * 0.25 + torch.tensor(
        [3.5, 7.25, 3.5, 7.25], dtype=dtype)
    # Scaled by 1/4, the levels shift down by two: by hand, sqrt(area)/4 ...
    return [boxes[:5], boxes[5:]]


def _pooled_by_hand(fn, x, box_lists, levels, scales=SCALES):
    """Each box through fn on the level given, stacked in order."""
    rows = []
    i = 0
    for image, boxes in enumerate(box_lists):
        for b in boxes:
            level = levels[i]
            roi = torch.cat([torch.tensor([float(image)], dtype=b.dtype), b])[None]
            rows.append(fn(x[level], roi, scales[level]))
            i += 1
    return torch.cat(rows)


# The levels of _box_lists() by hand: sqrt(area) / 4 of the hand boxes.
#   56: 4 + log2(0.25) = 2 -> 0;  28: 1 -> clamped 0;  25: 0;  5: 0;
#   112: 3 -> 1;  150: 4 + log2(0.67) = 3.42 -> 1;  500: 5.16 -> 3;
#   55.9: 1.997 -> clamped 0;  30: 0.
POOLER_LEVELS = [0, 0, 0, 0, 1, 1, 3, 0, 0]


def test_pooler_box_lists_levels():
    got = d2.assign_boxes_to_levels(_box_lists(), 2, 5, 224, 4).tolist()
    assert got == POOLER_LEVELS


LEVEL_OPS = {
    "ROIAlign": lambda x, r, s: ct.roi_align(x, r, (5, 4), s, 2, False),
    "ROIAlignV2": lambda x, r, s: ct.roi_align(x, r, (5, 4), s, 2, True),
    "ROIPool": lambda x, r, s: ct.roi_pool(x, r, (5, 4), s),
}


@pytest.mark.parametrize("pooler_type", ["ROIAlign", "ROIAlignV2", "ROIPool"])
def test_roi_pooler_against_each_box_on_its_level(pooler_type):
    x = _pyramid()
    box_lists = _box_lists()
    pooler = d2.ROIPooler((5, 4), SCALES, 2, pooler_type)
    assert (pooler.min_level, pooler.max_level) == (2, 5)
    xs = [f.detach().clone().requires_grad_(True) for f in x]
    got = pooler(xs, box_lists)
    w = torch.tensor(np.random.default_rng(1).standard_normal(tuple(got.shape)))
    grads = torch.autograd.grad((got * w).sum(), xs, allow_unused=True)
    xs2 = [f.detach().clone().requires_grad_(True) for f in x]
    want = _pooled_by_hand(LEVEL_OPS[pooler_type], xs2, box_lists, POOLER_LEVELS)
    # (Level 2 holds no box: its gradient is 0, or None from the calls by hand.)
    want_grads = torch.autograd.grad((want * w).sum(), xs2, allow_unused=True)
    assert got.shape == (9, 3, 5, 4)
    # One launch (RoI Align) or per level, the numbers of the box's own op.
    assert torch.equal(got.detach(), want.detach())
    for g, wg, f in zip(grads, want_grads, x):
        zeros = torch.zeros_like(f)
        torch.testing.assert_close(zeros if g is None else g, zeros if wg is None else wg,
                                   rtol=1e-13, atol=1e-14)


def test_roi_pooler_rotated_against_each_box_on_its_level():
    x = _pyramid()
    box_lists = [torch.tensor([[40, 40, 56, 56, 30], [60, 70, 112, 100, -20]],
                              dtype=torch.float64),
                 torch.tensor([[100, 90, 300, 400, 75], [20, 20, 8, 30, 0]],
                              dtype=torch.float64)]
    # sqrt(w h): 56 -> level 2 -> 0; 105.8 -> 4 + log2(0.472) = 2.92 -> 0;
    # 346 -> 4.63 -> 2; 15.5 -> clamped 0.
    levels = [0, 0, 2, 0]
    assert d2.assign_boxes_to_levels(box_lists, 2, 5, 224, 4).tolist() == levels
    got = d2.ROIPooler(3, SCALES, 0, "ROIAlignRotated")(x, box_lists)
    want = _pooled_by_hand(lambda f, r, s: ct.roi_align_rotated(f, r, 3, s, 0,
                                                                "detectron2"),
                           x, box_lists, levels)
    assert torch.equal(got, want)


def test_roi_pooler_one_launch_equals_per_level():
    # float64 maps with float64 boxes run the multiscale kernel; float32
    # boxes (the same values) run one call per level: the same numbers.
    x = _pyramid()
    b64 = _box_lists(torch.float64)
    b32 = _box_lists(torch.float32)
    assert d2._one_launch(x, b64, "ROIAlignV2")
    assert not d2._one_launch(x, b32, "ROIAlignV2")
    assert not d2._one_launch([f.half() for f in x], [b.half() for b in b64], "ROIAlign")
    assert not d2._one_launch(x, b64, "ROIPool")
    pooler = d2.ROIPooler(7, SCALES, 0, "ROIAlignV2")
    assert torch.equal(pooler(x, b64), pooler(x, b32))


def test_roi_pooler_detectron2_level_rule_in_one_launch():
    # At the boundary: a 224 x 224 box is level 4 by detectron2's rule
    # (the 1e-8 is inside the log); 223 x 224 is level 3.
    x = _pyramid(size=256)
    boxes = [torch.tensor([[0, 0, 224, 224], [0, 0, 223, 224]], dtype=torch.float32)]
    x = [f[:1].float() for f in x]
    got = d2.ROIPooler(2, SCALES, 2, "ROIAlignV2")(x, boxes)
    roi = torch.cat([torch.zeros(2, 1), boxes[0]], 1)
    assert torch.equal(got[0], ct.roi_align(x[2], roi[:1], 2, SCALES[2], 2, True)[0])
    assert torch.equal(got[1], ct.roi_align(x[1], roi[1:], 2, SCALES[1], 2, True)[0])


def test_roi_pooler_one_level_pools_every_box_from_it():
    x = _pyramid(levels=1)
    box_lists = _box_lists()
    for pooler_type, op in LEVEL_OPS.items():
        got = d2.ROIPooler((5, 4), [1 / 4], 2, pooler_type)(x, box_lists)
        rois = d2.convert_boxes_to_pooler_format(box_lists)
        assert torch.equal(got, op(x[0], rois, 1 / 4))


def test_roi_pooler_half_precision_per_level_as_detectron2():
    # float16 maps: detectron2's ROIAlign samples at the boxes cast to
    # float16, with the levels from the boxes as given.
    x = [f.half() for f in _pyramid()]
    box_lists = _box_lists(torch.float32)
    got = d2.ROIPooler((5, 4), SCALES, 2, "ROIAlignV2")(x, box_lists)
    want = _pooled_by_hand(lambda f, r, s: ct.roi_align(f, r.half(), (5, 4), s, 2, True),
                           x, box_lists, POOLER_LEVELS)
    assert got.dtype == torch.float16
    assert torch.equal(got, want)


def test_roi_pooler_box_with_no_level_gives_zeros():
    x = _pyramid()
    box_lists = [torch.tensor([[30, 10, 20, 40], [2, 2, 30, 30]], dtype=torch.float64)]
    x = [f[:1] for f in x]
    for pooler_type in ("ROIAlignV2", "ROIPool"):
        got = d2.ROIPooler(3, SCALES, 2, pooler_type)(x, box_lists)
        assert torch.count_nonzero(got[0]) == 0
        assert torch.count_nonzero(got[1]) > 0


class _Boxes:
    """detectron2's Boxes as the pooler reads it: a ``.tensor``."""

    def __init__(self, tensor):
        self.tensor = tensor


def test_roi_pooler_edges():
    x = _pyramid()
    box_lists = _box_lists()
    pooler = d2.ROIPooler(7, SCALES, 0, "ROIAlign")
    assert torch.equal(pooler(x, [_Boxes(b) for b in box_lists]), pooler(x, box_lists))
    # No images: no boxes.
    empty = pooler([f[:0] for f in x], [])
    assert empty.shape == (0, 3, 7, 7)
    # Images without boxes.
    none = pooler(x, [b[:0] for b in box_lists])
    assert none.shape == (0, 3, 7, 7)
    with pytest.raises(AssertionError, match="box_lists holds boxes for 1 images"):
        pooler(x, box_lists[:1])
    with pytest.raises(d2.ROIPoolerError, match="x holds 3 feature maps"):
        pooler(x[:3], box_lists)
    with pytest.raises(AssertionError, match=r"must be \[L, 5\] rotated boxes"):
        d2.ROIPooler(7, SCALES, 0, "ROIAlignRotated")(x, box_lists)


def test_roi_pooler_settings_as_detectron2_asserts_them():
    with pytest.raises(ValueError, match="Unknown pooler type: ROIAlignV3"):
        d2.ROIPooler(7, SCALES, 0, "ROIAlignV3")
    for scales in ([1 / 4, 1 / 16], [1 / 3, 1 / 6], [2.0, 1.0],
                   [1 / 4, 1 / 16, 1 / 8, 1 / 32]):
        with pytest.raises(AssertionError):
            d2.ROIPooler(7, scales, 0, "ROIAlign")
    with pytest.raises(d2.ROIPoolerError, match="canonical_box_size"):
        d2.ROIPooler(7, SCALES, 0, "ROIAlign", canonical_box_size=0)
    assert d2.ROIPooler(7, SCALES, 0, "ROIAlign").output_size == (7, 7)


# ------------------------------------------------------------------ mmcv
@pytest.mark.parametrize("pool_mode", ["avg", "max"])
@pytest.mark.parametrize("aligned", [True, False])
def test_mmcv_roi_align(pool_mode, aligned):
    m = mmcv.RoIAlign(3, 0.5, 0, pool_mode, aligned)
    assert m.output_size == (3, 3) and m.sampling_ratio == 0
    got = _value_and_grad(m, X, ROIS)
    want = _value_and_grad(lambda x, r: ct.roi_align(x, r, 3, 0.5, 0, aligned,
                                                     mode=pool_mode), X, ROIS)
    _assert_same(got, want)
    assert got[2] is None
    _assert_same(_value_and_grad(
        lambda x, r: mmcv.roi_align(x, r, 3, 0.5, 0, pool_mode, aligned), X, ROIS), want)
    if pool_mode == "avg":
        expected = ref.roi_align(X.numpy(), ROIS.numpy(), 3, 0.5, 0, aligned)
    else:
        expected = ref.roi_align_max_interpolated(X.numpy(), ROIS.numpy(), 3, 0.5, 0,
                                                  aligned)[0]
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-12, atol=1e-13)


def test_mmcv_roi_align_defaults_and_use_torchvision():
    assert torch.equal(mmcv.RoIAlign(2)(X, ROIS), ct.roi_align(X, ROIS, 2, 1.0, 0, True))
    assert torch.equal(mmcv.roi_align(X, ROIS, 2), ct.roi_align(X, ROIS, 2, 1.0, 0, True))
    # use_torchvision: torchvision's roi_align, the average whatever pool_mode says.
    m = mmcv.RoIAlign(2, 0.5, 2, "max", True, use_torchvision=True)
    assert torch.equal(m(X, ROIS), ct.roi_align(X, ROIS, 2, 0.5, 2, True))


def test_mmcv_old_argument_names():
    for make, new in ((lambda **k: mmcv.RoIAlign(spatial_scale=0.5, **k), mmcv.RoIAlign),
                      (lambda **k: mmcv.RoIAlignRotated(spatial_scale=0.5, clockwise=True,
                                                        **k), mmcv.RoIAlignRotated)):
        with pytest.warns(DeprecationWarning) as record:
            old = make(out_size=(2, 3), sample_num=2)
        assert sorted(str(r.message) for r in record) == [
            f'"out_size" is deprecated in `{new.__name__}`, please use "output_size" instead',
            f'"sample_num" is deprecated in `{new.__name__}`, please use "sampling_ratio" '
            'instead']
        assert (old.output_size, old.sampling_ratio) == ((2, 3), 2)
        rois = ROIS if new is mmcv.RoIAlign else ROTATED_RAD
        assert torch.equal(old(X, rois), make(output_size=(2, 3), sampling_ratio=2)(X, rois))
    with pytest.raises(TypeError, match="both 'out_size' and 'output_size'"):
        mmcv.RoIAlign(out_size=2, output_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mmcv.RoIAlign(output_size=2, sampling_ratio=1)  # the new names warn nothing


def test_mmcv_roi_pool():
    m = mmcv.RoIPool((3, 2), 0.5)
    got = _value_and_grad(m, X, ROIS)
    want = _value_and_grad(lambda x, r: ct.roi_pool(x, r, (3, 2), 0.5, "mmcv"), X, ROIS)
    _assert_same(got, want)
    _assert_same(_value_and_grad(lambda x, r: mmcv.roi_pool(x, r, (3, 2), 0.5), X, ROIS),
                 want)
    np.testing.assert_array_equal(
        got[0].numpy(), ref.roi_pool(X.numpy(), ROIS.numpy(), (3, 2), 0.5, "mmcv")[0])
    assert torch.equal(mmcv.RoIPool(2)(X, ROIS), ct.roi_pool(X, ROIS, 2, 1.0, "mmcv"))


@pytest.mark.parametrize("aligned, clockwise", [(True, False), (False, True),
                                                (True, True)])
def test_mmcv_roi_align_rotated(aligned, clockwise):
    m = mmcv.RoIAlignRotated((2, 3), 0.5, 2, aligned, clockwise)
    got = _value_and_grad(m, X, ROTATED_RAD)
    want = _value_and_grad(lambda x, r: ct.roi_align_rotated(
        x, r, (2, 3), 0.5, 2, "mmcv", aligned, clockwise), X, ROTATED_RAD)
    _assert_same(got, want)
    assert got[2] is None
    _assert_same(_value_and_grad(lambda x, r: mmcv.roi_align_rotated(
        x, r, (2, 3), 0.5, 2, aligned, clockwise), X, ROTATED_RAD), want)
    np.testing.assert_allclose(
        got[0].numpy(), ref.roi_align_rotated(X.numpy(), ROTATED_RAD.numpy(), (2, 3), 0.5,
                                              2, "mmcv", aligned, clockwise),
        rtol=1e-12, atol=1e-13)


def test_mmcv_rotated_clockwise_is_the_negated_angle():
    flipped = torch.cat([ROTATED_RAD[:, :5], -ROTATED_RAD[:, 5:]], 1)
    assert torch.equal(mmcv.RoIAlignRotated(3, 0.5, 2, clockwise=True)(X, ROTATED_RAD),
                       mmcv.RoIAlignRotated(3, 0.5, 2)(X, flipped))


def test_mmcv_prroi_pool_gives_the_boxes_their_gradient():
    m = mmcv.PrRoIPool(2, 0.5)
    got = _value_and_grad(m, X, ROIS)
    want = _value_and_grad(lambda x, r: ct.prroi_pool(x, r, 2, 0.5), X, ROIS)
    _assert_same(got, want)
    assert got[2] is not None
    _assert_same(_value_and_grad(lambda x, r: mmcv.prroi_pool(x, r, (2, 2), 0.5), X, ROIS),
                 want)
    np.testing.assert_allclose(got[0].numpy(),
                               ref.prroi_pool(X.numpy(), ROIS.numpy(), 2, 0.5),
                               rtol=1e-12, atol=1e-13)


def test_mmcv_reprs():
    assert repr(mmcv.RoIAlign(7, 0.25)) == (
        "RoIAlign(output_size=(7, 7), spatial_scale=0.25, sampling_ratio=0, "
        "pool_mode=avg, aligned=True, use_torchvision=False)")
    assert repr(mmcv.RoIAlignRotated(7, 0.25)) == (
        "RoIAlignRotated(output_size=(7, 7), spatial_scale=0.25, sampling_ratio=0, "
        "aligned=True, clockwise=False)")
    assert repr(d2.ROIAlign((7, 7), 0.25, 0)) == (
        "ROIAlign(output_size=(7, 7), spatial_scale=0.25, sampling_ratio=0, aligned=True)")


# ------------------------------------------------- TorchScript and torch.fx
MODULES = [
    ("d2.ROIAlign", lambda: d2.ROIAlign((2, 3), 0.5, 0), ROIS),
    ("d2.ROIAlign legacy", lambda: d2.ROIAlign(2, 0.5, 2, aligned=False), ROIS),
    ("d2.ROIAlignRotated", lambda: d2.ROIAlignRotated(3, 0.5, 0), ROTATED),
    ("mmcv.RoIAlign", lambda: mmcv.RoIAlign(3, 0.5), ROIS),
    ("mmcv.RoIAlign max", lambda: mmcv.RoIAlign(3, 0.5, 2, "max", False), ROIS),
    ("mmcv.RoIAlign torchvision", lambda: mmcv.RoIAlign(3, 0.5, 2, "max",
                                                        use_torchvision=True), ROIS),
    ("mmcv.RoIPool", lambda: mmcv.RoIPool(3, 0.5), ROIS),
    ("mmcv.RoIAlignRotated", lambda: mmcv.RoIAlignRotated(3, 0.5, 2, False, True),
     ROTATED_RAD),
    ("mmcv.PrRoIPool", lambda: mmcv.PrRoIPool(3, 0.5), ROIS),
]


@pytest.mark.parametrize("name, make, rois", MODULES, ids=[m[0] for m in MODULES])
def test_modules_script_save_load_and_fx(name, make, rois):
    m = make()
    want = _value_and_grad(m, X, rois)
    scripted = torch.jit.script(m)
    _assert_same(_value_and_grad(scripted, X, rois), want)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    _assert_same(_value_and_grad(torch.jit.load(buffer), X, rois), want)
    graph = torch.fx.symbolic_trace(m)
    calls = [n for n in graph.graph.nodes if n.op == "call_function"]
    assert len(calls) == 1  # one leaf, as torchvision's ops under torch.fx
    _assert_same(_value_and_grad(graph, X, rois), want)
    # Traced, then run on other boxes (fewer, moved).
    traced = torch.jit.trace(m, (X, rois))
    other = rois[1:].clone()
    other[:, 1:3] += 0.75
    _assert_same(_value_and_grad(traced, X, other), _value_and_grad(m, X, other))


@pytest.mark.parametrize("pooler_type", d2.POOLER_TYPES)
def test_roi_pooler_script_save_load_and_fx(pooler_type):
    x = _pyramid()
    if pooler_type == "ROIAlignRotated":
        box_lists = [torch.tensor([[40, 40, 56, 56, 30], [60, 70, 112, 100, -20]],
                                  dtype=torch.float64),
                     torch.tensor([[100, 90, 300, 400, 75]], dtype=torch.float64)]
    else:
        box_lists = _box_lists()
    pooler = d2.ROIPooler(5, SCALES, 2, pooler_type)
    want = pooler(x, box_lists)
    if importlib.util.find_spec("detectron2") is not None:
        pytest.skip("detectron2 is installed: the scripted pooler takes its Boxes "
                    "(test_roi_pooler_scripted_takes_detectron2_boxes)")
    scripted = torch.jit.script(pooler)
    assert torch.equal(scripted(x, box_lists), want)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    assert torch.equal(torch.jit.load(buffer)(x, box_lists), want)
    graph = torch.fx.symbolic_trace(pooler)
    assert len([n for n in graph.graph.nodes if n.op == "call_function"]) == 1
    assert torch.equal(graph(x, box_lists), want)
    # Traced, then run on other boxes: the levels are computed, not recorded.
    traced = torch.jit.trace(pooler, (x, box_lists))
    other = [box_lists[1] * 1.5, box_lists[0][:1] * 0.5]
    assert torch.equal(traced(x, other), pooler(x, other))


# detectron2's Boxes as far as a pooler reads it, for a process without
# detectron2: a TorchScript-compatible class with a .tensor.
_STAND_IN_BOXES = """
import torch


class Boxes:
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
"""

_SCRIPT_WITH_BOXES = """
import io
import torch
from detectron2.structures import Boxes
from curoi.torch.compat.detectron2 import ROIPooler

x = [torch.rand(2, 3, 64 >> i, 64 >> i) for i in range(3)]
tensors = [torch.tensor([[1.0, 2, 40, 50], [0, 0, 200, 220]]),
           torch.tensor([[3.0, 3, 90, 99]])]
pooler = ROIPooler(7, [1 / 4, 1 / 8, 1 / 16], 0, "ROIAlignV2")
want = pooler(x, tensors)
assert torch.equal(pooler(x, [Boxes(t) for t in tensors]), want)
scripted = torch.jit.script(pooler)
assert torch.equal(scripted(x, [Boxes(t) for t in tensors]), want)
buffer = io.BytesIO()
torch.jit.save(scripted, buffer)
buffer.seek(0)
assert torch.equal(torch.jit.load(buffer)(x, [Boxes(t) for t in tensors]), want)
print("ok")
"""


def test_roi_pooler_scripted_takes_detectron2_boxes(tmp_path):
    # detectron2's own test scripts its pooler and calls it with a list of
    # Boxes: where detectron2 is installed, the scripted pooler takes them.
    (tmp_path / "detectron2").mkdir()
    (tmp_path / "detectron2" / "__init__.py").write_text("")
    (tmp_path / "detectron2" / "structures.py").write_text(_STAND_IN_BOXES)
    path = os.pathsep.join([str(tmp_path)] + sys.path)
    out = subprocess.run([sys.executable, "-c", _SCRIPT_WITH_BOXES], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": path})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok"]


@pytest.mark.parametrize("make", [lambda: d2.ROIAlign(3, 0.5, 0),
                                  lambda: d2.ROIAlign(3, 0.5, 2, False),
                                  lambda: mmcv.RoIAlign(3, 0.5)],
                         ids=["d2.ROIAlign", "d2.ROIAlign legacy", "mmcv.RoIAlign"])
def test_onnx_export_runs_in_onnxruntime(make):
    ort = pytest.importorskip("onnxruntime")
    m = make()
    x, rois = X[:1].float(), ROIS[ROIS[:, 0] == 0].float()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x, rois), buffer, opset_version=16, dynamo=False)
    session = ort.InferenceSession(buffer.getvalue())
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(names, (x.numpy(), rois.numpy()))))[0]
    np.testing.assert_allclose(got, m(x, rois).numpy(), rtol=1e-5, atol=1e-6)


def test_onnx_export_refuses_mmcv_roi_pool():
    with pytest.raises(ValueError, match="cannot be exported to ONNX"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(mmcv.RoIPool(2, 0.5), (X.float(), ROIS.float()), io.BytesIO(),
                              opset_version=16, dynamo=False)


def test_saved_scripted_modules_load_in_a_fresh_process(tmp_path):
    # A deployed process imports curoi.torch (which registers the ops) and
    # loads the archives.
    x = _pyramid(dtype=torch.float32)
    box_lists = _box_lists(torch.float32)
    pooler = d2.ROIPooler(5, SCALES, 2, "ROIAlignV2")
    align = mmcv.RoIAlign(3, 0.5, 2, "max")
    rois = d2.convert_boxes_to_pooler_format(box_lists)
    if importlib.util.find_spec("detectron2") is not None:
        pytest.skip("detectron2 is installed: the scripted pooler takes its Boxes")
    torch.jit.save(torch.jit.script(pooler), str(tmp_path / "pooler.pt"))
    torch.jit.save(torch.jit.script(align), str(tmp_path / "align.pt"))
    torch.save({"x": x, "boxes": box_lists, "rois": rois}, str(tmp_path / "inputs.pt"))
    code = ("import sys, torch, curoi.torch\n"
            "d = torch.load(sys.argv[1] + '/inputs.pt')\n"
            "p = torch.jit.load(sys.argv[1] + '/pooler.pt')\n"
            "a = torch.jit.load(sys.argv[1] + '/align.pt')\n"
            "torch.save({'pooled': p(d['x'], d['boxes']), 'aligned': a(d['x'][0], d['rois'])},"
            " sys.argv[1] + '/outputs.pt')\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    out = torch.load(str(tmp_path / "outputs.pt"))
    assert torch.equal(out["pooled"], pooler(x, box_lists))
    assert torch.equal(out["aligned"], align(x[0], rois))

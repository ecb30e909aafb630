"""Property tests (Hypothesis): the CPU backend against the NumPy reference
on generated features, boxes and arguments, and invariants that any correct
implementation has.

Tolerances, against tests/reference.py (float64 throughout):
  float64: rtol 1e-9, atol 1e-12 (summation order only);
  float32: rtol 1e-4, atol 5e-5 (boxes, sample positions and bilinear
  weights are computed in float32; outputs are O(1)).
roi_pool values and argmax are selections, not sums: compared exactly.

Boxes are generated with corners a multiple of 1/8 plus a fixed irrational
looking offset, and spatial scales are powers of two. Without the offset a
sample could land exactly on a discontinuity (the -1 / H cut-off of RoI
Align, a floor/ceil/round edge of RoI Pool), where float32 and the float64
reference may round to different sides: a difference of representation,
not of semantics. Degenerate (x1 == x2), reversed, off-map boxes and
unusable batch indices are all generated.

The profile is derandomized and keeps no example database, so CI runs the
same examples every time and writes nothing.
"""

import inspect

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import curoi
import reference

PROFILE = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOL = {"float32": dict(rtol=1e-4, atol=5e-5), "float64": dict(rtol=1e-9, atol=1e-12)}
JITTER = 0.0441941738241592  # ~ 1/(16 sqrt 2): not near any simple fraction
HAS_DETERMINISTIC = "deterministic" in inspect.signature(curoi.roi_align_backward).parameters


@st.composite
def cases(draw, max_boxes=4):
    dtype = draw(st.sampled_from(["float32", "float64"]))
    n = draw(st.integers(1, 2))
    c = draw(st.integers(1, 3))
    h = draw(st.integers(1, 8))
    w = draw(st.integers(1, 8))
    scale = draw(st.sampled_from([0.25, 0.5, 1.0, 2.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    x = np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(dtype)
    coordinate = st.integers(-40, 120).map(lambda v: v / 8 / scale + JITTER)
    batch = st.one_of(st.integers(0, n - 1).map(float),
                      st.sampled_from([-1.0, float(n), np.nan, np.inf, 0.5 * n - 0.25]))
    rows = []
    for _ in range(draw(st.integers(0, max_boxes))):
        x1, y1 = draw(coordinate), draw(coordinate)
        kind = draw(st.sampled_from(["any", "any", "degenerate", "nan"]))
        x2, y2 = draw(coordinate), draw(coordinate)
        if kind == "degenerate":
            x2 = x1
        elif kind == "nan":
            y2 = np.nan
        rows.append([draw(batch), x1, y1, x2, y2])
    boxes = np.array(rows, dtype=dtype).reshape(-1, 5)
    output_size = draw(st.one_of(st.integers(1, 3),
                                 st.tuples(st.integers(1, 3), st.integers(1, 3))))
    return dict(x=x, boxes=boxes, output_size=output_size, scale=scale,
                ratio=draw(st.integers(-1, 3)), aligned=draw(st.booleans()),
                convention=draw(st.sampled_from(["torchvision", "mmcv"])),
                seed=seed)


def _pair(output_size):
    return (output_size, output_size) if isinstance(output_size, int) else output_size


def _grad(case, dtype=None):
    k, c = case["boxes"].shape[0], case["x"].shape[1]
    shape = (k, c) + tuple(_pair(case["output_size"]))
    rng = np.random.default_rng(case["seed"] + 1)
    return rng.standard_normal(shape).astype(dtype or case["x"].dtype)


def _align_args(case):
    return (case["output_size"], case["scale"], case["ratio"], case["aligned"])


@PROFILE
@given(cases())
def test_roi_align_matches_the_reference(case):
    x, boxes = case["x"], case["boxes"]
    tol = TOL[x.dtype.name]
    y = curoi.roi_align(x, boxes, *_align_args(case))
    assert y.dtype == x.dtype
    np.testing.assert_allclose(y, reference.roi_align(x, boxes, *_align_args(case)), **tol)
    g = _grad(case)
    gx = curoi.roi_align_backward(g, boxes, x.shape, *_align_args(case))
    assert gx.dtype == x.dtype and gx.shape == x.shape
    np.testing.assert_allclose(
        gx, reference.roi_align_backward(g, boxes, x.shape, *_align_args(case)), **tol)


@PROFILE
@given(cases())
def test_roi_pool_matches_the_reference(case):
    x, boxes = case["x"], case["boxes"]
    y, argmax = curoi.roi_pool(x, boxes, case["output_size"], case["scale"],
                               convention=case["convention"], return_argmax=True)
    want_y, want_argmax = reference.roi_pool(x, boxes, case["output_size"], case["scale"],
                                             case["convention"])
    np.testing.assert_array_equal(y, want_y.astype(x.dtype))
    np.testing.assert_array_equal(argmax, want_argmax)
    g = _grad(case)
    np.testing.assert_allclose(
        curoi.roi_pool_backward(g, argmax, boxes, x.shape),
        reference.roi_pool_backward(g, want_argmax, boxes, x.shape), **TOL[x.dtype.name])


@PROFILE
@given(cases())
def test_roi_pool_output_is_the_value_at_argmax(case):
    x, boxes = case["x"], case["boxes"]
    y, argmax = curoi.roi_pool(x, boxes, case["output_size"], case["scale"],
                               convention=case["convention"], return_argmax=True)
    n, c, h, w = x.shape
    assert ((argmax >= -1) & (argmax < h * w)).all()
    for k in range(boxes.shape[0]):
        if (argmax[k] == -1).all():
            assert not y[k].any()
            continue
        # A box that read something has a usable batch index.
        b = int(boxes[k, 0])
        planes = x[b].reshape(c, h * w)
        at = argmax[k].reshape(c, -1)
        picked = np.take_along_axis(planes, np.maximum(at, 0), axis=1)
        np.testing.assert_array_equal(y[k].reshape(c, -1), np.where(at >= 0, picked, 0))


@PROFILE
@given(cases(max_boxes=5))
def test_gradient_of_all_boxes_is_the_sum_over_boxes(case):
    # Backward is linear in grad_output and boxes do not interact: the
    # gradient of the sum of all outputs is the sum of per-box gradients.
    x, boxes = case["x"], case["boxes"]
    g = _grad(case)
    tol = TOL[x.dtype.name]
    whole = curoi.roi_align_backward(g, boxes, x.shape, *_align_args(case))
    parts = sum((curoi.roi_align_backward(g[k:k + 1], boxes[k:k + 1], x.shape,
                                          *_align_args(case)).astype(np.float64)
                 for k in range(len(boxes))), np.zeros(x.shape))
    np.testing.assert_allclose(whole, parts, **tol)
    _, argmax = curoi.roi_pool(x, boxes, case["output_size"], case["scale"],
                               convention=case["convention"], return_argmax=True)
    whole = curoi.roi_pool_backward(g, argmax, boxes, x.shape)
    parts = sum((curoi.roi_pool_backward(g[k:k + 1], argmax[k:k + 1], boxes[k:k + 1],
                                         x.shape).astype(np.float64)
                 for k in range(len(boxes))), np.zeros(x.shape))
    np.testing.assert_allclose(whole, parts, **tol)


@PROFILE
@given(cases(), st.sampled_from([-3, -1, 1, 4]))
def test_scaling_features_by_a_power_of_two_scales_outputs_exactly(case, e):
    # Multiplying by 2**e is exact in floating point and commutes with every
    # product and sum the operators compute (no overflow or underflow here).
    x, boxes = case["x"], case["boxes"]
    f = x.dtype.type(2.0 ** e)
    np.testing.assert_array_equal(curoi.roi_align(x * f, boxes, *_align_args(case)),
                                  curoi.roi_align(x, boxes, *_align_args(case)) * f)
    y, argmax = curoi.roi_pool(x, boxes, case["output_size"], case["scale"],
                               convention=case["convention"], return_argmax=True)
    y2, argmax2 = curoi.roi_pool(x * f, boxes, case["output_size"], case["scale"],
                                 convention=case["convention"], return_argmax=True)
    np.testing.assert_array_equal(y2, y * f)
    np.testing.assert_array_equal(argmax2, argmax)
    g = _grad(case)
    # The backward's atomic adds may sum in another order from run to run;
    # its deterministic flavour (where present) must be exact too.
    kw = {"deterministic": True} if HAS_DETERMINISTIC else {}
    a = curoi.roi_align_backward(g * f, boxes, x.shape, *_align_args(case), **kw)
    b = curoi.roi_align_backward(g, boxes, x.shape, *_align_args(case), **kw) * f
    if HAS_DETERMINISTIC:
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, **TOL[x.dtype.name])

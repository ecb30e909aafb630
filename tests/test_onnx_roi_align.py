"""curoi.onnx_roi_align: ONNX RoiAlign's own signature and semantics.

Expected values come from ONNX itself: the backend node test cases that ship
inside the onnx package (inputs and expected outputs written by ONNX), ONNX's
reference evaluator, and onnxruntime, on one-node models built from the same
attributes that are passed to curoi.
"""

import functools

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

import curoi  # noqa: E402



def _backend_cases():
    """ONNX's RoiAlign node tests as {name: (attributes, inputs, outputs,
    rtol, atol)}. Importing the case module runs its exports, which record
    each case with ONNX's own expected outputs."""
    from onnx.backend.test.case import node as node_cases
    from onnx.backend.test.case.node import roialign  # noqa: F401

    cases = {}
    for case in node_cases._NodeTestCases:
        (node,) = case.model.graph.node
        if node.op_type != "RoiAlign":
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attributes = {k: v.decode() if isinstance(v, bytes) else v
                      for k, v in attributes.items()}
        (inputs, outputs), = case.data_sets
        cases[case.name] = (attributes, inputs, outputs, case.rtol, case.atol)
    return cases


_CASES = _backend_cases()


def test_onnx_ships_the_three_roialign_cases():
    assert set(_CASES) == {"test_roialign_aligned_false", "test_roialign_aligned_true",
                           "test_roialign_mode_max"}


@pytest.mark.parametrize("name", [
    "test_roialign_aligned_false",
    "test_roialign_aligned_true",
    "test_roialign_mode_max",
])
def test_onnx_backend_case(name):
    attributes, (x, rois, batch_indices), (expected,), rtol, atol = _CASES[name]
    y = curoi.onnx_roi_align(x, rois, batch_indices, **attributes)
    assert isinstance(y, np.ndarray) and y.dtype == expected.dtype
    # The tolerances the ONNX backend test runner applies to these cases.
    np.testing.assert_allclose(y, expected, rtol=rtol, atol=atol)


# ------------------------------------------------------------- random cases
_ONNX_TYPES = {np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE}


@functools.lru_cache(maxsize=None)
def _model(dtype, **attributes):
    t = _ONNX_TYPES[dtype]
    node = helper.make_node("RoiAlign", ["X", "rois", "batch_indices"], ["Y"], **attributes)
    graph = helper.make_graph(
        [node], "roi_align",
        [helper.make_tensor_value_info("X", t, ["N", "C", "H", "W"]),
         helper.make_tensor_value_info("rois", t, ["K", 4]),
         helper.make_tensor_value_info("batch_indices", TensorProto.INT64, ["K"])],
        [helper.make_tensor_value_info("Y", t, ["K", "C", "PH", "PW"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    model.ir_version = 8  # the IR version of opset 16
    onnx.checker.check_model(model)
    return model


def _reference_evaluator(dtype, attributes, x, rois, batch_indices):
    model = _model(dtype, **attributes)
    return ReferenceEvaluator(model).run(
        None, {"X": x, "rois": rois, "batch_indices": batch_indices})[0]


def _onnxruntime(dtype, attributes, x, rois, batch_indices):
    session = ort.InferenceSession(_model(dtype, **attributes).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x, "rois": rois, "batch_indices": batch_indices})[0]


def _random_case(seed, dtype):
    rng = np.random.default_rng(seed)
    n, c, h, w = 2, 3, int(rng.integers(5, 12)), int(rng.integers(5, 12))
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    k = 6
    # Image coordinates at spatial_scale 1/2: boxes inside the map, across
    # its edges and smaller than a pixel, with quarter-pixel corners.
    x1y1 = rng.uniform(-4, 2 * max(h, w), (k, 2))
    size = rng.uniform(0.25, 2 * max(h, w), (k, 2))
    rois = np.round(np.concatenate([x1y1, x1y1 + size], axis=1) * 4) / 4
    batch_indices = rng.integers(0, n, k).astype(np.int64)
    return x, rois.astype(dtype), batch_indices


_ATTRIBUTE_SETS = [
    dict(coordinate_transformation_mode=mode, sampling_ratio=ratio,
         output_height=ph, output_width=pw, spatial_scale=0.5)
    for mode in ("half_pixel", "output_half_pixel")
    for ratio, ph, pw in ((0, 3, 2), (2, 2, 4))
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("attributes", _ATTRIBUTE_SETS,
                         ids=lambda a: f"{a['coordinate_transformation_mode']}-ratio{a['sampling_ratio']}")
def test_random_cases_agree_with_onnx_and_onnxruntime(attributes, dtype):
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    for seed in range(3):
        x, rois, batch_indices = _random_case(seed, dtype)
        y = curoi.onnx_roi_align(x, rois, batch_indices, **attributes)
        assert y.dtype == dtype
        np.testing.assert_allclose(
            y, _reference_evaluator(dtype, attributes, x, rois, batch_indices), **tolerance)
        np.testing.assert_allclose(
            y, _onnxruntime(dtype, attributes, x, rois, batch_indices), **tolerance)


def test_defaults_are_onnx_defaults():
    # A node with no attributes: 1x1 output, adaptive sampling, scale 1,
    # avg, half_pixel.
    x, rois, batch_indices = _random_case(7, np.float32)
    expected = _reference_evaluator(np.float32, {}, x, rois, batch_indices)
    np.testing.assert_allclose(curoi.onnx_roi_align(x, rois, batch_indices), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("mode", ["half_pixel", "output_half_pixel"])
def test_mode_max_agrees_with_onnxruntime(mode, sampling_ratio):
    attributes = dict(mode="max", coordinate_transformation_mode=mode,
                      sampling_ratio=sampling_ratio, output_height=3, output_width=2,
                      spatial_scale=0.5)
    x, rois, batch_indices = _random_case(11, np.float32)
    np.testing.assert_allclose(
        curoi.onnx_roi_align(x, rois, batch_indices, **attributes),
        _onnxruntime(np.float32, attributes, x, rois, batch_indices), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["half_pixel", "output_half_pixel"])
def test_mode_max_agrees_with_the_reference_evaluator_in_float64(mode):
    attributes = dict(mode="max", coordinate_transformation_mode=mode, sampling_ratio=0,
                      output_height=2, output_width=3, spatial_scale=0.75)
    x, rois, batch_indices = _random_case(12, np.float64)
    np.testing.assert_allclose(
        curoi.onnx_roi_align(x, rois, batch_indices, **attributes),
        _reference_evaluator(np.float64, attributes, x, rois, batch_indices),
        rtol=1e-12, atol=1e-12)


def test_mode_max_is_the_largest_weighted_corner_term_by_hand():
    # One bin, one sample at (x, y) = (0.75, 0.25) on a 2x2 map: weights
    # (1-0.25)(1-0.75), (1-0.25)0.75, 0.25(1-0.75), 0.25*0.75 on pixels
    # [0,0], [0,1], [1,0], [1,1]. The terms are 0.1875*1, 0.5625*2,
    # 0.0625*10, 0.1875*4: the largest is 1.125 (the interpolated value,
    # their sum, would be 2.6875).
    x = np.array([[[[1.0, 2.0], [10.0, 4.0]]]])
    rois = np.array([[0.25, -0.25, 1.25, 0.75]])   # centre (0.75, 0.25), 1x1
    y = curoi.onnx_roi_align(x, rois, np.array([0]), mode="max", sampling_ratio=1,
                             coordinate_transformation_mode="output_half_pixel")
    np.testing.assert_allclose(y.ravel(), [1.125], rtol=1e-15)


def test_mode_max_with_dense_sampling_agrees_with_the_reference_evaluator():
    # sampling_ratio 90 on a small map: more than 64 samples per bin side,
    # packed closer than a quarter pixel, which the kernel visits two per
    # pixel zone (each term is linear between pixel centres, so its largest
    # value over a zone's samples is at the first or last of them). Boxes
    # reach off the map, so some samples count as 0.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 2, 5, 6))
    rois = np.array([[-1.0, 0.5, 4.0, 3.5], [1.0, -2.0, 7.5, 6.0]])
    attributes = dict(mode="max", sampling_ratio=90, output_height=2, output_width=2)
    batch_indices = np.zeros(2, np.int64)
    np.testing.assert_allclose(
        curoi.onnx_roi_align(x, rois, batch_indices, **attributes),
        _reference_evaluator(np.float64, attributes, x, rois, batch_indices),
        rtol=1e-12, atol=1e-12)


def test_torch_in_torch_out():
    torch = pytest.importorskip("torch")
    x, rois, batch_indices = _random_case(3, np.float32)
    attributes = _ATTRIBUTE_SETS[0]
    y = curoi.onnx_roi_align(torch.from_numpy(x), torch.from_numpy(rois),
                             torch.from_numpy(batch_indices), **attributes)
    assert isinstance(y, torch.Tensor)
    np.testing.assert_allclose(
        y.numpy(), _reference_evaluator(np.float32, attributes, x, rois, batch_indices),
        rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(mode="min"), ValueError, ["mode", "'avg', 'max'", "'min'"]),
    (dict(coordinate_transformation_mode="align_corners"), ValueError,
     ["coordinate_transformation_mode", "'half_pixel'", "'align_corners'"]),
    (dict(sampling_ratio=-1), ValueError, ["sampling_ratio", ">= 0", "-1"]),
    (dict(sampling_ratio=1.5), TypeError, ["sampling_ratio", "1.5"]),
    (dict(output_height=0), ValueError, ["output_height", "positive", "0"]),
    (dict(output_width=2.0), TypeError, ["output_width", "int", "2.0"]),
    (dict(spatial_scale=0.0), ValueError, ["spatial_scale", "positive"]),
])
def test_bad_attributes_name_themselves(kwargs, error, words):
    x, rois, batch_indices = _random_case(0, np.float32)
    with pytest.raises(error) as info:
        curoi.onnx_roi_align(x, rois, batch_indices, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("change,error,words", [
    (lambda x, r, b: (x[0], r, b), ValueError, ["X", "4-D", "(3,"]),
    (lambda x, r, b: (x, r[:, :3], b), ValueError, ["rois", "[K, 4]", "(6, 3)"]),
    (lambda x, r, b: (x, r.astype(np.int64), b), TypeError, ["rois", "floating", "int64"]),
    (lambda x, r, b: (x, r, b.astype(np.float32)), TypeError, ["batch_indices", "integer", "float32"]),
    (lambda x, r, b: (x, r, b[:2]), ValueError, ["batch_indices", "K = 6", "(2,)"]),
    (lambda x, r, b: (x, r, b[:, None]), ValueError, ["batch_indices", "1-D", "(6, 1)"]),
    (lambda x, r, b: (x, r.tolist(), b), TypeError, ["rois", "list"]),
])
def test_bad_inputs_name_themselves(change, error, words):
    args = change(*_random_case(0, np.float32))
    with pytest.raises(error) as info:
        curoi.onnx_roi_align(*args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))

"""onnxruntime as an external reference for the forward ops.

ONNX ``RoiAlign`` (opset 16, mode "avg") and ``MaxRoiPool`` are a real peer
implementation, written independently of curoi, that export pipelines rely
on: a model exported to ONNX must pool the same numbers as curoi does.

    RoiAlign coordinate_transformation_mode  "half_pixel"  ==  aligned=True
                                      "output_half_pixel"  ==  aligned=False
    RoiAlign sampling_ratio=0 (adaptive)                   ==  sampling_ratio<=0
    MaxRoiPool              ==  roi_pool(convention="torchvision")

Known differences, found with the minimal cases in
``test_known_onnxruntime_differences`` below, and kept out of the random
comparisons for that reason:

* A box with x2 < x1 (or y2 < y1) under half_pixel with adaptive sampling has
  a negative sample grid, ceil(negative size / bins). onnxruntime (1.31)
  fails the whole run with "SafeIntOnOverflow: Integer overflow" instead of
  returning the zeros that the torchvision/detectron2 convention (and curoi)
  gives. Reversed boxes are compared in every other mode, where onnxruntime
  does accept them.
* A batch index outside [0, N) is an error in onnxruntime; curoi returns
  zeros for such a box. Only valid indices are compared.

Boxes inside, partly outside and wholly outside the map, degenerate (zero
width/height) boxes, tiny maps and quarter-pixel coordinates (so that samples
can land exactly on -1, 0, H-1 and H, the edges of the out-of-range rule)
all agree with onnxruntime.
"""

import functools

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

import curoi  # noqa: E402
import reference as ref  # noqa: E402

_MODES = {True: "half_pixel", False: "output_half_pixel"}
_ONNX_TYPES = {np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE}


def _session(node, inputs, output_type):
    graph = helper.make_graph(
        [node], "curoi_reference", inputs,
        [helper.make_tensor_value_info("Y", output_type, ["K", "C", "PH", "PW"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    # IR version 8 is the one that goes with opset 16; newer onnx packages
    # default to an IR version that older onnxruntime builds refuse.
    model.ir_version = 8
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the expected failures below log errors
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=None)
def _roi_align_session(ph, pw, scale, ratio, aligned, dtype=np.float32):
    node = helper.make_node(
        "RoiAlign", ["X", "rois", "batch_indices"], ["Y"],
        mode="avg", output_height=ph, output_width=pw,
        sampling_ratio=ratio, spatial_scale=scale,
        coordinate_transformation_mode=_MODES[aligned],
    )
    t = _ONNX_TYPES[dtype]
    return _session(node, [
        helper.make_tensor_value_info("X", t, ["N", "C", "H", "W"]),
        helper.make_tensor_value_info("rois", t, ["K", 4]),
        helper.make_tensor_value_info("batch_indices", TensorProto.INT64, ["K"]),
    ], t)


@functools.lru_cache(maxsize=None)
def _max_roi_pool_session(ph, pw, scale):
    node = helper.make_node("MaxRoiPool", ["X", "rois"], ["Y"],
                            pooled_shape=[ph, pw], spatial_scale=scale)
    return _session(node, [
        helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", "C", "H", "W"]),
        helper.make_tensor_value_info("rois", TensorProto.FLOAT, ["K", 5]),
    ], TensorProto.FLOAT)


def ort_roi_align(x, rois, output_size, scale, ratio, aligned):
    """onnxruntime RoiAlign on curoi's [K, 5] rois."""
    ph, pw = output_size
    session = _roi_align_session(ph, pw, float(scale), ratio, aligned,
                                 x.dtype.type)
    return session.run(None, {
        "X": x,
        "rois": np.ascontiguousarray(rois[:, 1:]),
        "batch_indices": rois[:, 0].astype(np.int64),
    })[0]


def ort_max_roi_pool(x, rois, output_size, scale):
    session = _max_roi_pool_session(*output_size, float(scale))
    return session.run(None, {"X": x, "rois": rois})[0]


# ----------------------------------------------------------------- box sets
def _rows(rng, n, corners):
    batch = rng.integers(0, n, (len(corners), 1))
    return np.concatenate([batch, corners], axis=1)


def _sorted(corners):
    return np.concatenate([np.minimum(corners[:, :2], corners[:, 2:]),
                           np.maximum(corners[:, :2], corners[:, 2:])], axis=1)


def random_rois(rng, n, h, w, scale, k=120, dtype=np.float32, reversed_ok=True):
    """Boxes in image coordinates (feature map times 1/scale): inside,
    partly outside and wholly outside the map, degenerate ones, and (when
    reversed_ok) some with x2 < x1 or y2 < y1."""
    img_h, img_w = h / scale, w / scale
    size = np.array([img_w, img_h] * 2)
    lo, hi = -0.6 * size, 1.6 * size
    spread = _sorted(rng.uniform(lo, hi, (k, 4)))
    inside = _sorted(rng.uniform(0, 1, (k // 2, 4)) * size)
    outside = inside + [2 * img_w, 0, 2 * img_w, 0]  # right of the map
    above = inside - [0, 2 * img_h, 0, 2 * img_h]    # above the map
    degenerate = inside.copy()
    degenerate[: k // 4, 2] = degenerate[: k // 4, 0]   # zero width
    degenerate[k // 4:, 3] = degenerate[k // 4:, 1]     # zero height
    parts = [spread, inside, outside, above, degenerate]
    if reversed_ok:
        parts.append(rng.uniform(lo, hi, (k // 2, 4)))  # unsorted corners
    return _rows(rng, n, np.concatenate(parts)).astype(dtype)


def lattice_rois(rng, n, h, w, k=150):
    """Coordinates on a quarter-pixel lattice (scale 1), so that samples and
    rounded corners hit the map's edges and .5 ties exactly."""
    corners = rng.integers(-12, 4 * max(h, w) + 12, (k, 4)) / 4.0
    return _rows(rng, n, _sorted(corners)).astype(np.float32)


def _check_not_vacuous(y, rois, n, h, w, scale):
    # The comparison must look at real numbers: a good share of outputs
    # nonzero, and the set must really contain boxes wholly off the map.
    assert np.count_nonzero(y) > 0.2 * y.size
    x1, y1, x2, y2 = (rois[:, i] * scale for i in range(1, 5))
    off = (np.minimum(x1, x2) > w + 1) | (np.maximum(y1, y2) < -2)
    assert off.any()


# ------------------------------------------------------------ RoiAlign
@pytest.mark.parametrize("aligned", [True, False], ids=["half_pixel", "output_half_pixel"])
@pytest.mark.parametrize("ratio", [0, 1, 2, 3])
@pytest.mark.parametrize("scale", [1.0, 0.25, 1 / 16])
def test_roi_align_matches_onnxruntime(scale, ratio, aligned):
    rng = np.random.default_rng([11, ratio, int(aligned), int(1 / scale)])
    n, c, h, w = 2, 3, 11, 14
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    # Reversed boxes only where onnxruntime accepts them (module docstring).
    rois = random_rois(rng, n, h, w, scale, reversed_ok=not (aligned and ratio == 0))
    for output_size in [(2, 3), (5, 4)]:
        expected = ort_roi_align(x, rois, output_size, scale, ratio, aligned)
        got = curoi.roi_align(x, rois, output_size, spatial_scale=scale,
                              sampling_ratio=ratio, aligned=aligned)
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        assert got.shape == expected.shape == (len(rois), c) + output_size
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        _check_not_vacuous(expected, rois, n, h, w, scale)


@pytest.mark.parametrize("aligned", [True, False], ids=["half_pixel", "output_half_pixel"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (5, 1), (6, 7)])
def test_roi_align_edges_match_onnxruntime(shape, aligned):
    # Tiny maps and lattice coordinates: the clamp at 0, the edge rule at the
    # last row/column and the [-1, H] cut-off are hit exactly, not just near.
    h, w = shape
    rng = np.random.default_rng([12, h, w, int(aligned)])
    x = rng.standard_normal((2, 2, h, w)).astype(np.float32)
    rois = lattice_rois(rng, 2, h, w)
    for ratio in (0, 1, 2, 3):
        for scale in (1.0, 0.5, 2.0):
            for output_size in [(1, 1), (2, 3), (4, 4)]:
                expected = ort_roi_align(x, rois, output_size, scale, ratio, aligned)
                got = curoi.roi_align(x, rois, output_size, scale, ratio, aligned)
                np.testing.assert_allclose(
                    got, expected, rtol=1e-5, atol=1e-6,
                    err_msg=f"ratio={ratio} scale={scale} output_size={output_size}")


@pytest.mark.parametrize("seed", range(4))
def test_roi_align_float32_is_within_a_few_ulps_of_the_per_sample_sum(seed):
    # onnxruntime sums each sample's four weighted corners in float32, as
    # torchvision does; curoi's CPU sums the same weights per row and column
    # (separable), in another order. The difference is rounding: a few
    # float32 ulps of the map's magnitude (measured: at most 1.3).
    rng = np.random.default_rng([15, seed])
    x = rng.standard_normal((2, 3, 11, 14)).astype(np.float32)
    ulp = np.finfo(np.float32).eps * float(np.abs(x).max())
    for ratio in (0, 2):
        for aligned in (True, False):
            rois = random_rois(rng, 2, 11, 14, 0.5,
                               reversed_ok=not (aligned and ratio == 0))
            expected = ort_roi_align(x, rois, (3, 4), 0.5, ratio, aligned)
            got = curoi.roi_align(x, rois, (3, 4), 0.5, ratio, aligned)
            np.testing.assert_allclose(got, expected, rtol=0, atol=4 * ulp)


@pytest.mark.parametrize("aligned", [True, False], ids=["half_pixel", "output_half_pixel"])
def test_roi_align_float64_matches_onnxruntime(aligned):
    # onnxruntime computes double RoiAlign in double; curoi keeps float64
    # boxes and arithmetic for float64 features, so they agree to rounding.
    rng = np.random.default_rng([13, int(aligned)])
    n, c, h, w = 2, 2, 9, 12
    x = rng.standard_normal((n, c, h, w))
    for ratio in (0, 2):
        rois = random_rois(rng, n, h, w, 0.5, dtype=np.float64,
                           reversed_ok=not (aligned and ratio == 0))
        expected = ort_roi_align(x, rois, (3, 3), 0.5, ratio, aligned)
        got = curoi.roi_align(x, rois, (3, 3), 0.5, ratio, aligned)
        assert got.dtype == np.float64
        # Separable sums, in another order: about 1e-15 relative.
        np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-14)


def test_roi_align_list_boxes_match_onnxruntime():
    # The per-image list form of boxes must mean the same batch indices as
    # onnxruntime's batch_indices input.
    rng = np.random.default_rng(14)
    x = rng.standard_normal((3, 2, 10, 10)).astype(np.float32)
    per_image = [_sorted(rng.uniform(-2, 12, (m, 4))).astype(np.float32)
                 for m in (4, 0, 5)]
    rois = np.concatenate([
        np.concatenate([np.full((len(b), 1), i, np.float32), b], axis=1)
        for i, b in enumerate(per_image)
    ])
    expected = ort_roi_align(x, rois, (2, 2), 1.0, 2, True)
    got = curoi.roi_align(x, per_image, (2, 2), 1.0, 2, True)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------- MaxRoiPool
@pytest.mark.parametrize("scale", [1.0, 0.5, 1 / 16])
def test_roi_pool_matches_onnxruntime_max_roi_pool(scale):
    rng = np.random.default_rng([21, int(1 / scale)])
    n, c, h, w = 2, 3, 11, 14
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    rois = random_rois(rng, n, h, w, scale)
    for output_size in [(1, 1), (2, 3), (4, 5)]:
        expected = ort_max_roi_pool(x, rois, output_size, scale)
        got, argmax = curoi.roi_pool(x, rois, output_size, scale,
                                     convention="torchvision", return_argmax=True)
        assert got.shape == expected.shape == (len(rois), c) + output_size
        # A maximum is one of the inputs, not a computed value: exact.
        np.testing.assert_array_equal(got, expected)
        # onnxruntime has no argmax output; check curoi's against the values
        # it points at instead, and -1 exactly where the bin is empty.
        assert argmax.dtype == np.int64
        found = argmax >= 0
        b = rois[:, 0].astype(np.int64)[:, None, None, None]
        ch = np.arange(c)[None, :, None, None]
        picked = x.reshape(n, c, h * w)[np.broadcast_to(b, argmax.shape),
                                        np.broadcast_to(ch, argmax.shape),
                                        np.where(found, argmax, 0)]
        np.testing.assert_array_equal(picked[found], expected[found])
        np.testing.assert_array_equal(expected[~found], 0)
        _check_not_vacuous(expected, rois, n, h, w, scale)


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (5, 1), (6, 7)])
def test_roi_pool_rounding_matches_onnxruntime(shape):
    # Quarter-pixel corners: round() ties at .5 (away from zero, also for
    # negative coordinates), and bins clipped at both edges of tiny maps.
    h, w = shape
    rng = np.random.default_rng([22, h, w])
    x = rng.standard_normal((2, 2, h, w)).astype(np.float32)
    rois = lattice_rois(rng, 2, h, w)
    for scale in (1.0, 0.5, 2.0):
        for output_size in [(1, 1), (2, 3), (4, 4)]:
            expected = ort_max_roi_pool(x, rois, output_size, scale)
            got = curoi.roi_pool(x, rois, output_size, scale)
            np.testing.assert_array_equal(
                got, expected, err_msg=f"scale={scale} output_size={output_size}")


def test_design_worked_example_matches_onnxruntime():
    # DESIGN.md section 3: the 8x8 map, box (0, 3, 6, 7), 2x2 output, whose
    # torchvision/ONNX bins overlap by one pixel. onnxruntime confirms the
    # numbers the design quotes, and curoi gives them.
    x = ref.WORKED_EXAMPLE_MAP.astype(np.float32)[None, None]
    rois = np.array([[0, 0, 3, 6, 7]], dtype=np.float32)
    expected = ort_max_roi_pool(x, rois, (2, 2), 1.0)
    np.testing.assert_array_equal(
        expected[0, 0], np.array([[0.85, 0.96], [0.97, 0.96]], np.float32))
    np.testing.assert_array_equal(curoi.roi_pool(x, rois, (2, 2)), expected)


# ------------------------------------------------- the known differences
def test_known_onnxruntime_differences():
    """The minimal cases behind the restrictions in the module docstring.

    If onnxruntime changes its behaviour here, this test says so, and the
    restrictions above can be lifted."""
    x = np.arange(2 * 1 * 5 * 6, dtype=np.float32).reshape(2, 1, 5, 6)
    reversed_box = np.array([[0, 4, 1, 2, 3]], dtype=np.float32)  # x2 < x1

    # half_pixel + adaptive: the grid is ceil(-2 / 2) = -1 samples per bin.
    # onnxruntime refuses the run; curoi, like torchvision, has no samples
    # and returns zeros.
    with pytest.raises(Exception, match="(?i)overflow"):
        ort_roi_align(x, reversed_box, (1, 2), 1.0, 0, True)
    np.testing.assert_array_equal(
        curoi.roi_align(x, reversed_box, (1, 2), 1.0, 0, True), 0)

    # The same box with a fixed grid (samples walk backwards from x1) and in
    # output_half_pixel mode (size clamped to 1) is accepted and agrees.
    for ratio, aligned in [(2, True), (0, False), (2, False)]:
        expected = ort_roi_align(x, reversed_box, (1, 2), 1.0, ratio, aligned)
        np.testing.assert_allclose(
            curoi.roi_align(x, reversed_box, (1, 2), 1.0, ratio, aligned),
            expected, rtol=1e-6)
        assert np.count_nonzero(expected) == expected.size

    # A batch index outside [0, N): an error in onnxruntime, zeros in curoi
    # (and argmax -1), by curoi's documented contract.
    bad_batch = np.array([[2, 0, 0, 3, 3]], dtype=np.float32)
    with pytest.raises(Exception, match="out of range"):
        ort_roi_align(x, bad_batch, (2, 2), 1.0, 0, True)
    with pytest.raises(Exception):
        ort_max_roi_pool(x, bad_batch, (2, 2), 1.0)
    np.testing.assert_array_equal(curoi.roi_align(x, bad_batch, (2, 2)), 0)
    y, argmax = curoi.roi_pool(x, bad_batch, (2, 2), return_argmax=True)
    np.testing.assert_array_equal(y, 0)
    np.testing.assert_array_equal(argmax, -1)

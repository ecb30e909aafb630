"""torch.onnx.export of models that use curoi.torch, with both exporters.

The user passes no translation table: importing curoi.torch is enough. The
exported graph must hold ONNX RoiAlign / MaxRoiPool with the attributes that
say what the curoi call meant, and onnxruntime (an independent
implementation) running it must give the eager model's numbers.
"""

import io
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from curoi.torch import roi_align, roi_pool  # noqa: E402

_OUTPUT_SIZE = (2, 3)
_SCALE = 0.5


class _Head(torch.nn.Module):
    """conv -> RoI op -> flatten -> linear: the shape of a detector's box head."""

    def __init__(self, pool, sampling_ratio=2, aligned=True, convention="torchvision"):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * _OUTPUT_SIZE[0] * _OUTPUT_SIZE[1], 5)
        self.pool, self.sampling_ratio = pool, sampling_ratio
        self.aligned, self.convention = aligned, convention

    def forward(self, x, boxes):
        features = self.conv(x)
        if self.pool:
            r = roi_pool(features, boxes, _OUTPUT_SIZE, _SCALE, convention=self.convention)
        else:
            r = roi_align(features, boxes, _OUTPUT_SIZE, _SCALE, self.sampling_ratio,
                          self.aligned)
        return self.fc(r.flatten(1))


def _inputs(k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 10, 12, generator=g)
    # Boxes in image coordinates (twice the map): inside, across the edge,
    # fractional corners, so that the coordinate mode and the rounding matter.
    corners = torch.rand(k, 4, generator=g) * torch.tensor([22.0, 18.0, 22.0, 18.0])
    x1y1 = torch.minimum(corners[:, :2], corners[:, 2:])
    x2y2 = torch.maximum(corners[:, :2], corners[:, 2:]) + 1.5
    ids = (torch.arange(k) % 2).to(torch.float32)[:, None]
    return x, torch.cat([ids, x1y1, x2y2], dim=1)


def _export(model, args, dynamo, dynamic_k=False):
    model.eval()
    if dynamo:
        dynamic_shapes = None
        if dynamic_k:
            dynamic_shapes = {"x": None, "boxes": {0: torch.export.Dim("K")}}
        program = torch.onnx.export(model, args, dynamo=True, verbose=False,
                                    dynamic_shapes=dynamic_shapes)
        return program.model_proto
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The tracer warns that shape checks become constants; they hold
        # for every input the exported graph accepts.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, buffer, dynamo=False, opset_version=16,
                          input_names=["x", "boxes"], output_names=["y"],
                          dynamic_axes={"boxes": {0: "K"}, "y": {0: "K"}} if dynamic_k else None)
    return onnx.load_from_string(buffer.getvalue())


def _node(model, op_type):
    nodes = [n for n in model.graph.node if n.op_type == op_type]
    assert len(nodes) == 1, [n.op_type for n in model.graph.node]
    return nodes[0], {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}


def _run(model, x, boxes):
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, (x.numpy(), boxes.numpy()))))[0]


def _eager(model, x, boxes):
    with torch.no_grad():
        return model(x, boxes).numpy()


def _check_numbers(exported, model):
    # Exported with 3 boxes and a symbolic box count: any K must run.
    for k in (3, 1, 7):
        x, boxes = _inputs(k=k, seed=k)
        np.testing.assert_allclose(_run(exported, x, boxes), _eager(model, x, boxes),
                                   rtol=1e-5, atol=1e-5)


# The dynamo exporter takes seconds per model: two cases cover both
# coordinate modes and both kinds of sampling there; TorchScript takes all.
@pytest.mark.parametrize("dynamo,aligned,sampling_ratio", [
    (False, True, 2), (False, False, 0), (False, True, -1), (False, False, 2),
    (True, True, 2), (True, False, 0),
], ids=["torchscript-half_pixel-2", "torchscript-output_half_pixel-adaptive",
        "torchscript-half_pixel-adaptive", "torchscript-output_half_pixel-2",
        "dynamo-half_pixel-2", "dynamo-output_half_pixel-adaptive"])
def test_roi_align_exports_to_RoiAlign(dynamo, aligned, sampling_ratio):
    model = _Head(pool=False, sampling_ratio=sampling_ratio, aligned=aligned)
    exported = _export(model, _inputs(), dynamo, dynamic_k=True)

    node, attrs = _node(exported, "RoiAlign")
    assert attrs == {
        "mode": b"avg",
        "output_height": 2,
        "output_width": 3,
        "sampling_ratio": max(sampling_ratio, 0),
        "spatial_scale": pytest.approx(_SCALE),
        "coordinate_transformation_mode": b"half_pixel" if aligned else b"output_half_pixel",
    }
    assert len(node.input) == 3  # X, rois [K, 4], batch_indices [K]
    opset = {o.domain: o.version for o in exported.opset_import}[""]
    assert opset >= 16
    _check_numbers(exported, model)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_roi_pool_exports_to_MaxRoiPool(dynamo):
    model = _Head(pool=True)
    exported = _export(model, _inputs(), dynamo, dynamic_k=True)

    node, attrs = _node(exported, "MaxRoiPool")
    assert attrs == {"pooled_shape": [2, 3], "spatial_scale": pytest.approx(_SCALE)}
    assert len(node.input) == 2  # X, rois [K, 5]
    _check_numbers(exported, model)


def _causes(error):
    while error is not None:
        yield str(error)
        error = error.__cause__ or error.__context__


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_mmcv_roi_pool_refuses_to_export(dynamo):
    model = _Head(pool=True, convention="mmcv")
    x, boxes = _inputs()
    _eager(model, x, boxes)  # the model itself is fine
    with pytest.raises(Exception) as info:
        _export(model, (x, boxes), dynamo)
    messages = "\n".join(_causes(info.value))
    assert "convention='mmcv'" in messages and "MaxRoiPool" in messages, messages


def test_roi_align_below_opset_16_says_which_opset_it_needs():
    model = _Head(pool=False).eval()
    with warnings.catch_warnings(), pytest.raises(Exception) as info:
        warnings.simplefilter("ignore")
        torch.onnx.export(model, _inputs(), io.BytesIO(), dynamo=False, opset_version=13)
    messages = "\n".join(_causes(info.value))
    assert "opset_version >= 16" in messages and "13" in messages, messages



def test_strict_capture_says_it_cannot_export(monkeypatch):
    # When torch.export's non-strict capture fails, the exporter falls back
    # to dynamo's strict capture, which cannot emit the ONNX node. Leaving
    # the exporter only that strategy shows it fails with a message that
    # says so, not later at the translation with a generic one.
    from torch.onnx._internal.exporter import _capture_strategies

    monkeypatch.setattr(_capture_strategies, "CAPTURE_STRATEGIES",
                        (_capture_strategies.TorchExportStrictStrategy,))
    model = _Head(pool=False)
    with pytest.raises(Exception) as info:
        _export(model, _inputs(), dynamo=True)
    messages = "\n".join(_causes(info.value))
    assert "non-strict capture only" in messages, messages


def test_torch_compile_outside_export_runs_the_curoi_op():
    # The export check must not leak into compiled code: the compiled model
    # computes (no ONNX placeholder) and matches the eager one.
    model = _Head(pool=False).eval()
    x, boxes = _inputs()
    with torch.no_grad():
        compiled = torch.compile(model, backend="eager", fullgraph=True)(x, boxes)
    np.testing.assert_allclose(compiled.numpy(), _eager(model, x, boxes), rtol=0, atol=0)

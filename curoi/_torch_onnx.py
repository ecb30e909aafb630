"""ONNX export of the ``curoi.torch`` operators, for both of torch's
exporters, registered when ``curoi.torch`` is imported so that a plain
``torch.onnx.export(model, args)`` needs no translation table.

    curoi::roi_align  ->  RoiAlign (opset 16): X, rois [K, 4], batch_indices
                          int64 [K]; aligned=True is "half_pixel", False is
                          "output_half_pixel"; sampling_ratio <= 0 is 0
                          (adaptive); mode "avg"
    curoi::roi_pool   ->  MaxRoiPool: X, rois [K, 5]; convention
                          "torchvision" only (ONNX has no other)

``dynamo=True``: torch has no public registry that a library can add a
custom op's translation to (the exporter builds its registry per export from
onnxscript's table, and importing onnxscript at ``curoi.torch`` import time
would cost seconds). What the exporter does consult globally is torch's
decomposition table, when it lowers the captured program
(``ExportedProgram.run_decompositions``). So each curoi op gets a
decomposition that, only while ``torch.onnx.is_in_onnx_export()``, becomes
``torch.onnx.ops.symbolic``, the node the exporter writes out as given; at
any other time it declines (``NotImplemented``) and the op stays whole. This
holds whichever way the exporter captured the model (strict or not), and for
an ``ExportedProgram`` given to ``torch.onnx.export``.

TorchScript (``dynamo=False``): the exporter traces the curoi op itself and
translates it with the symbolic functions registered here through
``torch.onnx.register_custom_op_symbolic``.
"""

import torch

_ROI_ALIGN_OPSET = 16
_COORDINATE_MODES = {True: "half_pixel", False: "output_half_pixel"}
_ONNX_INT64 = 7  # TensorProto.INT64


def check_roi_pool_convention(convention):
    if convention != "torchvision":
        raise ValueError(
            f"roi_pool(convention={convention!r}) cannot be exported to ONNX: "
            "ONNX MaxRoiPool has only the torchvision/Caffe convention (corners "
            "rounded to whole pixels); export a model that uses "
            "convention='torchvision'")


# ------------------------------------------------------------ dynamo=True
def _split_rois(rois, dtype):
    # ONNX RoiAlign wants the corners in X's type and the image index apart.
    return rois[:, 1:5].to(dtype), rois[:, 0].to(torch.int64)


def _roi_align_decomposition(input, rois, spatial_scale, pooled_height,
                             pooled_width, sampling_ratio, aligned):
    if not torch.onnx.is_in_onnx_export():
        return NotImplemented
    corners, batch_indices = _split_rois(rois, input.dtype)
    return torch.onnx.ops.symbolic(
        "RoiAlign", (input, corners, batch_indices),
        {"mode": "avg",
         "output_height": pooled_height,
         "output_width": pooled_width,
         "sampling_ratio": max(sampling_ratio, 0),
         "spatial_scale": float(spatial_scale),
         "coordinate_transformation_mode": _COORDINATE_MODES[bool(aligned)]},
        dtype=input.dtype,
        shape=(rois.shape[0], input.shape[1], pooled_height, pooled_width))


def _roi_pool_decomposition(input, rois, spatial_scale, pooled_height,
                            pooled_width, convention):
    if not torch.onnx.is_in_onnx_export():
        return NotImplemented
    check_roi_pool_convention(convention)
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    output = torch.onnx.ops.symbolic(
        "MaxRoiPool", (input, rois.to(input.dtype)),
        {"pooled_shape": [pooled_height, pooled_width],
         "spatial_scale": float(spatial_scale)},
        dtype=input.dtype, shape=shape)
    # ONNX MaxRoiPool does not compute the argmax. curoi.torch.roi_pool never
    # hands it to the model, so the exporter drops this unused stand-in.
    argmax = torch.full(shape, -1, dtype=torch.int64, device=input.device)
    return output, argmax


# --------------------------------------------------- TorchScript exporter
def _constant(g, values):
    return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))


def _onnx_type(value):
    return torch.onnx.JitScalarType.from_value(value).onnx_type()


def _torchscript_roi_align(g, input, rois, spatial_scale, pooled_height,
                           pooled_width, sampling_ratio, aligned):
    if g.opset < _ROI_ALIGN_OPSET:
        raise torch.onnx.errors.OnnxExporterError(
            f"curoi::roi_align exports to ONNX RoiAlign of opset "
            f"{_ROI_ALIGN_OPSET} (coordinate_transformation_mode), but "
            f"opset_version is {g.opset}; export with opset_version >= "
            f"{_ROI_ALIGN_OPSET}")
    batch_indices = g.op("Cast", g.op("Reshape", g.op("Gather", rois, _constant(g, [0]), axis_i=1),
                                      _constant(g, [-1])),
                         to_i=_ONNX_INT64)
    corners = g.op("Cast", g.op("Gather", rois, _constant(g, [1, 2, 3, 4]), axis_i=1),
                   to_i=_onnx_type(input))
    return g.op("RoiAlign", input, corners, batch_indices,
                mode_s="avg",
                output_height_i=pooled_height,
                output_width_i=pooled_width,
                sampling_ratio_i=max(sampling_ratio, 0),
                spatial_scale_f=spatial_scale,
                coordinate_transformation_mode_s=_COORDINATE_MODES[bool(aligned)])


def _torchscript_roi_pool(g, input, rois, spatial_scale, pooled_height,
                          pooled_width, convention):
    check_roi_pool_convention(convention)
    output = g.op("MaxRoiPool", input, g.op("Cast", rois, to_i=_onnx_type(input)),
                  pooled_shape_i=[pooled_height, pooled_width],
                  spatial_scale_f=spatial_scale)
    # The curoi op also returns the argmax, which ONNX MaxRoiPool does not
    # compute; curoi.torch.roi_pool never returns it to the model.
    return output, None


def register_onnx_translations():
    from torch.onnx.symbolic_helper import parse_args

    register = torch._decomp.register_decomposition
    register(torch.ops.curoi.roi_align.default)(_roi_align_decomposition)
    register(torch.ops.curoi.roi_pool.default)(_roi_pool_decomposition)

    # Opset 7 is the oldest the TorchScript exporter writes; roi_align
    # explains itself below opset 16 instead of a generic "unsupported".
    torch.onnx.register_custom_op_symbolic(
        "curoi::roi_align",
        parse_args("v", "v", "f", "i", "i", "i", "b")(_torchscript_roi_align), 7)
    torch.onnx.register_custom_op_symbolic(
        "curoi::roi_pool",
        parse_args("v", "v", "f", "i", "i", "s")(_torchscript_roi_pool), 7)

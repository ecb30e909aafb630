"""ONNX export of the ``curoi.torch`` operators, for both of torch's
exporters, registered when ``curoi.torch`` is imported so that a plain
``torch.onnx.export(model, args)`` needs no translation table.

    curoi::roi_align  ->  RoiAlign (opset 16): X, rois [K, 4], batch_indices
                          int64 [K]; aligned=True is "half_pixel", False is
                          "output_half_pixel"; sampling_ratio <= 0 is 0
                          (adaptive); mode "avg"
    curoi::roi_pool   ->  MaxRoiPool: X, rois [K, 5]; convention
                          "torchvision" only (ONNX has no other)

``dynamo=True``: torch has no public registry to which a library can add a
custom op's translation (the exporter builds its registry per export from
onnxscript's table, and importing onnxscript when ``curoi.torch`` is
imported would cost seconds), and a translation in torch's global
decomposition table would also be consulted by fake tensors under dynamic
shapes, outside any export. The documented route is
``torch.onnx.ops.symbolic``: while the exporter captures the model, the
``curoi.torch`` functions put the ONNX node itself into the graph in place
of the curoi op. A program captured before, with ``torch.export.export``,
keeps the curoi op, which the exporter cannot translate; so does dynamo's
strict capture, the exporter's fallback, which cannot trace that function.

TorchScript (``dynamo=False``): the exporter traces the curoi op itself and
translates it with the symbolic functions registered here through
``torch.onnx.register_custom_op_symbolic``.
"""

import torch

try:
    from torch.onnx._internal.exporter import _flags as _exporter_flags
except ImportError:  # another torch layout: strict capture keeps the curoi op,
    # which then fails to translate
    _exporter_flags = None

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


def refuse_roi_align_max(*args):
    raise ValueError(
        "roi_align(mode='max') cannot be exported to ONNX: its maximum of "
        "interpolated samples (mmcv's) is not ONNX RoiAlign's mode 'max', "
        "which takes the largest weighted corner term of each sample "
        "(curoi.onnx_roi_align computes that one)")


# ------------------------------------------------------------ dynamo=True
def dynamo_exporting():
    """Whether ``torch.onnx.export(dynamo=True)`` is capturing the model."""
    if torch.jit.is_tracing():
        # The TorchScript exporter sets the same flag but needs the curoi op
        # in its graph, for the symbolic functions below.
        return False
    if torch.compiler.is_dynamo_compiling():
        # The exporter falls back to a strict (dynamo) capture when the
        # non-strict one failed. Dynamo takes is_in_onnx_export() for False
        # and cannot trace torch.onnx.ops.symbolic: the curoi op would reach
        # the ONNX translation and fail there with a message that hides the
        # first failure. The exporter's own flag, read as a global, tells
        # the truth; failing here makes the exporter report the first error.
        if getattr(_exporter_flags, "_is_onnx_exporting", False):
            raise torch.onnx.errors.OnnxExporterError(
                "curoi.torch ops export to ONNX through torch.export's "
                "non-strict capture only (torch.onnx.export's first try); "
                "dynamo's strict capture cannot emit their ONNX nodes")
        return False
    return torch.onnx.is_in_onnx_export()


def _split_rois(rois, dtype):
    # ONNX RoiAlign wants the corners in X's type and the image index apart.
    return rois[:, 1:5].to(dtype), rois[:, 0].to(torch.int64)


def roi_align_symbolic(input, rois, spatial_scale, pooled_height, pooled_width,
                       sampling_ratio, aligned):
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


def roi_pool_symbolic(input, rois, spatial_scale, pooled_height, pooled_width,
                      convention):
    check_roi_pool_convention(convention)
    return torch.onnx.ops.symbolic(
        "MaxRoiPool", (input, rois.to(input.dtype)),
        {"pooled_shape": [pooled_height, pooled_width],
         "spatial_scale": float(spatial_scale)},
        dtype=input.dtype,
        shape=(rois.shape[0], input.shape[1], pooled_height, pooled_width))


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


def register_torchscript_symbolics():
    from torch.onnx.symbolic_helper import parse_args

    # Opset 7 is the oldest the TorchScript exporter writes; roi_align
    # explains itself below opset 16 instead of a generic "unsupported".
    torch.onnx.register_custom_op_symbolic(
        "curoi::roi_align",
        parse_args("v", "v", "f", "i", "i", "i", "b")(_torchscript_roi_align), 7)
    torch.onnx.register_custom_op_symbolic(
        "curoi::roi_align_max", refuse_roi_align_max, 7)
    torch.onnx.register_custom_op_symbolic(
        "curoi::roi_pool",
        parse_args("v", "v", "f", "i", "i", "s")(_torchscript_roi_pool), 7)

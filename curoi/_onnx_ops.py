"""ONNX operators with ONNX's own signatures, so that a node of an ONNX graph
maps one to one onto a curoi call: same inputs, same attribute names and
defaults, same meaning."""

import numpy as np

from . import _gpu, _launch, _ops, _validate
from ._interop import Caller
from ._roi_align import roi_align

_MODES = ("avg", "max")
_COORDINATE_MODES = {"half_pixel": True, "output_half_pixel": False}



def _positive_int(value, name):
    if not _validate._is_int(value):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if not 0 < value <= _validate._INT32_MAX:
        raise ValueError(f"{name} must be positive and at most 2**31 - 1, got {value!r}")
    return int(value)


def _boxes(caller, rois, batch_indices):
    """ONNX's rois [K, 4] and batch_indices [K] as curoi's [K, 5] boxes, on
    the features' device."""
    rois_view = caller.view(rois, "rois")
    rois_dtype = _validate.storage_dtype(rois, rois_view)
    if rois_view.ndim != 2 or rois_view.shape[1] != 4:
        raise ValueError(
            f"rois must be a [K, 4] array of (x1, y1, x2, y2), got shape "
            f"{tuple(rois_view.shape)}")
    _validate.float_array(rois_view, "rois", rois_dtype, 2, "[K, 4]")
    index_view = caller.view(batch_indices, "batch_indices")
    if np.dtype(index_view.dtype).kind not in "iu":
        raise TypeError(
            f"batch_indices must have an integer dtype (ONNX: int64), got "
            f"{_validate.storage_dtype(batch_indices, index_view)}")
    k = rois_view.shape[0]
    if index_view.shape != (k,):
        raise ValueError(
            f"batch_indices must be a 1-D array of K = {k} image indices (one "
            f"per row of rois), got shape {tuple(index_view.shape)}")
    xp = _gpu.require_cupy() if caller.device.is_cuda else np
    # float64 keeps float64 corners exact; otherwise float32, in which the
    # kernels use boxes anyway. Image indices below 2**24 stay exact.
    dtype = np.float64 if rois_view.dtype == np.float64 else np.float32
    boxes = xp.empty((k, 5), dtype=dtype)
    boxes[:, 0] = index_view
    boxes[:, 1:] = rois_view
    return boxes


def onnx_roi_align(X, rois, batch_indices, *, output_height=1, output_width=1,
                   sampling_ratio=0, spatial_scale=1.0, mode="avg",
                   coordinate_transformation_mode="half_pixel"):
    """ONNX ``RoiAlign`` (opset 16), with the operator's inputs, attribute
    names and defaults: a node ``RoiAlign(X, rois, batch_indices)`` with
    attributes ``attrs`` computes ``onnx_roi_align(X, rois, batch_indices,
    **attrs)``.

    Args:
        X: features ``[N, C, H, W]``, float16, bfloat16, float32 or float64;
            any array curoi takes (NumPy, CuPy, PyTorch, JAX, DLPack).
        rois: ``[K, 4]`` boxes ``(x1, y1, x2, y2)`` in input-image
            coordinates, floating point, on ``X``'s device.
        batch_indices: ``[K]`` integers, the image of ``X`` each box is on.
            A box whose index is not in ``[0, N)`` gives zeros (ONNX leaves
            that undefined; onnxruntime rejects it).
        output_height, output_width: bins per box.
        sampling_ratio: samples per bin side; ``0`` is adaptive,
            ``ceil(box size / output size)``.
        spatial_scale: factor from box to feature coordinates.
        mode: ``"avg"`` (the mean of the bin's bilinear samples) or
            ``"max"``: ONNX's definition as its reference and onnxruntime
            compute it, the largest over the bin's samples of the four
            weighted bilinear corner terms ``w * x`` (not of the
            interpolated values; a sample off the map counts as 0).
        coordinate_transformation_mode: ``"half_pixel"`` (boxes shifted by
            half a pixel: ``curoi.roi_align(aligned=True)``) or
            ``"output_half_pixel"`` (no shift, boxes at least a pixel wide:
            ``aligned=False``).

    Returns:
        ``[K, C, output_height, output_width]`` of ``X``'s dtype, the
        caller's kind of array on ``X``'s device.
    """
    output_size = (_positive_int(output_height, "output_height"),
                   _positive_int(output_width, "output_width"))
    sampling_ratio = _validate.sampling_ratio(sampling_ratio)
    if sampling_ratio < 0:
        raise ValueError(
            f"sampling_ratio must be >= 0 (0: adaptive), as in ONNX RoiAlign, "
            f"got {sampling_ratio}")
    spatial_scale = _validate.spatial_scale(spatial_scale)
    mode = _validate.choice(mode, "mode", _MODES)
    aligned = _COORDINATE_MODES[_validate.choice(
        coordinate_transformation_mode, "coordinate_transformation_mode",
        tuple(_COORDINATE_MODES))]
    caller = Caller(X, "X")
    shape = getattr(X, "shape", None)
    if shape is not None and len(shape) != 4:
        raise ValueError(f"X must be a 4-D array [N, C, H, W], got shape {tuple(shape)}")
    with caller.on_device():
        boxes = _boxes(caller, rois, batch_indices)
        if mode == "max":
            return _max_corner_terms(caller, X, boxes, output_size, spatial_scale,
                                     sampling_ratio, aligned)
    return roi_align(X, boxes, output_size, spatial_scale=spatial_scale,
                     sampling_ratio=sampling_ratio, aligned=aligned)


def _max_corner_terms(caller, X, boxes, output_size, spatial_scale,
                      sampling_ratio, aligned):
    """RoiAlign mode "max" on [K, 5] boxes already on X's device."""
    x, storage = _launch.features(caller, X, "X", "[N, C, H, W]")
    acc = _launch.accumulation_dtype(storage)
    _validate.scale_for(spatial_scale, acc)
    n, c = x.shape[:2]
    xp = _gpu.require_cupy() if caller.device.is_cuda else np
    rois = xp.ascontiguousarray(boxes, dtype=acc)
    dtype = _launch.kernel_dtype(caller, storage)
    cast = _launch.cast_back(caller, storage, dtype)
    out, native = caller.new((rois.shape[0], c) + output_size, dtype,
                             native=cast is None, zeroed=False,
                             what="the output [K, C, output_height, output_width]")
    _ops.roi_align_max_forward(_launch.as_kernel_input(x, dtype), rois, out, None,
                               spatial_scale, sampling_ratio, aligned, "onnx",
                               channels_last=False)
    return caller.result(out, native, cast)

"""Boxes in, rois out: the kernels take one contiguous [K, 5] array of
(batch index, x1, y1, x2, y2) in the accumulation type (float32, or float64
for float64 features), whatever precision the features have."""

import numpy as np

from . import _gpu
from ._interop import FLOAT_DTYPES
from ._validate import storage_dtype

_LAYOUT = ("boxes must be a [K, 5] array of (batch index, x1, y1, x2, y2) "
           "or a list of [L, 4] arrays of (x1, y1, x2, y2), one per image")


def _checked_view(caller, box_array, name, columns):
    view = caller.view(box_array, name)
    dtype = storage_dtype(box_array, view)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating-point dtype, got {dtype}")
    if view.ndim != 2 or view.shape[1] != columns:
        raise ValueError(f"{_LAYOUT}; {name} has shape {tuple(view.shape)}")
    return view


def to_rois(boxes, caller, batch, acc_dtype):
    xp = _gpu.require_cupy() if caller.device.is_cuda else np
    if isinstance(boxes, (list, tuple)):
        if len(boxes) > batch:
            raise ValueError(
                f"boxes is a list of {len(boxes)} per-image arrays but input "
                f"holds {batch} images"
            )
        parts = []
        for i, per_image in enumerate(boxes):
            view = _checked_view(caller, per_image, f"boxes[{i}]", 4)
            part = xp.empty((view.shape[0], 5), dtype=acc_dtype)
            part[:, 0] = i
            part[:, 1:] = view
            parts.append(part)
        if not parts:
            return xp.zeros((0, 5), dtype=acc_dtype)
        return xp.ascontiguousarray(xp.concatenate(parts))
    view = _checked_view(caller, boxes, "boxes", 5)
    return xp.ascontiguousarray(view, dtype=acc_dtype)

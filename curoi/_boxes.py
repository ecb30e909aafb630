"""Boxes in, rois out: the kernels take one contiguous [K, 5] array of
(batch index, x1, y1, x2, y2) in the accumulation type (float32, or float64
for float64 features), whatever precision the features have."""

import numpy as np

from . import _gpu
from ._interop import FLOAT_DTYPES
from ._validate import storage_dtype

BOX = "(batch index, x1, y1, x2, y2)"


def layout_message(columns=5, row=BOX):
    """What boxes must be, for messages: [K, columns] rows of ``row`` or a
    list of per-image arrays without the batch index."""
    per_image = "(" + row[len("(batch index, "):]
    return (f"boxes must be a [K, {columns}] array of {row} or a list of "
            f"[L, {columns - 1}] arrays of {per_image}, one per image")


_LAYOUT = layout_message()


def _checked_view(caller, box_array, name, columns, row=BOX, layout=None):
    """``layout``: the message's description of the boxes, for an operator
    whose boxes are not the usual array-or-list (crop_and_resize)."""
    view = caller.view(box_array, name)
    dtype = storage_dtype(box_array, view)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating-point dtype, got {dtype}")
    if view.ndim != 2 or view.shape[1] != columns:
        if layout is None:
            layout = layout_message(columns + (name != 'boxes'), row)
        raise ValueError(f"{layout}; {name} has shape {tuple(view.shape)}")
    return view


def to_rois(boxes, caller, batch, acc_dtype, columns=5, row=BOX):
    """``[K, columns]`` rois (the batch index first) in ``acc_dtype``."""
    xp = _gpu.require_cupy() if caller.device.is_cuda else np
    if isinstance(boxes, (list, tuple)):
        if len(boxes) > batch:
            raise ValueError(
                f"boxes is a list of {len(boxes)} per-image arrays but input "
                f"holds {batch} images"
            )
        parts = []
        for i, per_image in enumerate(boxes):
            view = _checked_view(caller, per_image, f"boxes[{i}]", columns - 1, row)
            part = xp.empty((view.shape[0], columns), dtype=acc_dtype)
            part[:, 0] = i
            part[:, 1:] = view
            parts.append(part)
        if not parts:
            return xp.zeros((0, columns), dtype=acc_dtype)
        return xp.ascontiguousarray(xp.concatenate(parts))
    view = _checked_view(caller, boxes, "boxes", columns, row)
    return xp.ascontiguousarray(view, dtype=acc_dtype)

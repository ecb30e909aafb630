"""The NumPy/CuPy/any-DLPack front end, for every operator from its
description (``curoi._operators``): arrays in from any framework, kernels
run on their device, the caller's kind of array out.

The public functions (``curoi.roi_align``, ...) check their scalar
arguments through the description and hand everything to :func:`forward`
or :func:`backward`.
"""

import numpy as np

from . import _boxes, _fast, _gpu, _launch, _operators, _validate
from ._interop import Caller

# Layout descriptions for messages, by channels_last.
FEATURES = {False: "[N, C, H, W]", True: "[N, H, W, C]"}
GRAD = {False: "[K, C, PH, PW]", True: "[K, PH, PW, C]"}
SHAPE = {False: "(N, C, H, W)", True: "(N, H, W, C)"}
_OUTPUT = {False: "[K, C, PH, PW] (boxes, channels, output_size)",
           True: "[K, PH, PW, C] (boxes, output_size, channels)"}
_GRAD_INPUT = {False: "the gradient [N, C, H, W] (input_shape)",
               True: "the gradient [N, H, W, C] (input_shape)"}
_ORDER = {False: "(K, C, PH, PW)", True: "(K, PH, PW, C)"}


def nchw(shape, channels_last):
    """A 4-D shape in [N, C, H, W] order, whichever layout it has."""
    return (shape[0], shape[3], shape[1], shape[2]) if channels_last else tuple(shape)


def layout(n, c, h, w, channels_last):
    """The shape (N, C, H, W) in the caller's layout."""
    return (n, h, w, c) if channels_last else (n, c, h, w)


_NONE = {count: [None] * count for count in range(4)}


def forward(op, input, boxes, ph, pw, values, channels_last, saved_dtypes=None):
    """``op``'s forward. ``saved_dtypes``: a dtype name per saved result to
    compute and return too (None: only the output)."""
    fast = _fast.numpy_arrays(input, boxes, op.box_columns)
    if fast is not None:
        _check_scale(values, fast)
        shape = input.shape
        n, c, h, w = (shape[0], shape[3], shape[1], shape[2]) if channels_last else shape
        out_shape = op.result_shape(boxes.shape[0], c, ph, pw, values, channels_last)
        out = _fast.empty(out_shape, input.dtype)
        if saved_dtypes is None:
            if out is not None:
                op.forward(input, boxes, out, _NONE[len(op.saved)], values, channels_last)
                return out
        else:
            _check_saved(op, saved_dtypes, h, w)
            saved = [_fast.empty(out_shape, d) for d in saved_dtypes]
            # A buffer that cannot be allocated: the general path says which.
            if out is not None and all(s is not None for s in saved):
                op.forward(input, boxes, out, saved, values, channels_last)
                return (out, *saved)
    caller = Caller(input, op.input_name)
    with caller.on_device():
        x, storage = _launch.features(caller, input, op.input_name, FEATURES[channels_last])
        acc = _launch.accumulation_dtype(storage)
        _check_scale(values, acc)
        n, c, h, w = nchw(x.shape, channels_last)
        op.result_shape(0, c, ph, pw, values, channels_last)  # checks C
        _check_saved(op, saved_dtypes, h, w)
        rois = _rois(op, boxes, caller, (n, h, w), acc)
        k = rois.shape[0]
        dtype = _launch.kernel_dtype(caller, storage)
        cast = _launch.cast_back(caller, storage, dtype)
        shape = op.result_shape(k, c, ph, pw, values, channels_last)
        what = _output_what(op, channels_last)
        out, native = caller.new(shape, dtype, native=cast is None, zeroed=False,
                                 what="the output " + what)
        saved, natives = [None] * len(op.saved), []
        if saved_dtypes:
            made = [caller.new(shape, d, zeroed=False, what=f"the {s.name} " + what)
                    for s, d in zip(op.saved, saved_dtypes)]
            saved = [view for view, _ in made]
            natives = [native for _, native in made]
        op.forward(_launch.as_kernel_input(x, dtype), rois, out, saved, values,
                   channels_last)
        y = caller.result(out, native, cast)
        if not saved_dtypes:
            return y
        return (y, *(caller.result(v, nat) for v, nat in zip(saved, natives)))


def _output_what(op, channels_last):
    if op.flat_columns is not None:
        return "[K, columns] (boxes, channels x bins)"
    return _OUTPUT[channels_last]


def _rois(op, boxes, caller, nhw, acc):
    """The kernels' rois from the caller's boxes, for features of ``nhw`` =
    (N, H, W)."""
    n, h, w = nhw
    if boxes is None and op.whole_map:
        xp = _gpu.require_cupy() if caller.device.is_cuda else np
        return _operators.whole_map_rois(n, h, w, acc, xp)
    if op.rois_from is not None and isinstance(boxes, tuple):
        return op.rois_from(boxes, caller, n, acc)
    return _boxes.to_rois(boxes, caller, n, acc, op.box_columns, op.box_layout)


def _check_scale(values, acc):
    """A spatial_scale (where the operator has one) must be a finite
    number in the accumulation type."""
    if "spatial_scale" in values._fields:
        _validate.scale_for(values.spatial_scale, acc)


def _check_saved(op, saved_dtypes, h, w):
    for dtype in saved_dtypes or ():
        _validate.argmax_fits(h * w, dtype)


def backward(op, grad_output, boxes, input_shape, output_size, values,
             deterministic, channels_last, saved=()):
    """``op``'s backward: the gradient with respect to the features.
    ``output_size`` None takes it from grad_output's shape; ``saved`` are
    the forward's saved results (RoI Pool's argmax)."""
    n, c, h, w = nchw(_validate.input_shape(input_shape, layout=SHAPE[channels_last]),
                      channels_last)
    caller = Caller(grad_output, "grad_output")
    with caller.on_device():
        g, storage = _launch.features(caller, grad_output, "grad_output",
                                      GRAD[channels_last], ndim=op.result_rank)
        acc = _launch.accumulation_dtype(storage)
        _check_scale(values, acc)
        views = [_saved_view(caller, s, array, g) for s, array in zip(op.saved, saved)]
        rois = _rois(op, boxes, caller, (n, h, w), acc)
        k = rois.shape[0]
        if output_size is not None:
            ph, pw = output_size
        elif g.ndim == 4:
            ph, pw = nchw(g.shape, channels_last)[2:]  # the bins are the gradient's
        else:
            ph = pw = None  # a flat result's bins come from the params
        expected = op.result_shape(k, c, ph, pw, values, channels_last, "input_shape")
        if tuple(g.shape) != expected:
            if op.flat_columns is not None:
                raise ValueError(
                    f"grad_output must have shape (K, columns) = {expected} from "
                    f"boxes, input_shape and the operator's bins, got {tuple(g.shape)}")
            order = _ORDER[channels_last]
            if output_size is None:
                raise ValueError(
                    f"grad_output must have shape {order} with K = {k} boxes "
                    f"and C = {c} from input_shape, got {tuple(g.shape)}")
            raise ValueError(
                f"grad_output must have shape {order} = {expected} from "
                f"boxes, input_shape and output_size, got {tuple(g.shape)}")
        dtype = _launch.kernel_dtype(caller, storage)
        cast = _launch.cast_back(caller, storage, acc)
        # Allocated zeroed: the OS hands out zero pages lazily, so a huge,
        # sparsely hit gradient costs only the pages the kernel writes.
        grad_input, native = caller.new(layout(n, c, h, w, channels_last), acc,
                                        native=cast is None,
                                        what=_GRAD_INPUT[channels_last])
        op.backward(_launch.as_kernel_input(g, dtype), rois, views, grad_input,
                    values, deterministic, True, channels_last)
        return caller.result(grad_input, native, cast)


def _saved_view(caller, saved, array, g):
    """A saved result (an integer position array) as the kernels read it:
    int32 or int64 in place, other integer types as int64."""
    idx = caller.view(array, saved.name)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"{saved.name} must have an integer dtype, got {idx.dtype}")
    if tuple(idx.shape) != tuple(g.shape):
        raise ValueError(
            f"{saved.name} must have the shape of grad_output {tuple(g.shape)}, "
            f"got {tuple(idx.shape)}")
    if idx.dtype not in (np.int32, np.int64):
        idx = idx.astype(np.int64)
    xp = _gpu.require_cupy() if caller.device.is_cuda else np
    return xp.ascontiguousarray(idx)


def boxes_backward(op, grad_output, input, boxes, ph, pw, values, channels_last):
    """``op``'s gradient with respect to the boxes, with their shape: a
    ``[K, columns]`` array (0 in the batch-index column) or a list of
    per-image ``[L, columns - 1]`` arrays, in the boxes' dtype."""
    caller = Caller(input, op.input_name)
    with caller.on_device():
        x, storage = _launch.features(caller, input, op.input_name, FEATURES[channels_last])
        acc = _launch.accumulation_dtype(storage)
        _check_scale(values, acc)
        g, _ = _launch.features(caller, grad_output, "grad_output", GRAD[channels_last])
        n, c, h, w = nchw(x.shape, channels_last)
        rois = _rois(op, boxes, caller, (n, h, w), acc)
        k = rois.shape[0]
        expected = op.result_shape(k, c, ph, pw, values, channels_last)
        if tuple(g.shape) != expected:
            raise ValueError(
                f"grad_output must have shape {_ORDER[channels_last]} = {expected} "
                f"from boxes, input and output_size, got {tuple(g.shape)}")
        dtype = _launch.kernel_dtype(caller, storage)
        grad_rois, _ = caller.new((k, op.box_columns), acc, native=False,
                                  what=f"the gradient [K, {op.box_columns}] of the boxes")
        if k and g.size:
            op.boxes_backward(_launch.as_kernel_input(g, dtype),
                              _launch.as_kernel_input(x, dtype), rois, grad_rois,
                              values, channels_last)
        return _like_boxes(op, caller, boxes, grad_rois)


def _like_boxes(op, caller, boxes, grad_rois):
    """``grad_rois`` in the shape and dtype of ``boxes``, cast by the
    caller's framework; boxes in an operator's own form (``rois_from``: a
    tuple whose first array holds the coordinates) get the gradient of
    that array."""
    acc = grad_rois.dtype.name
    if op.rois_from is not None and isinstance(boxes, tuple):
        xp = _gpu.require_cupy() if caller.device.is_cuda else np
        grad_rois = xp.ascontiguousarray(grad_rois[:, 1:])
        boxes = boxes[0]

    def handed_back(view, array, name):
        dtype = _validate.storage_dtype(array, caller.view(array, name))
        return caller.result(view, cast_to=None if dtype == acc else dtype)

    if not isinstance(boxes, (list, tuple)):
        return handed_back(grad_rois, boxes, "boxes")
    parts, start = [], 0
    for i, per_image in enumerate(boxes):
        rows = caller.view(per_image, f"boxes[{i}]").shape[0]
        xp = _gpu.require_cupy() if caller.device.is_cuda else np
        part = xp.ascontiguousarray(grad_rois[start:start + rows, 1:])
        parts.append(handed_back(part, per_image, f"boxes[{i}]"))
        start += rows
    return parts

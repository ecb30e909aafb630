"""RoI Pool (max pooling over bins), forward and backward."""

import numpy as np

from . import _boxes, _fast, _gpu, _kernels, _launch, _ops, _validate
from ._interop import Caller
from ._roi_align import _FEATURES, _GRAD, _GRAD_INPUT, _OUTPUT, _SHAPE, _layout, _nchw
_CONVENTIONS = tuple(_kernels.POOL_CONVENTIONS)


def roi_pool(input, boxes, output_size, spatial_scale=1.0, *,
             convention="torchvision", return_argmax=False, argmax_dtype="int64",
             data_format="NCHW"):
    """RoI Pool: the maximum of each bin of each box.

    Args:
        input: features ``[N, C, H, W]`` (see :func:`curoi.roi_align` for
            the accepted arrays, devices and dtypes).
        boxes: ``[K, 5]`` rows of ``(batch index, x1, y1, x2, y2)`` or a
            list of ``[L, 4]`` arrays, one per image.
        output_size: ``(PH, PW)`` or an int for both.
        spatial_scale: factor from box to feature coordinates.
        convention: where the bins lie.
            ``"torchvision"`` (torchvision, Caffe, ONNX MaxRoiPool): corners
            rounded to whole pixels, ``x2``/``y2`` inclusive, box at least one
            pixel; bin ``p`` spans ``floor(p*bin)`` to ``ceil((p+1)*bin)``
            from the rounded start.
            ``"mmcv"`` (mmcv, mmdetection): continuous corners ``x1*s`` and
            ``(x2+1)*s``; bin ``p`` spans ``floor(p*bin + x1*s)`` to
            ``ceil((p+1)*bin + x1*s)``; a box of no positive extent gives zeros.
            Bins are clipped to the map in both.
        return_argmax: also return where each maximum was.
        argmax_dtype: ``"int64"`` or ``"int32"`` (or the NumPy types): the
            argmax's integer type. int32 is what torchvision keeps; it takes
            half the memory, and :func:`roi_pool_backward` reads it in about
            two thirds of the time. It needs feature planes of fewer than
            ``2**31`` pixels (a ValueError otherwise).
        data_format: ``"NCHW"`` (features ``[N, C, H, W]``) or ``"NHWC"``
            (channels-last ``[N, H, W, C]`` read in place, results
            ``[K, PH, PW, C]``: the NCHW numbers transposed, to the bit).

    Returns:
        ``[K, C, PH, PW]`` (NHWC: ``[K, PH, PW, C]``) of the input's dtype,
        and with ``return_argmax`` an ``argmax_dtype`` array of the same shape holding the flat index ``h * W + w``
        of each maximum in its feature plane: the first one in row-major
        order on ties, -1 for an empty bin (whose output is 0) and for boxes
        that read nothing (batch index not finite or not in ``[0, N)``, or a
        non-finite coordinate). NaN counts as larger than any number.
    """
    ph, pw = _validate.output_size(output_size)
    scale = _validate.spatial_scale(spatial_scale)
    convention = _validate.choice(convention, "convention", _CONVENTIONS)
    return_argmax = _validate.flag(return_argmax, "return_argmax")
    index_dtype = _validate.argmax_dtype(argmax_dtype)
    channels_last = _validate.data_format(data_format)
    fast = _fast.numpy_arrays(input, boxes)
    if fast is not None:
        _validate.scale_for(scale, fast)
        _, _, h, w = _nchw(input.shape, channels_last)
        _validate.argmax_fits(h * w, index_dtype)
        result = _fast.roi_pool_forward(
            input, boxes, fast, ph, pw, scale,
            _kernels.POOL_CONVENTIONS[convention], return_argmax, index_dtype,
            channels_last)
        if result is not None:
            return result
    caller = Caller(input, "input")
    with caller.on_device():
        x, storage = _launch.features(caller, input, "input",
                                      _FEATURES[channels_last])
        _validate.scale_for(scale, _launch.accumulation_dtype(storage))
        n, c, h, w = _nchw(x.shape, channels_last)
        _validate.argmax_fits(h * w, index_dtype)
        rois = _boxes.to_rois(boxes, caller, n, _launch.accumulation_dtype(storage))
        k = rois.shape[0]
        dtype = _launch.kernel_dtype(caller, storage)
        cast = _launch.cast_back(caller, storage, dtype)
        shape = _layout(k, c, ph, pw, channels_last)
        out, native = caller.new(shape, dtype, native=cast is None,
                                 zeroed=False, what=_OUTPUT[channels_last])
        argmax = native_argmax = None
        if return_argmax:
            argmax, native_argmax = caller.new(
                shape, index_dtype, zeroed=False,
                what="the argmax " + _OUTPUT[channels_last][11:])
        _ops.roi_pool_forward(_launch.as_kernel_input(x, dtype), rois, out,
                              argmax, scale, convention, channels_last)
        y = caller.result(out, native, cast)
        if return_argmax:
            return y, caller.result(argmax, native_argmax)
        return y


def roi_pool_backward(grad_output, argmax, boxes, input_shape, *,
                      deterministic=False, data_format="NCHW"):
    """Gradient of :func:`roi_pool` with respect to its input.

    Args:
        grad_output: ``[K, C, PH, PW]`` (NHWC: ``[K, PH, PW, C]``), the
            gradient of the pooled output.
        argmax: the argmax that :func:`roi_pool` returned (integer, same
            shape). Entries outside ``[0, H*W)`` pass no gradient. int64 and
            int32 are read in place; other integer types are converted to
            int64 first.
        boxes: as given to :func:`roi_pool` (for the batch index of each box).
        input_shape: ``(N, C, H, W)`` of the forward input (NHWC:
            ``(N, H, W, C)``).
        deterministic: bitwise reproducible sums, as in
            :func:`curoi.roi_align_backward`.
        data_format: ``"NCHW"`` or ``"NHWC"``, as in the forward.

    Returns:
        ``[N, C, H, W]`` (NHWC: ``[N, H, W, C]``) of grad_output's dtype; accumulated in float32
        (float64 for float64) and rounded to half precision once at the end.
    """
    deterministic = _validate.flag(deterministic, "deterministic")
    channels_last = _validate.data_format(data_format)
    n, c, h, w = _nchw(_validate.input_shape(input_shape,
                                             layout=_SHAPE[channels_last]),
                       channels_last)
    caller = Caller(grad_output, "grad_output")
    with caller.on_device():
        g, storage = _launch.features(caller, grad_output, "grad_output",
                                      _GRAD[channels_last])
        idx = caller.view(argmax, "argmax")
        if idx.dtype.kind not in "iu":
            raise TypeError(f"argmax must have an integer dtype, got {idx.dtype}")
        if tuple(idx.shape) != tuple(g.shape):
            raise ValueError(
                f"argmax must have the shape of grad_output {tuple(g.shape)}, "
                f"got {tuple(idx.shape)}"
            )
        xp = _gpu.require_cupy() if caller.device.is_cuda else np
        if idx.dtype not in (np.int32, np.int64):
            idx = idx.astype(np.int64)
        idx = xp.ascontiguousarray(idx)
        rois = _boxes.to_rois(boxes, caller, n, _launch.accumulation_dtype(storage))
        k = rois.shape[0]
        _, g_channels, ph, pw = _nchw(g.shape, channels_last)
        if g.shape[0] != k or g_channels != c:
            order = "(K, PH, PW, C)" if channels_last else "(K, C, PH, PW)"
            raise ValueError(
                f"grad_output must have shape {order} with K = {k} boxes "
                f"and C = {c} from input_shape, got {tuple(g.shape)}"
            )
        dtype = _launch.kernel_dtype(caller, storage)
        acc = _launch.accumulation_dtype(storage)
        cast = _launch.cast_back(caller, storage, acc)
        # Allocated zeroed: the OS hands out zero pages lazily, so a huge,
        # sparsely hit gradient costs only the pages the kernel writes.
        grad_input, native = caller.new(_layout(n, c, h, w, channels_last), acc,
                                        native=cast is None,
                                        what=_GRAD_INPUT[channels_last])
        _ops.roi_pool_backward(_launch.as_kernel_input(g, dtype), idx, rois,
                               grad_input, deterministic, zeroed=True,
                               channels_last=channels_last)
        return caller.result(grad_input, native, cast)

"""RoI Pool (max pooling over bins), forward and backward: the public
NumPy/CuPy functions, built from ``curoi._operators.ROI_POOL``."""

from . import _frontend, _validate
from ._operators import ROI_POOL


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
            half the memory, and :func:`roi_pool_backward` reads it faster
            (the benchmark's ``roi_pool backward`` rows show both). It needs
            feature planes of fewer than
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
    values = ROI_POOL.values(spatial_scale, convention)
    return_argmax = _validate.flag(return_argmax, "return_argmax")
    index_dtype = _validate.argmax_dtype(argmax_dtype)
    return _frontend.forward(ROI_POOL, input, boxes, ph, pw, values,
                             _validate.data_format(data_format),
                             saved_dtypes=(index_dtype,) if return_argmax else None)


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
    return _frontend.backward(ROI_POOL, grad_output, boxes, input_shape, None,
                              ROI_POOL.values(), deterministic,
                              _validate.data_format(data_format), saved=(argmax,))

"""RoI Align (average pooling), forward and backward: the public NumPy/CuPy
functions, built from ``curoi._operators.ROI_ALIGN``."""

from . import _frontend, _validate
from ._operators import ALIGN_MODES, ROI_ALIGN, ROI_ALIGN_MAX


def _mode(mode, with_argmax, name="return_argmax"):
    """The operator for ``mode``; an argmax belongs to mode="max" only."""
    mode = _validate.choice(mode, "mode", ALIGN_MODES)
    if mode == "avg" and with_argmax:
        raise ValueError(f"{name} is for mode='max' only (an average has no winner)")
    return ROI_ALIGN if mode == "avg" else ROI_ALIGN_MAX


def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1,
              aligned=False, *, mode="avg", return_argmax=False, data_format="NCHW"):
    """RoI Align: average (or maximum) of bilinearly interpolated samples in
    each bin.

    The numbers are those of torchvision's ``roi_align``, detectron2's
    ``ROIAlign`` and ONNX ``RoiAlign`` (avg).

    Args:
        input: features ``[N, C, H, W]``, float16, bfloat16, float32 or
            float64; a NumPy, CuPy, PyTorch or JAX array, or any DLPack array.
            CuPy and CUDA arrays run on the GPU, others on the CPU. On the CPU,
            float16 and bfloat16 are computed in float32 and rounded back.
        boxes: ``[K, 5]`` rows of ``(batch index, x1, y1, x2, y2)``, or a list
            of ``[L, 4]`` arrays of ``(x1, y1, x2, y2)``, one per image, in
            input-image coordinates, on the same device as ``input``. Boxes
            are used in float32 (float64 for float64 input) whatever the
            feature precision. A box whose batch index is not finite or not
            in ``[0, N)``, or with a non-finite coordinate, gives zeros; a
            fractional batch index is truncated toward zero (1.7: image 1).
        output_size: ``(PH, PW)`` or an int for both: bins per box.
        spatial_scale: factor from box to feature coordinates, e.g. 1/16.
        sampling_ratio: samples per bin side; ``<= 0`` means adaptive,
            ``ceil(box size / output size)`` per axis.
        aligned: shift the box by -0.5 pixel (``True``, pixel centres at
            half-integers, detectron2's and ONNX ``half_pixel``), or use the
            legacy convention with boxes of at least one pixel (``False``).
        data_format: ``"NCHW"`` (features ``[N, C, H, W]``) or ``"NHWC"``
            (channels-last features ``[N, H, W, C]``, read in place by
            kernels of their own, and a ``[K, PH, PW, C]`` result whose
            numbers are the NCHW result's, transposed, to the bit).
        mode: ``"avg"`` (the default: the mean of the bin's samples) or
            ``"max"``: mmcv's ``RoIAlign(pool_mode="max")``, the largest of
            the bin's interpolated samples, a sample outside
            ``[-1, H] x [-1, W]`` counting as 0 (the first largest wins ties;
            a NaN beats any number, the first NaN winning, as in
            :func:`curoi.roi_pool`). A bin without samples (an empty box
            with adaptive sampling) gives 0, where mmcv leaves its starting
            value (-10000 or the lowest float) in the output.
        return_argmax: with ``mode="max"``, also return which sample won in
            each bin: an int64 array of the output's shape holding
            ``iy * grid_w + ix`` in the bin's sampling grid, -1 where no
            sample won or the winner lies off the map (its value 0 depends on
            no pixel). :func:`roi_align_backward` takes it.

    Returns:
        ``[K, C, PH, PW]`` (NHWC: ``[K, PH, PW, C]``) of the input's dtype,
        the caller's kind of array on the input's device; with
        ``return_argmax``, also the argmax.

    A sample outside ``[-1, H] x [-1, W]`` contributes 0 but counts in the
    bin's divisor; samples in that band are clamped to the map's edge.
    Samples that cannot land on the map are skipped without being computed:
    the same numbers, and with adaptive sampling a huge box costs no more
    than one the size of the map.
    """
    ph, pw = _validate.output_size(output_size)
    values = ROI_ALIGN.values(spatial_scale, sampling_ratio, aligned)
    return_argmax = _validate.flag(return_argmax, "return_argmax")
    op = _mode(mode, return_argmax)
    return _frontend.forward(op, input, boxes, ph, pw, values,
                             _validate.data_format(data_format),
                             saved_dtypes=("int64",) if return_argmax else None)


def roi_align_backward(grad_output, boxes, input_shape, output_size,
                       spatial_scale=1.0, sampling_ratio=-1, aligned=False, *,
                       mode="avg", argmax=None, deterministic=False,
                       data_format="NCHW"):
    """Gradient of :func:`roi_align` with respect to its input.

    Args:
        grad_output: ``[K, C, PH, PW]`` (NHWC: ``[K, PH, PW, C]``), the
            gradient of the pooled output.
        boxes: as given to :func:`roi_align` (``[K, 5]`` or a list).
        input_shape: ``(N, C, H, W)`` of the forward input (NHWC:
            ``(N, H, W, C)``).
        output_size, spatial_scale, sampling_ratio, aligned: as in the forward.
        deterministic: make the result bitwise the same in every run, on
            every thread count and launch configuration (see below).
        data_format: ``"NCHW"`` or ``"NHWC"``, as in the forward; NHWC
            gradients are the NCHW ones transposed, to the bit.
        mode: ``"avg"`` or ``"max"``, as in the forward.
        argmax: with ``mode="max"`` (and only then), the forward's argmax:
            each output's gradient goes to the four pixels around its winning
            sample, with their bilinear weights. Entries that name no sample
            of their bin's grid pass nothing.

    Returns:
        ``[N, C, H, W]`` (NHWC: ``[N, H, W, C]``) of grad_output's dtype. Gradients accumulate in
        float32 (float64 for float64) and are rounded to half precision once
        at the end. Boxes that the forward ignores get no gradient.

    On the CPU every gradient plane is summed by one thread in a fixed
    order, so results are bitwise reproducible whatever ``deterministic``
    says. On the GPU the plain sum uses floating-point atomic adds, whose
    order varies, so results may differ in the last bits from run to run;
    with ``deterministic=True`` every term is rounded to a multiple of
    ``2**-e`` and summed exactly in 64-bit integers, where ``e`` is chosen
    from ``max|grad_output|`` so that no sum can overflow; see the README's
    guarantees for the precision this gives.
    """
    output_size = _validate.output_size(output_size)
    values = ROI_ALIGN.values(spatial_scale, sampling_ratio, aligned)
    op = _mode(mode, argmax is not None, "argmax")
    if op is ROI_ALIGN_MAX and argmax is None:
        raise TypeError("argmax is needed for mode='max': pass the one that "
                        "roi_align(..., mode='max', return_argmax=True) returned")
    deterministic = _validate.flag(deterministic, "deterministic")
    return _frontend.backward(op, grad_output, boxes, input_shape,
                              output_size, values, deterministic,
                              _validate.data_format(data_format),
                              saved=() if argmax is None else (argmax,))


def roi_align_boxes_backward(grad_output, input, boxes, output_size, spatial_scale=1.0,
                             sampling_ratio=-1, aligned=False, *, data_format="NCHW"):
    """Gradient of :func:`roi_align` (average mode) with respect to its boxes.

    Args:
        grad_output: ``[K, C, PH, PW]`` (NHWC: ``[K, PH, PW, C]``).
        input: the forward's features.
        boxes: as given to the forward.
        output_size, spatial_scale, sampling_ratio, aligned, data_format: as
            in the forward.

    Returns:
        The shape of ``boxes``: ``[K, 5]`` with 0 in the batch-index column,
        or a list of ``[L, 4]``; in the boxes' dtype (computed in float32,
        float64 for float64 features).

    Each sample's bilinear value moves with its position, which moves
    linearly with the corners; the sampling grid (adaptive or not) and the
    divisor are held fixed, and with ``aligned=False`` a box held at the
    1-pixel minimum size does not grow with its corners. The slope is that
    of the forward's own branches: 0 off the map and in the clamped band
    (a position at or beyond the first or last pixel centre), and inside,
    at an integer position, that of the cell below and to the right.
    Boxes that read nothing get 0. The sums are in a fixed order: bitwise
    the same on every run, thread count and device launch.
    """
    ph, pw = _validate.output_size(output_size)
    values = ROI_ALIGN.values(spatial_scale, sampling_ratio, aligned)
    return _frontend.boxes_backward(ROI_ALIGN, grad_output, input, boxes, ph, pw, values,
                                    _validate.data_format(data_format))

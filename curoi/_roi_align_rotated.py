"""Rotated RoI Align, forward and backward: the public NumPy/CuPy functions,
built from ``curoi._operators.ROI_ALIGN_ROTATED``."""

from . import _frontend, _validate
from ._operators import ROI_ALIGN_ROTATED


def roi_align_rotated(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=0,
                      *, convention="detectron2", aligned=True, clockwise=False,
                      data_format="NCHW"):
    """RoI Align on rotated boxes: the average of bilinearly interpolated
    samples of each bin of a box turned about its centre.

    Args:
        input: features ``[N, C, H, W]`` (NHWC: ``[N, H, W, C]``); any array
            curoi takes (see :func:`curoi.roi_align`).
        boxes: ``[K, 6]`` rows of ``(batch index, centre x, centre y, width,
            height, angle)``, or a list of ``[L, 5]`` arrays without the
            batch index, one per image, in input-image coordinates.
        output_size: ``(PH, PW)`` or an int for both.
        spatial_scale: factor from box to feature coordinates.
        sampling_ratio: samples per bin side, at most 1024; ``<= 0`` (the
            default, as in detectron2) means adaptive,
            ``ceil(box size / output size)``.
        convention: ``"detectron2"``: detectron2's ``ROIAlignRotated``, the
            angle in degrees, counter-clockwise, the half-pixel shift always
            (``aligned`` and ``clockwise`` must stay at their defaults);
            ``"mmcv"``: mmcv's ``RoIAlignRotated``, the angle in radians,
            ``aligned`` and ``clockwise`` honoured (``aligned=False`` also
            makes boxes at least 1 x 1 pixel, as mmcv does). Boxes with an
            invalid batch index or a non-finite value (the angle included)
            give zeros.
        aligned: shift the centre by -0.5 pixel (mmcv convention).
        clockwise: the angle turns clockwise (mmcv convention).
        data_format: ``"NCHW"`` or ``"NHWC"``.

    Returns:
        ``[K, C, PH, PW]`` (NHWC: ``[K, PH, PW, C]``) of the input's dtype.

    Sample ``(iy, ix)`` of bin ``(ph, pw)`` lies at ``(yy, xx)`` =
    ``(-h/2 + (ph + (iy + 0.5) / grid_h) * h / PH, -w/2 + ...)`` in the box's
    frame, and on the map at ``y = yy cos t - xx sin t + cy``,
    ``x = yy sin t + xx cos t + cx``, with RoI Align's bilinear rules (a
    sample outside ``[-1, H] x [-1, W]`` counts 0). At angle 0 this is
    :func:`curoi.roi_align` with ``aligned=True`` on the box
    ``(cx - w/2, cy - h/2, cx + w/2, cy + h/2)``. Only the samples that can
    land on the map are computed, so a huge box with adaptive sampling costs
    no more than one the size of the map.
    """
    ph, pw = _validate.output_size(output_size)
    values = ROI_ALIGN_ROTATED.values(spatial_scale, sampling_ratio, convention,
                                      aligned, clockwise)
    return _frontend.forward(ROI_ALIGN_ROTATED, input, boxes, ph, pw, values,
                             _validate.data_format(data_format))


def roi_align_rotated_backward(grad_output, boxes, input_shape, output_size,
                               spatial_scale=1.0, sampling_ratio=0, *,
                               convention="detectron2", aligned=True,
                               clockwise=False, deterministic=False,
                               data_format="NCHW"):
    """Gradient of :func:`roi_align_rotated` with respect to its input.

    Args:
        grad_output: ``[K, C, PH, PW]`` (NHWC: ``[K, PH, PW, C]``).
        boxes: as given to the forward.
        input_shape: ``(N, C, H, W)`` of the forward input (NHWC:
            ``(N, H, W, C)``).
        output_size, spatial_scale, sampling_ratio, convention, aligned,
            clockwise, data_format: as in the forward.
        deterministic: bitwise reproducible sums, as in
            :func:`curoi.roi_align_backward`.

    Returns:
        ``[N, C, H, W]`` (NHWC: ``[N, H, W, C]``) of grad_output's dtype.
    """
    output_size = _validate.output_size(output_size)
    values = ROI_ALIGN_ROTATED.values(spatial_scale, sampling_ratio, convention,
                                      aligned, clockwise)
    deterministic = _validate.flag(deterministic, "deterministic")
    return _frontend.backward(ROI_ALIGN_ROTATED, grad_output, boxes, input_shape,
                              output_size, values, deterministic,
                              _validate.data_format(data_format))


def roi_align_rotated_boxes_backward(grad_output, input, boxes, output_size,
                                     spatial_scale=1.0, sampling_ratio=0, *,
                                     convention="detectron2", aligned=True,
                                     clockwise=False, data_format="NCHW"):
    """Gradient of :func:`roi_align_rotated` with respect to its boxes: the
    shape and dtype of ``boxes`` (``[K, 6]`` with 0 in the batch-index
    column, or a list of ``[L, 5]``), the derivatives by centre x, centre y,
    width, height and angle, the angle's in the box's own unit (degrees for
    ``convention="detectron2"``, radians for ``"mmcv"``, with the sign that
    ``clockwise`` gives it).

    Each sample contributes the derivative of its bilinear value with
    respect to its position (0 in the bands where the forward clamps it to
    the edge, nothing off the map; at a whole-pixel position, the slope of
    the cell below and to the right, the one the forward interpolates in),
    carried through the rotation to the box's numbers; the adaptive grid
    size counts as a constant, and so does mmcv's ``max(size, 1)`` where it
    picks 1 (``aligned=False``). Deterministic: each box's bins are added in
    a fixed order. Arguments as :func:`roi_align_rotated`, with the forward's
    ``input`` and the gradient ``grad_output`` of its result.
    """
    ph, pw = _validate.output_size(output_size)
    values = ROI_ALIGN_ROTATED.values(spatial_scale, sampling_ratio, convention,
                                      aligned, clockwise)
    return _frontend.boxes_backward(ROI_ALIGN_ROTATED, grad_output, input, boxes, ph, pw,
                                    values, _validate.data_format(data_format))

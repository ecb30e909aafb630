"""Precise RoI Pooling, forward and gradients: the public NumPy/CuPy
functions, built from ``curoi._operators.PRROI_POOL``."""

from . import _frontend, _validate
from ._operators import PRROI_POOL


def prroi_pool(input, boxes, output_size, spatial_scale=1.0, *, data_format="NCHW"):
    """Precise RoI Pooling (Jiang et al., ECCV 2018; mmcv's ``PrRoIPool``):
    each bin is the integral of the bilinearly interpolated features over
    the bin, divided by its area.

    Args:
        input: features ``[N, C, H, W]`` (NHWC: ``[N, H, W, C]``); any array
            curoi takes (see :func:`curoi.roi_align`).
        boxes: ``[K, 5]`` rows of ``(batch index, x1, y1, x2, y2)`` or a list
            of ``[L, 4]`` arrays, one per image.
        output_size: ``(PH, PW)`` or an int for both.
        spatial_scale: factor from box to feature coordinates.
        data_format: ``"NCHW"`` or ``"NHWC"``.

    Returns:
        ``[K, C, PH, PW]`` (NHWC: ``[K, PH, PW, C]``) of the input's dtype.

    As mmcv's kernel: the box's corners are ``x * spatial_scale`` with no
    half-pixel shift and no rounding (so the result is differentiable in
    the box, see :func:`prroi_pool_boxes_backward`); the map is bilinear
    between pixel centres and falls linearly to 0 across the cells around
    it (pixels off the map count 0), 0 beyond; a bin of zero width or height
    gives 0. The integrals are exact, cell by cell, and only the cells on
    the map are visited, so a huge box costs no more than the map.
    """
    ph, pw = _validate.output_size(output_size)
    values = PRROI_POOL.values(spatial_scale)
    return _frontend.forward(PRROI_POOL, input, boxes, ph, pw, values,
                             _validate.data_format(data_format))


def prroi_pool_backward(grad_output, boxes, input_shape, output_size, spatial_scale=1.0,
                        *, deterministic=False, data_format="NCHW"):
    """Gradient of :func:`prroi_pool` with respect to its input: each pixel's
    weight in each bin's integral. Arguments as
    :func:`curoi.roi_align_backward` (without sampling_ratio and aligned)."""
    output_size = _validate.output_size(output_size)
    values = PRROI_POOL.values(spatial_scale)
    deterministic = _validate.flag(deterministic, "deterministic")
    return _frontend.backward(PRROI_POOL, grad_output, boxes, input_shape, output_size,
                              values, deterministic, _validate.data_format(data_format))


def prroi_pool_boxes_backward(grad_output, input, boxes, output_size, spatial_scale=1.0,
                              *, data_format="NCHW"):
    """Gradient of :func:`prroi_pool` with respect to its boxes, in the
    shape and dtype of ``boxes`` (0 in the batch-index column): the
    derivative of each bin's mean by its edges (the mean of the surface
    along an edge, against the bin's mean), carried to the corners.
    Deterministic: each box's sum is in a fixed order."""
    ph, pw = _validate.output_size(output_size)
    values = PRROI_POOL.values(spatial_scale)
    return _frontend.boxes_backward(PRROI_POOL, grad_output, input, boxes, ph, pw, values,
                                    _validate.data_format(data_format))

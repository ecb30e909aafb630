"""Position-sensitive RoI pooling (R-FCN), forward and backward: the public
NumPy/CuPy functions, built from ``curoi._operators.PS_ROI_POOL`` and
``PS_ROI_ALIGN``."""

from . import _frontend, _validate
from ._operators import PS_ROI_ALIGN, PS_ROI_POOL


def ps_roi_pool(input, boxes, output_size, spatial_scale=1.0, *, data_format="NCHW"):
    """Position-sensitive RoI Pool (R-FCN), as ``torchvision.ops.ps_roi_pool``.

    The input has ``C = C_out x PH x PW`` channels; bin ``(ph, pw)`` of
    output channel ``c`` is the mean of input channel
    ``(c x PH + ph) x PW + pw`` over the bin.

    Args:
        input: features ``[N, C, H, W]`` (NHWC: ``[N, H, W, C]``), C a
            multiple of ``PH x PW``; any array curoi takes (see
            :func:`curoi.roi_align`).
        boxes: ``[K, 5]`` rows of ``(batch index, x1, y1, x2, y2)`` or a list
            of ``[L, 4]`` arrays, one per image.
        output_size: ``(PH, PW)`` or an int for both.
        spatial_scale: factor from box to feature coordinates.
        data_format: ``"NCHW"`` or ``"NHWC"``.

    Returns:
        ``[K, C_out, PH, PW]`` (NHWC: ``[K, PH, PW, C_out]``) of the input's
        dtype.

    Bins are torchvision's: corners rounded to whole pixels (half away from
    zero), boxes at least one pixel, bin ``p`` from ``floor(p x bin)`` to
    ``ceil((p + 1) x bin)``, and, as in torchvision's forward, bin ends
    clipped to ``H - 1`` and ``W - 1``, so the last row and column of the
    map are never read. An empty bin gives 0. The backward is the exact
    gradient of this forward; torchvision's own backward clips bin ends to
    ``H`` and ``W`` instead, and so does not match its forward at the bottom
    and right edges.
    """
    ph, pw = _validate.output_size(output_size)
    values = PS_ROI_POOL.values(spatial_scale)
    return _frontend.forward(PS_ROI_POOL, input, boxes, ph, pw, values,
                             _validate.data_format(data_format))


def ps_roi_pool_backward(grad_output, boxes, input_shape, output_size,
                         spatial_scale=1.0, *, deterministic=False,
                         data_format="NCHW"):
    """Gradient of :func:`ps_roi_pool` with respect to its input.

    Args:
        grad_output: ``[K, C_out, PH, PW]`` (NHWC: ``[K, PH, PW, C_out]``).
        boxes: as given to the forward.
        input_shape: ``(N, C, H, W)`` of the forward input (NHWC:
            ``(N, H, W, C)``), C = C_out x PH x PW.
        output_size, spatial_scale: as in the forward.
        deterministic: bitwise reproducible sums, as in
            :func:`curoi.roi_align_backward`.
        data_format: ``"NCHW"`` or ``"NHWC"``.

    Returns:
        ``[N, C, H, W]`` (NHWC: ``[N, H, W, C]``) of grad_output's dtype.
    """
    output_size = _validate.output_size(output_size)
    values = PS_ROI_POOL.values(spatial_scale)
    deterministic = _validate.flag(deterministic, "deterministic")
    return _frontend.backward(PS_ROI_POOL, grad_output, boxes, input_shape,
                              output_size, values, deterministic,
                              _validate.data_format(data_format))


def ps_roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1,
                 *, data_format="NCHW"):
    """Position-sensitive RoI Align, as ``torchvision.ops.ps_roi_align``.

    The input has ``C = C_out x PH x PW`` channels; bin ``(ph, pw)`` of
    output channel ``c`` is RoI Align's bin average over input channel
    ``(c x PH + ph) x PW + pw``.

    Args:
        input, boxes, output_size, spatial_scale, data_format: as in
            :func:`ps_roi_pool`.
        sampling_ratio: samples per bin side; ``<= 0`` means adaptive,
            ``ceil(box size / output size)`` per axis.

    Returns:
        ``[K, C_out, PH, PW]`` (NHWC: ``[K, PH, PW, C_out]``) of the input's
        dtype.

    As torchvision's ps_roi_align, boxes always take the half-pixel shift
    (RoI Align's ``aligned=True``) and have no minimum size. A box of no
    extent with adaptive sampling has no samples: torchvision divides by
    that count of 0 and gives NaN; curoi gives 0, and no gradient.
    """
    ph, pw = _validate.output_size(output_size)
    values = PS_ROI_ALIGN.values(spatial_scale, sampling_ratio)
    return _frontend.forward(PS_ROI_ALIGN, input, boxes, ph, pw, values,
                             _validate.data_format(data_format))


def ps_roi_align_backward(grad_output, boxes, input_shape, output_size,
                          spatial_scale=1.0, sampling_ratio=-1, *,
                          deterministic=False, data_format="NCHW"):
    """Gradient of :func:`ps_roi_align` with respect to its input; the
    arguments are those of :func:`ps_roi_pool_backward` plus
    ``sampling_ratio``."""
    output_size = _validate.output_size(output_size)
    values = PS_ROI_ALIGN.values(spatial_scale, sampling_ratio)
    deterministic = _validate.flag(deterministic, "deterministic")
    return _frontend.backward(PS_ROI_ALIGN, grad_output, boxes, input_shape,
                              output_size, values, deterministic,
                              _validate.data_format(data_format))

"""Spatial pyramid pooling (SPPnet), forward and backward: the public
NumPy/CuPy functions, built from ``curoi._operators.ROI_SPP``."""

from . import _frontend, _operators, _validate
from ._operators import ROI_SPP


def _values(boxes, levels, spatial_scale, mode, convention):
    values = ROI_SPP.values(levels, spatial_scale, mode, convention)
    return _operators.whole_map_values(values) if boxes is None else values


def roi_spp(input, boxes=None, levels=(1, 2, 4), spatial_scale=1.0, *, mode="max",
            convention="torchvision", return_argmax=False, data_format="NCHW"):
    """Spatial pyramid pooling (He et al., SPPnet): for each box, RoI Pool
    over an ``l x l`` grid for each level ``l``, all levels in one launch.

    Args:
        input: features ``[N, C, H, W]`` (NHWC: ``[N, H, W, C]``); any
            array curoi takes (see :func:`curoi.roi_align`).
        boxes: ``[K, 5]`` rows of ``(batch index, x1, y1, x2, y2)``, a list
            of ``[L, 4]`` arrays, one per image, or None: each image's whole
            map (K = N), feature pixels ``0..W-1`` x ``0..H-1`` whatever
            ``spatial_scale`` says (SPPnet's classification form).
        levels: the grid sizes, e.g. ``(1, 2, 4)``: ``sum(l * l)`` bins per
            channel.
        spatial_scale: factor from box to feature coordinates.
        mode: ``"max"`` (each bin's maximum, as :func:`curoi.roi_pool`) or
            ``"avg"`` (each bin's mean over the same pixels; an empty bin
            gives 0).
        convention: where the bins lie, ``"torchvision"`` or ``"mmcv"``, as
            in :func:`curoi.roi_pool`.
        return_argmax: also return, for ``mode="max"``, the flat ``h * W +
            w`` of each maximum in its plane (int32; -1 for an empty bin),
            which :func:`roi_spp_backward` needs; all -1 for ``"avg"``.
        data_format: ``"NCHW"`` or ``"NHWC"`` (the result's layout is the
            same for both).

    Returns:
        ``[K, C x sum(l * l)]`` of the input's dtype: for each box the
        levels' ``[C, l, l]`` blocks in turn, each flattened, so that it
        equals concatenating ``roi_pool(input, boxes, (l, l)).reshape(K,
        -1)`` over the levels (``mode="max"``). With ``return_argmax``, a
        pair ``(result, argmax)``.
    """
    values = _values(boxes, levels, spatial_scale, mode, convention)
    return_argmax = _validate.flag(return_argmax, "return_argmax")
    return _frontend.forward(ROI_SPP, input, boxes, None, None, values,
                             _validate.data_format(data_format),
                             saved_dtypes=("int32",) if return_argmax else None)


def roi_spp_backward(grad_output, boxes, input_shape, levels=(1, 2, 4),
                     spatial_scale=1.0, *, mode="max", convention="torchvision",
                     argmax=None, deterministic=False, data_format="NCHW"):
    """Gradient of :func:`roi_spp` with respect to its input.

    Args:
        grad_output: ``[K, C x sum(l * l)]``, the gradient of the result.
        boxes: as given to :func:`roi_spp` (None: the whole maps).
        input_shape: ``(N, C, H, W)`` of the forward input (NHWC:
            ``(N, H, W, C)``).
        levels, spatial_scale, mode, convention: the forward's.
        argmax: the forward's ``argmax`` (``return_argmax=True``); required
            for ``mode="max"``, whose gradient goes to each bin's maximum.
            Entries outside ``[0, H*W)`` pass nothing. Unused for ``"avg"``,
            which spreads each entry evenly over its bin.
        deterministic: bitwise reproducible sums, as in
            :func:`curoi.roi_align_backward`.
        data_format: ``"NCHW"`` or ``"NHWC"``, as in the forward.

    Returns:
        ``[N, C, H, W]`` (NHWC: ``[N, H, W, C]``) of grad_output's dtype,
        accumulated in float32 (float64 for float64).
    """
    values = _values(boxes, levels, spatial_scale, mode, convention)
    deterministic = _validate.flag(deterministic, "deterministic")
    if values.mode == "max" and argmax is None:
        raise ValueError("argmax is required for mode='max': pass the argmax that "
                         "roi_spp(..., return_argmax=True) returned")
    saved = (argmax,) if argmax is not None and values.mode == "max" else ()
    return _frontend.backward(ROI_SPP, grad_output, boxes, input_shape, None, values,
                              deterministic, _validate.data_format(data_format),
                              saved=saved)

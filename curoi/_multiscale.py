"""Multiscale RoI Align, forward and backward: the public NumPy/CuPy
functions over a feature pyramid, and the checks that ``curoi.torch`` and
``curoi.jax`` share.

The features are a list of levels, not one array, so this operator is not
an :class:`curoi._operators.Operator` (whose front ends take one feature
map); it reuses what those front ends are made of: ``Caller`` for the
arrays, ``_launch`` for dtypes, ``_boxes.to_rois`` for the boxes and the
kernels' wrappers in ``_ops``.
"""

import collections
import math

from . import _boxes, _kernels, _launch, _ops, _validate
from ._frontend import FEATURES, GRAD, SHAPE, layout, nchw
from ._interop import Caller

#: The level rules, as the kernels number them: torchvision's
#: MultiScaleRoIAlign (LevelMapper) and detectron2's ROIPooler.
LEVEL_RULES = tuple(_kernels.MULTISCALE_LEVEL_RULES)

Values = collections.namedtuple(
    "multiscale_roi_align_values",
    "spatial_scales sampling_ratio aligned canonical_scale canonical_level "
    "eps level_rule")

_EXAMPLE = "e.g. [1/4, 1/8, 1/16, 1/32]"


def _fraction(value):
    """A power of two as people write it in a message: 1/16 rather than 0.0625."""
    if 0 < value < 1:
        return f"1/{1 / value:g}"
    return f"{value:g}"


def spatial_scales(value, num_levels, levels_name="features"):
    """The levels' scales, checked: one per level, positive finite powers
    of two, from the finest level to the coarsest, each half the one before
    (the kernels take level ``l`` as stride ``2**(k_min + l)``: a gap would
    send boxes to the wrong map) -> a tuple of floats."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise TypeError(
            f"spatial_scales must be a sequence of numbers, one per level "
            f"({_EXAMPLE}), got {value!r}")
    scales = tuple(value)
    if len(scales) != num_levels:
        raise ValueError(
            f"spatial_scales has {len(scales)} entries but {levels_name} has "
            f"{num_levels} levels: give one scale per level ({_EXAMPLE})")
    checked = []
    for i, scale in enumerate(scales):
        name = f"spatial_scales[{i}]"
        scale = _validate.spatial_scale(scale, name)
        if math.frexp(scale)[0] != 0.5:
            raise ValueError(
                f"{name} must be a power of two (a level's stride 2**k gives "
                f"the scale 2**-k, {_EXAMPLE}), got {scale!r}")
        checked.append(scale)
    for i in range(1, len(checked)):
        before, scale = checked[i - 1], checked[i]
        if scale >= before:
            raise ValueError(
                f"spatial_scales must go from the finest level (the largest "
                f"scale) to the coarsest, {_EXAMPLE}; got spatial_scales[{i - 1}] "
                f"= {_fraction(before)} before spatial_scales[{i}] = {_fraction(scale)}")
        if scale != before / 2:
            raise ValueError(
                f"spatial_scales must halve from one level to the next (a "
                f"pyramid of consecutive strides, {_EXAMPLE}): a box's level "
                f"is its stride's exponent minus the first level's; got "
                f"spatial_scales[{i - 1}] = {_fraction(before)} and "
                f"spatial_scales[{i}] = {_fraction(scale)}")
    return tuple(checked)


def values(scales, num_levels, sampling_ratio, aligned, canonical_scale,
           canonical_level, eps, level_rule, levels_name="features"):
    """Every scalar argument checked, as a (hashable) namedtuple."""
    if not _validate._is_int(canonical_level):
        raise TypeError(f"canonical_level must be an int (the level of a box "
                        f"canonical_scale pixels wide, 4 in FPN), got {canonical_level!r}")
    canonical_level_checked = int(canonical_level)
    if not -4096 <= canonical_level_checked <= 4096:
        raise ValueError(f"canonical_level must be between -4096 and 4096, got "
                         f"{canonical_level_checked}")
    eps_checked = _validate.real(eps, "eps")
    if not math.isfinite(eps_checked):
        raise ValueError(f"eps must be finite, got {eps!r}")
    return Values(
        spatial_scales(scales, num_levels, levels_name),
        _validate.sampling_ratio(sampling_ratio),
        _validate.flag(aligned, "aligned"),
        _validate.spatial_scale(canonical_scale, "canonical_scale"),
        canonical_level_checked,
        eps_checked,
        _validate.choice(level_rule, "level_rule", LEVEL_RULES),
    )


def check_scales_for(v, acc):
    """Each scale (and the canonical scale) must be a positive finite
    number in the arithmetic type."""
    for i, scale in enumerate(v.spatial_scales):
        _validate.scale_for(scale, acc, f"spatial_scales[{i}]")
    _validate.scale_for(v.canonical_scale, acc, "canonical_scale")


def pyramid(features):
    """``features`` must be a non-empty list or tuple (of arrays, checked
    later) -> a list."""
    if not isinstance(features, (list, tuple)):
        raise TypeError(
            f"features must be a list or tuple of arrays, one per pyramid level "
            f"from the finest to the coarsest, got "
            f"{type(features).__module__}.{type(features).__qualname__}")
    if not features:
        raise ValueError("features must hold at least one level, got an empty "
                         f"{type(features).__name__}")
    if len(features) > _kernels.MAX_LEVELS:
        raise ValueError(f"features may hold at most {_kernels.MAX_LEVELS} levels, "
                         f"got {len(features)}")
    return list(features)


def check_level(index, dtype, n, c, first):
    """Level ``index`` (dtype name, N, C) must match level 0's ``first``
    (dtype name, N, C)."""
    if dtype != first[0]:
        raise TypeError(f"features[{index}] has dtype {dtype}, but features[0] has "
                        f"{first[0]}: every level must have one dtype")
    if n != first[1]:
        raise ValueError(f"features[{index}] holds N = {n} images, but features[0] "
                         f"holds N = {first[1]}: every level must hold the same images")
    if c != first[2]:
        raise ValueError(f"features[{index}] has C = {c} channels, but features[0] "
                         f"has C = {first[2]}: every level must have the same channels")


def _level_views(caller, features, channels_last):
    """Kernel views of every level (checked against level 0) and their
    storage dtype name."""
    views, first = [], None
    for i, x in enumerate(features):
        view, dtype = _launch.features(caller, x, f"features[{i}]",
                                       FEATURES[channels_last])
        n, c, _, _ = nchw(view.shape, channels_last)
        if first is None:
            first = (dtype, n, c)
        check_level(i, dtype, n, c, first)
        views.append(view)
    return views, first[0]


def _input_shapes(input_shapes, channels_last):
    """The levels' shapes, checked, in [N, C, H, W] order."""
    if not isinstance(input_shapes, (list, tuple)) or not input_shapes or not all(
            isinstance(s, (list, tuple)) for s in input_shapes):
        raise TypeError(
            f"input_shapes must be a non-empty list of {SHAPE[channels_last]} "
            f"shapes, one per level, got {input_shapes!r}")
    shapes = [nchw(_validate.input_shape(s, f"input_shapes[{i}]", SHAPE[channels_last]),
                   channels_last) for i, s in enumerate(input_shapes)]
    n, c = shapes[0][:2]
    for i, shape in enumerate(shapes[1:], 1):
        if shape[:2] != (n, c):
            raise ValueError(
                f"input_shapes[{i}] has N = {shape[0]} and C = {shape[1]}, but "
                f"input_shapes[0] has N = {n} and C = {c}: every level holds "
                f"the same images and channels")
    return shapes


def multiscale_roi_align(features, boxes, output_size, spatial_scales,
                         sampling_ratio=-1, aligned=False, *, canonical_scale=224,
                         canonical_level=4, eps=1e-6, level_rule="torchvision",
                         data_format="NCHW"):
    """RoI Align over a feature pyramid in one launch: each box is pooled
    from the one level its size selects, as torchvision's
    ``MultiScaleRoIAlign`` and detectron2's ``ROIPooler`` do with one
    ``roi_align`` per level.

    Args:
        features: a list of the levels ``[N, C, H_l, W_l]`` (NHWC:
            ``[N, H_l, W_l, C]``) from the finest to the coarsest, of one
            floating dtype (float16, bfloat16, float32 or float64), on one
            device, with the same N and C; any arrays curoi takes (see
            :func:`curoi.roi_align`).
        boxes: ``[K, 5]`` rows of ``(batch index, x1, y1, x2, y2)``, or a list
            of ``[L, 4]`` arrays, one per image, in input-image coordinates.
            Used in float32 (float64 for float64 features).
        output_size: ``(PH, PW)`` or an int for both.
        spatial_scales: one per level, powers of two, each half the one
            before, e.g. ``[1/4, 1/8, 1/16, 1/32]`` (strides 4 to 32).
        sampling_ratio, aligned: RoI Align's (see :func:`curoi.roi_align`);
            ``aligned=False`` is torchvision's ``MultiScaleRoIAlign``,
            detectron2's ``ROIAlignV2`` pooler is ``aligned=True``.
        canonical_scale, canonical_level: a box ``canonical_scale`` pixels
            wide (the square root of its area) belongs to level
            ``canonical_level`` (stride ``2**canonical_level``): 224 and 4,
            the FPN paper's.
        eps: the rule's tolerance (torchvision 1e-6; detectron2 1e-8).
        level_rule: ``"torchvision"``: level
            ``floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps)``
            (torchvision's ``LevelMapper``), or ``"detectron2"``:
            ``floor(canonical_level + log2(sqrt(area) / canonical_scale + eps))``
            (detectron2's ``assign_boxes_to_levels``); clamped to the
            pyramid's levels ``[-log2(spatial_scales[0]),
            -log2(spatial_scales[-1])]``, in the boxes' arithmetic (float32
            for float32 boxes, as the libraries compute it).
        data_format: ``"NCHW"`` or ``"NHWC"``.

    Returns:
        ``[K, C, PH, PW]`` (NHWC: ``[K, PH, PW, C]``), the boxes in their
        order, of the features' dtype, the caller's kind of array on the
        features' device. Each box's values are :func:`curoi.roi_align`'s on
        its level, to the bit. A box the rule gives no level (a negative
        area; a non-finite corner), like a box with a bad batch index, gives
        zeros; with one level every box is pooled from it.
    """
    ph, pw = _validate.output_size(output_size)
    channels_last = _validate.data_format(data_format)
    features = pyramid(features)
    v = values(spatial_scales, len(features), sampling_ratio, aligned,
               canonical_scale, canonical_level, eps, level_rule)
    caller = Caller(features[0], "features[0]")
    with caller.on_device():
        views, storage = _level_views(caller, features, channels_last)
        acc = _launch.accumulation_dtype(storage)
        check_scales_for(v, acc)
        n, c, _, _ = nchw(views[0].shape, channels_last)
        rois = _boxes.to_rois(boxes, caller, n, acc)
        k = rois.shape[0]
        dtype = _launch.kernel_dtype(caller, storage)
        cast = _launch.cast_back(caller, storage, dtype)
        out, native = caller.new(
            layout(k, c, ph, pw, channels_last), dtype, native=cast is None,
            zeroed=False, what=f"the output {GRAD[channels_last]} (boxes, "
                               f"channels, output_size)")
        _ops.multiscale_roi_align_forward(
            [_launch.as_kernel_input(x, dtype) for x in views], rois, out,
            v.spatial_scales, v.sampling_ratio, v.aligned, v.canonical_scale,
            v.canonical_level, v.eps, v.level_rule, channels_last)
        return caller.result(out, native, cast)


def multiscale_roi_align_backward(grad_output, boxes, input_shapes, output_size,
                                  spatial_scales, sampling_ratio=-1, aligned=False, *,
                                  canonical_scale=224, canonical_level=4, eps=1e-6,
                                  level_rule="torchvision", data_format="NCHW",
                                  deterministic=False):
    """Gradient of :func:`multiscale_roi_align` with respect to every level.

    Args:
        grad_output: ``[K, C, PH, PW]`` (NHWC: ``[K, PH, PW, C]``).
        boxes: as given to the forward.
        input_shapes: the levels' shapes ``(N, C, H_l, W_l)`` (NHWC:
            ``(N, H_l, W_l, C)``), a list with one per level.
        output_size, spatial_scales, sampling_ratio, aligned,
        canonical_scale, canonical_level, eps, level_rule, data_format: as
            in the forward.
        deterministic: bitwise reproducible sums on the GPU too, as in
            :func:`curoi.roi_align_backward` (the CPU's always are).

    Returns:
        A list of gradients, one per level, of ``input_shapes``' shapes and
        grad_output's dtype (accumulated in float32, float64 for float64,
        rounded once), the caller's kind of array. A box sends its gradient
        to its own level only: each level's gradient is
        :func:`curoi.roi_align_backward`'s for the boxes on it.
    """
    ph, pw = _validate.output_size(output_size)
    channels_last = _validate.data_format(data_format)
    shapes = _input_shapes(input_shapes, channels_last)
    v = values(spatial_scales, len(shapes), sampling_ratio, aligned, canonical_scale,
               canonical_level, eps, level_rule, levels_name="input_shapes")
    deterministic = _validate.flag(deterministic, "deterministic")
    n, c = shapes[0][:2]
    caller = Caller(grad_output, "grad_output")
    with caller.on_device():
        g, storage = _launch.features(caller, grad_output, "grad_output",
                                      GRAD[channels_last])
        acc = _launch.accumulation_dtype(storage)
        check_scales_for(v, acc)
        rois = _boxes.to_rois(boxes, caller, n, acc)
        k = rois.shape[0]
        expected = layout(k, c, ph, pw, channels_last)
        if tuple(g.shape) != expected:
            raise ValueError(
                f"grad_output must have shape {GRAD[channels_last]} = {expected} "
                f"from boxes, input_shapes and output_size, got {tuple(g.shape)}")
        dtype = _launch.kernel_dtype(caller, storage)
        cast = _launch.cast_back(caller, storage, acc)
        # Zeroed: a level few boxes land on is mostly zeros, and the OS
        # hands out zero pages lazily.
        made = [caller.new(layout(n, c, h, w, channels_last), acc, native=cast is None,
                           what=f"the gradient of features[{i}] "
                                f"{FEATURES[channels_last]} (input_shapes[{i}])")
                for i, (_, _, h, w) in enumerate(shapes)]
        _ops.multiscale_roi_align_backward(
            _launch.as_kernel_input(g, dtype), rois, [view for view, _ in made],
            v.spatial_scales, v.sampling_ratio, v.aligned, v.canonical_scale,
            v.canonical_level, v.eps, v.level_rule, deterministic, zeroed=True,
            channels_last=channels_last)
        return [caller.result(view, native, cast) for view, native in made]

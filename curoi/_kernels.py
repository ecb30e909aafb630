"""The kernels' C signatures, shared by both backends.

Each kernel is ``<family>_<direction>_<suffix>``, for example
``roi_align_forward_f32``. Arguments are marshalled from the kinds below:
``ptr`` an array, ``i64`` a 64-bit integer, ``i32`` a C int and ``acc`` a
real number in the accumulation type (float for float32 and half precision,
double for float64).
"""

PTR, I64, I32, ACC = "ptr", "i64", "i32", "acc"

_SHAPE = (I64,) * 7  # num_rois, batch, channels, height, width, pooled h, pooled w
# num_levels, num_rois, batch, channels, height, width, bins
_SPP_SHAPE = (I64,) * 7

# Every kernel but the finishing passes (fixed_finish, elementwise, and
# boxes_backward_finish, per box) takes an int channels_last
# after its other scalars: 0 for features [N, C, H, W] and outputs
# [K, C, PH, PW], 1 for [N, H, W, C] and [K, PH, PW, C].
SIGNATURES = {
    # input, rois, shape, spatial_scale, convention, channels_last, argmax_32,
    # output, argmax (may be null; int32 entries with argmax_32 = 1, else int64)
    "roi_pool_forward": (PTR, PTR) + _SHAPE + (ACC, I32, I32, I32, PTR, PTR),
    # grad_output, argmax, rois, shape, channels_last, argmax_32, grad_input
    "roi_pool_backward": (PTR, PTR, PTR) + _SHAPE + (I32, I32, PTR),
    # input, rois, shape, spatial_scale, sampling_ratio, aligned, channels_last,
    # output
    "roi_align_forward": (PTR, PTR) + _SHAPE + (ACC, I32, I32, I32, PTR),
    # grad_output, rois, shape, spatial_scale, sampling_ratio, aligned,
    # channels_last, grad_input
    "roi_align_backward": (PTR, PTR) + _SHAPE + (ACC, I32, I32, I32, PTR),
    # input, rois, shape, spatial_scale, sampling_ratio, aligned, mode,
    # channels_last, output, argmax (may be null)
    "roi_align_max_forward": (PTR, PTR) + _SHAPE + (ACC, I32, I32, I32, I32, PTR, PTR),
    # The interpolated max mode only: grad_output, argmax (the forward's),
    # rois, shape, spatial_scale, sampling_ratio, aligned, channels_last,
    # grad_input
    "roi_align_max_backward": (PTR, PTR, PTR) + _SHAPE + (ACC, I32, I32, I32, PTR),
    # The deterministic backward: as above, then max|grad_output| (one double),
    # the int64 fixed-point sums, and grad_input for non-finite terms.
    "roi_pool_backward_fixed": (PTR, PTR, PTR) + _SHAPE + (I32, I32, PTR, PTR, PTR),
    "roi_align_backward_fixed": (PTR, PTR) + _SHAPE + (ACC, I32, I32, I32, PTR, PTR, PTR),
    "roi_align_max_backward_fixed": (PTR, PTR, PTR) + _SHAPE
    + (ACC, I32, I32, I32, PTR, PTR, PTR),
    # The gradient with respect to the boxes, in two passes (see
    # roi_align_boxes.cuh): grad_output, input, rois, shape, spatial_scale,
    # sampling_ratio, aligned, channels_last, partial ([K, PH*PW, 4] in the
    # accumulation type: each bin's share of d/d(x1, y1, x2, y2))
    "roi_align_boxes_backward": (PTR, PTR, PTR) + _SHAPE + (ACC, I32, I32, I32, PTR),
    # partial, num_rois, bins (PH*PW), grad_rois ([K, 5], 0 in the batch
    # column): each box's bins added in order
    "roi_align_boxes_backward_finish": (PTR, I64, I64, PTR),
    # Spatial pyramid pooling (roi_spp.cu): levels (int64 grid sizes),
    # num_levels, then num_rois, batch, channels, height, width, bins (sum of
    # l*l); outputs [K, C * bins] in either layout.
    # input, rois, levels, num_levels, shape, spatial_scale, convention,
    # mode, channels_last, output, argmax (int32; may be null)
    "roi_spp_forward": (PTR, PTR, PTR) + _SPP_SHAPE + (ACC, I32, I32, I32, PTR, PTR),
    # grad_output, argmax (int32; may be null for avg), rois, levels,
    # num_levels, shape, spatial_scale, convention, mode, channels_last,
    # grad_input
    "roi_spp_backward": (PTR, PTR, PTR, PTR) + _SPP_SHAPE + (ACC, I32, I32, I32, PTR),
    "roi_spp_backward_fixed": (PTR, PTR, PTR, PTR) + _SPP_SHAPE
    + (ACC, I32, I32, I32, PTR, PTR, PTR),
    # fixed, max_abs, terms (K * bins), total (N*C*H*W), grad_input
    "roi_spp_fixed_finish": (PTR, PTR, I64, I64, PTR),
    # fixed, max_abs, terms (K*PH*PW), total (N*C*H*W), grad_input
    "roi_pool_fixed_finish": (PTR, PTR, I64, I64, PTR),
    "roi_align_fixed_finish": (PTR, PTR, I64, I64, PTR),
    "roi_align_max_fixed_finish": (PTR, PTR, I64, I64, PTR),
    # Position-sensitive pooling (ps_roi.cuh): `channels` is the input's C =
    # C_out * PH * PW, outputs [K, C_out, PH, PW] ([K, PH, PW, C_out]).
    # input, rois, shape, spatial_scale, channels_last, output
    "ps_roi_pool_forward": (PTR, PTR) + _SHAPE + (ACC, I32, PTR),
    # grad_output, rois, shape, spatial_scale, channels_last, grad_input
    "ps_roi_pool_backward": (PTR, PTR) + _SHAPE + (ACC, I32, PTR),
    "ps_roi_pool_backward_fixed": (PTR, PTR) + _SHAPE + (ACC, I32, PTR, PTR, PTR),
    # input, rois, shape, spatial_scale, sampling_ratio, channels_last, output
    "ps_roi_align_forward": (PTR, PTR) + _SHAPE + (ACC, I32, I32, PTR),
    # grad_output, rois, shape, spatial_scale, sampling_ratio, channels_last,
    # grad_input
    "ps_roi_align_backward": (PTR, PTR) + _SHAPE + (ACC, I32, I32, PTR),
    "ps_roi_align_backward_fixed": (PTR, PTR) + _SHAPE + (ACC, I32, I32, PTR, PTR, PTR),
    # fixed, max_abs, terms (K: one bin per box reaches an input pixel),
    # total (N*C*H*W), grad_input
    "ps_roi_pool_fixed_finish": (PTR, PTR, I64, I64, PTR),
    "ps_roi_align_fixed_finish": (PTR, PTR, I64, I64, PTR),
    # Rotated boxes [K, 6] (batch index, cx, cy, w, h, angle). input (or
    # grad_output), rois, shape, spatial_scale, sampling_ratio, convention,
    # aligned, clockwise, channels_last, output (or grad_input); the fixed
    # backward then max_abs, fixed, grad_input as above.
    "roi_align_rotated_forward": (PTR, PTR) + _SHAPE + (ACC,) + (I32,) * 5 + (PTR,),
    "roi_align_rotated_backward": (PTR, PTR) + _SHAPE + (ACC,) + (I32,) * 5 + (PTR,),
    "roi_align_rotated_backward_fixed": (PTR, PTR) + _SHAPE + (ACC,) + (I32,) * 5
    + (PTR, PTR, PTR),
    "roi_align_rotated_fixed_finish": (PTR, PTR, I64, I64, PTR),
    # The gradient with respect to the boxes, in two passes (see
    # roi_align_rotated.cu): grad_output, input, rois, shape, spatial_scale,
    # sampling_ratio, convention, aligned, clockwise, channels_last, partial
    # ([K, PH*PW, 5] in the accumulation type: each bin's share of
    # d/d(cx, cy, w, h, angle))
    "roi_align_rotated_boxes_backward": (PTR, PTR, PTR) + _SHAPE + (ACC,) + (I32,) * 5
    + (PTR,),
    # partial, num_rois, bins (PH*PW), grad_rois ([K, 6], 0 in the batch
    # column): each box's bins added in order
    "roi_align_rotated_boxes_backward_finish": (PTR, I64, I64, PTR),
    # Precise RoI Pooling (prroi_pool.cu).
    # input, rois, shape, spatial_scale, channels_last, output
    "prroi_pool_forward": (PTR, PTR) + _SHAPE + (ACC, I32, PTR),
    # grad_output, rois, shape, spatial_scale, channels_last, grad_input
    "prroi_pool_backward": (PTR, PTR) + _SHAPE + (ACC, I32, PTR),
    "prroi_pool_backward_fixed": (PTR, PTR) + _SHAPE + (ACC, I32, PTR, PTR, PTR),
    # fixed, max_abs, terms (K*PH*PW), total (N*C*H*W), grad_input
    "prroi_pool_fixed_finish": (PTR, PTR, I64, I64, PTR),
    # The gradient with respect to the boxes: grad_output, input, rois,
    # shape, spatial_scale, channels_last, grad_rois ([K, 5] in the
    # accumulation type, written entirely: 0 in the batch-index column and
    # for unusable boxes). Deterministic: each box's row is summed by one
    # thread in a fixed order.
    "prroi_pool_boxes_backward": (PTR, PTR, PTR) + _SHAPE + (ACC, I32, PTR),
    # Crop and resize (TensorFlow's tf.image.crop_and_resize,
    # crop_and_resize.cu): boxes [K, 4] (y1, x1, y2, x2) normalised, in the
    # accumulation type, box_indices [K] int32; the shape's pooled h, w are
    # the crop size; image [N, H, W, C] and outputs [K, PH, PW, C] with
    # channels_last = 1 (TF's layout), else [N, C, H, W] and [K, C, PH, PW].
    # image, boxes, box_indices, shape, extrapolation_value, method,
    # channels_last, output
    "crop_and_resize_forward": (PTR, PTR, PTR) + _SHAPE + (ACC, I32, I32, PTR),
    # grad_output, boxes, box_indices, shape, method, channels_last, grad_image
    "crop_and_resize_backward": (PTR, PTR, PTR) + _SHAPE + (I32, I32, PTR),
    "crop_and_resize_backward_fixed": (PTR, PTR, PTR) + _SHAPE
    + (I32, I32, PTR, PTR, PTR),
    # fixed, max_abs, terms (K*PH*PW), total (N*C*H*W), grad_image
    "crop_and_resize_fixed_finish": (PTR, PTR, I64, I64, PTR),
    # The gradient of the boxes, in two passes of fixed order (no atomics):
    # grad_output, image, boxes, box_indices, shape, method, channels_last,
    # partial ([K, PH, PW, 4] in the accumulation type: each bin's share of
    # its box's (dy1, dx1, dy2, dx2))
    "crop_and_resize_boxes_backward": (PTR, PTR, PTR, PTR) + _SHAPE + (I32, I32, PTR),
    # partial, num_boxes, bins (PH*PW), grad_boxes [K, 4]: the bins added in order
    "crop_and_resize_boxes_backward_finish": (PTR, I64, I64, PTR),
    # Multiscale RoI Align (multiscale_roi_align.cu): L pyramid levels, level
    # l [N, C, H_l, W_l] ([N, H_l, W_l, C]), each box pooled from the level
    # its size selects. The level table: `levels` (int64 [L], the addresses
    # of the levels' arrays), sizes (int64 [L, 2]: H_l, W_l), scales ([L],
    # accumulation dtype), num_levels; then rois, num_rois, batch, channels,
    # pooled h, pooled w, sampling_ratio, aligned, canonical_scale (acc),
    # canonical_level, eps (acc), level_rule (MULTISCALE_LEVEL_RULES),
    # channels_last.
    # levels (features), sizes, scales, num_levels, ..., output
    "multiscale_roi_align_forward": (PTR, PTR, PTR, I64, PTR) + (I64,) * 5
    + (I32, I32, ACC, I32, ACC, I32, I32, PTR),
    # grad_output, sizes, scales, num_levels, ..., levels (the gradients,
    # accumulation dtype)
    "multiscale_roi_align_backward": (PTR, PTR, PTR, I64, PTR) + (I64,) * 5
    + (I32, I32, ACC, I32, ACC, I32, I32, PTR),
    # As backward, then max_abs, fixed (int64: every level's N*C*H_l*W_l
    # sums back to back, in level order), levels (the gradients).
    "multiscale_roi_align_backward_fixed": (PTR, PTR, PTR, I64, PTR) + (I64,) * 5
    + (I32, I32, ACC, I32, ACC, I32, I32, PTR, PTR, PTR),
    # fixed, max_abs, terms (K*PH*PW), sizes, num_levels, batch, channels,
    # levels (the gradients)
    "multiscale_roi_align_fixed_finish": (PTR, PTR, I64, PTR, I64, I64, I64, PTR),
}

#: data_format -> the kernels' channels_last argument.
DATA_FORMATS = {"NCHW": 0, "NHWC": 1}

#: Feature dtype name -> kernel suffix. Only float32/float64 exist on the CPU.
SUFFIXES = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16"}
CPU_DTYPES = ("float32", "float64")

#: RoI Align's max modes, as the kernels number them (roi_align_max.cu).
ALIGN_MAX_MODES = {"onnx": 0, "interpolated": 1}

#: Multiscale RoI Align's level rules, as the kernels number them
#: (multiscale_roi_align.cu): torchvision's LevelMapper, floor((lvl0 +
#: log2(s / s0)) + eps), and detectron2's assign_boxes_to_levels,
#: floor(lvl0 + log2(s / s0 + eps)).
MULTISCALE_LEVEL_RULES = {"torchvision": 0, "detectron2": 1}

#: roi_pool conventions, as the kernels number them.
POOL_CONVENTIONS = {"torchvision": 0, "mmcv": 1}

#: Rotated RoI Align conventions, as the kernels number them
#: (roi_align_rotated.cu): detectron2's degrees, mmcv's radians.
ROTATED_CONVENTIONS = {"detectron2": 0, "mmcv": 1}

#: What a spatial pyramid pooling bin gives, as roi_spp.cu numbers it.
SPP_MODES = {"max": 0, "avg": 1}


#: crop_and_resize's interpolation methods, as the kernels number them.
CROP_AND_RESIZE_METHODS = {"bilinear": 0, "nearest": 1}


#: What a kernel does, the last part of its SIGNATURES key. boxes_backward
#: is a gradient with respect to the boxes; boxes_backward_finish completes
#: it where a family computes it in two passes (partial sums per box and
#: bin, then each box's bins added in order).
DIRECTIONS = ("forward", "backward", "backward_fixed", "fixed_finish",
              "boxes_backward", "boxes_backward_finish")


def directions(family: str):
    """The directions a family has kernels for (``roi_align`` does not
    include ``roi_align_max``'s)."""
    return [d for d in DIRECTIONS if f"{family}_{d}" in SIGNATURES]


def kernel_name(family: str, direction: str, dtype_name: str) -> str:
    return f"{family}_{direction}_{SUFFIXES[dtype_name]}"

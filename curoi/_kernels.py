"""The kernels' C signatures, shared by both backends.

Each kernel is ``<family>_<direction>_<suffix>``, for example
``roi_align_forward_f32``. Arguments are marshalled from the kinds below:
``ptr`` an array, ``i64`` a 64-bit integer, ``i32`` a C int, ``acc`` a
real number in the accumulation type (float for float32 and half precision,
double for float64), and a :class:`Struct` a table passed by value.
"""

import dataclasses

import numpy as np

PTR, I64, I32, ACC = "ptr", "i64", "i32", "acc"


@dataclasses.dataclass(frozen=True)
class Struct:
    """A kernel argument passed by value: the C struct ``name`` of the
    kernel sources, whose layout the NumPy structured ``dtype`` mirrors
    (members laid out with no padding, so that no compiler can differ;
    tests/test_kernel_structs.py compares the two). The value is a
    one-element array of that dtype; the GPU backend hands it to CuPy as is,
    the CPU backend as the same bytes through ctypes. A CUDA graph records
    kernel arguments, so a table passed so needs no copy to the device."""

    name: str
    dtype: np.dtype

    def new(self):
        return np.zeros(1, dtype=self.dtype)


#: The most levels a pyramid (multiscale RoI Align) or a spatial pyramid
#: (roi_spp) may have: MULTISCALE_MAX_LEVELS and ROI_SPP_MAX_LEVELS in the
#: kernel sources.
MAX_LEVELS = 16

#: multiscale_roi_align.cu's MultiscaleLevels: each level's array (an
#: address), its (H_l, W_l) and spatial scale (in float and double), and the
#: level count.
MULTISCALE_LEVELS = Struct("MultiscaleLevels", np.dtype([
    ("address", np.int64, (MAX_LEVELS,)),
    ("size", np.int64, (2 * MAX_LEVELS,)),
    ("scale_f32", np.float32, (MAX_LEVELS,)),
    ("scale_f64", np.float64, (MAX_LEVELS,)),
    ("count", np.int64),
]))

#: roi_spp.cu's RoiSppLevels: the grid sizes l and their count.
SPP_LEVELS = Struct("RoiSppLevels", np.dtype([
    ("size", np.int64, (MAX_LEVELS,)),
    ("count", np.int64),
]))

STRUCTS = (MULTISCALE_LEVELS, SPP_LEVELS)

_SHAPE = (I64,) * 7  # num_rois, batch, channels, height, width, pooled h, pooled w
# the levels (SPP_LEVELS), num_rois, batch, channels, height, width, bins
_SPP_SHAPE = (SPP_LEVELS,) + (I64,) * 6

# Every kernel but the finishing passes (fixed_finish, elementwise, and
# boxes_backward_finish, per box) takes an int channels_last
# after its other scalars: 0 for features [N, C, H, W] and outputs
# [K, C, PH, PW], 1 for [N, H, W, C] and [K, PH, PW, C].
SIGNATURES = {
    # input, rois, shape, spatial_scale, convention, channels_last, argmax_32,
    # groups (the GPU loops' channel tiles, _ops.channel_groups), output,
    # argmax (may be null; int32 entries with argmax_32 = 1, else int64)
    "roi_pool_forward": (PTR, PTR) + _SHAPE + (ACC, I32, I32, I32, I64, PTR, PTR),
    # grad_output, argmax, rois, shape, channels_last, argmax_32, grad_input
    "roi_pool_backward": (PTR, PTR, PTR) + _SHAPE + (I32, I32, PTR),
    # input, rois, shape, spatial_scale, sampling_ratio, aligned, channels_last,
    # groups, output
    "roi_align_forward": (PTR, PTR) + _SHAPE + (ACC, I32, I32, I32, I64, PTR),
    # grad_output, rois, shape, spatial_scale, sampling_ratio, aligned,
    # channels_last, groups, grad_input
    "roi_align_backward": (PTR, PTR) + _SHAPE + (ACC, I32, I32, I32, I64, PTR),
    # input, rois, shape, spatial_scale, sampling_ratio, aligned, mode,
    # channels_last, groups, output, argmax (may be null)
    "roi_align_max_forward": (PTR, PTR) + _SHAPE + (ACC, I32, I32, I32, I32, I64, PTR, PTR),
    # The interpolated max mode only: grad_output, argmax (the forward's),
    # rois, shape, spatial_scale, sampling_ratio, aligned, channels_last,
    # groups, grad_input
    "roi_align_max_backward": (PTR, PTR, PTR) + _SHAPE + (ACC, I32, I32, I32, I64, PTR),
    # The deterministic backward: as above, then max|grad_output| (one double),
    # the int64 fixed-point sums, and grad_input for non-finite terms.
    "roi_pool_backward_fixed": (PTR, PTR, PTR) + _SHAPE + (I32, I32, PTR, PTR, PTR),
    "roi_align_backward_fixed": (PTR, PTR) + _SHAPE
    + (ACC, I32, I32, I32, I64, PTR, PTR, PTR),
    "roi_align_max_backward_fixed": (PTR, PTR, PTR) + _SHAPE
    + (ACC, I32, I32, I32, I64, PTR, PTR, PTR),
    # The gradient with respect to the boxes, in two passes (see
    # roi_align_boxes.cuh): grad_output, input, rois, shape, spatial_scale,
    # sampling_ratio, aligned, channels_last, partial ([K, PH*PW, 4] in the
    # accumulation type: each bin's share of d/d(x1, y1, x2, y2))
    "roi_align_boxes_backward": (PTR, PTR, PTR) + _SHAPE + (ACC, I32, I32, I32, PTR),
    # partial, num_rois, bins (PH*PW), grad_rois ([K, 5], 0 in the batch
    # column): each box's bins added in order
    "roi_align_boxes_backward_finish": (PTR, I64, I64, PTR),
    # Spatial pyramid pooling (roi_spp.cu): the levels (SPP_LEVELS: the
    # grid sizes), then num_rois, batch, channels, height, width, bins (sum
    # of l*l); outputs [K, C * bins] in either layout.
    # input, rois, levels, shape, spatial_scale, convention, mode,
    # channels_last, output, argmax (int32; may be null)
    "roi_spp_forward": (PTR, PTR) + _SPP_SHAPE + (ACC, I32, I32, I32, PTR, PTR),
    # grad_output, argmax (int32; may be null for avg), rois, levels, shape,
    # spatial_scale, convention, mode, channels_last, grad_input
    "roi_spp_backward": (PTR, PTR, PTR) + _SPP_SHAPE + (ACC, I32, I32, I32, PTR),
    "roi_spp_backward_fixed": (PTR, PTR, PTR) + _SPP_SHAPE
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
    "ps_roi_pool_forward": (PTR, PTR) + _SHAPE + (ACC, I32, I64, PTR),
    # grad_output, rois, shape, spatial_scale, channels_last, grad_input
    "ps_roi_pool_backward": (PTR, PTR) + _SHAPE + (ACC, I32, I64, PTR),
    "ps_roi_pool_backward_fixed": (PTR, PTR) + _SHAPE + (ACC, I32, I64, PTR, PTR, PTR),
    # input, rois, shape, spatial_scale, sampling_ratio, channels_last,
    # groups, output
    "ps_roi_align_forward": (PTR, PTR) + _SHAPE + (ACC, I32, I32, I64, PTR),
    # grad_output, rois, shape, spatial_scale, sampling_ratio, channels_last,
    # groups, grad_input
    "ps_roi_align_backward": (PTR, PTR) + _SHAPE + (ACC, I32, I32, I64, PTR),
    "ps_roi_align_backward_fixed": (PTR, PTR) + _SHAPE
    + (ACC, I32, I32, I64, PTR, PTR, PTR),
    # fixed, max_abs, terms (K: one bin per box reaches an input pixel),
    # total (N*C*H*W), grad_input
    "ps_roi_pool_fixed_finish": (PTR, PTR, I64, I64, PTR),
    "ps_roi_align_fixed_finish": (PTR, PTR, I64, I64, PTR),
    # Rotated boxes [K, 6] (batch index, cx, cy, w, h, angle). input (or
    # grad_output), rois, shape, spatial_scale, sampling_ratio, convention,
    # aligned, clockwise, channels_last, groups, output (or grad_input); the
    # fixed backward then max_abs, fixed, grad_input as above.
    "roi_align_rotated_forward": (PTR, PTR) + _SHAPE + (ACC,) + (I32,) * 5 + (I64, PTR),
    "roi_align_rotated_backward": (PTR, PTR) + _SHAPE + (ACC,) + (I32,) * 5 + (I64, PTR),
    "roi_align_rotated_backward_fixed": (PTR, PTR) + _SHAPE + (ACC,) + (I32,) * 5
    + (I64, PTR, PTR, PTR),
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
    # input, rois, shape, spatial_scale, channels_last, groups, output
    "prroi_pool_forward": (PTR, PTR) + _SHAPE + (ACC, I32, I64, PTR),
    # grad_output, rois, shape, spatial_scale, channels_last, groups,
    # grad_input
    "prroi_pool_backward": (PTR, PTR) + _SHAPE + (ACC, I32, I64, PTR),
    "prroi_pool_backward_fixed": (PTR, PTR) + _SHAPE + (ACC, I32, I64, PTR, PTR, PTR),
    # fixed, max_abs, terms (K*PH*PW), total (N*C*H*W), grad_input
    "prroi_pool_fixed_finish": (PTR, PTR, I64, I64, PTR),
    # The gradient with respect to the boxes: grad_output, input, rois,
    # shape, spatial_scale, channels_last, grad_rois ([K, 5] in the
    # accumulation type, written entirely: 0 in the batch-index column and
    # for unusable boxes). Deterministic: each box's row is summed by one
    # thread in a fixed order.
    "prroi_pool_boxes_backward": (PTR, PTR, PTR) + _SHAPE + (ACC, I32, PTR),
    # Crop and resize (TensorFlow's tf.image.crop_and_resize,
    # crop_and_resize.cu): rois [K, 5] (box index, y1, x1, y2, x2), the
    # corners normalised, in the accumulation type; the shape's pooled h, w
    # are the crop size; image [N, H, W, C] and outputs [K, PH, PW, C] with
    # channels_last = 1 (TF's layout), else [N, C, H, W] and [K, C, PH, PW].
    # image, rois, shape, extrapolation_value, method, channels_last, groups,
    # output
    "crop_and_resize_forward": (PTR, PTR) + _SHAPE + (ACC, I32, I32, I64, PTR),
    # grad_output, rois, shape, method, channels_last, groups, grad_image
    "crop_and_resize_backward": (PTR, PTR) + _SHAPE + (I32, I32, I64, PTR),
    "crop_and_resize_backward_fixed": (PTR, PTR) + _SHAPE + (I32, I32, I64, PTR, PTR, PTR),
    # fixed, max_abs, terms (K*PH*PW), total (N*C*H*W), grad_image
    "crop_and_resize_fixed_finish": (PTR, PTR, I64, I64, PTR),
    # The gradient of the boxes, in two passes of fixed order (no atomics):
    # grad_output, image, rois, shape, method, channels_last, partial
    # ([K, PH, PW, 4] in the accumulation type: each bin's share of its box's
    # (dy1, dx1, dy2, dx2))
    "crop_and_resize_boxes_backward": (PTR, PTR, PTR) + _SHAPE + (I32, I32, PTR),
    # partial, num_boxes, bins (PH*PW), grad_rois [K, 5]: the bins added in
    # order, 0 in the box-index column
    "crop_and_resize_boxes_backward_finish": (PTR, I64, I64, PTR),
    # Multiscale RoI Align (multiscale_roi_align.cu): L pyramid levels, level
    # l [N, C, H_l, W_l] ([N, H_l, W_l, C]), each box pooled from the level
    # its size selects. The levels (MULTISCALE_LEVELS: the addresses of the
    # levels' features, or gradients, their sizes and scales); then rois,
    # num_rois, batch, channels, pooled h, pooled w, sampling_ratio, aligned,
    # canonical_scale (acc), canonical_level, eps (acc), level_rule
    # (MULTISCALE_LEVEL_RULES), channels_last, groups.
    # levels (features), ..., output
    "multiscale_roi_align_forward": (MULTISCALE_LEVELS, PTR) + (I64,) * 5
    + (I32, I32, ACC, I32, ACC, I32, I32, I64, PTR),
    # grad_output, levels (the gradients, accumulation dtype), ...
    "multiscale_roi_align_backward": (PTR, MULTISCALE_LEVELS, PTR) + (I64,) * 5
    + (I32, I32, ACC, I32, ACC, I32, I32, I64),
    # As backward, then max_abs, fixed (int64: every level's N*C*H_l*W_l
    # sums back to back, in level order).
    "multiscale_roi_align_backward_fixed": (PTR, MULTISCALE_LEVELS, PTR) + (I64,) * 5
    + (I32, I32, ACC, I32, ACC, I32, I32, I64, PTR, PTR),
    # fixed, max_abs, terms (K*PH*PW), levels (the gradients), batch, channels
    "multiscale_roi_align_fixed_finish": (PTR, PTR, I64, MULTISCALE_LEVELS, I64, I64),
    # The deterministic backward's scale (fixed_point.cu): values (a
    # gradient of any kernel dtype), count, max_abs (one double, 0 before
    # the launch; max |finite value| after it).
    "fixed_point_scale": (PTR, I64, PTR),
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
#: bin, then each box's bins added in order); scale is the fixed-point
#: sums' scale (the fixed_point family, shared by every deterministic
#: backward).
DIRECTIONS = ("forward", "backward", "backward_fixed", "fixed_finish",
              "boxes_backward", "boxes_backward_finish", "scale")


def directions(family: str):
    """The directions a family has kernels for (``roi_align`` does not
    include ``roi_align_max``'s)."""
    return [d for d in DIRECTIONS if f"{family}_{d}" in SIGNATURES]


def kernel_name(family: str, direction: str, dtype_name: str) -> str:
    return f"{family}_{direction}_{SUFFIXES[dtype_name]}"

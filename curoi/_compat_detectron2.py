"""``curoi.torch.compat.detectron2``: detectron2's RoI layers by their names,
on curoi's operators::

    from curoi.torch.compat.detectron2 import ROIAlign, ROIAlignRotated, ROIPooler
    # was: from detectron2.layers import ROIAlign, ROIAlignRotated
    #      from detectron2.modeling.poolers import ROIPooler

- :func:`roi_align`: detectron2's functional ``roi_align``, which is
  torchvision's (``aligned=False`` by default); :func:`curoi.torch.roi_align`.
  :func:`roi_align_rotated`: its functional rotated one.
- :class:`ROIAlign` ``(output_size, spatial_scale, sampling_ratio,
  aligned=True)``: ``forward(input, rois)`` with ``rois`` ``[K, 5]`` of
  ``(batch index, x1, y1, x2, y2)``, cast to the features' dtype and the
  features dequantized first, as detectron2's.
- :class:`ROIAlignRotated` ``(output_size, spatial_scale, sampling_ratio)``:
  ``rois`` ``[K, 6]`` of ``(batch index, centre x, centre y, width, height,
  angle)``, the angle in degrees, counter-clockwise; float16 runs in
  float32 and is cast back, as detectron2's.
- :class:`ROIPooler` and :func:`assign_boxes_to_levels`: FPN box-level
  pooling with detectron2's level rule, in one launch of the multiscale
  kernel for ``"ROIAlign"`` / ``"ROIAlignV2"`` (see :class:`ROIPooler`).

None of them gives the boxes a gradient, as detectron2's. Every module
compiles with ``torch.jit.script``, traces with ``torch.jit.trace`` and is
one node under ``torch.fx.symbolic_trace``.
"""

import math
from typing import List, Tuple

import torch
import torch.fx
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2

from . import torch as ct

__all__ = ["roi_align", "ROIAlign", "roi_align_rotated", "ROIAlignRotated", "ROIPooler",
           "ROIPoolerError", "assign_boxes_to_levels", "convert_boxes_to_pooler_format"]

#: detectron2's functional roi_align is torchvision's.
roi_align = ct.roi_align


def roi_align_rotated(input: Tensor, roi: Tensor, output_size: BroadcastingList2[int],
                      spatial_scale: float, sampling_ratio: int) -> Tensor:
    """detectron2's functional ``roi_align_rotated``
    (``detectron2.layers.roi_align_rotated``): ``roi`` ``[K, 6]``, the angle
    in degrees, counter-clockwise; the features' dtype as it is (the module
    :class:`ROIAlignRotated` runs float16 in float32)."""
    return ct.roi_align_rotated(input, roi, output_size, spatial_scale, sampling_ratio,
                                "detectron2")


POOLER_TYPES = ("ROIAlign", "ROIAlignV2", "ROIPool", "ROIAlignRotated")


def _check_rois(rois, columns):
    """detectron2 asserts the rois' shape; curoi.torch's BoxesShapeError is
    that AssertionError, with the layout in its message."""
    if not isinstance(rois, Tensor):
        raise ct.BoxesTypeError(f"rois must be a torch.Tensor, got {type(rois).__name__}")
    if rois.dim() != 2 or rois.shape[1] != columns:
        row = ct._BOX if columns == 5 else ct._ROTATED_BOX
        raise ct.BoxesShapeError(
            f"rois must be a [K, {columns}] tensor of {row}, got shape {tuple(rois.shape)}")


@torch.fx.wrap
def _roi_align_layer(input: Tensor, rois: Tensor, output_size: BroadcastingList2[int],
                     spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    """detectron2's ``ROIAlign.forward``: quantized features dequantized,
    the rois cast to the features' dtype, torchvision's roi_align."""
    if not torch.jit.is_scripting():
        node = ct._fx_node(_roi_align_layer, input, rois, output_size, spatial_scale,
                           sampling_ratio, aligned)
        if node is not None:
            return node
        _check_rois(rois, 5)
    else:
        torch._assert(rois.dim() == 2 and rois.size(1) == 5,
                      "rois must be a [K, 5] tensor of (batch index, x1, y1, x2, y2)")
    if input.is_quantized:
        input = input.dequantize()
    return ct.roi_align(input, rois.to(dtype=input.dtype), output_size, spatial_scale,
                        sampling_ratio, aligned)


@torch.fx.wrap
def _roi_align_rotated_layer(input: Tensor, rois: Tensor,
                             output_size: BroadcastingList2[int], spatial_scale: float,
                             sampling_ratio: int) -> Tensor:
    """detectron2's ``ROIAlignRotated.forward``: float16 computed in float32
    and cast back; angles in degrees."""
    if not torch.jit.is_scripting():
        node = ct._fx_node(_roi_align_rotated_layer, input, rois, output_size,
                           spatial_scale, sampling_ratio)
        if node is not None:
            return node
        _check_rois(rois, 6)
    else:
        torch._assert(rois.dim() == 2 and rois.size(1) == 6,
                      "rois must be a [K, 6] tensor of (batch index, centre x, "
                      "centre y, width, height, angle)")
    dtype = input.dtype
    if dtype == torch.float16:
        input = input.float()
        rois = rois.float()
    return ct.roi_align_rotated(input, rois, output_size, spatial_scale, sampling_ratio,
                                "detectron2").to(dtype=dtype)


class ROIAlign(nn.Module):
    """detectron2's ``ROIAlign``: RoI Align with ``aligned=True`` by default
    (torchvision's ``RoIAlign`` defaults to False). ``sampling_ratio`` 0
    (or any value <= 0) samples adaptively, ``ceil(box size / output
    size)`` per axis.

    ``forward(input, rois)``: ``input`` ``[N, C, H, W]`` (float, or
    quantized: dequantized first), ``rois`` ``[K, 5]`` of ``(batch index,
    x1, y1, x2, y2)`` in input-image coordinates, cast to ``input``'s dtype
    as detectron2 does. Returns ``[K, C, PH, PW]``; the boxes get no
    gradient.
    """

    def __init__(self, output_size: BroadcastingList2[int], spatial_scale: float,
                 sampling_ratio: int, aligned: bool = True):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        return _roi_align_layer(input, rois, self.output_size, self.spatial_scale,
                                self.sampling_ratio, self.aligned)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, "
                f"spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})")


class ROIAlignRotated(nn.Module):
    """detectron2's ``ROIAlignRotated``: RoI Align on rotated boxes, pixel
    centres at half-integers (the 0.5 shift always on), the angle in
    degrees, counter-clockwise.

    ``forward(input, rois)``: ``rois`` ``[K, 6]`` of ``(batch index, centre
    x, centre y, width, height, angle)``. float16 features are computed in
    float32 and the result cast back, as detectron2's. The boxes get no
    gradient.
    """

    def __init__(self, output_size: BroadcastingList2[int], spatial_scale: float,
                 sampling_ratio: int):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        return _roi_align_rotated_layer(input, rois, self.output_size,
                                        self.spatial_scale, self.sampling_ratio)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, "
                f"spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio})")


# ------------------------------------------------------------------ ROIPooler
class ROIPoolerError(ValueError, AssertionError):
    """What detectron2's ROIPooler asserts on (scales that are not a pyramid
    of powers of two, a canonical box size <= 0, as many maps as scales and
    box lists as images): a ``ValueError`` that is also detectron2's
    ``AssertionError``."""


def _box_tensors(box_lists):
    """detectron2's ``Boxes`` / ``RotatedBoxes`` (anything with a
    ``.tensor``) as their tensors; tensors as they are."""
    if not isinstance(box_lists, (list, tuple)):
        raise TypeError(f"box_lists must be a list of boxes, one per image, got "
                        f"{type(box_lists).__name__}")
    tensors = []
    for i, boxes in enumerate(box_lists):
        boxes = getattr(boxes, "tensor", boxes)
        if not isinstance(boxes, Tensor):
            raise ct.BoxesTypeError(
                f"box_lists[{i}] must be a torch.Tensor (or a detectron2 Boxes / "
                f"RotatedBoxes), got {type(boxes).__name__}")
        if boxes.dim() != 2 or boxes.shape[1] not in (4, 5):
            raise ct.BoxesShapeError(
                f"box_lists[{i}] must be a [L, 4] tensor of (x1, y1, x2, y2) or a "
                f"[L, 5] tensor of rotated boxes (centre x, centre y, width, height, "
                f"angle), got shape {tuple(boxes.shape)}")
        tensors.append(boxes)
    return tensors


def _areas(boxes: Tensor) -> Tensor:
    """detectron2's ``Boxes.area()`` (x1, y1, x2, y2) and
    ``RotatedBoxes.area()`` (width x height), in the boxes' dtype."""
    if boxes.size(1) == 5:
        return boxes[:, 2] * boxes[:, 3]
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def assign_boxes_to_levels(box_lists: List[Tensor], min_level: int, max_level: int,
                           canonical_box_size: float, canonical_level: int) -> Tensor:
    """detectron2's level rule (FPN eq. 1) for the boxes of every image in
    turn: ``floor(canonical_level + log2(sqrt(area) / canonical_box_size +
    1e-8))`` clamped to ``[min_level, max_level]``, computed in the boxes'
    dtype, minus ``min_level`` -> an int64 tensor of level indices, -1 for
    a box of negative area (a NaN size; detectron2 converts the NaN to int64,
    which gives a platform's arbitrary value).

    ``box_lists``: a list of ``[L, 4]`` (x1, y1, x2, y2) or ``[L, 5]``
    rotated boxes (their area is width x height), or of detectron2
    ``Boxes`` / ``RotatedBoxes``; :class:`ROIPooler` gives a box with no
    level zeros.
    """
    if not torch.jit.is_scripting():
        box_lists = _box_tensors(box_lists)
    sizes = torch.sqrt(torch.cat([_areas(b) for b in box_lists]))
    # (1e-8: detectron2's eps, written out: TorchScript reads no float globals.)
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_box_size + 1e-8))
    levels = torch.clamp(levels, min=min_level, max=max_level)
    # No level (a NaN size) is -1 on every platform; converting NaN to
    # int64, as detectron2 does, gives whatever the CPU gives.
    levels = torch.where(torch.isnan(levels), torch.full_like(levels, min_level - 1),
                         levels)
    return levels.to(torch.int64) - min_level


def convert_boxes_to_pooler_format(box_lists: List[Tensor]) -> Tensor:
    """The boxes of every image as one ``[K, 5]`` (``[K, 6]`` rotated)
    tensor with the image's index first, in the boxes' dtype, as
    detectron2's function of that name."""
    if not torch.jit.is_scripting():
        box_lists = _box_tensors(box_lists)
    parts: List[Tensor] = []
    for i, b in enumerate(box_lists):
        parts.append(torch.cat([torch.full_like(b[:, :1], float(i)), b], 1))
    return torch.cat(parts, 0)


def _level_pool(x: Tensor, rois: Tensor, output_size: List[int], scale: float,
                sampling_ratio: int, pooler_type: str) -> Tensor:
    """One level's pooler, as detectron2 builds it for ``pooler_type``."""
    if pooler_type == "ROIPool":
        return ct.roi_pool(x, rois, output_size, scale)
    if pooler_type == "ROIAlignRotated":
        return _roi_align_rotated_layer(x, rois, output_size, scale, sampling_ratio)
    return _roi_align_layer(x, rois, output_size, scale, sampling_ratio,
                            pooler_type == "ROIAlignV2")


def _one_launch(x: List[Tensor], boxes: List[Tensor], pooler_type: str) -> bool:
    """Whether the multiscale kernel gives detectron2's numbers: RoI Align,
    float32 or float64 features, and boxes of the features' dtype (the
    kernel computes the levels and samples in the features' accumulation
    type; detectron2 computes the levels in the boxes' dtype and samples at
    the boxes cast to the features')."""
    if pooler_type != "ROIAlign" and pooler_type != "ROIAlignV2":
        return False
    dtype = x[0].dtype
    if dtype != torch.float32 and dtype != torch.float64:
        return False
    for b in boxes:
        if b.dtype != dtype:
            return False
    return True


def _checked(x, box_lists, scales, pooler_type):
    """ROIPooler's arguments, checked as detectron2 asserts them (with
    messages that say what to give) -> the boxes as tensors."""
    if not isinstance(x, list) or not isinstance(box_lists, list):
        raise TypeError(f"x and box_lists must be lists (of feature maps and of "
                        f"each image's boxes), got {type(x).__name__} and "
                        f"{type(box_lists).__name__}")
    if len(x) != len(scales):
        raise ROIPoolerError(f"x holds {len(x)} feature maps but the pooler has "
                             f"{len(scales)} scales {scales}: give one map per level")
    if not x or not isinstance(x[0], Tensor) or x[0].dim() != 4:
        raise TypeError("x must hold [N, C, H, W] feature maps")
    if len(box_lists) != x[0].size(0):
        raise ROIPoolerError(f"box_lists holds boxes for {len(box_lists)} images but "
                             f"x[0] holds N = {x[0].size(0)}: give one entry per image")
    tensors = _box_tensors(box_lists)
    columns = 5 if pooler_type == "ROIAlignRotated" else 4
    for i, b in enumerate(tensors):
        if b.shape[1] != columns:
            what = ("rotated boxes (centre x, centre y, width, height, angle)"
                    if columns == 5 else "boxes (x1, y1, x2, y2)")
            raise ct.BoxesShapeError(
                f"box_lists[{i}] must be [L, {columns}] {what} for pooler_type "
                f"{pooler_type!r}, got shape {tuple(b.shape)}")
    return tensors


@torch.fx.wrap
def _pool(x: List[Tensor], box_lists: List[Tensor], output_size: List[int],
          scales: List[float], sampling_ratio: int, pooler_type: str,
          canonical_box_size: float, canonical_level: int, min_level: int,
          max_level: int) -> Tensor:
    """:class:`ROIPooler`'s forward as a function of its settings."""
    if not torch.jit.is_scripting():
        node = ct._fx_node(_pool, x, box_lists, output_size, scales, sampling_ratio,
                           pooler_type, canonical_box_size, canonical_level, min_level,
                           max_level)
        if node is not None:
            return node
        box_lists = _checked(x, box_lists, scales, pooler_type)
    else:
        torch._assert(len(x) == len(scales), "x must hold one feature map per level")
        torch._assert(len(box_lists) == x[0].size(0),
                      "box_lists must hold one entry per image of x[0]")
    ph, pw = output_size[0], output_size[1]
    if len(box_lists) == 0:
        return torch.zeros([0, x[0].size(1), ph, pw], dtype=x[0].dtype,
                           device=x[0].device)
    if _one_launch(x, box_lists, pooler_type):
        return ct.multiscale_roi_align(x, box_lists, output_size, scales, sampling_ratio,
                                       pooler_type == "ROIAlignV2",
                                       float(canonical_box_size), canonical_level,
                                       1e-8, "detectron2", "NCHW")
    rois = convert_boxes_to_pooler_format(box_lists)
    if len(scales) == 1:
        return _level_pool(x[0], rois, output_size, scales[0], sampling_ratio,
                           pooler_type)
    levels = assign_boxes_to_levels(box_lists, min_level, max_level, canonical_box_size,
                                    canonical_level)
    indices: List[Tensor] = []
    pooled: List[Tensor] = []
    for level in range(len(scales)):
        inds = torch.nonzero(levels == level)[:, 0]
        indices.append(inds)
        pooled.append(_level_pool(x[level], rois[inds], output_size, scales[level],
                                  sampling_ratio, pooler_type))
    # A box with no level (a NaN size) stays 0, as in detectron2.
    output = torch.zeros([rois.size(0), pooled[0].size(1), ph, pw], dtype=pooled[0].dtype,
                         device=pooled[0].device)
    for inds, values in zip(indices, pooled):
        output = output.index_copy(0, inds, values)
    return output


class ROIPooler(nn.Module):
    """detectron2's ``ROIPooler``: each box pooled from the feature map its
    size selects.

    Args:
        output_size: ``int`` or ``(PH, PW)``.
        scales: one per map, ``1 / stride``, powers of two halving from the
            finest map to the coarsest, e.g. ``[1/4, 1/8, 1/16, 1/32]``.
        sampling_ratio: RoI Align's (``0``: adaptive).
        pooler_type: ``"ROIAlign"`` (``aligned=False``), ``"ROIAlignV2"``
            (``aligned=True``), ``"ROIPool"`` (torchvision's RoI Pool) or
            ``"ROIAlignRotated"`` (detectron2's, boxes ``[L, 5]`` with the
            angle in degrees).
        canonical_box_size, canonical_level: a box ``canonical_box_size``
            pixels wide (the square root of its area) goes to level
            ``canonical_level`` (224 and 4); see :func:`assign_boxes_to_levels`.

    ``forward(x, box_lists)``: ``x`` a list of ``[N, C, H_l, W_l]`` maps,
    ``box_lists`` a list of N ``[L_i, 4]`` tensors (``[L_i, 5]`` rotated) or
    detectron2 ``Boxes`` / ``RotatedBoxes``, in input-image coordinates.
    Returns ``[sum L_i, C, PH, PW]``, the boxes in their order;
    differentiable with respect to every map (the boxes get no gradient).

    ``"ROIAlign"`` and ``"ROIAlignV2"`` on float32 or float64 maps with
    boxes of the same dtype run as one launch of the multiscale kernel
    (:func:`curoi.torch.multiscale_roi_align` with
    ``level_rule="detectron2"``, ``eps=1e-8``): the same levels, computed in
    the same dtype, and the numbers of RoI Align on each box's level.
    Everything else (``"ROIPool"``, ``"ROIAlignRotated"``, half-precision
    maps, boxes of another dtype) runs one operator call per level with
    detectron2's dtype handling, as detectron2 does.

    ``torch.jit.script`` compiles a forward that takes ``box_lists`` as a
    ``List[Boxes]`` where detectron2 is installed (as detectron2's scripted
    pooler), as a ``List[Tensor]`` elsewhere.
    """

    def __init__(self, output_size, scales, sampling_ratio, pooler_type,
                 canonical_box_size=224, canonical_level=4):
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        if (len(output_size) != 2 or not isinstance(output_size[0], int)
                or not isinstance(output_size[1], int)):
            raise ROIPoolerError(f"output_size must be an int or two ints, got "
                                 f"{output_size}")
        if pooler_type not in POOLER_TYPES:
            raise ValueError(f"Unknown pooler type: {pooler_type} (pooler_type must be "
                             f"one of {', '.join(POOLER_TYPES)})")
        scales = [float(s) for s in scales]
        if not scales or not all(s > 0 and math.isfinite(s) for s in scales):
            raise ROIPoolerError(f"scales must be positive (1 / stride per map), got "
                                 f"{scales}")
        min_level, max_level = -math.log2(scales[0]), -math.log2(scales[-1])
        if not (math.isclose(min_level, int(min_level))
                and math.isclose(max_level, int(max_level))):
            raise ROIPoolerError(f"Featuremap stride is not power of 2! scales {scales}")
        self.min_level, self.max_level = int(min_level), int(max_level)
        if len(scales) != self.max_level - self.min_level + 1 or not all(
                math.isclose(b, a / 2) for a, b in zip(scales, scales[1:])):
            raise ROIPoolerError(f"Sizes of input featuremaps do not form a pyramid! "
                                 f"scales {scales} must halve from map to map")
        if not 0 <= self.min_level <= self.max_level:
            raise ROIPoolerError(f"scales must be at most 1 and go from the finest map "
                                 f"to the coarsest, got {scales}")
        if not canonical_box_size > 0:
            raise ROIPoolerError(f"canonical_box_size must be > 0, got "
                                 f"{canonical_box_size}")
        self.output_size: Tuple[int, int] = (output_size[0], output_size[1])
        self.scales: List[float] = scales
        self.sampling_ratio: int = int(sampling_ratio)
        self.pooler_type: str = pooler_type
        self.canonical_box_size: float = float(canonical_box_size)
        self.canonical_level: int = int(canonical_level)

    def forward(self, x: List[Tensor], box_lists: List[Tensor]) -> Tensor:
        return _pool(x, box_lists, [self.output_size[0], self.output_size[1]],
                     self.scales, self.sampling_ratio, self.pooler_type,
                     self.canonical_box_size, self.canonical_level, self.min_level,
                     self.max_level)

    def __prepare_scriptable__(self):
        # torch.jit.script asks this first. Where detectron2 is installed,
        # the scripted pooler takes List[Boxes], as detectron2's does.
        global _Detectron2Boxes
        try:
            from detectron2.structures import Boxes
        except ImportError:
            return self
        _Detectron2Boxes = Boxes
        return _ROIPoolerOfBoxes(self)


# detectron2's Boxes, once a ROIPooler has been scripted where it is
# installed: _ROIPoolerOfBoxes's annotation names it.
_Detectron2Boxes = None


class _ROIPoolerOfBoxes(nn.Module):
    """:class:`ROIPooler` as TorchScript compiles it where detectron2 is
    installed: ``box_lists`` a ``List[Boxes]``."""

    def __init__(self, pooler: ROIPooler):
        super().__init__()
        for name in ("output_size", "scales", "sampling_ratio", "pooler_type",
                     "canonical_box_size", "canonical_level", "min_level", "max_level"):
            setattr(self, name, getattr(pooler, name))

    def forward(self, x: List[Tensor], box_lists: "List[_Detectron2Boxes]") -> Tensor:
        return _pool(x, [b.tensor for b in box_lists],
                     [self.output_size[0], self.output_size[1]], self.scales,
                     self.sampling_ratio, self.pooler_type, self.canonical_box_size,
                     self.canonical_level, self.min_level, self.max_level)

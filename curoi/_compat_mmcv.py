"""``curoi.torch.compat.mmcv``: mmcv's RoI operators by their names, with
mmcv's argument names, orders and defaults, on curoi's operators::

    from curoi.torch.compat.mmcv import RoIAlign, RoIPool, RoIAlignRotated, PrRoIPool
    # was: from mmcv.ops import RoIAlign, RoIPool, RoIAlignRotated, PrRoIPool

- :func:`roi_align` / :class:`RoIAlign` ``(output_size, spatial_scale=1.0,
  sampling_ratio=0, pool_mode='avg', aligned=True, use_torchvision=False)``:
  ``rois`` ``[K, 5]`` of ``(batch index, x1, y1, x2, y2)``; sampling ratio
  ``<= 0`` adaptive (``ceil(box size / output size)``); ``pool_mode='max'``
  the largest interpolated sample of each bin; ``aligned=True`` the
  half-pixel shift, ``False`` the legacy boxes widened to one pixel;
  ``use_torchvision=True`` torchvision's roi_align (average, whatever
  ``pool_mode`` says), as mmcv's.
- :func:`roi_pool` / :class:`RoIPool` ``(output_size, spatial_scale=1.0)``:
  mmcv's RoI Pool (continuous corners ``x1*s``, ``(x2+1)*s``).
- :func:`roi_align_rotated` / :class:`RoIAlignRotated` ``(output_size,
  spatial_scale, sampling_ratio=0, aligned=True, clockwise=False)``: ``rois``
  ``[K, 6]`` of ``(batch index, centre x, centre y, width, height, angle)``,
  the angle in radians, counter-clockwise unless ``clockwise``.
- :func:`prroi_pool` / :class:`PrRoIPool` ``(output_size,
  spatial_scale=1.0)``: Precise RoI Pooling, with the boxes' gradient.

The modules take mmcv's older keyword names ``out_size`` and ``sample_num``
(with a ``DeprecationWarning``, as mmcv), compile with ``torch.jit.script``
(mmcv's do not), trace with ``torch.jit.trace`` and are one node under
``torch.fx.symbolic_trace``. Only
``prroi_pool`` gives the boxes a gradient, as in mmcv.
"""

import functools
import warnings
from typing import List, Union

from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2
from torch.nn.modules.utils import _pair

from . import torch as ct

__all__ = ["roi_align", "RoIAlign", "roi_pool", "RoIPool", "roi_align_rotated",
           "RoIAlignRotated", "prroi_pool", "PrRoIPool"]

_RENAMED = {"out_size": "output_size", "sample_num": "sampling_ratio"}


def _old_names(init):
    """mmcv's ``deprecated_api_warning``: the keywords ``out_size`` and
    ``sample_num`` of older mmcv releases, renamed with a
    DeprecationWarning."""
    @functools.wraps(init)
    def renamed(self, *args, **kwargs):
        for old, new in _RENAMED.items():
            if old in kwargs:
                if new in kwargs:
                    raise TypeError(f"{type(self).__name__}() got both {old!r} and "
                                    f"{new!r}; {old!r} is the older name of {new!r}")
                warnings.warn(f'"{old}" is deprecated in `{type(self).__name__}`, '
                              f'please use "{new}" instead', DeprecationWarning,
                              stacklevel=2)
                kwargs[new] = kwargs.pop(old)
        init(self, *args, **kwargs)
    return renamed


# ------------------------------------------------------------------ functions
def roi_align(input: Tensor, rois: Union[Tensor, List[Tensor]],
              output_size: BroadcastingList2[int], spatial_scale: float = 1.0,
              sampling_ratio: int = 0, pool_mode: str = "avg",
              aligned: bool = True) -> Tensor:
    """mmcv's ``roi_align``: :func:`curoi.torch.roi_align` with mmcv's
    argument order and defaults (``pool_mode`` is curoi's ``mode``)."""
    return ct.roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned,
                        pool_mode)


def roi_pool(input: Tensor, rois: Union[Tensor, List[Tensor]],
             output_size: BroadcastingList2[int], spatial_scale: float = 1.0) -> Tensor:
    """mmcv's ``roi_pool``: :func:`curoi.torch.roi_pool` with
    ``convention="mmcv"``."""
    return ct.roi_pool(input, rois, output_size, spatial_scale, "mmcv")


def roi_align_rotated(input: Tensor, rois: Union[Tensor, List[Tensor]],
                      output_size: BroadcastingList2[int], spatial_scale: float,
                      sampling_ratio: int = 0, aligned: bool = True,
                      clockwise: bool = False) -> Tensor:
    """mmcv's ``roi_align_rotated``: :func:`curoi.torch.roi_align_rotated`
    with ``convention="mmcv"`` (angles in radians)."""
    return ct.roi_align_rotated(input, rois, output_size, spatial_scale, sampling_ratio,
                                "mmcv", aligned, clockwise)


def prroi_pool(features: Tensor, rois: Union[Tensor, List[Tensor]],
               output_size: BroadcastingList2[int], spatial_scale: float = 1.0) -> Tensor:
    """mmcv's ``prroi_pool``: :func:`curoi.torch.prroi_pool`, differentiable
    with respect to the features and the boxes."""
    return ct.prroi_pool(features, rois, output_size, spatial_scale)


# ------------------------------------------------------------------- modules
class RoIAlign(nn.Module):
    """mmcv's ``RoIAlign``; see :func:`roi_align`. ``use_torchvision=True``
    pools as torchvision's roi_align does (the average: ``pool_mode`` is
    not read), as mmcv's."""

    @_old_names
    def __init__(self, output_size, spatial_scale=1.0, sampling_ratio=0, pool_mode="avg",
                 aligned=True, use_torchvision=False):
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.pool_mode = pool_mode
        self.aligned = aligned
        self.use_torchvision = use_torchvision

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        mode = "avg" if self.use_torchvision else self.pool_mode
        return ct.roi_align(input, rois, self.output_size, self.spatial_scale,
                            self.sampling_ratio, self.aligned, mode)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, "
                f"spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, pool_mode={self.pool_mode}, "
                f"aligned={self.aligned}, use_torchvision={self.use_torchvision})")


class RoIPool(nn.Module):
    """mmcv's ``RoIPool``; see :func:`roi_pool`."""

    def __init__(self, output_size, spatial_scale=1.0):
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        return ct.roi_pool(input, rois, self.output_size, self.spatial_scale, "mmcv")

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, "
                f"spatial_scale={self.spatial_scale})")


class RoIAlignRotated(nn.Module):
    """mmcv's ``RoIAlignRotated``; see :func:`roi_align_rotated`."""

    @_old_names
    def __init__(self, output_size, spatial_scale, sampling_ratio=0, aligned=True,
                 clockwise=False):
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = aligned
        self.clockwise = clockwise

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        return ct.roi_align_rotated(input, rois, self.output_size, self.spatial_scale,
                                    self.sampling_ratio, "mmcv", self.aligned,
                                    self.clockwise)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, "
                f"spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, "
                f"clockwise={self.clockwise})")


class PrRoIPool(nn.Module):
    """mmcv's ``PrRoIPool``; see :func:`prroi_pool`."""

    def __init__(self, output_size, spatial_scale=1.0):
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)

    def forward(self, features: Tensor, rois: Tensor) -> Tensor:
        return ct.prroi_pool(features, rois, self.output_size, self.spatial_scale)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, "
                f"spatial_scale={self.spatial_scale})")

"""``curoi.torch.compat.torchvision``: every RoI name of ``torchvision.ops``
in one module, so that porting is the import line alone::

    import curoi.torch.compat.torchvision as ops   # was: import torchvision.ops as ops
    ops.roi_align(x, boxes, 7, 1 / 16, 2, True)

The names are :mod:`curoi.torch`'s own functions and modules (the same
objects): torchvision's arguments, defaults, numbers, box-gradient
semantics (none), TorchScript, torch.fx and quantized ``roi_align``; see the
README's "Porting from torchvision, detectron2, mmcv" for the differences.
"""

from .torch import (MultiScaleRoIAlign, PSRoIAlign, PSRoIPool, RoIAlign, RoIPool,
                    ps_roi_align, ps_roi_pool, roi_align, roi_pool)

__all__ = ["roi_align", "RoIAlign", "roi_pool", "RoIPool", "ps_roi_align", "PSRoIAlign",
           "ps_roi_pool", "PSRoIPool", "MultiScaleRoIAlign"]

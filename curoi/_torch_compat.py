"""``curoi.torch.compat``: the RoI names of other libraries, each a thin
mapping onto :mod:`curoi.torch`'s operators, so that porting a model is an
import swap:

- ``curoi.torch.compat.torchvision``: every RoI name of ``torchvision.ops``;
- ``curoi.torch.compat.detectron2``: ``ROIAlign``, ``ROIAlignRotated``,
  ``roi_align``, ``ROIPooler``, ``assign_boxes_to_levels``;
- ``curoi.torch.compat.mmcv``: ``RoIAlign``, ``RoIPool``,
  ``RoIAlignRotated``, ``PrRoIPool`` and their functions.

The modules are ``curoi/_compat_*.py``, registered under these names when
:mod:`curoi.torch` is imported (``curoi/torch.py`` stays one module), so
``import curoi.torch.compat.mmcv`` and ``from curoi.torch.compat import
mmcv`` both work.
"""

import sys

from . import _compat_detectron2 as detectron2
from . import _compat_mmcv as mmcv
from . import _compat_torchvision as torchvision

__all__ = ["detectron2", "mmcv", "torchvision"]

NAME = "curoi.torch.compat"
sys.modules[NAME] = sys.modules[__name__]
for _module in (detectron2, mmcv, torchvision):
    sys.modules[f"{NAME}.{_module.__name__[len('curoi._compat_'):]}"] = _module
del _module

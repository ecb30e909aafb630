"""curoi: region-of-interest operators (RoI Pool, RoI Align), forward and
backward, from one CUDA source compiled by NVRTC for the GPU and by the host
C++ compiler for the CPU; any DLPack array in, the caller's kind of array out.
"""

from ._cpu import get_num_threads, set_num_threads
from ._info import backend_info
from ._crop_and_resize import crop_and_resize, crop_and_resize_backward
from ._multiscale import multiscale_roi_align, multiscale_roi_align_backward
from ._onnx_ops import onnx_roi_align
from ._prroi_pool import prroi_pool, prroi_pool_backward, prroi_pool_boxes_backward
from ._ps_roi import (ps_roi_align, ps_roi_align_backward, ps_roi_pool,
                      ps_roi_pool_backward)
from ._roi_align import roi_align, roi_align_backward, roi_align_boxes_backward
from ._roi_align_rotated import (roi_align_rotated, roi_align_rotated_backward,
                                 roi_align_rotated_boxes_backward)
from ._roi_pool import roi_pool, roi_pool_backward
from ._roi_spp import roi_spp, roi_spp_backward

__version__ = "0.1.0"

__all__ = [
    "backend_info",
    "crop_and_resize",
    "crop_and_resize_backward",
    "get_num_threads",
    "multiscale_roi_align",
    "multiscale_roi_align_backward",
    "onnx_roi_align",
    "prroi_pool",
    "prroi_pool_backward",
    "prroi_pool_boxes_backward",
    "ps_roi_align",
    "ps_roi_align_backward",
    "ps_roi_pool",
    "ps_roi_pool_backward",
    "roi_align",
    "roi_align_backward",
    "roi_align_boxes_backward",
    "roi_align_rotated",
    "roi_align_rotated_backward",
    "roi_align_rotated_boxes_backward",
    "roi_pool",
    "roi_pool_backward",
    "roi_spp",
    "roi_spp_backward",
    "set_num_threads",
]

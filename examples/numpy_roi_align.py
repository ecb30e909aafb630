"""RoI Align and RoI Pool on NumPy arrays, on the CPU backend.

Run: python examples/numpy_roi_align.py

Features are a ramp f(y, x) = y + 10 x, on which bilinear interpolation is
exact, so every pooled value can be checked by hand: an aligned box's bin
average is the ramp at the bin's centre.
"""

import numpy as np

import curoi

height, width = 16, 20
ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
features = (ys + 10 * xs)[None, None]  # [N=1, C=1, H, W]

# One list entry per image, boxes as (x1, y1, x2, y2) in feature pixels.
boxes = [np.array([[2.0, 3.0, 10.0, 11.0]], dtype=np.float32)]

pooled = curoi.roi_align(features, boxes, output_size=2, spatial_scale=1.0,
                         sampling_ratio=2, aligned=True)
print("roi_align, 2x2 bins of box (2, 3)-(10, 11):")
print(pooled[0, 0])
# aligned=True shifts the box by half a pixel: x from 1.5 to 9.5, y from 2.5
# to 10.5, so bin centres are x = 3.5, 7.5 and y = 4.5, 8.5.
expected = np.array([[4.5 + 35, 4.5 + 75], [8.5 + 35, 8.5 + 75]])
print("by hand:", expected.tolist(), "match:", np.allclose(pooled[0, 0], expected))

# The gradient of the sum of outputs spreads one unit per output element.
grad = curoi.roi_align_backward(np.ones_like(pooled), boxes, features.shape,
                                output_size=2, sampling_ratio=2, aligned=True)
print("roi_align_backward of ones sums to", float(grad.sum()), "(4 bins)")

pooled, argmax = curoi.roi_pool(features, boxes, output_size=2, return_argmax=True)
print("roi_pool maxima:", pooled[0, 0].tolist(), "at flat indices", argmax[0, 0].tolist())

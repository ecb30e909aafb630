"""RoI Align in PyTorch with curoi.torch: forward, autograd, torch.compile.

Run: python examples/torch_roi_align.py   (on the GPU if torch sees one)

Features are a ramp f(y, x) = y + 10 x, on which bilinear interpolation is
exact, so every pooled value can be checked by hand: an aligned box's bin
average is the ramp at the bin's centre. The gradient is checked against
finite differences by torch.autograd.gradcheck.
"""

import torch

from curoi.torch import RoIAlign, roi_align

device = "cuda" if torch.cuda.is_available() else "cpu"
print("device:", device)

height, width = 16, 20
ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                        torch.arange(width, dtype=torch.float32), indexing="ij")
features = (ys + 10 * xs)[None, None].to(device).requires_grad_()  # [1, 1, H, W]

# One list entry per image, boxes as (x1, y1, x2, y2) in feature pixels:
# exactly the call torchvision.ops.roi_align takes.
boxes = [torch.tensor([[2.0, 3.0, 10.0, 11.0]], device=device)]

pooled = roi_align(features, boxes, output_size=2, spatial_scale=1.0,
                   sampling_ratio=2, aligned=True)
print("roi_align, 2x2 bins of box (2, 3)-(10, 11):")
print(pooled[0, 0].tolist())
# aligned=True shifts the box by half a pixel: x from 1.5 to 9.5, y from 2.5
# to 10.5, so bin centres are x = 3.5, 7.5 and y = 4.5, 8.5.
expected = torch.tensor([[4.5 + 35, 4.5 + 75], [8.5 + 35, 8.5 + 75]], device=device)
print("by hand:", expected.tolist(), "match:", torch.allclose(pooled[0, 0], expected))

# Each output is an average with weights summing to one, so the gradient of
# the sum of the 4 outputs sums to 4.
pooled.sum().backward()
print("gradient of the sum of outputs sums to", features.grad.sum().item(), "(4 bins)")

# The backward against finite differences, in float64.
x64 = torch.rand(1, 2, 6, 7, dtype=torch.float64, device=device, requires_grad=True)
rois64 = torch.tensor([[0, 0.5, 1.0, 5.5, 4.0], [0, 2.0, 0.0, 6.5, 5.5]],
                      dtype=torch.float64, device=device)
ok = torch.autograd.gradcheck(lambda t: roi_align(t, rois64, (2, 3), 1.0, 2, True), (x64,))
print("gradcheck against finite differences:", ok)

# The module, compiled with the whole graph and dynamic shapes.
pool = RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=True)
print(pool)
compiled = torch.compile(pool, fullgraph=True, dynamic=True, backend="aot_eager")
same = torch.equal(compiled(features.detach(), boxes), pooled.detach())
print("torch.compile(fullgraph=True) gives the same numbers:", same)

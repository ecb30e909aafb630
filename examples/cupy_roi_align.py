"""RoI Align on CuPy arrays: the kernels run on the array's GPU, on CuPy's
current stream, and the result is a CuPy array on the same device.

Run: python examples/cupy_roi_align.py   (needs a CUDA GPU and curoi's cuda12
or cuda13 extra, pip install -e ".[cuda12]"; without a GPU it says so and exits)
"""

import sys

import numpy as np

import curoi

try:
    import cupy

    if cupy.cuda.runtime.getDeviceCount() == 0:
        raise RuntimeError("no CUDA device")
except Exception as error:  # no CuPy, no driver or no device
    print(f"This example needs a CUDA GPU with CuPy ({error}).")
    sys.exit(0)

rng = np.random.default_rng(0)
features = cupy.asarray(rng.standard_normal((2, 64, 50, 68), dtype=np.float32))
boxes = cupy.asarray(np.array([[0, 10, 20, 400, 300],
                               [1, 100, 50, 900, 700]], dtype=np.float32))

stream = cupy.cuda.Stream(non_blocking=True)
with stream:
    pooled = curoi.roi_align(features, boxes, 7, spatial_scale=1 / 16,
                             sampling_ratio=2, aligned=True)
stream.synchronize()
print(type(pooled).__name__, pooled.shape, pooled.dtype, "on device", pooled.device.id)

# The same call on the CPU backend gives the same numbers.
reference = curoi.roi_align(cupy.asnumpy(features), cupy.asnumpy(boxes), 7,
                            spatial_scale=1 / 16, sampling_ratio=2, aligned=True)
print("max |GPU - CPU| =", float(np.abs(cupy.asnumpy(pooled) - reference).max()))

"""`python -m curoi`: pool the classic worked example and a realistic
detection batch on the GPU when one is usable, else on the CPU, and say which."""

import time

import numpy as np

import curoi
from curoi import _gpu

# The 8x8 map of the classic RoI pooling walk-through, row by row.
WORKED_EXAMPLE_MAP = np.array([
    [0.88, 0.44, 0.14, 0.16, 0.37, 0.77, 0.96, 0.27],
    [0.19, 0.45, 0.57, 0.16, 0.63, 0.29, 0.71, 0.70],
    [0.66, 0.26, 0.82, 0.64, 0.54, 0.73, 0.59, 0.26],
    [0.85, 0.34, 0.76, 0.84, 0.29, 0.75, 0.62, 0.25],
    [0.32, 0.74, 0.21, 0.39, 0.34, 0.03, 0.33, 0.48],
    [0.20, 0.14, 0.16, 0.13, 0.73, 0.65, 0.96, 0.32],
    [0.19, 0.69, 0.09, 0.86, 0.88, 0.07, 0.01, 0.48],
    [0.83, 0.24, 0.97, 0.04, 0.24, 0.35, 0.50, 0.91],
], dtype=np.float32)


def _backend():
    """(name, array module) of the backend this demo runs on."""
    if _gpu.device_count() > 0:
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        if isinstance(name, bytes):
            name = name.decode()
        return f"GPU (CuPy {cupy.__version__}, {name})", cupy
    return "CPU (host C++ compiler, curoi thread pool)", np


def _synchronize(xp):
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def _realistic_boxes(rng, count, images, height, width):
    """Proposals in image pixels: sizes from 16 px to half the image."""
    sizes = np.exp(rng.uniform(np.log(16), np.log(min(height, width) / 2), (count, 2)))
    centres = rng.uniform(0, 1, (count, 2)) * [width, height]
    x1y1 = centres - sizes / 2
    boxes = np.concatenate([x1y1, x1y1 + sizes], axis=1)
    batch = rng.integers(0, images, (count, 1))
    return np.concatenate([batch, boxes], axis=1).astype(np.float32)


def main():
    name, xp = _backend()
    print(f"curoi {curoi.__version__} on {name}\n")

    feature = xp.asarray(WORKED_EXAMPLE_MAP[None, None])
    box = xp.asarray(np.array([[0, 0, 3, 6, 7]], dtype=np.float32))
    print("Worked example: 8x8 map, box columns 0-6 and rows 3-7, 2x2 output")
    for convention in ("torchvision", "mmcv"):
        pooled, argmax = curoi.roi_pool(feature, box, 2, convention=convention,
                                        return_argmax=True)
        print(f"  roi_pool  {convention:<12} {_fmt(pooled, 2)}  argmax "
              f"{_to_host(argmax)[0, 0].tolist()}")
    aligned = curoi.roi_align(feature, box, 2, sampling_ratio=2, aligned=True)
    print(f"  roi_align aligned      {_fmt(aligned, 4)}")
    print("  (the blog's own split, without overlap, gives [[0.85, 0.84], "
          "[0.97, 0.96]]: see the README)\n")

    # A Faster R-CNN-sized batch: 2 images of 800x1088 at stride 16.
    rng = np.random.default_rng(0)
    n, c, h, w, k = 2, 256, 50, 68, 512
    features = xp.asarray(rng.standard_normal((n, c, h, w), dtype=np.float32))
    boxes = xp.asarray(_realistic_boxes(rng, k, n, h * 16, w * 16))
    print(f"Realistic batch: features {tuple(features.shape)}, {k} boxes, "
          "output 7x7, spatial_scale 1/16, sampling_ratio 2, aligned")
    for label, run in (
        ("roi_align", lambda: curoi.roi_align(features, boxes, 7, 1 / 16, 2, True)),
        ("roi_pool", lambda: curoi.roi_pool(features, boxes, 7, 1 / 16)),
    ):
        run()  # the first call compiles the kernels (cached afterwards)
        _synchronize(xp)
        start = time.perf_counter()
        out = run()
        _synchronize(xp)
        elapsed = time.perf_counter() - start
        host = _to_host(out)
        print(f"  {label:<9} -> {tuple(host.shape)} {host.dtype}, "
              f"mean {host.mean():+.5f}, {elapsed * 1e3:.1f} ms")


def _fmt(array, decimals):
    rows = _to_host(array)[0, 0].astype(np.float64)
    return "[" + ", ".join(
        "[" + ", ".join(f"{v:.{decimals}f}" for v in row) + "]" for row in rows
    ) + "]"


def _to_host(array):
    return array.get() if hasattr(array, "get") else array


if __name__ == "__main__":
    main()

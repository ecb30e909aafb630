"""The GPU loops' work per output element, counted without a GPU.

The GPU loops' CPU build (``CUROI_CPU_LOOPS=gpu``) runs the very loop code
that NVRTC compiles, one "thread" after another; valgrind's callgrind
counts the instructions each kernel executes there. They are x86
instructions, not SASS, but they follow the same loops, so their count per
output element compares loop structures: here the GPU loops as they run
(a thread per box, bin and tile of channels, the tiles chosen for the full
call by ``_ops.channel_groups``) against the same loops with one channel per
thread, the structure of torchvision's kernels, where everything that does
not depend on the channel is redone for every channel.

The inputs are a benchmark workload's (``_bench.WORKLOADS``: W1, W2) with
fewer boxes, so that valgrind takes seconds; the tiles are those of the
workload's full box count.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

#: (row label, the kernel it runs: the family's entry point, float32).
CASES = (
    ("roi_align forward", "roi_align_forward_f32"),
    ("roi_align backward", "roi_align_backward_f32"),
    ("roi_align forward, max", "roi_align_max_forward_f32"),
    ("roi_align backward, max", "roi_align_max_backward_f32"),
    ("roi_align_rotated forward", "roi_align_rotated_forward_f32"),
    ("roi_align_rotated backward", "roi_align_rotated_backward_f32"),
    ("ps_roi_align forward, C = 490", "ps_roi_align_forward_f32"),
    ("ps_roi_align backward, C = 490", "ps_roi_align_backward_f32"),
    ("roi_pool forward", "roi_pool_forward_f32"),
    ("ps_roi_pool forward, C = 490", "ps_roi_pool_forward_f32"),
    ("prroi_pool forward", "prroi_pool_forward_f32"),
    ("prroi_pool backward", "prroi_pool_backward_f32"),
    ("crop_and_resize forward, NHWC", "crop_and_resize_forward_f32"),
    ("crop_and_resize backward, NHWC", "crop_and_resize_backward_f32"),
)

#: Boxes per measured call (the tiles are the full workload's).
BOXES = 16

# Sets the cases up with NumPy alone, then makes one kernel call per case,
# in order, each of which callgrind counts and dumps apart (it collects
# inside ctypes' calls only); prints the number of output elements of each.
DRIVER = r"""
import sys
import numpy as np
from curoi import _bench, _cpu, _ops

work = _bench.WORKLOADS[sys.argv[1]]
kernels, k, one_channel = sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4] == "1"
full = _ops.channel_groups
if one_channel:
    _ops.channel_groups = lambda bins, channels: channels
else:  # the tiles of the workload's full box count
    _ops.channel_groups = lambda bins, channels: full(bins * work.boxes // k, channels)
_cpu.library()
rng = np.random.default_rng(0)
n, c, h, w = work.shape
size, s, ratio = work.output_size, work.spatial_scale, work.sampling_ratio
boxes = _bench.detection_boxes(rng, k, n, w / s, h / s)
x = rng.standard_normal((n, c, h, w)).astype(np.float32)
out = np.zeros((k, c, size, size), np.float32)
grad = np.zeros(x.shape, np.float32)
g = rng.standard_normal(out.shape).astype(np.float32)
# Position-sensitive pooling on R-FCN's 10 x PH x PW channels: 10 outputs.
x_ps = rng.standard_normal((n, 10 * size * size, h, w)).astype(np.float32)
out_ps = np.zeros((k, 10, size, size), np.float32)
g_ps = rng.standard_normal(out_ps.shape).astype(np.float32)
rotated = np.concatenate([boxes[:, :1], (boxes[:, 1:3] + boxes[:, 3:5]) / 2,
                          boxes[:, 3:5] - boxes[:, 1:3],
                          rng.uniform(-90, 90, (k, 1))], 1).astype(np.float32)
crops = np.concatenate([boxes[:, :1], boxes[:, 2:3] * s / h, boxes[:, 1:2] * s / w,
                        boxes[:, 4:5] * s / h, boxes[:, 3:4] * s / w], 1).astype(np.float32)
image = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
out_nhwc = np.zeros((k, size, size, c), np.float32)
g_nhwc = np.ascontiguousarray(g.transpose(0, 2, 3, 1))
argmax = np.zeros(out.shape, np.int64)  # sample 0 of each bin: a valid winner
calls = {
    "roi_align_forward_f32": lambda: _ops.roi_align_forward(x, boxes, out, s, ratio, True),
    "roi_align_backward_f32": lambda: _ops.roi_align_backward(
        g, boxes, grad, s, ratio, True, zeroed=True),
    "roi_align_max_forward_f32": lambda: _ops.roi_align_max_forward(
        x, boxes, out, argmax, s, ratio, True, "interpolated"),
    "roi_align_max_backward_f32": lambda: _ops.roi_align_max_backward(
        g, argmax, boxes, grad, s, ratio, True, zeroed=True),
    "roi_align_rotated_forward_f32": lambda: _ops.roi_align_rotated_forward(
        x, rotated, out, s, ratio, "detectron2", True, False),
    "roi_align_rotated_backward_f32": lambda: _ops.roi_align_rotated_backward(
        g, rotated, grad, s, ratio, "detectron2", True, False, zeroed=True),
    "ps_roi_align_forward_f32": lambda: _ops.ps_roi_align_forward(
        x_ps, boxes, out_ps, s, ratio),
    "ps_roi_align_backward_f32": lambda: _ops.ps_roi_align_backward(
        g_ps, boxes, np.zeros(x_ps.shape, np.float32), s, ratio, zeroed=True),
    "roi_pool_forward_f32": lambda: _ops.roi_pool_forward(
        x, boxes, out, argmax, s, "torchvision"),
    "ps_roi_pool_forward_f32": lambda: _ops.ps_roi_pool_forward(x_ps, boxes, out_ps, s),
    "prroi_pool_forward_f32": lambda: _ops.prroi_pool_forward(x, boxes, out, s),
    "prroi_pool_backward_f32": lambda: _ops.prroi_pool_backward(
        g, boxes, grad, s, zeroed=True),
    "crop_and_resize_forward_f32": lambda: _ops.crop_and_resize_forward(
        image, crops, out_nhwc, "bilinear", 0.0),
    "crop_and_resize_backward_f32": lambda: _ops.crop_and_resize_backward(
        g_nhwc, crops, np.zeros(image.shape, np.float32), "bilinear", zeroed=True),
}
outputs = []
for kernel in kernels:
    calls[kernel]()
    outputs.append((out_ps if kernel.startswith("ps_") else out).size)
print(",".join(map(str, outputs)))
"""


class KernelWorkError(RuntimeError):
    """The count cannot be taken here (no valgrind, or a failed run)."""


def _count(workload, kernels, one_channel, boxes, cache):
    """Instructions per output element of each of ``kernels`` (names), in
    one callgrind run that dumps its counts after every ctypes call."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise KernelWorkError("valgrind is not on PATH")
    with tempfile.TemporaryDirectory(prefix="curoi-work-") as folder:
        out = os.path.join(folder, "callgrind.out")
        env = dict(os.environ, CUROI_CPU_LOOPS="gpu", CUROI_CACHE_DIR=str(cache),
                   CUROI_NUM_THREADS="1")
        env.pop("CUROI_SANITIZE", None)
        done = subprocess.run(
            [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}",
             "--collect-atstart=no", "--toggle-collect=ffi_call",
             "--dump-after=ffi_call", sys.executable, "-c", DRIVER, workload,
             ",".join(kernels), str(boxes), "1" if one_channel else "0"],
            env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise KernelWorkError(f"the counted run failed:\n{done.stderr[-3000:]}")
        outputs = [int(v) for v in done.stdout.strip().splitlines()[-1].split(",")]
        dumps = sorted((name for name in os.listdir(folder) if name.startswith("callgrind.out.")),
                       key=lambda name: int(name.rsplit(".", 1)[1]))
        totals = []
        for name in dumps:
            with open(os.path.join(folder, name), encoding="utf-8") as handle:
                found = [line for line in handle if line.startswith("totals:")]
            totals.append(int(found[-1].split()[1]) if found else 0)
    # One dump per ctypes call: the kernels' calls are the last ones.
    if len(totals) < len(kernels):
        raise KernelWorkError(f"callgrind dumped {len(totals)} calls for "
                              f"{len(kernels)} kernels")
    counted = totals[len(totals) - len(kernels):]
    return {kernel: count / size for kernel, count, size in zip(kernels, counted, outputs)}


def _build(cache):
    """The GPU-loops build in ``cache``, built now rather than under valgrind."""
    env = dict(os.environ, CUROI_CPU_LOOPS="gpu", CUROI_CACHE_DIR=str(cache))
    env.pop("CUROI_SANITIZE", None)
    done = subprocess.run([sys.executable, "-m", "curoi", "build"], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise KernelWorkError(f"the GPU-loops build failed:\n{done.stderr[-3000:]}")


def report(workloads=("W1",), cases=CASES, boxes=BOXES, cache=None):
    """Rows (workload, label, kernel, instructions per output element as the
    GPU loops run, the same with one channel per thread). ``cache`` is the
    GPU-loops build's cache folder (default: one of its own under the
    user's cache)."""
    if cache is None:
        from . import _cpu

        cache = str(_cpu.cache_dir())  # the loops are part of the build's key
    _build(cache)
    kernels = [kernel for _, kernel in cases]
    rows = []
    for workload in workloads:
        tiled = _count(workload, kernels, False, boxes, cache)
        single = _count(workload, kernels, True, boxes, cache)
        rows += [(workload, label, kernel, tiled[kernel], single[kernel])
                 for label, kernel in cases]
    return rows


def format_table(rows):
    lines = ["| workload | kernel | per output, tiled | one channel a thread | ratio |",
             "| --- | --- | --- | --- | --- |"]
    for workload, label, _, tiled, single in rows:
        lines.append(f"| {workload} | {label} | {tiled:.0f} | {single:.0f} | "
                     f"{tiled / single:.2f} |")
    return "\n".join(lines)

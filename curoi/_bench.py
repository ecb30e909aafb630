"""`python3 -m curoi bench`: time curoi against its peers, side by side.

    python3 -m curoi bench                              # W1, all cores
    python3 -m curoi bench --workload W1,W2,tiny --threads 1,2 --repeat 9
    python3 -m curoi bench --json figures.json --plot figures.png --kernels
    python3 -m curoi bench --rows "roi_pool backward" --threads 1  # one row
    python3 -m curoi bench --rows "forward, NHWC|adaptive"  # rows with either
    python3 -m curoi bench --workload W1,FPN --rows help    # the row names

Workloads (``--workload``, comma-separated):

- ``W1``, a Faster R-CNN box head: float32 features [2, 256, 50, 68], 1024
  boxes in a 1088x800 image (width and height log-uniform in [32, 800] px,
  centres uniform, clipped to the image, batch index 0 or 1),
  spatial_scale 1/16, 7x7 output, aligned, sampling_ratio 2 and adaptive;
  roi_align forward and backward (sampling_ratio 2) and roi_pool forward
  also channels-last (``data_format="NHWC"``, rows marked NHWC) next to
  their NCHW rows; then the rest of the family on the same boxes: RoI
  Align's max mode (sampling_ratio 2), rotated RoI Align (the boxes turned
  by random angles in [-90, 90] degrees), and position-sensitive RoI Pool and
  RoI Align (sampling_ratio 2) on features of C = 10 x 7 x 7 = 490 channels,
  as R-FCN's; the box gradients of RoI Align and rotated RoI Align; Precise
  RoI Pooling (forward, backward, box gradient) and spatial pyramid pooling
  (levels 1, 2, 4; max);
- ``crop``, TensorFlow's crop_and_resize on W1's features channels-last and
  W1's boxes normalised to the image, 7x7: forward, and the image and box
  gradients together, against TensorFlow when it is importable (its thread
  pools set to the first thread count; they cannot change afterwards);
- ``W2``, a Mask R-CNN mask head: [2, 256, 100, 136], 256 boxes,
  spatial_scale 1/8, 14x14, sampling_ratio 2 and adaptive, aligned;
- ``tiny``: one box on [1, 4, 16, 16], 2x2, the cost of a call in
  microseconds through NumPy, ``curoi.torch`` and ``curoi.jax`` under
  ``jax.jit`` (CPU only);
- ``FPN``, a feature-pyramid box head: the levels P2-P5 of an 800x1088
  image ([2, 256, 200, 272] at 1/4 down to [2, 256, 25, 34] at 1/32), W1's
  1024 boxes, 7x7, sampling_ratio 2, not aligned (torchvision's
  MultiScaleRoIAlign): ``multiscale_roi_align`` forward and backward in one
  launch against the same done per level (the level rule on the host,
  then one ``roi_align`` per level on its boxes and a scatter into box
  order, as torchvision's MultiScaleRoIAlign does), and against torchvision's
  MultiScaleRoIAlign when importable;
- ``stress``: pathological boxes (1e9-pixel boxes with adaptive sampling,
  ``sampling_ratio`` 2**31-1) and, on the CPU, the deterministic backward
  against the GPU's fixed-point sum run through the CPU backend.

Peers run in the same process on the same inputs when importable:
onnxruntime's ``RoiAlign`` (opset 16, half_pixel, same sampling) and
``MaxRoiPool`` with ``intra_op_num_threads`` set to the thread count, and
``torchvision.ops`` (forward and backward) with ``torch.set_num_threads`` set
likewise. Each repeat times curoi and then every peer once, so that the
machine's noise hits all of them alike; the tables show medians and the
ratio curoi / peer (below 1: curoi is faster). On a CUDA device
(``--device cuda``) the kernels are timed with CUDA events, float32 and
float16 unless ``--dtype`` says otherwise, against torchvision's CUDA kernels
when installed.
"""

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time

import numpy as np

import curoi
from curoi import _gpu, _ops

IMAGE_WIDTH, IMAGE_HEIGHT = 1088, 800


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    title: str
    shape: tuple  # N, C, H, W
    boxes: int
    spatial_scale: float
    output_size: int
    sampling_ratio: int


WORKLOADS = {
    "W1": Workload("W1", "Faster R-CNN box head", (2, 256, 50, 68), 1024, 1 / 16, 7, 2),
    "W2": Workload("W2", "Mask R-CNN mask head", (2, 256, 100, 136), 256, 1 / 8, 14, 2),
    "tiny": Workload("tiny", "one small call", (1, 4, 16, 16), 1, 1.0, 2, 2),
    "stress": Workload("stress", "pathological boxes", (2, 256, 50, 68), 512, 1 / 16, 7, 2),
    "crop": Workload("crop", "TensorFlow's crop_and_resize", (2, 256, 50, 68), 1024,
                     1 / 16, 7, 2),
    # The finest level's shape and scale; three coarser levels halve it.
    "FPN": Workload("FPN", "feature pyramid box head", (2, 256, 200, 272), 1024, 1 / 4, 7,
                    2),
}
#: Levels of the FPN workload: P2 to P5, as Faster R-CNN with FPN pools.
FPN_LEVELS = 4
# --quick: every workload with few channels and boxes, for a smoke test of
# the command itself (its figures mean nothing).
QUICK_CHANNELS, QUICK_BOXES, QUICK_CALLS = 4, 8, 3
# Calls per timed sample of the tiny workload: one call is too short for
# the clock; the sample is the mean over these.
TINY_CALLS = 200


def detection_boxes(rng, count, images, image_width=IMAGE_WIDTH,
                    image_height=IMAGE_HEIGHT, smallest=32.0, largest=800.0):
    """``[count, 5]`` float32 rows (batch, x1, y1, x2, y2): width and height
    log-uniform in [smallest, largest] px, centres uniform over the image,
    clipped to the image, batch index uniform over the images."""
    sizes = np.exp(rng.uniform(np.log(smallest), np.log(largest), (count, 2)))
    centres = rng.uniform(0, 1, (count, 2)) * [image_width, image_height]
    low = np.clip(centres - sizes / 2, 0, [image_width, image_height])
    high = np.clip(centres + sizes / 2, 0, [image_width, image_height])
    batch = rng.integers(0, images, (count, 1))
    return np.concatenate([batch, low, high], axis=1).astype(np.float32)


@dataclasses.dataclass
class Operation:
    """One table row: curoi's callable and each peer's, timed interleaved."""

    label: str
    contenders: dict  # name -> zero-argument callable; "curoi" first
    samples: dict = dataclasses.field(default_factory=dict)
    failed: dict = dataclasses.field(default_factory=dict)


# Peers -----------------------------------------------------------------

def _onnxruntime():
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def _torchvision():
    try:
        import torch
        import torchvision.ops  # noqa: F401
    except ImportError:
        return None
    return torch


def _onnx_session(node_kind, attributes, feeds, threads):
    """An onnxruntime CPU session running one node on ``feeds``."""
    from onnx import TensorProto, helper

    onnxruntime = _onnxruntime()
    types = {np.dtype(np.float32): TensorProto.FLOAT,
             np.dtype(np.float64): TensorProto.DOUBLE,
             np.dtype(np.int64): TensorProto.INT64}
    inputs = [helper.make_tensor_value_info(name, types[value.dtype], value.shape)
              for name, value in feeds.items()]
    node = helper.make_node(node_kind, list(feeds), ["Y"], **attributes)
    out_type = types[next(iter(feeds.values())).dtype]
    graph = helper.make_graph([node], node_kind, inputs,
                              [helper.make_tensor_value_info("Y", out_type, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)],
                              ir_version=8)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Its pool's threads otherwise spin for a while after each run, on the
    # cores that the next row is timed on (measured: the row after an
    # onnxruntime row took up to 1.8x as long at 2 threads).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    return lambda: session.run(None, feeds)


def _onnx_roi_align(x, boxes, work, ratio, threads):
    if x.dtype not in (np.float32, np.float64):
        return None  # onnxruntime's CPU RoiAlign takes float and double only
    feeds = {"X": x, "rois": np.ascontiguousarray(boxes[:, 1:], dtype=x.dtype),
             "batch_indices": boxes[:, 0].astype(np.int64)}
    return _onnx_session("RoiAlign", dict(
        output_height=work.output_size, output_width=work.output_size,
        sampling_ratio=ratio, spatial_scale=work.spatial_scale, mode="avg",
        coordinate_transformation_mode="half_pixel"), feeds, threads)


def _onnx_max_roi_pool(x, boxes, work, threads):
    if x.dtype != np.float32:
        return None
    feeds = {"X": x, "rois": boxes.astype(np.float32)}
    return _onnx_session("MaxRoiPool", dict(
        pooled_shape=[work.output_size] * 2, spatial_scale=work.spatial_scale),
        feeds, threads)


# Measuring --------------------------------------------------------------

class Progress:
    """A plain-text progress bar on stderr: redrawn in place on a terminal,
    one line per step elsewhere (logs)."""

    def __init__(self, total, stream=None, width=30):
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = sys.stderr if stream is None else stream
        self.redraw = getattr(self.stream, "isatty", lambda: False)()

    def step(self, label):
        self.done += 1
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        text = f"[{bar}] {self.done}/{self.total} {label}"
        if self.redraw:
            self.stream.write("\r" + text[:120].ljust(120))
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _wall_timer(scale, calls=1):
    def timed(run):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        return (time.perf_counter() - start) * scale / calls
    return timed


def _cuda_timer(cupy):
    def timed(run):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        run()
        stop.record()
        stop.synchronize()
        return cupy.cuda.get_elapsed_time(start, stop)
    return timed


def warm(operation):
    """Run every contender once (compiles, caches) and keep those that work:
    a peer that fails is dropped and its error kept; curoi failing is an
    error. Returns the contenders to time."""
    live = {}
    for name, run in operation.contenders.items():
        try:
            run()
        except Exception as error:
            if name == "curoi":
                raise
            operation.failed[name] = f"{type(error).__name__}: {error}"
            continue
        live[name] = run
    operation.samples = {name: [] for name in live}
    return live


def time_round(operation, live, timed):
    """One round: every contender timed once, in turn."""
    for name, run in live.items():
        operation.samples[name].append(timed(run))


def measure(operation, repeat, timed):
    """Warm, then ``repeat`` rounds of :func:`time_round`."""
    live = warm(operation)
    for _ in range(repeat):
        time_round(operation, live, timed)
    return operation


# Workloads --------------------------------------------------------------

def _shape(work, quick):
    n, c, h, w = work.shape
    return (n, min(c, QUICK_CHANNELS), h, w) if quick else (n, c, h, w)


def _box_count(work, quick):
    return min(work.boxes, QUICK_BOXES) if quick else work.boxes


def _inputs(work, dtype, quick, xp=np):
    rng = np.random.default_rng(0)
    shape = _shape(work, quick)
    x = rng.standard_normal(shape, dtype=np.float32).astype(_numpy_dtype(dtype))
    boxes = detection_boxes(rng, _box_count(work, quick), shape[0],
                            shape[3] / work.spatial_scale, shape[2] / work.spatial_scale)
    return xp.asarray(x), xp.asarray(boxes), rng


def _numpy_dtype(dtype):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def box_operations(work, dtype, threads, quick, xp=np):
    """The rows of W1/W2: forward and backward of both ops, curoi against
    onnxruntime (CPU) and torchvision when they are importable."""
    x, boxes, rng = _inputs(work, dtype, quick, xp)
    size, scale, ratio = work.output_size, work.spatial_scale, work.sampling_ratio
    gy = xp.asarray(rng.standard_normal((len(boxes), x.shape[1], size, size),
                                        dtype=np.float32).astype(x.dtype))
    # int32 positions, as curoi.torch saves them and as torchvision keeps
    # its own (the int64 row shows the difference).
    _, argmax = curoi.roi_pool(x, boxes, size, scale, return_argmax=True,
                               argmax_dtype="int32")
    argmax64 = argmax.astype(np.int64)
    on_cpu = xp is np
    torch = _torchvision()
    if torch is not None:
        try:
            tx, tboxes, tgy = (torch.from_dlpack(a) for a in (x, boxes, gy))
        except Exception:  # a dtype torch cannot import (ml_dtypes bfloat16)
            torch = None
    if torch is not None:
        tboxes = tboxes.to(tx.dtype)  # torchvision wants boxes of the features' dtype
        tv = torch.ops.torchvision
        n, c, h, w = x.shape
        targmax = tv.roi_pool(tx, tboxes, scale, size, size)[1]

    def peers_align_forward(sampling):
        found = {}
        if on_cpu and _onnxruntime() is not None:
            found["onnxruntime"] = _onnx_roi_align(x, boxes, work, sampling, threads)
        if torch is not None:
            found["torchvision"] = lambda: tv.roi_align(
                tx, tboxes, scale, size, size, sampling, True)
        return found

    def peers_align_backward(sampling):
        if torch is None:
            return {}
        return {"torchvision": lambda: tv._roi_align_backward(
            tgy, tboxes, scale, size, size, n, c, h, w, sampling, True)}

    # The same features and gradients channels-last, for the NHWC rows.
    x_nhwc = xp.ascontiguousarray(x.transpose(0, 2, 3, 1))
    gy_nhwc = xp.ascontiguousarray(gy.transpose(0, 2, 3, 1))

    rows = []
    for sampling, name in ((ratio, f"sampling_ratio {ratio}"), (0, "adaptive")):
        rows.append(Operation(f"roi_align forward, {name}", {
            "curoi": lambda s=sampling: curoi.roi_align(x, boxes, size, scale, s, True),
            **peers_align_forward(sampling)}))
        if sampling == ratio:
            rows.append(Operation(f"roi_align forward, {name}, NHWC", {
                "curoi": lambda: curoi.roi_align(x_nhwc, boxes, size, scale, ratio,
                                                 True, data_format="NHWC")}))
    for sampling, name in ((ratio, f"sampling_ratio {ratio}"), (0, "adaptive")):
        rows.append(Operation(f"roi_align backward, {name}", {
            "curoi": lambda s=sampling: curoi.roi_align_backward(
                gy, boxes, x.shape, size, scale, s, True),
            **peers_align_backward(sampling)}))
        if sampling == ratio:
            rows.append(Operation(f"roi_align backward, {name}, NHWC", {
                "curoi": lambda: curoi.roi_align_backward(
                    gy_nhwc, boxes, x_nhwc.shape, size, scale, ratio, True,
                    data_format="NHWC")}))
    rows.append(Operation(f"roi_align backward, deterministic, sampling_ratio {ratio}", {
        "curoi": lambda: curoi.roi_align_backward(
            gy, boxes, x.shape, size, scale, ratio, True, deterministic=True)}))
    pool_forward = {"curoi": lambda: curoi.roi_pool(x, boxes, size, scale)}
    if on_cpu and _onnxruntime() is not None:
        pool_forward["onnxruntime"] = _onnx_max_roi_pool(x, boxes, work, threads)
    if torch is not None:
        pool_forward["torchvision"] = lambda: tv.roi_pool(tx, tboxes, scale, size, size)
    rows.append(Operation("roi_pool forward", pool_forward))
    rows.append(Operation("roi_pool forward, NHWC", {
        "curoi": lambda: curoi.roi_pool(x_nhwc, boxes, size, scale, data_format="NHWC")}))
    pool_backward = {"curoi": lambda: curoi.roi_pool_backward(gy, argmax, boxes, x.shape)}
    if torch is not None:
        pool_backward["torchvision"] = lambda: tv._roi_pool_backward(
            tgy, tboxes, targmax, scale, size, size, n, c, h, w)
    rows.append(Operation("roi_pool backward", pool_backward))
    rows.append(Operation("roi_pool backward, int64 argmax", {
        "curoi": lambda: curoi.roi_pool_backward(gy, argmax64, boxes, x.shape)}))
    if work.name == "W1":
        rows += family_operations(work, x, boxes, gy, rng, torch, quick, xp)
        rows += part2_operations(work, x, boxes, gy, xp)
    for row in rows:  # a peer that does not take this dtype is left out
        row.contenders = {k: v for k, v in row.contenders.items() if v is not None}
    return rows


#: Output channels of W1's position-sensitive rows: R-FCN's 10 per bin
#: (C = 10 x 7 x 7 = 490 input channels); 1 with --quick.
PS_OUTPUT_CHANNELS = 10


def family_operations(work, x, boxes, gy, rng, torch, quick, xp=np):
    """W1's rows for the operators beyond roi_align and roi_pool: RoI
    Align's max mode, and position-sensitive pooling on 490 channels."""
    size, scale, ratio = work.output_size, work.spatial_scale, work.sampling_ratio
    _, argmax = curoi.roi_align(x, boxes, size, scale, ratio, True, mode="max",
                                return_argmax=True)
    rows = [
        Operation(f"roi_align forward, max, sampling_ratio {ratio}", {
            "curoi": lambda: curoi.roi_align(x, boxes, size, scale, ratio, True,
                                             mode="max")}),
        Operation(f"roi_align backward, max, sampling_ratio {ratio}", {
            "curoi": lambda: curoi.roi_align_backward(
                gy, boxes, x.shape, size, scale, ratio, True, mode="max",
                argmax=argmax)}),
    ]
    n, _, h, w = x.shape
    c_out = 1 if quick else PS_OUTPUT_CHANNELS
    x_ps = xp.asarray(rng.standard_normal((n, c_out * size * size, h, w),
                                          dtype=np.float32).astype(x.dtype))
    gy_ps = xp.asarray(rng.standard_normal((len(boxes), c_out, size, size),
                                           dtype=np.float32).astype(x.dtype))
    peers = {}
    if torch is not None:
        tv = torch.ops.torchvision
        tx_ps, tboxes = torch.from_dlpack(x_ps), torch.from_dlpack(boxes).to(x_ps.dtype)
        peers = {"ps_roi_pool": lambda: tv.ps_roi_pool(tx_ps, tboxes, scale, size, size),
                 "ps_roi_align": lambda: tv.ps_roi_align(tx_ps, tboxes, scale, size, size,
                                                         ratio)}
    # W1's boxes as rotated boxes (centre, size) turned by random angles.
    b = np.asarray(boxes.get() if hasattr(boxes, "get") else boxes, dtype=np.float64)
    angles = np.random.default_rng(1).uniform(-90, 90, len(b))
    rotated = np.stack([b[:, 0], (b[:, 1] + b[:, 3]) / 2, (b[:, 2] + b[:, 4]) / 2,
                        b[:, 3] - b[:, 1], b[:, 4] - b[:, 2], angles], axis=1)
    rotated = xp.asarray(rotated.astype(b.dtype if boxes.dtype == np.float64 else np.float32))
    rows += [
        Operation(f"roi_align_rotated forward, sampling_ratio {ratio}", {
            "curoi": lambda: curoi.roi_align_rotated(x, rotated, size, scale, ratio)}),
        Operation(f"roi_align_rotated backward, sampling_ratio {ratio}", {
            "curoi": lambda: curoi.roi_align_rotated_backward(gy, rotated, x.shape, size,
                                                              scale, ratio)}),
        Operation(f"roi_align_rotated boxes backward, sampling_ratio {ratio}", {
            "curoi": lambda: curoi.roi_align_rotated_boxes_backward(gy, x, rotated, size,
                                                                    scale, ratio)}),
    ]
    channels = f"C = {c_out * size * size}"
    rows += [
        Operation(f"ps_roi_pool forward, {channels}", {
            "curoi": lambda: curoi.ps_roi_pool(x_ps, boxes, size, scale),
            **({"torchvision": peers["ps_roi_pool"]} if peers else {})}),
        Operation(f"ps_roi_pool backward, {channels}", {
            "curoi": lambda: curoi.ps_roi_pool_backward(gy_ps, boxes, x_ps.shape, size,
                                                        scale)}),
        Operation(f"ps_roi_align forward, {channels}, sampling_ratio {ratio}", {
            "curoi": lambda: curoi.ps_roi_align(x_ps, boxes, size, scale, ratio),
            **({"torchvision": peers["ps_roi_align"]} if peers else {})}),
        Operation(f"ps_roi_align backward, {channels}, sampling_ratio {ratio}", {
            "curoi": lambda: curoi.ps_roi_align_backward(gy_ps, boxes, x_ps.shape, size,
                                                         scale, ratio)}),
    ]
    return rows


def _tensorflow(threads):
    """TensorFlow, with its CPU thread pools set to ``threads``, or None when
    it is not importable or already runs with another count (TensorFlow
    fixes its pools when it first runs an op)."""
    try:
        import tensorflow as tf
    except ImportError:
        return None
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # already initialised: usable only with the count it has
    if tf.config.threading.get_intra_op_parallelism_threads() != threads:
        return None
    return tf


#: Levels of W1's spatial pyramid pooling rows: SPPnet's.
SPP_LEVELS = (1, 2, 4)


def part2_operations(work, x, boxes, gy, xp=np):
    """W1's rows for the box gradients, Precise RoI Pooling and spatial
    pyramid pooling, on W1's boxes."""
    size, scale, ratio = work.output_size, work.spatial_scale, work.sampling_ratio
    rows = [Operation(f"roi_align boxes backward, sampling_ratio {ratio}", {
        "curoi": lambda: curoi.roi_align_boxes_backward(gy, x, boxes, size, scale, ratio,
                                                        True)})]
    rows += [
        Operation("prroi_pool forward", {
            "curoi": lambda: curoi.prroi_pool(x, boxes, size, scale)}),
        Operation("prroi_pool backward", {
            "curoi": lambda: curoi.prroi_pool_backward(gy, boxes, x.shape, size, scale)}),
        Operation("prroi_pool boxes backward", {
            "curoi": lambda: curoi.prroi_pool_boxes_backward(gy, x, boxes, size, scale)}),
    ]
    _, spp_argmax = curoi.roi_spp(x, boxes, SPP_LEVELS, scale, return_argmax=True)
    gy_spp = xp.ones(spp_argmax.shape, x.dtype)
    levels = "levels " + ", ".join(map(str, SPP_LEVELS))
    rows += [
        Operation(f"roi_spp forward, {levels}", {
            "curoi": lambda: curoi.roi_spp(x, boxes, SPP_LEVELS, scale)}),
        Operation(f"roi_spp backward, {levels}", {
            "curoi": lambda: curoi.roi_spp_backward(gy_spp, boxes, x.shape, SPP_LEVELS,
                                                    scale, argmax=spp_argmax)}),
    ]
    return rows


def crop_operations(work, dtype, threads, quick, xp=np):
    """The crop workload: TensorFlow's crop_and_resize on W1's features
    (channels-last, TensorFlow's layout) and boxes (normalised to the
    image, (y1, x1, y2, x2)), against TensorFlow itself when importable. A
    workload of its own, timed apart from W1's rows: in shared rounds, the
    rows timed after TensorFlow's ran slower."""
    x, boxes, rng = _inputs(WORKLOADS["W1"], dtype, quick, xp)
    size, scale = work.output_size, work.spatial_scale
    n, c, h, w = x.shape
    gy = xp.asarray(rng.standard_normal((len(boxes), c, size, size), dtype=np.float32)
                    .astype(x.dtype))
    # crop_and_resize: the boxes normalised to the image, (y1, x1, y2, x2).
    b = np.asarray(boxes.get() if hasattr(boxes, "get") else boxes, dtype=np.float64)
    image_w, image_h = w / scale, h / scale
    normalised = np.stack([b[:, 2] / (image_h - 1), b[:, 1] / (image_w - 1),
                           b[:, 4] / (image_h - 1), b[:, 3] / (image_w - 1)], axis=1)
    crop_boxes = xp.asarray(normalised.astype(np.float32))
    indices = xp.asarray(b[:, 0].astype(np.int32))
    image = xp.ascontiguousarray(x.transpose(0, 2, 3, 1))
    gy_crop = xp.ascontiguousarray(gy.transpose(0, 2, 3, 1))
    crop = {"forward": {"curoi": lambda: curoi.crop_and_resize(image, crop_boxes, indices,
                                                                (size, size))},
            "backward": {"curoi": lambda: curoi.crop_and_resize_backward(
                gy_crop, image, crop_boxes, indices, (size, size))}}
    tf = _tensorflow(threads) if xp is np and x.dtype == np.float32 else None
    if tf is not None:
        t_image, t_boxes, t_indices, t_grad = (tf.constant(a) for a in (
            image, crop_boxes, indices, gy_crop))
        t_size = tf.constant([size, size], tf.int32)
        crop["forward"]["tensorflow"] = lambda: tf.image.crop_and_resize(
            t_image, t_boxes, t_indices, t_size).numpy()

        def tf_backward():
            grad_image = tf.raw_ops.CropAndResizeGradImage(
                grads=t_grad, boxes=t_boxes, box_ind=t_indices,
                image_size=tf.constant(image.shape, tf.int32), T=tf.float32)
            grad_boxes = tf.raw_ops.CropAndResizeGradBoxes(
                grads=t_grad, image=t_image, boxes=t_boxes, box_ind=t_indices)
            return grad_image.numpy(), grad_boxes.numpy()

        crop["backward"]["tensorflow"] = tf_backward
    return [Operation(f"crop_and_resize forward, NHWC, {size}x{size}", crop["forward"]),
            Operation("crop_and_resize backward, image and boxes, NHWC", crop["backward"])]


def _fpn_levels(boxes, scales):
    """Each box's level index by torchvision's LevelMapper (canonical 224 px
    at level 4, eps 1e-6), on the host."""
    b = np.asarray(boxes.get() if hasattr(boxes, "get") else boxes, dtype=np.float64)
    area = (b[:, 3] - b[:, 1]) * (b[:, 4] - b[:, 2])
    with np.errstate(divide="ignore", invalid="ignore"):
        level = np.floor(4 + np.log2(np.sqrt(area) / 224) + 1e-6)
    first, last = -np.log2(scales[0]), -np.log2(scales[-1])
    return (np.clip(np.nan_to_num(level, nan=first), first, last) - first).astype(np.int64)


def pyramid_operations(work, dtype, threads, quick, xp=np):
    """The FPN rows: one multiscale launch against a launch per level."""
    rng = np.random.default_rng(0)
    n, c, h, w = _shape(work, quick)
    scales = [work.spatial_scale / 2**l for l in range(FPN_LEVELS)]
    features = [xp.asarray(rng.standard_normal((n, c, h >> l, w >> l), dtype=np.float32)
                           .astype(_numpy_dtype(dtype))) for l in range(FPN_LEVELS)]
    boxes = xp.asarray(detection_boxes(rng, _box_count(work, quick), n))
    size, ratio = work.output_size, work.sampling_ratio
    gy = xp.asarray(rng.standard_normal((len(boxes), c, size, size), dtype=np.float32)
                    .astype(features[0].dtype))
    shapes = [f.shape for f in features]

    def per_level_forward():
        level = _fpn_levels(boxes, scales)
        out = xp.zeros((len(boxes), c, size, size), features[0].dtype)
        for l, (x, scale) in enumerate(zip(features, scales)):
            picked = xp.asarray(np.flatnonzero(level == l))
            if len(picked):
                out[picked] = curoi.roi_align(x, boxes[picked], size, scale, ratio, False)
        return out

    def per_level_backward():
        level = _fpn_levels(boxes, scales)
        grads = []
        for l, (shape, scale) in enumerate(zip(shapes, scales)):
            picked = xp.asarray(np.flatnonzero(level == l))
            grads.append(curoi.roi_align_backward(gy[picked], boxes[picked], shape, size,
                                                  scale, ratio, False))
        return grads

    forward = {"curoi": lambda: curoi.multiscale_roi_align(features, boxes, size, scales,
                                                           ratio, False),
               "per-level launches": per_level_forward}
    backward = {"curoi": lambda: curoi.multiscale_roi_align_backward(
                    gy, boxes, shapes, size, scales, ratio, False),
                "per-level launches": per_level_backward}
    torch = _torchvision()
    if torch is not None:
        from torchvision.ops import MultiScaleRoIAlign

        names = [f"p{l + 2}" for l in range(FPN_LEVELS)]
        pooler = MultiScaleRoIAlign(names, size, ratio)
        maps = {name: torch.from_dlpack(x) for name, x in zip(names, features)}
        tboxes = torch.from_dlpack(boxes).to(maps[names[0]].dtype)
        per_image = [tboxes[tboxes[:, 0] == i, 1:] for i in range(n)]
        image_sizes = [(h * 4, w * 4)] * n
        forward["torchvision"] = lambda: pooler(maps, per_image, image_sizes)
    return [Operation(f"multiscale_roi_align forward, {FPN_LEVELS} levels", forward),
            Operation(f"multiscale_roi_align backward, {FPN_LEVELS} levels", backward)]


def tiny_operations(work, dtype, threads, quick):
    """One call on a tiny input, through each front end (CPU)."""
    x, boxes, _ = _inputs(work, dtype, quick)
    size, scale, ratio = work.output_size, work.spatial_scale, work.sampling_ratio
    rows = []
    numpy_call = {"curoi": lambda: curoi.roi_align(x, boxes, size, scale, ratio, True)}
    if _onnxruntime() is not None:
        numpy_call["onnxruntime"] = _onnx_roi_align(x, boxes, work, ratio, threads)
    rows.append(Operation("roi_align call, NumPy", numpy_call))
    try:
        import torch

        import curoi.torch as curoi_torch
    except ImportError:
        torch = None
    if torch is not None:
        tx, tboxes = torch.from_numpy(x), torch.from_numpy(boxes)
        torch_call = {"curoi": lambda: curoi_torch.roi_align(tx, tboxes, size, scale,
                                                             ratio, True)}
        if _torchvision() is not None:
            import torchvision.ops

            torch_call["torchvision"] = lambda: torchvision.ops.roi_align(
                tx, tboxes, size, scale, ratio, True)
        rows.append(Operation("roi_align call, curoi.torch", torch_call))
    try:
        import jax

        import curoi.jax as curoi_jax
    except ImportError:
        jax = None
    if jax is not None:
        jx, jboxes = jax.numpy.asarray(x), jax.numpy.asarray(boxes)
        jitted = jax.jit(lambda a, b: curoi_jax.roi_align(a, b, size, scale, ratio, True))
        rows.append(Operation("roi_align call, curoi.jax under jit", {
            "curoi": lambda: jitted(jx, jboxes).block_until_ready()}))
    for row in rows:
        row.contenders = {k: v for k, v in row.contenders.items() if v is not None}
    return rows


def stress_operations(work, dtype, threads, quick, xp=np):
    """Pathological boxes, and (CPU) deterministic against fixed point."""
    x, boxes, rng = _inputs(work, dtype, quick, xp)
    size, scale, ratio = work.output_size, work.spatial_scale, work.sampling_ratio
    huge = boxes.copy()
    huge[:, 1:3] = -1e9
    huge[:, 3:5] = 1e9
    rows = [
        Operation("roi_align forward, 1e9-px boxes, adaptive", {
            "curoi": lambda: curoi.roi_align(x, huge, size, scale, 0, True)}),
        Operation("roi_align forward, sampling_ratio 2**31-1", {
            "curoi": lambda: curoi.roi_align(x, boxes, size, scale, 2**31 - 1, True)}),
    ]
    if xp is not np or not hasattr(_ops, "FIXED_POINT_ON_CPU"):
        return rows
    gy = rng.standard_normal((len(boxes), x.shape[1], size, size),
                             dtype=np.float32).astype(x.dtype)
    _, argmax = curoi.roi_pool(x, boxes, size, scale, return_argmax=True)

    def fixed_point(run):
        # The CPU's own backward is deterministic already; this runs the
        # GPU's int64 fixed-point sum through the CPU backend to price it.
        def timed():
            _ops.FIXED_POINT_ON_CPU = True
            try:
                return run()
            finally:
                _ops.FIXED_POINT_ON_CPU = False
        return timed

    def align(): return curoi.roi_align_backward(gy, boxes, x.shape, size, scale, ratio,
                                                 True, deterministic=True)

    def pool(): return curoi.roi_pool_backward(gy, argmax, boxes, x.shape,
                                               deterministic=True)

    rows.append(Operation("roi_align backward, deterministic",
                          {"curoi": align, "fixed point": fixed_point(align)}))
    rows.append(Operation("roi_pool backward, deterministic",
                          {"curoi": pool, "fixed point": fixed_point(pool)}))
    return rows


# Report -----------------------------------------------------------------

def _median(values):
    return statistics.median(values) if values else None


def _description(work, dtype, quick, device):
    n, c, h, w = _shape(work, quick)
    if work.name == "FPN":
        return (f"{work.name}: {work.title}, {dtype} [{n}, {c}, {h}, {w}] at "
                f"1/{round(1 / work.spatial_scale)} and {FPN_LEVELS - 1} coarser levels, "
                f"{_box_count(work, quick)} boxes, {work.output_size}x{work.output_size}, "
                f"sampling_ratio {work.sampling_ratio}, not aligned; {device}; milliseconds")
    if work.name == "crop":
        return (f"{work.name}: {work.title}, {dtype} [{n}, {h}, {w}, {c}] (NHWC), "
                f"{_box_count(work, quick)} boxes of W1, crop {work.output_size}x"
                f"{work.output_size}, bilinear; {device}; milliseconds")
    if work.name == "tiny":
        return (f"{work.name}: {work.title}, {dtype} [{n}, {c}, {h}, {w}], "
                f"{_box_count(work, quick)} box, {work.output_size}x{work.output_size}; "
                "microseconds per call")
    return (f"{work.name}: {work.title}, {dtype} [{n}, {c}, {h}, {w}], "
            f"{_box_count(work, quick)} boxes, {work.output_size}x{work.output_size}, "
            f"spatial_scale 1/{round(1 / work.spatial_scale)}, aligned; {device}; "
            "milliseconds")


def format_table(results):
    """One Markdown table for the rows of one workload and dtype."""
    peers = []
    for result in results:
        for name in result["peers"]:
            if name not in peers:
                peers.append(name)
    unit = results[0]["unit"]
    threads_seen = {r["threads"] for r in results}
    speedup = 1 in threads_seen and len(threads_seen) > 1
    one_thread = {r["operation"]: r["curoi"] for r in results if r["threads"] == 1}
    header = ["operation", "threads", f"curoi {unit}"]
    for peer in peers:
        header += [f"{peer} {unit}", f"curoi / {peer}"]
    if speedup:
        header.append("curoi 1 thread / this")
    lines = []
    for r in results:
        line = [r["operation"], "" if r["threads"] is None else str(r["threads"]),
                _number(r["curoi"])]
        for peer in peers:
            theirs = r["peers"].get(peer)
            line.append(_number(theirs))
            line.append(_ratio(r["curoi"] / theirs) if theirs else "")
        if speedup:
            base = one_thread.get(r["operation"])
            line.append(_ratio(base / r["curoi"]) if base and r["threads"] != 1 else "")
        lines.append(line)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def row(cells):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    return "\n".join([row(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [row(line) for line in lines])


def _ratio(value):
    # Two decimals, but never a ratio shown as 0.00.
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def _number(value):
    if value is None:
        return ""
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}"


def _pyplot():
    """matplotlib's pyplot, drawing to files; a clear exit without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(
            "--plot needs matplotlib, which is not installed: "
            "`pip install -e \".[plot]\"` in curoi's folder, or `pip install matplotlib`"
        ) from error
    return plt


def write_plot(path, tables):
    """A PNG bar chart: one panel per table, one group of bars per row."""
    plt = _pyplot()
    figure, axes = plt.subplots(len(tables), 1, squeeze=False,
                                figsize=(10, 1.5 + 0.5 * sum(len(t[1]) for t in tables)))
    for axis, (title, results) in zip(axes[:, 0], tables):
        names = ["curoi"] + sorted({p for r in results for p in r["peers"]})
        labels = [r["operation"] + ("" if r["threads"] is None else f", {r['threads']}t")
                  for r in results]
        height = 0.8 / len(names)
        for i, name in enumerate(names):
            values = [(r["curoi"] if name == "curoi" else r["peers"].get(name)) or 0
                      for r in results]
            axis.barh([k + i * height for k in range(len(results))], values, height,
                      label=name)
        axis.set_yticks([k + 0.4 - height / 2 for k in range(len(results))])
        axis.set_yticklabels(labels, fontsize=7)
        axis.invert_yaxis()
        axis.set_xlabel(results[0]["unit"])
        axis.set_title(title, fontsize=8)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# Command ----------------------------------------------------------------

def _thread_counts(text):
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(
            f"expected positive thread counts separated by commas, like 1,2; got {text!r}")
    return counts


def _workloads(text):
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in WORKLOADS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected workloads among {', '.join(WORKLOADS)} separated by commas; "
            f"got {text!r}")
    return names


#: --rows: the separator between alternatives (row names contain commas).
ROW_SEPARATOR = "|"


def _row_filters(text):
    if text.strip().lower() == "help":
        return "help"
    filters = [part.strip().lower() for part in text.split(ROW_SEPARATOR) if part.strip()]
    if not filters:
        raise argparse.ArgumentTypeError(
            f"expected parts of row names separated by {ROW_SEPARATOR!r}, like "
            f"'roi_pool backward|forward, NHWC', or 'help' for the names; got {text!r}")
    return filters


def selected(operations, filters):
    """The operations whose label contains one of ``filters`` (lower-case
    substrings; None keeps every operation)."""
    if filters is None:
        return list(operations)
    return [op for op in operations if any(f in op.label.lower() for f in filters)]


def parser():
    p = argparse.ArgumentParser(
        prog="python3 -m curoi bench", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--workload", type=_workloads, default=["W1"],
                   help="comma-separated: W1, W2, FPN, crop, tiny, stress (default W1)")
    p.add_argument("--threads", type=_thread_counts, default=None,
                   help="CPU thread counts, comma-separated, e.g. 1,2 "
                        "(default: curoi.get_num_threads())")
    p.add_argument("--rows", type=_row_filters, default=None,
                   metavar="SUBSTRING[|SUBSTRING]",
                   help="only the rows whose name contains one of these, ignoring case "
                        "(e.g. 'roi_pool backward' or 'forward, NHWC|adaptive'; default: "
                        "all); 'help' lists the workloads' row names and exits")
    p.add_argument("--repeat", type=int, default=9,
                   help="timed repeats per row; the table shows medians (default 9)")
    p.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"),
                   default=None,
                   help="feature dtype (default float32; on CUDA float32 and float16)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", metavar="PATH", help="write the raw figures here")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart here (matplotlib)")
    p.add_argument("--kernels", action="store_true",
                   help="also print the static GPU kernel report (NVRTC: float64 "
                        "instructions, registers, spills per kernel) and the GPU "
                        "loops' instructions per output element (valgrind)")
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None, stdout=None, stderr=None):
    stdout = sys.stdout if stdout is None else stdout
    args = parser().parse_args(argv)
    if args.repeat < 1:
        parser().error(f"--repeat: expected a positive count, got {args.repeat}")
    cuda = args.device == "cuda"
    if cuda:
        if _gpu.device_count() < 1:
            raise SystemExit("--device cuda: no usable CUDA device (CuPy sees none)")
        import cupy as xp

        threads = [None]
        dtypes = [args.dtype] if args.dtype else ["float32", "float16"]
        timed_boxes = _cuda_timer(xp)
        device = f"CUDA {_device_name(xp)}, CuPy {xp.__version__}"
    else:
        xp = np
        threads = args.threads or [curoi.get_num_threads()]
        dtypes = [args.dtype or "float32"]
        timed_boxes = _wall_timer(1e3)
        device = "CPU"
    tiny_calls = QUICK_CALLS if args.quick else TINY_CALLS
    if args.plot:
        _pyplot()  # before the run, not after it

    plan = []  # (workload, dtype, threads, operations)
    for name in args.workload:
        work = WORKLOADS[name]
        if name == "tiny" and cuda:
            print("tiny: measured on the CPU only; skipped with --device cuda",
                  file=sys.stderr)
            continue
        for dtype in dtypes:
            for count in threads:
                _set_threads(count)
                if name == "tiny":
                    ops = tiny_operations(work, dtype, count, args.quick)
                elif name == "stress":
                    ops = stress_operations(work, dtype, count, args.quick, xp)
                elif name == "FPN":
                    ops = pyramid_operations(work, dtype, count, args.quick, xp)
                elif name == "crop":
                    ops = crop_operations(work, dtype, count, args.quick, xp)
                else:
                    ops = box_operations(work, dtype, count, args.quick, xp)
                if args.rows == "help":
                    plan.append((work, dtype, count, ops))
                    continue
                ops = selected(ops, args.rows)
                if ops:
                    plan.append((work, dtype, count, ops))
    if args.rows == "help":
        for work in dict.fromkeys(w for w, *_ in plan):
            print(f"{work.name}:", file=stdout)
            labels = [op.label for w, _, _, ops in plan if w is work for op in ops]
            for label in dict.fromkeys(labels):
                print(f"  {label}", file=stdout)
        return 0
    if not plan and args.rows is not None:
        raise SystemExit(f"--rows: no row of {', '.join(args.workload)} has a name "
                         f"containing {' or '.join(map(repr, args.rows))}")

    # Every operation of a workload, at every thread count, is timed once
    # per round, round after round: the ratios to the peers and the speedup
    # over one thread then compare times taken side by side, which a noisy
    # machine would otherwise skew.
    progress = Progress(sum(len(ops) for *_, ops in plan) * (args.repeat + 1),
                        stream=stderr)
    results = []
    for name in dict.fromkeys(work.name for work, *_ in plan):
        entries = [entry for entry in plan if entry[0].name == name]
        timed = (_wall_timer(1e6, tiny_calls) if name == "tiny" else timed_boxes)
        live = {}
        for round_ in range(args.repeat + 1):
            for work, dtype, count, ops in entries:
                _set_threads(count)
                for operation in ops:
                    if round_ == 0:
                        live[id(operation)] = warm(operation)
                    else:
                        time_round(operation, live[id(operation)], timed)
                    progress.step(f"{work.name} {dtype} {operation.label}"
                                  + ("" if count is None else
                                     f", {count} thread{'s' if count > 1 else ''}"))
        for work, dtype, count, ops in entries:
            for operation in ops:
                results.append(_result(work, dtype, count, operation))

    print(f"curoi {curoi.__version__}, {device}, {platform.machine()} with "
          f"{_cpu_count()} cores; median of {args.repeat} interleaved repeats\n",
          file=stdout)
    tables = []
    for work in dict.fromkeys(w for w, *_ in plan):
        for dtype in dtypes:
            rows = [r for r in results if r["workload"] == work.name and r["dtype"] == dtype]
            if not rows:
                continue
            title = _description(work, dtype, args.quick,
                                 "CPU" if not cuda else "CUDA events")
            tables.append((title, rows))
            print(f"### {title}\n\n{format_table(rows)}\n", file=stdout)
            notes = _notes(rows, cuda)
            if notes:
                print(notes + "\n", file=stdout)

    report = work = None
    if args.kernels:
        report = _print_kernel_report(stdout, stderr)
        work = _print_kernel_work(stdout)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({
                "curoi": curoi.__version__,
                "device": device,
                "cores": _cpu_count(),
                "repeat": args.repeat,
                "quick": args.quick,
                "peers": _peer_versions(),
                "results": results,
                "kernels": report,
                "kernel_work": work,
            }, handle, indent=1)
    if args.plot:
        write_plot(args.plot, tables)
    return 0


def _result(work, dtype, threads, operation):
    unit = "us" if work.name == "tiny" else "ms"
    return {
        "workload": work.name, "dtype": dtype, "threads": threads,
        "operation": operation.label, "unit": unit,
        "curoi": _median(operation.samples["curoi"]),
        "peers": {name: _median(values) for name, values in operation.samples.items()
                  if name != "curoi"},
        "samples": operation.samples,
        "failed": operation.failed,
    }


def _notes(rows, cuda):
    notes = []
    if not cuda and any("torchvision" in r["peers"] for r in rows):
        notes.append("torchvision's CPU kernels are single-threaded: its column does "
                     "not change with the thread count.")
    for r in rows:
        for peer, error in r["failed"].items():
            notes.append(f"{peer} failed on {r['operation']}: {error}")
    if any("fixed point" in r["peers"] for r in rows):
        notes.append("fixed point: the GPU's int64 fixed-point sum run through the "
                     "CPU backend; the CPU's own backward is deterministic already.")
    return "\n".join(notes)


def _print_kernel_report(stdout, stderr=None):
    from curoi import _kernel_report

    progress = None

    def compiled(done, total):
        nonlocal progress
        progress = progress or Progress(total, stream=stderr)
        progress.step("NVRTC: kernel report")

    try:
        version = _kernel_report.nvrtc_version()
        rows = _kernel_report.report(progress=compiled)
    except _kernel_report.KernelReportError as error:
        print(f"Kernel report unavailable: {error}", file=stdout)
        return None
    print(f"### GPU kernels (NVRTC {version}, no GPU needed): float64 instructions "
          "in the PTX, registers and spills from ptxas\n", file=stdout)
    print(_kernel_report.format_table(rows) + "\n", file=stdout)
    return [dataclasses.asdict(row) for row in rows]


def _print_kernel_work(stdout):
    from curoi import _kernel_work

    try:
        rows = _kernel_work.report()
    except _kernel_work.KernelWorkError as error:
        print(f"Work per output element unavailable: {error}", file=stdout)
        return None
    print("### GPU loops: instructions per output element (callgrind, the GPU "
          f"loops' CPU build, float32, {_kernel_work.BOXES} boxes with the full "
          "call's tiles)\n", file=stdout)
    print(_kernel_work.format_table(rows) + "\n", file=stdout)
    return [dict(zip(("workload", "kernel", "entry", "tiled", "one_channel"), row))
            for row in rows]


def _set_threads(count):
    if count is None:
        return
    curoi.set_num_threads(count)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(count)


def _device_name(cupy):
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else name


def _cpu_count():
    try:
        import os

        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        import os

        return os.cpu_count()


def _peer_versions():
    found = {}
    for module in ("onnxruntime", "torch", "torchvision", "jax"):
        try:
            found[module] = __import__(module).__version__
        except Exception:
            found[module] = None
    return found


if __name__ == "__main__":
    sys.exit(main())

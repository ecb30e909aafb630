"""Time curoi's operators on a detection-sized workload and print a table.

    python3 benchmarks/roi_ops.py                 # GPU if usable, else CPU
    python3 benchmarks/roi_ops.py --device cpu --threads 2 --repeat 10

The workload is a Faster R-CNN batch: features 2 x 256 x 50 x 68 (two
800 x 1088 images at stride 16), 512 proposals from 16 px to half the image,
7 x 7 output, spatial_scale 1/16, sampling_ratio 2, aligned. The backward rows
compare deterministic=True with the plain backward, measured side by side in
the same run: on the GPU, the int64 fixed-point sum against atomic float
adds; on the CPU, whose own sum is deterministic, the fixed-point kernels
are timed too. The last rows show that pathological boxes
(1e9-pixel boxes, sampling_ratio 2**31 - 1) cost about as much as ordinary
ones. Where onnxruntime is installed, its CPU RoiAlign and MaxRoiPool run the
same forward passes for comparison.
"""

import argparse
import statistics
import sys
import time

import numpy as np

import curoi
from curoi import _gpu, _ops
from curoi._demo import _realistic_boxes

N, C, H, W, K, POOLED, SCALE, RATIO = 2, 256, 50, 68, 512, 7, 1 / 16, 2


def _timer(xp):
    """A function that times one call in milliseconds on the backend."""
    if xp is np:
        def timed(run):
            start = time.perf_counter()
            run()
            return (time.perf_counter() - start) * 1e3
        return timed

    def timed(run):
        start, stop = xp.cuda.Event(), xp.cuda.Event()
        start.record()
        run()
        stop.record()
        stop.synchronize()
        return xp.cuda.get_elapsed_time(start, stop)
    return timed


def _median_ms(timed, run, repeat):
    run()  # compiles and warms the caches
    return statistics.median(timed(run) for _ in range(repeat))


def _workload(xp, rng):
    features = xp.asarray(rng.standard_normal((N, C, H, W), dtype=np.float32))
    boxes = xp.asarray(_realistic_boxes(rng, K, N, H * 16, W * 16))
    return features, boxes


def _curoi_rows(xp, repeat):
    rng = np.random.default_rng(0)
    x, boxes = _workload(xp, rng)
    timed = _timer(xp)
    y = curoi.roi_align(x, boxes, POOLED, SCALE, RATIO, True)
    gy = xp.asarray(rng.standard_normal(y.shape, dtype=np.float32))
    pooled, argmax = curoi.roi_pool(x, boxes, POOLED, SCALE, return_argmax=True)

    def align_backward(deterministic):
        return lambda: curoi.roi_align_backward(
            gy, boxes, x.shape, POOLED, SCALE, RATIO, True,
            deterministic=deterministic)

    def pool_backward(deterministic):
        return lambda: curoi.roi_pool_backward(
            gy, argmax, boxes, x.shape, deterministic=deterministic)

    def backward_rows(family, backward):
        plain = _median_ms(timed, backward(False), repeat)
        deterministic = _median_ms(timed, backward(True), repeat)
        found = [(f"{family} backward", plain, None),
                 (f"{family} backward, deterministic", deterministic,
                  deterministic / plain)]
        if xp is np:
            # The CPU's own sum is deterministic already; time the GPU's
            # fixed-point sum through the CPU backend too, for comparison.
            _ops.FIXED_POINT_ON_CPU = True
            try:
                fixed = _median_ms(timed, backward(True), repeat)
            finally:
                _ops.FIXED_POINT_ON_CPU = False
            found.append((f"{family} backward, fixed point", fixed, fixed / plain))
        return found

    rows = []
    t = _median_ms(timed, lambda: curoi.roi_align(x, boxes, POOLED, SCALE, RATIO, True),
                   repeat)
    rows.append(("roi_align forward", t, None))
    rows += backward_rows("roi_align", align_backward)
    t = _median_ms(timed, lambda: curoi.roi_pool(x, boxes, POOLED, SCALE), repeat)
    rows.append(("roi_pool forward", t, None))
    rows += backward_rows("roi_pool", pool_backward)

    # Pathological inputs: same number of boxes, work bounded by the map.
    huge = boxes.copy()
    huge[:, 1:3] = -1e9
    huge[:, 3:5] = 1e9
    t = _median_ms(timed, lambda: curoi.roi_align(x, huge, POOLED, SCALE, -1, True),
                   repeat)
    rows.append(("roi_align forward, 1e9-px boxes, adaptive", t, None))
    t = _median_ms(timed, lambda: curoi.roi_align(x, boxes, POOLED, SCALE, 2**31 - 1,
                                                  True), repeat)
    rows.append(("roi_align forward, sampling_ratio 2**31-1", t, None))
    return rows, (x, boxes)


def _onnxruntime_rows(x, boxes, repeat):
    try:
        import onnx
        import onnxruntime
        from onnx import TensorProto, helper
    except ImportError:
        return []
    rois = np.ascontiguousarray(boxes[:, 1:])
    batch = boxes[:, 0].astype(np.int64)
    nodes = {
        "onnxruntime RoiAlign forward": (
            helper.make_node("RoiAlign", ["X", "rois", "batch_indices"], ["Y"],
                             output_height=POOLED, output_width=POOLED,
                             sampling_ratio=RATIO, spatial_scale=SCALE,
                             coordinate_transformation_mode="half_pixel"),
            {"X": x, "rois": rois, "batch_indices": batch}),
        "onnxruntime MaxRoiPool forward": (
            helper.make_node("MaxRoiPool", ["X", "rois"], ["Y"],
                             pooled_shape=[POOLED, POOLED], spatial_scale=SCALE),
            {"X": x, "rois": boxes}),
    }
    rows = []
    for label, (node, feeds) in nodes.items():
        inputs = [helper.make_tensor_value_info(
            name, TensorProto.INT64 if value.dtype == np.int64 else TensorProto.FLOAT,
            value.shape) for name, value in feeds.items()]
        graph = helper.make_graph([node], "g", inputs,
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)],
                                  ir_version=8)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = curoi.get_num_threads()
        session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                               providers=["CPUExecutionProvider"])
        t = _median_ms(_timer(np), lambda: session.run(None, feeds), repeat)
        rows.append((label, t, None))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: curoi.get_num_threads())")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args(argv)
    if args.threads is not None:
        curoi.set_num_threads(args.threads)
    use_gpu = args.device == "cuda" or (args.device == "auto" and _gpu.device_count() > 0)
    if use_gpu:
        import cupy as xp

        props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        where = f"GPU {name}, CuPy {xp.__version__}"
    else:
        xp = np
        where = f"CPU, {curoi.get_num_threads()} threads"
    print(f"curoi {curoi.__version__} on {where}; median of {args.repeat} runs")
    print(f"features {N}x{C}x{H}x{W} float32, {K} boxes, output {POOLED}x{POOLED}, "
          f"spatial_scale 1/16, sampling_ratio {RATIO}, aligned\n")
    rows, (x, boxes) = _curoi_rows(xp, args.repeat)
    if xp is np:
        rows += _onnxruntime_rows(x, boxes, args.repeat)
    width = max(len(label) for label, _, _ in rows)
    print(f"| {'operation':<{width}} | {'ms':>9} | {'vs plain':>9} |")
    print(f"|{'-' * (width + 2)}|{'-' * 11}|{'-' * 11}|")
    for label, ms, ratio in rows:
        shown = f"{ratio:.2f}x" if ratio is not None else ""
        print(f"| {label:<{width}} | {ms:9.2f} | {shown:>9} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

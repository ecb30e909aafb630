"""RoI Align (average pooling), forward and backward."""

from . import _boxes, _fast, _launch, _ops, _validate
from ._interop import Caller

_FEATURES = "[N, C, H, W]"
_GRAD = "[K, C, PH, PW]"
_OUTPUT = "the output [K, C, PH, PW] (boxes, channels, output_size)"
_GRAD_INPUT = "the gradient [N, C, H, W] (input_shape)"


def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1,
              aligned=False):
    """RoI Align: average of bilinearly interpolated samples in each bin.

    The numbers are those of torchvision's ``roi_align``, detectron2's
    ``ROIAlign`` and ONNX ``RoiAlign`` (avg).

    Args:
        input: features ``[N, C, H, W]``, float16, bfloat16, float32 or
            float64; a NumPy, CuPy, PyTorch or JAX array, or any DLPack array.
            CuPy and CUDA arrays run on the GPU, others on the CPU. On the CPU,
            float16 and bfloat16 are computed in float32 and rounded back.
        boxes: ``[K, 5]`` rows of ``(batch index, x1, y1, x2, y2)``, or a list
            of ``[L, 4]`` arrays of ``(x1, y1, x2, y2)``, one per image, in
            input-image coordinates, on the same device as ``input``. Boxes
            are used in float32 (float64 for float64 input) whatever the
            feature precision. A box whose batch index is not finite or not
            in ``[0, N)``, or with a non-finite coordinate, gives zeros.
        output_size: ``(PH, PW)`` or an int for both: bins per box.
        spatial_scale: factor from box to feature coordinates, e.g. 1/16.
        sampling_ratio: samples per bin side; ``<= 0`` means adaptive,
            ``ceil(box size / output size)`` per axis.
        aligned: shift the box by -0.5 pixel (``True``, pixel centres at
            half-integers, detectron2's and ONNX ``half_pixel``), or use the
            legacy convention with boxes of at least one pixel (``False``).

    Returns:
        ``[K, C, PH, PW]`` of the input's dtype, the caller's kind of array
        on the input's device.

    A sample outside ``[-1, H] x [-1, W]`` contributes 0 but counts in the
    bin's divisor; samples in that band are clamped to the map's edge.
    Samples that cannot land on the map are skipped without being computed:
    the same numbers, and with adaptive sampling a huge box costs no more
    than one the size of the map.
    """
    ph, pw = _validate.output_size(output_size)
    scale = _validate.spatial_scale(spatial_scale)
    ratio = _validate.sampling_ratio(sampling_ratio)
    aligned = _validate.flag(aligned, "aligned")
    fast = _fast.numpy_arrays(input, boxes)
    if fast is not None:
        _validate.scale_for(scale, fast)
        out = _fast.roi_align_forward(input, boxes, fast, ph, pw, scale, ratio,
                                      aligned)
        if out is not None:
            return out
    caller = Caller(input, "input")
    with caller.on_device():
        x, storage = _launch.features(caller, input, "input", _FEATURES)
        _validate.scale_for(scale, _launch.accumulation_dtype(storage))
        n, c, h, w = x.shape
        rois = _boxes.to_rois(boxes, caller, n, _launch.accumulation_dtype(storage))
        k = rois.shape[0]
        dtype = _launch.kernel_dtype(caller, storage)
        cast = _launch.cast_back(caller, storage, dtype)
        out, native = caller.new((k, c, ph, pw), dtype, native=cast is None,
                                 zeroed=False, what=_OUTPUT)
        _ops.roi_align_forward(_launch.as_kernel_input(x, dtype), rois, out,
                               scale, ratio, aligned)
        return caller.result(out, native, cast)


def roi_align_backward(grad_output, boxes, input_shape, output_size,
                       spatial_scale=1.0, sampling_ratio=-1, aligned=False, *,
                       deterministic=False):
    """Gradient of :func:`roi_align` with respect to its input.

    Args:
        grad_output: ``[K, C, PH, PW]``, the gradient of the pooled output.
        boxes: as given to :func:`roi_align` (``[K, 5]`` or a list).
        input_shape: ``(N, C, H, W)`` of the forward input.
        output_size, spatial_scale, sampling_ratio, aligned: as in the forward.
        deterministic: make the result bitwise the same in every run, on
            every thread count and launch configuration (see below).

    Returns:
        ``[N, C, H, W]`` of grad_output's dtype. Gradients accumulate in
        float32 (float64 for float64) and are rounded to half precision once
        at the end. Boxes that the forward ignores get no gradient.

    On the CPU every gradient plane is summed by one thread in a fixed
    order, so results are bitwise reproducible whatever ``deterministic``
    says. On the GPU the plain sum uses floating-point atomic adds, whose
    order varies, so results may differ in the last bits from run to run;
    with ``deterministic=True`` every term is rounded to a multiple of
    ``2**-e`` and summed exactly in 64-bit integers, where ``e`` is chosen
    from ``max|grad_output|`` so that no sum can overflow; see the README's
    guarantees for the precision this gives.
    """
    ph, pw = _validate.output_size(output_size)
    scale = _validate.spatial_scale(spatial_scale)
    ratio = _validate.sampling_ratio(sampling_ratio)
    aligned = _validate.flag(aligned, "aligned")
    deterministic = _validate.flag(deterministic, "deterministic")
    n, c, h, w = _validate.input_shape(input_shape)
    caller = Caller(grad_output, "grad_output")
    with caller.on_device():
        g, storage = _launch.features(caller, grad_output, "grad_output", _GRAD)
        _validate.scale_for(scale, _launch.accumulation_dtype(storage))
        rois = _boxes.to_rois(boxes, caller, n, _launch.accumulation_dtype(storage))
        k = rois.shape[0]
        expected = (k, c, ph, pw)
        if tuple(g.shape) != expected:
            raise ValueError(
                f"grad_output must have shape (K, C, PH, PW) = {expected} from "
                f"boxes, input_shape and output_size, got {tuple(g.shape)}"
            )
        dtype = _launch.kernel_dtype(caller, storage)
        acc = _launch.accumulation_dtype(storage)
        cast = _launch.cast_back(caller, storage, acc)
        # Allocated zeroed: the OS hands out zero pages lazily, so a huge,
        # sparsely hit gradient costs only the pages the kernel writes.
        grad_input, native = caller.new((n, c, h, w), acc, native=cast is None,
                                        what=_GRAD_INPUT)
        _ops.roi_align_backward(_launch.as_kernel_input(g, dtype), rois,
                                grad_input, scale, ratio, aligned, deterministic,
                                zeroed=True)
        return caller.result(grad_input, native, cast)

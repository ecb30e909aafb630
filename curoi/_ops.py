"""The operators on kernel views: what every front end runs once arguments
are checked and arrays are on their device.

Arrays here are C-contiguous, native-endian NumPy arrays (CPU backend) or
CuPy arrays (GPU backend, run on the current CuPy device and stream):

- features and gradients of outputs in a kernel dtype: float32 or float64
  on the CPU, also float16 and bfloat16 on the GPU;
- ``rois``: ``[K, 5]`` (batch index, x1, y1, x2, y2), rotated boxes
  ``[K, 6]`` (batch index, cx, cy, w, h, angle), in the accumulation dtype
  (float64 for float64 features, else float32);
- outputs are written entirely: forward outputs ``[K, C, PH, PW]`` in the
  features' dtype (``argmax`` int64), gradients of the features
  ``[N, C, H, W]`` in the accumulation dtype;
- with ``channels_last=True`` every feature-like array is channels-last
  instead: features and their gradients ``[N, H, W, C]``, outputs and
  ``argmax`` ``[K, PH, PW, C]`` (argmax still the flat ``h * W + w``).

The public functions (curoi.roi_align, ...), curoi.torch and curoi.jax all
end here, so every front end gets the same numbers.
"""

import contextlib
import threading

import numpy as np

from . import _cpu, _gpu, _kernels, _memory


# dtype -> name, without numpy's dtype.name (microseconds a call).
_NAMES = {np.dtype(n): n for n in ("float16", "float32", "float64")}


def _name(dtype):
    name = _NAMES.get(dtype)
    return dtype.name if name is None else name


def _is_cuda(array):
    return not isinstance(array, np.ndarray)


def _xp(array):
    return np if isinstance(array, np.ndarray) else _gpu.require_cupy()


def _run(family, direction, dtype, args, total, cuda):
    if total == 0:
        return
    if cuda:
        _gpu.launch(family, direction, dtype, args, total)
    else:
        _cpu.launch(family, direction, dtype, args)


#: Threads a GPU launch of the tiled loops aims at (curoi_channel_tile in
#: curoi_common.cuh): about two of an H100's full waves at 64 registers a
#: thread. Fewer channels a thread would only add geometry; more would leave
#: SMs idle.
TILE_THREADS = 2 ** 18

#: The most channels one GPU thread takes.
MAX_CHANNEL_TILE = 32


def channel_groups(bins, channels):
    """How many groups the ``channels`` of each of ``bins`` (box, bin)
    pairs are split into on the GPU, one thread per group: tiles as large as
    MAX_CHANNEL_TILE while the launch keeps TILE_THREADS threads, down to one
    channel a thread for small calls."""
    if bins <= 0 or channels <= 0:
        return 1
    tile = bins * channels // TILE_THREADS
    tile = max(1, min(MAX_CHANNEL_TILE, tile, channels))
    return -(-channels // tile)


#: Threads of the scale's launch on a GPU: each strides over its share of
#: the gradient, and each warp folds its threads' maxima into one atomic, so
#: a few thousand atomics meet at the result whatever the gradient's size.
SCALE_THREADS = 2 ** 17


def _finite_max_abs(grad_output, max_abs, cuda):
    """max |grad_output| over its finite entries (0 if none) into
    ``max_abs``, a zeroed float64 array of one element on grad_output's
    device: one reading pass (fixed_point.cu), and the kernels read the
    result there, so the GPU never waits for the host."""
    _run("fixed_point", "scale", _name(grad_output.dtype),
         (grad_output, grad_output.size, max_abs),
         min(grad_output.size, SCALE_THREADS), cuda)


#: Run the fixed-point sum on the CPU too when asked for determinism. The
#: CPU's plain sum is already deterministic (each gradient plane is summed by
#: one thread in a fixed order: see curoi_owned_channels), and faster, so
#: it is the default; the tests turn this on to run the GPU's fixed-point
#: kernels through the CPU backend.
FIXED_POINT_ON_CPU = False

_pinned = threading.local()


@contextlib.contextmanager
def fixed_point_on_cpu(value):
    """FIXED_POINT_ON_CPU as ``value`` for the launches inside, whatever the
    module's flag says meanwhile: curoi.jax sizes a launch's workspace when
    it traces the program and runs the launch under the same choice."""
    previous = getattr(_pinned, "value", None)
    _pinned.value = bool(value)
    try:
        yield
    finally:
        _pinned.value = previous


def uses_fixed_point_on_cpu():
    pinned = getattr(_pinned, "value", None)
    return FIXED_POINT_ON_CPU if pinned is None else pinned


def backward_scratch(size, deterministic, cuda):
    """The temporaries, as (shape, dtype) pairs in the order they are taken,
    of a backward whose gradients hold ``size`` elements: the deterministic
    flavour's scale (one float64) and int64 fixed-point sums where it runs
    (on a GPU, or on the CPU with FIXED_POINT_ON_CPU); none otherwise."""
    if deterministic and (cuda or uses_fixed_point_on_cpu()):
        return [((1,), np.float64), ((size,), np.int64)]
    return []


def boxes_scratch(k, ph, pw, columns, acc):
    """The temporaries of a box gradient in two passes: each (box, bin)'s
    partial sums of its ``columns`` box coordinates, in ``acc``."""
    return [((k, ph * pw, columns), np.dtype(acc))]


def roi_align_boxes_scratch(k, ph, pw, acc):
    """The temporaries of :func:`roi_align_boxes_backward` (and of
    :func:`crop_and_resize_boxes_backward`: four corners too)."""
    return boxes_scratch(k, ph, pw, 4, acc)


def roi_align_rotated_boxes_scratch(k, ph, pw, acc):
    """The temporaries of :func:`roi_align_rotated_boxes_backward`: the
    centre, size and angle."""
    return boxes_scratch(k, ph, pw, 5, acc)


def _nchw(shape, channels_last):
    """A 4-D shape in [N, C, H, W] order, whichever layout it has."""
    if channels_last:
        return shape[0], shape[3], shape[1], shape[2]
    return tuple(shape)


def _backward(family, args, grad_output, grad_input, deterministic, zeroed,
              terms, levels=None, threads=None):
    """Launch ``family``'s backward. On the GPU the deterministic flavour
    sums in int64 fixed point and then adds the sums into grad_input (see
    CuroiFixedSum in curoi_common.cuh); the plain one adds atomically.
    ``args`` are the kernels' arguments before the sum's; grad_input
    follows them.

    ``levels`` is for families that write several gradients (one per level
    of a pyramid) and take them in a table among ``args``: grad_input is
    then their list, the fixed-point sums of every gradient lie back to
    back in one int64 buffer, and fixed_finish takes ``levels`` (its
    arguments after ``terms``) where it would take (total, grad_input).

    ``threads`` is the size of the backward's GPU launch when it is not a
    thread per element of grad_output (the tiled loops).
    """
    cuda = _is_cuda(grad_output)
    dtype = _name(grad_output.dtype)
    grads = grad_input if levels is not None else (grad_input,)
    if not zeroed:
        for grad in grads:
            grad.fill(0)
    size = sum(grad.size for grad in grads)
    if size == 0:
        return
    sum_args, finish = ((), levels) if levels is not None else (
        (grad_input,), (size, grad_input))
    scratch = backward_scratch(size, deterministic, cuda)
    if threads is None:
        threads = grad_output.size
    if not scratch:
        _run(family, "backward", dtype, args + sum_args, threads, cuda)
        return
    xp = _xp(grad_output)
    max_abs, fixed = (_memory.zeros(xp, shape, kind) for shape, kind in scratch)
    _finite_max_abs(grad_output, max_abs, cuda)
    _run(family, "backward_fixed", dtype, args + (max_abs, fixed) + sum_args,
         threads, cuda)
    _run(family, "fixed_finish", dtype, (fixed, max_abs, terms) + finish,
         size, cuda)


def roi_align_forward(x, rois, out, spatial_scale, sampling_ratio, aligned,
                      channels_last=False):
    """``out[K, C, PH, PW]`` = RoI Align of ``x[N, C, H, W]`` (channels-last:
    ``out[K, PH, PW, C]`` of ``x[N, H, W, C]``)."""
    n, c, h, w = _nchw(x.shape, channels_last)
    k, _, ph, pw = _nchw(out.shape, channels_last)
    if h * w == 0:
        out.fill(0)
        return
    groups = channel_groups(k * ph * pw, c)
    _run("roi_align", "forward", _name(x.dtype),
         (x, rois, k, n, c, h, w, ph, pw, spatial_scale, sampling_ratio,
          int(aligned), int(channels_last), groups, out),
         k * ph * pw * groups, _is_cuda(x))


def roi_align_backward(grad_output, rois, grad_input, spatial_scale,
                       sampling_ratio, aligned, deterministic=False,
                       zeroed=False, channels_last=False):
    """``grad_input[N, C, H, W]`` = gradient of RoI Align for
    ``grad_output[K, C, PH, PW]`` (both channels-last with
    ``channels_last``). ``zeroed`` says grad_input holds zeros already (as a
    fresh numpy.zeros does without touching its memory)."""
    n, c, h, w = _nchw(grad_input.shape, channels_last)
    k, _, ph, pw = _nchw(grad_output.shape, channels_last)
    groups = channel_groups(k * ph * pw, c)
    _backward("roi_align",
              (grad_output, rois, k, n, c, h, w, ph, pw, spatial_scale,
               sampling_ratio, int(aligned), int(channels_last), groups),
              grad_output, grad_input, deterministic, zeroed, k * ph * pw,
              threads=k * ph * pw * groups)


def roi_align_boxes_backward(grad_output, x, rois, grad_rois, spatial_scale,
                             sampling_ratio, aligned, channels_last=False):
    """``grad_rois[K, 5]`` (accumulation dtype, the rois' dtype) = gradient
    of RoI Align with respect to its boxes for ``grad_output[K, C, PH, PW]``
    and the forward's input ``x[N, C, H, W]`` (both channels-last with
    ``channels_last``): d/d(x1, y1, x2, y2) in columns 1-4, 0 in the batch
    column and for a box that reads nothing. The geometry arguments are the
    forward's. The conventions (clamped bands, pixel edges, aligned=False's
    minimum size) are in roi_align_geometry.cuh. Bitwise deterministic: per
    (box, bin) partial sums in a fixed order, then each box's bins in order
    (roi_align_boxes.cuh)."""
    n, c, h, w = _nchw(x.shape, channels_last)
    k, _, ph, pw = _nchw(grad_output.shape, channels_last)
    if h * w == 0:
        grad_rois.fill(0)
        return
    cuda = _is_cuda(x)
    (shape, dtype), = roi_align_boxes_scratch(k, ph, pw, grad_rois.dtype)
    partial = _memory.empty(_xp(x), shape, dtype)
    _run("roi_align", "boxes_backward", _name(x.dtype),
         (grad_output, x, rois, k, n, c, h, w, ph, pw, spatial_scale,
          sampling_ratio, int(aligned), int(channels_last), partial),
         partial.size // 4, cuda)
    _run("roi_align", "boxes_backward_finish", _name(x.dtype),
         (partial, k, ph * pw, grad_rois), k, cuda)


def roi_align_max_forward(x, rois, out, argmax, spatial_scale, sampling_ratio,
                          aligned, mode, channels_last=False):
    """``out[K, C, PH, PW]`` = the largest sample of each bin of
    ``x[N, C, H, W]`` (see roi_align_max.cu; ``mode`` "onnx" or
    "interpolated"), and the winning sample's index ``iy * grid_w + ix`` in
    its bin's sampling grid in ``argmax`` (-1: none, or off the map) unless
    it is None; all channels-last with ``channels_last``."""
    n, c, h, w = _nchw(x.shape, channels_last)
    k, _, ph, pw = _nchw(out.shape, channels_last)
    if h * w == 0:
        out.fill(0)
        if argmax is not None:
            argmax.fill(-1)
        return
    groups = channel_groups(k * ph * pw, c)
    _run("roi_align_max", "forward", _name(x.dtype),
         (x, rois, k, n, c, h, w, ph, pw, spatial_scale, sampling_ratio,
          int(aligned), _kernels.ALIGN_MAX_MODES[mode], int(channels_last),
          groups, out, argmax),
         k * ph * pw * groups, _is_cuda(x))


def roi_align_max_backward(grad_output, argmax, rois, grad_input,
                           spatial_scale, sampling_ratio, aligned,
                           deterministic=False, zeroed=False,
                           channels_last=False):
    """``grad_input[N, C, H, W]`` = gradient of the interpolated max mode for
    ``grad_output[K, C, PH, PW]`` and the forward's ``argmax`` (int64), all
    channels-last with ``channels_last``: each output's gradient goes to the
    four pixels of its winning sample with their bilinear weights. The
    geometry arguments must be the forward's; an argmax that names no
    sample of its bin's grid passes nothing. ``zeroed`` as in
    :func:`roi_align_backward`."""
    n, c, h, w = _nchw(grad_input.shape, channels_last)
    k, _, ph, pw = _nchw(grad_output.shape, channels_last)
    groups = channel_groups(k * ph * pw, c)
    _backward("roi_align_max",
              (grad_output, argmax, rois, k, n, c, h, w, ph, pw, spatial_scale,
               sampling_ratio, int(aligned), int(channels_last), groups),
              grad_output, grad_input, deterministic, zeroed, k * ph * pw,
              threads=k * ph * pw * groups)


_INT32 = np.dtype(np.int32)


def argmax_32(argmax):
    """The kernels' argmax_32 argument: 1 for int32 entries, 0 for int64 (or
    no argmax)."""
    return int(argmax is not None and argmax.dtype == _INT32)


def roi_align_rotated_forward(x, rois, out, spatial_scale, sampling_ratio,
                              convention, aligned, clockwise,
                              channels_last=False):
    """``out[K, C, PH, PW]`` = RoI Align of ``x[N, C, H, W]`` on rotated
    boxes ``rois[K, 6]`` (batch index, cx, cy, w, h, angle), channels-last
    as in :func:`roi_align_forward`. ``convention`` is "detectron2" (angle
    in degrees; ``aligned`` and ``clockwise`` ignored) or "mmcv" (radians);
    see roi_align_rotated.cu."""
    n, c, h, w = _nchw(x.shape, channels_last)
    k, _, ph, pw = _nchw(out.shape, channels_last)
    if h * w == 0:
        out.fill(0)
        return
    groups = channel_groups(k * ph * pw, c)
    _run("roi_align_rotated", "forward", _name(x.dtype),
         (x, rois, k, n, c, h, w, ph, pw, spatial_scale, sampling_ratio,
          _kernels.ROTATED_CONVENTIONS[convention], int(aligned),
          int(clockwise), int(channels_last), groups, out),
         k * ph * pw * groups, _is_cuda(x))


def roi_align_rotated_backward(grad_output, rois, grad_input, spatial_scale,
                               sampling_ratio, convention, aligned, clockwise,
                               deterministic=False, zeroed=False,
                               channels_last=False):
    """``grad_input[N, C, H, W]`` = gradient of rotated RoI Align for
    ``grad_output[K, C, PH, PW]`` (both channels-last with
    ``channels_last``); ``zeroed`` as in :func:`roi_align_backward`."""
    n, c, h, w = _nchw(grad_input.shape, channels_last)
    k, _, ph, pw = _nchw(grad_output.shape, channels_last)
    groups = channel_groups(k * ph * pw, c)
    _backward("roi_align_rotated",
              (grad_output, rois, k, n, c, h, w, ph, pw, spatial_scale,
               sampling_ratio, _kernels.ROTATED_CONVENTIONS[convention],
               int(aligned), int(clockwise), int(channels_last), groups),
              grad_output, grad_input, deterministic, zeroed, k * ph * pw,
              threads=k * ph * pw * groups)


def roi_align_rotated_boxes_backward(grad_output, x, rois, grad_rois,
                                     spatial_scale, sampling_ratio, convention,
                                     aligned, clockwise, channels_last=False):
    """``grad_rois[K, 6]`` (accumulation dtype, the rois' dtype) = gradient
    of rotated RoI Align with respect to its boxes for ``grad_output[K, C,
    PH, PW]`` and the forward's input ``x[N, C, H, W]`` (both channels-last
    with ``channels_last``): d/d(cx, cy, w, h, angle) in columns 1-5, the
    angle's in the box's own unit (degrees for "detectron2", radians for
    "mmcv", of the angle as passed: ``clockwise`` flips its sign), 0 in the
    batch column and for a box that reads nothing. The geometry arguments
    are the forward's; the conventions (clamped bands, pixel edges, mmcv's
    minimum size) are in roi_align_rotated.cu. Bitwise deterministic: per
    (box, bin) partial sums in a fixed order, then each box's bins in
    order."""
    n, c, h, w = _nchw(x.shape, channels_last)
    k, _, ph, pw = _nchw(grad_output.shape, channels_last)
    if h * w == 0:
        grad_rois.fill(0)
        return
    cuda = _is_cuda(x)
    dtype = _name(x.dtype)
    (shape, partial_dtype), = roi_align_rotated_boxes_scratch(k, ph, pw,
                                                              grad_rois.dtype)
    partial = _memory.empty(_xp(x), shape, partial_dtype)
    _run("roi_align_rotated", "boxes_backward", dtype,
         (grad_output, x, rois, k, n, c, h, w, ph, pw, spatial_scale,
          sampling_ratio, _kernels.ROTATED_CONVENTIONS[convention],
          int(aligned), int(clockwise), int(channels_last), partial),
         partial.size // 5, cuda)
    _run("roi_align_rotated", "boxes_backward_finish", dtype,
         (partial, k, ph * pw, grad_rois), k * 5, cuda)


def roi_pool_forward(x, rois, out, argmax, spatial_scale, convention,
                     channels_last=False):
    """``out`` and ``argmax`` ``[K, C, PH, PW]`` (channels-last:
    ``[K, PH, PW, C]``) = RoI Pool of ``x``; ``convention`` is "torchvision"
    or "mmcv"; ``argmax`` None computes the maxima alone."""
    n, c, h, w = _nchw(x.shape, channels_last)
    k, _, ph, pw = _nchw(out.shape, channels_last)
    if h * w == 0:
        out.fill(0)
        if argmax is not None:
            argmax.fill(-1)
        return
    groups = channel_groups(k * ph * pw, c)
    _run("roi_pool", "forward", _name(x.dtype),
         (x, rois, k, n, c, h, w, ph, pw, spatial_scale,
          _kernels.POOL_CONVENTIONS[convention], int(channels_last),
          argmax_32(argmax), groups, out, argmax),
         k * ph * pw * groups, _is_cuda(x))


def roi_pool_backward(grad_output, argmax, rois, grad_input,
                      deterministic=False, zeroed=False, channels_last=False):
    """``grad_input[N, C, H, W]`` = gradient of RoI Pool for
    ``grad_output`` and the forward's ``argmax`` (int64 or int32), all
    channels-last with ``channels_last``; ``zeroed`` as in
    :func:`roi_align_backward`."""
    n, c, h, w = _nchw(grad_input.shape, channels_last)
    k, _, ph, pw = _nchw(grad_output.shape, channels_last)
    _backward("roi_pool",
              (grad_output, argmax, rois, k, n, c, h, w, ph, pw,
               int(channels_last), argmax_32(argmax)),
              grad_output, grad_input, deterministic, zeroed, k * ph * pw)


# Position-sensitive pooling (R-FCN): x has C = C_out * PH * PW channels and
# output channel c reads input channel (c * PH + ph) * PW + pw in bin
# (ph, pw); outputs are [K, C_out, PH, PW] ([K, PH, PW, C_out] channels-last).
# The kernels take x's C and write C // (PH * PW) output channels: a C that
# is not a multiple is the front end's to refuse.


def ps_roi_pool_forward(x, rois, out, spatial_scale, channels_last=False):
    """``out[K, C_out, PH, PW]`` = position-sensitive RoI Pool (the mean of
    each bin, torchvision's ps_roi_pool) of ``x[N, C, H, W]`` (channels-last:
    ``out[K, PH, PW, C_out]`` of ``x[N, H, W, C]``)."""
    n, c, h, w = _nchw(x.shape, channels_last)
    k, _, ph, pw = _nchw(out.shape, channels_last)
    if h * w == 0:
        out.fill(0)
        return
    groups = channel_groups(k * ph * pw, out.size // max(k * ph * pw, 1))
    _run("ps_roi_pool", "forward", _name(x.dtype),
         (x, rois, k, n, c, h, w, ph, pw, spatial_scale, int(channels_last),
          groups, out),
         k * ph * pw * groups, _is_cuda(x))


def ps_roi_pool_backward(grad_output, rois, grad_input, spatial_scale,
                         deterministic=False, zeroed=False, channels_last=False):
    """``grad_input[N, C, H, W]`` = gradient of :func:`ps_roi_pool_forward`
    for ``grad_output[K, C_out, PH, PW]`` (both channels-last with
    ``channels_last``); ``zeroed`` as in :func:`roi_align_backward`."""
    n, c, h, w = _nchw(grad_input.shape, channels_last)
    k, _, ph, pw = _nchw(grad_output.shape, channels_last)
    groups = channel_groups(k * ph * pw, grad_output.size // max(k * ph * pw, 1))
    _backward("ps_roi_pool",
              (grad_output, rois, k, n, c, h, w, ph, pw, spatial_scale,
               int(channels_last), groups),
              grad_output, grad_input, deterministic, zeroed, k,
              threads=k * ph * pw * groups)


def ps_roi_align_forward(x, rois, out, spatial_scale, sampling_ratio,
                         channels_last=False):
    """``out[K, C_out, PH, PW]`` = position-sensitive RoI Align
    (torchvision's ps_roi_align: aligned, the half-pixel shift) of
    ``x[N, C, H, W]`` (channels-last: ``out[K, PH, PW, C_out]`` of
    ``x[N, H, W, C]``)."""
    n, c, h, w = _nchw(x.shape, channels_last)
    k, _, ph, pw = _nchw(out.shape, channels_last)
    if h * w == 0:
        out.fill(0)
        return
    groups = channel_groups(k * ph * pw, out.size // max(k * ph * pw, 1))
    _run("ps_roi_align", "forward", _name(x.dtype),
         (x, rois, k, n, c, h, w, ph, pw, spatial_scale, sampling_ratio,
          int(channels_last), groups, out),
         k * ph * pw * groups, _is_cuda(x))


def ps_roi_align_backward(grad_output, rois, grad_input, spatial_scale,
                          sampling_ratio, deterministic=False, zeroed=False,
                          channels_last=False):
    """``grad_input[N, C, H, W]`` = gradient of :func:`ps_roi_align_forward`
    for ``grad_output[K, C_out, PH, PW]`` (both channels-last with
    ``channels_last``); ``zeroed`` as in :func:`roi_align_backward`."""
    n, c, h, w = _nchw(grad_input.shape, channels_last)
    k, _, ph, pw = _nchw(grad_output.shape, channels_last)
    groups = channel_groups(k * ph * pw, grad_output.size // max(k * ph * pw, 1))
    _backward("ps_roi_align",
              (grad_output, rois, k, n, c, h, w, ph, pw, spatial_scale,
               sampling_ratio, int(channels_last), groups),
              grad_output, grad_input, deterministic, zeroed, k,
              threads=k * ph * pw * groups)


# Spatial pyramid pooling (SPPnet): for each box, RoI Pool's bins (either
# convention) over an l x l grid for each level l of ``levels`` (a sequence
# of ints, e.g. (1, 2, 4), passed to the kernels by value). Outputs are
# [K, C * bins],
# bins = sum(l * l), each row the levels' [C, l, l] blocks in turn: the
# concatenation of roi_pool(x, boxes, (l, l)).reshape(K, -1) over the
# levels, in this order whatever the input's layout (channels_last moves
# only x and its gradient). The kernels take bins from the output's shape.


def _spp_bins(row, channels):
    return row // channels if channels else 0


def spp_levels(levels):
    """The grid sizes ``levels`` (at most _kernels.MAX_LEVELS of them, as
    the front ends check) as the kernels' by-value RoiSppLevels."""
    table = _kernels.SPP_LEVELS.new()
    table["size"][0, :len(levels)] = levels
    table["count"] = len(levels)
    return table


def roi_spp_forward(x, rois, levels, out, argmax, spatial_scale, convention,
                    mode, channels_last=False):
    """``out[K, C * bins]`` = spatial pyramid pooling of ``x[N, C, H, W]``
    (channels-last: ``x[N, H, W, C]``); ``convention`` "torchvision" or
    "mmcv", ``mode`` "max" (each bin's maximum, its flat ``h * W + w`` in
    ``argmax[K, C * bins]`` int32 unless None, -1 for an empty bin) or "avg"
    (each bin's mean, 0 for an empty bin; argmax is left alone)."""
    n, c, h, w = _nchw(x.shape, channels_last)
    k = out.shape[0]
    if h * w == 0 or c == 0:
        out.fill(0)
        if argmax is not None:
            argmax.fill(-1)
        return
    _run("roi_spp", "forward", _name(x.dtype),
         (x, rois, spp_levels(levels), k, n, c, h, w,
          _spp_bins(out.shape[1], c), spatial_scale,
          _kernels.POOL_CONVENTIONS[convention], _kernels.SPP_MODES[mode],
          int(channels_last), out, argmax),
         out.size, _is_cuda(x))


def roi_spp_backward(grad_output, argmax, rois, levels, grad_input,
                     spatial_scale, convention, mode, deterministic=False,
                     zeroed=False, channels_last=False):
    """``grad_input[N, C, H, W]`` (channels-last: ``[N, H, W, C]``) =
    gradient of :func:`roi_spp_forward` for ``grad_output[K, C * bins]``:
    "max" sends each entry to its ``argmax`` pixel (the forward's, int32),
    "avg" spreads it evenly over its bin (``argmax`` may be None). The
    geometry arguments are the forward's; ``zeroed`` as in
    :func:`roi_align_backward`."""
    n, c, h, w = _nchw(grad_input.shape, channels_last)
    k = grad_output.shape[0]
    bins = _spp_bins(grad_output.shape[1], c)
    _backward("roi_spp",
              (grad_output, argmax, rois, spp_levels(levels), k, n, c, h, w,
               bins, spatial_scale, _kernels.POOL_CONVENTIONS[convention],
               _kernels.SPP_MODES[mode], int(channels_last)),
              grad_output, grad_input, deterministic, zeroed, k * bins)


# Precise RoI Pooling (mmcv's PrRoIPool; see prroi_pool.cu): each bin's value
# is the integral of the bilinearly interpolated map (0 beyond the cells
# around it) over the bin, divided by the bin's area; corners x * s, no
# half-pixel shift, no rounding. Outputs [K, C, PH, PW] ([K, PH, PW, C]
# channels-last).


def prroi_pool_forward(x, rois, out, spatial_scale, channels_last=False):
    """``out[K, C, PH, PW]`` = Precise RoI Pooling of ``x[N, C, H, W]``
    (channels-last: ``out[K, PH, PW, C]`` of ``x[N, H, W, C]``)."""
    n, c, h, w = _nchw(x.shape, channels_last)
    k, _, ph, pw = _nchw(out.shape, channels_last)
    if h * w == 0:
        out.fill(0)
        return
    groups = channel_groups(k * ph * pw, c)
    _run("prroi_pool", "forward", _name(x.dtype),
         (x, rois, k, n, c, h, w, ph, pw, spatial_scale, int(channels_last),
          groups, out),
         k * ph * pw * groups, _is_cuda(x))


def prroi_pool_backward(grad_output, rois, grad_input, spatial_scale,
                        deterministic=False, zeroed=False, channels_last=False):
    """``grad_input[N, C, H, W]`` = gradient of :func:`prroi_pool_forward`
    with respect to its input for ``grad_output[K, C, PH, PW]`` (both
    channels-last with ``channels_last``); ``zeroed`` as in
    :func:`roi_align_backward`."""
    n, c, h, w = _nchw(grad_input.shape, channels_last)
    k, _, ph, pw = _nchw(grad_output.shape, channels_last)
    groups = channel_groups(k * ph * pw, c)
    _backward("prroi_pool",
              (grad_output, rois, k, n, c, h, w, ph, pw, spatial_scale,
               int(channels_last), groups),
              grad_output, grad_input, deterministic, zeroed, k * ph * pw,
              threads=k * ph * pw * groups)


def prroi_pool_boxes_backward(grad_output, x, rois, grad_rois, spatial_scale,
                              channels_last=False):
    """``grad_rois[K, 5]`` (the accumulation dtype, as ``rois``) = gradient of
    :func:`prroi_pool_forward` with respect to the boxes for
    ``grad_output[K, C, PH, PW]`` and the forward's input ``x[N, C, H, W]``
    (both channels-last with ``channels_last``): d/dx1, d/dy1, d/dx2, d/dy2
    in columns 1-4, 0 in the batch-index column and in the rows of unusable
    boxes. Written entirely, and the same bits on every run (each box's row
    is summed by one thread in a fixed order)."""
    n, c, h, w = _nchw(x.shape, channels_last)
    k, _, ph, pw = _nchw(grad_output.shape, channels_last)
    if h * w == 0:
        grad_rois.fill(0)
        return
    _run("prroi_pool", "boxes_backward", _name(x.dtype),
         (grad_output, x, rois, k, n, c, h, w, ph, pw, spatial_scale,
          int(channels_last), grad_rois),
         k, _is_cuda(x))


# Crop and resize (TensorFlow's tf.image.crop_and_resize): ``image`` is
# channels-last [N, H, W, C] by default (TF's layout; [N, C, H, W] with
# channels_last=False), ``rois`` [K, 5] (box index, y1, x1, y2, x2) in the
# accumulation dtype, the corners normalised (TF's boxes and box_indices in
# one array), crops [K, PH, PW, C] ([K, C, PH, PW]) whose PH, PW are the
# crop size. A box index outside [0, N) gives an all-extrapolation_value
# crop and no gradient.


def crop_and_resize_forward(image, rois, out, method, extrapolation_value,
                            channels_last=True):
    """``out`` = the crops of ``image`` that ``rois`` select, resized to
    ``out``'s PH x PW by ``method`` ("bilinear" or "nearest"); points off
    the image are ``extrapolation_value`` (see crop_and_resize.cu)."""
    n, c, h, w = _nchw(image.shape, channels_last)
    k, _, ph, pw = _nchw(out.shape, channels_last)
    groups = channel_groups(k * ph * pw, c)
    _run("crop_and_resize", "forward", _name(image.dtype),
         (image, rois, k, n, c, h, w, ph, pw, extrapolation_value,
          _kernels.CROP_AND_RESIZE_METHODS[method], int(channels_last), groups,
          out),
         k * ph * pw * groups, _is_cuda(image))


def crop_and_resize_backward(grad_output, rois, grad_image, method,
                             deterministic=False, zeroed=False, channels_last=True):
    """``grad_image`` ([N, H, W, C], or [N, C, H, W] without
    ``channels_last``, in the accumulation dtype) = the gradient of
    :func:`crop_and_resize_forward` with respect to the image for
    ``grad_output`` (TF's CropAndResizeGradImage); ``deterministic`` and
    ``zeroed`` as in :func:`roi_align_backward`."""
    n, c, h, w = _nchw(grad_image.shape, channels_last)
    k, _, ph, pw = _nchw(grad_output.shape, channels_last)
    groups = channel_groups(k * ph * pw, c)
    _backward("crop_and_resize",
              (grad_output, rois, k, n, c, h, w, ph, pw,
               _kernels.CROP_AND_RESIZE_METHODS[method], int(channels_last), groups),
              grad_output, grad_image, deterministic, zeroed, k * ph * pw,
              threads=k * ph * pw * groups)


def crop_and_resize_boxes_backward(grad_output, image, rois, grad_rois, method,
                                   channels_last=True):
    """``grad_rois[K, 5]`` (accumulation dtype, as ``rois``) = the gradient
    of :func:`crop_and_resize_forward` with respect to the boxes for
    ``grad_output``: TF's CropAndResizeGradBoxes in columns 1-4 (0 in the
    box-index column), the bilinear derivative whatever ``method`` (as TF).
    Deterministic: each box's sum runs in a fixed order (see
    crop_and_resize.cu)."""
    n, c, h, w = _nchw(image.shape, channels_last)
    k, _, ph, pw = _nchw(grad_output.shape, channels_last)
    cuda = _is_cuda(image)
    dtype = _name(image.dtype)
    (shape, partial_dtype), = roi_align_boxes_scratch(k, ph, pw, grad_rois.dtype)
    partial = _memory.empty(_xp(image), shape, partial_dtype)
    _run("crop_and_resize", "boxes_backward", dtype,
         (grad_output, image, rois, k, n, c, h, w, ph, pw,
          _kernels.CROP_AND_RESIZE_METHODS[method], int(channels_last), partial),
         k * ph * pw, cuda)
    _run("crop_and_resize", "boxes_backward_finish", dtype,
         (partial, k, ph * pw, grad_rois), k * 4, cuda)


# Multiscale RoI Align (multiscale_roi_align.cu): the levels of a feature
# pyramid, each box pooled by RoI Align from the level its size selects.
# The kernels take the levels' arrays (their addresses; the arrays are kept
# alive by the caller until the launch returns), sizes and spatial scales in
# one table passed by value.


def _level_table(arrays, spatial_scales, channels_last):
    """The kernels' by-value MultiscaleLevels for the levels ``arrays``: their
    addresses (host addresses of NumPy arrays, device pointers of CuPy ones),
    (H_l, W_l) and spatial scales. At most _kernels.MAX_LEVELS levels, as
    the front ends check."""
    table = _kernels.MULTISCALE_LEVELS.new()
    count = len(arrays)
    if count > _kernels.MAX_LEVELS:
        raise ValueError(f"multiscale RoI Align takes at most {_kernels.MAX_LEVELS} "
                         f"levels, got {count}")
    table["address"][0, :count] = [
        _cpu.address(a) if isinstance(a, np.ndarray) else a.data.ptr for a in arrays]
    table["size"][0, :2 * count] = [
        extent for a in arrays for extent in _nchw(a.shape, channels_last)[2:]]
    table["scale_f32"][0, :count] = spatial_scales
    table["scale_f64"][0, :count] = spatial_scales
    table["count"] = count
    return table


def multiscale_roi_align_forward(features, rois, out, spatial_scales,
                                 sampling_ratio, aligned, canonical_scale,
                                 canonical_level, eps, level_rule,
                                 channels_last=False):
    """``out[K, C, PH, PW]`` = RoI Align of each box on the level of the
    pyramid ``features`` (a list of ``[N, C, H_l, W_l]`` arrays of one dtype
    and device, level l at ``spatial_scales[l]``, powers of two from the
    finest level to the coarsest) that its size selects with ``level_rule``
    ("torchvision" or "detectron2", see multiscale_roi_align.cu);
    channels-last: ``[N, H_l, W_l, C]`` and ``out[K, PH, PW, C]``."""
    k, _, ph, pw = _nchw(out.shape, channels_last)
    if not features:
        out.fill(0)
        return
    first = features[0]
    n, c, _, _ = _nchw(first.shape, channels_last)
    groups = channel_groups(k * ph * pw, c)
    _run("multiscale_roi_align", "forward", _name(first.dtype),
         (_level_table(features, spatial_scales, channels_last), rois, k, n, c,
          ph, pw,
          sampling_ratio, int(aligned), canonical_scale, int(canonical_level),
          eps, _kernels.MULTISCALE_LEVEL_RULES[level_rule],
          int(channels_last), groups, out),
         k * ph * pw * groups, _is_cuda(first))


def multiscale_roi_align_backward(grad_output, rois, grad_inputs,
                                  spatial_scales, sampling_ratio, aligned,
                                  canonical_scale, canonical_level, eps,
                                  level_rule, deterministic=False,
                                  zeroed=False, channels_last=False):
    """``grad_inputs`` (a list of ``[N, C, H_l, W_l]`` arrays in the
    accumulation dtype, one per level) = gradient of
    :func:`multiscale_roi_align_forward` for ``grad_output[K, C, PH, PW]``
    (all channels-last with ``channels_last``); ``zeroed`` says every
    gradient holds zeros already."""
    k, c, ph, pw = _nchw(grad_output.shape, channels_last)
    if not grad_inputs:
        return
    n = _nchw(grad_inputs[0].shape, channels_last)[0]
    table = _level_table(grad_inputs, spatial_scales, channels_last)
    groups = channel_groups(k * ph * pw, c)
    _backward("multiscale_roi_align",
              (grad_output, table, rois, k, n, c, ph, pw, sampling_ratio,
               int(aligned), canonical_scale, int(canonical_level), eps,
               _kernels.MULTISCALE_LEVEL_RULES[level_rule],
               int(channels_last), groups),
              grad_output, list(grad_inputs), deterministic, zeroed,
              k * ph * pw, levels=(table, n, c), threads=k * ph * pw * groups)

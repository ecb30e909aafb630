"""curoi for PyTorch: ``roi_align`` and ``roi_pool`` as differentiable,
compilable torch operators, drop-in for ``torchvision.ops``.

    from curoi.torch import roi_align, roi_pool, RoIAlign, RoIPool

The functions and modules take torchvision's arguments with torchvision's
defaults and give torchvision's numbers, so replacing
``from torchvision.ops import roi_align`` with ``from curoi.torch import
roi_align`` changes nothing in a model's outputs. What it adds:

- float16 and bfloat16 run natively, also under ``torch.autocast``: the ops
  are not registered with autocast, so autocast leaves their inputs alone and
  the result has the input's dtype (torchvision casts to float32 and back).
  Boxes may stay float32 next to half-precision features, which keeps box
  edges exact to well below a pixel.
- a deterministic backward: under ``torch.use_deterministic_algorithms(True)``
  the gradients are bitwise reproducible from run to run.
- ``roi_pool(..., convention="mmcv")`` for models trained with
  mmcv/mmdetection's RoI Pool.

Every op is a ``torch.library.custom_op`` in the ``curoi`` namespace
(``torch.ops.curoi.roi_align``, ``roi_pool`` and their ``*_backward``), with
a fake (meta) implementation and an autograd formula, so it works under
``torch.compile(fullgraph=True)`` with dynamic shapes, forward and backward,
and passes ``torch.library.opcheck``. The implementations call curoi's
public functions on the tensors: CPU tensors run the kernels compiled by the
host C++ compiler, CUDA tensors run them through CuPy on
``torch.cuda.current_stream()`` of the tensor's device, and results are
allocated by torch. The gradient with respect to the boxes is None.

``torch.onnx.export`` of a model using these functions writes ONNX
``RoiAlign`` (opset 16) and ``MaxRoiPool`` nodes, with the TorchScript
exporter and with ``dynamo=True``, without a translation table (see
``curoi._torch_onnx``).
"""

import torch
from torch import Tensor, nn

import curoi as _curoi

from torch.utils import _python_dispatch

from . import _cpu, _kernels, _torch_onnx, _validate

__all__ = ["roi_align", "roi_pool", "RoIAlign", "RoIPool"]

_CONVENTIONS = ("torchvision", "mmcv")


# --------------------------------------------------------------- arguments
def _check_input(input):
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(
            f"input must be a 4-D tensor [N, C, H, W], got shape {tuple(input.shape)}")
    if not input.dtype.is_floating_point:
        raise TypeError(f"input must have a floating-point dtype, got {input.dtype}")


def _check_boxes(input, boxes, name, columns):
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] != columns:
        layout = ("[K, 5] tensor of (batch index, x1, y1, x2, y2)" if columns == 5
                  else "[L, 4] tensor of (x1, y1, x2, y2)")
        raise ValueError(f"{name} must be a {layout}, got shape {tuple(boxes.shape)}")
    if not boxes.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating-point dtype, got {boxes.dtype}")
    if boxes.device != input.device:
        raise ValueError(
            f"{name} is on {boxes.device} but input is on {input.device}; "
            "move them to the same device")


def _channels_last(input):
    """Whether ``input`` runs the channels-last kernels: laid out as
    ``torch.channels_last`` and not also plain contiguous (a tensor with
    C = 1 or H = W = 1 is both, and stays NCHW). The real ops and their
    fakes decide alike, so both give the same strides."""
    return (not input.is_contiguous()
            and input.is_contiguous(memory_format=torch.channels_last))


def _empty(like, shape, channels_last, dtype=None):
    """A new [a, b, c, d] tensor, allocated as [a, c, d, b] and viewed in
    NCHW order when ``channels_last`` (torch.channels_last strides)."""
    if not channels_last:
        return like.new_empty(shape, dtype=dtype)
    a, b, c, d = shape
    return like.new_empty((a, c, d, b), dtype=dtype).permute(0, 3, 1, 2)


def _nhwc(tensor):
    """A [N, C, H, W] tensor as its [N, H, W, C] view: no copy for a
    channels-last tensor."""
    return tensor.permute(0, 2, 3, 1)


def _nchw(tensor):
    return tensor.permute(0, 3, 1, 2)


def _check_tensors(input, rois, name):
    """Checks shared by the public functions (run eagerly, and while
    torch.compile traces them) and the fake implementations, so that a
    compiled model fails with the same messages as an eager one."""
    _check_input(input)
    _check_boxes(input, rois, name, 5)


def _scalars(spatial_scale, sampling_ratio=None, aligned=None):
    """Check the scalar arguments before they reach the op's schema, whose
    own errors do not say what was expected."""
    if torch.compiler.is_compiling():
        # torch.compile(dynamic=True) traces float arguments as symbols that
        # the checks cannot read; curoi checks the same values when the op
        # runs, with the same messages.
        return spatial_scale, sampling_ratio, aligned
    spatial_scale = _validate.spatial_scale(spatial_scale)
    if sampling_ratio is not None:
        sampling_ratio = _validate.sampling_ratio(sampling_ratio)
    if aligned is not None:
        aligned = _validate.flag(aligned, "aligned")
    return spatial_scale, sampling_ratio, aligned


def _to_rois(boxes, input):
    """``boxes`` as one [K, 5] tensor, as torchvision's
    ``convert_boxes_to_roi_format`` makes it: a list of per-image [L, 4]
    tensors gets the image index as its first column."""
    if isinstance(boxes, Tensor):
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(
            "boxes must be a [K, 5] tensor or a list of [L, 4] tensors, one per "
            f"image, got {type(boxes).__name__}")
    for i, b in enumerate(boxes):
        _check_boxes(input, b, f"boxes[{i}]", 4)
    if len(boxes) > input.shape[0]:
        raise ValueError(
            f"boxes is a list of {len(boxes)} per-image tensors but input holds "
            f"{input.shape[0]} images")
    if not boxes:
        # torch.cat refuses an empty list. Boxes are used in float32 (float64
        # for float64 features) whatever the feature dtype.
        dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        return torch.zeros((0, 5), dtype=dtype, device=input.device)
    ids = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(ids, dim=0), torch.cat(list(boxes), dim=0)], dim=1)


# -------------------------------------------------------- direct CPU calls
# A custom op's dispatch and autograd bookkeeping cost tens of microseconds,
# the whole cost of a call on a small input. A call that nothing but the
# kernel needs to see (plain eager CPU tensors of a kernel dtype, already
# contiguous, that need no gradient, with no tracing, compiling, exporting,
# functorch transform or dispatch mode that must see the op) runs the CPU
# kernel directly, with the same arguments and the same numbers; every other
# call goes through the op.
_DIRECT_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def _direct_dtype(input, rois):
    """The kernel dtype name when the call may skip the op, else None."""
    if type(input) is not Tensor or type(rois) is not Tensor:
        return None
    name = _DIRECT_DTYPES.get(input.dtype)
    if (name is None or rois.dtype != input.dtype or not input.is_cpu
            or not rois.is_cpu
            or (input.requires_grad and torch.is_grad_enabled())
            or not input.is_contiguous() or not rois.is_contiguous()
            or input.numel() == 0 or rois.shape[0] == 0
            or torch._C._functorch.peek_interpreter_stack() is not None
            or _python_dispatch._get_current_dispatch_mode() is not None
            or torch._C._is_torch_function_mode_enabled()
            or torch.jit.is_tracing() or torch.compiler.is_compiling()):
        return None
    return name


def _direct_forward(family, input, rois, ph, pw, spatial_scale, *scalars,
                    after_layout=(), argmax=()):
    """The forward kernel's result when the call may skip the op, else None.
    ``scalars`` follow spatial_scale in the kernel's signature and
    ``after_layout`` follows its channels_last; ``argmax`` is ``(None,)``
    for a kernel that takes an optional argmax."""
    direct = _direct_dtype(input, rois)
    if direct is None:
        return None
    n, c, h, w = input.shape
    k = rois.shape[0]
    try:
        out = torch.empty((k, c, ph, pw), dtype=input.dtype)
    except RuntimeError:
        return None  # the op path raises curoi's MemoryError naming it
    _validate.scale_for(spatial_scale, direct)
    _cpu.kernel(family, "forward", direct)(
        input.data_ptr(), rois.data_ptr(), k, n, c, h, w, ph, pw, spatial_scale,
        *scalars, 0, *after_layout, out.data_ptr(), *argmax)  # 0: NCHW
    return out


# ---------------------------------------------------------------- roi_align
@torch.library.custom_op("curoi::roi_align", mutates_args=())
def _roi_align_op(input: Tensor, rois: Tensor, spatial_scale: float,
                  pooled_height: int, pooled_width: int, sampling_ratio: int,
                  aligned: bool) -> Tensor:
    kw = dict(spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
              aligned=aligned)
    if _channels_last(input):
        return _nchw(_curoi.roi_align(_nhwc(input), rois, (pooled_height, pooled_width),
                                      data_format="NHWC", **kw))
    return _curoi.roi_align(input, rois, (pooled_height, pooled_width), **kw)


@_roi_align_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
      aligned):
    _check_tensors(input, rois, "rois")
    return _empty(input, (rois.shape[0], input.shape[1], pooled_height, pooled_width),
                  _channels_last(input))


# The backward ops' channels_last defaults to False: a graph that
# torch.compile cached before the argument existed (its cache key does not
# cover autograd formulas) still calls them as before.
@torch.library.custom_op("curoi::roi_align_backward", mutates_args=())
def _roi_align_backward_op(grad: Tensor, rois: Tensor, spatial_scale: float,
                           pooled_height: int, pooled_width: int,
                           batch_size: int, channels: int, height: int,
                           width: int, sampling_ratio: int, aligned: bool,
                           deterministic: bool,
                           channels_last: bool = False) -> Tensor:
    kw = dict(spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
              aligned=aligned, deterministic=deterministic)
    if channels_last:
        return _nchw(_curoi.roi_align_backward(
            _nhwc(grad), rois, (batch_size, height, width, channels),
            (pooled_height, pooled_width), data_format="NHWC", **kw))
    return _curoi.roi_align_backward(
        grad, rois, (batch_size, channels, height, width),
        (pooled_height, pooled_width), **kw)


@_roi_align_backward_op.register_fake
def _(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size,
      channels, height, width, sampling_ratio, aligned, deterministic,
      channels_last=False):
    return _empty(grad, (batch_size, channels, height, width), channels_last)


def _roi_align_setup_context(ctx, inputs, output):
    input, rois, spatial_scale, ph, pw, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.input_shape = tuple(input.shape)
    ctx.channels_last = _channels_last(input)
    ctx.params = (spatial_scale, ph, pw, sampling_ratio, aligned)


def _roi_align_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    spatial_scale, ph, pw, sampling_ratio, aligned = ctx.params
    n, c, h, w = ctx.input_shape
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = _roi_align_backward_op(
            grad, rois, spatial_scale, ph, pw, n, c, h, w, sampling_ratio,
            aligned, torch.are_deterministic_algorithms_enabled(),
            ctx.channels_last)
    return grad_input, None, None, None, None, None, None


_roi_align_op.register_autograd(_roi_align_backward,
                                setup_context=_roi_align_setup_context)


def roi_align(input: Tensor, boxes, output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """RoI Align (Mask R-CNN), as ``torchvision.ops.roi_align``.

    Each box is divided into ``output_size`` bins; each bin is the average of
    ``sampling_ratio x sampling_ratio`` bilinearly interpolated samples of
    the features.

    Args:
        input: features ``[N, C, H, W]``, float16, bfloat16, float32 or
            float64, on the CPU or a CUDA device. Half precision runs as is,
            also under ``torch.autocast`` (no cast to float32); the CPU
            computes it in float32 and rounds the result once.
        boxes: ``Tensor[K, 5]`` of ``(batch index, x1, y1, x2, y2)``, or a list
            of ``Tensor[L, 4]`` of ``(x1, y1, x2, y2)``, one per image in
            batch order, on ``input``'s device, in input-image coordinates
            (``0 <= x1 < x2``, ``0 <= y1 < y2`` for a box to mean anything).
            Any floating dtype; used in float32 (float64 for float64 input).
            A box with a batch index outside ``[0, N)`` or a non-finite value
            gives zeros and no gradient.
        output_size: ``int`` or ``(PH, PW)``: bins per box, in height and width.
        spatial_scale: factor from box to feature coordinates, e.g. ``1/16``
            for a feature map 16 times smaller than the image.
        sampling_ratio: samples per bin side; ``<= 0`` means adaptive,
            ``ceil(box size / output size)`` per axis.
        aligned: ``True`` shifts boxes by -0.5 pixel so that pixel centres
            sit at half-integers (detectron2, ONNX ``half_pixel``); ``False``
            is the original convention, which widens boxes to at least one
            pixel.

    Returns:
        ``Tensor[K, C, PH, PW]`` of ``input``'s dtype and device. Its gradient
        flows to ``input`` only (None for ``boxes``); under
        ``torch.use_deterministic_algorithms(True)`` it is bitwise
        reproducible. A ``torch.channels_last`` input runs the channels-last
        kernels in place, and the result and the gradient are
        ``torch.channels_last`` too, with the numbers of a contiguous input
        to the bit.
    """
    _check_input(input)
    rois = _to_rois(boxes, input)
    _check_tensors(input, rois, "boxes")
    ph, pw = _validate.output_size(output_size)
    spatial_scale, sampling_ratio, aligned = _scalars(spatial_scale, sampling_ratio, aligned)
    if _torch_onnx.dynamo_exporting():
        return _torch_onnx.roi_align_symbolic(input, rois, spatial_scale, ph, pw,
                                              sampling_ratio, aligned)
    out = _direct_forward("roi_align", input, rois, ph, pw, spatial_scale,
                          sampling_ratio, int(aligned))
    if out is not None:
        return out
    return _roi_align_op(input, rois, spatial_scale, ph, pw, sampling_ratio, aligned)


# ----------------------------------------------------------------- roi_pool
def _argmax_dtype(height, width):
    """The argmax the op saves for its backward: int32 as torchvision's
    (half the memory, and a faster backward) unless a feature plane has
    2**31 pixels or more. The op and its fake decide alike."""
    return "int32" if height * width <= 2**31 - 1 else "int64"


@torch.library.custom_op("curoi::roi_pool", mutates_args=())
def _roi_pool_op(input: Tensor, rois: Tensor, spatial_scale: float,
                 pooled_height: int, pooled_width: int,
                 convention: str) -> tuple[Tensor, Tensor]:
    kw = dict(spatial_scale=spatial_scale, convention=convention,
              return_argmax=True,
              argmax_dtype=_argmax_dtype(input.shape[2], input.shape[3]))
    if _channels_last(input):
        y, argmax = _curoi.roi_pool(_nhwc(input), rois, (pooled_height, pooled_width),
                                    data_format="NHWC", **kw)
        return _nchw(y), _nchw(argmax)
    return _curoi.roi_pool(input, rois, (pooled_height, pooled_width), **kw)


@_roi_pool_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, convention):
    _check_tensors(input, rois, "rois")
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    channels_last = _channels_last(input)
    index_dtype = getattr(torch, _argmax_dtype(input.shape[2], input.shape[3]))
    return (_empty(input, shape, channels_last),
            _empty(input, shape, channels_last, dtype=index_dtype))


@torch.library.custom_op("curoi::roi_pool_backward", mutates_args=())
def _roi_pool_backward_op(grad: Tensor, rois: Tensor, argmax: Tensor,
                          batch_size: int, channels: int, height: int,
                          width: int, deterministic: bool,
                          channels_last: bool = False) -> Tensor:
    if channels_last:
        return _nchw(_curoi.roi_pool_backward(
            _nhwc(grad), _nhwc(argmax), rois, (batch_size, height, width, channels),
            deterministic=deterministic, data_format="NHWC"))
    return _curoi.roi_pool_backward(grad, argmax, rois,
                                    (batch_size, channels, height, width),
                                    deterministic=deterministic)


@_roi_pool_backward_op.register_fake
def _(grad, rois, argmax, batch_size, channels, height, width, deterministic,
      channels_last=False):
    return _empty(grad, (batch_size, channels, height, width), channels_last)


def _roi_pool_setup_context(ctx, inputs, output):
    input, rois = inputs[:2]
    _, argmax = output
    ctx.mark_non_differentiable(argmax)
    ctx.save_for_backward(rois, argmax)
    ctx.input_shape = tuple(input.shape)
    ctx.channels_last = _channels_last(input)


def _roi_pool_backward(ctx, grad, grad_argmax):
    rois, argmax = ctx.saved_tensors
    n, c, h, w = ctx.input_shape
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = _roi_pool_backward_op(
            grad, rois, argmax, n, c, h, w,
            torch.are_deterministic_algorithms_enabled(), ctx.channels_last)
    return grad_input, None, None, None, None, None


_roi_pool_op.register_autograd(_roi_pool_backward,
                               setup_context=_roi_pool_setup_context)


def roi_pool(input: Tensor, boxes, output_size, spatial_scale: float = 1.0, *,
             convention: str = "torchvision") -> Tensor:
    """RoI Pool (Fast R-CNN), as ``torchvision.ops.roi_pool``.

    Each box is divided into ``output_size`` bins of whole pixels; each bin
    is the maximum of the features in it.

    Args:
        input: features ``[N, C, H, W]``, float16, bfloat16, float32 or
            float64, on the CPU or a CUDA device (half precision runs as is,
            also under ``torch.autocast``).
        boxes: ``Tensor[K, 5]`` of ``(batch index, x1, y1, x2, y2)``, or a list
            of ``Tensor[L, 4]`` of ``(x1, y1, x2, y2)``, one per image in
            batch order, on ``input``'s device, in input-image coordinates.
            A box with a batch index outside ``[0, N)`` or a non-finite value
            gives zeros and no gradient.
        output_size: ``int`` or ``(PH, PW)``: bins per box, in height and width.
        spatial_scale: factor from box to feature coordinates, e.g. ``1/16``.
        convention: ``"torchvision"`` (torchvision, Caffe, ONNX MaxRoiPool:
            corners rounded to whole pixels, ``x2``/``y2`` inclusive) or
            ``"mmcv"`` (mmcv, mmdetection: continuous corners ``x1*s`` and
            ``(x2+1)*s``). Keyword only; torchvision has no such argument.

    Returns:
        ``Tensor[K, C, PH, PW]`` of ``input``'s dtype and device; an empty
        bin gives 0. The gradient goes to the first maximum of each bin in
        row-major order (None for ``boxes``); under
        ``torch.use_deterministic_algorithms(True)`` it is bitwise
        reproducible. A ``torch.channels_last`` input gives a
        ``torch.channels_last`` result and gradient, as in :func:`roi_align`.
    """
    _check_input(input)
    rois = _to_rois(boxes, input)
    _check_tensors(input, rois, "boxes")
    ph, pw = _validate.output_size(output_size)
    spatial_scale, _, _ = _scalars(spatial_scale)
    convention = _validate.choice(convention, "convention", _CONVENTIONS)
    if _torch_onnx.dynamo_exporting():
        return _torch_onnx.roi_pool_symbolic(input, rois, spatial_scale, ph, pw, convention)
    # No gradient is needed on this path, so no argmax either.
    out = _direct_forward("roi_pool", input, rois, ph, pw, spatial_scale,
                          _kernels.POOL_CONVENTIONS[convention],
                          after_layout=(0,), argmax=(None,))
    if out is not None:
        return out
    output, _ = _roi_pool_op(input, rois, spatial_scale, ph, pw, convention)
    return output


_torch_onnx.register_torchscript_symbolics()


# ------------------------------------------------------------------ modules
class RoIAlign(nn.Module):
    """:func:`roi_align` as a module, as ``torchvision.ops.RoIAlign``; it
    holds no parameters or buffers. See :func:`roi_align` for the arguments.
    """

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int,
                 aligned: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale,
                         self.sampling_ratio, self.aligned)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, "
                f"spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})")


class RoIPool(nn.Module):
    """:func:`roi_pool` as a module, as ``torchvision.ops.RoIPool``; it holds
    no parameters or buffers. See :func:`roi_pool` for the arguments.
    """

    def __init__(self, output_size, spatial_scale: float, *,
                 convention: str = "torchvision"):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.convention = convention

    def forward(self, input: Tensor, rois) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale,
                        convention=self.convention)

    def __repr__(self) -> str:
        # torchvision's text, plus the convention when it is not torchvision's.
        extra = "" if self.convention == "torchvision" else f", convention={self.convention!r}"
        return (f"{self.__class__.__name__}(output_size={self.output_size}, "
                f"spatial_scale={self.spatial_scale}{extra})")

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
allocated by torch.

Box gradients follow the library an operator comes from: none for
``roi_align``, ``roi_pool``, ``ps_roi_*``, ``roi_align_rotated``,
``roi_spp`` and ``multiscale_roi_align`` (as torchvision, detectron2 and
mmcv), unless ``boxes_grad=True`` asks for the ones curoi has
(``roi_align`` with ``mode="avg"``, ``roi_align_rotated``); ``prroi_pool``
(mmcv's) and ``crop_and_resize`` (TensorFlow's) give theirs by default.

Every function and module compiles with ``torch.jit.script`` (the scripted
code calls the ``torch.ops.curoi`` ops directly) and traces with
``torch.jit.trace``; ``torch.fx.symbolic_trace`` keeps each function as one
node. ``roi_align`` takes quantized CPU features as torchvision's does.

Other libraries' names: ``curoi.torch.compat.torchvision`` (every RoI
name of ``torchvision.ops``), ``curoi.torch.compat.detectron2``
(``ROIAlign``, ``ROIAlignRotated``, ``ROIPooler``, ...) and
``curoi.torch.compat.mmcv`` (``RoIAlign``, ``RoIPool``, ``RoIAlignRotated``,
``PrRoIPool`` and their functions), with their arguments, defaults and
conventions, on these operators.

``torch.onnx.export`` of a model using these functions writes ONNX
``RoiAlign`` (opset 16) and ``MaxRoiPool`` nodes, with the TorchScript
exporter and with ``dynamo=True``, without a translation table (see
``curoi._torch_onnx``).
"""

from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.fx
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2

from torch.utils import _python_dispatch

from . import _frontend, _multiscale, _operators, _torch_onnx, _validate

__all__ = ["roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool", "roi_align_rotated",
           "prroi_pool", "RoIAlign", "RoIPool", "PSRoIAlign", "PSRoIPool", "RoIAlignRotated",
           "PrRoIPool", "crop_and_resize", "roi_spp", "multiscale_roi_align",
           "MultiScaleRoIAlign", "BoxesShapeError", "BoxesTypeError"]


# ------------------------------------------------------------------ errors
class BoxesShapeError(ValueError, AssertionError):
    """A boxes argument of the wrong shape. torchvision raises
    ``AssertionError`` for it (``torch._assert``), curoi ``ValueError``
    elsewhere: this is both, so that code guarding for either keeps
    working."""


class BoxesTypeError(TypeError, AssertionError):
    """A boxes argument that is not a tensor (or a list of them): a
    ``TypeError`` that is also torchvision's ``AssertionError``."""


class QuantizedBatchError(ValueError, RuntimeError):
    """Quantized features holding more than one image. torchvision's
    quantized RoI Align raises ``RuntimeError`` with the same words."""


# --------------------------------------------------------------- arguments
def _check_input(input, quantized=False):
    """``quantized``: whether the operator takes quantized features
    (``roi_align``, as torchvision's)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(
            f"input must be a 4-D tensor [N, C, H, W], got shape {tuple(input.shape)}")
    if input.is_quantized:
        if not quantized:
            raise TypeError(
                f"input is quantized ({input.dtype}): of the curoi.torch operators "
                "only roi_align (mode='avg') takes quantized features, as "
                "torchvision's; dequantize them first")
        _check_quantized(input)
    elif not input.dtype.is_floating_point:
        raise TypeError(f"input must have a floating-point dtype, got {input.dtype}")


def _check_quantized(input):
    """torchvision's quantized RoI Align: per-tensor quantization, on the
    CPU, one image (a batch index may not be representable in the boxes'
    quantization, so the boxes' first column is not read)."""
    if input.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        raise TypeError(
            f"input is quantized per channel ({input.qscheme()}); quantized roi_align "
            "takes per-tensor quantization (torch.quantize_per_tensor)")
    if not input.is_cpu:
        raise ValueError(f"input is quantized on {input.device}; quantized roi_align "
                         "runs on the CPU only, as torchvision's")
    if input.shape[0] != 1:
        raise QuantizedBatchError(
            "Only one image per batch is allowed in roi_align when quantized tensors "
            f"are passed: input holds N = {input.shape[0]} images (the boxes' batch "
            "index column is not read for quantized input, as in torchvision); pool "
            "one image at a time")


_BOX = "(batch index, x1, y1, x2, y2)"
_ROTATED_BOX = "(batch index, centre x, centre y, width, height, angle)"


def _check_boxes(input, boxes, name, columns, per_image=False):
    """``columns`` counts the batch index, which a per-image tensor lacks."""
    if not isinstance(boxes, Tensor):
        raise BoxesTypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    wanted = columns - 1 if per_image else columns
    if boxes.dim() != 2 or boxes.shape[1] != wanted:
        row = _BOX if columns == 5 else _ROTATED_BOX
        layout = (f"[L, {wanted}] tensor of ({row[len('(batch index, '):]}" if per_image
                  else f"[K, {wanted}] tensor of {row}")
        raise BoxesShapeError(f"{name} must be a {layout}, got shape {tuple(boxes.shape)}")
    # Quantized boxes go with quantized features (as torchvision's); they
    # are dequantized before the op.
    if not (boxes.dtype.is_floating_point or (boxes.is_quantized and input.is_quantized)):
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


# A flat [K, columns] result (spatial pyramid pooling) has one layout for
# either kind of features: only 4-D results and gradients are permuted.
def _nchw_result(tensor):
    return _nchw(tensor) if tensor.dim() == 4 else tensor


def _nhwc_result(tensor):
    return _nhwc(tensor) if tensor.dim() == 4 else tensor


def _check_tensors(input, rois, name, columns=5, quantized=False):
    """Checks shared by the public functions (run eagerly, and while
    torch.compile traces them) and the fake implementations, so that a
    compiled model fails with the same messages as an eager one."""
    _check_input(input, quantized)
    _check_boxes(input, rois, name, columns)


def _dequantized(boxes):
    """Quantized boxes (a tensor, or a list per image) as float ones; any
    other value as it is."""
    if isinstance(boxes, Tensor):
        return boxes.dequantize() if boxes.is_quantized else boxes
    if isinstance(boxes, (list, tuple)):
        return [_dequantized(b) for b in boxes]
    return boxes


def _to_rois(boxes, input, columns=5):
    """``boxes`` as one [K, columns] tensor, as torchvision's
    ``convert_boxes_to_roi_format`` makes it: a list of per-image
    [L, columns - 1] tensors gets the image index as its first column."""
    if isinstance(boxes, Tensor):
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise BoxesTypeError(
            f"boxes must be a [K, {columns}] tensor or a list of [L, {columns - 1}] "
            f"tensors, one per image, got {type(boxes).__name__}")
    for i, b in enumerate(boxes):
        _check_boxes(input, b, f"boxes[{i}]", columns, per_image=True)
    if len(boxes) > input.shape[0]:
        raise BoxesShapeError(
            f"boxes is a list of {len(boxes)} per-image tensors but input holds "
            f"{input.shape[0]} images")
    if not boxes:
        # torch.cat refuses an empty list. Boxes are used in float32 (float64
        # for float64 features) whatever the feature dtype.
        dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        return torch.zeros((0, columns), dtype=dtype, device=input.device)
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
            or ((input.requires_grad or rois.requires_grad) and torch.is_grad_enabled())
            or not input.is_contiguous() or not rois.is_contiguous()
            or input.numel() == 0 or rois.shape[0] == 0
            or torch._C._functorch.peek_interpreter_stack() is not None
            or _python_dispatch._get_current_dispatch_mode() is not None
            or torch._C._is_torch_function_mode_enabled()
            or torch.jit.is_tracing() or torch.compiler.is_compiling()):
        return None
    return name


def _numpy(tensor):
    return (tensor.detach() if tensor.requires_grad else tensor).numpy()


# ------------------------------------------------- operators from descriptions
# Schema types of the params: ints are SymInts, as torch infers them from
# Python's int, so that dynamic shapes pass through without specialising.
_SCHEMA_TYPES = {"float": "float", "int": "SymInt", "bool": "bool", "str": "str",
                 "int[]": "int[]"}


def _schema_default(value):
    """A param's default in schema syntax."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return repr(value)


def _with_default(declaration, default):
    return f"{declaration}={_schema_default(default)}"


_REQUIRED = object()


def _complete(args, defaults):
    """An op's arguments after the tensors, as the dispatcher hands them to
    an implementation (the schema's defaults left out), with the defaults
    filled in."""
    if len(args) >= len(defaults):
        return tuple(args)
    return tuple(args) + tuple(defaults[len(args):])


class _TorchOperator:
    """The custom ops of one operator description (``curoi._operators``):
    ``curoi::<name>`` (features, rois, spatial_scale if the operator has
    one, pooled_height, pooled_width, then the other params, as torchvision
    orders them; it also returns the saved results),
    ``curoi::<name>_backward`` (grad, rois, the saved results,
    [spatial_scale, pooled_height, pooled_width,] the features' shape, the
    backward's other params, deterministic, channels_last) and, where the
    operator has a gradient for its boxes, ``curoi::<name>_boxes_backward``
    (grad, features, rois, then the forward's params), with fake
    implementations and the autograd formula. The implementations run
    ``curoi._frontend`` on the tensors.

    Every argument past torchvision's has its default in the schema, so
    that ``torch.ops.curoi.<name>`` takes the arguments of
    ``torch.ops.torchvision.<name>`` (``roi_pool``'s convention is
    ``"torchvision"`` unless given; a backward is not deterministic unless
    asked)."""

    def __init__(self, op, onnx_symbolic=None):
        self.op = op
        self.onnx_symbolic = onnx_symbolic
        # spatial_scale, where there is one, comes before the output size.
        self.lead = 1 if op.params and op.params[0].name == "spatial_scale" else 0
        lead = [f"float {p.name}" for p in op.params[:self.lead]]
        pooled = ["SymInt pooled_height", "SymInt pooled_width"] if op.pooled else []
        rest = [_with_default(f"{_SCHEMA_TYPES[p.schema]} {p.name}", p.default)
                for p in op.params[self.lead:]]
        self._forward_defaults = ((_REQUIRED,) * (len(lead) + len(pooled))
                                  + tuple(p.default for p in op.params[self.lead:]))
        results = ", ".join(["Tensor"] * (1 + len(op.saved)))
        self.forward_op = torch.library.custom_op(
            f"curoi::{op.name}", self._forward, mutates_args=(),
            schema="(" + ", ".join(["Tensor input", "Tensor rois"] + lead + pooled + rest)
            + ") -> " + (f"({results})" if op.saved else "Tensor"))
        self.forward_op.register_fake(self._forward_fake)
        # The backward's channels_last defaults to False: a graph that
        # torch.compile cached before the argument existed (its cache key
        # does not cover autograd formulas) still calls it as before.
        before = ["Tensor grad", "Tensor rois"] + [f"Tensor {s.name}" for s in op.saved]
        if op.backward_needs_output_size:
            before += lead + pooled
        shape = ["SymInt batch_size", "SymInt channels", "SymInt height", "SymInt width"]
        after = [_with_default(f"{_SCHEMA_TYPES[p.schema]} {p.name}", p.default)
                 for p in self._backward_rest]
        self._backward_defaults = ((_REQUIRED,) * (len(before) - 2 + len(shape))
                                   + tuple(p.default for p in self._backward_rest)
                                   + (False, False))
        self.backward_op = torch.library.custom_op(
            f"curoi::{op.name}_backward", self._backward, mutates_args=(),
            schema="(" + ", ".join(before + shape + after + [
                "bool deterministic=False", "bool channels_last=False"]) + ") -> Tensor")
        self.backward_op.register_fake(self._backward_fake)
        # The gradient with respect to the boxes, for operators that have one.
        self.boxes_op = None
        if op.boxes_backward is not None:
            self.boxes_op = torch.library.custom_op(
                f"curoi::{op.name}_boxes_backward", self._boxes_backward,
                mutates_args=(),
                schema="(" + ", ".join(["Tensor grad", "Tensor input", "Tensor rois"]
                                       + lead + pooled + rest) + ") -> Tensor")
            self.boxes_op.register_fake(lambda grad, input, rois, *args: rois.new_empty(
                rois.shape))
        self.forward_op.register_autograd(self._autograd, setup_context=self._setup)

    @property
    def _backward_rest(self):
        """The backward's params that follow the features' shape."""
        lead = self.op.params[:self.lead] if self.op.backward_needs_output_size else ()
        return tuple(p for p in self.op.backward_params if p not in lead)

    def _split(self, args):
        """A forward op's arguments after the tensors -> (ph, pw, params in
        the description's order)."""
        lead = tuple(args[:self.lead])
        if not self.op.pooled:
            return None, None, lead + tuple(args[self.lead:])
        ph, pw = args[self.lead], args[self.lead + 1]
        return ph, pw, lead + tuple(args[self.lead + 2:])

    def _join(self, params, ph, pw):
        """The reverse of :meth:`_split`."""
        params = tuple(params)
        pooled = (ph, pw) if self.op.pooled else ()
        return params[:self.lead] + pooled + params[self.lead:]

    # ----------------------------------------------------------- forward
    def _forward(self, input, rois, *args):
        args = _complete(args, self._forward_defaults)
        if input.is_quantized:
            return self._quantized_forward(input, rois, args)
        ph, pw, params = self._split(args)
        values = self.op.values(*params)
        if self.op.pooled:
            ph, pw = _validate.output_size((ph, pw))
        channels_last = _channels_last(input)
        h, w = input.shape[2], input.shape[3]
        saved = tuple(s.dtype(h, w) for s in self.op.saved) or None
        result = _frontend.forward(self.op, _nhwc(input) if channels_last else input,
                                   rois, ph, pw, values, channels_last, saved)
        if not channels_last:
            return result
        if saved:
            return tuple(_nchw_result(r) for r in result)
        return _nchw_result(result)

    def _quantized_forward(self, input, rois, args):
        """torchvision's quantized RoI Align: the result of the dequantized
        features and boxes, quantized with the features' scale and zero
        point, for one image whatever the boxes' batch index says."""
        if self.op is not _operators.ROI_ALIGN:
            _check_input(input)  # (raises: only roi_align takes them)
        _check_input(input, quantized=True)
        if rois.is_quantized:
            rois = rois.dequantize()
        rois = rois.to(torch.float32, copy=True)
        if rois.dim() == 2 and rois.shape[0] and rois.shape[1] == 5:
            rois[:, 0] = 0
        out = self._forward(input.dequantize(), rois, *args)
        return torch.quantize_per_tensor(out, input.q_scale(), input.q_zero_point(),
                                         input.dtype)

    def _forward_fake(self, input, rois, *args):
        args = _complete(args, self._forward_defaults)
        ph, pw, params = self._split(args)
        _check_tensors(input, rois, "rois", self.op.box_columns,
                       self.op is _operators.ROI_ALIGN)
        # Unchecked params (torch.compile may pass symbolic floats); the op
        # checks them when it runs.
        shape = self.op.result_shape(rois.shape[0], input.shape[1], ph, pw,
                                     self.op.Values._make(params), False)
        channels_last = _channels_last(input) and len(shape) == 4
        out = _empty(input, shape, channels_last)
        if not self.op.saved:
            return out
        h, w = input.shape[2], input.shape[3]
        return (out,) + tuple(
            _empty(input, shape, channels_last, dtype=getattr(torch, s.dtype(h, w)))
            for s in self.op.saved)

    # ---------------------------------------------------------- backward
    def _backward_args(self, args):
        """(grad, rois, saved, (ph, pw) or None, values, (n, c, h, w),
        deterministic, channels_last) from the backward op's arguments."""
        args = list(args[:2]) + list(_complete(args[2:], self._backward_defaults))
        grad, rois = args[:2]
        del args[:2]
        saved = args[:len(self.op.saved)]
        del args[:len(self.op.saved)]
        given = {}
        output_size = None
        if self.op.backward_needs_output_size:
            for p in self.op.params[:self.lead]:
                given[p.name] = args.pop(0)
            output_size = (args[0], args[1])
            del args[:2]
        shape = tuple(args[:4])
        del args[:4]
        for p in self._backward_rest:
            given[p.name] = args.pop(0)
        deterministic = args.pop(0)
        channels_last = args.pop(0)
        return grad, rois, saved, output_size, self.op.values(**given), shape, \
            deterministic, channels_last

    def _backward(self, *args):
        (grad, rois, saved, output_size, values, (n, c, h, w), deterministic,
         channels_last) = self._backward_args(args)
        if channels_last:
            return _nchw(_frontend.backward(
                self.op, _nhwc_result(grad), rois, (n, h, w, c), output_size, values,
                deterministic, True, saved=[_nhwc_result(s) for s in saved]))
        return _frontend.backward(self.op, grad, rois, (n, c, h, w), output_size,
                                  values, deterministic, False, saved=saved)

    def _backward_fake(self, *args):
        grad, _, _, _, _, shape, _, channels_last = self._backward_args(args)
        return _empty(grad, shape, channels_last)

    def _boxes_backward(self, grad, input, rois, *args):
        ph, pw, params = self._split(_complete(args, self._forward_defaults))
        values = self.op.values(*params)
        channels_last = _channels_last(input)
        if channels_last:
            grad, input = _nhwc_result(grad), _nhwc(input)
        return _frontend.boxes_backward(self.op, grad, input, rois, ph, pw, values,
                                        channels_last)

    def _setup(self, ctx, inputs, output):
        input, rois = inputs[:2]
        saved = ()
        if self.op.saved:
            saved = tuple(output[1:])
            ctx.mark_non_differentiable(*saved)
        # The boxes' gradient reads the features (kept by reference).
        kept = (input,) if self.boxes_op is not None else ()
        ctx.save_for_backward(rois, *saved, *kept)
        ctx.input_shape = tuple(input.shape)
        ctx.channels_last = _channels_last(input)
        ctx.args = inputs[2:]
        ctx.count = len(inputs)

    def _autograd(self, ctx, grad, *saved_grads):
        rois, *saved = ctx.saved_tensors
        ph, pw, params = self._split(ctx.args)
        grad_rois = None
        if self.boxes_op is not None:
            input = saved.pop()
            if ctx.needs_input_grad[1]:
                grad_rois = self.boxes_op(grad, input, rois, *ctx.args)
        grad_input = None
        if ctx.needs_input_grad[0]:
            by_name = dict(zip((p.name for p in self.op.params), params))
            args = [grad, rois, *saved]
            if self.op.backward_needs_output_size:
                args += [by_name[p.name] for p in self.op.params[:self.lead]] + [ph, pw]
            args += list(ctx.input_shape)
            args += [by_name[p.name] for p in self._backward_rest]
            args += [torch.are_deterministic_algorithms_enabled(), ctx.channels_last]
            grad_input = self.backward_op(*args)
        return (grad_input, grad_rois) + (None,) * (ctx.count - 2)

    # ------------------------------------------------------------- calls
    def __call__(self, input, boxes, output_size, *params, boxes_grad=False):
        """The public function's body (``params`` in the description's
        order): checks, then the kernel directly when nothing else needs to
        see the call, the ONNX symbolic while exporting, else the op (its
        output only). The boxes get a gradient only with ``boxes_grad``."""
        quantized = self.op is _operators.ROI_ALIGN
        _check_input(input, quantized)
        if input.is_quantized:
            boxes = _dequantized(boxes)
        rois = _to_rois(boxes, input, self.op.box_columns)
        _check_tensors(input, rois, "boxes", self.op.box_columns, quantized)
        if self.boxes_op is not None and not boxes_grad and (
                rois.requires_grad or torch.jit.is_tracing()):
            # (Always while tracing: the graph must cut the boxes off whether
            # or not the example ones require grad.)
            rois = rois.detach()
        ph, pw = _validate.output_size(output_size) if self.op.pooled else (None, None)
        if not torch.compiler.is_compiling():
            # torch.compile(dynamic=True) traces float arguments as symbols
            # that the checks cannot read; the op checks the same values
            # when it runs, with the same messages.
            values = self.op.values(*params)
            params = tuple(values)
            # (An exporter's capture sees fake tensors or a dispatch mode,
            # which the direct call leaves alone.)
            out = self._direct(input, rois, ph, pw, values)
            if out is not None:
                return out
        args = self._join(params, ph, pw)
        if self.onnx_symbolic is not None and _torch_onnx.dynamo_exporting():
            return self.onnx_symbolic(input, rois, *args)
        result = self.forward_op(input, rois, *args)
        return result[0] if self.op.saved else result

    def _direct(self, input, rois, ph, pw, values):
        direct = _direct_dtype(input, rois)
        if direct is None:
            return None
        try:
            out = torch.empty(self.op.result_shape(rois.shape[0], input.shape[1], ph, pw,
                                                   values, False), dtype=input.dtype)
        except RuntimeError:
            return None  # the op path raises curoi's MemoryError naming it
        if self.lead:
            _validate.scale_for(values.spatial_scale, direct)
        # No gradient is needed on this path, so no saved results either.
        # (A tensor that requires grad while grad is off has to be detached
        # to be viewed.)
        self.op.forward(_numpy(input), _numpy(rois), out.numpy(),
                        [None] * len(self.op.saved), values, False)
        return out


_ROI_ALIGN = _TorchOperator(_operators.ROI_ALIGN, _torch_onnx.roi_align_symbolic)
_ROI_ALIGN_MAX = _TorchOperator(_operators.ROI_ALIGN_MAX, _torch_onnx.refuse_roi_align_max)
_ROI_POOL = _TorchOperator(_operators.ROI_POOL, _torch_onnx.roi_pool_symbolic)
_PS_ROI_POOL = _TorchOperator(_operators.PS_ROI_POOL)
_PS_ROI_ALIGN = _TorchOperator(_operators.PS_ROI_ALIGN)
_ROI_ALIGN_ROTATED = _TorchOperator(_operators.ROI_ALIGN_ROTATED)
_PRROI_POOL = _TorchOperator(_operators.PRROI_POOL)
_CROP_AND_RESIZE = _TorchOperator(_operators.CROP_AND_RESIZE)
_ROI_SPP = _TorchOperator(_operators.ROI_SPP)
# The ops under their former names, for the tests and the ONNX symbolics.
_roi_align_op, _roi_align_backward_op = _ROI_ALIGN.forward_op, _ROI_ALIGN.backward_op
_roi_pool_op, _roi_pool_backward_op = _ROI_POOL.forward_op, _ROI_POOL.backward_op


# ----------------------------------------------------------- public functions
# Every function runs in three worlds. Eagerly (and under torch.compile and
# torch.jit.trace) the body in ``if not torch.jit.is_scripting()`` checks
# the arguments, takes the direct CPU call where it can and calls the op.
# torch.jit.script compiles only the rest: the boxes as one rois tensor and
# the ``torch.ops.curoi`` op, which checks its arguments when it runs, with
# the same messages. torch.fx.symbolic_trace keeps each function as one node
# (torch.fx.wrap, and _fx_node for a function imported by name elsewhere,
# which torch.fx.wrap does not reach).


_FX_SCANNED = (torch.fx.Proxy, list, tuple)


def _fx_node(fn, *args):
    """The call as one node of the graph that torch.fx.symbolic_trace is
    building, when an argument (or an item of a list argument) is one of
    its proxies; else None. A call on plain tensors is not scanned further:
    this runs on every eager call, and torch.fx.wrap catches a proxy among
    the other arguments wherever the function is called through its module."""
    if type(args[0]) is Tensor and type(args[1]) is Tensor:
        return None
    for arg in args:
        if isinstance(arg, _FX_SCANNED):
            for item in (arg,) if isinstance(arg, torch.fx.Proxy) else arg:
                if isinstance(item, torch.fx.Proxy):
                    # While tracing, the module's name is torch.fx.wrap's
                    # wrapper of the function: the node calls the function.
                    fn = getattr(fn, "__wrapped__", fn)
                    return item.tracer.create_proxy("call_function", fn, args, {})
    return None


def _script_rois(input: Tensor, boxes: Union[Tensor, List[Tensor]], columns: int,
                 boxes_grad: bool) -> Tensor:
    """TorchScript's :func:`_to_rois`: ``[K, columns]`` rois, cut off from
    the boxes' graph unless ``boxes_grad``."""
    if isinstance(boxes, Tensor):
        torch._assert(boxes.dim() == 2 and boxes.size(1) == columns,
                      f"boxes must be a [K, {columns}] tensor (batch index first)")
        rois = boxes.dequantize() if boxes.is_quantized else boxes
    else:
        ids: List[Tensor] = []
        parts: List[Tensor] = []
        for i, b in enumerate(boxes):
            torch._assert(b.dim() == 2 and b.size(1) == columns - 1,
                          f"boxes[{i}] must be a [L, {columns - 1}] tensor, one per image")
            part = b.dequantize() if b.is_quantized else b
            ids.append(torch.full_like(part[:, :1], float(i)))
            parts.append(part)
        if len(parts) == 0:
            dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
            return torch.zeros([0, columns], dtype=dtype, device=input.device)
        rois = torch.cat([torch.cat(ids, 0), torch.cat(parts, 0)], 1)
    return rois if boxes_grad else rois.detach()


def _no_boxes_grad(what):
    raise ValueError(f"boxes_grad=True: {what} has no gradient with respect to the boxes")


@torch.fx.wrap
def roi_align(input: Tensor, boxes: Union[Tensor, List[Tensor]],
              output_size: BroadcastingList2[int], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False, mode: str = "avg",
              boxes_grad: bool = False) -> Tensor:
    """RoI Align (Mask R-CNN), as ``torchvision.ops.roi_align``.

    Each box is divided into ``output_size`` bins; each bin is the average of
    ``sampling_ratio x sampling_ratio`` bilinearly interpolated samples of
    the features.

    Args:
        input: features ``[N, C, H, W]``, float16, bfloat16, float32 or
            float64, on the CPU or a CUDA device. Half precision runs as is,
            also under ``torch.autocast`` (no cast to float32); the CPU
            computes it in float32 and rounds the result once. Quantized
            features (``torch.quint8``, ``qint8``, ``qint32``, per tensor,
            on the CPU) as torchvision takes them: one image (``N = 1``; the
            boxes' batch index is not read), the boxes quantized too (or
            float), the result quantized with the features' scale and zero
            point.
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
        mode: ``"avg"`` (torchvision's) or ``"max"``, mmcv's
            ``RoIAlign(pool_mode="max")``: the largest interpolated sample of
            each bin, its gradient going to the four pixels around the
            winning sample (see :func:`curoi.roi_align`). torchvision has no
            such argument. ``"max"`` does not export to ONNX (ONNX
            RoiAlign's max mode is another formula).
        boxes_grad: ``False`` (the default): the boxes get no gradient, as
            in torchvision, detectron2 and mmcv, also when they require
            grad. ``True`` (``mode="avg"`` only): the gradient of the result
            with respect to the box corners flows to the boxes (see
            :func:`curoi.roi_align_boxes_backward`).

    Returns:
        ``Tensor[K, C, PH, PW]`` of ``input``'s dtype and device. Its gradient
        flows to ``input`` (and to the boxes with ``boxes_grad=True``);
        under ``torch.use_deterministic_algorithms(True)`` it is bitwise
        reproducible. A ``torch.channels_last`` input runs the channels-last
        kernels in place, and the result and the gradient are
        ``torch.channels_last`` too, with the numbers of a contiguous input
        to the bit.
    """
    if not torch.jit.is_scripting():
        node = _fx_node(roi_align, input, boxes, output_size, spatial_scale,
                        sampling_ratio, aligned, mode, boxes_grad)
        if node is not None:
            return node
        mode = _validate.choice(mode, "mode", _operators.ALIGN_MODES)
        boxes_grad = _validate.flag(boxes_grad, "boxes_grad")
        if mode == "max":
            if boxes_grad:
                _no_boxes_grad("roi_align(mode='max')")
            return _ROI_ALIGN_MAX(input, boxes, output_size, spatial_scale,
                                  sampling_ratio, aligned)
        return _ROI_ALIGN(input, boxes, output_size, spatial_scale, sampling_ratio,
                          aligned, boxes_grad=boxes_grad)
    if mode == "max":
        if boxes_grad:
            raise ValueError("boxes_grad=True: roi_align(mode='max') has no gradient "
                             "with respect to the boxes")
        rois = _script_rois(input, boxes, 5, False)
        return torch.ops.curoi.roi_align_max(input, rois, spatial_scale, output_size[0],
                                             output_size[1], sampling_ratio, aligned)[0]
    if mode != "avg":
        raise ValueError("mode must be 'avg' or 'max', got '" + mode + "'")
    rois = _script_rois(input, boxes, 5, boxes_grad)
    return torch.ops.curoi.roi_align(input, rois, spatial_scale, output_size[0],
                                     output_size[1], sampling_ratio, aligned)


@torch.fx.wrap
def roi_pool(input: Tensor, boxes: Union[Tensor, List[Tensor]],
             output_size: BroadcastingList2[int], spatial_scale: float = 1.0,
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
            ``(x2+1)*s``). torchvision has no such argument.

    Returns:
        ``Tensor[K, C, PH, PW]`` of ``input``'s dtype and device; an empty
        bin gives 0. The gradient goes to the first maximum of each bin in
        row-major order (the boxes get none: the maxima do not move with
        them); under ``torch.use_deterministic_algorithms(True)`` it is
        bitwise reproducible. A ``torch.channels_last`` input gives a
        ``torch.channels_last`` result and gradient, as in :func:`roi_align`.
    """
    if not torch.jit.is_scripting():
        node = _fx_node(roi_pool, input, boxes, output_size, spatial_scale, convention)
        if node is not None:
            return node
        return _ROI_POOL(input, boxes, output_size, spatial_scale, convention)
    rois = _script_rois(input, boxes, 5, False)
    return torch.ops.curoi.roi_pool(input, rois, spatial_scale, output_size[0],
                                    output_size[1], convention)[0]


@torch.fx.wrap
def ps_roi_pool(input: Tensor, boxes: Union[Tensor, List[Tensor]],
                output_size: BroadcastingList2[int],
                spatial_scale: float = 1.0) -> Tensor:
    """Position-sensitive RoI Pool (R-FCN), as ``torchvision.ops.ps_roi_pool``:
    the input has ``C = C_out x PH x PW`` channels and bin ``(ph, pw)`` of
    output channel ``c`` is the mean of input channel
    ``(c x PH + ph) x PW + pw`` over the bin. Arguments as :func:`roi_pool`
    (without ``convention``); see :func:`curoi.ps_roi_pool` for the bins.

    Returns:
        ``Tensor[K, C_out, PH, PW]``, differentiable with respect to ``input``
        (the exact gradient of this forward, also at the bottom and right
        edges where torchvision's backward differs from its forward); the
        boxes get no gradient, as in torchvision.
    """
    if not torch.jit.is_scripting():
        node = _fx_node(ps_roi_pool, input, boxes, output_size, spatial_scale)
        if node is not None:
            return node
        return _PS_ROI_POOL(input, boxes, output_size, spatial_scale)
    rois = _script_rois(input, boxes, 5, False)
    return torch.ops.curoi.ps_roi_pool(input, rois, spatial_scale, output_size[0],
                                       output_size[1])


@torch.fx.wrap
def ps_roi_align(input: Tensor, boxes: Union[Tensor, List[Tensor]],
                 output_size: BroadcastingList2[int], spatial_scale: float = 1.0,
                 sampling_ratio: int = -1) -> Tensor:
    """Position-sensitive RoI Align, as ``torchvision.ops.ps_roi_align``:
    :func:`ps_roi_pool`'s channel layout with RoI Align's bin averages
    (always the half-pixel shift). An empty box with adaptive sampling gives
    0 where torchvision gives NaN; see :func:`curoi.ps_roi_align`.

    Returns:
        ``Tensor[K, C_out, PH, PW]``, differentiable with respect to ``input``
        (the boxes get no gradient, as in torchvision).
    """
    if not torch.jit.is_scripting():
        node = _fx_node(ps_roi_align, input, boxes, output_size, spatial_scale,
                        sampling_ratio)
        if node is not None:
            return node
        return _PS_ROI_ALIGN(input, boxes, output_size, spatial_scale, sampling_ratio)
    rois = _script_rois(input, boxes, 5, False)
    return torch.ops.curoi.ps_roi_align(input, rois, spatial_scale, output_size[0],
                                        output_size[1], sampling_ratio)


@torch.fx.wrap
def roi_align_rotated(input: Tensor, boxes: Union[Tensor, List[Tensor]],
                      output_size: BroadcastingList2[int], spatial_scale: float = 1.0,
                      sampling_ratio: int = 0, convention: str = "detectron2",
                      aligned: bool = True, clockwise: bool = False,
                      boxes_grad: bool = False) -> Tensor:
    """RoI Align on rotated boxes, as detectron2's ``ROIAlignRotated``
    (``convention="detectron2"``: angles in degrees, counter-clockwise) or
    mmcv's ``RoIAlignRotated`` (``convention="mmcv"``: radians, ``aligned``
    and ``clockwise`` honoured); see :func:`curoi.roi_align_rotated`.

    Args:
        input: features ``[N, C, H, W]`` (any float dtype, CPU or CUDA;
            ``torch.channels_last`` runs in place).
        boxes: ``Tensor[K, 6]`` of ``(batch index, centre x, centre y, width,
            height, angle)``, or a list of ``Tensor[L, 5]``, one per image.
        output_size, spatial_scale, sampling_ratio: as in :func:`roi_align`
            (``sampling_ratio`` 0, adaptive, by default as in detectron2).
        boxes_grad: ``False`` (the default): the boxes get no gradient, as
            in detectron2 and mmcv. ``True``: the gradient with respect to
            the centre, size and angle flows to the boxes (see
            :func:`curoi.roi_align_rotated_boxes_backward`).

    Returns:
        ``Tensor[K, C, PH, PW]``; its gradient flows to ``input`` (and to
        the boxes with ``boxes_grad=True``), deterministic under
        ``torch.use_deterministic_algorithms(True)``.
    """
    if not torch.jit.is_scripting():
        node = _fx_node(roi_align_rotated, input, boxes, output_size, spatial_scale,
                        sampling_ratio, convention, aligned, clockwise, boxes_grad)
        if node is not None:
            return node
        return _ROI_ALIGN_ROTATED(input, boxes, output_size, spatial_scale,
                                  sampling_ratio, convention, aligned, clockwise,
                                  boxes_grad=_validate.flag(boxes_grad, "boxes_grad"))
    rois = _script_rois(input, boxes, 6, boxes_grad)
    return torch.ops.curoi.roi_align_rotated(input, rois, spatial_scale, output_size[0],
                                             output_size[1], sampling_ratio, convention,
                                             aligned, clockwise)


@torch.fx.wrap
def prroi_pool(input: Tensor, boxes: Union[Tensor, List[Tensor]],
               output_size: BroadcastingList2[int], spatial_scale: float = 1.0,
               boxes_grad: bool = True) -> Tensor:
    """Precise RoI Pooling, as mmcv's ``prroi_pool``: each bin the integral
    of the bilinear feature surface over the bin, divided by its area (see
    :func:`curoi.prroi_pool`). Differentiable with respect to ``input`` and,
    as mmcv's, to the boxes when they require grad (``boxes_grad=False``
    cuts them off)."""
    if not torch.jit.is_scripting():
        node = _fx_node(prroi_pool, input, boxes, output_size, spatial_scale, boxes_grad)
        if node is not None:
            return node
        return _PRROI_POOL(input, boxes, output_size, spatial_scale,
                           boxes_grad=_validate.flag(boxes_grad, "boxes_grad"))
    rois = _script_rois(input, boxes, 5, boxes_grad)
    return torch.ops.curoi.prroi_pool(input, rois, spatial_scale, output_size[0],
                                      output_size[1])


def _crop_rois(boxes: Tensor, box_indices: Tensor, accumulate: torch.dtype) -> Tensor:
    # The box index rides in the rois' first column (see _operators).
    return torch.cat([box_indices[:, None].to(accumulate), boxes.to(accumulate)], dim=1)


@torch.fx.wrap
def crop_and_resize(image: Tensor, boxes: Tensor, box_indices: Tensor,
                    crop_size: BroadcastingList2[int], method: str = "bilinear",
                    extrapolation_value: float = 0.0, data_format: str = "NHWC",
                    boxes_grad: bool = True) -> Tensor:
    """TensorFlow's ``tf.image.crop_and_resize`` on torch tensors, with
    gradients for the image and, as TensorFlow's, for the boxes
    (``boxes_grad=False`` cuts them off); see :func:`curoi.crop_and_resize`
    for the arguments. ``data_format="NHWC"`` (the default, as TensorFlow)
    takes ``image`` ``[N, H, W, C]`` and gives ``[K, crop_height,
    crop_width, C]``; ``"NCHW"`` takes ``[N, C, H, W]``
    (``torch.channels_last`` or not) and gives ``[K, C, crop_height,
    crop_width]``."""
    if not torch.jit.is_scripting():
        node = _fx_node(crop_and_resize, image, boxes, box_indices, crop_size, method,
                        extrapolation_value, data_format, boxes_grad)
        if node is not None:
            return node
        channels_last = _validate.data_format(data_format)
        boxes_grad = _validate.flag(boxes_grad, "boxes_grad")
        if not isinstance(image, Tensor):
            raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
        if image.dim() != 4:
            raise ValueError(f"image must be a 4-D tensor, got shape {tuple(image.shape)}")
        for name, value, dims in (("boxes", boxes, 2), ("box_indices", box_indices, 1)):
            error = BoxesTypeError if name == "boxes" else TypeError
            if not isinstance(value, Tensor):
                raise error(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            if value.dim() != dims:
                error = BoxesShapeError if name == "boxes" else ValueError
                raise error(f"{name} must be a {dims}-D tensor, got shape "
                            f"{tuple(value.shape)}")
        if boxes.shape[1] != 4 or box_indices.shape[0] != boxes.shape[0]:
            raise BoxesShapeError(
                f"boxes must be [K, 4] (y1, x1, y2, x2) and box_indices [K], got "
                f"{tuple(boxes.shape)} and {tuple(box_indices.shape)}")
        if box_indices.dtype.is_floating_point or box_indices.dtype == torch.bool:
            raise TypeError(f"box_indices must have an integer dtype, got "
                            f"{box_indices.dtype}")
        acc = torch.float64 if image.dtype == torch.float64 else torch.float32
        rois = _crop_rois(boxes, box_indices, acc)
        x = _nchw(image) if channels_last else image
        y = _CROP_AND_RESIZE(x, rois, crop_size, method, extrapolation_value,
                             boxes_grad=boxes_grad)
        return _nhwc(y) if channels_last else y
    if data_format != "NHWC" and data_format != "NCHW":
        raise ValueError("data_format must be 'NCHW' or 'NHWC', got '" + data_format + "'")
    acc = torch.float64 if image.dtype == torch.float64 else torch.float32
    rois = _crop_rois(boxes, box_indices, acc)
    if not boxes_grad:
        rois = rois.detach()
    if data_format == "NHWC":
        image = image.permute(0, 3, 1, 2)
    y = torch.ops.curoi.crop_and_resize(image, rois, crop_size[0], crop_size[1], method,
                                        extrapolation_value)
    return y.permute(0, 2, 3, 1) if data_format == "NHWC" else y


def _whole_map_rois(input: Tensor) -> Tensor:
    """Each image's whole map as a box, in feature pixels (see
    curoi._operators.whole_map_rois)."""
    n, h, w = input.shape[0], input.shape[2], input.shape[3]
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    rois = torch.zeros((n, 5), dtype=acc, device=input.device)
    rois[:, 0] = torch.arange(n, dtype=acc, device=input.device)
    rois[:, 3] = w - 1
    rois[:, 4] = h - 1
    return rois


@torch.fx.wrap
def roi_spp(input: Tensor, boxes: Optional[Union[Tensor, List[Tensor]]] = None,
            levels: List[int] = (1, 2, 4), spatial_scale: float = 1.0,
            mode: str = "max", convention: str = "torchvision") -> Tensor:
    """Spatial pyramid pooling (SPPnet) of torch tensors, with the arguments
    of :func:`curoi.roi_spp`: for each box, RoI Pool (``mode="max"``) or the
    bins' means (``"avg"``) over an ``l x l`` grid per level, in one launch.

    Args:
        input: features ``[N, C, H, W]`` (any float dtype, CPU or CUDA;
            ``torch.channels_last`` runs in place).
        boxes: ``Tensor[K, 5]``, a list of ``Tensor[L, 4]``, or None: each
            image's whole map (K = N), whatever ``spatial_scale`` says.
        levels: grid sizes, e.g. ``(1, 2, 4)``.
        spatial_scale, convention: as in :func:`roi_pool`.

    Returns:
        ``Tensor[K, C x sum(l * l)]``: the levels' ``[C, l, l]`` blocks of
        each box in turn. Its gradient flows to ``input`` (the boxes get
        None), deterministic under ``torch.use_deterministic_algorithms(True)``.
    """
    if not torch.jit.is_scripting():
        node = _fx_node(roi_spp, input, boxes, levels, spatial_scale, mode, convention)
        if node is not None:
            return node
        levels = _operators.spp_levels(levels)
        if boxes is None:
            if not torch.compiler.is_compiling():  # (a symbol there, see _TorchOperator)
                _validate.spatial_scale(spatial_scale)  # checked, though whole maps ignore it
            _check_input(input)
            # Whole maps are in feature pixels: spatial_scale 1.
            return _ROI_SPP(input, _whole_map_rois(input), None, levels, 1.0, mode,
                            convention)
        return _ROI_SPP(input, boxes, None, levels, spatial_scale, mode, convention)
    if boxes is None:
        return torch.ops.curoi.roi_spp(input, _whole_map_rois(input), levels, 1.0, mode,
                                       convention)[0]
    rois = _script_rois(input, boxes, 5, False)
    return torch.ops.curoi.roi_spp(input, rois, levels, spatial_scale, mode,
                                   convention)[0]


_torch_onnx.register_torchscript_symbolics()


# ------------------------------------------------------------------ modules
class RoIAlign(nn.Module):
    """:func:`roi_align` as a module, as ``torchvision.ops.RoIAlign``; it
    holds no parameters or buffers. See :func:`roi_align` for the arguments.
    """

    def __init__(self, output_size: BroadcastingList2[int], spatial_scale: float,
                 sampling_ratio: int, aligned: bool = False, *, mode: str = "avg",
                 boxes_grad: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.mode = mode
        self.boxes_grad = boxes_grad

    def forward(self, input: Tensor, rois: Union[Tensor, List[Tensor]]) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale,
                         self.sampling_ratio, self.aligned, self.mode, self.boxes_grad)

    def __repr__(self) -> str:
        # torchvision's text, plus curoi's options where they are not the
        # defaults.
        extra = "" if self.mode == "avg" else f", mode='{self.mode}'"
        extra += ", boxes_grad=True" if self.boxes_grad else ""
        return (f"{self.__class__.__name__}(output_size={self.output_size}, "
                f"spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}{extra})")


class RoIPool(nn.Module):
    """:func:`roi_pool` as a module, as ``torchvision.ops.RoIPool``; it holds
    no parameters or buffers. See :func:`roi_pool` for the arguments.
    """

    def __init__(self, output_size: BroadcastingList2[int], spatial_scale: float, *,
                 convention: str = "torchvision"):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.convention = convention

    def forward(self, input: Tensor, rois: Union[Tensor, List[Tensor]]) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale, self.convention)

    def __repr__(self) -> str:
        # torchvision's text, plus the convention when it is not torchvision's.
        extra = "" if self.convention == "torchvision" else f", convention='{self.convention}'"
        return (f"{self.__class__.__name__}(output_size={self.output_size}, "
                f"spatial_scale={self.spatial_scale}{extra})")


class PSRoIPool(nn.Module):
    """:func:`ps_roi_pool` as a module, as ``torchvision.ops.PSRoIPool``."""

    def __init__(self, output_size: BroadcastingList2[int], spatial_scale: float):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale

    def forward(self, input: Tensor, rois: Union[Tensor, List[Tensor]]) -> Tensor:
        return ps_roi_pool(input, rois, self.output_size, self.spatial_scale)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, "
                f"spatial_scale={self.spatial_scale})")


class PSRoIAlign(nn.Module):
    """:func:`ps_roi_align` as a module, as ``torchvision.ops.PSRoIAlign``."""

    def __init__(self, output_size: BroadcastingList2[int], spatial_scale: float,
                 sampling_ratio: int):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio

    def forward(self, input: Tensor, rois: Union[Tensor, List[Tensor]]) -> Tensor:
        return ps_roi_align(input, rois, self.output_size, self.spatial_scale,
                            self.sampling_ratio)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, "
                f"spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio})")


class RoIAlignRotated(nn.Module):
    """:func:`roi_align_rotated` as a module, as detectron2's
    ``ROIAlignRotated(output_size, spatial_scale, sampling_ratio)`` (and, with
    ``convention="mmcv"``, mmcv's ``RoIAlignRotated``)."""

    def __init__(self, output_size: BroadcastingList2[int], spatial_scale: float,
                 sampling_ratio: int, *, convention: str = "detectron2",
                 aligned: bool = True, clockwise: bool = False, boxes_grad: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.convention = convention
        self.aligned = aligned
        self.clockwise = clockwise
        self.boxes_grad = boxes_grad

    def forward(self, input: Tensor, rois: Union[Tensor, List[Tensor]]) -> Tensor:
        return roi_align_rotated(input, rois, self.output_size, self.spatial_scale,
                                 self.sampling_ratio, self.convention, self.aligned,
                                 self.clockwise, self.boxes_grad)

    def __repr__(self) -> str:
        extra = ("" if self.convention == "detectron2" else
                 f", convention='{self.convention}', aligned={self.aligned}, "
                 f"clockwise={self.clockwise}")
        extra += ", boxes_grad=True" if self.boxes_grad else ""
        return (f"{self.__class__.__name__}(output_size={self.output_size}, "
                f"spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}{extra})")


class PrRoIPool(nn.Module):
    """:func:`prroi_pool` as a module, as mmcv's ``PrRoIPool(output_size,
    spatial_scale)``."""

    def __init__(self, output_size: BroadcastingList2[int], spatial_scale: float = 1.0, *,
                 boxes_grad: bool = True):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.boxes_grad = boxes_grad

    def forward(self, input: Tensor, rois: Union[Tensor, List[Tensor]]) -> Tensor:
        return prroi_pool(input, rois, self.output_size, self.spatial_scale,
                          self.boxes_grad)

    def __repr__(self) -> str:
        extra = "" if self.boxes_grad else ", boxes_grad=False"
        return (f"{self.__class__.__name__}(output_size={self.output_size}, "
                f"spatial_scale={self.spatial_scale}{extra})")


# ------------------------------------------------------ multiscale RoI Align
# A feature pyramid pooled in one launch. Its features are a list of
# tensors, which the operator descriptions (one feature map each) do not
# cover: these ops are written out here, on curoi._multiscale's functions.


def _pyramid_channels_last(features):
    """Whether a pyramid runs the channels-last kernels: every level laid out
    as ``torch.channels_last`` and one at least not also plain contiguous (a
    level of 1 x 1 pixels is both). The real op and its fake decide alike."""
    return (all(f.is_contiguous(memory_format=torch.channels_last) for f in features)
            and not all(f.is_contiguous() for f in features))


def _check_pyramid(features, rois, spatial_scales):
    """Checks shared by the public function and the fakes: tensors of 4
    dims, one dtype and device, the same N and C, as many scales."""
    for i, f in enumerate(features):
        if not isinstance(f, Tensor):
            raise TypeError(f"features[{i}] must be a torch.Tensor, got "
                            f"{type(f).__name__}")
        if f.dim() != 4:
            raise ValueError(f"features[{i}] must be a 4-D tensor [N, C, H, W], got "
                             f"shape {tuple(f.shape)}")
        if not f.dtype.is_floating_point:
            raise TypeError(f"features[{i}] must have a floating-point dtype, got "
                            f"{f.dtype}")
        first = features[0]
        if f.device != first.device:
            raise ValueError(f"features[{i}] is on {f.device}, but features[0] is on "
                             f"{first.device}: move the levels to one device")
        _multiscale.check_level(i, str(f.dtype), f.shape[0], f.shape[1],
                                (str(first.dtype), first.shape[0], first.shape[1]))
    _check_boxes(features[0], rois, "boxes", 5)
    if len(spatial_scales) != len(features):
        raise ValueError(
            f"spatial_scales has {len(spatial_scales)} entries but features has "
            f"{len(features)} levels: give one scale per level")


@torch.library.custom_op(
    "curoi::multiscale_roi_align", mutates_args=(),
    schema="(Tensor[] features, Tensor rois, float[] spatial_scales, "
           "SymInt pooled_height, SymInt pooled_width, SymInt sampling_ratio=-1, "
           "bool aligned=False, float canonical_scale=224., int canonical_level=4, "
           "float eps=1e-6, str level_rule=\"torchvision\") -> Tensor")
def _multiscale_op(features, rois, spatial_scales, pooled_height, pooled_width,
                   sampling_ratio=-1, aligned=False, canonical_scale=224.0,
                   canonical_level=4, eps=1e-6, level_rule="torchvision"):
    # (The dispatcher leaves out the arguments that take their defaults.)
    channels_last = _pyramid_channels_last(features)
    levels = [_nhwc(f) for f in features] if channels_last else list(features)
    out = _multiscale.multiscale_roi_align(
        levels, rois, (pooled_height, pooled_width), spatial_scales, sampling_ratio,
        aligned, canonical_scale=canonical_scale, canonical_level=canonical_level,
        eps=eps, level_rule=level_rule,
        data_format="NHWC" if channels_last else "NCHW")
    return _nchw(out) if channels_last else out


@_multiscale_op.register_fake
def _multiscale_fake(features, rois, spatial_scales, pooled_height, pooled_width,
                     *args):
    _check_pyramid(features, rois, spatial_scales)
    shape = (rois.shape[0], features[0].shape[1], pooled_height, pooled_width)
    return _empty(features[0], shape, _pyramid_channels_last(features))


@torch.library.custom_op(
    "curoi::multiscale_roi_align_backward", mutates_args=(),
    schema="(Tensor grad, Tensor rois, float[] spatial_scales, SymInt pooled_height, "
           "SymInt pooled_width, SymInt batch_size, SymInt channels, "
           "SymInt[] heights, SymInt[] widths, SymInt sampling_ratio, bool aligned, "
           "float canonical_scale, int canonical_level, float eps, str level_rule, "
           "bool deterministic=False, bool channels_last=False) -> Tensor[]")
def _multiscale_backward_op(grad, rois, spatial_scales, pooled_height, pooled_width,
                            batch_size, channels, heights, widths, sampling_ratio,
                            aligned, canonical_scale, canonical_level, eps, level_rule,
                            deterministic=False, channels_last=False):
    n, c = batch_size, channels
    shapes = [(n, h, w, c) if channels_last else (n, c, h, w)
              for h, w in zip(heights, widths)]
    grads = _multiscale.multiscale_roi_align_backward(
        _nhwc(grad) if channels_last else grad, rois, shapes,
        (pooled_height, pooled_width), spatial_scales, sampling_ratio, aligned,
        canonical_scale=canonical_scale, canonical_level=canonical_level, eps=eps,
        level_rule=level_rule, data_format="NHWC" if channels_last else "NCHW",
        deterministic=deterministic)
    return [_nchw(g) for g in grads] if channels_last else grads


@_multiscale_backward_op.register_fake
def _multiscale_backward_fake(grad, rois, spatial_scales, pooled_height, pooled_width,
                              batch_size, channels, heights, widths, *args):
    channels_last = args[7] if len(args) > 7 else False
    return [_empty(grad, (batch_size, channels, h, w), channels_last)
            for h, w in zip(heights, widths)]


def _multiscale_setup(ctx, inputs, output):
    features, rois, *args = inputs
    ctx.save_for_backward(rois)
    ctx.levels = len(features)
    ctx.batch, ctx.channels = features[0].shape[0], features[0].shape[1]
    ctx.heights = [f.shape[2] for f in features]
    ctx.widths = [f.shape[3] for f in features]
    ctx.channels_last = _pyramid_channels_last(features)
    ctx.args = args


def _multiscale_autograd(ctx, grad):
    rois, = ctx.saved_tensors
    (spatial_scales, ph, pw, sampling_ratio, aligned, canonical_scale,
     canonical_level, eps, level_rule) = ctx.args
    grads = None
    # needs_input_grad has the structure of the arguments as the op was
    # called: the list of levels first, and only the arguments that were
    # not left to their schema defaults (the gradients must match it).
    first = ctx.needs_input_grad[0]
    if any(first) if isinstance(first, (list, tuple)) else any(
            ctx.needs_input_grad[:ctx.levels]):
        grads = _multiscale_backward_op(
            grad, rois, spatial_scales, ph, pw, ctx.batch, ctx.channels, ctx.heights,
            ctx.widths, sampling_ratio, aligned, canonical_scale, canonical_level, eps,
            level_rule, torch.are_deterministic_algorithms_enabled(),
            ctx.channels_last)
    return (grads, None) + (None,) * (len(ctx.needs_input_grad) - 2)


_multiscale_op.register_autograd(_multiscale_autograd, setup_context=_multiscale_setup)


@torch.fx.wrap
def multiscale_roi_align(features: List[Tensor], boxes: Union[Tensor, List[Tensor]],
                         output_size: BroadcastingList2[int], spatial_scales: List[float],
                         sampling_ratio: int = -1, aligned: bool = False,
                         canonical_scale: float = 224.0, canonical_level: int = 4,
                         eps: float = 1e-6, level_rule: str = "torchvision",
                         data_format: str = "NCHW") -> Tensor:
    """RoI Align over a feature pyramid in one launch, each box pooled from
    the level its size selects: :func:`curoi.multiscale_roi_align` on
    tensors, differentiable with respect to every level.

    Args:
        features: a list of tensors ``[N, C, H_l, W_l]`` (``data_format="NHWC"``:
            ``[N, H_l, W_l, C]``), from the finest level to the coarsest, of
            one dtype and device. Levels laid out as ``torch.channels_last``
            run the channels-last kernels in place, and the result and the
            gradients are ``torch.channels_last`` too.
        boxes: ``Tensor[K, 5]`` of ``(batch index, x1, y1, x2, y2)``, or a list
            of ``Tensor[L, 4]``, one per image, in input-image coordinates.
        output_size: ``int`` or ``(PH, PW)``.
        spatial_scales: one per level, halving from level to level, e.g.
            ``[1/4, 1/8, 1/16, 1/32]``.
        sampling_ratio, aligned: RoI Align's.
        canonical_scale, canonical_level, eps, level_rule: the level rule
            (see :func:`curoi.multiscale_roi_align`): torchvision's
            ``LevelMapper`` by default, ``level_rule="detectron2"`` for
            detectron2's ``ROIPooler``.
        data_format: ``"NCHW"`` or ``"NHWC"``.

    Returns:
        ``Tensor[K, C, PH, PW]`` (NHWC: ``[K, PH, PW, C]``) of the features'
        dtype, the boxes in their order. The gradient flows to every level's
        features (None for the boxes), bitwise reproducible under
        ``torch.use_deterministic_algorithms(True)``. The op is
        ``torch.ops.curoi.multiscale_roi_align``, with a fake implementation
        for ``torch.compile``.
    """
    if torch.jit.is_scripting():
        if data_format != "NCHW" and data_format != "NHWC":
            raise ValueError("data_format must be 'NCHW' or 'NHWC', got '"
                             + data_format + "'")
        if data_format == "NHWC":
            features = [f.permute(0, 3, 1, 2) for f in features]
        out = torch.ops.curoi.multiscale_roi_align(
            features, _script_rois(features[0], boxes, 5, False), spatial_scales,
            output_size[0], output_size[1], sampling_ratio, aligned, canonical_scale,
            canonical_level, eps, level_rule)
        return out.permute(0, 2, 3, 1) if data_format == "NHWC" else out
    node = _fx_node(multiscale_roi_align, features, boxes, output_size, spatial_scales,
                    sampling_ratio, aligned, canonical_scale, canonical_level, eps,
                    level_rule, data_format)
    if node is not None:
        return node
    channels_last = _validate.data_format(data_format)
    features = _multiscale.pyramid(features)
    for i, f in enumerate(features):
        if not isinstance(f, Tensor):
            raise TypeError(f"features[{i}] must be a torch.Tensor, got "
                            f"{type(f).__name__}")
        if f.dim() != 4:
            layout = "[N, H, W, C]" if channels_last else "[N, C, H, W]"
            raise ValueError(f"features[{i}] must be a 4-D tensor {layout}, got "
                             f"shape {tuple(f.shape)}")
    if channels_last:
        features = [_nchw(f) for f in features]
    rois = _to_rois(boxes, features[0])
    _check_pyramid(features, rois, spatial_scales)
    ph, pw = _validate.output_size(output_size)
    args = (list(spatial_scales), sampling_ratio, aligned, canonical_scale,
            canonical_level, eps, level_rule)
    if not torch.compiler.is_compiling():
        # The op checks the same values when it runs (with the same
        # messages); under torch.compile the values may be symbols.
        v = _multiscale.values(spatial_scales, len(features), sampling_ratio, aligned,
                               canonical_scale, canonical_level, eps, level_rule)
        args = (list(v.spatial_scales), v.sampling_ratio, v.aligned,
                float(v.canonical_scale), v.canonical_level, v.eps, v.level_rule)
    scales, rest = args[0], args[1:]
    out = _multiscale_op(features, rois, scales, ph, pw, *rest)
    return _nhwc(out) if channels_last else out


class MultiScaleRoIAlign(nn.Module):
    """torchvision's ``MultiScaleRoIAlign``, the same arguments and numbers,
    in one kernel launch (torchvision runs ``roi_align`` once per level and
    scatters the results).

    Args:
        featmap_names: the names of the feature maps in ``x`` to pool from;
            they are taken in ``x``'s order (as torchvision does), which must
            be the finest first.
        output_size: ``int`` or ``(PH, PW)``.
        sampling_ratio: RoI Align's (``<= 0``: adaptive).
        canonical_scale, canonical_level: the FPN level rule's (224 and 4).

    ``forward(x, boxes, image_shapes)``: ``x`` a dict of ``[N, C, H, W]``
    feature maps, ``boxes`` a list of ``Tensor[L, 4]`` per image, and
    ``image_shapes`` the ``(height, width)`` of each image before the
    backbone. As torchvision, at the first call each map's scale is inferred
    as ``2 ** round(log2(H / max height))`` (in float32), kept for later
    calls, and the boxes' levels are torchvision's ``LevelMapper`` with
    ``eps=1e-6`` clamped to the maps' levels; RoI Align is not aligned
    (``aligned=False``). Differentiable with respect to every map.
    """

    scales: Optional[List[float]]

    def __init__(self, featmap_names: List[str], output_size: BroadcastingList2[int],
                 sampling_ratio: int, *, canonical_scale: int = 224,
                 canonical_level: int = 4):
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.featmap_names = list(featmap_names)
        self.sampling_ratio = sampling_ratio
        self.output_size = tuple(output_size)
        self.scales = None
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor],
                image_shapes: List[Tuple[int, int]]) -> Tensor:
        if not torch.jit.is_scripting():
            # torch.fx sees the whole forward as one node (its inputs are
            # proxies, not a dict and lists), run with the scales known
            # when it was traced.
            node = _fx_node(_pool_pyramid, x, boxes, image_shapes, self.featmap_names,
                            self.output_size, self.sampling_ratio, self.scales,
                            self.canonical_scale, self.canonical_level)
            if node is not None:
                return node
            features = _pyramid_levels(x, self.featmap_names)
            if self.scales is None:
                self.scales = _pyramid_scales(features, image_shapes, self.featmap_names)
            return _pool_pyramid(x, boxes, image_shapes, self.featmap_names,
                                 self.output_size, self.sampling_ratio, self.scales,
                                 self.canonical_scale, self.canonical_level)
        features: List[Tensor] = []
        for name, value in x.items():
            if name in self.featmap_names:
                features.append(value)
        scales = self.scales
        if scales is None:
            largest = 0
            for shape in image_shapes:
                largest = max(largest, shape[0])
            scales = [2.0 ** float(torch.tensor(float(f.shape[-2]) / float(largest))
                                   .log2().round()) for f in features]
            self.scales = scales
        return multiscale_roi_align(features, boxes, self.output_size, scales,
                                    self.sampling_ratio, False, float(self.canonical_scale),
                                    self.canonical_level, 1e-6, "torchvision", "NCHW")

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(featmap_names={self.featmap_names}, "
                f"output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio})")


def _pyramid_levels(x, featmap_names):
    """The maps of ``x`` that ``featmap_names`` names, in ``x``'s order."""
    if not isinstance(x, dict):
        raise TypeError(f"x must be a dict of feature maps by name, got "
                        f"{type(x).__name__}")
    missing = [name for name in featmap_names if name not in x]
    if missing:
        raise ValueError(
            f"x has no feature map named {missing[0]!r} (featmap_names = "
            f"{list(featmap_names)!r}); it holds "
            f"{', '.join(repr(k) for k in x)}")
    return [v for k, v in x.items() if k in featmap_names]


def _infer_scale(feature, original_size):
    # torchvision's: from the height, rounded in float32 log2.
    approx = float(feature.shape[-2]) / float(original_size[0])
    return 2 ** float(torch.tensor(approx).log2().round())


def _pyramid_scales(features, image_shapes, featmap_names):
    """Each map's scale, from its height and the largest image's."""
    if not isinstance(image_shapes, (list, tuple)) or not image_shapes:
        raise ValueError(
            "image_shapes must be a non-empty list of the images' (height, "
            f"width) before the backbone, got {image_shapes!r}")
    largest = (max(int(s[0]) for s in image_shapes),
               max(int(s[1]) for s in image_shapes))
    scales = [_infer_scale(f, largest) for f in features]
    try:
        _multiscale.spatial_scales(scales, len(scales))
    except ValueError as error:
        raise ValueError(
            f"the feature maps that featmap_names {list(featmap_names)!r} selects from "
            f"x have the scales {scales} (their heights against image_shapes' largest "
            f"image {largest}); they must be consecutive levels of a pyramid "
            f"in x's order, the finest first: {error}") from None
    return scales


@torch.fx.wrap
def _pool_pyramid(x, boxes, image_shapes, featmap_names, output_size, sampling_ratio,
                  scales, canonical_scale, canonical_level):
    """:class:`MultiScaleRoIAlign`'s forward as a function of its settings
    (scales None: inferred from ``image_shapes``)."""
    features = _pyramid_levels(x, featmap_names)
    if not isinstance(boxes, (list, tuple)) or not boxes:
        raise ValueError(
            "boxes must be a non-empty list of Tensor[L, 4] (x1, y1, x2, y2), "
            f"one per image, got {boxes!r}")
    if scales is None:
        scales = _pyramid_scales(features, image_shapes, featmap_names)
    return multiscale_roi_align(
        features, list(boxes), output_size, scales, sampling_ratio, False,
        canonical_scale=canonical_scale, canonical_level=canonical_level, eps=1e-6,
        level_rule="torchvision")


# ------------------------------------------------------- other libraries' names
# curoi.torch.compat.{torchvision, detectron2, mmcv}: modules of their own
# (curoi/_compat_*.py, on the names above), registered under those names.
from . import _torch_compat as compat  # noqa: E402

"""RoI Align and RoI Pool for JAX: eager, ``jax.jit``, ``jax.grad``/``jax.vjp``
and ``jax.vmap``, on the CPU and on CUDA GPUs.

    import curoi.jax

    y = curoi.jax.roi_align(x, boxes, output_size=7, spatial_scale=1/16,
                            sampling_ratio=2, aligned=True)
    loss, grads = jax.value_and_grad(loss_fn)(params)   # through roi_align

The arguments and the numbers are those of :func:`curoi.roi_align` and
:func:`curoi.roi_pool`; inputs and results are ``jax.Array``.

How it runs. Each kernel launch is a ``jax.experimental.buffer_callback``:
XLA calls it with its own device buffers, and the callback views them through
DLPack without copying (NumPy views on the CPU, inputs read-only; CuPy views
on a GPU, where the kernel is launched on XLA's stream, ``ctx.stream``, on the
buffers' device) and runs the same kernels as the rest of curoi. Everything
else (boxes to a ``[K, 5]`` float32/float64 array, half precision widened to
float32 on the CPU, gradients cast back to the features' dtype) is plain
``jax.numpy`` around the callback, so XLA sees shapes and dtypes up front and
``jax.eval_shape`` works without running a kernel.

Transformations:

- ``jax.grad``/``jax.vjp``: a ``jax.custom_vjp`` whose backward runs curoi's
  backward kernels (``deterministic=True`` selects the bitwise reproducible
  sum). JAX computes the gradient of the arguments asked for only: of the
  boxes with ``jax.grad(f, argnums=1)``, which is the operator's own where it
  has one (RoI Align's average mode, rotated RoI Align, Precise RoI Pooling,
  crop_and_resize; see each function) and zero for the others (RoI Pool,
  the position-sensitive operators, spatial pyramid pooling, multiscale RoI
  Align, RoI Align's max mode).
- ``jax.vmap``: each kernel carries a ``jax.custom_batching.custom_vmap`` rule
  that folds the mapped axis into the image axis: features ``[B, N, C, H, W]``
  become ``[B*N, C, H, W]`` and box ``k`` of batch ``b`` gets batch index
  ``n + b*N``, so one launch serves the whole batch (boxes whose batch index
  is invalid stay invalid). Nested ``vmap`` folds once per level. Unbatched
  features with batched boxes are not copied per batch element.

Several devices:

- ``jax.shard_map``: forward, ``grad`` and ``vmap`` run on each device's
  own shard (features and boxes split on the batch, boxes' batch indices
  local to the shard) and give the single-device numbers. Results and
  gradients carry the mesh axes their inputs vary along; the gradient of
  features that are the same on every device (``P()``) is summed over the
  devices, as for JAX's own ops. This is the data-parallel recipe (see
  ``examples/jax_data_parallel.py``).
- ``jax.jit`` on a sharded feature array is correct but not parallel: XLA
  cannot split a callback, so it all-gathers the features onto every device,
  each device runs the kernel on the whole batch, and the result is
  replicated. Use ``shard_map`` to keep the work split.

What does not work (yet):

- ``jax.export`` (and so any serialisation of the program): the kernels are
  Python callbacks, which XLA cannot serialise; ``jax.export.export(...)``
  raises JAX's ``NotImplementedError: serialization of host_callbacks is not
  yet implemented``. For the same reason such programs are not stored in
  JAX's persistent compilation cache.
- TPUs and ROCm GPUs: the callbacks run on CPU and CUDA devices only.
- Only reverse mode is defined (``custom_vjp``):
  ``jax.jvp``, ``jax.jacfwd`` and derivatives of order two (``jax.hessian``,
  ``grad`` of ``grad``) raise JAX's errors.
- Under ``vmap`` the folded batch ``B*N`` may hold at most ``2**24`` images
  (``2**53`` for float64), the largest batch index a float32 box holds
  exactly; a larger one raises a ValueError at trace time.

On a GPU the kernels are compiled by NVRTC on first use (inside the first
call). Every byte a launch uses is XLA's: temporaries (the deterministic
backward's int64 fixed-point sums, the box gradients' partial sums) are one
more output of the launch's callback, sized when the program is traced and
handed to the kernels as their workspace, so XLA's preallocated pool covers
them and CuPy allocates nothing.

Needs JAX 0.7 or newer (``jax.experimental.buffer_callback``), and CuPy for
GPU arrays (``pip install -e ".[cuda12]"`` in curoi's folder).
"""

import functools
import importlib

import numpy as np

try:
    import jax
    import jax.numpy as jnp
    from jax.custom_batching import custom_vmap
except ImportError as error:  # pragma: no cover - only without JAX
    raise ImportError(
        "curoi.jax needs JAX: `pip install \"jax>=0.7\"` (CPU) or "
        "`pip install \"jax[cuda12]>=0.7\"` (NVIDIA GPUs)"
    ) from error

from . import _boxes, _gpu, _memory, _multiscale, _operators, _ops, _validate
from ._interop import FLOAT_DTYPES, HALF_DTYPES, external_stream
from ._operators import (ALIGN_MODES, PS_ROI_ALIGN, PS_ROI_POOL, ROI_ALIGN,
                         ROI_ALIGN_MAX, ROI_ALIGN_ROTATED, ROI_POOL, ROI_SPP, PRROI_POOL,
                         CROP_AND_RESIZE)

__all__ = ["roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool", "roi_align_rotated",
           "prroi_pool", "crop_and_resize", "roi_spp", "multiscale_roi_align"]

#: The JAX release that curoi.jax needs: the first with a public
#: ``jax.experimental.buffer_callback`` carrying XLA's stream.
MIN_JAX_VERSION = "0.7"

_BUFFER_CALLBACK_MODULE = "jax.experimental.buffer_callback"


def _load_buffer_callback(import_module=importlib.import_module,
                          jax_version=None):
    """``jax.experimental.buffer_callback.buffer_callback``, or an ImportError
    that names the JAX version needed. ``import_module`` is a parameter so
    that a JAX without it can be simulated."""
    version = jax.__version__ if jax_version is None else jax_version
    try:
        module = import_module(_BUFFER_CALLBACK_MODULE)
        function = module.buffer_callback
    except (ImportError, AttributeError):
        raise ImportError(
            f"curoi.jax runs its kernels through {_BUFFER_CALLBACK_MODULE}, "
            f"which this JAX ({version}) does not have; it needs JAX "
            f"{MIN_JAX_VERSION} or newer: `pip install -U \"jax>={MIN_JAX_VERSION}\"`"
        ) from None
    return function


_buffer_callback = _load_buffer_callback()

_FEATURES = {False: "[N, C, H, W]", True: "[N, H, W, C]"}
_DLPACK_CPU = 1
_DLPACK_CUDA = 2

# Largest batch index that the accumulation type holds exactly: the limit on
# the folded batch B*N under vmap.
_EXACT_INDEX = {"float32": 2**24, "float64": 2**53}


# --------------------------------------------------------------------------
# argument checks (at trace time: shapes and dtypes are static)
# --------------------------------------------------------------------------


def _accumulation_dtype(dtype_name):
    return "float64" if dtype_name == "float64" else "float32"


def _dtype_name(dtype):
    return np.dtype(dtype).name


def _features(x, channels_last, name="input"):
    layout = _FEATURES[channels_last]
    if isinstance(x, np.ndarray):
        x = jnp.asarray(x)
    if not isinstance(x, jax.Array):
        raise TypeError(
            f"{name} must be a jax.Array (or a NumPy array) {layout}, got "
            f"{type(x).__module__}.{type(x).__qualname__}"
        )
    _validate.float_array(x, name, _dtype_name(x.dtype), 4, layout)
    return x


def _channels(x, channels_last):
    return x.shape[3] if channels_last else x.shape[1]


def _box_array(array, name, columns, row=_boxes.BOX):
    if isinstance(array, np.ndarray):
        array = jnp.asarray(array)
    if not isinstance(array, jax.Array):
        raise TypeError(
            f"{name} must be a jax.Array like the input, got "
            f"{type(array).__module__}.{type(array).__qualname__}"
        )
    dtype = _dtype_name(array.dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating-point dtype, got {dtype}")
    if array.ndim != 2 or array.shape[1] != columns:
        full = columns if name == "boxes" else columns + 1
        raise ValueError(f"{_boxes.layout_message(full, row)}; {name} has shape "
                         f"{tuple(array.shape)}")
    return array


def _checked_boxes(boxes, batch, columns=5, row=_boxes.BOX):
    """The boxes as jax.Arrays (a ``[K, columns]`` array or a list of
    ``[L, columns - 1]`` arrays), checked; shapes and dtypes are static, so this runs at trace
    time."""
    if isinstance(boxes, (list, tuple)):
        if len(boxes) > batch:
            raise ValueError(
                f"boxes is a list of {len(boxes)} per-image arrays but input "
                f"holds {batch} images"
            )
        return [_box_array(b, f"boxes[{i}]", columns - 1, row)
                for i, b in enumerate(boxes)]
    return _box_array(boxes, "boxes", columns, row)


def _rois(boxes, acc, columns=5):
    """Checked boxes as the kernels take them: one ``[K, columns]`` array in the
    accumulation dtype. Traced ``jnp`` code, so the cast carries the boxes'
    (zero) gradient back to whatever dtype they came in."""
    if isinstance(boxes, list):
        if not boxes:
            return jnp.zeros((0, columns), dtype=acc)
        parts = [jnp.concatenate([jnp.full((b.shape[0], 1), i, dtype=acc),
                                  b.astype(acc)], axis=1)
                 for i, b in enumerate(boxes)]
        return jnp.concatenate(parts, axis=0)
    return boxes.astype(acc)


# --------------------------------------------------------------------------
# the callback: XLA's buffers as kernel views
# --------------------------------------------------------------------------


def _run_on_buffers(ctx, run, outputs, inputs, int64_outputs=(), scratch=False):
    """Call ``run(*input_views, *output_views)`` on kernel views of XLA's
    buffers. ``int64_outputs``: positions of outputs that JAX holds as int32
    pairs (JAX has no int64 without x64) and the kernel writes as int64.
    ``scratch``: the last output is a uint8 buffer that the launches'
    temporaries are taken from (see curoi._memory), not one of ``run``'s."""
    kind, device_id = inputs[0].__dlpack_device__()
    kind = int(kind)
    if kind == _DLPACK_CPU:
        # np.from_dlpack gives read-only views of the inputs (XLA's immutable
        # buffers) and writable views of the outputs, all in place.
        ins = [np.from_dlpack(b) for b in inputs]
        outs = [np.from_dlpack(b) for b in outputs]
        _check_views(ins + outs)
        _run_views(run, ins, outs, int64_outputs, scratch)
        return
    if kind != _DLPACK_CUDA:
        raise RuntimeError(
            f"curoi.jax got buffers on DLPack device type {kind}; it runs on "
            "CPU and CUDA devices only"
        )
    cupy = _gpu.require_cupy()
    device_id = int(device_id)
    with cupy.cuda.Device(device_id):
        # The kernels launch on XLA's own stream, so they are ordered with the
        # rest of the XLA program without any synchronisation; CuPy passes
        # the same stream to __dlpack__, so the views need none either. XLA
        # owns every byte the launch uses: CuPy may allocate nothing.
        with external_stream(cupy, ctx.stream, device_id), \
                cupy.cuda.using_allocator(_no_allocation):
            ins = [cupy.from_dlpack(b) for b in inputs]
            outs = [cupy.from_dlpack(b) for b in outputs]
            _check_views(ins + outs)
            _run_views(run, ins, outs, int64_outputs, scratch)


def _run_views(run, ins, outs, int64_outputs, scratch):
    workspace = outs.pop() if scratch else None
    outs = [v.view(np.int64)[..., 0] if i in int64_outputs else v
            for i, v in enumerate(outs)]
    if workspace is None:
        run(*ins, *outs)
        return
    with _memory.workspace(workspace):
        run(*ins, *outs)


def _no_allocation(size):
    raise RuntimeError(
        f"curoi.jax: a kernel launch asked CuPy for {size} bytes of GPU memory "
        "outside XLA's buffers (its temporaries come from the call's workspace); "
        "this is a bug in curoi, please report it")


def _check_views(views):
    # The kernels index dense row-major arrays; XLA's custom-call operands
    # use the default (row-major) layout, which this guards.
    for view in views:
        if not view.flags.c_contiguous:
            raise RuntimeError(
                "curoi.jax: XLA passed a buffer that is not C-contiguous "
                f"(shape {view.shape}, strides {view.strides})"
            )


def _call(run, out_types, *args, int64_outputs=(), scratch=0):
    """One kernel launch inside the XLA program; ``scratch`` bytes of
    workspace for its temporaries, allocated by XLA as one more output."""
    out_types = tuple(out_types)
    if scratch:
        out_types += (jax.ShapeDtypeStruct((scratch,), jnp.uint8),)

    def callback(ctx, outputs, *inputs):
        _run_on_buffers(ctx, run, list(outputs), list(inputs), int64_outputs,
                        bool(scratch))

    results = tuple(_buffer_callback(callback, out_types)(*args))
    return results[:-1] if scratch else results


def _int64_type(shape):
    # int64 results travel as int32 pairs: JAX without x64 has no int64.
    return jax.ShapeDtypeStruct(tuple(shape) + (2,), jnp.int32)


# --------------------------------------------------------------------------
# shard_map: which mesh axes a value varies along
# --------------------------------------------------------------------------
#
# Inside ``jax.shard_map`` JAX types every value with the set of manual mesh
# axes along which it differs between devices, and checks that a custom_vjp's
# backward returns cotangents of the primals' types. A buffer_callback result
# is typed as the same on every device whatever its inputs, so the kernels'
# results are given the axes of their inputs (the kernels run per device on
# local data), and a gradient is summed over the axes along which the
# features do not vary, as JAX's own ops do for a replicated operand.


def _varying_axes(array):
    """The manual mesh axes along which ``array`` varies (none outside
    ``shard_map`` or with ``check_vma=False``)."""
    aval = jax.typeof(array)
    manual_axis_type = getattr(aval, "mat", None)  # JAX >= 0.10
    if manual_axis_type is not None:
        return frozenset(manual_axis_type.varying)
    return frozenset(getattr(aval, "vma", ()))  # JAX 0.7 - 0.9


def _vary(value, axes):
    """``value`` typed as varying along ``axes`` too (no data moves)."""
    axes = tuple(axes - _varying_axes(value))
    if not axes:
        return value
    if hasattr(jax.lax, "pcast"):  # JAX >= 0.10
        return jax.lax.pcast(value, axes, to="varying")
    return jax.lax.pvary(value, axes)


def _varying_like(results, *inputs):
    """Kernel results typed as varying along every axis an input varies
    along: each device's kernel read that device's inputs."""
    axes = frozenset().union(*(_varying_axes(a) for a in inputs))
    if not axes:
        return results
    if isinstance(results, tuple):
        return tuple(_vary(r, axes) for r in results)
    return _vary(results, axes)


def _cotangent_for(grad, axes):
    """The features' gradient typed as the features: summed over the axes
    along which the features are the same on every device (each device's
    boxes add their share), and varying along the features' axes."""
    summed = tuple(_varying_axes(grad) - axes)
    if summed:
        grad = jax.lax.psum(grad, summed)
    return _vary(grad, axes)


# --------------------------------------------------------------------------
# vmap: fold the mapped axis into the image axis
# --------------------------------------------------------------------------


def _fold_rois(rois, batched, axis_size, images):
    """``[B, K, 5]`` (or ``[K, 5]`` shared by every batch element) to
    ``[B*K, 5]`` whose batch indices address ``[B*N]`` folded images: index
    ``n`` of batch ``b`` becomes ``n + b*N``. An index the kernel would skip
    (not finite, not in ``[0, N)``) becomes -1, so that it cannot land in a
    neighbouring batch element's images."""
    if not batched:
        rois = jnp.broadcast_to(rois, (axis_size,) + rois.shape)
    acc = _dtype_name(rois.dtype)
    if axis_size * images > _EXACT_INDEX[acc]:
        raise ValueError(
            f"vmap folds {axis_size} batches of {images} images into "
            f"{axis_size * images} images, more than {acc} boxes can index "
            f"exactly ({_EXACT_INDEX[acc]}): map over fewer at a time"
        )
    index = rois[..., 0]
    valid = (index >= 0) & (index < images)  # NaN fails both, as in the kernel
    offset = (jnp.arange(axis_size, dtype=rois.dtype) * images)[:, None]
    # The kernel truncates a valid index to an integer: do it before adding
    # the offset, since a fractional index plus a large offset can round up
    # to the next integer in float32 (and land on the next image).
    folded = jnp.where(valid, jnp.trunc(index) + offset, -1)
    rois = rois.at[..., 0].set(folded)
    return rois.reshape((-1, rois.shape[-1]))


def _fold_forward_args(axis_size, in_batched, x, rois):
    """A forward's (features, rois) under vmap, folded for one launch."""
    x_batched, rois_batched = in_batched
    if x_batched:
        n = x.shape[1]
        x = x.reshape((-1,) + x.shape[2:])
        return x, _fold_rois(rois, rois_batched, axis_size, n)
    # Shared features: only the boxes fold (their batch indices already
    # address the shared images); the features are read once, not copied
    # per batch element.
    return x, rois.reshape((-1, rois.shape[-1]))


def _broadcast(value, batched, axis_size):
    return value if batched else jnp.broadcast_to(value, (axis_size,) + value.shape)


def _unfold(value, axis_size):
    return value.reshape((axis_size, -1) + value.shape[1:])


# --------------------------------------------------------------------------
# kernels as JAX functions (one per operator and static configuration)
# --------------------------------------------------------------------------


def _saved_type(shape, dtype):
    # int64 results travel as int32 pairs: JAX without x64 has no int64.
    if dtype == "int64":
        return _int64_type(shape)
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _saved_view(view, dtype):
    """A saved result's buffer as the kernels read it."""
    return view.view(np.int64)[..., 0] if dtype == "int64" else view


@functools.lru_cache(maxsize=None)
def _forward_op(op, ph, pw, values, channels_last, saved_dtypes):
    """``x [N, C, H, W]`` (a kernel dtype), ``rois [K, columns]`` -> the
    output ``[K, C_out, PH, PW]`` and, for an operator with saved results,
    those too, in ``saved_dtypes`` (channels-last: ``[N, H, W, C]`` ->
    ``[K, PH, PW, C_out]``)."""
    pairs = tuple(1 + i for i, d in enumerate(saved_dtypes) if d == "int64")

    def run(x, rois, out, *saved):
        op.forward(x, rois, out, list(saved), values, channels_last)

    @custom_vmap
    def call(x, rois):
        shape = op.result_shape(rois.shape[0], _channels(x, channels_last), ph, pw,
                                values, channels_last)
        saved_types = [_saved_type(shape, d) for d in saved_dtypes]
        if x.size == 0 or int(np.prod(shape)) == 0:
            # Nothing to read: no launch. Bins of a map without pixels are
            # empty (positions -1).
            fill = 0 if int(np.prod(shape)) == 0 else -1
            results = (jnp.zeros(shape, x.dtype),) + tuple(
                jnp.full(t.shape, fill, t.dtype) for t in saved_types)
        else:
            results = tuple(_call(run, [jax.ShapeDtypeStruct(shape, x.dtype)]
                                  + saved_types, x, rois, int64_outputs=pairs))
        return _varying_like(results, x, rois)

    @call.def_vmap
    def rule(axis_size, in_batched, x, rois):
        x, rois = _fold_forward_args(axis_size, in_batched, x, rois)
        # Saved positions are within one feature plane: folding the images
        # does not change them.
        results = tuple(_unfold(r, axis_size) for r in call(x, rois))
        return results, (True,) * len(results)

    return call


@functools.lru_cache(maxsize=None)
def _backward_op(op, input_shape, output_size, values, deterministic,
                 channels_last, saved_dtypes, cuda, fixed_on_cpu):
    """``grad_output``, the saved results, ``rois`` -> the gradient of the
    features ``input_shape`` (in their layout) in the accumulation dtype,
    for a GPU (``cuda``) or the CPU: their temporaries differ (see
    curoi._ops.backward_scratch), and XLA allocates them as the launch's
    workspace (``call.scratch`` bytes)."""
    scratch = _memory.footprint(_ops.backward_scratch(
        int(np.prod(input_shape)), deterministic, cuda or fixed_on_cpu))

    def run(g, *args):
        *saved, rois, grad_input = args
        saved = [_saved_view(v, d) for v, d in zip(saved, saved_dtypes)]
        with _ops.fixed_point_on_cpu(fixed_on_cpu):
            op.backward(g, rois, saved, grad_input, values, deterministic, False,
                        channels_last)

    @custom_vmap
    def call(g, *args):
        acc = _accumulation_dtype(_dtype_name(g.dtype))
        if g.size == 0 or int(np.prod(input_shape)) == 0:
            grad = jnp.zeros(input_shape, acc)
        else:
            out = jax.ShapeDtypeStruct(input_shape, acc)
            grad = _call(run, [out], g, *args, scratch=scratch)[0]
        return _varying_like(grad, g, *args)

    @call.def_vmap
    def rule(axis_size, in_batched, g, *args):
        *saved, rois = args
        *saved_batched, rois_batched = in_batched[1:]
        rank = op.result_rank
        g = _broadcast(g, in_batched[0], axis_size)
        g = g.reshape((-1,) + g.shape[g.ndim - rank + 1:])
        saved = [_broadcast(v, b, axis_size) for v, b in zip(saved, saved_batched)]
        # int64 pairs carry one more axis than the gradient.
        saved = [v.reshape((-1,) + v.shape[-(rank + (d == "int64")):])
                 for v, d in zip(saved, saved_dtypes)]
        rois = _fold_rois(rois, rois_batched, axis_size, input_shape[0])
        folded = (axis_size * input_shape[0],) + tuple(input_shape[1:])
        inner = _backward_op(op, folded, output_size, values, deterministic,
                             channels_last, saved_dtypes, cuda, fixed_on_cpu)
        return _unfold(inner(g, *saved, rois), axis_size), True

    call.scratch = scratch
    return call


@functools.lru_cache(maxsize=None)
def _boxes_backward_op(op, ph, pw, values, channels_last):
    """``grad_output``, ``x``, ``rois`` -> the gradient with respect to the
    rois, in the accumulation dtype."""

    def run(g, x, rois, grad_rois):
        grad_rois.fill(0)
        op.boxes_backward(g, x, rois, grad_rois, values, channels_last)

    @custom_vmap
    def call(g, x, rois):
        acc = _accumulation_dtype(_dtype_name(g.dtype))
        if g.size == 0 or x.size == 0:
            grad = jnp.zeros(rois.shape, acc)
        else:
            scratch = 0
            if op.boxes_scratch is not None:
                scratch = _memory.footprint(op.boxes_scratch(rois.shape[0], ph, pw, acc))
            grad = _call(run, [jax.ShapeDtypeStruct(rois.shape, acc)], g, x, rois,
                         scratch=scratch)[0]
        return _varying_like(grad, g, x, rois)

    @call.def_vmap
    def rule(axis_size, in_batched, g, x, rois):
        g = _broadcast(g, in_batched[0], axis_size)
        g = g.reshape((-1,) + g.shape[g.ndim - op.result_rank + 1:])
        x, rois = _fold_forward_args(axis_size, in_batched[1:], x, rois)
        return _unfold(call(g, x, rois), axis_size), True

    return call


def _per_platform(split, on_cpu, on_gpu, *args):
    """``on_cpu`` on the CPU and ``on_gpu`` elsewhere when ``split``: half
    precision (the GPU has float16/bfloat16 kernels, the CPU computes them in
    float32) and launches whose temporaries differ by platform (the
    deterministic backward's). The platform is known only when XLA lowers
    the program (not while tracing), hence lax.platform_dependent."""
    if not split:
        return on_gpu(*args)  # the same launch on every platform
    return jax.lax.platform_dependent(*args, cpu=on_cpu, default=on_gpu)


# --------------------------------------------------------------------------
# custom_vjp: forward and backward
# --------------------------------------------------------------------------


class _Config(tuple):
    """Everything static about one call: (op, ph, pw, values, deterministic,
    input_shape, input_axes, channels_last, saved_dtypes, fixed_on_cpu), the
    last curoi._ops.FIXED_POINT_ON_CPU when it was traced."""

    op = property(lambda self: self[0])


def _forward(config, x, rois):
    op, ph, pw, values, _, _, _, channels_last, saved_dtypes, _ = config
    call = _forward_op(op, ph, pw, values, channels_last, saved_dtypes)
    dtype = x.dtype

    def on_cpu(x, rois):
        y, *saved = call(x.astype(jnp.float32), rois)
        return (y.astype(dtype), *saved)

    return _per_platform(_dtype_name(dtype) in HALF_DTYPES, on_cpu, call, x, rois)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _apply(config, x, rois):
    return _forward(config, x, rois)[0]


def _apply_fwd(config, x, rois):
    y, *saved = _forward(config, x, rois)
    # The boxes' gradient reads the features.
    kept = x if config.op.boxes_backward is not None else None
    return y, (tuple(saved), rois, kept)


def _boxes_cotangent(config, g, x, rois):
    """The gradient with respect to the rois: the operator's, or zero."""
    op, ph, pw, values, _, _, _, channels_last, _, _ = config
    if op.boxes_backward is None:
        return jnp.zeros_like(rois)  # of the boxes' own type
    call = _boxes_backward_op(op, ph, pw, values, channels_last)

    def on_cpu(g, x, rois):
        return call(g.astype(jnp.float32), x.astype(jnp.float32), rois)

    grad = _per_platform(_dtype_name(g.dtype) in HALF_DTYPES, on_cpu, call, g, x, rois)
    return _cotangent_for(grad, _varying_axes(rois)).astype(rois.dtype)


def _apply_bwd(config, residuals, g):
    saved, rois, x = residuals
    (op, ph, pw, values, deterministic, input_shape, input_axes, channels_last,
     saved_dtypes, fixed_on_cpu) = config
    output_size = (ph, pw) if op.backward_needs_output_size else None
    cpu_call, gpu_call = (
        _backward_op(op, input_shape, output_size, values, deterministic,
                     channels_last, saved_dtypes, cuda, fixed_on_cpu)
        for cuda in (False, True))
    dtype = g.dtype
    half = _dtype_name(dtype) in HALF_DTYPES

    def on_cpu(g, *args):
        return cpu_call(g.astype(jnp.float32) if half else g, *args)

    grad = _per_platform(half or cpu_call.scratch != gpu_call.scratch, on_cpu,
                         gpu_call, g, *saved, rois)
    # Summed across devices in the accumulation dtype, then rounded once to
    # the features' dtype.
    grad = _cotangent_for(grad, input_axes).astype(dtype)
    return grad, _boxes_cotangent(config, g, x, rois)


_apply.defvjp(_apply_fwd, _apply_bwd)


# The whole operator (boxes to rois, casts, kernel) as one jitted program
# per configuration: an eager call is a single XLA dispatch with its
# constants compiled in (no host-to-device transfers), and under an outer
# jit, grad or vmap the inner jit is simply inlined.


@functools.partial(jax.jit, static_argnums=(0,))
def _program(config, x, boxes):
    return _apply(config, x, _rois(boxes, _acc_of(x), config.op.box_columns))


def _acc_of(x):
    return _accumulation_dtype(_dtype_name(x.dtype))


def _run(op, input, boxes, output_size, values, deterministic, data_format):
    """A public function's body: checks at trace time, then the program."""
    ph, pw = output_size or (None, None)
    deterministic = _validate.flag(deterministic, "deterministic")
    channels_last = _validate.data_format(data_format)
    x = _features(input, channels_last)
    if "spatial_scale" in values._fields:
        _validate.scale_for(values.spatial_scale, _accumulation_dtype(_dtype_name(x.dtype)))
    boxes = _checked_boxes(boxes, x.shape[0], op.box_columns, op.box_layout)
    shape = tuple(int(v) for v in x.shape)
    n, c, h, w = (shape[0], shape[3], shape[1], shape[2]) if channels_last else shape
    op.result_shape(0, c, ph, pw, values, channels_last)  # raises for a C it cannot take
    saved_dtypes = tuple(s.dtype(h, w) for s in op.saved)
    config = _Config((op, ph, pw, values, deterministic, shape, _varying_axes(x),
                      channels_last, saved_dtypes, _ops.FIXED_POINT_ON_CPU))
    return _program(config, x, boxes)


# --------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------


def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1,
              aligned=False, *, mode="avg", deterministic=False, data_format="NCHW"):
    """RoI Align of JAX arrays: :func:`curoi.roi_align` for ``jax.jit``,
    ``jax.grad`` and ``jax.vmap``.

    Args:
        input: features ``[N, C, H, W]``, a ``jax.Array`` of float16,
            bfloat16, float32 or float64 (float64 needs JAX's x64 mode), on
            the CPU or a CUDA GPU.
        boxes: ``[K, 5]`` rows of ``(batch index, x1, y1, x2, y2)``, or a list
            of ``[L, 4]`` arrays, one per image, in input-image coordinates.
            Used in float32 (float64 for float64 features) whatever the
            feature precision. Boxes with an invalid batch index or a
            non-finite coordinate give zeros.
        output_size: ``(PH, PW)`` or an int for both.
        spatial_scale: factor from box to feature coordinates, e.g. 1/16.
        sampling_ratio: samples per bin side; ``<= 0`` means adaptive.
        aligned: shift boxes by -0.5 pixel (detectron2, ONNX ``half_pixel``).
        mode: ``"avg"`` or ``"max"`` (mmcv's maximum of interpolated
            samples, with its gradient; see :func:`curoi.roi_align`).
        deterministic: make the backward pass bitwise reproducible (see
            :func:`curoi.roi_align_backward`); the forward is always so.
        data_format: ``"NCHW"`` or ``"NHWC"``: channels-last features
            ``[N, H, W, C]`` (JAX's own convolution layout) run kernels of
            their own in place, give ``[K, PH, PW, C]`` and an
            ``[N, H, W, C]`` gradient, the NCHW numbers transposed to the bit.

    Returns:
        ``[K, C, PH, PW]`` (NHWC: ``[K, PH, PW, C]``) of the input's dtype.
        Under ``jax.vmap`` the input is ``[B, N, C, H, W]`` and the boxes
        ``[B, K, 5]`` (either may be unbatched), the result
        ``[B, K, C, PH, PW]``.

    Gradients flow to ``input`` (accumulated in float32, float64 for
    float64, and rounded once to the input's dtype) and, for
    ``mode="avg"``, to the boxes (see :func:`curoi.roi_align_boxes_backward`;
    zero with ``mode="max"``).
    """
    output_size = _validate.output_size(output_size)
    values = ROI_ALIGN.values(spatial_scale, sampling_ratio, aligned)
    op = ROI_ALIGN if _validate.choice(mode, "mode", ALIGN_MODES) == "avg" else ROI_ALIGN_MAX
    return _run(op, input, boxes, output_size, values, deterministic, data_format)


def roi_pool(input, boxes, output_size, spatial_scale=1.0, *,
             convention="torchvision", deterministic=False, data_format="NCHW"):
    """RoI Pool of JAX arrays: :func:`curoi.roi_pool` for ``jax.jit``,
    ``jax.grad`` and ``jax.vmap``.

    Args:
        input: features ``[N, C, H, W]`` (see :func:`roi_align`).
        boxes: ``[K, 5]`` or a list of ``[L, 4]`` arrays, one per image.
        output_size: ``(PH, PW)`` or an int for both.
        spatial_scale: factor from box to feature coordinates.
        convention: ``"torchvision"`` (torchvision, Caffe, ONNX MaxRoiPool)
            or ``"mmcv"``; see :func:`curoi.roi_pool`.
        deterministic: make the backward pass bitwise reproducible.
        data_format: ``"NCHW"`` or ``"NHWC"`` (see :func:`roi_align`).

    Returns:
        ``[K, C, PH, PW]`` (NHWC: ``[K, PH, PW, C]``) of the input's dtype
        (with a leading ``B`` under ``jax.vmap``). The gradient goes to the first maximum of each bin;
        empty bins and the boxes get none.
    """
    output_size = _validate.output_size(output_size)
    values = ROI_POOL.values(spatial_scale, convention)
    return _run(ROI_POOL, input, boxes, output_size, values, deterministic, data_format)


def ps_roi_pool(input, boxes, output_size, spatial_scale=1.0, *,
                deterministic=False, data_format="NCHW"):
    """Position-sensitive RoI Pool of JAX arrays: :func:`curoi.ps_roi_pool`
    for ``jax.jit``, ``jax.grad`` and ``jax.vmap`` (the input has
    ``C = C_out x PH x PW`` channels; the result is ``[K, C_out, PH, PW]``,
    NHWC ``[K, PH, PW, C_out]``). ``deterministic`` and ``data_format`` as
    in :func:`roi_align`."""
    output_size = _validate.output_size(output_size)
    values = PS_ROI_POOL.values(spatial_scale)
    return _run(PS_ROI_POOL, input, boxes, output_size, values, deterministic,
                data_format)


def ps_roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1,
                 *, deterministic=False, data_format="NCHW"):
    """Position-sensitive RoI Align of JAX arrays: :func:`curoi.ps_roi_align`
    for ``jax.jit``, ``jax.grad`` and ``jax.vmap``; arguments as
    :func:`ps_roi_pool` plus ``sampling_ratio``."""
    output_size = _validate.output_size(output_size)
    values = PS_ROI_ALIGN.values(spatial_scale, sampling_ratio)
    return _run(PS_ROI_ALIGN, input, boxes, output_size, values, deterministic,
                data_format)


def roi_align_rotated(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=0, *,
                      convention="detectron2", aligned=True, clockwise=False,
                      deterministic=False, data_format="NCHW"):
    """Rotated RoI Align of JAX arrays: :func:`curoi.roi_align_rotated` for
    ``jax.jit``, ``jax.grad`` and ``jax.vmap``. Boxes are ``[K, 6]`` rows of
    ``(batch index, centre x, centre y, width, height, angle)`` or a list of
    ``[L, 5]`` arrays; the other arguments are the NumPy function's, and
    ``deterministic`` and ``data_format`` as in :func:`roi_align`. Gradients
    flow to the features and to the boxes (see
    :func:`curoi.roi_align_rotated_boxes_backward`)."""
    output_size = _validate.output_size(output_size)
    values = ROI_ALIGN_ROTATED.values(spatial_scale, sampling_ratio, convention,
                                      aligned, clockwise)
    return _run(ROI_ALIGN_ROTATED, input, boxes, output_size, values, deterministic,
                data_format)


def prroi_pool(input, boxes, output_size, spatial_scale=1.0, *, deterministic=False,
               data_format="NCHW"):
    """Precise RoI Pooling of JAX arrays: :func:`curoi.prroi_pool` for
    ``jax.jit``, ``jax.grad`` (with respect to the features and the boxes)
    and ``jax.vmap``."""
    output_size = _validate.output_size(output_size)
    values = PRROI_POOL.values(spatial_scale)
    return _run(PRROI_POOL, input, boxes, output_size, values, deterministic, data_format)


def crop_and_resize(image, boxes, box_indices, crop_size, method="bilinear",
                    extrapolation_value=0.0, *, deterministic=False, data_format="NHWC"):
    """TensorFlow's ``tf.image.crop_and_resize`` on JAX arrays, for
    ``jax.jit``, ``jax.grad`` (with respect to the image and the boxes,
    TensorFlow's gradients) and ``jax.vmap``; the arguments are those of
    :func:`curoi.crop_and_resize` (NHWC by default, as TensorFlow)."""
    crop_size = _validate.output_size(crop_size, "crop_size")
    values = CROP_AND_RESIZE.values(method, extrapolation_value)
    if isinstance(boxes, np.ndarray):
        boxes = jnp.asarray(boxes)
    if (not isinstance(boxes, jax.Array) or boxes.ndim != 2 or boxes.shape[1] != 4
            or _dtype_name(boxes.dtype) not in FLOAT_DTYPES):
        raise ValueError(f"boxes must be a floating-point [K, 4] array of normalised "
                         f"(y1, x1, y2, x2), got {getattr(boxes, 'shape', boxes)!r}")
    if isinstance(box_indices, np.ndarray):
        box_indices = jnp.asarray(box_indices)
    if (not isinstance(box_indices, jax.Array) or box_indices.ndim != 1
            or box_indices.shape[0] != boxes.shape[0]):
        raise ValueError(f"box_indices must be a [K] array with K = {boxes.shape[0]} "
                         f"like boxes, got {getattr(box_indices, 'shape', box_indices)!r}")
    if not jnp.issubdtype(box_indices.dtype, jnp.integer):
        raise TypeError(f"box_indices must have an integer dtype, got {box_indices.dtype}")
    # The box index rides in the rois' first column (see _operators).
    acc = _accumulation_dtype(_dtype_name(getattr(image, "dtype", np.float32)))
    rois = jnp.concatenate([box_indices[:, None].astype(acc), boxes.astype(acc)], axis=1)
    return _run(CROP_AND_RESIZE, image, rois, crop_size, values, deterministic,
                data_format)


def roi_spp(input, boxes=None, levels=(1, 2, 4), spatial_scale=1.0, *, mode="max",
            convention="torchvision", deterministic=False, data_format="NCHW"):
    """Spatial pyramid pooling of JAX arrays: :func:`curoi.roi_spp` for
    ``jax.jit``, ``jax.grad`` and ``jax.vmap``, with its arguments
    (``boxes=None`` pools each image's whole map). Returns ``[K, C x
    sum(l * l)]`` (with a leading ``B`` under ``jax.vmap``); gradients flow
    to ``input`` (the boxes get zero). ``deterministic`` and
    ``data_format`` as in :func:`roi_align`."""
    values = ROI_SPP.values(levels, spatial_scale, mode, convention)
    if boxes is None:
        channels_last = _validate.data_format(data_format)
        x = _features(input, channels_last)
        n, h, w = (x.shape[0], x.shape[1], x.shape[2]) if channels_last else \
            (x.shape[0], x.shape[2], x.shape[3])
        acc = _accumulation_dtype(_dtype_name(x.dtype))
        boxes = jnp.asarray(_operators.whole_map_rois(n, h, w, acc))
        values = _operators.whole_map_values(values)
    return _run(ROI_SPP, input, boxes, None, values, deterministic, data_format)


# --------------------------------------------------------------------------
# multiscale RoI Align: a feature pyramid in one launch
# --------------------------------------------------------------------------
#
# The features are a list of levels, which the operator descriptions (one
# feature map each) do not cover; the launch, the platform switch for half
# precision and the shard_map typing are the ones above.


@functools.lru_cache(maxsize=None)
def _multiscale_forward_op(ph, pw, values, channels_last):
    """``(levels, rois)`` -> the output, in the levels' (kernel) dtype."""

    def run(*args):
        *levels, rois, out = args
        _ops.multiscale_roi_align_forward(
            list(levels), rois, out, values.spatial_scales, values.sampling_ratio,
            values.aligned, values.canonical_scale, values.canonical_level,
            values.eps, values.level_rule, channels_last)

    @custom_vmap
    def call(rois, *levels):
        first = levels[0]
        k, c = rois.shape[0], _channels(first, channels_last)
        shape = (k, ph, pw, c) if channels_last else (k, c, ph, pw)
        if int(np.prod(shape)) == 0:
            out = jnp.zeros(shape, first.dtype)
        else:
            out = _call(run, [jax.ShapeDtypeStruct(shape, first.dtype)], *levels,
                        rois)[0]
        return _varying_like(out, *levels, rois)

    @call.def_vmap
    def rule(axis_size, in_batched, rois, *levels):
        # As the single-map operators: a batch of pyramids is one pyramid of
        # B*N images, the boxes' indices moved to their batch element's.
        rois_batched, levels_batched = in_batched[0], in_batched[1:]
        if any(levels_batched):
            n = (levels[0].shape[1] if levels_batched[0] else levels[0].shape[0])
            levels = [_broadcast(x, b, axis_size) for x, b in zip(levels, levels_batched)]
            levels = [x.reshape((-1,) + x.shape[2:]) for x in levels]
            rois = _fold_rois(rois, rois_batched, axis_size, n)
        else:
            rois = rois.reshape((-1, rois.shape[-1]))
        return _unfold(call(rois, *levels), axis_size), True

    return lambda levels, rois: call(rois, *levels)


@functools.lru_cache(maxsize=None)
def _multiscale_backward_op(shapes, ph, pw, values, deterministic, channels_last,
                            cuda, fixed_on_cpu):
    """``(grad_output, rois)`` -> the gradient of every level (``shapes``),
    in the accumulation dtype; ``cuda`` and the workspace as in
    :func:`_backward_op`."""
    scratch = _memory.footprint(_ops.backward_scratch(
        sum(int(np.prod(s)) for s in shapes), deterministic, cuda or fixed_on_cpu))

    def run(g, rois, *grads):
        # XLA's output buffers are not zeroed: the wrapper zeroes them.
        with _ops.fixed_point_on_cpu(fixed_on_cpu):
            _ops.multiscale_roi_align_backward(
                g, rois, list(grads), values.spatial_scales, values.sampling_ratio,
                values.aligned, values.canonical_scale, values.canonical_level,
                values.eps, values.level_rule, deterministic, zeroed=False,
                channels_last=channels_last)

    @custom_vmap
    def call(g, rois):
        acc = _accumulation_dtype(_dtype_name(g.dtype))
        if g.size == 0 or sum(int(np.prod(s)) for s in shapes) == 0:
            grads = [jnp.zeros(s, acc) for s in shapes]
        else:
            grads = _call(run, [jax.ShapeDtypeStruct(s, acc) for s in shapes], g, rois,
                          scratch=scratch)
        return tuple(_varying_like(grad, g, rois) for grad in grads)

    @call.def_vmap
    def rule(axis_size, in_batched, g, rois):
        g = _broadcast(g, in_batched[0], axis_size)
        g = g.reshape((-1,) + g.shape[2:])
        rois = _fold_rois(rois, in_batched[1], axis_size, shapes[0][0])
        folded = tuple((axis_size * s[0],) + tuple(s[1:]) for s in shapes)
        inner = _multiscale_backward_op(folded, ph, pw, values, deterministic,
                                        channels_last, cuda, fixed_on_cpu)
        grads = inner(g, rois)
        return tuple(_unfold(grad, axis_size) for grad in grads), (True,) * len(grads)

    call.scratch = scratch
    return call


def _multiscale_forward(config, levels, rois):
    ph, pw, values, _, _, _, channels_last, _ = config
    call = _multiscale_forward_op(ph, pw, values, channels_last)
    dtype = levels[0].dtype

    def on_cpu(rois, *levels):
        return call([x.astype(jnp.float32) for x in levels], rois).astype(dtype)

    def on_gpu(rois, *levels):
        return call(list(levels), rois)

    return _per_platform(_dtype_name(dtype) in HALF_DTYPES, on_cpu, on_gpu, rois,
                         *levels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _multiscale_apply(config, levels, rois):
    return _multiscale_forward(config, levels, rois)


def _multiscale_apply_fwd(config, levels, rois):
    return _multiscale_forward(config, levels, rois), rois


def _multiscale_apply_bwd(config, rois, g):
    ph, pw, values, deterministic, shapes, level_axes, channels_last, fixed_on_cpu = config
    cpu_call, gpu_call = (
        _multiscale_backward_op(shapes, ph, pw, values, deterministic, channels_last,
                                cuda, fixed_on_cpu)
        for cuda in (False, True))
    dtype = g.dtype
    half = _dtype_name(dtype) in HALF_DTYPES

    def on_cpu(g, rois):
        return cpu_call(g.astype(jnp.float32) if half else g, rois)

    grads = _per_platform(half or cpu_call.scratch != gpu_call.scratch, on_cpu,
                          gpu_call, g, rois)
    # Summed across devices in the accumulation dtype, rounded once.
    grads = tuple(_cotangent_for(grad, axes).astype(dtype)
                  for grad, axes in zip(grads, level_axes))
    return grads, jnp.zeros_like(rois)


_multiscale_apply.defvjp(_multiscale_apply_fwd, _multiscale_apply_bwd)


@functools.partial(jax.jit, static_argnums=(0,))
def _multiscale_program(config, levels, boxes):
    return _multiscale_apply(config, levels, _rois(boxes, _acc_of(levels[0])))


def multiscale_roi_align(features, boxes, output_size, spatial_scales, sampling_ratio=-1,
                         aligned=False, *, canonical_scale=224, canonical_level=4,
                         eps=1e-6, level_rule="torchvision", data_format="NCHW",
                         deterministic=False):
    """Multiscale RoI Align of JAX arrays: :func:`curoi.multiscale_roi_align`
    for ``jax.jit``, ``jax.grad``/``jax.vjp`` and ``jax.vmap``.

    Args:
        features: a list or tuple of ``jax.Array`` levels ``[N, C, H_l, W_l]``
            (NHWC: ``[N, H_l, W_l, C]``), from the finest to the coarsest, of
            one dtype, with the same N and C.
        boxes: ``[K, 5]`` rows of ``(batch index, x1, y1, x2, y2)``, or a list
            of ``[L, 4]`` arrays, one per image.
        output_size, spatial_scales, sampling_ratio, aligned, canonical_scale,
        canonical_level, eps, level_rule, data_format: as in
            :func:`curoi.multiscale_roi_align`.
        deterministic: make the backward pass bitwise reproducible.

    Returns:
        ``[K, C, PH, PW]`` (NHWC: ``[K, PH, PW, C]``) of the features' dtype.
        The gradient is a tuple with one array per level (each level gets
        the gradient of the boxes its rule assigns it, accumulated in
        float32, float64 for float64, and rounded once); the boxes get zero.
        Under ``jax.vmap`` the levels are ``[B, N, C, H_l, W_l]`` and the
        boxes ``[B, K, 5]`` (either may be unbatched), the result
        ``[B, K, C, PH, PW]``.
    """
    ph, pw = _validate.output_size(output_size)
    channels_last = _validate.data_format(data_format)
    deterministic = _validate.flag(deterministic, "deterministic")
    levels = [_features(x, channels_last, f"features[{i}]")
              for i, x in enumerate(_multiscale.pyramid(features))]
    first = None
    for i, x in enumerate(levels):
        n, c = x.shape[0], _channels(x, channels_last)
        if first is None:
            first = (_dtype_name(x.dtype), n, c)
        _multiscale.check_level(i, _dtype_name(x.dtype), n, c, first)
    values = _multiscale.values(spatial_scales, len(levels), sampling_ratio, aligned,
                                canonical_scale, canonical_level, eps, level_rule)
    _multiscale.check_scales_for(values, _accumulation_dtype(first[0]))
    boxes = _checked_boxes(boxes, first[1])
    shapes = tuple(tuple(int(d) for d in x.shape) for x in levels)
    config = (ph, pw, values, deterministic, shapes,
              tuple(_varying_axes(x) for x in levels), channels_last,
              _ops.FIXED_POINT_ON_CPU)
    return _multiscale_program(config, tuple(levels), boxes)

"""One description per operator; every front end is built from these.

An :class:`Operator` says what the NumPy/CuPy functions (``curoi._frontend``),
``curoi.torch`` and ``curoi.jax`` need to know about an operator and nothing
about any of them:

- its scalar arguments after ``output_size``, each with its default and its
  check (the same messages everywhere), and whether the backward needs it;
- the shape of its result (how many output channels a feature map gives);
- the extra results the forward can write for the backward (RoI Pool's
  argmax), with their dtype;
- which kernels run forward and backward, as two functions on kernel views
  (``curoi._ops``), with the checked values.

Adding an operator means its kernels in ``cuda_src/``, its ``_ops``
wrappers, an :class:`Operator` here, its public functions (a signature and
a docstring each, whose body hands the arguments to the front end's builder),
its NumPy reference in the tests, and its docs.
"""

import collections
import dataclasses
import functools
from typing import Callable, Tuple

import numpy as np

from . import _boxes, _kernels, _ops, _validate


@dataclasses.dataclass(frozen=True)
class Param:
    """A scalar argument that follows ``output_size``."""

    name: str
    default: object
    #: value -> the checked value; raises an error that names the argument.
    check: Callable
    #: Its type in a torch operator schema: "float", "int", "bool" or "str".
    schema: str
    #: Whether the backward needs it (RoI Pool's backward needs only argmax).
    backward: bool = True


@dataclasses.dataclass(frozen=True)
class Saved:
    """An extra result of the forward that its backward reads."""

    name: str
    #: (height, width) of the features -> the dtype name the op keeps it in.
    dtype: Callable
    #: The public functions' keyword that returns it (``return_argmax``).
    returned_by: str


@dataclasses.dataclass(frozen=True)
class Operator:
    name: str
    params: Tuple[Param, ...]
    #: (x, rois, out, saved views, values, channels_last): the forward
    #: kernels on kernel views (saved views may be None: not wanted).
    forward: Callable
    #: (grad_output, rois, saved views, grad_input, values, deterministic,
    #: zeroed, channels_last): the backward kernels.
    backward: Callable
    saved: Tuple[Saved, ...] = ()
    #: (channels, ph, pw, name) -> channels of the output; raises an error
    #: naming ``name`` (the features or input_shape) for a C that does not
    #: fit the operator.
    output_channels: Callable = staticmethod(lambda c, ph, pw, name="input": c)
    #: Columns of a ``[K, columns]`` box array (a list holds ``columns - 1``).
    box_columns: int = 5
    #: The layout of a box row, for messages.
    box_layout: str = "(batch index, x1, y1, x2, y2)"
    #: Whether the backward needs output_size (and spatial_scale) or takes
    #: the bins from the gradient's shape and the saved results alone.
    backward_needs_output_size: bool = True
    #: values -> None; raises for params that are fine alone but not together.
    check: Callable = None
    #: (grad_output, x, rois, grad_rois, values, channels_last): the
    #: gradient with respect to the rois (the batch-index column stays 0);
    #: None for an operator that gives the boxes no gradient.
    boxes_backward: Callable = None
    #: (k, ph, pw, acc_dtype) -> the temporaries boxes_backward takes, as
    #: (shape, dtype) pairs (curoi._ops; a front end whose framework owns
    #: them, curoi.jax, allocates that much); None: none.
    boxes_scratch: Callable = None
    #: (boxes, caller, batch, acc_dtype) -> the kernels' rois, for an
    #: operator whose NumPy functions take its boxes in another form (a
    #: tuple of arrays, which the front end hands here; torch and JAX build
    #: the [K, columns] rois themselves); None: a [K, columns] array or a
    #: list per image.
    rois_from: Callable = None
    #: The features' argument name, for messages.
    input_name: str = "input"
    #: Whether the operator takes an ``output_size`` (PH, PW); one that does
    #: not (spatial pyramid pooling: its bins come from its params) has
    #: ``flat_columns``.
    pooled: bool = True
    #: (channels, values) -> the columns of a result ``[K, columns]`` that
    #: has no spatial axes and the same layout whatever the features'
    #: (None: the result is ``[K, C_out, PH, PW]``, or channels-last
    #: ``[K, PH, PW, C_out]``).
    flat_columns: Callable = None
    #: Whether ``boxes=None`` pools each image's whole feature map: K = N,
    #: box n the pixels ``0..W-1`` x ``0..H-1`` of image n whatever
    #: ``spatial_scale`` says (see :func:`whole_map_rois`).
    whole_map: bool = False

    def __post_init__(self):
        # Derived once (the dataclass is frozen): a call checks its values
        # in a few microseconds, which is most of a small call's cost.
        names = tuple(p.name for p in self.params)
        object.__setattr__(self, "Values", _values_type(self.name, names))
        object.__setattr__(self, "_checks", tuple(p.check for p in self.params))

    def values(self, *args, **kwargs):
        """The params, checked, as a namedtuple (positional in param order,
        or by keyword); missing ones take their defaults."""
        if kwargs:
            given = dict(zip((p.name for p in self.params), args))
            given.update(kwargs)
            args = tuple(given.get(p.name, p.default) for p in self.params)
        elif len(args) < len(self.params):
            args += tuple(p.default for p in self.params[len(args):])
        values = self.Values._make([check(value) for check, value in zip(self._checks, args)])
        if self.check is not None:
            self.check(values)
        return values

    @property
    def backward_params(self):
        return tuple(p for p in self.params if p.backward)

    @property
    def result_rank(self):
        """Axes of the result: 2 for a flat ``[K, columns]`` one, else 4."""
        return 2 if self.flat_columns is not None else 4

    def result_shape(self, k, c, ph, pw, values, channels_last, name="input"):
        """The result's shape for ``k`` boxes on features of ``c``
        channels (raises, naming ``name``, for a C the operator cannot
        take)."""
        if self.flat_columns is not None:
            return (k, self.flat_columns(c, values))
        c_out = self.output_channels(c, ph, pw, name)
        return (k, ph, pw, c_out) if channels_last else (k, c_out, ph, pw)


def whole_map_values(values):
    """The params for ``boxes=None``: the whole-map boxes are in feature
    pixels, so the kernels run them at spatial_scale 1."""
    return values._replace(spatial_scale=1.0)


def whole_map_rois(n, h, w, acc, xp=np):
    """``[N, 5]`` rois ``(n, 0, 0, W - 1, H - 1)``: each image's whole
    map, in feature pixels. Both RoI Pool conventions read pixels
    ``0..W-1`` from them at spatial_scale 1: torchvision's rounded corners
    with an inclusive end, and mmcv's ``x1`` to ``x2 + 1``."""
    # Built by xp where it will be read (kernels on a GPU), not copied there
    # from the host.
    rois = xp.zeros((n, 5), dtype=acc)
    rois[:, 0] = xp.arange(n, dtype=acc)
    rois[:, 3] = w - 1
    rois[:, 4] = h - 1
    return rois


@functools.lru_cache(maxsize=None)
def _values_type(name, fields):
    return collections.namedtuple(f"{name}_values", fields)


# ------------------------------------------------------------- RoI Align
def _align_forward(x, rois, out, saved, v, channels_last):
    _ops.roi_align_forward(x, rois, out, v.spatial_scale, v.sampling_ratio,
                           v.aligned, channels_last)


def _align_backward(g, rois, saved, grad_input, v, deterministic, zeroed,
                    channels_last):
    _ops.roi_align_backward(g, rois, grad_input, v.spatial_scale,
                            v.sampling_ratio, v.aligned, deterministic,
                            zeroed=zeroed, channels_last=channels_last)


SPATIAL_SCALE = Param("spatial_scale", 1.0, _validate.spatial_scale, "float")
SAMPLING_RATIO = Param("sampling_ratio", -1, _validate.sampling_ratio, "int")
ALIGNED = Param("aligned", False,
                lambda value: _validate.flag(value, "aligned"), "bool")

def _align_boxes_backward(g, x, rois, grad_rois, v, channels_last):
    _ops.roi_align_boxes_backward(g, x, rois, grad_rois, v.spatial_scale,
                                  v.sampling_ratio, v.aligned, channels_last)


ROI_ALIGN = Operator(
    name="roi_align",
    params=(SPATIAL_SCALE, SAMPLING_RATIO, ALIGNED),
    forward=_align_forward,
    backward=_align_backward,
    boxes_backward=_align_boxes_backward,
    boxes_scratch=_ops.roi_align_boxes_scratch,
)


# ------------------------------------------- RoI Align, max mode (mmcv)
def _align_max_forward(x, rois, out, saved, v, channels_last):
    _ops.roi_align_max_forward(x, rois, out, saved[0], v.spatial_scale,
                               v.sampling_ratio, v.aligned, "interpolated",
                               channels_last)


def _align_max_backward(g, rois, saved, grad_input, v, deterministic, zeroed,
                        channels_last):
    _ops.roi_align_max_backward(g, saved[0], rois, grad_input, v.spatial_scale,
                                v.sampling_ratio, v.aligned, deterministic,
                                zeroed=zeroed, channels_last=channels_last)


#: The roi_align modes, by the public functions' ``mode``.
ALIGN_MODES = ("avg", "max")

# RoI Align with mode="max": the winning sample's index in its bin's
# sampling grid, iy * grid_w + ix, is saved; a grid may have more than 2**31
# samples, so it is int64.
ROI_ALIGN_MAX = Operator(
    name="roi_align_max",
    params=(SPATIAL_SCALE, SAMPLING_RATIO, ALIGNED),
    forward=_align_max_forward,
    backward=_align_max_backward,
    saved=(Saved("argmax", lambda height, width: "int64", "return_argmax"),),
)


# -------------------------------------------------------------- RoI Pool
POOL_CONVENTIONS = tuple(_kernels.POOL_CONVENTIONS)


def _pool_forward(x, rois, out, saved, v, channels_last):
    _ops.roi_pool_forward(x, rois, out, saved[0], v.spatial_scale,
                          v.convention, channels_last)


def _pool_backward(g, rois, saved, grad_input, v, deterministic, zeroed,
                   channels_last):
    _ops.roi_pool_backward(g, saved[0], rois, grad_input, deterministic,
                           zeroed=zeroed, channels_last=channels_last)


def argmax_dtype(height, width):
    """The argmax an op keeps for its backward: int32, as torchvision's (half
    the memory, and a faster backward), unless a feature plane has 2**31
    pixels or more."""
    return "int32" if height * width <= 2**31 - 1 else "int64"


ROI_POOL = Operator(
    name="roi_pool",
    params=(
        dataclasses.replace(SPATIAL_SCALE, backward=False),
        Param("convention", "torchvision",
              lambda value: _validate.choice(value, "convention", POOL_CONVENTIONS),
              "str", backward=False),
    ),
    forward=_pool_forward,
    backward=_pool_backward,
    saved=(Saved("argmax", argmax_dtype, "return_argmax"),),
    backward_needs_output_size=False,
)

# ------------------------------------------ position-sensitive (R-FCN)
def position_sensitive_channels(channels, ph, pw, name="input"):
    """Output channels of position-sensitive pooling: C = C_out x PH x PW
    input channels, bin (ph, pw) of output channel c reading input channel
    (c x PH + ph) x PW + pw."""
    if channels % (ph * pw) != 0:
        raise ValueError(
            f"{name} has C = {channels} channels, which is not a multiple of "
            f"PH x PW = {ph} x {pw} = {ph * pw} (output_size): position-sensitive "
            f"pooling reads C = C_out x PH x PW channels")
    return channels // (ph * pw)


def _ps_pool_forward(x, rois, out, saved, v, channels_last):
    _ops.ps_roi_pool_forward(x, rois, out, v.spatial_scale, channels_last)


def _ps_pool_backward(g, rois, saved, grad_input, v, deterministic, zeroed,
                      channels_last):
    _ops.ps_roi_pool_backward(g, rois, grad_input, v.spatial_scale, deterministic,
                              zeroed=zeroed, channels_last=channels_last)


def _ps_align_forward(x, rois, out, saved, v, channels_last):
    _ops.ps_roi_align_forward(x, rois, out, v.spatial_scale, v.sampling_ratio,
                              channels_last)


def _ps_align_backward(g, rois, saved, grad_input, v, deterministic, zeroed,
                       channels_last):
    _ops.ps_roi_align_backward(g, rois, grad_input, v.spatial_scale,
                               v.sampling_ratio, deterministic, zeroed=zeroed,
                               channels_last=channels_last)


PS_ROI_POOL = Operator(
    name="ps_roi_pool",
    params=(SPATIAL_SCALE,),
    forward=_ps_pool_forward,
    backward=_ps_pool_backward,
    output_channels=position_sensitive_channels,
)

PS_ROI_ALIGN = Operator(
    name="ps_roi_align",
    params=(SPATIAL_SCALE, SAMPLING_RATIO),
    forward=_ps_align_forward,
    backward=_ps_align_backward,
    output_channels=position_sensitive_channels,
)

# ------------------------------------------------------ rotated RoI Align
ROTATED_CONVENTIONS = tuple(_kernels.ROTATED_CONVENTIONS)


def _rotated_forward(x, rois, out, saved, v, channels_last):
    _ops.roi_align_rotated_forward(x, rois, out, v.spatial_scale, v.sampling_ratio,
                                   v.convention, v.aligned, v.clockwise,
                                   channels_last)


def _rotated_backward(g, rois, saved, grad_input, v, deterministic, zeroed,
                      channels_last):
    _ops.roi_align_rotated_backward(g, rois, grad_input, v.spatial_scale,
                                    v.sampling_ratio, v.convention, v.aligned,
                                    v.clockwise, deterministic, zeroed=zeroed,
                                    channels_last=channels_last)


#: The largest fixed sampling_ratio of rotated RoI Align. Its samples are
#: not axis-aligned, so the dense-axis shortcut that bounds roi_align's work
#: for any ratio does not apply: the work grows with the samples that land
#: on the map, and a ratio beyond this would run for hours.
MAX_ROTATED_SAMPLING_RATIO = 1024


def _check_rotated(values):
    if values.sampling_ratio > MAX_ROTATED_SAMPLING_RATIO:
        raise ValueError(
            f"sampling_ratio={values.sampling_ratio}: rotated RoI Align takes at "
            f"most {MAX_ROTATED_SAMPLING_RATIO} samples per bin side (or <= 0, "
            "adaptive)")
    # detectron2's ROIAlignRotated always shifts by half a pixel and turns
    # counter-clockwise: its convention has no such switches to set.
    if values.convention == "detectron2":
        for name, default in (("aligned", True), ("clockwise", False)):
            if getattr(values, name) != default:
                raise ValueError(
                    f"{name}={getattr(values, name)} is for convention='mmcv'; "
                    f"detectron2's ROIAlignRotated has {name}={default} always")


def _rotated_boxes_backward(g, x, rois, grad_rois, v, channels_last):
    _ops.roi_align_rotated_boxes_backward(g, x, rois, grad_rois, v.spatial_scale,
                                          v.sampling_ratio, v.convention, v.aligned,
                                          v.clockwise, channels_last)


ROI_ALIGN_ROTATED = Operator(
    name="roi_align_rotated",
    params=(
        SPATIAL_SCALE,
        dataclasses.replace(SAMPLING_RATIO, default=0),
        Param("convention", "detectron2",
              lambda value: _validate.choice(value, "convention", ROTATED_CONVENTIONS),
              "str"),
        dataclasses.replace(ALIGNED, default=True),
        Param("clockwise", False,
              lambda value: _validate.flag(value, "clockwise"), "bool"),
    ),
    forward=_rotated_forward,
    backward=_rotated_backward,
    boxes_backward=_rotated_boxes_backward,
    boxes_scratch=_ops.roi_align_rotated_boxes_scratch,
    box_columns=6,
    box_layout="(batch index, centre x, centre y, width, height, angle)",
    check=_check_rotated,
)

# ------------------------------------------------ Precise RoI Pooling
def _prroi_forward(x, rois, out, saved, v, channels_last):
    _ops.prroi_pool_forward(x, rois, out, v.spatial_scale, channels_last)


def _prroi_backward(g, rois, saved, grad_input, v, deterministic, zeroed,
                    channels_last):
    _ops.prroi_pool_backward(g, rois, grad_input, v.spatial_scale, deterministic,
                             zeroed=zeroed, channels_last=channels_last)


def _prroi_boxes_backward(g, x, rois, grad_rois, v, channels_last):
    _ops.prroi_pool_boxes_backward(g, x, rois, grad_rois, v.spatial_scale,
                                   channels_last)


PRROI_POOL = Operator(
    name="prroi_pool",
    params=(SPATIAL_SCALE,),
    forward=_prroi_forward,
    backward=_prroi_backward,
    boxes_backward=_prroi_boxes_backward,
)

# ----------------------------------------- TensorFlow's crop_and_resize
# The front ends carry TensorFlow's boxes [K, 4] (y1, x1, y2, x2) and
# box_indices [K] as one rois array [K, 5] (box index, y1, x1, y2, x2), so
# that crop_and_resize is described like the others; the kernels read it so.
CROP_METHODS = tuple(_kernels.CROP_AND_RESIZE_METHODS)


def _crop_forward(x, rois, out, saved, v, channels_last):
    _ops.crop_and_resize_forward(x, rois, out, v.method, v.extrapolation_value,
                                 channels_last)


def _crop_backward(g, rois, saved, grad_input, v, deterministic, zeroed,
                   channels_last):
    _ops.crop_and_resize_backward(g, rois, grad_input, v.method, deterministic,
                                  zeroed=zeroed, channels_last=channels_last)


def _crop_boxes_backward(g, x, rois, grad_rois, v, channels_last):
    _ops.crop_and_resize_boxes_backward(g, x, rois, grad_rois, v.method,
                                        channels_last)


def _crop_rois(boxes, caller, batch, acc):
    """(boxes [K, 4], box_indices [K]) viewed and checked -> rois [K, 5]."""
    boxes, box_indices = boxes
    view = _boxes._checked_view(
        caller, boxes, "boxes", 4, layout="boxes must be a [K, 4] array of "
        "normalised (y1, x1, y2, x2), with the image of each box "
        "in box_indices [K] (TensorFlow's crop_and_resize)")
    indices = caller.view(box_indices, "box_indices", allow_int=True)
    if indices.dtype.kind not in "iu":
        raise TypeError(f"box_indices must have an integer dtype, got {indices.dtype}")
    if indices.shape != (view.shape[0],):
        raise ValueError(f"box_indices must have shape [K] = ({view.shape[0]},) "
                         f"like boxes, got {tuple(indices.shape)}")
    xp = _ops._xp(view)
    rois = xp.empty((view.shape[0], 5), dtype=acc)
    rois[:, 0] = indices
    rois[:, 1:] = view
    return rois


CROP_BOX = "(box index, y1, x1, y2, x2)"

CROP_AND_RESIZE = Operator(
    name="crop_and_resize",
    params=(
        Param("method", "bilinear",
              lambda value: _validate.choice(value, "method", CROP_METHODS), "str"),
        Param("extrapolation_value", 0.0,
              lambda value: _validate.real(value, "extrapolation_value"), "float",
              backward=False),
    ),
    forward=_crop_forward,
    backward=_crop_backward,
    boxes_backward=_crop_boxes_backward,
    boxes_scratch=_ops.roi_align_boxes_scratch,
    box_layout=CROP_BOX,
    rois_from=_crop_rois,
    input_name="image",
)

# --------------------------------------- spatial pyramid pooling (SPPnet)
SPP_MODES = tuple(_kernels.SPP_MODES)


def spp_levels(value, name="levels"):
    """A non-empty sequence of grid sizes l >= 1 -> a tuple of ints."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a sequence of grid sizes such as (1, 2, 4), "
                        f"got {value!r}")
    levels = tuple(value)
    if not levels:
        raise ValueError(f"{name} must hold at least one grid size, got {value!r}")
    if len(levels) > _kernels.MAX_LEVELS:
        raise ValueError(f"{name} may hold at most {_kernels.MAX_LEVELS} grid sizes, "
                         f"got {len(levels)}")
    for level in levels:
        if not _validate._is_int(level) or not 1 <= int(level) <= 2**15:
            raise ValueError(f"{name} must hold whole numbers in [1, 32768] (a level "
                             f"of l x l bins), got {value!r}")
    return tuple(int(level) for level in levels)


def spp_bins(levels):
    """Bins per channel of a pyramid: sum(l * l)."""
    return sum(level * level for level in levels)


def _spp_forward(x, rois, out, saved, v, channels_last):
    argmax = saved[0]
    _ops.roi_spp_forward(x, rois, v.levels, out, argmax, v.spatial_scale, v.convention,
                         v.mode, channels_last)
    if argmax is not None and v.mode == "avg":
        argmax.fill(-1)  # average bins have no position; the kernel leaves it


def _spp_backward(g, rois, saved, grad_input, v, deterministic, zeroed,
                  channels_last):
    argmax = saved[0] if saved and v.mode == "max" else None
    if argmax is None and v.mode == "max":
        raise ValueError("mode='max' needs argmax: the forward's, from return_argmax=True")
    if argmax is not None and argmax.dtype != np.int32:
        # The kernels read int32 (positions in a plane of < 2**31 pixels); an
        # int64 position beyond that range would wrap onto a real pixel, so it
        # becomes -1 (no gradient), as the kernels treat any bad position.
        xp = _ops._xp(argmax)
        argmax = xp.where((argmax >= 0) & (argmax < 2**31), argmax, -1).astype(np.int32)
    _ops.roi_spp_backward(g, argmax, rois, v.levels, grad_input, v.spatial_scale,
                          v.convention, v.mode, deterministic, zeroed=zeroed,
                          channels_last=channels_last)


# The kernels keep the argmax in int32: a plane of 2**31 pixels or more is
# refused with a message (curoi._validate.argmax_fits).
ROI_SPP = Operator(
    name="roi_spp",
    params=(
        Param("levels", (1, 2, 4), spp_levels, "int[]"),
        SPATIAL_SCALE,
        Param("mode", "max", lambda value: _validate.choice(value, "mode", SPP_MODES),
              "str"),
        Param("convention", "torchvision",
              lambda value: _validate.choice(value, "convention", POOL_CONVENTIONS),
              "str"),
    ),
    forward=_spp_forward,
    backward=_spp_backward,
    saved=(Saved("argmax", lambda height, width: "int32", "return_argmax"),),
    backward_needs_output_size=False,
    pooled=False,
    flat_columns=lambda channels, values: channels * spp_bins(values.levels),
    whole_map=True,
)

OPERATORS = {op.name: op for op in (ROI_ALIGN, ROI_ALIGN_MAX, ROI_POOL, PS_ROI_POOL,
                                    PS_ROI_ALIGN, ROI_ALIGN_ROTATED, PRROI_POOL,
                                    CROP_AND_RESIZE, ROI_SPP)}

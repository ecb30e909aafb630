"""Argument checks shared by the public functions. Every error names the
argument, what was expected and what came."""

import math
import numbers

import numpy as np

from ._interop import FLOAT_DTYPES, dtype_name

_INT32_MAX = 2**31 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_int(value):
    if type(value) is int:  # the usual case, without the ABC check's cost
        return True
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def output_size(value, name="output_size"):
    """A positive int or a pair of them -> (height, width)."""
    if type(value) is int and 0 < value <= _INT32_MAX:
        return value, value
    if _is_int(value):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        pair = tuple(value)
    else:
        raise TypeError(
            f"{name} must be an int or a pair of ints (height, width), got {value!r}"
        )
    if not all(0 < v <= _INT32_MAX for v in pair):
        raise ValueError(
            f"{name} must be positive and at most 2**31 - 1, got {value!r}"
        )
    return int(pair[0]), int(pair[1])


def spatial_scale(value, name="spatial_scale"):
    if type(value) is float and 0 < value < math.inf:
        return value
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return value


def sampling_ratio(value, name="sampling_ratio"):
    if not _is_int(value):
        raise TypeError(
            f"{name} must be an int (> 0: samples per bin side; <= 0: adaptive), "
            f"got {value!r}"
        )
    value = int(value)
    if not -_INT32_MAX <= value <= _INT32_MAX:
        raise ValueError(f"{name} must fit in 32 bits, got {value}")
    return value


def real(value, name):
    """A real number (not a bool), as a Python float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def choice(value, name, options):
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a string, one of "
            f"{', '.join(repr(o) for o in options)}, got {value!r}"
        )
    if value not in options:
        raise ValueError(
            f"{name} must be one of {', '.join(repr(o) for o in options)}, got {value!r}"
        )
    return value


def float_array(array, name, storage_dtype, ndim, layout):
    """``array`` (a kernel view) must be floating point with ``ndim`` dims."""
    if storage_dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating-point dtype ({', '.join(FLOAT_DTYPES)}), "
            f"got {storage_dtype}"
        )
    if array.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array {layout}, got shape {tuple(array.shape)}")


ARGMAX_DTYPES = ("int64", "int32")


def argmax_dtype(value, name="argmax_dtype"):
    """An integer dtype for RoI Pool's argmax, by any name NumPy knows
    (``"int32"``, ``numpy.int32``, ...) -> ``"int32"`` or ``"int64"``."""
    try:
        dtype = np.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in ARGMAX_DTYPES or value is None:
        raise TypeError(f"{name} must be int64 or int32, got {value!r}")
    return dtype.name


def argmax_fits(plane_size, dtype_name, name="argmax_dtype"):
    """An int32 argmax holds flat indices below 2**31 only."""
    if dtype_name == "int32" and plane_size > 2**31 - 1:
        raise ValueError(
            f"{name}=int32 cannot hold the positions of a feature plane of "
            f"{plane_size} pixels (more than 2**31 - 1); use int64")


DATA_FORMATS = ("NCHW", "NHWC")


def data_format(value, name="data_format"):
    """"NCHW" or "NHWC" -> True for channels-last."""
    return choice(value, name, DATA_FORMATS) == "NHWC"


def input_shape(value, name="input_shape", layout="(N, C, H, W)"):
    try:
        shape = tuple(value)
    except TypeError:
        shape = None
    if shape is None or len(shape) != 4 or not all(_is_int(v) for v in shape):
        raise TypeError(f"{name} must be a sequence of 4 ints {layout}, got {value!r}")
    if any(v < 0 for v in shape):
        raise ValueError(f"{name} must not have negative sizes, got {shape}")
    return tuple(int(v) for v in shape)


def storage_dtype(x, view):
    """The dtype name of the caller's array (before any widening for the CPU)."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None:
        try:
            return dtype_name(dtype)
        except TypeError:
            pass
    return dtype_name(view.dtype)


def scale_for(value, acc_dtype, name="spatial_scale"):
    """``spatial_scale`` must stay positive and finite in the arithmetic type
    (float32 unless the features are float64)."""
    if acc_dtype == "float32" and not (1e-30 <= value <= _FLOAT32_MAX) and not (
        value <= _FLOAT32_MAX and np.float32(value) > 0
    ):
        raise ValueError(
            f"{name} = {value!r} is not a positive finite float32, the "
            "arithmetic type of float32 and half-precision features"
        )
    return value

"""Small calls on CPU arrays, without the general path's cost.

The general path (curoi._interop.Caller and friends) handles every
framework, device, dtype, layout and odd memory; its bookkeeping costs tens
of microseconds, which is the whole cost of a call on a small input. The
functions here recognise the common case, arrays the kernels can read as
they are, and launch on them directly; for anything else they return None
and the caller takes the general path. They check nothing the general path
would check differently: the arguments' values are validated before, by the
same functions.
"""

import numpy as np


_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_NAMES = {_F32: "float32", _F64: "float64"}


def numpy_arrays(x, boxes, columns=5):
    """The dtype name when ``x`` is a NumPy 4-D (NCHW or NHWC) float32 or
    float64 array and ``boxes`` a NumPy ``[K, columns]`` array of the same dtype,
    both C-contiguous, aligned and native-endian, with something to
    compute (N, C, H, W and K not 0); else None."""
    if type(x) is not np.ndarray or type(boxes) is not np.ndarray:
        return None
    dtype = x.dtype
    name = _NAMES.get(dtype)
    if name is None or boxes.dtype != dtype or not dtype.isnative:
        return None
    if x.ndim != 4 or boxes.ndim != 2 or boxes.shape[1] != columns:
        return None
    if not (x.flags.c_contiguous and boxes.flags.c_contiguous
            and x.flags.aligned and boxes.flags.aligned):
        return None
    if x.size == 0 or boxes.shape[0] == 0:
        return None  # the general path gives empty or zero results
    return name


def empty(shape, dtype):
    """A result buffer, or None if it cannot be allocated (the general path
    then raises its MemoryError that names the argument)."""
    try:
        return np.empty(shape, dtype)
    except (MemoryError, ValueError):
        return None

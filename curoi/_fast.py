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

from . import _cpu

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_NAMES = {_F32: "float32", _F64: "float64"}


def numpy_arrays(x, boxes):
    """The dtype name when ``x`` is a NumPy 4-D (NCHW or NHWC) float32 or
    float64 array and ``boxes`` a NumPy ``[K, 5]`` array of the same dtype,
    both C-contiguous, aligned and native-endian, with something to
    compute (N, C, H, W and K not 0); else None."""
    if type(x) is not np.ndarray or type(boxes) is not np.ndarray:
        return None
    dtype = x.dtype
    name = _NAMES.get(dtype)
    if name is None or boxes.dtype != dtype or not dtype.isnative:
        return None
    if x.ndim != 4 or boxes.ndim != 2 or boxes.shape[1] != 5:
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


def _shapes(x, boxes, ph, pw, channels_last):
    """(N, C, H, W), K and the output's shape in the caller's layout."""
    if channels_last:
        n, h, w, c = x.shape
        return (n, c, h, w), boxes.shape[0], (boxes.shape[0], ph, pw, c)
    n, c, h, w = x.shape
    return (n, c, h, w), boxes.shape[0], (boxes.shape[0], c, ph, pw)


def roi_align_forward(x, boxes, dtype_name, ph, pw, scale, ratio, aligned,
                      channels_last):
    (n, c, h, w), k, shape = _shapes(x, boxes, ph, pw, channels_last)
    out = empty(shape, x.dtype)
    if out is None:
        return None
    _cpu.kernel("roi_align", "forward", dtype_name)(
        _cpu.address(x), _cpu.address(boxes), k, n, c, h, w, ph, pw, scale, ratio,
        int(aligned), int(channels_last), _cpu.address(out))
    return out


def roi_pool_forward(x, boxes, dtype_name, ph, pw, scale, convention_code,
                     return_argmax, argmax_dtype, channels_last):
    (n, c, h, w), k, shape = _shapes(x, boxes, ph, pw, channels_last)
    out = empty(shape, x.dtype)
    argmax = empty(shape, argmax_dtype) if return_argmax else False
    if out is None or argmax is None:
        return None
    _cpu.kernel("roi_pool", "forward", dtype_name)(
        _cpu.address(x), _cpu.address(boxes), k, n, c, h, w, ph, pw, scale,
        convention_code, int(channels_last), int(argmax_dtype == "int32"),
        _cpu.address(out), _cpu.address(argmax) if return_argmax else None)
    return (out, argmax) if return_argmax else out

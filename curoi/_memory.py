"""Where a launch's temporary buffers come from.

The kernels' wrappers (``curoi._ops``) take every temporary buffer they need
(the deterministic backward's fixed-point sums and scale, the box
gradients' partial sums) from :func:`empty` and :func:`zeros`, never from
the array module directly:

- by default they are the array module's own allocations: NumPy on the CPU;
  on a GPU, CuPy's current allocator, which ``curoi._interop`` points at
  PyTorch's caching allocator while a torch tensor's call runs (CuPy's
  memory pool otherwise);
- inside :func:`workspace` they are carved out of one buffer that the
  caller's framework allocated: ``curoi.jax`` declares it as an extra
  output of the kernel's XLA call, sized by the wrappers' own ``*_scratch``
  functions, so that XLA owns every byte a jitted program uses.
"""

import contextlib
import threading

import numpy as np

#: Every temporary starts on a boundary of this many bytes (more than any
#: element type needs, and what GPU memory allocators give).
ALIGNMENT = 256

_local = threading.local()


def nbytes(shape, dtype):
    count = 1
    for extent in shape:
        count *= int(extent)
    return count * np.dtype(dtype).itemsize


def footprint(buffers):
    """Bytes a workspace needs for ``buffers`` ((shape, dtype) pairs) taken
    one after the other."""
    total = 0
    for shape, dtype in buffers:
        total += -(-nbytes(shape, dtype) // ALIGNMENT) * ALIGNMENT
    return total


class WorkspaceTooSmallError(RuntimeError):
    """A launch asked for more temporary memory than its workspace holds:
    the workspace was sized for another set of temporaries (a bug)."""


class Workspace:
    """Temporaries carved one after the other out of ``buffer``, a flat
    uint8 NumPy or CuPy array."""

    def __init__(self, buffer):
        self.buffer = buffer
        self.used = 0

    def take(self, shape, dtype):
        size = nbytes(shape, dtype)
        end = self.used + size
        if end > self.buffer.size:
            raise WorkspaceTooSmallError(
                f"curoi: a temporary of shape {tuple(shape)} ({dtype}) needs "
                f"{size} bytes, but its workspace has {self.buffer.size - self.used} "
                f"of {self.buffer.size} left")
        array = self.buffer[self.used:end].view(dtype).reshape(shape)
        self.used = -(-end // ALIGNMENT) * ALIGNMENT
        return array


@contextlib.contextmanager
def workspace(buffer):
    """Take the temporaries of the launches inside from ``buffer``."""
    previous = getattr(_local, "current", None)
    _local.current = Workspace(buffer)
    try:
        yield _local.current
    finally:
        _local.current = previous


def empty(xp, shape, dtype):
    """A temporary buffer, from the current workspace if there is one."""
    current = getattr(_local, "current", None)
    if current is None:
        return xp.empty(shape, dtype=dtype)
    return current.take(shape, dtype)


def zeros(xp, shape, dtype):
    array = empty(xp, shape, dtype)
    array.fill(0)
    return array

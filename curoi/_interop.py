"""DLPack in and out: what framework an array comes from, where it lives, a
NumPy or CuPy view of it for the kernels, and the caller's kind of array back.

Kernels only ever see NumPy arrays (CPU) or CuPy arrays (CUDA). Inputs are
viewed through DLPack without a copy when they are C-contiguous; results are
allocated by the caller's framework where that matters (torch: its caching
allocator), or as NumPy/CuPy arrays handed back through DLPack.
"""

import contextlib
import os
import sys

import numpy as np

from . import _gpu

_DLPACK_CPU = 1
_DLPACK_CUDA = 2
_DLPACK_CUDA_HOST = 3
_DLPACK_CUDA_MANAGED = 13
_DLPACK_DEVICE_NAMES = {4: "OpenCL", 7: "Vulkan", 8: "Metal", 9: "VPI",
                        10: "ROCm", 14: "oneAPI"}

#: Feature dtypes the kernels accept, by NumPy-style name.
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
HALF_DTYPES = ("float16", "bfloat16")
#: framework_of's answers that are handled by name, not by generic_from_dlpack.
_NAMED_FRAMEWORKS = ("numpy", "cupy", "torch", "jax", "tensorflow", "dlpack")


def framework_of(x):
    """'numpy', 'cupy', 'torch', 'jax', 'tensorflow', the name of another
    framework whose module offers ``from_dlpack`` (see
    :func:`generic_from_dlpack`), or 'dlpack' (a bare producer)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    root = type(x).__module__.split(".")[0]
    if root == "cupy":
        return "cupy"
    if root == "torch":
        return "torch"
    if root in ("jax", "jaxlib"):
        return "jax"
    if not (hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")):
        return None
    if root == "tensorflow":
        # TF's importer lives in tf.experimental.dlpack and takes a capsule.
        return "tensorflow"
    found = generic_from_dlpack(x)
    if found is None or found[0] in _NAMED_FRAMEWORKS:
        # e.g. a foreign type whose namespace is NumPy: NumPy/CuPy results
        # are what it would get back anyway.
        return "dlpack"
    return found[0]


def generic_from_dlpack(x):
    """(framework name, its ``from_dlpack``) for an array whose framework can
    import DLPack arrays, else None.

    The array API standard's namespace (``x.__array_namespace__()``) comes
    first; else the modules on the path of the array's type, from its
    top-level package down (``paddle``, ``mlx.core``). Only modules that
    are already imported are looked at: the caller's framework is loaded,
    and nothing else gets imported."""
    get_namespace = getattr(x, "__array_namespace__", None)
    if get_namespace is not None:
        try:
            namespace = get_namespace()
        except Exception:  # a namespace version it refuses: look elsewhere
            namespace = None
        importer = getattr(namespace, "from_dlpack", None)
        if callable(importer):
            return namespace.__name__, importer
    parts = type(x).__module__.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        importer = getattr(sys.modules.get(name), "from_dlpack", None)
        if callable(importer):
            return name, importer
    return None


def _tensorflow():
    # Already imported: the caller handed over a TensorFlow tensor.
    return sys.modules["tensorflow"]


def cast(x, framework, dtype):
    """``x`` as ``dtype`` (a name such as 'float32', or the framework's own
    dtype object), converted by its own framework."""
    if framework == "torch":
        import torch

        return x.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if framework == "tensorflow":
        return _tensorflow().cast(x, dtype)
    if hasattr(x, "astype"):  # NumPy, CuPy, JAX, PaddlePaddle, MLX
        return x.astype(dtype)
    namespace = x.__array_namespace__()  # the array API's function form
    return namespace.astype(
        x, getattr(namespace, dtype) if isinstance(dtype, str) else dtype)


def _describe(x):
    return f"{type(x).__module__}.{type(x).__qualname__}"


_warned_graph = False  # warned once that a torch graph is not followed


def warn_if_graph(x, name):
    """The NumPy-style functions give torch tensors no gradient: say so,
    once per process, when one that requires grad comes in."""
    global _warned_graph
    if _warned_graph or not getattr(x, "requires_grad", False) \
            or framework_of(x) != "torch":
        return
    # curoi.torch's own ops (custom ops, whose kernels see tensors that
    # require grad) call these functions too: only warn for a user's call.
    package = os.path.dirname(os.path.abspath(__file__))
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(package):
            break
        if os.path.basename(path).startswith(("torch", "_torch", "_compat")):
            return
        frame = frame.f_back
    _warned_graph = True
    from ._cpu import _warn_from_caller

    _warn_from_caller(
        f"{name} is a torch tensor that requires grad, but curoi's NumPy-style "
        "functions return a result without a graph: autograd gives no "
        "gradient through it. Use curoi.torch (curoi.torch.roi_align, ...) "
        "for gradients.")


def _variable_hint(x):
    """A hint for a tf.Variable, which is no tensor (it holds one)."""
    module = type(x).__module__ or ""
    if module.startswith(("tensorflow", "keras")) and "Variable" in type(x).__name__:
        return (" (a tf.Variable holds a tensor but is none: pass "
                "tf.convert_to_tensor(v) or v.value())")
    return ""


class Device:
    """('cpu', None) or ('cuda', ordinal)."""

    __slots__ = ("kind", "index")

    def __init__(self, kind, index=None):
        self.kind = kind
        self.index = index

    def __eq__(self, other):
        return (self.kind, self.index) == (other.kind, other.index)

    def __str__(self):
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    @property
    def is_cuda(self):
        return self.kind == "cuda"


def device_of(x, framework, name):
    if framework == "numpy":
        return Device("cpu")
    if framework == "cupy":
        return Device("cuda", x.device.id)
    if framework == "torch":
        if x.device.type == "cpu":
            return Device("cpu")
        if x.device.type == "cuda":
            return Device("cuda", x.device.index)
        raise ValueError(
            f"{name} is a torch tensor on device {x.device}; curoi runs on "
            "CPU and CUDA devices only"
        )
    kind, index = x.__dlpack_device__()
    kind = int(kind)
    if kind in (_DLPACK_CPU, _DLPACK_CUDA_HOST):
        # Pinned (page-locked) host memory is host memory: the CPU kernels
        # read it in place, and NumPy imports it through DLPack.
        return Device("cpu")
    if kind in (_DLPACK_CUDA, _DLPACK_CUDA_MANAGED):
        return Device("cuda", int(index))
    raise ValueError(
        f"{name} lives on a {_DLPACK_DEVICE_NAMES.get(kind, f'DLPack type {kind}')} "
        "device; curoi runs on CPU and CUDA devices only"
    )


def dtype_name(dtype):
    """NumPy-style name of a dtype of any framework: NumPy, CuPy, ml_dtypes,
    torch, TensorFlow (``tf.float32``), or one whose dtypes print as
    ``module.name`` (``paddle.float32``, ``array_api_strict.float32``)."""
    text = str(dtype)
    if text.startswith("torch."):
        return text[len("torch."):]
    try:
        return np.dtype(dtype).name
    except TypeError:
        pass
    as_numpy = getattr(dtype, "as_numpy_dtype", None)  # TensorFlow
    if as_numpy is not None:
        return np.dtype(as_numpy).name
    name = getattr(dtype, "name", None)
    if isinstance(name, str):
        return name
    if "." in text and " " not in text:
        return text.rsplit(".", 1)[1]
    raise TypeError(f"cannot interpret {text!r} as a dtype")


class Caller:
    """The framework, device and stream of a call, taken from its features."""

    def __init__(self, x, name):
        warn_if_graph(x, name)
        self.framework = framework_of(x)
        if self.framework is None:
            raise TypeError(
                f"{name} must be an array: a NumPy, CuPy, PyTorch, JAX or "
                f"TensorFlow array or any object with __dlpack__; got {_describe(x)}"
                f"{_variable_hint(x)}"
            )
        self.device = device_of(x, self.framework, name)
        # The caller's own dtype object, to cast half-precision results back.
        self.dtype = getattr(x, "dtype", None)
        # Another framework's importer, to hand results back as its arrays.
        self._from_dlpack = None
        if self.framework not in _NAMED_FRAMEWORKS:
            self._from_dlpack = generic_from_dlpack(x)[1]

    # ------------------------------------------------------------ streams
    @contextlib.contextmanager
    def on_device(self):
        """Make the caller's device, stream and allocator current for CuPy
        while a call runs.

        - CuPy input runs on CuPy's current stream, its buffers from CuPy's
          current allocator (its memory pool unless the caller set another).
        - torch input runs on ``torch.cuda.current_stream()`` of its device,
          with that device current for torch too (``Tensor.__dlpack__``
          refuses a tensor on another device from PyTorch 2.10), and every
          buffer CuPy allocates meanwhile (results' copies, casts,
          temporaries) comes from PyTorch's caching allocator on that
          stream: ``torch.cuda.memory_allocated`` counts it, and a CUDA
          graph being captured records it in its own pool.
        - TensorFlow input: TensorFlow computes on a stream of its own that
          it does not expose, so the device is synchronised before the
          launch (TensorFlow's pending work is done) and CuPy's stream after
          it (TensorFlow's later work sees the results).
        - Other producers run on CuPy's current stream, which DLPack orders
          after the producer's work.
        """
        if not self.device.is_cuda:
            yield
            return
        cupy = _gpu.require_cupy()
        index = self.device.index
        with contextlib.ExitStack() as stack:
            stack.enter_context(cupy.cuda.Device(index))
            if self.framework == "torch":
                import torch

                stack.enter_context(torch.cuda.device(index))
                stream = torch.cuda.current_stream(index)
                stack.enter_context(external_stream(cupy, stream.cuda_stream, index))
            allocator = self.cuda_allocator(cupy)
            if allocator is not None:
                stack.enter_context(cupy.cuda.using_allocator(allocator))
            if self.framework == "tensorflow":
                cupy.cuda.runtime.deviceSynchronize()
                stack.callback(_synchronize_current_stream, cupy)
            yield

    def cuda_allocator(self, cupy):
        """The CuPy allocator that the call's GPU buffers come from:
        PyTorch's caching allocator for torch tensors, None (CuPy's current
        allocator: its memory pool, or whatever the caller set) otherwise."""
        if self.framework == "torch":
            import torch

            return torch_allocator(torch, cupy, self.device.index)
        return None

    # -------------------------------------------------------------- input
    def view(self, x, name, allow_int=False):
        """A C-contiguous NumPy (CPU) or CuPy (CUDA) view of ``x``, which must
        live on the caller's device. Copies only if ``x`` is not contiguous,
        or, on the CPU, when NumPy cannot hold its dtype (bfloat16 from torch
        or JAX), in which case it comes back as float32."""
        warn_if_graph(x, name)
        framework = framework_of(x)
        if framework is None:
            hint = _variable_hint(x)
            if isinstance(x, (list, tuple)):
                hint = (" (a nested Python list: convert it with "
                        "numpy.asarray, or the input's framework, first)")
            raise TypeError(
                f"{name} must be an array like the input (a {self.framework} "
                f"array), got {_describe(x)}{hint}"
            )
        device = device_of(x, framework, name)
        if device != self.device:
            raise ValueError(
                f"{name} is on {device} but input is on {self.device}; "
                "move them to the same device"
            )
        if framework == "torch":
            x = x.detach()  # __dlpack__ refuses tensors that require grad
        if self.device.is_cuda:
            cupy = _gpu.require_cupy()
            if framework == "cupy":
                array = x
            elif framework == "tensorflow":
                # TensorFlow's __dlpack__ refuses the stream= that CuPy passes
                # for CUDA arrays; its own exporter gives a capsule (ordering
                # is on_device's).
                array = cupy.from_dlpack(_tensorflow().experimental.dlpack.to_dlpack(x))
            else:
                array = cupy.from_dlpack(x)
            return cupy.ascontiguousarray(array)
        if framework != "numpy":
            dtype = getattr(x, "dtype", None)  # a bare DLPack producer has none
            if dtype is not None and _is_bfloat16(dtype):
                # NumPy cannot receive bfloat16 through DLPack: the framework
                # widens it, which the CPU backend would do anyway.
                x = cast(x, framework, "float32")
            x = np.from_dlpack(x)
        array = np.ascontiguousarray(x)
        if not (array.dtype.isnative and array.flags.aligned):
            # The kernels read native-endian, naturally aligned elements.
            array = array.astype(array.dtype.newbyteorder("="))
        return array

    # ------------------------------------------------------------- output
    def new(self, shape, dtype, native=True, zeroed=True, what="the result"):
        """A new result buffer, zero-filled unless ``zeroed`` is False (for
        a kernel that writes every element). Returns (kernel_view, native):
        native is the caller's tensor when curoi allocates through the
        caller's framework (torch), else None. A buffer too large to
        allocate is a MemoryError that says which result and why
        (``what``)."""
        try:
            return self._new(shape, dtype, native, zeroed)
        except (MemoryError, ValueError, RuntimeError) as error:
            text = str(error).lower()
            if isinstance(error, RuntimeError) and not (
                    "memory" in text or "overflow" in text):
                raise  # not about the size (torch reports sizes as RuntimeError)
            count = 1
            for extent in shape:
                count *= int(extent)
            size = count * np.dtype(dtype).itemsize
            raise MemoryError(
                f"{what} of shape {tuple(shape)} ({size / 2**30:.3g} GiB of "
                f"{dtype}) cannot be allocated on {self.device}: {error}"
            ) from error

    def _new(self, shape, dtype, native, zeroed):
        if native and self.framework == "torch":
            import torch

            make = torch.zeros if zeroed else torch.empty
            tensor = make(shape, dtype=getattr(torch, dtype), device=str(self.device))
            if self.device.is_cuda:
                return _gpu.require_cupy().from_dlpack(tensor), tensor
            return np.from_dlpack(tensor), tensor
        if self.device.is_cuda:
            cupy = _gpu.require_cupy()
            make = cupy.zeros if zeroed else cupy.empty
            return make(shape, dtype=dtype), None
        return _aligned_buffer(shape, dtype, zeroed), None

    def result(self, view, native=None, cast_to=None):
        """Hand a result back as the caller's kind of array, cast to the
        caller's dtype ``cast_to`` (half precision) if given."""
        fw = self.framework
        if native is not None:
            out = native
        elif fw == "torch":
            import torch

            out = torch.from_dlpack(view)
        elif fw == "jax":
            import jax.numpy as jnp

            out = jnp.from_dlpack(view)
        elif fw == "tensorflow":
            out = _tensorflow().experimental.dlpack.from_dlpack(view.__dlpack__())
        elif self._from_dlpack is not None:
            out = self._from_dlpack(view)
        else:  # numpy, cupy, or a bare producer: NumPy on CPU, CuPy on CUDA
            out = view
            fw = "cupy" if self.device.is_cuda else "numpy"
        if cast_to is not None:
            out = cast(out, fw, cast_to)
        return out


class _StreamHandle:
    """A raw CUDA stream handle as the CUDA stream protocol (what CuPy's
    ``Stream.from_external`` reads)."""

    __slots__ = ("_handle",)

    def __init__(self, handle):
        self._handle = int(handle)

    def __cuda_stream__(self):
        return (0, self._handle)


def external_stream(cupy, handle, device_id):
    """CuPy's view of a stream that another framework owns, from its raw
    handle: torch's ``Stream.cuda_stream`` (every PyTorch release has it;
    ``Stream.__cuda_stream__`` only PyTorch 2.10 and later), XLA's
    ``ctx.stream``. ``Stream.from_external`` on CuPy 14 and later,
    ``ExternalStream`` before it."""
    if hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(_StreamHandle(handle))
    return cupy.cuda.ExternalStream(int(handle), device_id)


def torch_allocator(torch, cupy, device_id):
    """A CuPy allocator (size -> MemoryPointer) that takes its memory from
    PyTorch's caching allocator on torch's current stream of ``device_id``:
    a uint8 tensor per buffer, kept alive by CuPy's view of it and handed
    back to PyTorch's cache when that view is freed."""
    device = torch.device("cuda", device_id)

    def allocate(size):
        block = torch.empty(size, dtype=torch.uint8, device=device)
        memory = cupy.cuda.UnownedMemory(block.data_ptr(), size, block, device_id)
        return cupy.cuda.MemoryPointer(memory, 0)

    return allocate


def _synchronize_current_stream(cupy):
    cupy.cuda.get_current_stream().synchronize()


def _is_bfloat16(dtype):
    try:
        return dtype_name(dtype) == "bfloat16"
    except TypeError:
        return False


def _aligned_buffer(shape, dtype, zeroed, alignment=64):
    """A buffer on a 64-byte boundary: JAX takes such a NumPy buffer through
    DLPack without copying it."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    make = np.zeros if zeroed else np.empty
    raw = make(count * dtype.itemsize + alignment, dtype=np.uint8)
    start = (-raw.ctypes.data) % alignment
    return raw[start:start + count * dtype.itemsize].view(dtype).reshape(shape)

"""What every public function does between checking its arguments and
launching: view the features, pick the kernel's element type."""

from . import _validate


def features(caller, x, name, layout, ndim=4):
    """Kernel view and storage dtype name of a floating-point array of
    ``ndim`` axes (4 unless it is a flat [K, columns] result's gradient)."""
    view = caller.view(x, name)
    storage = _validate.storage_dtype(x, view)
    _validate.float_array(view, name, storage, ndim,
                          layout if ndim == 4 else "[K, columns]")
    return view, storage


def accumulation_dtype(storage):
    """Arithmetic (and box) type: float64 for float64, else float32."""
    return "float64" if storage == "float64" else "float32"


def kernel_dtype(caller, storage):
    """The GPU has kernels for every storage type; the CPU computes half
    precision in float32."""
    return storage if caller.device.is_cuda else accumulation_dtype(storage)


def as_kernel_input(view, dtype):
    return view if view.dtype.name == dtype else view.astype(dtype)


def cast_back(caller, storage, kernel_dtype_name):
    """The dtype to cast a result to, or None when it already has it."""
    if kernel_dtype_name == storage:
        return None
    if caller.framework != "dlpack" and caller.dtype is not None:
        return caller.dtype  # cast in the caller's framework, to its dtype
    return storage  # a bare producer's result is NumPy/CuPy: cast by name


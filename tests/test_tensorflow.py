"""TensorFlow tensors, and arrays of other frameworks that can import DLPack,
go in and come back as their own kind of array.

Expected numbers come from the NumPy reference in tests/reference.py and from
the NumPy path of curoi (which tests/test_roi_align.py and test_roi_pool.py
check against that reference): a TF caller must get exactly what a NumPy
caller gets. Zero copy is shown with TensorFlow's own address of its buffer,
read from the DLPack capsule TF exports, never from curoi.
"""

import ctypes
import os
import subprocess
import sys
import types

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's start-up notes out

import curoi
from curoi._interop import Caller, framework_of

import reference as ref

N, C, H, W = 2, 3, 10, 12
OUT = (3, 4)
SCALE = 0.5
RATIO, ALIGNED = 2, True
# Image coordinates (the map is 24 x 20 image pixels at scale 0.5): inside,
# partly outside, tiny, wholly outside, the whole map.
BOXES = np.array([
    [0, 2.0, 3.0, 18.0, 14.0],
    [1, -4.0, -2.0, 9.5, 7.25],
    [1, 10.0, 6.0, 10.5, 6.5],
    [0, 30.0, 25.0, 40.0, 33.0],
    [1, 0.0, 0.0, 23.0, 19.0],
])
K = len(BOXES)
OPS = ("roi_align", "roi_pool", "roi_align_backward", "roi_pool_backward")
# Tolerances against the float64 reference: a few units in the last place
# of each dtype (half types are computed in float32 and rounded once).
REF_TOL = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-5, "float64": 1e-12}


def load_tensorflow():
    """TensorFlow, imported by the first test that needs it, not at
    collection: it adds several hundred MB to the test process, which would
    count in the memory that subprocess checks elsewhere in the suite see
    (a child's ru_maxrss starts from its parent's)."""
    return pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def tf():
    return load_tensorflow()


def make_case(seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        x=rng.standard_normal((N, C, H, W)),
        g=rng.uniform(0.5, 1.5, (K, C) + OUT),
        # Every flat index of the plane plus -1 (empty bin), independent of
        # any forward result.
        argmax=rng.integers(-1, H * W, (K, C) + OUT).astype(np.int64),
    )


def box_dtype(dtype):
    return np.float64 if dtype == "float64" else np.float32


def tf_tensor(a, dtype):
    """TF tensor of ``dtype`` holding NumPy array ``a`` (cast inside TF)."""
    tf = load_tensorflow()
    return tf.cast(tf.constant(a), getattr(tf, dtype))


def numpy_of(a, dtype):
    """The NumPy caller's input for the same values: half types rounded by
    TF and widened to float32, the precision curoi computes them in."""
    if dtype in ("float16", "bfloat16"):
        return widened(tf_tensor(a, dtype)).astype(np.float32)
    return a.astype(dtype)


def run(op, x_or_g, boxes, argmax=None):
    if op == "roi_align":
        return curoi.roi_align(x_or_g, boxes, OUT, SCALE, RATIO, ALIGNED)
    if op == "roi_pool":
        return curoi.roi_pool(x_or_g, boxes, OUT, SCALE, return_argmax=True)
    if op == "roi_align_backward":
        return curoi.roi_align_backward(x_or_g, boxes, (N, C, H, W), OUT, SCALE,
                                        RATIO, ALIGNED)
    if op == "roi_pool_backward":
        return curoi.roi_pool_backward(x_or_g, argmax, boxes, (N, C, H, W))
    raise AssertionError(op)


def reference(op, x_or_g, argmax=None):
    if op == "roi_align":
        return [ref.roi_align(x_or_g, BOXES, OUT, SCALE, RATIO, ALIGNED)]
    if op == "roi_pool":
        return list(ref.roi_pool(x_or_g, BOXES, OUT, SCALE))
    if op == "roi_align_backward":
        return [ref.roi_align_backward(x_or_g, BOXES, (N, C, H, W), OUT, SCALE,
                                       RATIO, ALIGNED)]
    return [ref.roi_pool_backward(x_or_g, argmax, BOXES, (N, C, H, W))]


def as_list(result):
    return list(result) if isinstance(result, tuple) else [result]


def widened(t):
    """A TF result as float64 (or int64) NumPy, through TF's own cast."""
    tf = load_tensorflow()
    return (t if t.dtype == tf.int64 else tf.cast(t, tf.float64)).numpy()


def tf_address(t):
    """Address of a TF tensor's buffer as TensorFlow exports it: the data
    field of the DLTensor in TF's own DLPack capsule."""
    capsule = load_tensorflow().experimental.dlpack.to_dlpack(t)
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = [ctypes.py_object, ctypes.c_char_p]
    managed = get(capsule, b"dltensor")
    return ctypes.c_void_p.from_address(managed).value  # DLTensor.data comes first


# ------------------------------------------------------------- results
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("op", OPS)
def test_tensorflow_in_tensorflow_out_equal_to_numpy_and_reference(op, dtype, tf):
    case = make_case()
    source = case["g"] if op.endswith("backward") else case["x"]
    argmax = case["argmax"]
    boxes = BOXES.astype(box_dtype(dtype))

    got = as_list(run(op, tf_tensor(source, dtype), tf.constant(boxes),
                      tf.constant(argmax)))
    want = as_list(run(op, numpy_of(source, dtype), boxes, argmax))
    expected = reference(op, widened(tf_tensor(source, dtype)), argmax)

    assert len(got) == len(want) == len(expected)
    for out, same, exact in zip(got, want, expected):
        assert isinstance(out, tf.Tensor), type(out)
        if out.dtype != tf.int64:
            assert out.dtype == getattr(tf, dtype)  # the caller's dtype comes back
            # The NumPy path rounded to the same half type by TF equals TF's.
            same = widened(tf.cast(tf.constant(np.asarray(same)), getattr(tf, dtype)))
        np.testing.assert_array_equal(widened(out), same)
        tol = REF_TOL[dtype]
        np.testing.assert_allclose(widened(out), exact, rtol=tol, atol=tol)


def test_roi_pool_argmax_from_tensorflow_feeds_the_backward(tf):
    case = make_case(1)
    x = tf.constant(case["x"].astype(np.float32))
    y, argmax = curoi.roi_pool(x, tf.constant(BOXES.astype(np.float32)), OUT, SCALE,
                               return_argmax=True)
    assert argmax.dtype == tf.int64
    want_y, want_arg = ref.roi_pool(case["x"].astype(np.float32), BOXES, OUT, SCALE)
    np.testing.assert_array_equal(argmax.numpy(), want_arg)
    np.testing.assert_allclose(y.numpy(), want_y, rtol=0, atol=0)
    g = tf.constant(case["g"].astype(np.float32))
    grad = curoi.roi_pool_backward(g, argmax, tf.constant(BOXES.astype(np.float32)),
                                   (N, C, H, W), deterministic=True)
    assert isinstance(grad, tf.Tensor) and grad.dtype == tf.float32
    np.testing.assert_allclose(
        grad.numpy(), ref.roi_pool_backward(case["g"].astype(np.float32), want_arg,
                                            BOXES, (N, C, H, W)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", ["roi_align", "roi_pool", "roi_align_backward"])
def test_list_of_per_image_tensorflow_boxes_equals_k_by_5(op, tf):
    case = make_case(2)
    source = case["g"] if op.endswith("backward") else case["x"]
    order = np.argsort(BOXES[:, 0], kind="stable")  # per image, in order
    boxes = BOXES[order].astype(np.float32)
    per_image = [tf.constant(boxes[boxes[:, 0] == i, 1:]) for i in range(N)]
    source = source[order] if op.endswith("backward") else source
    from_list = as_list(run(op, tf.constant(source.astype(np.float32)), per_image))
    from_rows = as_list(run(op, tf.constant(source.astype(np.float32)), tf.constant(boxes)))
    for a, b in zip(from_list, from_rows):
        assert isinstance(a, tf.Tensor)
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# ------------------------------------------------------------ zero copy
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_tensorflow_features_are_read_in_place(dtype):
    x = tf_tensor(make_case()["x"], dtype)
    view = Caller(x, "input").view(x, "input")
    assert view.flags.c_contiguous
    assert view.ctypes.data == tf_address(x)


def test_tensorflow_boxes_and_argmax_are_read_in_place(tf):
    x = tf.constant(make_case()["x"].astype(np.float32))
    boxes = tf.constant(BOXES.astype(np.float32))
    argmax = tf.constant(make_case()["argmax"])
    caller = Caller(x, "input")
    assert caller.view(boxes, "boxes").ctypes.data == tf_address(boxes)
    assert caller.view(argmax, "argmax").ctypes.data == tf_address(argmax)


def test_address_comparison_sees_a_copy_control(tf):
    # Control for the two tests above: a tensor TF computed anew has another
    # address, so equal addresses there do mean the same buffer.
    x = tf.constant(make_case()["x"].astype(np.float32))
    copy = x + 0.0
    view = Caller(copy, "input").view(copy, "input")
    assert view.ctypes.data == tf_address(copy) != tf_address(x)


@pytest.mark.parametrize("shape", [(3, 2, 5, 7), (5, 256, 7, 7)])
def test_tensorflow_result_wraps_curoi_buffer_without_copy(shape, tf):
    caller = Caller(tf.zeros((1, 1, 2, 2)), "input")
    buffer, native = caller.new(shape, "float32")
    buffer[...] = np.arange(buffer.size, dtype=np.float32).reshape(shape)
    out = caller.result(buffer, native)
    assert isinstance(out, tf.Tensor)
    assert tf_address(out) == buffer.ctypes.data
    del buffer  # TF keeps the memory alive through the DLPack capsule
    np.testing.assert_array_equal(out.numpy(), np.arange(np.prod(shape)).reshape(shape))


# --------------------------------------------------------------- errors
def test_tensorflow_integer_features_are_refused_by_name(tf):
    x = tf.zeros((N, C, H, W), tf.int32)
    with pytest.raises(TypeError, match=r"input must have a floating-point dtype.*int32"):
        curoi.roi_align(x, tf.constant(BOXES.astype(np.float32)), OUT)


def test_tensorflow_features_of_the_wrong_rank_are_refused_by_name(tf):
    x = tf.zeros((C, H, W))
    with pytest.raises(ValueError, match=r"input must be a 4-D array.*\(3, 10, 12\)"):
        curoi.roi_align(x, tf.constant(BOXES.astype(np.float32)), OUT)


def test_tensorflow_float_argmax_is_refused_by_name(tf):
    g = tf.ones((K, C) + OUT)
    with pytest.raises(TypeError, match="argmax must have an integer dtype"):
        curoi.roi_pool_backward(g, tf.zeros((K, C) + OUT), tf.constant(BOXES.astype(np.float32)),
                                (N, C, H, W))


def test_tensorflow_variable_is_refused_by_name_and_its_tensor_accepted(tf):
    x = make_case(6)["x"].astype(np.float32)
    boxes = tf.constant(BOXES.astype(np.float32))
    variable = tf.Variable(x)
    with pytest.raises(TypeError, match=r"input must be an array.*ResourceVariable"):
        curoi.roi_align(variable, boxes, OUT)
    want = curoi.roi_align(x, BOXES.astype(np.float32), OUT)
    for tensor in (tf.convert_to_tensor(variable), variable.value()):
        np.testing.assert_array_equal(curoi.roi_align(tensor, boxes, OUT).numpy(), want)


# ----------------------------------------------------------- the GPU
def _tensorflow_gpu(tf):
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        pytest.skip("TensorFlow sees no GPU (tensorflow-cpu, or no CUDA device)")
    pytest.importorskip("cupy")
    return "/GPU:0"


@pytest.mark.cuda
def test_tensorflow_gpu_tensors_run_on_the_gpu_and_stay_there(tf):
    device = _tensorflow_gpu(tf)
    case = make_case(3)
    with tf.device(device):
        x = tf.constant(case["x"].astype(np.float32))
        boxes = tf.constant(BOXES.astype(np.float32))
    out = curoi.roi_align(x, boxes, OUT, SCALE, RATIO, ALIGNED)
    assert isinstance(out, tf.Tensor) and "GPU" in out.device
    np.testing.assert_allclose(
        out.numpy(), ref.roi_align(case["x"].astype(np.float32), BOXES, OUT, SCALE,
                                   RATIO, ALIGNED), rtol=1e-5, atol=1e-5)


# --------------------------------------- other frameworks, found generically
def test_array_api_strict_arrays_come_back_as_themselves():
    xp = pytest.importorskip("array_api_strict")
    case = make_case(4)
    x = xp.asarray(case["x"])  # float64: array-api-strict has no half types
    boxes = xp.asarray(BOXES)
    assert framework_of(x) == "array_api_strict"

    y = curoi.roi_align(x, boxes, OUT, SCALE, RATIO, ALIGNED)
    pooled, argmax = curoi.roi_pool(x, boxes, OUT, SCALE, return_argmax=True)
    g = xp.asarray(case["g"])
    gx_align = curoi.roi_align_backward(g, boxes, (N, C, H, W), OUT, SCALE, RATIO, ALIGNED)
    # Per-image boxes list image 0's boxes first, then image 1's: the
    # gradient and argmax rows follow that order.
    order = np.argsort(BOXES[:, 0], kind="stable")
    per_image = [xp.asarray(BOXES[BOXES[:, 0] == i, 1:]) for i in range(N)]
    gx_pool = curoi.roi_pool_backward(xp.asarray(case["g"][order]),
                                      xp.asarray(np.from_dlpack(argmax)[order]),
                                      per_image, (N, C, H, W))
    for out in (y, pooled, argmax, gx_align, gx_pool):
        assert type(out) is type(x)
    assert y.dtype == xp.float64 and argmax.dtype == xp.int64
    want_pooled, want_argmax = ref.roi_pool(case["x"], BOXES, OUT, SCALE)
    tol = dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.from_dlpack(y), ref.roi_align(
        case["x"], BOXES, OUT, SCALE, RATIO, ALIGNED), **tol)
    np.testing.assert_array_equal(np.from_dlpack(pooled), want_pooled)
    np.testing.assert_array_equal(np.from_dlpack(argmax), want_argmax)
    np.testing.assert_allclose(np.from_dlpack(gx_align), ref.roi_align_backward(
        case["g"], BOXES, (N, C, H, W), OUT, SCALE, RATIO, ALIGNED), **tol)
    np.testing.assert_allclose(np.from_dlpack(gx_pool), ref.roi_pool_backward(
        case["g"], want_argmax, BOXES, (N, C, H, W)), **tol)


def test_array_api_strict_features_are_read_in_place():
    xp = pytest.importorskip("array_api_strict")
    x = xp.asarray(make_case()["x"].astype(np.float32))
    view = Caller(x, "input").view(x, "input")
    assert view.ctypes.data == np.from_dlpack(x).ctypes.data


class _ModuleArray:
    """An array type of a made-up framework whose package offers only
    ``from_dlpack`` (as paddle and mlx.core do); it checks that the lookup
    walks the type's module path, not that such a backend works."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()

    @property
    def dtype(self):
        return self.array.dtype

    def astype(self, dtype):
        return _ModuleArray(self.array.astype(dtype))


def test_framework_is_found_from_the_module_of_the_array_type(monkeypatch):
    package = types.ModuleType("madeupframework")
    package.core = types.ModuleType("madeupframework.core")
    package.core.from_dlpack = lambda a: _ModuleArray(np.from_dlpack(a))
    monkeypatch.setitem(sys.modules, "madeupframework", package)
    monkeypatch.setitem(sys.modules, "madeupframework.core", package.core)
    monkeypatch.setattr(_ModuleArray, "__module__", "madeupframework.core")

    x = _ModuleArray(make_case(5)["x"].astype(np.float16))
    assert framework_of(x) == "madeupframework.core"
    y = curoi.roi_align(x, BOXES.astype(np.float32), OUT, SCALE, RATIO, ALIGNED)
    assert type(y) is _ModuleArray and y.dtype == np.float16
    np.testing.assert_array_equal(
        y.array, curoi.roi_align(x.array, BOXES.astype(np.float32), OUT, SCALE,
                                 RATIO, ALIGNED))


def test_importing_and_using_curoi_imports_no_other_framework():
    code = (
        "import sys, numpy as np, curoi\n"
        "x = np.ones((1, 2, 4, 4), np.float32)\n"
        "b = np.array([[0, 0, 0, 3, 3]], np.float32)\n"
        "y, a = curoi.roi_pool(x, b, 2, return_argmax=True)\n"
        "curoi.roi_pool_backward(y, a, b, x.shape)\n"
        "curoi.roi_align_backward(curoi.roi_align(x, b, 2), b, x.shape, 2)\n"
        "loaded = [m for m in ('tensorflow', 'array_api_strict', 'torch', 'jax')\n"
        "          if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)

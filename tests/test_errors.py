"""Bad arguments raise TypeError/ValueError naming the argument and what came;
empty inputs (K = 0 boxes, maps with no pixels or no channels) are not
errors and give empty or all-zero results.
"""

import inspect
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import curoi

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

N, C, H, W = 2, 3, 8, 8
X = np.ones((N, C, H, W), np.float32)
B = np.array([[0, 1, 1, 5, 5], [1, 0, 0, 7, 7]], np.float32)
PER_IMAGE = [B[:1, 1:], B[1:, 1:]]
G = np.ones((2, C, 2, 2), np.float32)  # gradient for output_size 2
ARGMAX = np.zeros((2, C, 2, 2), np.int64)


class FakeDevice:
    """A DLPack producer that claims to live on another device. curoi must
    refuse it by its device alone, before asking for its data."""

    def __init__(self, device_type, index=0):
        self._device = (device_type, index)

    def __dlpack_device__(self):
        return self._device

    def __dlpack__(self, **kwargs):
        raise AssertionError("curoi must not import an array from the wrong device")


def align(**kw):
    args = dict(input=X, boxes=B, output_size=2)
    args.update(kw)
    return lambda: curoi.roi_align(**args)


def pool(**kw):
    args = dict(input=X, boxes=B, output_size=2)
    args.update(kw)
    return lambda: curoi.roi_pool(**args)


def align_bw(**kw):
    args = dict(grad_output=G, boxes=B, input_shape=X.shape, output_size=2)
    args.update(kw)
    return lambda: curoi.roi_align_backward(**args)


def pool_bw(**kw):
    args = dict(grad_output=G, argmax=ARGMAX, boxes=B, input_shape=X.shape)
    args.update(kw)
    return lambda: curoi.roi_pool_backward(**args)


FORWARD = {"roi_align": align, "roi_pool": pool}
WITH_OUTPUT_SIZE = {"roi_align": align, "roi_pool": pool, "roi_align_backward": align_bw}
ALL = {"roi_align": align, "roi_pool": pool, "roi_align_backward": align_bw,
       "roi_pool_backward": pool_bw}


def case(id, fn, exc, name, came=None):
    """One bad call: ``exc`` expected, its message names ``name`` and, when
    given, shows what came (``came``)."""
    return pytest.param(fn, exc, name, came, id=id)


CASES = []
for op, f in FORWARD.items():
    CASES += [
        case(f"{op}-input-3d", f(input=X[0]), ValueError, "input", "(3, 8, 8)"),
        case(f"{op}-input-5d", f(input=X[None]), ValueError, "input", "(1, 2, 3, 8, 8)"),
        case(f"{op}-input-2d-torch", f(input=torch.ones(8, 8)), ValueError, "input", "(8, 8)"),
        case(f"{op}-input-3d-jax", f(input=jnp.ones((3, 8, 8))), ValueError, "input", "(3, 8, 8)"),
        case(f"{op}-input-int32", f(input=X.astype(np.int32)), TypeError, "input", "int32"),
        case(f"{op}-input-int64-torch", f(input=torch.ones(N, C, H, W, dtype=torch.int64)),
             TypeError, "input", "int64"),
        case(f"{op}-input-int32-jax", f(input=jnp.ones((N, C, H, W), jnp.int32)),
             TypeError, "input", "int32"),
        case(f"{op}-input-bool", f(input=X.astype(bool)), TypeError, "input", "bool"),
        case(f"{op}-input-complex", f(input=X.astype(np.complex64)), TypeError, "input",
             "complex64"),
        case(f"{op}-input-list", f(input=X.tolist()), TypeError, "input", "list"),
        case(f"{op}-input-none", f(input=None), TypeError, "input", "None"),
        case(f"{op}-input-opencl", f(input=FakeDevice(4)), ValueError, "input", "OpenCL"),
        case(f"{op}-boxes-k-by-4", f(boxes=B[:, 1:]), ValueError, "boxes", "(2, 4)"),
        case(f"{op}-boxes-k-by-6", f(boxes=np.ones((2, 6), np.float32)), ValueError, "boxes",
             "(2, 6)"),
        case(f"{op}-boxes-1d", f(boxes=B[0]), ValueError, "boxes", "(5,)"),
        case(f"{op}-boxes-3d", f(boxes=B[None]), ValueError, "boxes", "(1, 2, 5)"),
        case(f"{op}-boxes-int", f(boxes=B.astype(np.int64)), TypeError, "boxes", "int64"),
        case(f"{op}-boxes-int-torch", f(boxes=torch.from_numpy(B.astype(np.int32))),
             TypeError, "boxes", "int32"),
        case(f"{op}-boxes-none", f(boxes=None), TypeError, "boxes", "None"),
        # A nested Python list reads as a list of per-image boxes whose
        # first item is not an array.
        case(f"{op}-boxes-nested-list", f(boxes=B.tolist()), TypeError, "boxes[0]", "list"),
        case(f"{op}-boxes-on-cuda", f(boxes=FakeDevice(2)), ValueError, "boxes", "cuda"),
        case(f"{op}-list-item-k-by-5", f(boxes=[B, B[:, 1:]]), ValueError, "boxes[0]", "(2, 5)"),
        case(f"{op}-list-item-1d", f(boxes=[B[0, 1:]]), ValueError, "boxes[0]", "(4,)"),
        case(f"{op}-list-second-item", f(boxes=[B[:, 1:], B[:, :3]]), ValueError, "boxes[1]",
             "(2, 3)"),
        case(f"{op}-list-item-int", f(boxes=[B[:, 1:].astype(np.int64)]), TypeError,
             "boxes[0]", "int64"),
        case(f"{op}-list-longer-than-batch", f(boxes=[B[:, 1:]] * 3), ValueError, "boxes", "3"),
    ]

for op, f in WITH_OUTPUT_SIZE.items():
    for bad, exc in [(0, ValueError), (-1, ValueError), ((2, 0), ValueError),
                     ((-2, 2), ValueError), (2.0, TypeError), ((2.0, 2), TypeError),
                     ((2, 2, 2), TypeError), ((2,), TypeError), (True, TypeError),
                     ((True, 2), TypeError), ("2", TypeError), (None, TypeError)]:
        CASES.append(case(f"{op}-output_size={bad!r}", f(output_size=bad), exc, "output_size",
                          repr(bad)))
    for bad, exc in [(0, ValueError), (0.0, ValueError), (-0.0625, ValueError),
                     (float("nan"), ValueError), (float("inf"), ValueError),
                     (float("-inf"), ValueError), ("1", TypeError), (None, TypeError),
                     (True, TypeError), (1j, TypeError)]:
        CASES.append(case(f"{op}-spatial_scale={bad!r}", f(spatial_scale=bad), exc,
                          "spatial_scale"))

for op, f in {"roi_align": align, "roi_align_backward": align_bw}.items():
    for bad in (2.0, 1.5, "2", None):
        CASES.append(case(f"{op}-sampling_ratio={bad!r}", f(sampling_ratio=bad), TypeError,
                          "sampling_ratio", repr(bad)))
    for bad in (1, 0, "True", None):
        CASES.append(case(f"{op}-aligned={bad!r}", f(aligned=bad), TypeError, "aligned",
                          repr(bad)))

for bad in ("caffe", "TorchVision", "", "mmdet"):
    CASES.append(case(f"roi_pool-convention={bad!r}", pool(convention=bad), ValueError,
                      "convention", repr(bad)))
for bad in (1, 0, "yes", None):
    CASES.append(case(f"roi_pool-return_argmax={bad!r}", pool(return_argmax=bad), TypeError,
                      "return_argmax", repr(bad)))

for op, f in {"roi_align_backward": align_bw, "roi_pool_backward": pool_bw}.items():
    CASES += [
        case(f"{op}-input_shape-3", f(input_shape=(C, H, W)), TypeError, "input_shape",
             "(3, 8, 8)"),
        case(f"{op}-input_shape-5", f(input_shape=(1, N, C, H, W)), TypeError, "input_shape"),
        case(f"{op}-input_shape-int", f(input_shape=8), TypeError, "input_shape"),
        case(f"{op}-input_shape-float", f(input_shape=(N, C, 8.0, W)), TypeError,
             "input_shape"),
        case(f"{op}-input_shape-negative", f(input_shape=(N, C, -8, W)), ValueError,
             "input_shape", "-8"),
        case(f"{op}-grad-K", f(grad_output=G[:1], **({"argmax": ARGMAX[:1]} if "pool" in op
                                                     else {})),
             ValueError, "grad_output", "(1, 3, 2, 2)"),
        case(f"{op}-grad-C", f(grad_output=G[:, :2], **({"argmax": ARGMAX[:, :2]} if "pool" in op
                                                        else {})),
             ValueError, "grad_output", "(2, 2, 2, 2)"),
        case(f"{op}-grad-3d", f(grad_output=G[0], **({"argmax": ARGMAX[0]} if "pool" in op
                                                     else {})),
             ValueError, "grad_output", "(3, 2, 2)"),
        case(f"{op}-grad-int", f(grad_output=G.astype(np.int32)), TypeError, "grad_output",
             "int32"),
        case(f"{op}-grad-list", f(grad_output=G.tolist()), TypeError, "grad_output", "list"),
        case(f"{op}-boxes-k-by-4", f(boxes=B[:, 1:]), ValueError, "boxes", "(2, 4)"),
        case(f"{op}-boxes-int", f(boxes=B.astype(np.int32)), TypeError, "boxes", "int32"),
        case(f"{op}-list-longer-than-batch", f(boxes=[B[:1, 1:]] * 3), ValueError, "boxes",
             "3"),
    ]

CASES += [
    case("roi_align_backward-grad-PH", align_bw(output_size=(3, 2)), ValueError, "grad_output",
         "(2, 3, 2, 2)"),
    case("roi_align_backward-grad-PW", align_bw(output_size=(2, 3)), ValueError, "grad_output",
         "(2, 3, 2, 2)"),
    case("roi_pool_backward-argmax-shape", pool_bw(argmax=ARGMAX[:, :, :1]), ValueError,
         "argmax", "(2, 3, 1, 2)"),
    case("roi_pool_backward-argmax-transposed-shape",
         pool_bw(argmax=np.zeros((2, C, 2, 3), np.int64)), ValueError, "argmax", "(2, 3, 2, 3)"),
    case("roi_pool_backward-argmax-float", pool_bw(argmax=ARGMAX.astype(np.float32)), TypeError,
         "argmax", "float32"),
    case("roi_pool_backward-argmax-bool", pool_bw(argmax=ARGMAX.astype(bool)), TypeError,
         "argmax", "bool"),
    case("roi_pool_backward-argmax-list", pool_bw(argmax=ARGMAX.tolist()), TypeError, "argmax",
         "list"),
    case("roi_pool_backward-argmax-on-cuda", pool_bw(argmax=FakeDevice(2)), ValueError, "argmax",
         "cuda"),
]

# Values the checks above miss: out of the 32-bit range, a float32 overflow,
# None or a bool where a number or a shape goes, complex boxes.
for op, f in {"roi_align": align, "roi_align_backward": align_bw}.items():
    for bad, exc in [(2**31, ValueError), (-(2**31), ValueError), (2**63, ValueError),
                     (True, TypeError), (np.float32(2), TypeError)]:
        CASES.append(case(f"{op}-sampling_ratio={bad!r}", f(sampling_ratio=bad), exc,
                          "sampling_ratio"))
for op, f in WITH_OUTPUT_SIZE.items():
    # 1e39 is a fine float64 but not a float32, the arithmetic type here.
    CASES.append(case(f"{op}-spatial_scale-overflows-float32", f(spatial_scale=1e39),
                      ValueError, "spatial_scale", "1e+39"))
    CASES.append(case(f"{op}-output_size=2**31", f(output_size=(2, 2**31)), ValueError,
                      "output_size"))
for op, f in FORWARD.items():
    CASES.append(case(f"{op}-boxes-complex", f(boxes=B.astype(np.complex64)), TypeError,
                      "boxes", "complex64"))
    CASES.append(case(f"{op}-boxes-bool", f(boxes=B.astype(bool)), TypeError, "boxes", "bool"))
for op, f in {"roi_align_backward": align_bw, "roi_pool_backward": pool_bw}.items():
    CASES += [
        case(f"{op}-input_shape-none", f(input_shape=None), TypeError, "input_shape", "None"),
        case(f"{op}-input_shape-str", f(input_shape="2388"), TypeError, "input_shape"),
        case(f"{op}-input_shape-bool", f(input_shape=(N, C, True, W)), TypeError,
             "input_shape"),
        case(f"{op}-grad-none", f(grad_output=None), TypeError, "grad_output", "None"),
        case(f"{op}-grad-bool", f(grad_output=G.astype(bool)), TypeError, "grad_output", "bool"),
        case(f"{op}-grad-complex", f(grad_output=G.astype(np.complex64)), TypeError,
             "grad_output", "complex64"),
        case(f"{op}-boxes-none", f(boxes=None), TypeError, "boxes", "None"),
    ]
    # The deterministic keyword of the backward passes (where present).
    fn = getattr(curoi, op)
    if "deterministic" in inspect.signature(fn).parameters:
        for bad in (1, 0, "yes", None):
            CASES.append(case(f"{op}-deterministic={bad!r}", f(deterministic=bad), TypeError,
                              "deterministic", repr(bad)))
CASES.append(case("roi_pool_backward-argmax-none", pool_bw(argmax=None), TypeError, "argmax",
                  "None"))
CASES.append(case("roi_pool_backward-argmax-complex",
                  pool_bw(argmax=ARGMAX.astype(np.complex64)), TypeError, "argmax"))

# curoi.set_num_threads: the thread count of the CPU kernels.
if hasattr(curoi, "set_num_threads"):
    _THREADS_ARG = next(iter(inspect.signature(curoi.set_num_threads).parameters))
    for bad, exc in [(0, ValueError), (-1, ValueError), (2**40, ValueError),
                     (2.0, TypeError), ("2", TypeError), (None, TypeError), (True, TypeError),
                     (np.float64(2), TypeError)]:
        CASES.append(case(f"set_num_threads({bad!r})",
                          (lambda v: lambda: curoi.set_num_threads(v))(bad), exc,
                          _THREADS_ARG, repr(bad) if exc is TypeError else None))


def _names(message, name):
    """``name`` appears as a whole word (so "input" is not found in
    "input_shape", nor "boxes" in "boxes[0]" unless asked for)."""
    return re.search(rf"(?<![\w\[.]){re.escape(name)}(?![\w\[])", message) is not None \
        if not name.endswith("]") else name in message


@pytest.mark.parametrize("call,exc,name,came", CASES)
def test_bad_argument_is_named(call, exc, name, came):
    with pytest.raises(Exception) as info:
        call()
    # Exactly the documented type: not a RuntimeError/AttributeError from
    # deeper down, and not the other of the two.
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert _names(message, name), message
    if came is not None:
        assert came in message, message


def test_rejected_num_threads_leaves_the_setting_alone():
    if not hasattr(curoi, "set_num_threads"):
        pytest.skip("curoi.set_num_threads does not exist yet")
    before = curoi.get_num_threads()
    for bad in (0, -3, 2.5, None):
        with pytest.raises((TypeError, ValueError)):
            curoi.set_num_threads(bad)
        assert curoi.get_num_threads() == before
    # An accepted value is reported back, and results do not depend on it.
    x = np.random.default_rng(2).standard_normal((N, C, H, W)).astype(np.float32)
    want = curoi.roi_align(x, B, 2, 1.0, 2, True)
    try:
        curoi.set_num_threads(1)
        assert curoi.get_num_threads() == 1
        np.testing.assert_array_equal(curoi.roi_align(x, B, 2, 1.0, 2, True), want)
    finally:
        curoi.set_num_threads(before)
    assert curoi.get_num_threads() == before


def test_output_size_too_large_says_why():
    with pytest.raises(ValueError, match="output_size") as info:
        curoi.roi_align(X, B, (2, 2**31))
    assert re.search(r"at most|too large|2147483647|2\*\*31|32.bit", str(info.value)), \
        str(info.value)


def test_error_names_are_not_found_in_longer_names():
    # The matcher above must not accept "input" in a message about
    # input_shape, or "boxes" in one about boxes[0] only.
    assert not _names("input_shape must be ...", "input")
    assert not _names("boxes[0] has shape (4,)", "boxes")
    assert _names("boxes must be ...; boxes[0] has shape", "boxes[0]")
    assert _names("input must be a 4-D array", "input")


# --------------------------------------------- accepted argument spellings
def test_equivalent_spellings_are_accepted():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    want = curoi.roi_align(x, B, (2, 3), 0.5, 2, True)
    for kw in (dict(output_size=[2, 3]), dict(output_size=(np.int64(2), np.int32(3))),
               dict(spatial_scale=np.float32(0.5)), dict(spatial_scale=np.float64(0.5)),
               dict(sampling_ratio=np.int64(2)), dict(aligned=np.bool_(True))):
        args = dict(output_size=(2, 3), spatial_scale=0.5, sampling_ratio=2, aligned=True)
        args.update(kw)
        np.testing.assert_array_equal(curoi.roi_align(x, B, **args), want, err_msg=str(kw))
    g = rng.standard_normal((2, C, 2, 2)).astype(np.float32)
    want = curoi.roi_align_backward(g, B, (N, C, H, W), 2)
    for shape in ([N, C, H, W], torch.Size([N, C, H, W]), np.array([N, C, H, W]),
                  torch.ones(N, C, H, W).shape):
        np.testing.assert_allclose(curoi.roi_align_backward(g, B, shape, 2), want, rtol=1e-6)


# ---------------------------------------------------------------- K = 0
def _frameworks(x, boxes):
    yield "numpy", x, boxes
    yield "torch", torch.from_numpy(x), torch.from_numpy(boxes) if isinstance(
        boxes, np.ndarray) else [torch.from_numpy(b) for b in boxes]
    yield "jax", jnp.asarray(x), jnp.asarray(boxes) if isinstance(
        boxes, np.ndarray) else [jnp.asarray(b) for b in boxes]


def _np(a):
    return a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


EMPTY_BOXES = {
    "array-0x5": np.zeros((0, 5), np.float32),
    "empty-list": [],
    "list-of-empty": [np.zeros((0, 4), np.float32)] * N,
}


@pytest.mark.parametrize("boxes", EMPTY_BOXES.values(), ids=EMPTY_BOXES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_no_boxes_give_empty_results(boxes, dtype):
    x = np.random.default_rng(1).standard_normal((N, C, H, W)).astype(dtype)
    for fw, xf, bf in _frameworks(x, boxes):
        if fw == "jax" and dtype == np.float64:
            continue  # float64 JAX arrays need x64; covered in test_interop.py
        y = curoi.roi_align(xf, bf, (2, 3), 0.5, 2, True)
        assert _np(y).shape == (0, C, 2, 3) and _np(y).dtype == dtype, fw
        y, argmax = curoi.roi_pool(xf, bf, (2, 3), 0.5, return_argmax=True)
        assert _np(y).shape == (0, C, 2, 3) and _np(y).dtype == dtype, fw
        assert _np(argmax).shape == (0, C, 2, 3) and _np(argmax).dtype.kind == "i", fw
        empty_grad = np.zeros((0, C, 2, 3), dtype) if fw == "numpy" else (
            torch.zeros((0, C, 2, 3), dtype=xf.dtype) if fw == "torch"
            else jnp.zeros((0, C, 2, 3), xf.dtype))
        for g in (curoi.roi_align_backward(empty_grad, bf, (N, C, H, W), (2, 3), 0.5, 2, True),
                  curoi.roi_pool_backward(empty_grad, argmax, bf, (N, C, H, W))):
            g = _np(g)
            assert g.shape == (N, C, H, W) and g.dtype == dtype, fw
            assert not g.any(), fw  # zeros, not uninitialised memory


def test_no_boxes_launch_nothing(tmp_path):
    # With K = 0 nothing runs, so the CPU library is never even built: a
    # fresh process with an empty cache leaves the cache empty.
    script = """if True:
        import json, numpy as np, curoi
        x = np.ones((2, 3, 8, 8), np.float32)
        b = np.zeros((0, 5), np.float32)
        curoi.roi_align(x, b, 2)
        y, a = curoi.roi_pool(x, b, 2, return_argmax=True)
        curoi.roi_align_backward(np.zeros((0, 3, 2, 2), np.float32), b, x.shape, 2)
        curoi.roi_pool_backward(np.zeros((0, 3, 2, 2), np.float32), a, b, x.shape)
        print(json.dumps(curoi.backend_info()["cpu"]["library"]))
    """
    env = dict(os.environ, CUROI_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) is None
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# ------------------------------------------------- maps without pixels
EMPTY_MAPS = [(1, C, 0, 8), (1, C, 8, 0), (1, C, 0, 0), (1, 0, 8, 8), (0, C, 8, 8)]


@pytest.mark.parametrize("shape", EMPTY_MAPS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fw", ["numpy", "torch", "jax"])
def test_maps_without_pixels_or_channels_give_zeros(fw, shape):
    boxes = np.array([[0, 0, 0, 3, 3], [0, 1, 1, 2, 2]], np.float32)
    x = np.ones(shape, np.float32)
    conv = {"numpy": np.asarray, "torch": torch.from_numpy, "jax": jnp.asarray}[fw]
    k, c = len(boxes), shape[1]
    y = _np(curoi.roi_align(conv(x), conv(boxes), 2, 1.0, 2, True))
    assert y.shape == (k, c, 2, 2) and not y.any()
    y, argmax = curoi.roi_pool(conv(x), conv(boxes), 2, return_argmax=True)
    assert _np(y).shape == (k, c, 2, 2) and not _np(y).any()
    # Nothing was read: every bin is empty.
    assert (_np(argmax) == -1).all()
    g = np.ones((k, c, 2, 2), np.float32)
    for grad in (curoi.roi_align_backward(conv(g), conv(boxes), shape, 2, 1.0, 2, True),
                 curoi.roi_pool_backward(conv(g), conv(np.zeros((k, c, 2, 2), np.int64)),
                                         conv(boxes), shape)):
        assert _np(grad).shape == shape and not _np(grad).any()


# ------------------------------------------------- results too large to hold
@pytest.mark.parametrize("fw", ["numpy", "torch"])
@pytest.mark.parametrize("output_size", [(2**31 - 1, 2**31 - 1), (2**20, 2**20)])
def test_a_result_too_large_to_allocate_is_a_memory_error_naming_output_size(
        fw, output_size):
    conv = {"numpy": np.asarray, "torch": torch.from_numpy}[fw]
    x = conv(np.ones((1, 1, 4, 4), np.float32))
    boxes = conv(np.array([[0, 0, 0, 3, 3]], np.float32))
    for op in (curoi.roi_align, curoi.roi_pool):
        with pytest.raises(MemoryError, match=r"output_size.*\(1, 1, %d, %d\)"
                           % output_size):
            op(x, boxes, output_size)


def test_a_gradient_too_large_to_allocate_is_a_memory_error_naming_input_shape():
    g = np.ones((1, 1, 1, 1), np.float32)
    boxes = np.array([[0, 0, 0, 3, 3]], np.float32)
    shape = (1, 1, 2**30, 2**30)
    with pytest.raises(MemoryError, match="input_shape"):
        curoi.roi_align_backward(g, boxes, shape, 1)
    with pytest.raises(MemoryError, match="input_shape"):
        curoi.roi_pool_backward(g, np.zeros((1, 1, 1, 1), np.int64), boxes, shape)

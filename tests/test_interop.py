"""Interop: any DLPack array in, the caller's kind of array out, no copies.

NumPy, PyTorch (CPU) and JAX (CPU) inputs must give the same numbers for all
four functions, as the caller's own kind of array on the caller's device;
contiguous inputs are viewed without a copy (checked by data pointers), and
non-contiguous ones are copied exactly once. Expected values come from the
NumPy path (the thing each other framework must agree with), from hand
computation, or from the contiguous copy of the same data -- never from a
number captured by running curoi.
"""

import contextlib
import tracemalloc

import numpy as np
import pytest

import curoi
from curoi._interop import Caller

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy
ml_dtypes = pytest.importorskip("ml_dtypes")

FRAMEWORKS = ("numpy", "torch", "jax")
OPS = ("roi_align", "roi_pool", "roi_align_backward", "roi_pool_backward")

N, C, H, W = 2, 3, 10, 12
OUT = (3, 4)
SCALE = 0.5
# Boxes in image coordinates (the map is 24 x 20 image pixels at scale 0.5):
# inside, partly outside, tiny, wholly outside, the whole map.
BOXES = np.array([
    [0, 2.0, 3.0, 18.0, 14.0],
    [1, -4.0, -2.0, 9.5, 7.25],
    [1, 10.0, 6.0, 10.5, 6.5],
    [0, 30.0, 25.0, 40.0, 33.0],
    [1, 0.0, 0.0, 23.0, 19.0],
])
K = len(BOXES)
# (sampling_ratio, aligned): fixed grid with half-pixel offset, and the
# adaptive legacy setting.
SETTINGS = {"fixed-aligned": (2, True), "adaptive-legacy": (-1, False)}


# --------------------------------------------------------------- helpers
def x64_for(dtype):
    """JAX holds float64 only with x64 enabled; keep that local to a test."""
    if np.dtype(dtype) == np.float64:
        return jax.enable_x64(True)
    return contextlib.nullcontext()


def to_fw(fw, a):
    """A copy of NumPy array ``a`` as framework ``fw``'s array."""
    a = np.array(a, copy=True)
    if fw == "numpy":
        return a
    if fw == "torch":
        return torch.from_numpy(a)
    if fw == "jax":
        return jnp.asarray(a)
    raise AssertionError(fw)


def as_np(a):
    """Any result as a NumPy array (bfloat16 widened to float32)."""
    if isinstance(a, torch.Tensor):
        a = a.detach()
        if a.dtype == torch.bfloat16:
            a = a.float()
        return a.numpy()
    a = np.asarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        a = a.astype(np.float32)
    return a


def data_ptr(a):
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]
    if isinstance(a, torch.Tensor):
        return a.data_ptr()
    return a.unsafe_buffer_pointer()


def assert_kind(out, fw, like):
    """``out`` is ``fw``'s array type on the device of ``like``."""
    if fw == "numpy":
        assert type(out) is np.ndarray, type(out)
    elif fw == "torch":
        assert isinstance(out, torch.Tensor), type(out)
        assert out.device == like.device
        assert not out.requires_grad
    elif fw == "jax":
        assert isinstance(out, jax.Array), type(out)
        assert out.devices() == like.devices()
    else:
        assert type(out) is np.ndarray, type(out)  # other producers on CPU


def make_case(dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    boxes = BOXES.astype(dtype if np.dtype(dtype) == np.float64 else np.float32)
    g_align = rng.uniform(0.5, 1.5, (K, C) + OUT).astype(dtype)
    g_pool = rng.uniform(0.5, 1.5, (K, C) + OUT).astype(dtype)
    # A valid argmax for the backward: every flat index in [0, H*W) plus -1
    # (empty bin), independent of the forward's result.
    argmax = rng.integers(-1, H * W, (K, C) + OUT).astype(np.int64)
    return dict(x=x, boxes=boxes, g_align=g_align, g_pool=g_pool, argmax=argmax)


def call(op, case, conv=lambda name, a: a, setting="fixed-aligned", boxes=None):
    """Run ``op`` on ``case``, each array passed through ``conv(name, a)``."""
    ratio, aligned = SETTINGS[setting]
    b = conv("boxes", case["boxes"]) if boxes is None else boxes
    shape = case["x"].shape
    if op == "roi_align":
        return curoi.roi_align(conv("input", case["x"]), b, OUT, SCALE, ratio, aligned)
    if op == "roi_pool":
        return curoi.roi_pool(conv("input", case["x"]), b, OUT, SCALE, return_argmax=True)
    if op == "roi_align_backward":
        return curoi.roi_align_backward(conv("grad_output", case["g_align"]), b, shape,
                                        OUT, SCALE, ratio, aligned)
    if op == "roi_pool_backward":
        return curoi.roi_pool_backward(conv("grad_output", case["g_pool"]),
                                       conv("argmax", case["argmax"]), b, shape)
    raise AssertionError(op)


def outputs(result):
    return list(result) if isinstance(result, tuple) else [result]


def assert_same(op, got, want, dtype):
    """Forward kernels compute each output in one thread: results must be
    bit-identical. Backward kernels sum with atomic adds whose order can
    vary between runs (documented), so allow the last bits to differ."""
    got, want = as_np(got), as_np(want)
    assert got.shape == want.shape
    if op.endswith("backward"):
        tol = 1e-12 if np.dtype(dtype) == np.float64 else 1e-5
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    else:
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------- anchor values
RAMP = (np.arange(8)[None, :] + 10.0 * np.arange(8)[:, None])[None, None]


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_ramp_is_interpolated_exactly_in_every_framework(fw):
    # f(y, x) = x + 10 y. Box (1, 1, 5, 5), aligned: feature box [0.5, 4.5]^2,
    # bins of 2, samples at 1, 2 | 3, 4 on each axis: bin means 1.5 and 3.5.
    x = to_fw(fw, RAMP.astype(np.float32))
    boxes = to_fw(fw, np.array([[0, 1, 1, 5, 5]], np.float32))
    y = curoi.roi_align(x, boxes, 2, 1.0, 2, True)
    assert_kind(y, fw, x)
    np.testing.assert_array_equal(as_np(y)[0, 0], [[16.5, 18.5], [36.5, 38.5]])
    # roi_pool (torchvision rounding) of box (1, 1, 4, 4): 2x2 bins of 2
    # pixels over columns/rows 1..4; the maximum is each bin's bottom right.
    y, argmax = curoi.roi_pool(x, to_fw(fw, np.array([[0, 1, 1, 4, 4]], np.float32)),
                               2, return_argmax=True)
    assert_kind(y, fw, x)
    assert_kind(argmax, fw, x)
    np.testing.assert_array_equal(as_np(y)[0, 0], [[22, 24], [42, 44]])
    np.testing.assert_array_equal(as_np(argmax)[0, 0], [[2 * 8 + 2, 2 * 8 + 4],
                                                        [4 * 8 + 2, 4 * 8 + 4]])


# ------------------------------------------ same numbers, right types
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_frameworks_agree_and_return_their_own_arrays(fw, op, dtype, setting):
    case = make_case(dtype)
    want = outputs(call(op, case, setting=setting))  # the NumPy path
    with x64_for(dtype):
        arrays = {}

        def conv(name, a):
            arrays[name] = to_fw(fw, a)
            return arrays[name]

        got = outputs(call(op, case, conv, setting=setting))
        like = arrays["input" if "input" in arrays else "grad_output"]
        for g, w in zip(got, want):
            assert_kind(g, fw, like)
            # JAX holds int64 (argmax) as int32 unless x64 is enabled.
            want_dtype = jax.dtypes.canonicalize_dtype(w.dtype) if fw == "jax" else w.dtype
            assert as_np(g).dtype == want_dtype
            assert_same(op, g, w, dtype)
        assert as_np(got[0]).dtype == np.dtype(dtype)


def test_numpy_float64_really_computes_in_float64():
    # A shift far below float32 resolution must survive: 1 + 2^-40 on a
    # constant map averages to itself only in double precision.
    x = np.full((1, 1, 4, 4), 1 + 2.0 ** -40)
    y = curoi.roi_align(x, np.array([[0, 0, 0, 3, 3.0]]), 1, 1.0, 2, True)
    assert y.dtype == np.float64
    assert y[0, 0, 0, 0] == 1 + 2.0 ** -40


# ------------------------------------------------------- requires_grad
def test_torch_tensors_requiring_grad_are_accepted():
    case = make_case(np.float32)

    def conv(name, a):
        t = torch.from_numpy(a.copy())
        return t.requires_grad_() if t.is_floating_point() else t

    for op in OPS:
        want = outputs(call(op, case))
        got = outputs(call(op, case, conv))
        for g, w in zip(got, want):
            assert isinstance(g, torch.Tensor)
            # Autograd is the next issue: these results are plain tensors.
            assert not g.requires_grad and g.grad_fn is None
            assert_same(op, g, w, np.float32)


# --------------------------------------------------- non-contiguous
def noncontiguous(fw, layout, a):
    """``a``'s values in a non-contiguous array of framework ``fw``."""
    a = np.asarray(a)
    if layout == "transposed":  # every axis reversed in memory (Fortran order)
        t = np.ascontiguousarray(a.transpose())
        out = t.transpose() if fw == "numpy" else \
            torch.from_numpy(t).permute(*reversed(range(a.ndim)))
    elif layout == "strided":  # every other element of a wider buffer
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        big[..., ::2] = a
        out = big[..., ::2] if fw == "numpy" else torch.from_numpy(big)[..., ::2]
    elif layout == "reversed":  # negative strides (NumPy only)
        out = a[..., ::-1].copy()[..., ::-1]
    elif layout == "channels_last":  # torch's NHWC memory format, 4-D only
        t = torch.from_numpy(a.copy())
        out = t.contiguous(memory_format=torch.channels_last) if a.ndim == 4 else \
            t.transpose(0, 1).contiguous().transpose(0, 1)
    else:
        raise AssertionError(layout)
    contiguous = out.flags.c_contiguous if fw == "numpy" else out.is_contiguous()
    assert not contiguous or a.size <= 1, (fw, layout, a.shape)
    return out


LAYOUTS = [("numpy", "transposed"), ("numpy", "strided"), ("numpy", "reversed"),
           ("torch", "transposed"), ("torch", "strided"), ("torch", "channels_last")]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("fw,layout", LAYOUTS)
def test_non_contiguous_inputs_give_the_contiguous_result(fw, layout, op):
    # JAX arrays are always compact (it rejects other strides), so it has no
    # non-contiguous case. Every array argument is non-contiguous at once.
    case = make_case(np.float32, seed=3)
    want = outputs(call(op, case))
    got = outputs(call(op, case, lambda name, a: noncontiguous(fw, layout, a)))
    for g, w in zip(got, want):
        assert_same(op, g, w, np.float32)


@pytest.mark.parametrize("fw", ["numpy", "torch"])
def test_broadcast_features_match_their_materialised_copy(fw):
    # Zero strides (np.broadcast_to, torch expand): every channel reads the
    # same plane; the result must be that of the materialised array.
    plane = np.random.default_rng(5).standard_normal((N, 1, H, W)).astype(np.float32)
    full = np.repeat(plane, C, axis=1)
    x = np.broadcast_to(plane, full.shape) if fw == "numpy" else \
        torch.from_numpy(plane).expand(*full.shape)
    boxes = BOXES.astype(np.float32)
    np.testing.assert_array_equal(
        as_np(curoi.roi_align(x, to_fw(fw, boxes), OUT, SCALE, 2, True)),
        curoi.roi_align(full, boxes, OUT, SCALE, 2, True))
    np.testing.assert_array_equal(
        as_np(curoi.roi_pool(x, to_fw(fw, boxes), OUT, SCALE)),
        curoi.roi_pool(full, boxes, OUT, SCALE))


def test_non_native_byte_order_and_unaligned_numpy_inputs():
    # Kernels read native, aligned elements: big-endian data and a buffer
    # starting at an odd address must give the ordinary array's result.
    case = make_case(np.float32, seed=4)
    x = case["x"]
    unaligned = np.ndarray(x.shape, np.float32, buffer=np.zeros(x.nbytes + 1, np.uint8),
                           offset=1)
    unaligned[...] = x
    assert not unaligned.flags.aligned
    want = curoi.roi_align(x, case["boxes"], OUT, SCALE, 2, True)
    for variant in (x.astype(">f4"), unaligned):
        np.testing.assert_array_equal(
            curoi.roi_align(variant, case["boxes"].astype(">f4"), OUT, SCALE, 2, True), want)


# ------------------------------------------------------------ zero copy
def _feature_in(kind):
    x = make_case(np.float32)["x"]
    if kind == "numpy":
        return x
    if kind == "numpy-readonly":
        x.flags.writeable = False
        return x
    if kind == "torch":
        return torch.from_numpy(x)
    if kind == "torch-requires-grad":
        return torch.from_numpy(x).requires_grad_()
    if kind == "torch-float16":
        return torch.from_numpy(x).half()
    if kind == "jax":
        return jnp.asarray(x)
    if kind == "jax-float16":
        return jnp.asarray(x, dtype=jnp.float16)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["numpy", "numpy-readonly", "torch", "torch-requires-grad",
                                  "torch-float16", "jax", "jax-float16"])
def test_contiguous_input_is_viewed_without_copy(kind):
    x = _feature_in(kind)
    view = Caller(x, "input").view(x, "input")
    assert isinstance(view, np.ndarray)
    assert view.flags.c_contiguous
    # Same memory: the kernels read the caller's own buffer.
    assert data_ptr(view) == data_ptr(x)


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_contiguous_boxes_are_viewed_without_copy(fw):
    x = to_fw(fw, make_case(np.float32)["x"])
    boxes = to_fw(fw, BOXES.astype(np.float32))
    view = Caller(x, "input").view(boxes, "boxes")
    assert data_ptr(view) == data_ptr(boxes)


@pytest.mark.parametrize("fw", ["numpy", "torch"])
def test_non_contiguous_input_is_copied_exactly_once(fw):
    base = np.random.default_rng(6).standard_normal((4, 8, 64, 64)).astype(np.float32)
    x = base.transpose(0, 1, 3, 2) if fw == "numpy" else \
        torch.from_numpy(base).transpose(2, 3)
    caller = Caller(x, "input")
    tracemalloc.start()  # NumPy reports its data allocations to tracemalloc
    try:
        view = caller.view(x, "input")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert data_ptr(view) != data_ptr(x)  # it had to be copied ...
    assert view.flags.c_contiguous  # ... into C order ...
    np.testing.assert_array_equal(view, base.transpose(0, 1, 3, 2))
    # ... once: at most one buffer of that size was alive at any time.
    assert peak < 1.5 * view.nbytes, (peak, view.nbytes)
    if fw == "numpy":
        assert peak >= view.nbytes  # the copy itself was seen


@pytest.mark.parametrize("shape", [(3, 2, 5, 7), (1, 1, 1, 3), (5, 256, 7, 7)])
def test_jax_result_wraps_curoi_buffer_without_copy(shape):
    # curoi allocates CPU results as 64-byte aligned NumPy buffers because
    # JAX imports only those through DLPack without copying (DESIGN.md §4).
    caller = Caller(jnp.zeros((1, 1, 2, 2)), "input")
    buffer, native = caller.new(shape, "float32")
    assert native is None
    assert buffer.ctypes.data % 64 == 0
    buffer[...] = np.arange(buffer.size, dtype=np.float32).reshape(shape)
    out = caller.result(buffer, native)
    assert isinstance(out, jax.Array)
    assert out.unsafe_buffer_pointer() == buffer.ctypes.data
    np.testing.assert_array_equal(np.asarray(out), np.arange(buffer.size).reshape(shape))


def test_jax_copies_misaligned_buffers_control():
    # Control for the test above: a buffer 16 bytes off a 64-byte boundary is
    # copied by JAX, so equal pointers there do mean zero copy.
    raw = np.zeros(4096, np.uint8)
    start = (-raw.ctypes.data) % 64 + 16
    misaligned = raw[start:start + 1024].view(np.float32)
    assert jnp.from_dlpack(misaligned).unsafe_buffer_pointer() != misaligned.ctypes.data


# --------------------------------------------------------- mixed kinds
MIXED = [("torch", "numpy"), ("numpy", "torch"), ("jax", "numpy"), ("jax", "torch"),
         ("torch", "jax"), ("numpy", "jax")]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("features_fw,other_fw", MIXED)
def test_boxes_and_argmax_may_come_from_another_framework_on_the_same_device(
        features_fw, other_fw, op):
    # Boxes and argmax are only read: curoi views any CPU DLPack array, and
    # the result follows the features (or grad_output).
    case = make_case(np.float32, seed=7)
    want = outputs(call(op, case))
    arrays = {}

    def conv(name, a):
        arrays[name] = to_fw(features_fw if name in ("input", "grad_output") else other_fw, a)
        return arrays[name]

    got = outputs(call(op, case, conv))
    like = arrays["input" if "input" in arrays else "grad_output"]
    for g, w in zip(got, want):
        assert_kind(g, features_fw, like)
        assert_same(op, g, w, np.float32)


def test_float64_boxes_with_float32_features_are_used_in_float32():
    # Boxes are used in the accumulation type of the features (documented).
    case = make_case(np.float32, seed=8)
    b64 = case["boxes"].astype(np.float64) + 1e-9  # lost when rounded to float32
    np.testing.assert_array_equal(
        curoi.roi_align(case["x"], b64, OUT, SCALE, 2, True),
        curoi.roi_align(case["x"], b64.astype(np.float32), OUT, SCALE, 2, True))


# --------------------------------------------------------- list of boxes
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("fw", ["numpy", "torch", "jax", "mixed"])
def test_list_of_per_image_boxes_matches_k_by_5(fw, op):
    # Three images, the middle one without boxes: the batch index of each box
    # is its position in the list.
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, C, H, W)).astype(np.float32)
    per_image = [BOXES[:2, 1:], np.zeros((0, 4)), BOXES[2:, 1:]]
    rows = np.concatenate([np.column_stack([np.full(len(b), i), b])
                           for i, b in enumerate(per_image)]).astype(np.float32)
    case = dict(x=x, boxes=rows, g_align=rng.uniform(0.5, 1.5, (K, C) + OUT).astype(np.float32),
                g_pool=rng.uniform(0.5, 1.5, (K, C) + OUT).astype(np.float32),
                argmax=rng.integers(-1, H * W, (K, C) + OUT))
    kinds = ["torch", "numpy", "jax"] if fw == "mixed" else [fw] * 3
    feature_fw = "torch" if fw == "mixed" else fw
    as_list = [to_fw(k, b.astype(np.float32)) for k, b in zip(kinds, per_image)]
    want = outputs(call(op, case))
    got = outputs(call(op, case, lambda name, a: to_fw(feature_fw, a), boxes=as_list))
    for g, w in zip(got, want):
        assert_same(op, g, w, np.float32)
    # A tuple of arrays is a list too.
    got = outputs(call(op, case, lambda name, a: to_fw(feature_fw, a), boxes=tuple(as_list)))
    assert_same(op, got[0], want[0], np.float32)


# ------------------------------------------------------ half precision
HALF = {
    ("torch", "float16"): torch.float16, ("torch", "bfloat16"): torch.bfloat16,
    ("jax", "float16"): jnp.float16, ("jax", "bfloat16"): jnp.bfloat16,
    ("numpy", "float16"): np.float16, ("numpy", "bfloat16"): ml_dtypes.bfloat16,
}


def _to_half(fw, a, dtype):
    if fw == "torch":
        return torch.from_numpy(np.array(a, np.float32)).to(dtype)
    if fw == "jax":
        return jnp.asarray(np.array(a, np.float32)).astype(dtype)
    return np.array(a, np.float32).astype(dtype)


def _widen(fw, a):
    """A half array widened to float32 in its own framework."""
    if fw == "torch":
        return a.float()
    return a.astype(np.float32) if fw == "numpy" else a.astype(jnp.float32)


def _round(fw, a, dtype):
    if fw == "torch":
        return a.to(dtype)
    return a.astype(dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_half_precision_is_float32_computation_rounded(fw, half, op):
    # On the CPU half inputs are computed in float32 and rounded back once
    # (documented). Boxes stay float32.
    dtype = HALF[fw, half]
    case = make_case(np.float32, seed=10)
    halves = {name: _to_half(fw, case[key], dtype)
              for name, key in (("input", "x"), ("grad_output", "g_align" if "align" in op
                                                 else "g_pool"))}
    boxes = to_fw(fw, case["boxes"])

    def conv_half(name, a):
        return halves[name] if name in halves else to_fw(fw, a)

    def conv_wide(name, a):
        return _widen(fw, halves[name]) if name in halves else to_fw(fw, a)

    got = outputs(call(op, case, conv_half, boxes=boxes))
    ref = outputs(call(op, case, conv_wide, boxes=boxes))
    like = halves["input"] if "backward" not in op else halves["grad_output"]
    assert_kind(got[0], fw, like)
    assert got[0].dtype == dtype  # the caller's precision is kept
    want = as_np(_round(fw, ref[0], dtype))
    if op.endswith("backward"):
        # float32 sums by atomic adds may differ in the last float32 bit,
        # which can move the rounded value by one unit in the last place.
        rtol = 2.0 ** -10 if half == "float16" else 2.0 ** -7
        np.testing.assert_allclose(as_np(got[0]), want, rtol=rtol, atol=0)
    else:
        np.testing.assert_array_equal(as_np(got[0]), want)
    if op == "roi_pool":
        np.testing.assert_array_equal(as_np(got[1]), as_np(ref[1]))  # argmax
    # And the half result is close to the float32 one on the unrounded data.
    exact = as_np(outputs(call(op, case, lambda name, a: to_fw(fw, a), boxes=boxes))[0])
    np.testing.assert_allclose(as_np(got[0]), exact, rtol=0.05, atol=0.05)


# ------------------------------------------------------------ aliasing
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("fw", ["numpy", "torch"])
def test_outputs_never_alias_inputs(fw, op, dtype):
    case = make_case(dtype, seed=11)
    case["boxes"] = case["boxes"].astype(np.float32)
    arrays = {}

    def conv(name, a):
        arrays[name] = to_fw(fw, a)
        return arrays[name]

    results = outputs(call(op, case, conv))
    saved = {name: as_np(a).copy() for name, a in arrays.items()}
    for out in results:
        for a in arrays.values():
            assert not np.shares_memory(as_np(out), as_np(a))
        if fw == "numpy":
            out[...] = 7
        else:
            out.fill_(7)
    for name, a in arrays.items():
        np.testing.assert_array_equal(as_np(a), saved[name], err_msg=name)


@pytest.mark.parametrize("op", OPS)
def test_jax_outputs_are_new_buffers(op):
    # JAX arrays are immutable, so writing is not possible: the buffers must
    # still be distinct from every input's.
    case = make_case(np.float32, seed=12)
    arrays = {}

    def conv(name, a):
        arrays[name] = jnp.asarray(a)
        return arrays[name]

    for out in outputs(call(op, case, conv)):
        for a in arrays.values():
            assert out.unsafe_buffer_pointer() != a.unsafe_buffer_pointer()


# ------------------------------------------------ other DLPack producers
class DLPackOnly:
    """A producer with nothing but the two DLPack protocol methods."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


class DLPackWithDtype(DLPackOnly):
    @property
    def dtype(self):
        return self._array.dtype


def _check_producer(wrapper, op, wrap):
    case = make_case(np.float32, seed=13)
    want = outputs(call(op, case))
    got = outputs(call(op, case, lambda name, a: wrapper(a.copy()) if name in wrap else a))
    for g, w in zip(got, want):
        assert type(g) is np.ndarray  # another producer on the CPU: NumPy
        assert_same(op, g, w, np.float32)


@pytest.mark.parametrize("op", OPS)
def test_bare_dlpack_producer_gives_numpy(op):
    _check_producer(DLPackOnly, op, ("input", "grad_output", "boxes", "argmax"))


def test_bare_dlpack_boxes_with_numpy_features():
    _check_producer(DLPackOnly, "roi_align", ("boxes",))


@pytest.mark.parametrize("op", OPS)
def test_dlpack_producer_with_dtype_gives_numpy(op):
    _check_producer(DLPackWithDtype, op, ("input", "grad_output", "boxes", "argmax"))


# ------------------------------------------------- pinned host memory
class PinnedHost(DLPackOnly):
    """A producer of page-locked host memory (kDLCUDAHost, as JAX's
    pinned_host arrays and CUDA-pinned buffers say)."""

    def __dlpack_device__(self):
        return (3, 0)


@pytest.mark.parametrize("op", OPS)
def test_pinned_host_arrays_run_on_the_cpu(op):
    # Host memory: the CPU kernels read it in place, and the results are
    # NumPy arrays, as for any CPU producer (CuPy would refuse it).
    _check_producer(PinnedHost, op, ("input", "grad_output", "boxes", "argmax"))
    assert str(Caller(PinnedHost(np.zeros((1, 1, 2, 2), np.float32)), "input").device) \
        == "cpu"


# ---------------------------------------------------- streams and devices
def test_a_foreign_stream_reaches_cupy_by_its_handle():
    # torch's Stream has `cuda_stream` in every release (its
    # __cuda_stream__ only from PyTorch 2.10), XLA hands a bare handle:
    # either way CuPy receives a stream whose pointer is that handle.
    cupy = pytest.importorskip("cupy")
    from curoi._interop import external_stream

    class TorchStreamBefore210:  # what torch.cuda.Stream offers before 2.10
        cuda_stream = 0x7F00DEAD0000

    stream = external_stream(cupy, TorchStreamBefore210().cuda_stream, 0)
    assert isinstance(stream, cupy.cuda.Stream)
    assert stream.ptr == 0x7F00DEAD0000


def test_cupy_before_14_gets_an_external_stream():
    # CuPy before 14 has no Stream.from_external: its ExternalStream takes
    # the handle and the device.
    cupy = pytest.importorskip("cupy")
    import types

    from curoi._interop import external_stream

    class StreamBefore14:  # cupy.cuda.Stream without from_external
        pass

    old_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(
        Stream=StreamBefore14, ExternalStream=cupy.cuda.ExternalStream))
    with pytest.warns(DeprecationWarning):  # CuPy 14 deprecates the class
        stream = external_stream(old_cupy, 1234, 1)
    assert isinstance(stream, cupy.cuda.ExternalStream)
    assert (stream.ptr, stream.device_id) == (1234, 1)


def test_devices_below_the_architecture_floor_are_refused_clearly():
    from curoi import _gpu

    assert _gpu.unsupported_device_message(0, "H100", 90, (12, 9)) is None
    assert _gpu.unsupported_device_message(0, "H100", 90, (13, 0)) is None
    assert _gpu.unsupported_device_message(0, "V100", 70, (12, 4)) is None
    message = _gpu.unsupported_device_message(1, "Tesla V100", 70, (13, 0))
    assert "device 1 (Tesla V100, sm_70)" in message and "sm_75" in message
    assert "cuda12 extra" in message
    message = _gpu.unsupported_device_message(0, "Tesla P100", 60, (12, 9))
    assert "sm_70" in message and "CPU" in message
    assert _gpu.checked_archs(12) == ("sm_70", "sm_80", "sm_90")
    assert _gpu.checked_archs(13) == ("sm_75", "sm_80", "sm_90")

"""Channels-last (NHWC): data_format="NHWC" runs kernels of its own on
[N, H, W, C] features, and their results are the NCHW results transposed,
bit for bit in float32 and float64, for every op and direction, on every
thread count and with both deterministic sums (the CPU's own and the GPU's
fixed-point sum run through the CPU backend). The NCHW path is itself
checked against tests/reference.py elsewhere; here NHWC is also compared
with the reference directly.

Also: the kernels read the caller's NHWC buffer in place, bad data_format
and mismatched shapes raise errors that name them, a torch.channels_last
tensor runs the NHWC kernels and stays channels-last through autograd, and
curoi.jax's data_format works under jit, grad and vmap."""

import numpy as np
import pytest

import curoi
import reference
from curoi import _cpu, _ops

# Every kind of box a caller sends (batch index, x1, y1, x2, y2) on a map of
# H x W = 11 x 13 with N = 2 images: inside, on the edges, beyond them,
# reversed, empty, huge, unusable.
ADVERSARIAL_BOXES = [
    [0, 1.2, 0.7, 5.3, 3.9],
    [1, 0, 0, 13, 11],
    [0, -3, -2, 4, 9],
    [1, -1.4, -1.3, 0.55, 0.6],
    [0, 11.5, 9.5, 14, 12],
    [0, 5, 4, 1, 1],
    [1, 2, 1, 2, 4],
    [1, 3, 3, 3, 3],
    [0, 1e9, 1, 1e9 + 5, 3],
    [1, -1e20, -1e20, 1e20, 1e20],
    [0, 0, 0, 1e20, 3],
    [2, 1, 1, 4, 4],
    [-1, 1, 1, 4, 4],
    [np.nan, 1, 1, 4, 4],
    [0, np.nan, 1, 4, 4],
    [1, 1, np.inf, 4, 4],
]
DTYPES = [np.float32, np.float64]


def nhwc(a):
    return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view({4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_same_bits(got_nhwc, expected_nchw):
    expected = nhwc(expected_nchw)
    assert got_nhwc.shape == expected.shape
    assert got_nhwc.dtype == expected.dtype
    assert np.array_equal(bits(got_nhwc), bits(expected))


def case(dtype, seed=0, n=2, c=6, h=11, w=13, k=48, adversarial=True):
    """Features [N, C, H, W] and boxes: random ones of every kind (many
    overlaps, so that gradient pixels receive many terms), plus the
    adversarial set. C = 6 gives the NCHW CPU loops a 4-channel pass and
    single channels."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    boxes = reference.random_boxes(rng, n, h, w, 1.0, k)
    if adversarial:
        boxes = np.concatenate([boxes, np.array(ADVERSARIAL_BOXES)])
    return x, boxes.astype(dtype if dtype == np.float64 else np.float32)


@pytest.fixture(params=[1, 3], ids=lambda t: f"threads={t}")
def threads(request):
    before = curoi.get_num_threads()
    curoi.set_num_threads(request.param)
    yield request.param
    curoi.set_num_threads(before)


@pytest.fixture(params=["plain", "deterministic", "fixed-point"])
def summation(request, monkeypatch):
    """The backward's sums: the CPU's plain one, deterministic=True (on the
    CPU the same sum), and the GPU's int64 fixed-point sum run through the
    CPU backend."""
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", request.param == "fixed-point")
    return request.param != "plain"


# ------------------------------------------------------------ roi_align
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_roi_align_forward_is_nchw_transposed_bitwise(dtype, aligned,
                                                      sampling_ratio, threads):
    x, boxes = case(dtype)
    kw = dict(output_size=(3, 4), spatial_scale=1.0,
              sampling_ratio=sampling_ratio, aligned=aligned)
    expected = curoi.roi_align(x, boxes, **kw)
    got = curoi.roi_align(nhwc(x), boxes, data_format="NHWC", **kw)
    assert_same_bits(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_align_dense_sampling_is_nchw_transposed_bitwise(dtype, threads):
    # sampling_ratio 100 on a 6 x 7 map: more than 64 samples per bin side,
    # packed closer than a quarter pixel, summed per pixel in closed form.
    x, boxes = case(dtype, n=1, c=5, h=6, w=7, k=12, adversarial=False)
    boxes = np.concatenate([boxes, [[0, 0.3, 0.2, 6.1, 5.4]]]).astype(boxes.dtype)
    kw = dict(output_size=2, sampling_ratio=100, aligned=True)
    assert_same_bits(curoi.roi_align(nhwc(x), boxes, data_format="NHWC", **kw),
                     curoi.roi_align(x, boxes, **kw))
    g = np.random.default_rng(1).standard_normal(
        (len(boxes), 2, 2, x.shape[1])).astype(dtype)
    got = curoi.roi_align_backward(g, boxes, nhwc(x).shape, data_format="NHWC", **kw)
    expected = curoi.roi_align_backward(np.ascontiguousarray(g.transpose(0, 3, 1, 2)),
                                        boxes, x.shape, **kw)
    assert_same_bits(got, expected)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_roi_align_nhwc_matches_the_reference(aligned, sampling_ratio):
    x, boxes = case(np.float64, k=24, adversarial=False)
    kw = dict(output_size=(3, 4), spatial_scale=1.0,
              sampling_ratio=sampling_ratio, aligned=aligned)
    expected = reference.roi_align(x, boxes, **kw)
    got = curoi.roi_align(nhwc(x), boxes, data_format="NHWC", **kw)
    np.testing.assert_allclose(got, nhwc(expected), rtol=1e-12, atol=1e-12)
    g = np.random.default_rng(2).standard_normal(expected.shape)
    expected_grad = reference.roi_align_backward(g, boxes, x.shape, **kw)
    got_grad = curoi.roi_align_backward(nhwc(g), boxes, nhwc(x).shape,
                                        data_format="NHWC", **kw)
    np.testing.assert_allclose(got_grad, nhwc(expected_grad), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned,sampling_ratio", [(True, 2), (False, 0)])
def test_roi_align_backward_is_nchw_transposed_bitwise(dtype, aligned,
                                                       sampling_ratio, threads,
                                                       summation):
    x, boxes = case(dtype)
    kw = dict(output_size=(3, 4), spatial_scale=1.0,
              sampling_ratio=sampling_ratio, aligned=aligned,
              deterministic=summation)
    g = np.random.default_rng(3).standard_normal(
        (len(boxes), x.shape[1], 3, 4)).astype(dtype)
    expected = curoi.roi_align_backward(g, boxes, x.shape, **kw)
    got = curoi.roi_align_backward(nhwc(g), boxes, nhwc(x).shape,
                                   data_format="NHWC", **kw)
    assert_same_bits(got, expected)


# ------------------------------------------------------------- roi_pool
def pool_case(dtype, seed=0):
    """Ties, NaN, +-inf and an all -inf plane, which roi_pool handles by
    rules of its own (first maximum, first NaN, the first pixel of a bin of
    -inf)."""
    x, boxes = case(dtype, seed=seed)
    x = np.round(x * 2) / 2  # ties
    x[0, 1, 2, 3] = np.nan
    x[1, 2, 5, 5] = np.inf
    x[1, 3, 0, :4] = -np.inf
    x[0, 4] = -np.inf
    return x, boxes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("convention", ["torchvision", "mmcv"])
def test_roi_pool_forward_is_nchw_transposed_bitwise(dtype, convention, threads):
    x, boxes = pool_case(dtype)
    kw = dict(output_size=(3, 2), spatial_scale=1.0, convention=convention)
    y, argmax = curoi.roi_pool(x, boxes, return_argmax=True, **kw)
    y_nhwc, argmax_nhwc = curoi.roi_pool(nhwc(x), boxes, return_argmax=True,
                                         data_format="NHWC", **kw)
    assert_same_bits(y_nhwc, y)
    assert np.array_equal(argmax_nhwc, nhwc(argmax))
    # Without argmax the kernel takes another branch: the same maxima.
    assert_same_bits(curoi.roi_pool(nhwc(x), boxes, data_format="NHWC", **kw), y)


@pytest.mark.parametrize("convention", ["torchvision", "mmcv"])
def test_roi_pool_nhwc_matches_the_reference(convention):
    x, boxes = case(np.float64, k=24, adversarial=False)
    kw = dict(output_size=(3, 2), spatial_scale=1.0, convention=convention)
    expected, expected_argmax = reference.roi_pool(x, boxes, **kw)
    got, argmax = curoi.roi_pool(nhwc(x), boxes, return_argmax=True,
                                 data_format="NHWC", **kw)
    np.testing.assert_array_equal(got, nhwc(expected))
    np.testing.assert_array_equal(argmax, nhwc(expected_argmax))
    g = np.random.default_rng(4).standard_normal(expected.shape)
    expected_grad = reference.roi_pool_backward(g, expected_argmax, boxes, x.shape)
    got_grad = curoi.roi_pool_backward(nhwc(g), argmax, boxes, nhwc(x).shape,
                                       data_format="NHWC")
    np.testing.assert_allclose(got_grad, nhwc(expected_grad), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("convention", ["torchvision", "mmcv"])
def test_roi_pool_backward_is_nchw_transposed_bitwise(dtype, convention,
                                                      threads, summation):
    # A small map under many boxes: argmaxes collide, so pixels sum many terms.
    x, boxes = pool_case(dtype, seed=5)
    _, argmax = curoi.roi_pool(x, boxes, (3, 2), convention=convention,
                               return_argmax=True)
    g = np.random.default_rng(6).standard_normal(argmax.shape).astype(dtype)
    expected = curoi.roi_pool_backward(g, argmax, boxes, x.shape,
                                       deterministic=summation)
    got = curoi.roi_pool_backward(nhwc(g), nhwc(argmax), boxes, nhwc(x).shape,
                                  deterministic=summation, data_format="NHWC")
    assert_same_bits(got, expected)


# ----------------------------------------------------- in place, errors
def test_kernels_read_the_callers_nhwc_buffer_in_place(monkeypatch):
    # The address of the features each forward kernel reads, whether the
    # call takes the general path (_cpu.launch) or the small-call fast path
    # (_cpu.kernel, pointers as integers).
    seen = []
    launch, kernel = _cpu.launch, _cpu.kernel

    def spy_launch(family, direction, dtype, args):
        if direction == "forward":
            seen.append(args[0].ctypes.data)
        return launch(family, direction, dtype, args)

    def spy_kernel(family, direction, dtype):
        fn = kernel(family, direction, dtype)

        def call(*args):
            seen.append(args[0])
            return fn(*args)
        return call

    monkeypatch.setattr(_cpu, "launch", spy_launch)
    monkeypatch.setattr(_cpu, "kernel", spy_kernel)
    x, boxes = case(np.float32, k=4, adversarial=False)
    features = nhwc(x)
    curoi.roi_align(features, boxes, 2, data_format="NHWC")
    curoi.roi_pool(features, boxes, 2, data_format="NHWC")
    curoi.roi_align(features, boxes.astype(np.float64), 2, data_format="NHWC")  # general
    assert seen == [features.ctypes.data] * 3


@pytest.mark.parametrize("value,error", [("nhwc", ValueError), ("NDHWC", ValueError),
                                         (None, TypeError), (1, TypeError)])
def test_bad_data_format_names_it(value, error):
    x, boxes = case(np.float32, k=2, adversarial=False)
    g = np.zeros((2, 2, 2, 6), np.float32)
    calls = [
        lambda: curoi.roi_align(x, boxes, 2, data_format=value),
        lambda: curoi.roi_pool(x, boxes, 2, data_format=value),
        lambda: curoi.roi_align_backward(g, boxes, x.shape, 2, data_format=value),
        lambda: curoi.roi_pool_backward(g, g.astype(np.int64), boxes, x.shape,
                                        data_format=value),
    ]
    for call in calls:
        with pytest.raises(error, match="data_format.*'NCHW', 'NHWC'"):
            call()


def test_nhwc_backward_checks_shapes_in_its_layout():
    x, boxes = case(np.float32, k=3, adversarial=False)  # [2, 6, 11, 13]
    shape = nhwc(x).shape  # (2, 11, 13, 6)
    # An NCHW grad_output for an NHWC call: named, with the expected shape.
    g_nchw = np.zeros((3, 6, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"grad_output must have shape "
                       r"\(K, PH, PW, C\) = \(3, 2, 2, 6\)"):
        curoi.roi_align_backward(g_nchw, boxes, shape, 2, data_format="NHWC")
    with pytest.raises(ValueError, match=r"\(K, PH, PW, C\) with K = 3 boxes and C = 6"):
        curoi.roi_pool_backward(g_nchw, g_nchw.astype(np.int64), boxes, shape,
                                data_format="NHWC")
    with pytest.raises(TypeError, match=r"input_shape must be a sequence of 4 ints "
                       r"\(N, H, W, C\)"):
        curoi.roi_align_backward(np.zeros((3, 2, 2, 6), np.float32), boxes,
                                 (2, 11, 13), 2, data_format="NHWC")
    with pytest.raises(ValueError, match=r"input must be a 4-D array \[N, H, W, C\]"):
        curoi.roi_align(x[0], boxes, 2, data_format="NHWC")


# ------------------------------------------------- the GPU loops' index
_INDEX_HARNESS = r"""
#include "curoi_common.cuh"

extern "C" void locate(const int64_t* index, int64_t count, int64_t total,
                       int64_t channels, int64_t pooled_h, int64_t pooled_w,
                       int64_t* out) {
  for (int64_t i = 0; i < count; ++i) {
    const CuroiOutputIndex at = curoi_output_index_nhwc(
        index[i], total, channels, pooled_h, pooled_w);
    out[4 * i] = at.k;
    out[4 * i + 1] = at.ph;
    out[4 * i + 2] = at.pw;
    out[4 * i + 3] = at.c;
  }
}
"""


@pytest.mark.parametrize("shape", [
    (3, 7, 7, 5),                  # the 32-bit branch
    (512, 7, 7, 256),              # a detection batch
    (4, 31, 33, 2**20),            # just under 2^32 elements
    (3, 33, 65, 2**20),            # past 2^32 elements: the 64-bit branch
    (1, 2**31 - 1, 2**31 - 1, 1),  # the largest output_size, past 2^61
])
def test_nhwc_output_index_matches_integer_arithmetic(tmp_path, shape):
    # The GPU loops' position of an element of [K, PH, PW, C], compiled here
    # by the host compiler, against Python's integers.
    import ctypes
    import subprocess
    from curoi import _cpu, _sources
    argv = _cpu.compiler_command()
    if argv is None:
        pytest.skip("no C++ compiler")
    (tmp_path / "harness.cpp").write_text(_INDEX_HARNESS)
    done = subprocess.run(
        argv + ["-std=c++17", "-O2", "-fPIC", "-shared", "-I", str(_sources.kernel_dir()),
                str(tmp_path / "harness.cpp"), "-o", str(tmp_path / "harness.so")],
        capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    locate = ctypes.CDLL(str(tmp_path / "harness.so")).locate
    locate.restype = None
    locate.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_void_p]
    k, ph, pw, c = shape
    total = k * ph * pw * c
    rng = np.random.default_rng(0)
    index = np.concatenate([np.arange(min(total, 300)),
                            total - 1 - np.arange(min(total, 300)),
                            rng.integers(0, total, 500, dtype=np.int64),
                            [2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1]])
    index = np.ascontiguousarray(index[(index >= 0) & (index < total)], np.int64)
    out = np.empty((len(index), 4), np.int64)
    locate(index.ctypes.data, len(index), total, c, ph, pw, out.ctypes.data)
    expected = [(i // (ph * pw * c), i // (pw * c) % ph, i // c % pw, i % c)
                for i in map(int, index)]
    np.testing.assert_array_equal(out, np.array(expected, np.int64))


# ---------------------------------------------------------------- torch
def _torch_case(dtype, k=12):
    torch = pytest.importorskip("torch")
    x, boxes = case(np.float64, k=k)
    return (torch.tensor(x, dtype=dtype),
            torch.tensor(boxes, dtype=dtype if dtype == torch.float64 else torch.float32))


def _torch_bits(t):
    return bits(t.detach().contiguous().numpy())


@pytest.fixture(params=[False, True], ids=["plain", "deterministic"])
def torch_deterministic(request):
    torch = pytest.importorskip("torch")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param)
    yield request.param
    torch.use_deterministic_algorithms(before)


def _head(op):
    import curoi.torch as ct
    if op == "roi_align":
        return lambda x, rois: ct.roi_align(x, rois, (3, 4), 1.0, 0, True)
    return lambda x, rois: ct.roi_pool(x, rois, (3, 4), 1.0)


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_torch_channels_last_equals_contiguous_and_stays_channels_last(
        dtype_name, op, torch_deterministic):
    torch = pytest.importorskip("torch")
    x, rois = _torch_case(getattr(torch, dtype_name))
    head = _head(op)

    def run(features):
        features = features.detach().requires_grad_(True)
        y = head(features, rois)
        weights = torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape).sin()
        (y * weights).sum().backward()
        return y, features.grad

    y, grad = run(x)
    assert y.is_contiguous() and grad.is_contiguous()  # as before
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous()
    y_cl, grad_cl = run(x_cl)
    for got, expected in ((y_cl, y), (grad_cl, grad)):
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert not got.is_contiguous()
        assert np.array_equal(_torch_bits(got), _torch_bits(expected))


def test_torch_channels_last_input_is_read_in_place(monkeypatch):
    torch = pytest.importorskip("torch")
    import curoi.torch as ct
    seen = []
    original = _ops.roi_align_forward
    monkeypatch.setattr(_ops, "roi_align_forward", lambda x, *a, **k: (
        seen.append((x.ctypes.data, x.shape)), original(x, *a, **k))[1])
    x, rois = _torch_case(torch.float32, k=4)
    x = x.contiguous(memory_format=torch.channels_last)
    ct.roi_align(x, rois, 2, 1.0, 2, True)
    n, c, h, w = x.shape
    assert seen == [(x.data_ptr(), (n, h, w, c))]


def test_torch_opcheck_channels_last():
    torch = pytest.importorskip("torch")
    import curoi.torch  # noqa: F401  (registers the ops)
    from torch.library import opcheck
    x, rois = _torch_case(torch.float64, k=5)
    x = x[:, :3, :7, :9].contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    ops = torch.ops.curoi
    opcheck(ops.roi_align.default, (x, rois, 0.5, 2, 3, 2, True))
    opcheck(ops.roi_pool.default, (x, rois, 0.5, 2, 3, "torchvision"))
    grad = torch.randn(rois.shape[0], c, 2, 3, dtype=x.dtype).contiguous(
        memory_format=torch.channels_last)
    opcheck(ops.roi_align_backward.default,
            (grad, rois, 0.5, 2, 3, n, c, h, w, 2, True, False, True))
    _, argmax = ops.roi_pool.default(x, rois, 0.5, 2, 3, "torchvision")
    assert argmax.is_contiguous(memory_format=torch.channels_last)
    opcheck(ops.roi_pool_backward.default,
            (grad, rois, argmax, n, c, h, w, True, True))


def test_torch_compile_fullgraph_channels_last_head():
    torch = pytest.importorskip("torch")
    import curoi.torch as ct

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.pool = ct.RoIAlign((2, 2), 0.5, 2, aligned=True)
            self.fc = torch.nn.Linear(16, 5)

        def forward(self, x, boxes):
            features = torch.relu(self.conv(x))
            pooled = self.pool(features, boxes)
            return self.fc(pooled.flatten(1)), pooled

    torch.manual_seed(0)
    model = Head().to(memory_format=torch.channels_last).double()
    x = torch.randn(2, 3, 12, 14, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    boxes = torch.tensor([[0, 1, 2, 15, 18], [1, 0, 0, 27, 23], [1, 4, 3, 9, 8]],
                         dtype=torch.float64)

    def run(fn):
        model.zero_grad()
        out, pooled = fn(x, boxes)
        out.sum().backward()
        return out.detach(), pooled, model.conv.weight.grad.clone()

    eager = run(model)
    torch._dynamo.reset()
    compiled = run(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    assert eager[1].is_contiguous(memory_format=torch.channels_last)
    assert compiled[1].is_contiguous(memory_format=torch.channels_last)
    for got, expected in zip(compiled, eager):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ JAX
def _jax_case(k=10):
    jax = pytest.importorskip("jax")
    x, boxes = case(np.float32, k=k)
    return jax, x, boxes


@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_jax_nhwc_under_jit_and_grad_is_nchw_transposed(op, deterministic):
    jax, x, boxes = _jax_case()
    import jax.numpy as jnp
    import curoi.jax as cj
    kw = dict(deterministic=deterministic)
    if op == "roi_align":
        kw.update(spatial_scale=1.0, sampling_ratio=2, aligned=True)
    fn = getattr(cj, op)
    weights = jnp.sin(jnp.arange(len(boxes) * 6 * 12, dtype=jnp.float32))

    def loss(features, data_format):
        y = fn(features, boxes, (3, 4), data_format=data_format, **kw)
        if data_format == "NHWC":
            y = y.transpose(0, 3, 1, 2)
        return jnp.sum(y.reshape(-1) * weights), y

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    expected_grad, expected = grad(jnp.asarray(x), "NCHW")
    got_grad, got = grad(jnp.asarray(nhwc(x)), "NHWC")
    assert np.array_equal(bits(np.asarray(got)), bits(np.asarray(expected)))
    assert got_grad.shape == nhwc(x).shape
    assert_same_bits(np.asarray(got_grad), np.asarray(expected_grad))
    # The gradient is the kernels' own backward: against the NCHW functional
    # backward, itself checked against the reference elsewhere.
    g = np.asarray(weights).reshape(len(boxes), 6, 3, 4)
    if op == "roi_align":
        direct = curoi.roi_align_backward(g, boxes, x.shape, (3, 4), 1.0, 2, True)
        np.testing.assert_array_equal(np.asarray(got_grad), nhwc(direct))


def test_jax_nhwc_vmap_and_eval_shape():
    jax, x, boxes = _jax_case(k=6)
    import jax.numpy as jnp
    import curoi.jax as cj
    batch = np.stack([x, x[::-1] * 2])  # [B, N, C, H, W]
    batch_nhwc = np.ascontiguousarray(batch.transpose(0, 1, 3, 4, 2))
    kw = dict(output_size=2, spatial_scale=1.0, sampling_ratio=2, aligned=True)

    def align(features, data_format):
        return cj.roi_align(features, boxes, data_format=data_format, **kw)

    def align_loss(features, data_format):
        return jnp.sum(jnp.sin(align(features, data_format)))

    def pool(features, data_format):
        return cj.roi_pool(features, boxes, 2, data_format=data_format)

    for fn in (align, pool):
        expected = jax.vmap(fn, in_axes=(0, None))(jnp.asarray(batch), "NCHW")
        got = jax.vmap(fn, in_axes=(0, None))(jnp.asarray(batch_nhwc), "NHWC")
        assert got.shape == (2, len(boxes), 2, 2, 6)
        assert np.array_equal(np.asarray(got),
                              np.asarray(expected).transpose(0, 1, 3, 4, 2))
    expected = jax.vmap(jax.grad(align_loss), in_axes=(0, None))(jnp.asarray(batch), "NCHW")
    got = jax.vmap(jax.grad(align_loss), in_axes=(0, None))(jnp.asarray(batch_nhwc), "NHWC")
    assert np.array_equal(np.asarray(got), np.asarray(expected).transpose(0, 1, 3, 4, 2))
    shape = jax.eval_shape(lambda f: align(f, "NHWC"),
                           jax.ShapeDtypeStruct(nhwc(x).shape, jnp.float32))
    assert shape.shape == (len(boxes), 2, 2, 6)
    with pytest.raises(ValueError, match="data_format"):
        cj.roi_pool(jnp.asarray(x), boxes, 2, data_format="channels_last")

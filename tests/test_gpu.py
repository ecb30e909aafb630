"""The GPU suite: runs wherever a CUDA device is present, skips cleanly
otherwise (no CuPy, no driver, or no device).

The reference for every GPU result is the CPU backend on the same input. The
CPU backend runs the same kernel source through the host compiler and is
itself checked against an independent NumPy reference and onnxruntime (see
the other test files), so agreement here means the NVRTC build, the launch
code (argument types, grid), the DLPack plumbing and the stream handling are
right.

Tolerances: float32 and float64 differ from the CPU only by summation order
(the GPU adds each sample's four weighted taps, with atomic adds in the
backward; the CPU sums separable per-row and per-column weights) and by the
GPU compiler fusing multiply-adds. Half precision is
computed in float32 on both sides from the very same half values and rounded
once at the end, so results agree to about one unit in the last place of the
half type. Maxima (roi_pool) and argmax are selections, not sums: exact.

Spatial scales are powers of two so that box corners scale exactly on both
compilers (a fused multiply-add cannot move a corner across a rounding or
ceil() boundary), and box coordinates are random reals so that no sample
sits exactly on the [-1, H] cut-off of the bilinear rule.
"""

import functools
import warnings

import numpy as np
import pytest

pytestmark = pytest.mark.cuda
cupy = pytest.importorskip("cupy")


def _device_count():
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no driver or no device: CUDARuntimeError, and others
        return 0


DEVICES = _device_count()
if DEVICES == 0:
    pytest.skip("no CUDA device", allow_module_level=True)

import curoi  # noqa: E402

DTYPES = ("float32", "float64", "float16", "bfloat16")
CONVENTIONS = ("torchvision", "mmcv")

# (rtol, atol) per dtype, for forward and backward (backward sums more terms).
_TOL = {
    "float32": ((1e-5, 1e-5), (1e-5, 1e-4)),
    "float64": ((1e-12, 1e-12), (1e-12, 1e-11)),
    # One unit in the last place: 2**-10 (float16) and 2**-7 (bfloat16)
    # relative, with room for a value rounding the other way.
    "float16": ((2e-3, 2e-3), (2e-3, 4e-3)),
    "bfloat16": ((1.6e-2, 1.6e-2), (1.6e-2, 3.2e-2)),
}

SHAPE = (2, 4, 13, 17)   # N, C, H, W
OUT = (3, 4)             # PH, PW
SCALE = 0.5              # a power of two: see the module docstring


# --------------------------------------------------------------- helpers
def np_dtype(name):
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def make_rois(rng, n, h, w, scale, k=48, dtype=np.float32):
    """[K, 5] boxes in image coordinates: inside the map, partly outside,
    wholly outside, degenerate (zero width or height), reversed corners."""
    img = np.array([w, h, w, h]) / scale
    inside = rng.uniform(0, 1, (k, 4)) * img
    inside = np.concatenate([np.minimum(inside[:, :2], inside[:, 2:]),
                             np.maximum(inside[:, :2], inside[:, 2:])], axis=1)
    spread = rng.uniform(-0.5, 1.5, (k, 4)) * img
    spread = np.concatenate([np.minimum(spread[:, :2], spread[:, 2:]),
                             np.maximum(spread[:, :2], spread[:, 2:])], axis=1)
    outside = inside[: k // 4] + [2 * img[0], 0, 2 * img[0], 0]
    degenerate = inside[: k // 4].copy()
    degenerate[:, 2] = degenerate[:, 0]
    reversed_ = inside[: k // 4][:, [2, 3, 0, 1]]
    corners = np.concatenate([inside, spread, outside, degenerate, reversed_])
    batch = rng.integers(0, n, (len(corners), 1))
    return np.concatenate([batch, corners], axis=1).astype(dtype)


def make_case(dtype_name, seed, shape=SHAPE, out=OUT, scale=SCALE):
    """Features, boxes and output gradients as NumPy arrays (features and
    gradients in dtype_name: NumPy float16, ml_dtypes bfloat16)."""
    rng = np.random.default_rng(seed)
    dtype = np_dtype(dtype_name)
    n, c, h, w = shape
    x = rng.standard_normal(shape).astype(dtype)
    box_dtype = np.float64 if dtype_name == "float64" else np.float32
    rois = make_rois(rng, n, h, w, scale, dtype=box_dtype)
    gy = rng.standard_normal((len(rois), c) + tuple(out)).astype(dtype)
    return x, rois, gy


def to_f64(a):
    """A NumPy float64 copy of a NumPy, CuPy or torch result."""
    if isinstance(a, cupy.ndarray):
        a = cupy.asnumpy(a)
    elif type(a).__module__.startswith("torch"):
        a = a.detach()
        if a.is_floating_point():
            a = a.float() if a.dtype != _torch().float64 else a
        a = a.cpu().numpy()
    return np.asarray(a).astype(np.float64)


def assert_close(got, expected, dtype_name, backward=False, what=""):
    rtol, atol = _TOL[dtype_name][1 if backward else 0]
    np.testing.assert_allclose(to_f64(got), to_f64(expected), rtol=rtol,
                               atol=atol, err_msg=what)


def assert_cupy_result(y, like, dtype=None):
    """A CuPy array on the device of ``like``, of ``like``'s dtype."""
    assert isinstance(y, cupy.ndarray), type(y)
    assert y.device.id == like.device.id
    assert y.dtype == (like.dtype if dtype is None else dtype), y.dtype


def _torch():
    return pytest.importorskip("torch")


def torch_cuda():
    torch = _torch()
    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    return torch


def to_torch(a, device):
    """NumPy (including ml_dtypes bfloat16) to a torch tensor of the same
    dtype on ``device``; bfloat16 goes through float32, which is exact."""
    torch = _torch()
    name = a.dtype.name
    if name == "bfloat16":
        return torch.from_numpy(a.astype(np.float32)).to(device, torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


# ------------------------------------------------- GPU against the CPU
@pytest.mark.parametrize("ratio", [0, 2])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_align_forward_matches_cpu(dtype, aligned, ratio):
    x, rois, _ = make_case(dtype, [1, DTYPES.index(dtype), int(aligned), ratio])
    expected = curoi.roi_align(x, rois, OUT, SCALE, ratio, aligned)
    assert np.count_nonzero(to_f64(expected)) > expected.size // 3  # not vacuous
    xg = cupy.asarray(x)
    got = curoi.roi_align(xg, cupy.asarray(rois), OUT, SCALE, ratio, aligned)
    assert_cupy_result(got, xg)
    assert got.shape == expected.shape == (len(rois), SHAPE[1]) + OUT
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("ratio", [0, 2])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_align_backward_matches_cpu(dtype, aligned, ratio):
    x, rois, gy = make_case(dtype, [2, DTYPES.index(dtype), int(aligned), ratio])
    expected = curoi.roi_align_backward(gy, rois, x.shape, OUT, SCALE, ratio,
                                        aligned)
    assert np.count_nonzero(to_f64(expected)) > expected.size // 3
    gg = cupy.asarray(gy)
    got = curoi.roi_align_backward(gg, cupy.asarray(rois), x.shape, OUT, SCALE,
                                   ratio, aligned)
    assert_cupy_result(got, gg)
    assert got.shape == x.shape
    assert_close(got, expected, dtype, backward=True)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_pool_forward_and_argmax_match_cpu(dtype, convention):
    x, rois, _ = make_case(dtype, [3, DTYPES.index(dtype), int(convention == "mmcv")])
    expected, expected_argmax = curoi.roi_pool(
        x, rois, OUT, SCALE, convention=convention, return_argmax=True)
    # Some empty bins (boxes off the map) and many real ones.
    assert (expected_argmax == -1).any() and (expected_argmax >= 0).mean() > 0.3
    xg = cupy.asarray(x)
    got, argmax = curoi.roi_pool(xg, cupy.asarray(rois), OUT, SCALE,
                                 convention=convention, return_argmax=True)
    assert_cupy_result(got, xg)
    assert_cupy_result(argmax, xg, dtype=np.int64)
    # A maximum is one of the (same) input values: exact, in every dtype;
    # ties (frequent in half precision) go to the first in row-major order
    # on both backends.
    np.testing.assert_array_equal(to_f64(got), to_f64(expected))
    np.testing.assert_array_equal(cupy.asnumpy(argmax), expected_argmax)


# ------------------------------------------------ deterministic backward
def _launch_configurations(monkeypatch):
    """Run the body under the default grid and under a tiny one (3 blocks of
    64 threads: each thread loops over many elements, in another order)."""
    from curoi import _gpu

    yield "default"
    monkeypatch.setattr(_gpu, "_THREADS_PER_BLOCK", 64)
    monkeypatch.setattr(_gpu, "_MAX_BLOCKS", 3)
    yield "3 blocks of 64"


def _bits(a):
    a = cupy.asnumpy(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


@pytest.mark.parametrize("family", ["roi_align", "roi_pool"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_backward_is_bitwise_stable_across_launches(
        dtype, family, monkeypatch):
    # Many boxes on a small map: each pixel receives hundreds of terms, whose
    # atomic float order varies; the fixed-point sum must not.
    x, rois, gy = make_case(dtype, [9, DTYPES.index(dtype)], shape=(2, 4, 6, 7))
    rois = np.concatenate([rois] * 8)
    gy = np.concatenate([gy] * 8)
    if family == "roi_align":
        expected = curoi.roi_align_backward(gy, rois, x.shape, OUT, SCALE, 2, True,
                                            deterministic=True)

        def run():
            return curoi.roi_align_backward(
                cupy.asarray(gy), cupy.asarray(rois), x.shape, OUT, SCALE, 2,
                True, deterministic=True)
    else:
        _, argmax = curoi.roi_pool(x, rois, OUT, SCALE, return_argmax=True)
        expected = curoi.roi_pool_backward(gy, argmax, rois, x.shape,
                                           deterministic=True)

        def run():
            return curoi.roi_pool_backward(
                cupy.asarray(gy), cupy.asarray(argmax), cupy.asarray(rois),
                x.shape, deterministic=True)
    results = []
    for _ in _launch_configurations(monkeypatch):
        results += [run(), run()]
    first = _bits(results[0])
    for other in results[1:]:
        np.testing.assert_array_equal(_bits(other), first)
    assert_close(results[0], expected, dtype, backward=True)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_pool_backward_matches_cpu(dtype, convention):
    x, rois, gy = make_case(dtype, [4, DTYPES.index(dtype), int(convention == "mmcv")])
    _, argmax = curoi.roi_pool(x, rois, OUT, SCALE, convention=convention,
                               return_argmax=True)
    expected = curoi.roi_pool_backward(gy, argmax, rois, x.shape)
    assert np.count_nonzero(to_f64(expected)) > 0
    gg = cupy.asarray(gy)
    got = curoi.roi_pool_backward(gg, cupy.asarray(argmax), cupy.asarray(rois),
                                  x.shape)
    assert_cupy_result(got, gg)
    assert got.shape == x.shape
    assert_close(got, expected, dtype, backward=True)


def test_list_of_boxes_on_gpu():
    # Per-image [L, 4] CuPy arrays mean the same as [K, 5] with batch indices.
    x, rois, _ = make_case("float32", 5)
    per_image = [cupy.asarray(rois[rois[:, 0] == i, 1:]) for i in range(SHAPE[0])]
    ordered = np.concatenate([rois[rois[:, 0] == i] for i in range(SHAPE[0])])
    expected = curoi.roi_align(x, ordered, OUT, SCALE, 2, True)
    got = curoi.roi_align(cupy.asarray(x), per_image, OUT, SCALE, 2, True)
    assert_close(got, expected, "float32")


def test_non_contiguous_cupy_input():
    # The kernels ignore strides; curoi must make a strided view contiguous.
    x, rois, _ = make_case("float32", 6)
    strided = cupy.asarray(np.ascontiguousarray(x.transpose(0, 1, 3, 2)))
    strided = strided.transpose(0, 1, 3, 2)
    assert not strided.flags.c_contiguous
    got = curoi.roi_align(strided, cupy.asarray(rois), OUT, SCALE, 2, False)
    assert_close(got, curoi.roi_align(x, rois, OUT, SCALE, 2, False), "float32")


def test_no_boxes_on_gpu():
    xg = cupy.asarray(make_case("float32", 7)[0])
    none = cupy.zeros((0, 5), dtype=cupy.float32)
    y = curoi.roi_align(xg, none, OUT, SCALE)
    assert_cupy_result(y, xg)
    assert y.shape == (0, SHAPE[1]) + OUT
    y, argmax = curoi.roi_pool(xg, none, OUT, SCALE, return_argmax=True)
    assert y.shape == argmax.shape == (0, SHAPE[1]) + OUT
    assert_cupy_result(argmax, xg, dtype=np.int64)


def test_boxes_on_another_device_are_an_error():
    x, rois, _ = make_case("float32", 8)
    with pytest.raises(ValueError, match="boxes"):
        curoi.roi_align(cupy.asarray(x), rois, OUT, SCALE)  # NumPy boxes


def test_grid_stride_loop_covers_every_element():
    # More outputs than one launch has threads: the tail is reached only on
    # a later trip round the grid-stride loop.
    from curoi import _gpu

    threads = getattr(_gpu, "_MAX_BLOCKS", 65536) * getattr(
        _gpu, "_THREADS_PER_BLOCK", 256)
    c, out = 64, (8, 8)
    per_box = c * out[0] * out[1]
    k = threads // per_box + 64
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, c, 12, 12)).astype(np.float32)
    # Two random points per box, sorted per coordinate: (x1, y1), (x2, y2).
    corners = np.sort(rng.uniform(0, 12, (k, 2, 2)), axis=1).reshape(k, 4)
    rois = np.concatenate([np.zeros((k, 1)), corners], axis=1).astype(np.float32)
    assert k * per_box > threads
    xg, rg = cupy.asarray(x), cupy.asarray(rois)
    tail = slice(k - 64, k)

    y = curoi.roi_align(xg, rg, out, 1.0, 2, True)
    expected = curoi.roi_align(x, rois[tail], out, 1.0, 2, True)
    assert_close(y[tail], expected, "float32")
    assert_close(y[:4], curoi.roi_align(x, rois[:4], out, 1.0, 2, True), "float32")

    y, argmax = curoi.roi_pool(xg, rg, out, 1.0, return_argmax=True)
    expected, expected_argmax = curoi.roi_pool(x, rois[tail], out, 1.0,
                                               return_argmax=True)
    np.testing.assert_array_equal(cupy.asnumpy(y[tail]), expected)
    np.testing.assert_array_equal(cupy.asnumpy(argmax[tail]), expected_argmax)

    # Backward: gradient only on the tail boxes, so the CPU can compute the
    # expected result from those boxes alone.
    gy = np.zeros((k, c) + out, np.float32)
    gy[tail] = rng.standard_normal((64, c) + out)
    got = curoi.roi_align_backward(cupy.asarray(gy), rg, x.shape, out, 1.0, 2, True)
    expected = curoi.roi_align_backward(gy[tail], rois[tail], x.shape, out, 1.0,
                                        2, True)
    assert np.count_nonzero(expected) > 0
    assert_close(got, expected, "float32", backward=True)


# ------------------------------------------------------- invalid boxes
_BAD_BATCH = [-1.0, 2.0, 100.0, np.nan, np.inf, -np.inf, 1e30]


def _invalid_rois(dtype=np.float32):
    """N = 2: boxes whose batch index is outside [0, 2) or not finite, one
    with a NaN corner, and one good box last."""
    rows = [[b, 1.0, 2.0, 20.0, 18.0] for b in _BAD_BATCH]
    rows.append([0.0, np.nan, 2.0, 20.0, 18.0])
    rows.append([1.0, 1.0, 2.0, 20.0, 18.0])  # valid
    return np.array(rows, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_invalid_batch_indices_give_zeros(dtype):
    x = make_case(dtype, 10)[0]
    rois = _invalid_rois()
    bad = slice(0, len(rois) - 1)
    xg, rg = cupy.asarray(x), cupy.asarray(rois)

    y = to_f64(curoi.roi_align(xg, rg, OUT, SCALE, 2, True))
    assert not np.isnan(y).any()
    np.testing.assert_array_equal(y[bad], 0)
    assert np.count_nonzero(y[-1]) > 0
    assert_close(y[-1:], curoi.roi_align(x, rois[-1:], OUT, SCALE, 2, True), dtype)

    for convention in CONVENTIONS:
        y, argmax = curoi.roi_pool(xg, rg, OUT, SCALE, convention=convention,
                                   return_argmax=True)
        y, argmax = to_f64(y), cupy.asnumpy(argmax)
        np.testing.assert_array_equal(y[bad], 0)
        np.testing.assert_array_equal(argmax[bad], -1)
        assert (argmax[-1] >= 0).all()

    # Backward: gradient only on the invalid boxes, so nothing may arrive.
    gy = np.ones((len(rois), SHAPE[1]) + OUT, dtype=np_dtype(dtype))
    gy[-1] = 0
    gx = curoi.roi_align_backward(cupy.asarray(gy), rg, x.shape, OUT, SCALE, 2, True)
    np.testing.assert_array_equal(to_f64(gx), 0)
    # roi_pool_backward with a forged argmax that points into the plane:
    # the box's batch index alone must stop the gradient.
    forged = cupy.zeros(gy.shape, dtype=cupy.int64)
    gx = curoi.roi_pool_backward(cupy.asarray(gy), forged, rg, x.shape)
    np.testing.assert_array_equal(to_f64(gx), 0)
    cupy.cuda.Device().synchronize()  # a stray write would surface here


def test_argmax_out_of_the_plane_passes_no_gradient():
    # argmax comes from the caller: entries outside [0, H*W) are ignored, on
    # the GPU as on the CPU, and nothing is written out of bounds.
    x, _, _ = make_case("float32", 11)
    n, c, h, w = x.shape
    rois = np.array([[0, 1, 1, 20, 20], [1, 0, 0, 8, 8]], np.float32)
    argmax = np.array([h * w, -5, 2**40, 3, h * w - 1, -1], np.int64)
    argmax = np.resize(argmax, (2, c) + OUT)
    gy = np.random.default_rng(11).standard_normal((2, c) + OUT).astype(np.float32)
    expected = curoi.roi_pool_backward(gy, argmax, rois, x.shape)
    got = curoi.roi_pool_backward(cupy.asarray(gy), cupy.asarray(argmax),
                                  cupy.asarray(rois), x.shape)
    assert np.count_nonzero(expected) > 0
    assert_close(got, expected, "float32", backward=True)
    cupy.cuda.Device().synchronize()


# ------------------------------------------------------------- streams
_SPIN_SOURCE = r"""
extern "C" __global__ void curoi_test_spin(long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) { }
}
"""
# About half a second at the clock rates of current GPUs: far longer than
# curoi takes to enqueue its work, so the stream is still busy when it returns.
_SPIN_CYCLES = 1_000_000_000


@functools.lru_cache(maxsize=None)
def _spin_kernel():
    return cupy.RawKernel(_SPIN_SOURCE, "curoi_test_spin")


def spin():
    """Keep CuPy's current stream busy for a while (one thread, no memory)."""
    _spin_kernel()((1,), (1,), (np.int64(_SPIN_CYCLES),))


def all_ops(x, rois, gy_align, gy_pool, shape):
    """All four ops, the pool backward fed by the pool forward's argmax."""
    y_align = curoi.roi_align(x, rois, OUT, SCALE, 2, True)
    g_align = curoi.roi_align_backward(gy_align, rois, shape, OUT, SCALE, 2, True)
    y_pool, argmax = curoi.roi_pool(x, rois, OUT, SCALE, return_argmax=True)
    g_pool = curoi.roi_pool_backward(gy_pool, argmax, rois, shape)
    return y_align, g_align, y_pool, argmax, g_pool


def _stream_case():
    x, rois, gy_align = make_case("float32", 12)
    gy_pool = np.random.default_rng(13).standard_normal(gy_align.shape)
    gy_pool = gy_pool.astype(np.float32)
    expected = all_ops(x, rois, gy_align, gy_pool, x.shape)
    return (x, rois, gy_align, gy_pool), expected


def _check_all(got, expected):
    names = ("roi_align", "roi_align_backward", "roi_pool", "argmax",
             "roi_pool_backward")
    for name, g, e in zip(names, got, expected):
        backward = name.endswith("backward")
        assert_close(g, e, "float32", backward=backward, what=name)
        assert np.count_nonzero(to_f64(e)) > 0, name


def test_cupy_current_stream():
    """Work runs on CuPy's current stream, in order with what came before.

    The inputs are written on a non-blocking stream behind a long-running
    kernel. If curoi launched anywhere else (the null stream does not wait
    for a non-blocking one) it would read the zeros that were there before,
    and the results would be wrong."""
    (x, rois, ga, gp), expected = _stream_case()
    src = [cupy.asarray(a) for a in (x, ga, gp)]
    rg = cupy.asarray(rois)
    all_ops(src[0], rg, src[1], src[2], x.shape)  # compile everything first
    dst = [cupy.zeros_like(a) for a in src]
    for d, s in zip(dst, src):  # warm the copy kernel, then clear again
        d[...] = s
        d.fill(0)
    _spin_kernel().compile()
    cupy.cuda.Device().synchronize()

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        assert cupy.cuda.get_current_stream().ptr == stream.ptr
        spin()
        for d, s in zip(dst, src):
            d[...] = s  # device-to-device, on `stream`, after the spin
        got = all_ops(dst[0], rg, dst[1], dst[2], x.shape)
        busy_on_return = not stream.done
    stream.synchronize()
    for y in got:
        assert_cupy_result(y, dst[0], dtype=y.dtype)
    _check_all(got, expected)
    # curoi returned while the stream was still spinning: it did not wait
    # for the device (the design forbids synchronising to be safe).
    assert busy_on_return


def _cupy_view_of_torch_stream(stream):
    if hasattr(cupy.cuda.Stream, "from_external") and hasattr(stream, "__cuda_stream__"):
        return cupy.cuda.Stream.from_external(stream)
    return cupy.cuda.ExternalStream(stream.cuda_stream, stream.device.index)


def test_torch_current_stream():
    """torch CUDA tensors run on torch's current stream, not CuPy's.

    As above, the inputs are written on a torch side stream behind a
    long-running kernel; CuPy's own current stream stays the null stream
    throughout, so launching there would read stale zeros."""
    torch = torch_cuda()
    device = torch.device("cuda", 0)
    (x, rois, ga, gp), expected = _stream_case()
    src = [to_torch(a, device) for a in (x, ga, gp)]
    rt = to_torch(rois, device)
    all_ops(src[0], rt, src[1], src[2], x.shape)  # compile everything first
    dst = [torch.zeros_like(a) for a in src]
    _spin_kernel().compile()
    torch.cuda.synchronize(device)

    side = torch.cuda.Stream(device=device)
    with torch.cuda.stream(side):
        with _cupy_view_of_torch_stream(side):
            spin()
        assert cupy.cuda.get_current_stream().ptr != side.cuda_stream
        for d, s in zip(dst, src):
            d.copy_(s)  # on the side stream, after the spin
        got = all_ops(dst[0], rt, dst[1], dst[2], x.shape)
        busy_on_return = not side.query()
    side.synchronize()
    for y in got:
        assert isinstance(y, torch.Tensor) and y.device == device
    _check_all(got, expected)
    assert busy_on_return


def test_torch_calls_raise_no_warnings():
    # Every call on a CUDA tensor goes through the stream bridge; it must not
    # emit warnings (CuPy 14 deprecates cupy.cuda.ExternalStream in favour of
    # cupy.cuda.Stream.from_external).
    torch = torch_cuda()
    x, rois, _ = make_case("float32", 14)
    xt, rt = to_torch(x, "cuda"), to_torch(rois, "cuda")
    curoi.roi_align(xt, rt, OUT, SCALE)  # first call compiles
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        curoi.roi_align(xt, rt, OUT, SCALE)
        torch.cuda.synchronize()
    assert not caught, [str(w.message) for w in caught]


# ---------------------------------------------------------------- torch
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_cuda_in_torch_cuda_out(dtype):
    torch = torch_cuda()
    device = torch.device("cuda", 0)
    x, rois, gy = make_case(dtype, [15, DTYPES.index(dtype)])
    xt, rt, gt = to_torch(x, device), to_torch(rois, device), to_torch(gy, device)
    tdtype = getattr(torch, dtype)  # torch names its dtypes alike
    assert xt.dtype == tdtype

    # Features that require grad are accepted (autograd comes later).
    y = curoi.roi_align(xt.clone().requires_grad_(True), rt, OUT, SCALE, 2, True)
    assert isinstance(y, torch.Tensor) and y.device == device and y.dtype == tdtype
    assert_close(y, curoi.roi_align(x, rois, OUT, SCALE, 2, True), dtype)

    g = curoi.roi_align_backward(gt, rt, x.shape, OUT, SCALE, 2, True)
    assert isinstance(g, torch.Tensor) and g.device == device and g.dtype == tdtype
    assert_close(g, curoi.roi_align_backward(gy, rois, x.shape, OUT, SCALE, 2, True),
                 dtype, backward=True)

    for convention in CONVENTIONS:
        y, argmax = curoi.roi_pool(xt, rt, OUT, SCALE, convention=convention,
                                   return_argmax=True)
        e, e_argmax = curoi.roi_pool(x, rois, OUT, SCALE, convention=convention,
                                     return_argmax=True)
        assert y.device == argmax.device == device
        assert y.dtype == tdtype and argmax.dtype == torch.int64
        np.testing.assert_array_equal(to_f64(y), to_f64(e))
        np.testing.assert_array_equal(argmax.cpu().numpy(), e_argmax)

        g = curoi.roi_pool_backward(gt, argmax, rt, x.shape)
        assert isinstance(g, torch.Tensor) and g.device == device and g.dtype == tdtype
        assert_close(g, curoi.roi_pool_backward(gy, e_argmax, rois, x.shape),
                     dtype, backward=True)


# --------------------------------------------------------- multi-device
def _on_device_1(arrays):
    with cupy.cuda.Device(1):
        return [cupy.asarray(a) for a in arrays]


@pytest.mark.skipif(DEVICES < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_input_on_device_1_gives_results_on_device_1(dtype):
    x, rois, ga = make_case(dtype, [16, DTYPES.index(dtype)])
    gp = ga[::-1].copy()
    expected = all_ops(x, rois, ga, gp, x.shape)
    x1, r1, ga1, gp1 = _on_device_1([x, rois, ga, gp])
    with cupy.cuda.Device(0):
        got = all_ops(x1, r1, ga1, gp1, x.shape)
        # curoi switched to device 1 for the call and back afterwards.
        assert cupy.cuda.Device().id == 0
    for y in got:
        assert isinstance(y, cupy.ndarray) and y.device.id == 1
    with cupy.cuda.Device(1):
        cupy.cuda.Device().synchronize()
    names = ("roi_align", "roi_align_backward", "roi_pool", "argmax",
             "roi_pool_backward")
    for name, g, e in zip(names, got, expected):
        assert_close(g, e, dtype, backward=name.endswith("backward"), what=name)


@pytest.mark.skipif(DEVICES < 2, reason="needs two CUDA devices")
def test_features_and_boxes_on_different_gpus_are_an_error():
    x, rois, _ = make_case("float32", 17)
    (x1,) = _on_device_1([x])
    with cupy.cuda.Device(0):
        r0 = cupy.asarray(rois)
    with pytest.raises(ValueError, match="device"):
        curoi.roi_align(x1, r0, OUT, SCALE)


@pytest.mark.skipif(DEVICES < 2, reason="needs two CUDA devices")
def test_torch_tensor_on_cuda_1_gives_result_on_cuda_1():
    torch = torch_cuda()
    if torch.cuda.device_count() < 2:
        pytest.skip("torch sees fewer than two CUDA devices")
    device = torch.device("cuda", 1)
    x, rois, gy = make_case("float32", 18)
    xt, rt, gt = to_torch(x, device), to_torch(rois, device), to_torch(gy, device)
    with torch.cuda.device(0):
        y = curoi.roi_align(xt, rt, OUT, SCALE, 2, True)
        g = curoi.roi_align_backward(gt, rt, x.shape, OUT, SCALE, 2, True)
        p, argmax = curoi.roi_pool(xt, rt, OUT, SCALE, return_argmax=True)
    for t in (y, g, p, argmax):
        assert t.device == device
    assert_close(y, curoi.roi_align(x, rois, OUT, SCALE, 2, True), "float32")
    assert_close(g, curoi.roi_align_backward(gy, rois, x.shape, OUT, SCALE, 2, True),
                 "float32", backward=True)
    np.testing.assert_array_equal(to_f64(p), curoi.roi_pool(x, rois, OUT, SCALE))


# ------------------------------------------------ adversarial inputs
# The box zoo of test_adversarial.py (unusable batch indices, NaN and inf,
# boxes at 1e9 and 1e20, reversed, degenerate) on the GPU, against the CPU.
# float64, so that both backends see the same boxes; boxes with a corner
# beyond 1e6 are checked by invariant only (a fused multiply-add may move a
# bin edge there).
def _zoo():
    import test_adversarial as adv

    return adv


@pytest.mark.parametrize("ratio", [0, 2, 2**31 - 1])
@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_box_zoo_matches_cpu(aligned, ratio):
    adv = _zoo()
    names = [n for n in adv.NAMES if n not in adv.EXTREME]
    x = adv.rand((adv.N, adv.C, adv.H, adv.W), np.float64)
    rois = adv.rois(names, np.float64)
    expected = curoi.roi_align(x, rois, adv.OUT, 1.0, ratio, aligned)
    got = curoi.roi_align(cupy.asarray(x), cupy.asarray(rois), adv.OUT, 1.0, ratio, aligned)
    assert_close(got, expected, "float64")
    gy = adv.rand(expected.shape, np.float64, seed=1)
    expected = curoi.roi_align_backward(gy, rois, x.shape, adv.OUT, 1.0, ratio, aligned)
    got = curoi.roi_align_backward(cupy.asarray(gy), cupy.asarray(rois), x.shape, adv.OUT,
                                   1.0, ratio, aligned)
    assert_close(got, expected, "float64", backward=True)
    # Extreme boxes: finite, and within the range of an average.
    extreme = adv.rois(sorted(adv.EXTREME), np.float64)
    y = cupy.asnumpy(curoi.roi_align(cupy.asarray(x), cupy.asarray(extreme), adv.OUT, 1.0,
                                     ratio, aligned))
    adv.assert_average_bounds(y, x)
    cupy.cuda.Device().synchronize()


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_roi_pool_box_zoo_matches_cpu(convention):
    adv = _zoo()
    x = adv.rand((adv.N, adv.C, adv.H, adv.W), np.float64, seed=2)
    rois = adv.rois(adv.NAMES, np.float64)
    expected, expected_argmax = curoi.roi_pool(x, rois, adv.OUT, convention=convention,
                                               return_argmax=True)
    got, argmax = curoi.roi_pool(cupy.asarray(x), cupy.asarray(rois), adv.OUT,
                                 convention=convention, return_argmax=True)
    got, argmax = cupy.asnumpy(got), cupy.asnumpy(argmax)
    exact = [k for k, n in enumerate(adv.NAMES) if n not in adv.EXTREME]
    np.testing.assert_array_equal(got[exact], expected[exact])
    np.testing.assert_array_equal(argmax[exact], expected_argmax[exact])
    n, c, h, w = x.shape
    assert ((argmax >= -1) & (argmax < h * w)).all()
    for name in adv.UNUSABLE:
        assert (argmax[adv.NAMES.index(name)] == -1).all(), name
    gy = adv.rand(got.shape, np.float64, seed=3)
    expected = curoi.roi_pool_backward(gy, argmax, rois, x.shape)
    got = curoi.roi_pool_backward(cupy.asarray(gy), cupy.asarray(argmax), cupy.asarray(rois),
                                  x.shape)
    assert_close(got, expected, "float64", backward=True)


def test_maps_of_one_pixel_and_large_output_size_on_gpu():
    adv = _zoo()
    rois = adv.rois(["inside", "partly-out", "reversed", "point"], np.float32)
    rois[:, 0] = 0
    for shape, out in [((1, 2, 1, 1), 3), ((1, 2, 1, 6), (2, 3)), ((1, 2, 5, 1), (2, 3)),
                       ((1, 1, 3, 4), (1, 4096))]:
        x = adv.rand(shape, np.float32, seed=4)
        xg, rg = cupy.asarray(x), cupy.asarray(rois)
        assert_close(curoi.roi_align(xg, rg, out, 1.0, 0, True),
                     curoi.roi_align(x, rois, out, 1.0, 0, True), "float32")
        y, argmax = curoi.roi_pool(xg, rg, out, return_argmax=True)
        e, e_argmax = curoi.roi_pool(x, rois, out, return_argmax=True)
        np.testing.assert_array_equal(cupy.asnumpy(y), e)
        np.testing.assert_array_equal(cupy.asnumpy(argmax), e_argmax)
    cupy.cuda.Device().synchronize()


# ------------------------------------------------------------- threads
def test_threads_on_one_gpu_give_the_serial_results():
    # Eight Python threads launching at once (each on its own current
    # stream, CuPy's per-thread default) get what one thread gets.
    import threading

    x, rois, gy = make_case("float32", 19)
    xg, rg, gg = cupy.asarray(x), cupy.asarray(rois), cupy.asarray(gy)
    serial = [cupy.asnumpy(a) for a in all_ops(xg, rg, gg, gg, x.shape)]
    results, errors = [None] * 8, []
    barrier = threading.Barrier(8)

    def work(i):
        try:
            with cupy.cuda.Device(0):
                barrier.wait()
                got = all_ops(xg, rg, gg, gg, x.shape)
                cupy.cuda.get_current_stream().synchronize()
                results[i] = [cupy.asnumpy(a) for a in got]
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    names = ("roi_align", "roi_align_backward", "roi_pool", "argmax", "roi_pool_backward")
    for got in results:
        for name, g, e in zip(names, got, serial):
            if name.endswith("backward"):
                assert_close(g, e, "float32", backward=True, what=name)
            else:
                np.testing.assert_array_equal(g, e, err_msg=name)


# ------------------------------------ the RoI family beyond the core ops
# Each operator against the CPU backend on the same input, forward and
# backward (plain and deterministic), NCHW and NHWC, every dtype.
PS_OUT = (2, 3)
PS_SHAPE = (2, 2 * PS_OUT[0] * PS_OUT[1], 13, 17)  # C = C_out x PH x PW


def _family_case(op, dtype, seed):
    shape, out = (PS_SHAPE, PS_OUT) if op.startswith("ps_") else (SHAPE, OUT)
    x, rois, _ = make_case(dtype, seed, shape=shape, out=out)
    return x, rois, out


def _family_forward(op, x, rois, out, data_format):
    if op == "roi_align_max":
        return curoi.roi_align(x, rois, out, SCALE, 2, True, mode="max",
                               return_argmax=True, data_format=data_format)
    if op == "ps_roi_pool":
        return curoi.ps_roi_pool(x, rois, out, SCALE, data_format=data_format), None
    if op == "roi_align_rotated":
        return curoi.roi_align_rotated(x, _rotated(rois), out, SCALE, 2,
                                       data_format=data_format), None
    return curoi.ps_roi_align(x, rois, out, SCALE, 0, data_format=data_format), None


def _rotated(rois):
    """The boxes as rotated boxes (centre, size), turned by fixed angles."""
    xp = cupy.get_array_module(rois)
    angles = xp.linspace(-170, 170, len(rois), dtype=rois.dtype)
    return xp.stack([rois[:, 0], (rois[:, 1] + rois[:, 3]) / 2, (rois[:, 2] + rois[:, 4]) / 2,
                     xp.abs(rois[:, 3] - rois[:, 1]), xp.abs(rois[:, 4] - rois[:, 2]),
                     angles], axis=1)


def _family_backward(op, g, rois, shape, out, argmax, data_format, deterministic):
    kw = dict(deterministic=deterministic, data_format=data_format)
    if op == "roi_align_max":
        return curoi.roi_align_backward(g, rois, shape, out, SCALE, 2, True,
                                        mode="max", argmax=argmax, **kw)
    if op == "ps_roi_pool":
        return curoi.ps_roi_pool_backward(g, rois, shape, out, SCALE, **kw)
    if op == "roi_align_rotated":
        return curoi.roi_align_rotated_backward(g, _rotated(rois), shape, out, SCALE, 2, **kw)
    return curoi.ps_roi_align_backward(g, rois, shape, out, SCALE, 0, **kw)


@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["roi_align_max", "ps_roi_pool", "ps_roi_align",
                                "roi_align_rotated"])
def test_roi_family_matches_cpu(op, dtype, data_format):
    x, rois, out = _family_case(op, dtype, [40, DTYPES.index(dtype)])
    if data_format == "NHWC":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    expected, expected_argmax = _family_forward(op, x, rois, out, data_format)
    assert np.count_nonzero(to_f64(expected)) > expected.size // 4  # not vacuous
    xg = cupy.asarray(x)
    got, argmax = _family_forward(op, xg, cupy.asarray(rois), out, data_format)
    assert_cupy_result(got, xg)
    assert got.shape == expected.shape
    assert_close(got, expected, dtype, what=op)
    if argmax is not None and dtype in ("float32", "float64"):
        # the winner is a selection: the same on both backends, except where
        # two samples tie to within the summation order's rounding
        same = cupy.asnumpy(argmax) == expected_argmax
        assert same.mean() > 0.99
    g = np.random.default_rng(41).standard_normal(expected.shape).astype(x.dtype)
    cpu_argmax = expected_argmax if argmax is None else cupy.asnumpy(argmax)
    want = _family_backward(op, g, rois, x.shape, out, cpu_argmax, data_format, False)
    for deterministic in (False, True):
        got_grad = _family_backward(op, cupy.asarray(g), cupy.asarray(rois), x.shape, out,
                                    argmax, data_format, deterministic)
        assert got_grad.shape == x.shape
        assert_close(got_grad, want, dtype, backward=True, what=f"{op} backward")
    if deterministic:
        again = _family_backward(op, cupy.asarray(g), cupy.asarray(rois), x.shape, out,
                                 argmax, data_format, True)
        assert bool((again == got_grad).all())


@pytest.mark.parametrize("op", ["roi_align_max", "ps_roi_pool", "ps_roi_align"])
def test_roi_family_torch_cuda(op):
    torch = torch_cuda()
    import curoi.torch as ct

    x, rois, out = _family_case(op, "float32", [42])
    tx = torch.tensor(x, device="cuda", requires_grad=True)
    trois = torch.tensor(rois, device="cuda")
    if op == "roi_align_max":
        y = ct.roi_align(tx, trois, out, SCALE, 2, True, mode="max")
        expected = curoi.roi_align(x, rois, out, SCALE, 2, True, mode="max")
    else:
        y = getattr(ct, op)(tx, trois, out, SCALE)
        expected = getattr(curoi, op)(x, rois, out, SCALE)
    assert y.is_cuda
    assert_close(y, expected, "float32", what=op)
    y.sum().backward()
    assert tx.grad is not None and tx.grad.is_cuda


# ------------------------------------------- crop and resize, kernel level
# Through curoi._ops (the front ends are generated from operator
# descriptions elsewhere): the GPU against the CPU backend on the same
# input, every dtype (half precision against the CPU's float32 on the very
# same values), both layouts and methods, and the deterministic sums bitwise
# stable across launches and grids.
CROP_SHAPE = (2, 13, 17, 5)  # N, H, W, C: channels-last, TensorFlow's layout
CROP_SIZE = (6, 7)


def _crop_case(dtype, seed):
    rng = np.random.default_rng(seed)
    n, _, _, c = CROP_SHAPE
    image = rng.standard_normal(CROP_SHAPE).astype(np_dtype(dtype))
    k = 40
    boxes = rng.uniform(-0.3, 1.3, (k, 4)).astype(
        np.float64 if dtype == "float64" else np.float32)
    box_indices = rng.integers(0, n, k).astype(np.int32)
    box_indices[0] = n  # reads nothing
    g = rng.standard_normal((k,) + CROP_SIZE + (c,)).astype(image.dtype)
    return image, boxes, box_indices, g


def _crop_ops(image, boxes, box_indices, g, method, channels_last, deterministic=False):
    """Forward, image gradient and box gradient through _ops, on the
    arrays' backend; results channels-last."""
    from curoi import _ops

    xp = cupy if isinstance(image, cupy.ndarray) else np
    if not channels_last:
        image = xp.ascontiguousarray(xp.moveaxis(image, -1, 1))
        g = xp.ascontiguousarray(xp.moveaxis(g, -1, 1))
    out = xp.empty(g.shape, image.dtype)
    _ops.crop_and_resize_forward(image, boxes, box_indices, out, method, 0.5,
                                 channels_last=channels_last)
    grad = xp.empty(image.shape, boxes.dtype)
    _ops.crop_and_resize_backward(g, boxes, box_indices, grad, method,
                                  deterministic=deterministic, channels_last=channels_last)
    grad_boxes = xp.empty((len(boxes), 4), boxes.dtype)
    _ops.crop_and_resize_boxes_backward(g, image, boxes, box_indices, grad_boxes, method,
                                        channels_last=channels_last)
    if not channels_last:
        out = xp.moveaxis(out, 1, -1)
        grad = xp.moveaxis(grad, 1, -1)
    return out, grad, grad_boxes


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("method", ["bilinear", "nearest"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_crop_and_resize_kernels_match_cpu(dtype, method, channels_last):
    image, boxes, box_indices, g = _crop_case(dtype, [50, DTYPES.index(dtype)])
    cpu_dtype = np.float64 if dtype == "float64" else np.float32
    want = _crop_ops(image.astype(cpu_dtype), boxes, box_indices, g.astype(cpu_dtype),
                     method, channels_last)
    assert np.count_nonzero(want[0] != 0.5) > want[0].size // 4  # not vacuous
    on_gpu = [cupy.asarray(a) for a in (image, boxes, box_indices, g)]
    for deterministic in (False, True):
        out, grad, grad_boxes = _crop_ops(*on_gpu, method, channels_last, deterministic)
        assert_cupy_result(out, on_gpu[0])
        assert_close(out, want[0], dtype, what="forward")
        assert_close(grad, want[1], dtype, backward=True, what="image gradient")
        # Sums of many terms of either sign: tolerance relative to the largest.
        scale = float(np.abs(want[2]).max())
        rtol, atol = _TOL[dtype][1]
        np.testing.assert_allclose(to_f64(grad_boxes), want[2], rtol=rtol,
                                   atol=atol * scale, err_msg="box gradient")
        assert not to_f64(grad_boxes)[0].any()  # the box that reads nothing


@pytest.mark.parametrize("dtype", DTYPES)
def test_crop_and_resize_gradients_are_bitwise_stable_across_launches(dtype, monkeypatch):
    # The same boxes many times over: each pixel receives hundreds of terms
    # (atomic in the plain sum; fixed point in the deterministic one), and
    # each box's gradient sums many bins in a fixed order.
    image, boxes, box_indices, g = _crop_case(dtype, [51, DTYPES.index(dtype)])
    boxes, box_indices, g = (np.concatenate([a] * 8) for a in (boxes, box_indices, g))
    on_gpu = [cupy.asarray(a) for a in (image, boxes, box_indices, g)]
    results = []
    for _ in _launch_configurations(monkeypatch):
        for _ in range(2):
            results.append(_crop_ops(*on_gpu, "bilinear", True, deterministic=True))
    for other in results[1:]:
        np.testing.assert_array_equal(_bits(other[1]), _bits(results[0][1]))
        np.testing.assert_array_equal(_bits(other[2]), _bits(results[0][2]))


# ------------------------------------- rotated RoI Align's box gradient
# Against the CPU backend, in both layouts. The gradient jumps where a
# sample crosses a pixel edge, and the GPU compiler's fused multiply-adds
# move samples by an ulp: only boxes whose samples keep clear of the edges
# are compared; the others must be finite.


def _rotated_box_grad(x, rois, g, convention, channels_last):
    """d/d(cx, cy, w, h, angle) through _ops, on the arrays' backend."""
    from curoi import _ops

    xp = cupy.get_array_module(x)
    if channels_last:
        x = xp.ascontiguousarray(xp.moveaxis(x, 1, -1))
        g = xp.ascontiguousarray(xp.moveaxis(g, 1, -1))
    grad = xp.empty((len(rois), 6), rois.dtype)
    _ops.roi_align_rotated_boxes_backward(g, x, rois, grad, SCALE, 0, convention, False,
                                          False, channels_last=channels_last)
    return grad


def _rotated_box_case(dtype, seed):
    x, rois, g = make_case(dtype, seed)
    rotated = np.ascontiguousarray(_rotated(rois))
    rotated[0, 0] = SHAPE[0]  # reads nothing
    return x, rotated, g


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("convention", ["detectron2", "mmcv"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotated_box_gradient_matches_cpu(dtype, convention, channels_last):
    from test_roi_align_rotated_boxes_backward import _away_from_edges

    x, rotated, g = _rotated_box_case(dtype, [60, DTYPES.index(dtype)])
    cpu_dtype = np.float64 if dtype == "float64" else np.float32
    want = to_f64(_rotated_box_grad(x.astype(cpu_dtype), rotated, g.astype(cpu_dtype),
                                    convention, channels_last))
    got = _rotated_box_grad(cupy.asarray(x), cupy.asarray(rotated), cupy.asarray(g),
                            convention, channels_last)
    assert_cupy_result(got, cupy.asarray(rotated))
    got = to_f64(got)
    assert np.isfinite(got).all() and not got[0].any() and not got[:, 0].any()
    clear = [k for k, box in enumerate(rotated.astype(np.float64))
             if _away_from_edges(box, x.shape, OUT, SCALE, 0, convention, False, False,
                                 margin=1e-4)]
    assert len(clear) > len(rotated) // 2
    rtol, atol = _TOL[dtype][1]
    np.testing.assert_allclose(got[clear], want[clear], rtol=rtol,
                               atol=atol * float(np.abs(want).max()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotated_box_gradient_is_bitwise_stable_across_launches(dtype, monkeypatch):
    x, rotated, g = _rotated_box_case(dtype, [61, DTYPES.index(dtype)])
    on_gpu = [cupy.asarray(a) for a in (x, rotated, g)]
    results = []
    for _ in _launch_configurations(monkeypatch):
        for channels_last in (False, True):
            results.append(_rotated_box_grad(*on_gpu, "mmcv", channels_last))
    for other in results[1:]:
        np.testing.assert_array_equal(_bits(other), _bits(results[0]))


# ---------------------- spatial pyramid, precise pooling, feature pyramids
# Through the public NumPy functions on CuPy arrays, against the CPU
# backend on the same input.
SPP_LEVELS = (1, 2, 3)


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_spp_matches_cpu(dtype, mode):
    x, rois, _ = make_case(dtype, [50, DTYPES.index(dtype)])
    expected, expected_argmax = curoi.roi_spp(x, rois, SPP_LEVELS, SCALE, mode=mode,
                                              return_argmax=True)
    xg = cupy.asarray(x)
    got, argmax = curoi.roi_spp(xg, cupy.asarray(rois), SPP_LEVELS, SCALE, mode=mode,
                                return_argmax=True)
    assert_cupy_result(got, xg)
    assert_close(got, expected, dtype, what="roi_spp")
    # Maxima are selections among the very same values: exact.
    np.testing.assert_array_equal(cupy.asnumpy(argmax), expected_argmax)
    g = np.random.default_rng(51).standard_normal(expected.shape).astype(x.dtype)
    want = curoi.roi_spp_backward(g, rois, x.shape, SPP_LEVELS, SCALE, mode=mode,
                                  argmax=expected_argmax)
    for deterministic in (False, True):
        got_grad = curoi.roi_spp_backward(cupy.asarray(g), cupy.asarray(rois), x.shape,
                                          SPP_LEVELS, SCALE, mode=mode, argmax=argmax,
                                          deterministic=deterministic)
        assert_close(got_grad, want, dtype, backward=True, what="roi_spp backward")


@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prroi_pool_and_its_gradients_match_cpu(dtype, data_format):
    x, rois, g = make_case(dtype, [52, DTYPES.index(dtype)])
    if data_format == "NHWC":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        g = np.ascontiguousarray(g.transpose(0, 2, 3, 1))
    kw = dict(data_format=data_format)
    xg, rg, gg = cupy.asarray(x), cupy.asarray(rois), cupy.asarray(g)
    got = curoi.prroi_pool(xg, rg, OUT, SCALE, **kw)
    assert_cupy_result(got, xg)
    assert_close(got, curoi.prroi_pool(x, rois, OUT, SCALE, **kw), dtype, what="prroi_pool")
    want = curoi.prroi_pool_backward(g, rois, x.shape, OUT, SCALE, **kw)
    for deterministic in (False, True):
        assert_close(curoi.prroi_pool_backward(gg, rg, x.shape, OUT, SCALE,
                                               deterministic=deterministic, **kw),
                     want, dtype, backward=True, what="prroi_pool backward")
    if dtype in ("float32", "float64"):
        boxes = curoi.prroi_pool_boxes_backward(gg, xg, rg, OUT, SCALE, **kw)
        assert_close(boxes, curoi.prroi_pool_boxes_backward(g, x, rois, OUT, SCALE, **kw),
                     dtype, backward=True, what="prroi_pool boxes backward")
        again = curoi.prroi_pool_boxes_backward(gg, xg, rg, OUT, SCALE, **kw)
        assert bool((again == boxes).all())  # ordered sums: the same bits


@pytest.mark.parametrize("dtype", DTYPES)
def test_multiscale_roi_align_matches_cpu(dtype):
    rng = np.random.default_rng([53, DTYPES.index(dtype)])
    scales = [1 / 4, 1 / 8, 1 / 16]
    features = [rng.standard_normal((2, 4, 64 >> l, 96 >> l)).astype(np_dtype(dtype))
                for l in range(3)]
    box_dtype = np.float64 if dtype == "float64" else np.float32
    centres = rng.uniform(0, 1, (40, 2)) * [384, 256]
    sizes = np.exp(rng.uniform(np.log(8), np.log(300), (40, 2)))
    boxes = np.concatenate([rng.integers(0, 2, (40, 1)), centres - sizes / 2,
                            centres + sizes / 2], axis=1).astype(box_dtype)
    kw = dict(canonical_scale=64, canonical_level=3)
    expected = curoi.multiscale_roi_align(features, boxes, OUT, scales, 2, True, **kw)
    levels = [cupy.asarray(f) for f in features]
    got = curoi.multiscale_roi_align(levels, cupy.asarray(boxes), OUT, scales, 2, True, **kw)
    assert_cupy_result(got, levels[0])
    assert_close(got, expected, dtype, what="multiscale_roi_align")
    g = rng.standard_normal(expected.shape).astype(features[0].dtype)
    shapes = [f.shape for f in features]
    want = curoi.multiscale_roi_align_backward(g, boxes, shapes, OUT, scales, 2, True, **kw)
    for deterministic in (False, True):
        grads = curoi.multiscale_roi_align_backward(
            cupy.asarray(g), cupy.asarray(boxes), shapes, OUT, scales, 2, True,
            deterministic=deterministic, **kw)
        for level, (a, b) in enumerate(zip(grads, want)):
            assert_close(a, b, dtype, backward=True, what=f"level {level}")

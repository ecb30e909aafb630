"""GPU integration: the caller's allocator, CUDA graphs, streams, devices and
frameworks on a real CUDA device. Runs wherever one is present (it is part of
``python3 -m curoi check --device cuda``) and skips cleanly otherwise.

Every result is compared with the CPU backend on the same input, itself
checked against the NumPy reference elsewhere; what these tests add is that
the GPU path keeps its promises:

- buffers come from the caller's allocator: PyTorch's caching allocator for
  torch tensors (its statistics see them, CuPy's pool stays empty), XLA's
  for curoi.jax (CuPy may allocate nothing there), CuPy's pool for CuPy;
- a PyTorch CUDA graph records curoi's calls (no host copies, no host
  synchronisation, memory from the graph's pool) and replays them on new
  inputs with the eager results, also through torch.compile's
  "reduce-overhead" mode;
- work runs on the caller's stream (several streams at once give each its
  own results), on the caller's device, and TensorFlow's GPU tensors are
  imported and ordered against TensorFlow's work.
"""

import numpy as np
import pytest

pytestmark = pytest.mark.cuda
cupy = pytest.importorskip("cupy")


def _device_count():
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no driver or no device
        return 0


DEVICES = _device_count()
if DEVICES == 0:
    pytest.skip("no CUDA device", allow_module_level=True)

import curoi  # noqa: E402

SCALE = 0.5  # a power of two: box corners scale exactly on both backends
OUT = (3, 4)
TOL = dict(rtol=1e-5, atol=1e-4)


def _case(seed, shape=(2, 8, 13, 17), k=24):
    rng = np.random.default_rng(seed)
    n, c, h, w = shape
    x = rng.standard_normal(shape).astype(np.float32)
    corners = np.sort(rng.uniform(-2, [w / SCALE + 2, h / SCALE + 2], (k, 2, 2)), axis=1)
    rois = np.concatenate([rng.integers(0, n, (k, 1)), corners[:, 0], corners[:, 1]],
                          axis=1).astype(np.float32)
    g = rng.standard_normal((k, c) + OUT).astype(np.float32)
    return x, rois, g


def _torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    return torch


def _numpy(a):
    if isinstance(a, cupy.ndarray):
        return cupy.asnumpy(a)
    if type(a).__module__.startswith("torch"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _calls(x, rois, g, shape):
    """A call of every kind of launch: forward, atomic and deterministic
    backward (the fixed-point scale), a box gradient (two passes), tables
    passed by value (spatial pyramid levels) and whole-map boxes built on
    the device."""
    y = curoi.roi_align(x, rois, OUT, SCALE, 2, True)
    gx = curoi.roi_align_backward(g, rois, shape, OUT, SCALE, 2, True)
    gd = curoi.roi_align_backward(g, rois, shape, OUT, SCALE, 2, True, deterministic=True)
    gb = curoi.roi_align_boxes_backward(g, x, rois, OUT, SCALE, 2, True)
    p, argmax = curoi.roi_pool(x, rois, OUT, SCALE, return_argmax=True)
    gp = curoi.roi_pool_backward(g, argmax, rois, shape, deterministic=True)
    s = curoi.roi_spp(x, rois, (1, 2), SCALE)
    whole = curoi.roi_spp(x, None, (1, 3), mode="avg")
    return y, gx, gd, gb, p, gp, s, whole


def _check(got, expected):
    for i, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(_numpy(a), _numpy(b), err_msg=f"result {i}", **TOL)


# --------------------------------------------------------- the allocator
def test_torch_calls_take_their_memory_from_torch():
    torch = _torch()
    x, rois, g = _case(1, shape=(2, 16, 40, 40), k=64)
    xt, rt, gt = (torch.from_numpy(a).cuda() for a in (x, rois, g))
    _calls(xt, rt, gt, x.shape)  # compile first
    torch.cuda.synchronize()
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    held = pool.total_bytes()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    got = _calls(xt, rt, gt, x.shape)
    torch.cuda.synchronize()
    # The deterministic backward's int64 sums (8 bytes per gradient element)
    # were PyTorch's, beside the float32 gradient itself.
    assert torch.cuda.max_memory_allocated() - before >= 8 * x.size + 4 * x.size
    assert pool.total_bytes() == held, "CuPy's pool served a torch call"
    _check(got, _calls(x, rois, g, x.shape))
    del got
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before  # nothing kept


def test_cupy_calls_take_their_memory_from_cupys_pool():
    x, rois, g = _case(2)
    xc, rc, gc = (cupy.asarray(a) for a in (x, rois, g))
    _calls(xc, rc, gc, x.shape)
    pool = cupy.get_default_memory_pool()
    before = pool.used_bytes()
    got = _calls(xc, rc, gc, x.shape)
    assert pool.used_bytes() > before  # the results, from CuPy's pool
    _check(got, _calls(x, rois, g, x.shape))


# ------------------------------------------------------------ CUDA graphs
def _graphed(torch, fn, *static):
    """``fn(*static)`` warmed up on a side stream, then captured in a CUDA
    graph: returns (graph, outputs of the captured call)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*static)
    return graph, outputs


def test_a_cuda_graph_records_and_replays_curoi_calls():
    torch = _torch()
    x, rois, g = _case(3)
    xt, rt, gt = (torch.from_numpy(a).cuda() for a in (x, rois, g))
    graph, outputs = _graphed(torch, lambda x, r, g: _calls(x, r, g, x.shape), xt, rt, gt)
    for seed in (4, 5):
        x2, rois2, g2 = _case(seed)
        xt.copy_(torch.from_numpy(x2))
        rt.copy_(torch.from_numpy(rois2))
        gt.copy_(torch.from_numpy(g2))
        graph.replay()
        torch.cuda.synchronize()
        _check(outputs, _calls(x2, rois2, g2, x.shape))


def test_a_cuda_graph_replays_multiscale_and_crop_calls():
    torch = _torch()
    rng = np.random.default_rng(6)
    levels = [torch.from_numpy(rng.standard_normal((2, 4, 32 >> i, 40 >> i))
                               .astype(np.float32)).cuda() for i in range(3)]
    _, rois, _ = _case(6, shape=(2, 4, 64, 80))
    rt = torch.from_numpy(rois * 2).cuda()
    boxes = torch.from_numpy(np.sort(rng.uniform(0, 1, (10, 2, 2)), axis=1)
                             .reshape(10, 4).astype(np.float32)).cuda()
    indices = torch.from_numpy(rng.integers(0, 2, 10).astype(np.int32)).cuda()
    image = torch.from_numpy(rng.standard_normal((2, 9, 11, 4)).astype(np.float32)).cuda()

    def calls(levels, rois, image, boxes, indices):
        return (curoi.multiscale_roi_align(list(levels), rois, 3, [1 / 4, 1 / 8, 1 / 16], 2),
                curoi.crop_and_resize(image, boxes, indices, (5, 5)))

    graph, outputs = _graphed(torch, calls, levels, rt, image, boxes, indices)
    for level in levels:
        level.mul_(-2.0)
    image.add_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    expected = calls([_numpy(v) for v in levels], _numpy(rt), _numpy(image),
                     _numpy(boxes), _numpy(indices))
    _check(outputs, expected)


def test_a_first_use_during_a_capture_asks_for_a_warm_up(monkeypatch):
    torch = _torch()
    from curoi import _gpu

    monkeypatch.setattr(_gpu, "_modules", {})  # nothing compiled yet
    x = torch.ones((1, 1, 4, 4), device="cuda")
    rois = torch.tensor([[0.0, 0.0, 0.0, 3.0, 3.0]], device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="warm-up"):
        with torch.cuda.graph(graph):
            curoi.roi_align(x, rois, 2)
    torch.cuda.synchronize()
    # Outside a capture the same call compiles and runs.
    assert float(curoi.roi_align(x, rois, 2).sum()) == 4.0


def test_torch_compile_reduce_overhead_replays_forward_and_backward():
    torch = _torch()
    import curoi.torch as ct

    x, rois, g = _case(7)
    compiled = torch.compile(lambda x, rois: ct.roi_align(x, rois, OUT, SCALE, 2, True),
                             mode="reduce-overhead", fullgraph=True)
    rt, gt = torch.from_numpy(rois).cuda(), torch.from_numpy(g).cuda()
    for seed in (8, 9, 10, 11):
        x_new = _case(seed)[0]
        xt = torch.from_numpy(x_new).cuda().requires_grad_(True)
        y = compiled(xt, rt)
        (y * gt).sum().backward()
        torch.cuda.synchronize()
        np.testing.assert_allclose(_numpy(y), curoi.roi_align(x_new, rois, OUT, SCALE, 2,
                                                              True), **TOL)
        np.testing.assert_allclose(
            _numpy(xt.grad),
            curoi.roi_align_backward(g, rois, x.shape, OUT, SCALE, 2, True), **TOL)


# ---------------------------------------------------------------- streams
def test_calls_on_several_torch_streams_at_once():
    torch = _torch()
    cases = [_case(20 + i) for i in range(4)]
    tensors = [[torch.from_numpy(a).cuda() for a in case] for case in cases]
    _calls(*tensors[0], cases[0][0].shape)
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream() for _ in cases]
    results = []
    for stream, (xt, rt, gt) in zip(streams, tensors):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            results.append(_calls(xt, rt, gt, xt.shape))
    torch.cuda.synchronize()
    for got, (x, rois, g) in zip(results, cases):
        _check(got, _calls(x, rois, g, x.shape))


def test_calls_on_several_cupy_streams_at_once():
    cases = [_case(30 + i) for i in range(3)]
    arrays = [[cupy.asarray(a) for a in case] for case in cases]
    results = []
    for xc, rc, gc in arrays:
        with cupy.cuda.Stream(non_blocking=True) as stream:
            results.append((_calls(xc, rc, gc, xc.shape), stream))
    for (got, stream), (x, rois, g) in zip(results, cases):
        stream.synchronize()
        _check(got, _calls(x, rois, g, x.shape))


# ----------------------------------------------------------------- devices
@pytest.mark.skipif(DEVICES < 2, reason="needs two CUDA devices")
def test_torch_tensors_on_a_device_torch_has_not_used_yet():
    # torch's current device stays 0, with no context created there; the
    # tensors live on device 1 (PyTorch >= 2.10 refuses __dlpack__ of a
    # tensor on another device than the current one unless curoi enters it).
    torch = _torch()
    x, rois, g = _case(40)
    device = torch.device("cuda", DEVICES - 1)
    xt, rt, gt = (torch.from_numpy(a).to(device) for a in (x, rois, g))
    got = _calls(xt, rt, gt, x.shape)
    assert all(t.device == device for t in got)
    assert torch.cuda.current_device() == 0
    _check(got, _calls(x, rois, g, x.shape))


# ------------------------------------------------------------- TensorFlow
def _tensorflow_gpu():
    tf = pytest.importorskip("tensorflow")
    if not tf.config.list_physical_devices("GPU"):
        pytest.skip("this TensorFlow sees no GPU")
    return tf


def test_tensorflow_gpu_tensors_are_imported_and_ordered():
    tf = _tensorflow_gpu()
    x, rois, g = _case(50)
    with tf.device("/GPU:0"):
        # Produced by TensorFlow's own work just before the call, consumed by
        # it just after: the launch is ordered between the two.
        xt = tf.constant(x) * 1.0
        rt = tf.identity(tf.constant(rois))
        y = curoi.roi_align(xt, rt, OUT, SCALE, 2, True)
        assert "GPU" in y.device
        doubled = (y * 2.0).numpy()
        gx = curoi.roi_align_backward(tf.constant(g), rt, x.shape, OUT, SCALE, 2, True)
    expected = curoi.roi_align(x, rois, OUT, SCALE, 2, True)
    np.testing.assert_allclose(doubled, 2 * expected, **TOL)
    np.testing.assert_allclose(gx.numpy(),
                               curoi.roi_align_backward(g, rois, x.shape, OUT, SCALE, 2,
                                                        True), **TOL)


# -------------------------------------------------------------------- JAX
def _jax_gpu():
    jax = pytest.importorskip("jax")
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        pytest.skip("this JAX sees no GPU")
    return jax, gpus[0]


def test_jax_jit_on_gpu_arrays_takes_no_memory_from_cupy():
    jax, device = _jax_gpu()
    import curoi.jax as cj

    x, rois, g = _case(60)
    xj, rj = jax.device_put(x, device), jax.device_put(rois, device)

    def loss(x, rois):
        y = cj.roi_align(x, rois, OUT, SCALE, 2, True, deterministic=True)
        return (y * g).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    grad(xj, rj)  # compile
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    gx, gr = grad(xj, rj)
    assert pool.total_bytes() == 0  # XLA's buffers only
    np.testing.assert_allclose(
        np.asarray(gx),
        curoi.roi_align_backward(g, rois, x.shape, OUT, SCALE, 2, True), **TOL)
    np.testing.assert_allclose(
        np.asarray(gr), curoi.roi_align_boxes_backward(g, x, rois, OUT, SCALE, 2, True),
        rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------- channels-last
def test_torch_channels_last_cuda_tensors_run_in_place():
    torch = _torch()
    import curoi.torch as ct

    x, rois, g = _case(70)
    xt = torch.from_numpy(x).cuda().to(memory_format=torch.channels_last)
    xt.requires_grad_(True)
    y = ct.roi_align(xt, torch.from_numpy(rois).cuda(), OUT, SCALE, 2, True)
    y.backward(torch.from_numpy(g).cuda().to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert xt.grad.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(_numpy(y), curoi.roi_align(x, rois, OUT, SCALE, 2, True),
                               **TOL)
    np.testing.assert_allclose(
        _numpy(xt.grad), curoi.roi_align_backward(g, rois, x.shape, OUT, SCALE, 2, True),
        **TOL)

"""Where a call's memory comes from (curoi._memory, curoi._interop).

A GPU call takes every buffer from the caller's allocator: PyTorch's for
torch tensors, XLA's under curoi.jax, CuPy's for CuPy arrays. Two facts
make that hold, and both are checked here on the CPU, through the launch
layer (curoi._cpu.launch, which every CPU kernel launch goes through, as
curoi._gpu.launch does on a GPU):

- every array a kernel reads or writes is one the wrappers were handed (the
  caller's features, boxes, results, gradients) or a temporary taken from
  the workspace of the call: no table is built on the host per call (on a
  GPU that would be a host-to-device copy, which a CUDA graph cannot
  replay), and no temporary comes from elsewhere;
- the temporaries the wrappers take are exactly the ones their ``*_scratch``
  functions declare, which is what curoi.jax asks XLA to allocate.

The GPU side of the same promises (PyTorch's memory statistics, CUDA graph
capture) is in tests/test_gpu.py.
"""

import numpy as np
import pytest

import reference as ref
from curoi import _cpu, _interop, _kernels, _memory, _operators, _ops

N, C, H, W = 2, 8, 9, 11
PH = PW = 2


class LaunchSpy:
    """Records every CPU kernel launch's arguments, then runs it."""

    def __init__(self, monkeypatch):
        self.launches = []
        real = _cpu.launch

        def launch(family, direction, dtype, args):
            self.launches.append((f"{family}_{direction}", args))
            return real(family, direction, dtype, args)

        monkeypatch.setattr(_cpu, "launch", launch)

    def foreign_arrays(self, allowed):
        """(kernel, argument position) of every array argument that is none
        of ``allowed`` (nor a view of one); structs passed by value are
        values, not buffers."""
        found = []
        for name, args in self.launches:
            for i, arg in enumerate(args):
                if not isinstance(arg, np.ndarray) or arg.dtype.kind == "V":
                    continue
                if not any(np.shares_memory(arg, a) for a in allowed):
                    found.append((name, i))
        return found


def _rois(op, rng, k=12):
    if op.box_columns == 6:
        rois = np.zeros((k, 6), np.float32)
        rois[:, 0] = rng.integers(0, N, k)
        rois[:, 1:3] = rng.uniform(0, [W, H], (k, 2))
        rois[:, 3:5] = rng.uniform(1, 6, (k, 2))
        rois[:, 5] = rng.uniform(-90, 90, k)
        return rois
    if op.name == "crop_and_resize":
        rois = np.zeros((k, 5), np.float32)
        rois[:, 0] = rng.integers(0, N, k)
        rois[:, 1:] = np.sort(rng.uniform(-0.2, 1.2, (k, 2, 2)), axis=1).reshape(k, 4)
        return rois
    return ref.random_boxes(rng, N, H, W, 1.0, k).astype(np.float32)


def _case(op, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    rois = _rois(op, rng)
    values = op.values()
    ph, pw = (PH, PW) if op.pooled else (None, None)
    shape = op.result_shape(rois.shape[0], C, ph, pw, values, False)
    return x, rois, values, ph, pw, shape


@pytest.fixture
def fixed_point(monkeypatch):
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", True)


@pytest.mark.parametrize("name", sorted(_operators.OPERATORS))
def test_kernels_touch_only_the_callers_arrays_and_the_workspace(name, monkeypatch,
                                                                fixed_point):
    op = _operators.OPERATORS[name]
    x, rois, values, ph, pw, shape = _case(op)
    out = np.empty(shape, np.float32)
    saved = [np.empty(shape, s.dtype(H, W)) for s in op.saved]
    g = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    grad_input = np.zeros(x.shape, np.float32)
    grad_rois = np.zeros(rois.shape, np.float32)
    # One workspace per launch, as curoi.jax gives each kernel call its own.
    backward = np.zeros(_memory.footprint(
        _ops.backward_scratch(grad_input.size, True, cuda=False)), np.uint8)
    boxes = np.zeros(_memory.footprint(
        op.boxes_scratch(rois.shape[0], ph, pw, "float32")
        if op.boxes_scratch is not None else []), np.uint8)
    spy = LaunchSpy(monkeypatch)
    with _memory.workspace(np.zeros(0, np.uint8)):
        op.forward(x, rois, out, saved, values, False)
    with _memory.workspace(backward):
        op.backward(g, rois, saved, grad_input, values, True, True, False)
    if op.boxes_backward is not None:
        with _memory.workspace(boxes):
            op.boxes_backward(g, x, rois, grad_rois, values, False)
    launched = {kernel for kernel, _ in spy.launches}
    assert f"{name}_backward_fixed" in launched
    assert "fixed_point_scale" in launched
    assert spy.foreign_arrays([x, rois, out, g, grad_input, grad_rois, backward, boxes]
                              + saved) == []


@pytest.mark.parametrize("name", sorted(n for n, op in _operators.OPERATORS.items()
                                        if op.boxes_backward is not None))
def test_box_gradients_take_what_they_declare(name):
    op = _operators.OPERATORS[name]
    x, rois, values, ph, pw, shape = _case(op, seed=2)
    g = np.ones(shape, np.float32)
    grad_rois = np.zeros(rois.shape, np.float32)
    declared = op.boxes_scratch(rois.shape[0], ph, pw, "float32") \
        if op.boxes_scratch is not None else []
    workspace = np.zeros(_memory.footprint(declared), np.uint8)
    with _memory.workspace(workspace) as taken:
        op.boxes_backward(g, x, rois, grad_rois, values, False)
    assert taken.used == workspace.size
    # ... and with the workspace made to measure, the numbers are those of
    # a call that takes its temporaries from NumPy.
    expected = np.zeros_like(grad_rois)
    op.boxes_backward(g, x, rois, expected, values, False)
    np.testing.assert_array_equal(grad_rois, expected)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("on_cpu", [False, True])
def test_backwards_take_what_they_declare(deterministic, on_cpu, monkeypatch):
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", on_cpu)
    op = _operators.ROI_ALIGN
    x, rois, values, ph, pw, shape = _case(op, seed=3)
    g = np.ones(shape, np.float32)
    grad = np.zeros(x.shape, np.float32)
    declared = _ops.backward_scratch(grad.size, deterministic, cuda=False)
    assert bool(declared) == (deterministic and on_cpu)
    workspace = np.zeros(_memory.footprint(declared), np.uint8)
    with _memory.workspace(workspace) as taken:
        op.backward(g, rois, [], grad, values, deterministic, True, False)
    assert taken.used == workspace.size


def test_multiscale_launches_take_their_levels_by_value(monkeypatch, fixed_point):
    rng = np.random.default_rng(4)
    levels = [rng.standard_normal((N, C, 32 >> i, 48 >> i)).astype(np.float32)
              for i in range(3)]
    scales = [1 / 4, 1 / 8, 1 / 16]
    rois = ref.random_boxes(rng, N, 128, 192, 1.0, 20).astype(np.float32)
    out = np.empty((20, C, PH, PW), np.float32)
    grads = [np.zeros_like(level) for level in levels]
    workspace = np.zeros(_memory.footprint(_ops.backward_scratch(
        sum(g.size for g in grads), True, cuda=False)), np.uint8)
    spy = LaunchSpy(monkeypatch)
    with _memory.workspace(workspace) as taken:
        _ops.multiscale_roi_align_forward(levels, rois, out, scales, 2, True, 224.0, 4,
                                          1e-6, "torchvision")
        _ops.multiscale_roi_align_backward(out, rois, grads, scales, 2, True, 224.0, 4,
                                           1e-6, "torchvision", deterministic=True,
                                           zeroed=True)
    assert taken.used == workspace.size
    assert spy.foreign_arrays(levels + grads + [rois, out, workspace]) == []
    tables = {name: arg for name, args in spy.launches for arg in args
              if isinstance(arg, np.ndarray) and arg.dtype == _kernels.MULTISCALE_LEVELS.dtype}
    assert set(tables) == {"multiscale_roi_align_forward",
                           "multiscale_roi_align_backward_fixed",
                           "multiscale_roi_align_fixed_finish"}
    for name, table in tables.items():
        arrays = levels if name.endswith("forward") else grads
        assert int(table["count"][0]) == 3
        assert list(table["address"][0, :3]) == [a.ctypes.data for a in arrays]
        assert list(table["size"][0, :6]) == [32, 48, 16, 24, 8, 12]
        assert list(table["scale_f32"][0, :3]) == scales
        assert list(table["scale_f64"][0, :3]) == scales


def test_the_allocator_of_a_call_is_its_frameworks():
    # PyTorch's caching allocator for torch tensors; CuPy's current one
    # (None) for everything else. The allocator itself needs a GPU: see
    # tests/test_gpu.py.
    torch = pytest.importorskip("torch")
    cupy = pytest.importorskip("cupy")
    assert _interop.Caller(torch.zeros(1), "input").cuda_allocator(cupy) is not None
    for x in (np.zeros(1), pytest.importorskip("jax.numpy").zeros(1)):
        assert _interop.Caller(x, "input").cuda_allocator(cupy) is None


def test_a_workspace_refuses_what_it_cannot_hold():
    with _memory.workspace(np.zeros(300, np.uint8)) as taken:
        first = _memory.empty(np, (10,), np.float64)
        assert taken.used == _memory.ALIGNMENT
        with pytest.raises(_memory.WorkspaceTooSmallError, match="44 of 300 left"):
            _memory.empty(np, (10,), np.float64)
    assert first.ctypes.data % 8 == 0
    # Outside a workspace, temporaries are the array module's own.
    assert _memory.empty(np, (3,), np.int64).base is None


def test_curoi_jax_takes_its_temporaries_from_xla(monkeypatch, fixed_point):
    # The deterministic backward (its fixed-point sums, run on the CPU here)
    # and the box gradient's partial sums come out of the workspace that XLA
    # allocated for the launch, and give the NumPy front end's numbers.
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    import curoi
    import curoi.jax

    taken = []
    real = _memory.Workspace.take

    def take(self, shape, dtype):
        taken.append((tuple(shape), np.dtype(dtype).name))
        return real(self, shape, dtype)

    monkeypatch.setattr(_memory.Workspace, "take", take)
    x, rois, _, _, _, shape = _case(_operators.ROI_ALIGN, seed=5)
    g = np.random.default_rng(6).standard_normal(shape).astype(np.float32)

    def loss(x, rois):
        y = curoi.jax.roi_align(x, rois, (PH, PW), 1.0, 2, True, deterministic=True)
        return jnp.sum(y * g)

    grad_x, grad_rois = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(rois))
    assert ((1,), "float64") in taken and ((x.size,), "int64") in taken
    assert ((rois.shape[0], PH * PW, 4), "float32") in taken
    expected = curoi.roi_align_backward(g, rois, x.shape, (PH, PW), 1.0, 2, True,
                                        deterministic=True)
    np.testing.assert_array_equal(np.asarray(grad_x), expected)
    expected_rois = curoi.roi_align_boxes_backward(g, x, rois, (PH, PW), 1.0, 2, True)
    np.testing.assert_array_equal(np.asarray(grad_rois), expected_rois)

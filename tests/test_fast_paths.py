"""The small-call fast paths: NumPy arrays the kernels read as they are
(curoi._fast) and plain eager torch CPU tensors that need no gradient
(curoi.torch's direct calls). Each must give the general path's numbers
bit for bit, be taken exactly when it may, and leave everything else to the
general path. Expected values come from tests/reference.py."""

import numpy as np
import pytest

import curoi
import reference
from curoi import _interop

SCALE = 0.5


def _case(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 5, 13, 17)).astype(dtype)
    boxes = reference.random_boxes(rng, 2, 13, 17, SCALE, 30).astype(dtype)
    return x, boxes


class _GeneralPathTaken(Exception):
    pass


@pytest.fixture
def no_general_path(monkeypatch):
    """Fail any call that reaches the general path (curoi._interop.Caller)."""
    def refuse(*args, **kwargs):
        raise _GeneralPathTaken
    monkeypatch.setattr("curoi._frontend.Caller", refuse)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_fast_path_is_taken_and_matches_the_reference(dtype, no_general_path):
    x, boxes = _case(dtype)
    y = curoi.roi_align(x, boxes, (3, 4), SCALE, 2, True)
    np.testing.assert_allclose(
        y, reference.roi_align(x, boxes, (3, 4), SCALE, 2, True),
        rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)
    y, argmax = curoi.roi_pool(x, boxes, (3, 4), SCALE, return_argmax=True)
    want, want_argmax = reference.roi_pool(x, boxes, (3, 4), SCALE, "torchvision")
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(argmax, want_argmax)
    mmcv = curoi.roi_pool(x, boxes, (3, 4), SCALE, convention="mmcv")
    np.testing.assert_array_equal(mmcv, reference.roi_pool(x, boxes, (3, 4), SCALE, "mmcv")[0])
    assert y.dtype == dtype and argmax.dtype == np.int64


def _variants(x, boxes):
    """Inputs the fast path must leave to the general path, each with the
    same values."""
    wide = np.zeros(x.shape[:3] + (2 * x.shape[3],), x.dtype)
    wide[..., ::2] = x
    swapped = x.astype(x.dtype.newbyteorder(">"))
    yield "non-contiguous features", wide[..., ::2], boxes
    yield "big-endian features", swapped, boxes
    yield "float64 boxes", x, boxes.astype(np.float64)
    yield "list of boxes", x, [boxes[boxes[:, 0] == i, 1:] for i in range(x.shape[0])]


@pytest.mark.parametrize("name", ["non-contiguous features", "big-endian features",
                                  "float64 boxes", "list of boxes"])
def test_other_inputs_take_the_general_path_with_the_same_numbers(name, monkeypatch):
    x, boxes = _case(np.float32)
    fast_align = curoi.roi_align(x, boxes, (3, 4), SCALE, 0, False)
    fast_pool = curoi.roi_pool(x, boxes, (3, 4), SCALE, return_argmax=True)
    _, x2, boxes2 = next(v for v in _variants(x, boxes) if v[0] == name)
    if name == "list of boxes":  # the list regroups the boxes by image
        order = np.argsort(boxes[:, 0], kind="stable")
        fast_align = fast_align[order]
        fast_pool = tuple(a[order] for a in fast_pool)
    calls = []
    real = _interop.Caller

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr("curoi._frontend.Caller", counting)
    np.testing.assert_array_equal(curoi.roi_align(x2, boxes2, (3, 4), SCALE, 0, False),
                                  fast_align)
    y, argmax = curoi.roi_pool(x2, boxes2, (3, 4), SCALE, return_argmax=True)
    np.testing.assert_array_equal(y, fast_pool[0])
    np.testing.assert_array_equal(argmax, fast_pool[1])
    assert len(calls) == 2


def test_read_only_arrays_give_the_same_numbers(no_general_path):
    # Writable buffers hand their address to ctypes directly, read-only ones
    # (JAX's, a frozen array) through numpy: the kernel must read the same.
    x, boxes = _case()
    want = curoi.roi_align(x, boxes, (3, 4), SCALE, 2, True)
    x.setflags(write=False)
    boxes.setflags(write=False)
    np.testing.assert_array_equal(curoi.roi_align(x, boxes, (3, 4), SCALE, 2, True), want)


def test_empty_inputs_take_the_general_path(no_general_path):
    x, boxes = _case()
    with pytest.raises(_GeneralPathTaken):
        curoi.roi_align(x, boxes[:0], 2)
    with pytest.raises(_GeneralPathTaken):
        curoi.roi_pool(x[:, :0], boxes, 2)


def test_fast_path_checks_arguments_as_the_general_path(no_general_path):
    x, boxes = _case()
    with pytest.raises(ValueError, match="output_size"):
        curoi.roi_align(x, boxes, 0)
    with pytest.raises(ValueError, match="spatial_scale"):
        curoi.roi_align(x, boxes, 2, 1e39)   # not a finite float32
    with pytest.raises(TypeError, match="aligned"):
        curoi.roi_align(x, boxes, 2, aligned=1)


# ------------------------------------------------------------------ torch
torch = pytest.importorskip("torch")
import curoi.torch as ct  # noqa: E402


@pytest.fixture
def no_op(monkeypatch):
    """Fail any call that reaches the custom ops."""
    def refuse(*args, **kwargs):
        raise _GeneralPathTaken
    monkeypatch.setattr(ct, "_roi_align_op", refuse)
    monkeypatch.setattr(ct, "_roi_pool_op", refuse)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_direct_call_is_taken_and_equals_the_op(dtype, no_op):
    x, boxes = _case(dtype)
    xt, bt = torch.from_numpy(x), torch.from_numpy(boxes)
    y = ct.roi_align(xt, bt, (3, 4), SCALE, 2, True)
    p = ct.roi_pool(xt, bt, (3, 4), SCALE)
    assert isinstance(y, torch.Tensor) and y.dtype == xt.dtype
    np.testing.assert_array_equal(y.numpy(), curoi.roi_align(x, boxes, (3, 4), SCALE, 2, True))
    np.testing.assert_array_equal(p.numpy(), curoi.roi_pool(x, boxes, (3, 4), SCALE))
    with torch.no_grad():   # features that require grad, with grad off
        ct.roi_align(xt.clone().requires_grad_(), bt, 2)


def _refusing(monkeypatch):
    def refuse(*args, **kwargs):
        raise _GeneralPathTaken
    monkeypatch.setattr(curoi._cpu, "kernel", refuse)


def test_torch_calls_that_need_the_op_do_not_take_the_direct_path(monkeypatch):
    x, boxes = _case()
    xt, bt = torch.from_numpy(x), torch.from_numpy(boxes)
    want = curoi.roi_align(x, boxes, 2, SCALE)
    _refusing(monkeypatch)   # the direct path would fail now
    # A gradient is needed.
    g = xt.clone().requires_grad_()
    ct.roi_align(g, bt, 2, SCALE).sum().backward()
    assert g.grad is not None
    # A dispatch mode must see the op.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))
    with Log() as log:
        y = ct.roi_align(xt, bt, 2, SCALE)
    assert any("curoi.roi_align" in op for op in log.ops), log.ops
    np.testing.assert_array_equal(y.numpy(), want)
    # A functorch transform.
    y = torch.vmap(lambda t: ct.roi_align(t, bt, 2, SCALE))(xt[None])
    np.testing.assert_array_equal(y[0].numpy(), want)
    # Half precision and non-contiguous features.
    ct.roi_align(xt.to(torch.bfloat16), bt, 2, SCALE)
    ct.roi_align(xt.transpose(2, 3), bt, 2, SCALE)

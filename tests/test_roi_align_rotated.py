"""Rotated RoI Align through every front end: curoi.roi_align_rotated (NumPy,
any DLPack array), curoi.torch (function, RoIAlignRotated, autograd,
gradcheck, opcheck, torch.compile) and curoi.jax (jit, grad, vmap). The
kernels are tested in test_roi_align_rotated_kernels.py; expected values
here come from the NumPy reference (detectron2's and mmcv's formulas) and
from roi_align itself at angle 0."""

import numpy as np
import pytest

import curoi
import reference as ref

SIZE = (2, 3)
CONVENTIONS = {"detectron2": dict(aligned=True, clockwise=False),
               "mmcv": dict(aligned=False, clockwise=True)}


def _case(seed, dtype=np.float64, n=2, c=3, h=9, w=11, k=6, degrees=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    centre = rng.uniform([0, 0], [2 * w, 2 * h], (k, 2))
    size = rng.uniform(1, 12, (k, 2))
    angle = rng.uniform(-180, 180, (k, 1))
    if not degrees:
        angle = np.deg2rad(angle)
    boxes = np.concatenate([rng.integers(0, n, (k, 1)), centre, size, angle], axis=1)
    return rng, x, boxes.astype(dtype)


@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ratio", [0, 2])
@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_numpy_matches_the_reference(convention, ratio, dtype, data_format):
    rng, x, boxes = _case(1 + ratio, dtype, degrees=convention == "detectron2")
    kw = dict(convention=convention, **CONVENTIONS[convention])
    want = ref.roi_align_rotated(x, boxes, SIZE, 0.5, ratio, **kw)
    g = rng.standard_normal(want.shape).astype(dtype)
    want_grad = ref.roi_align_rotated_backward(g, boxes, x.shape, SIZE, 0.5, ratio, **kw)
    t = ((lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1)))
         if data_format == "NHWC" else (lambda a: a))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)
    y = curoi.roi_align_rotated(t(x), boxes, SIZE, 0.5, ratio, data_format=data_format, **kw)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, t(want), **tol)
    gx = curoi.roi_align_rotated_backward(t(g), boxes, t(x).shape, SIZE, 0.5, ratio,
                                          data_format=data_format, **kw)
    np.testing.assert_allclose(gx, t(want_grad), **tol)


def test_angle_zero_is_roi_align_aligned():
    _, x, boxes = _case(3)
    boxes[:, 5] = 0
    cx, cy, w, h = boxes[:, 1], boxes[:, 2], boxes[:, 3], boxes[:, 4]
    axis_aligned = np.stack([boxes[:, 0], cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    np.testing.assert_allclose(curoi.roi_align_rotated(x, boxes, SIZE, 0.5, 2),
                               curoi.roi_align(x, axis_aligned, SIZE, 0.5, 2, True),
                               rtol=1e-12, atol=1e-12)


def test_list_of_boxes_equals_k6():
    _, x, boxes = _case(4)
    order = np.argsort(boxes[:, 0], kind="stable")
    per_image = [boxes[boxes[:, 0] == i, 1:] for i in range(x.shape[0])]
    np.testing.assert_array_equal(curoi.roi_align_rotated(x, per_image, SIZE, 0.5),
                                  curoi.roi_align_rotated(x, boxes, SIZE, 0.5)[order])


def test_bad_arguments_are_named():
    _, x, boxes = _case(5)
    with pytest.raises(ValueError, match="aligned=False is for convention='mmcv'"):
        curoi.roi_align_rotated(x, boxes, SIZE, aligned=False)
    with pytest.raises(ValueError, match="clockwise=True is for convention='mmcv'"):
        curoi.roi_align_rotated(x, boxes, SIZE, clockwise=True)
    with pytest.raises(ValueError, match="convention"):
        curoi.roi_align_rotated(x, boxes, SIZE, convention="opencv")
    with pytest.raises(TypeError, match="clockwise"):
        curoi.roi_align_rotated(x, boxes, SIZE, convention="mmcv", clockwise=1)
    with pytest.raises(ValueError, match="sampling_ratio=1025"):
        curoi.roi_align_rotated(x, boxes, SIZE, sampling_ratio=1025)
    with pytest.raises(ValueError, match=r"\[K, 6\].*centre x"):
        curoi.roi_align_rotated(x, boxes[:, :5], SIZE)
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        curoi.roi_align_rotated(x, [boxes[:2, 1:5]], SIZE)


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_numpy_boxes_gradient_matches_the_reference(convention):
    rng, x, boxes = _case(11, degrees=convention == "detectron2")
    kw = dict(convention=convention, **CONVENTIONS[convention])
    g = rng.standard_normal((len(boxes), x.shape[1]) + SIZE)
    got = curoi.roi_align_rotated_boxes_backward(g, x, boxes, SIZE, 0.5, 2, **kw)
    assert got.shape == boxes.shape and got.dtype == boxes.dtype
    np.testing.assert_allclose(
        got, ref.roi_align_rotated_boxes_backward(g, x, boxes, SIZE, 0.5, 2, **kw),
        rtol=1e-10, atol=1e-12)
    # NHWC, and boxes as a list per image, give the same gradient, shaped alike.
    nhwc = curoi.roi_align_rotated_boxes_backward(
        np.moveaxis(g, 1, -1).copy(), np.moveaxis(x, 1, -1).copy(), boxes, SIZE, 0.5, 2,
        data_format="NHWC", **kw)
    np.testing.assert_array_equal(nhwc, got)
    order = np.argsort(boxes[:, 0], kind="stable")
    lists = [boxes[boxes[:, 0] == i, 1:] for i in range(x.shape[0])]
    parts = curoi.roi_align_rotated_boxes_backward(g[order], x, lists, SIZE, 0.5, 2, **kw)
    np.testing.assert_array_equal(np.concatenate(parts), got[order, 1:])


# ------------------------------------------------------------------ torch
torch = pytest.importorskip("torch")
import curoi.torch as ct  # noqa: E402


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_torch_function_module_and_gradient(convention):
    rng, x, boxes = _case(6, degrees=convention == "detectron2")
    kw = dict(convention=convention, **CONVENTIONS[convention])
    want = ref.roi_align_rotated(x, boxes, SIZE, 0.5, 0, **kw)
    tx = torch.tensor(x, requires_grad=True)
    y = ct.roi_align_rotated(tx, torch.tensor(boxes), SIZE, 0.5, 0, **kw)
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(want.shape)
    y.backward(torch.tensor(g))
    np.testing.assert_allclose(
        tx.grad.numpy(), ref.roi_align_rotated_backward(g, boxes, x.shape, SIZE, 0.5, 0, **kw),
        rtol=1e-12, atol=1e-12)
    module = ct.RoIAlignRotated(SIZE, 0.5, 0, **kw)
    np.testing.assert_array_equal(module(torch.tensor(x), torch.tensor(boxes)).numpy(),
                                  y.detach().numpy())
    text = repr(module)
    assert text.startswith("RoIAlignRotated(output_size=(2, 3), spatial_scale=0.5")
    assert ("convention='mmcv'" in text) == (convention == "mmcv")


def test_torch_gradcheck_opcheck_and_compile():
    from torch.library import opcheck
    _, x, boxes = _case(7, n=1, h=6, w=7, k=3)
    boxes[:, 0] = 0
    tx = torch.tensor(x, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: ct.roi_align_rotated(t, torch.tensor(boxes), SIZE, 0.5, 2), (tx,),
        eps=1e-6, atol=1e-6)
    opcheck(torch.ops.curoi.roi_align_rotated.default,
            (tx.float(), torch.tensor(boxes).float(), 0.5, 2, 3, 0, "detectron2", True, False))

    def head(x, boxes):
        return ct.roi_align_rotated(torch.relu(x), boxes, SIZE, 0.5).sum()

    compiled = torch.compile(head, backend="aot_eager", fullgraph=True, dynamic=True)
    for seed, k in ((8, 4), (9, 7)):
        _, x, boxes = _case(seed, np.float32, k=k)
        a, b = (torch.tensor(x, requires_grad=True) for _ in range(2))
        compiled(a, torch.tensor(boxes)).backward()
        head(b, torch.tensor(boxes)).backward()
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_torch_boxes_gradient_gradcheck(convention):
    # The box gradient is asked for (detectron2's and mmcv's give none, and
    # neither does curoi.torch by default).
    # Finite differences on the box numbers (not the batch index, where the
    # result jumps), with samples kept off whole pixels by the seed.
    _, x, boxes = _case(12, n=1, h=8, w=9, k=3, degrees=convention == "detectron2")
    kw = dict(convention=convention, **CONVENTIONS[convention])
    tx = torch.tensor(x)
    index = torch.tensor(boxes[:, :1])
    numbers = torch.tensor(boxes[:, 1:], requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda b: ct.roi_align_rotated(tx, torch.cat([index, b], dim=1), SIZE, 0.5, 2,
                                       boxes_grad=True, **kw),
        (numbers,), eps=1e-6, atol=1e-5)
    tb = torch.tensor(boxes, requires_grad=True)
    y = ct.roi_align_rotated(tx, tb, SIZE, 0.5, 2, boxes_grad=True, **kw)
    g = torch.randn(y.shape, dtype=y.dtype)
    (grad,) = torch.autograd.grad(y, tb, g)
    np.testing.assert_array_equal(grad.numpy(), curoi.roi_align_rotated_boxes_backward(
        g.numpy(), x, boxes, SIZE, 0.5, 2, **kw))


# -------------------------------------------------------------------- JAX
jax = pytest.importorskip("jax")
import curoi.jax as cj  # noqa: E402
jnp = jax.numpy


def test_jax_jit_grad_and_vmap():
    rng, x, boxes = _case(10, np.float32)
    want = ref.roi_align_rotated(x, boxes, SIZE, 0.5, 0)

    def f(x, boxes):
        return cj.roi_align_rotated(x, boxes, SIZE, 0.5)

    np.testing.assert_allclose(np.asarray(jax.jit(f)(jnp.asarray(x), jnp.asarray(boxes))),
                               want, rtol=1e-5, atol=1e-5)
    g = rng.standard_normal(want.shape).astype(np.float32)
    grad = jax.grad(lambda x: jnp.sum(f(x, jnp.asarray(boxes)) * g))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(grad),
                               ref.roi_align_rotated_backward(g, boxes, x.shape, SIZE, 0.5, 0),
                               rtol=1e-5, atol=1e-5)
    both = jnp.asarray(np.stack([boxes, boxes * [1, 1, 1, 1, 1, -1]]))
    ys = jax.vmap(lambda b: f(jnp.asarray(x), b))(both)
    np.testing.assert_allclose(np.asarray(ys[0]), want, rtol=1e-5, atol=1e-5)
    flipped = boxes * np.array([1, 1, 1, 1, 1, -1], np.float32)
    np.testing.assert_allclose(np.asarray(ys[1]), ref.roi_align_rotated(x, flipped, SIZE, 0.5, 0),
                               rtol=1e-5, atol=1e-5)


def test_jax_boxes_gradient():
    rng, x, boxes = _case(13, np.float32)
    g = rng.standard_normal((len(boxes), x.shape[1]) + SIZE).astype(np.float32)
    grad = jax.jit(jax.grad(lambda b: jnp.sum(
        cj.roi_align_rotated(jnp.asarray(x), b, SIZE, 0.5, 2) * g)))(jnp.asarray(boxes))
    np.testing.assert_array_equal(np.asarray(grad), curoi.roi_align_rotated_boxes_backward(
        g, x, boxes, SIZE, 0.5, 2))

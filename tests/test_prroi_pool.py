"""Precise RoI Pooling through every front end: curoi.prroi_pool and its
gradients (NumPy, any DLPack array), curoi.torch (function, PrRoIPool,
autograd for features and boxes, gradcheck, opcheck, torch.compile) and
curoi.jax (jit, grad for features and boxes, vmap). The kernels are tested
in test_prroi_pool_kernels.py; expected values come from the NumPy
reference (mmcv's cell-by-cell formulas) and finite differences."""

import numpy as np
import pytest

import curoi
import reference as ref

SIZE = (2, 3)


def _case(seed, dtype=np.float64, n=2, c=3, h=9, w=11, k=6, scale=0.5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    boxes = ref.random_boxes(rng, n, h, w, scale, k, dtype=dtype)
    return rng, x, boxes, scale


@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_matches_the_reference(dtype, data_format):
    rng, x, boxes, scale = _case(1, dtype)
    want = ref.prroi_pool(x, boxes, SIZE, scale)
    g = rng.standard_normal(want.shape).astype(dtype)
    want_grad = ref.prroi_pool_backward(g, boxes, x.shape, SIZE, scale)
    t = ((lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1)))
         if data_format == "NHWC" else (lambda a: a))
    tol = dict(rtol=1e-11, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(curoi.prroi_pool(t(x), boxes, SIZE, scale,
                                                data_format=data_format), t(want), **tol)
    np.testing.assert_allclose(
        curoi.prroi_pool_backward(t(g), boxes, t(x).shape, SIZE, scale,
                                  data_format=data_format), t(want_grad), **tol)
    gb = curoi.prroi_pool_boxes_backward(t(g), t(x), boxes, SIZE, scale,
                                         data_format=data_format)
    assert gb.shape == boxes.shape and gb.dtype == dtype
    if dtype == np.float64:
        np.testing.assert_allclose(gb, ref.prroi_pool_boxes_backward(g, x, boxes, SIZE, scale),
                                   rtol=1e-9, atol=1e-10)


def test_box_gradient_matches_finite_differences_and_lists():
    rng, x, _, _ = _case(2, k=3)
    boxes = np.array([[0, 1.3, 2.1, 15.7, 13.9], [1, 4.2, 0.6, 9.9, 16.3],
                      [1, 0.4, 3.3, 17.6, 12.8]])
    g = rng.standard_normal((3, 3) + SIZE)
    gb = curoi.prroi_pool_boxes_backward(g, x, boxes, SIZE, 0.5)
    eps = 1e-6
    for k in range(3):
        for j in range(1, 5):
            up, down = boxes.copy(), boxes.copy()
            up[k, j] += eps
            down[k, j] -= eps
            fd = np.sum((curoi.prroi_pool(x, up, SIZE, 0.5)
                         - curoi.prroi_pool(x, down, SIZE, 0.5)) * g) / (2 * eps)
            assert abs(fd - gb[k, j]) < 1e-6 * max(1, abs(fd))
    assert not gb[:, 0].any()
    per_image = curoi.prroi_pool_boxes_backward(g, x, [boxes[:1, 1:], boxes[1:, 1:]], SIZE, 0.5)
    np.testing.assert_array_equal(np.concatenate(per_image), gb[:, 1:])


# ------------------------------------------------------------------ torch
torch = pytest.importorskip("torch")
import curoi.torch as ct  # noqa: E402


def test_torch_autograd_gradcheck_opcheck_and_module():
    from torch.library import opcheck
    _, x, _, _ = _case(3, n=1, h=6, w=7, k=2)
    tx = torch.tensor(x, requires_grad=True)
    batch = torch.zeros(2, 1, dtype=torch.float64)
    corners = torch.tensor([[1.3, 2.1, 9.7, 8.9], [0.4, 0.6, 11.9, 10.3]],
                           dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t, c: ct.prroi_pool(t, torch.cat([batch, c], 1), SIZE, 0.5), (tx, corners),
        eps=1e-6, atol=1e-6)
    rois = torch.cat([batch, corners.detach()], 1).float()
    opcheck(torch.ops.curoi.prroi_pool.default, (tx.detach().float(), rois, 0.5, 2, 3))
    opcheck(torch.ops.curoi.prroi_pool_boxes_backward.default,
            (torch.randn(2, 3, 2, 3), tx.detach().float(), rois, 0.5, 2, 3))
    module = ct.PrRoIPool(SIZE, 0.5)
    np.testing.assert_allclose(module(tx.detach(), torch.cat([batch, corners.detach()], 1)).numpy(),
                               ref.prroi_pool(x, torch.cat([batch, corners], 1).detach().numpy(),
                                              SIZE, 0.5), rtol=1e-11, atol=1e-12)
    assert repr(module) == "PrRoIPool(output_size=(2, 3), spatial_scale=0.5)"


def test_torch_compile_fullgraph_dynamic():
    def head(x, boxes):
        return ct.prroi_pool(torch.relu(x), boxes, SIZE, 0.5).sum()

    compiled = torch.compile(head, backend="aot_eager", fullgraph=True, dynamic=True)
    for seed, k in ((4, 5), (5, 8)):
        _, x, boxes, _ = _case(seed, np.float32, k=k)
        a, b = (torch.tensor(x, requires_grad=True) for _ in range(2))
        ra, rb = (torch.tensor(boxes, requires_grad=True) for _ in range(2))
        compiled(a, ra).backward()
        head(b, rb).backward()
        torch.testing.assert_close(a.grad, b.grad)
        torch.testing.assert_close(ra.grad, rb.grad)


# -------------------------------------------------------------------- JAX
jax = pytest.importorskip("jax")
import curoi.jax as cj  # noqa: E402
jnp = jax.numpy


def test_jax_jit_grad_and_vmap():
    rng, x, boxes, scale = _case(6, np.float32)
    want = ref.prroi_pool(x, boxes, SIZE, scale)
    g = rng.standard_normal(want.shape).astype(np.float32)

    def loss(x, b):
        return jnp.sum(cj.prroi_pool(x, b, SIZE, scale) * g)

    gx, gb = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(boxes))
    np.testing.assert_allclose(np.asarray(gx), ref.prroi_pool_backward(g, boxes, x.shape,
                                                                       SIZE, scale),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gb),
                               ref.prroi_pool_boxes_backward(g, x, boxes, SIZE, scale),
                               rtol=1e-3, atol=1e-3)
    ys = jax.vmap(lambda x: cj.prroi_pool(x, jnp.asarray(boxes), SIZE, scale))(
        jnp.asarray(np.stack([x, -x])))
    np.testing.assert_allclose(np.asarray(ys[1]), -want, rtol=1e-4, atol=1e-5)

"""RoI Align's max mode (mmcv's RoIAlign(pool_mode="max")) through every
front end: curoi.roi_align(mode="max", return_argmax=...) and
roi_align_backward(mode="max", argmax=...), curoi.torch.roi_align(mode=...)
and RoIAlign(mode=...), curoi.jax.roi_align(mode=...). The kernels are
tested in test_roi_align_max_kernels.py; expected values here come from the
NumPy reference (written from mmcv's formulas) and finite differences."""

import numpy as np
import pytest

import curoi
import reference as ref

SIZE = (2, 3)


def _case(seed, dtype=np.float64, n=2, c=3, h=9, w=11, k=7, scale=0.5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    boxes = ref.random_boxes(rng, n, h, w, scale, k, dtype=dtype)
    return rng, x, boxes, scale


@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [0, 2])
def test_numpy_matches_the_reference(ratio, aligned, dtype, data_format):
    rng, x, boxes, scale = _case(11 + ratio, dtype)
    want, want_argmax = ref.roi_align_max_interpolated(x, boxes, SIZE, scale, ratio, aligned)
    g = rng.standard_normal(want.shape).astype(dtype)
    want_grad = ref.roi_align_max_interpolated_backward(g, want_argmax, boxes, x.shape,
                                                        SIZE, scale, ratio, aligned)
    t = ((lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1)))
         if data_format == "NHWC" else (lambda a: a))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)
    y, argmax = curoi.roi_align(t(x), boxes, SIZE, scale, ratio, aligned, mode="max",
                                return_argmax=True, data_format=data_format)
    assert argmax.dtype == np.int64
    np.testing.assert_allclose(y, t(want), **tol)
    if dtype == np.float64:  # float32 may pick another sample on a near tie
        np.testing.assert_array_equal(argmax, t(want_argmax))
    np.testing.assert_array_equal(
        curoi.roi_align(t(x), boxes, SIZE, scale, ratio, aligned, mode="max",
                        data_format=data_format), y)
    gx = curoi.roi_align_backward(t(g), boxes, t(x).shape, SIZE, scale, ratio, aligned,
                                  mode="max", argmax=argmax, data_format=data_format)
    if dtype == np.float64:
        np.testing.assert_allclose(gx, t(want_grad), **tol)
    np.testing.assert_array_equal(
        gx, curoi.roi_align_backward(t(g), boxes, t(x).shape, SIZE, scale, ratio, aligned,
                                     mode="max", argmax=argmax, deterministic=True,
                                     data_format=data_format))


def test_gradient_matches_finite_differences():
    rng, x, boxes, scale = _case(12, k=4)
    boxes = boxes[np.isfinite(boxes).all(axis=1)]
    y, argmax = curoi.roi_align(x, boxes, SIZE, scale, 2, True, mode="max",
                                return_argmax=True)
    g = rng.standard_normal(y.shape)
    gx = curoi.roi_align_backward(g, boxes, x.shape, SIZE, scale, 2, True, mode="max",
                                  argmax=argmax)
    eps = 1e-6
    checked = nonzero = 0
    # Pixels that receive gradient, then random ones (mostly 0).
    winners = [tuple(i) for i in np.argwhere(gx != 0)[:15]]
    for index in winners + list(map(tuple, rng.integers(0, x.shape, size=(10, 4)))):
        up, down = x.copy(), x.copy()
        up[index] += eps
        down[index] -= eps
        _, a_up = curoi.roi_align(up, boxes, SIZE, scale, 2, True, mode="max",
                                  return_argmax=True)
        _, a_down = curoi.roi_align(down, boxes, SIZE, scale, 2, True, mode="max",
                                    return_argmax=True)
        if not (np.array_equal(a_up, argmax) and np.array_equal(a_down, argmax)):
            continue  # a winner changes: the maximum is not differentiable here
        f = lambda v: np.sum(curoi.roi_align(v, boxes, SIZE, scale, 2, True,  # noqa: E731
                                             mode="max") * g)
        assert abs((f(up) - f(down)) / (2 * eps) - gx[index]) < 1e-6
        checked += 1
        nonzero += gx[index] != 0
    # Not vacuous: most points had stable winners, and some moved the output.
    assert checked >= 15 and nonzero >= 5, (checked, nonzero)


def test_a_bin_without_samples_gives_zero_and_no_gradient():
    x = -np.ones((1, 1, 6, 6))  # negative: a -inf or -10000 start would show
    boxes = np.array([[0, 3, 3, 3, 3]], np.float64)  # no extent: no samples
    y, argmax = curoi.roi_align(x, boxes, 2, 1.0, 0, True, mode="max", return_argmax=True)
    np.testing.assert_array_equal(y, np.zeros((1, 1, 2, 2)))
    np.testing.assert_array_equal(argmax, -np.ones((1, 1, 2, 2)))
    gx = curoi.roi_align_backward(np.ones((1, 1, 2, 2)), boxes, x.shape, 2, 1.0, 0, True,
                                  mode="max", argmax=argmax)
    assert not gx.any()


def test_mode_and_argmax_errors_name_the_argument():
    _, x, boxes, scale = _case(13)
    with pytest.raises(ValueError, match="mode"):
        curoi.roi_align(x, boxes, SIZE, mode="min")
    with pytest.raises(TypeError, match="mode"):
        curoi.roi_align(x, boxes, SIZE, mode=None)
    with pytest.raises(ValueError, match="return_argmax"):
        curoi.roi_align(x, boxes, SIZE, return_argmax=True)
    with pytest.raises(TypeError, match="return_argmax"):
        curoi.roi_align(x, boxes, SIZE, mode="max", return_argmax=1)
    g = np.zeros((len(boxes), 3) + SIZE)
    with pytest.raises(TypeError, match="argmax"):
        curoi.roi_align_backward(g, boxes, x.shape, SIZE, mode="max")
    with pytest.raises(ValueError, match="argmax"):
        curoi.roi_align_backward(g, boxes, x.shape, SIZE, argmax=np.zeros(g.shape, np.int64))
    with pytest.raises(ValueError, match="argmax"):
        curoi.roi_align_backward(g, boxes, x.shape, SIZE, mode="max",
                                 argmax=np.zeros((1, 3) + SIZE, np.int64))
    with pytest.raises(TypeError, match="argmax"):
        curoi.roi_align_backward(g, boxes, x.shape, SIZE, mode="max",
                                 argmax=np.zeros(g.shape, np.float32))


# ------------------------------------------------------------------ torch
torch = pytest.importorskip("torch")
import curoi.torch as ct  # noqa: E402


def test_torch_function_module_and_gradient():
    rng, x, boxes, scale = _case(14)
    want, want_argmax = ref.roi_align_max_interpolated(x, boxes, SIZE, scale, 2, True)
    tx = torch.tensor(x, requires_grad=True)
    y = ct.roi_align(tx, torch.tensor(boxes), SIZE, scale, 2, True, mode="max")
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(want.shape)
    y.backward(torch.tensor(g))
    np.testing.assert_allclose(
        tx.grad.numpy(),
        ref.roi_align_max_interpolated_backward(g, want_argmax, boxes, x.shape, SIZE,
                                                scale, 2, True),
        rtol=1e-12, atol=1e-12)
    module = ct.RoIAlign(SIZE, scale, 2, True, mode="max")
    np.testing.assert_array_equal(module(torch.tensor(x), torch.tensor(boxes)).numpy(),
                                  y.detach().numpy())
    assert repr(module).endswith("aligned=True, mode='max')")
    assert repr(ct.RoIAlign(SIZE, scale, 2)).endswith("aligned=False)")
    with pytest.raises(ValueError, match="mode"):
        ct.roi_align(tx, torch.tensor(boxes), SIZE, mode="maximum")


def test_torch_gradcheck_and_opcheck():
    from torch.library import opcheck
    _, x, boxes, scale = _case(15, n=1, h=6, w=7, k=3)
    boxes = boxes[np.isfinite(boxes).all(axis=1)]
    tx = torch.tensor(x, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: ct.roi_align(t, torch.tensor(boxes), SIZE, scale, 2, True, mode="max"),
        (tx,), eps=1e-7, atol=1e-6)
    opcheck(torch.ops.curoi.roi_align_max.default,
            (tx.float(), torch.tensor(boxes).float(), scale, 2, 3, 2, True))


def test_torch_compile_fullgraph_dynamic():
    def head(x, boxes):
        return ct.roi_align(torch.relu(x), boxes, SIZE, 0.5, 0, True, mode="max").sum()

    compiled = torch.compile(head, backend="aot_eager", fullgraph=True, dynamic=True)
    for seed, (n, h, w, k) in enumerate([(2, 9, 11, 5), (3, 12, 10, 8)]):
        _, x, boxes, _ = _case(30 + seed, np.float32, n=n, h=h, w=w, k=k)
        tx = torch.tensor(x, requires_grad=True)
        tx2 = torch.tensor(x, requires_grad=True)
        compiled(tx, torch.tensor(boxes)).backward()
        head(tx2, torch.tensor(boxes)).backward()
        torch.testing.assert_close(tx.grad, tx2.grad)


def test_torch_onnx_export_refuses_the_max_mode(tmp_path):
    pytest.importorskip("onnx")

    class Head(torch.nn.Module):
        def forward(self, x, boxes):
            return ct.roi_align(x, boxes, SIZE, 0.5, 2, True, mode="max")

    _, x, boxes, _ = _case(16, np.float32)
    with pytest.raises(Exception, match="mode='max'"):
        torch.onnx.export(Head(), (torch.tensor(x), torch.tensor(boxes)),
                          str(tmp_path / "head.onnx"), dynamo=False, opset_version=16)


# -------------------------------------------------------------------- JAX
jax = pytest.importorskip("jax")
import curoi.jax as cj  # noqa: E402
jnp = jax.numpy


def test_jax_jit_grad_and_vmap():
    rng, x, boxes, scale = _case(17, np.float32)
    want, want_argmax = ref.roi_align_max_interpolated(x, boxes, SIZE, scale, 2, False)

    def f(x, boxes):
        return cj.roi_align(x, boxes, SIZE, scale, 2, mode="max")

    np.testing.assert_allclose(np.asarray(jax.jit(f)(jnp.asarray(x), jnp.asarray(boxes))),
                               want, rtol=1e-5, atol=1e-5)
    g = rng.standard_normal(want.shape).astype(np.float32)
    grad = jax.grad(lambda x: jnp.sum(f(x, jnp.asarray(boxes)) * g))(jnp.asarray(x))
    np.testing.assert_allclose(
        np.asarray(grad),
        ref.roi_align_max_interpolated_backward(g, want_argmax, boxes, x.shape, SIZE, scale,
                                                2, False),
        rtol=1e-5, atol=1e-5)
    xs = jnp.asarray(np.stack([x, 2 * x]))
    ys = jax.vmap(lambda x: f(x, jnp.asarray(boxes)))(xs)
    np.testing.assert_allclose(np.asarray(ys[1]), 2 * want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        cj.roi_align(jnp.asarray(x), jnp.asarray(boxes), SIZE, mode="median")

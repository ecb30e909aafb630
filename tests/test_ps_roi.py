"""Position-sensitive RoI Pool and RoI Align through every front end:
curoi.ps_roi_pool/ps_roi_align (NumPy, any DLPack array), curoi.torch (ops,
modules, autograd, gradcheck, opcheck, torch.compile) and curoi.jax (jit,
grad, vmap, eval_shape). The kernels themselves are tested in
test_ps_roi_kernels.py; here the expected values come from the NumPy
reference and finite differences, as there."""

import numpy as np
import pytest

import curoi
import reference as ref

OPS = ("ps_roi_pool", "ps_roi_align")
PH, PW = 2, 3
C_OUT = 2


def _case(seed, dtype=np.float64, n=2, h=9, w=11, k=7, scale=0.5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, C_OUT * PH * PW, h, w)).astype(dtype)
    boxes = ref.random_boxes(rng, n, h, w, scale, k, dtype=dtype)
    return rng, x, boxes, scale


def _reference(name, x, boxes, scale, ratio=2):
    if name == "ps_roi_pool":
        return ref.ps_roi_pool(x, boxes, (PH, PW), scale)
    return ref.ps_roi_align(x, boxes, (PH, PW), scale, ratio)


def _reference_backward(name, g, boxes, shape, scale, ratio=2):
    if name == "ps_roi_pool":
        return ref.ps_roi_pool_backward(g, boxes, shape, (PH, PW), scale)
    return ref.ps_roi_align_backward(g, boxes, shape, (PH, PW), scale, ratio)


def _extra(name, ratio=2):
    return () if name == "ps_roi_pool" else (ratio,)


# ------------------------------------------------------------------ NumPy
@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", OPS)
def test_numpy_forward_and_backward_match_the_reference(name, dtype, data_format):
    rng, x, boxes, scale = _case(3, dtype)
    forward = getattr(curoi, name)
    backward = getattr(curoi, name + "_backward")
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)
    want = _reference(name, x, boxes, scale)
    g = rng.standard_normal(want.shape).astype(dtype)
    want_grad = _reference_backward(name, g, boxes, x.shape, scale)
    if data_format == "NHWC":
        t = lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))  # noqa: E731
        x, g, want, want_grad = t(x), t(g), t(want), t(want_grad)
    y = forward(x, boxes, (PH, PW), scale, *_extra(name), data_format=data_format)
    assert y.dtype == dtype and y.shape == want.shape
    np.testing.assert_allclose(y, want, **tol)
    gx = backward(g, boxes, x.shape, (PH, PW), scale, *_extra(name),
                  data_format=data_format)
    np.testing.assert_allclose(gx, want_grad, **tol)
    # Deterministic and plain sums agree (the CPU's are both bitwise fixed).
    np.testing.assert_array_equal(
        gx, backward(g, boxes, x.shape, (PH, PW), scale, *_extra(name),
                     deterministic=True, data_format=data_format))


@pytest.mark.parametrize("name", OPS)
def test_list_of_boxes_equals_k5(name):
    _, x, boxes, scale = _case(4)
    forward = getattr(curoi, name)
    order = np.argsort(boxes[:, 0], kind="stable")
    per_image = [boxes[boxes[:, 0] == i, 1:] for i in range(x.shape[0])]
    np.testing.assert_array_equal(
        forward(x, per_image, (PH, PW), scale, *_extra(name)),
        forward(x, boxes, (PH, PW), scale, *_extra(name))[order])


@pytest.mark.parametrize("name", OPS)
def test_channels_must_be_a_multiple_of_the_bins(name):
    x = np.zeros((1, 7, 5, 5), np.float32)
    boxes = np.array([[0, 0, 0, 4, 4]], np.float32)
    with pytest.raises(ValueError, match=r"input has C = 7 channels.*2 x 3 = 6"):
        getattr(curoi, name)(x, boxes, (PH, PW))
    g = np.zeros((1, 1, PH, PW), np.float32)
    with pytest.raises(ValueError, match=r"input_shape has C = 7 channels"):
        getattr(curoi, name + "_backward")(g, boxes, (1, 7, 5, 5), (PH, PW))
    # grad_output must have C_out = C / (PH x PW) channels
    with pytest.raises(ValueError, match="grad_output"):
        getattr(curoi, name + "_backward")(np.zeros((1, 6, PH, PW), np.float32), boxes,
                                           (1, 6, 5, 5), (PH, PW))


def test_bad_arguments_are_named():
    x = np.zeros((1, 6, 5, 5), np.float32)
    boxes = np.array([[0, 0, 0, 4, 4]], np.float32)
    with pytest.raises(TypeError, match="sampling_ratio"):
        curoi.ps_roi_align(x, boxes, (PH, PW), 1.0, 2.5)
    with pytest.raises(ValueError, match="spatial_scale"):
        curoi.ps_roi_pool(x, boxes, (PH, PW), -1.0)
    with pytest.raises(ValueError, match="boxes"):
        curoi.ps_roi_pool(x, boxes[:, 1:], (PH, PW))
    with pytest.raises(ValueError, match="data_format"):
        curoi.ps_roi_pool(x, boxes, (PH, PW), data_format="NDHW")


def test_empty_box_with_adaptive_sampling_gives_zero_not_nan():
    # torchvision divides by a sample count of 0 here (NaN); curoi gives 0.
    x = np.ones((1, 6, 5, 5), np.float64)
    boxes = np.array([[0, 2, 2, 2, 2]], np.float64)
    y = curoi.ps_roi_align(x, boxes, (PH, PW), 1.0, 0)
    np.testing.assert_array_equal(y, np.zeros((1, 1, PH, PW)))
    gx = curoi.ps_roi_align_backward(np.ones((1, 1, PH, PW)), boxes, x.shape, (PH, PW),
                                     1.0, 0)
    assert not gx.any()


def test_ps_roi_pool_never_reads_the_last_row_and_column():
    # torchvision's forward clips bin ends to H - 1 and W - 1: a box over
    # the whole 3 x 3 map averages rows and columns 0-1 only (by hand).
    x = np.arange(9, dtype=np.float64).reshape(1, 1, 3, 3)
    y = curoi.ps_roi_pool(x, np.array([[0, 0, 0, 2, 2]], np.float64), 1)
    assert y[0, 0, 0, 0] == (0 + 1 + 3 + 4) / 4
    g = curoi.ps_roi_pool_backward(np.ones((1, 1, 1, 1)), np.array([[0, 0, 0, 2, 2.]]),
                                   (1, 1, 3, 3), 1)
    np.testing.assert_array_equal(g[0, 0], [[.25, .25, 0], [.25, .25, 0], [0, 0, 0]])


# ------------------------------------------------------------------ torch
torch = pytest.importorskip("torch")
import curoi.torch as ct  # noqa: E402


@pytest.mark.parametrize("name", OPS)
def test_torch_function_and_module_match_the_reference(name):
    rng, x, boxes, scale = _case(5)
    want = _reference(name, x, boxes, scale, ratio=-1)
    tx = torch.tensor(x, requires_grad=True)
    y = getattr(ct, name)(tx, torch.tensor(boxes), (PH, PW), scale)
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(want.shape)
    y.backward(torch.tensor(g))
    np.testing.assert_allclose(tx.grad.numpy(),
                               _reference_backward(name, g, boxes, x.shape, scale, -1),
                               rtol=1e-12, atol=1e-12)
    module = (ct.PSRoIPool((PH, PW), scale) if name == "ps_roi_pool"
              else ct.PSRoIAlign((PH, PW), scale, -1))
    np.testing.assert_array_equal(module(torch.tensor(x), torch.tensor(boxes)).numpy(),
                                  y.detach().numpy())
    assert repr(module).startswith(type(module).__name__ + "(output_size=(2, 3)")


@pytest.mark.parametrize("name", OPS)
def test_torch_channels_last_gives_the_same_numbers(name):
    _, x, boxes, scale = _case(6, np.float32)
    tx = torch.tensor(x)
    y = getattr(ct, name)(tx, torch.tensor(boxes), (PH, PW), scale)
    y_cl = getattr(ct, name)(tx.to(memory_format=torch.channels_last),
                             torch.tensor(boxes), (PH, PW), scale)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(y_cl.numpy(), y.numpy())


@pytest.mark.parametrize("name", OPS)
def test_torch_gradcheck(name):
    _, x, boxes, scale = _case(7, n=1, h=6, w=7, k=3)
    boxes = boxes[np.isfinite(boxes).all(axis=1)]
    tx = torch.tensor(x, requires_grad=True)
    fn = getattr(ct, name)
    assert torch.autograd.gradcheck(
        lambda t: fn(t, torch.tensor(boxes), (PH, PW), scale), (tx,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", OPS)
def test_torch_opcheck(name):
    from torch.library import opcheck
    _, x, boxes, scale = _case(8, np.float32)
    op = getattr(torch.ops.curoi, name).default
    args = (torch.tensor(x, requires_grad=True), torch.tensor(boxes), scale, PH, PW,
            *_extra(name))
    opcheck(op, args)
    n, c, h, w = x.shape
    grad = torch.randn(len(boxes), C_OUT, PH, PW)
    backward = getattr(torch.ops.curoi, name + "_backward").default
    opcheck(backward, (grad, torch.tensor(boxes), scale, PH, PW, n, c, h, w,
                       *_extra(name), False))


@pytest.mark.parametrize("name", OPS)
def test_torch_compile_fullgraph_dynamic(name):
    fn = getattr(ct, name)

    def head(x, boxes):
        return fn(torch.relu(x), boxes, (PH, PW), 0.5).sum()

    compiled = torch.compile(head, backend="aot_eager", fullgraph=True, dynamic=True)
    for seed, (n, h, w, k) in enumerate([(2, 9, 11, 5), (3, 12, 10, 8)]):
        _, x, boxes, _ = _case(20 + seed, np.float32, n=n, h=h, w=w, k=k)
        tx = torch.tensor(x, requires_grad=True)
        tx2 = torch.tensor(x, requires_grad=True)
        compiled(tx, torch.tensor(boxes)).backward()
        head(tx2, torch.tensor(boxes)).backward()
        torch.testing.assert_close(tx.grad, tx2.grad)


def test_torch_channels_must_be_a_multiple_of_the_bins():
    with pytest.raises(ValueError, match="input has C = 5 channels"):
        ct.ps_roi_pool(torch.zeros(1, 5, 4, 4), torch.zeros(1, 5), (PH, PW))


# -------------------------------------------------------------------- JAX
jax = pytest.importorskip("jax")
import curoi.jax as cj  # noqa: E402
jnp = jax.numpy


@pytest.mark.parametrize("name", OPS)
def test_jax_jit_grad_and_vmap(name):
    rng, x, boxes, scale = _case(9, np.float32)
    fn = getattr(cj, name)
    want = _reference(name, x, boxes, scale, ratio=-1)
    y = jax.jit(lambda x: fn(x, jnp.asarray(boxes), (PH, PW), scale))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    g = rng.standard_normal(want.shape).astype(np.float32)
    grad = jax.grad(lambda x: jnp.sum(fn(x, jnp.asarray(boxes), (PH, PW), scale) * g))(
        jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(grad),
                               _reference_backward(name, g, boxes, x.shape, scale, -1),
                               rtol=1e-5, atol=1e-5)
    # vmap over a batch of two feature maps, boxes shared: one per element.
    xs = np.stack([x, -x])
    ys = jax.vmap(lambda x: fn(x, jnp.asarray(boxes), (PH, PW), scale))(jnp.asarray(xs))
    np.testing.assert_allclose(np.asarray(ys[1]), -want, rtol=1e-5, atol=1e-5)
    shape = jax.eval_shape(lambda x: fn(x, jnp.asarray(boxes), (PH, PW), scale),
                           jax.ShapeDtypeStruct(x.shape, jnp.float32))
    assert shape.shape == (len(boxes), C_OUT, PH, PW)


def test_jax_channels_must_be_a_multiple_of_the_bins():
    with pytest.raises(ValueError, match="input has C = 5 channels"):
        cj.ps_roi_align(jnp.zeros((1, 5, 4, 4)), jnp.zeros((1, 5)), (PH, PW))

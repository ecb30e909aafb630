"""TensorFlow's crop_and_resize through every front end: curoi.crop_and_resize
and its gradients (NumPy), curoi.torch (autograd for image and boxes,
gradcheck, opcheck, torch.compile) and curoi.jax (jit, grad, vmap), against
TensorFlow itself (its crops and GradientTape gradients) where it is
installed, and the NumPy reference. The kernels are tested in
test_crop_and_resize_kernels.py."""

import os

import numpy as np
import pytest

import curoi
import reference as ref


def _case(seed, dtype=np.float32, n=2, h=7, w=9, c=3, k=5):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((n, h, w, c)).astype(dtype)
    boxes = rng.uniform(-0.2, 1.2, (k, 4)).astype(np.float32)
    indices = rng.integers(0, n, k).astype(np.int32)
    return rng, image, boxes, indices


@pytest.fixture(scope="module")
def tf():
    if os.environ.get("CUROI_SANITIZE"):
        pytest.skip("TensorFlow is not loaded into a sanitized process")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return pytest.importorskip("tensorflow")


def _tf_gradients(tf, image, boxes, indices, size, method, g):
    """TF's gradients of sum(g * crops), one box at a time for the image
    (TF's CPU image gradient races where boxes overlap)."""
    b = tf.constant(boxes)
    with tf.GradientTape() as tape:
        tape.watch(b)
        y = tf.image.crop_and_resize(tf.constant(image), b, indices, size, method=method)
        loss = tf.reduce_sum(y * g)
    gb = tape.gradient(loss, b).numpy()
    gx = np.zeros(image.shape, np.float64)
    for k in range(len(boxes)):
        x = tf.constant(image)
        with tf.GradientTape() as tape:
            tape.watch(x)
            yk = tf.image.crop_and_resize(x, b[k:k + 1], indices[k:k + 1], size,
                                          method=method)
            loss = tf.reduce_sum(yk * g[k:k + 1])
        gx += tape.gradient(loss, x).numpy()
    return gx, gb


@pytest.mark.parametrize("method", ["bilinear", "nearest"])
def test_numpy_matches_tensorflow(tf, method):
    rng, image, boxes, indices = _case(1)
    y = curoi.crop_and_resize(image, boxes, indices, (4, 5), method, 0.5)
    y_tf = tf.image.crop_and_resize(image, boxes, indices, (4, 5), method=method,
                                    extrapolation_value=0.5).numpy()
    np.testing.assert_allclose(y, y_tf, rtol=1e-6, atol=1e-6)
    g = rng.standard_normal(y.shape).astype(np.float32)
    gx, gb = curoi.crop_and_resize_backward(g, image, boxes, indices, (4, 5), method)
    gx_tf, gb_tf = _tf_gradients(tf, image, boxes, indices, (4, 5), method, g)
    np.testing.assert_allclose(gx, gx_tf, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gb, gb_tf, rtol=1e-4, atol=1e-4 * np.abs(gb_tf).max())
    assert gx.shape == image.shape and gb.shape == boxes.shape


def test_numpy_nchw_and_the_reference():
    rng, image, boxes, indices = _case(2, np.float64)
    y = curoi.crop_and_resize(image, boxes, indices, 3)
    np.testing.assert_allclose(y, ref.crop_and_resize(image, boxes, indices, (3, 3)),
                               rtol=1e-12, atol=1e-12)
    nchw = np.ascontiguousarray(image.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(
        curoi.crop_and_resize(nchw, boxes, indices, 3, data_format="NCHW"),
        y.transpose(0, 3, 1, 2))


def test_bad_arguments_are_named():
    _, image, boxes, indices = _case(3)
    with pytest.raises(ValueError, match="method"):
        curoi.crop_and_resize(image, boxes, indices, 3, method="bicubic")
    with pytest.raises(TypeError, match="extrapolation_value"):
        curoi.crop_and_resize(image, boxes, indices, 3, extrapolation_value="0")
    with pytest.raises(TypeError, match="box_indices"):
        curoi.crop_and_resize(image, boxes, indices.astype(np.float32), 3)
    with pytest.raises(ValueError, match="box_indices"):
        curoi.crop_and_resize(image, boxes, indices[:2], 3)
    with pytest.raises(ValueError, match="crop_size"):
        curoi.crop_and_resize(image, boxes, indices, (0, 3))
    with pytest.raises(ValueError, match="boxes"):
        curoi.crop_and_resize(image, boxes[:, :3], indices, 3)
    with pytest.raises(ValueError, match="image"):
        curoi.crop_and_resize(image[0], boxes, indices, 3)


def test_an_index_outside_the_batch_gives_the_extrapolation_value():
    _, image, boxes, indices = _case(4)
    indices[1] = 7
    y = curoi.crop_and_resize(image, boxes, indices, 2, extrapolation_value=-3.0)
    np.testing.assert_array_equal(y[1], np.full((2, 2, 3), -3.0, np.float32))


# ------------------------------------------------------------------ torch
torch = pytest.importorskip("torch")
import curoi.torch as ct  # noqa: E402


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_torch_autograd_matches_numpy(data_format):
    rng, image, boxes, indices = _case(5, np.float64)
    g = rng.standard_normal((5, 4, 5, 3))
    gx, gb = curoi.crop_and_resize_backward(g, image, boxes.astype(np.float64), indices,
                                            (4, 5))
    ti = torch.tensor(image if data_format == "NHWC" else image.transpose(0, 3, 1, 2),
                      requires_grad=True)
    tb = torch.tensor(boxes, dtype=torch.float64, requires_grad=True)
    y = ct.crop_and_resize(ti, tb, torch.tensor(indices), (4, 5), data_format=data_format)
    tg = torch.tensor(g if data_format == "NHWC" else g.transpose(0, 3, 1, 2))
    (y * tg).sum().backward()
    want = gx if data_format == "NHWC" else gx.transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ti.grad.numpy(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tb.grad.numpy(), gb, rtol=1e-12, atol=1e-12)


def test_torch_gradcheck_opcheck_and_compile():
    from torch.library import opcheck
    _, image, _, _ = _case(6, np.float64, n=1, h=5, w=6, c=2, k=2)
    # No sample on a pixel line (where the slope changes): in_y of the first
    # box is 0.52, 1.88, 3.24; the others likewise off whole numbers.
    boxes = torch.tensor([[0.13, 0.21, 0.81, 0.69], [0.71, 0.05, 0.33, 0.91]],
                         dtype=torch.float64, requires_grad=True)
    idx = torch.zeros(2, dtype=torch.int32)
    ti = torch.tensor(image, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, b: ct.crop_and_resize(x, b, idx, (3, 4)), (ti, boxes), eps=1e-6, atol=1e-6)
    rois = torch.cat([idx[:, None].double(), boxes.detach()], 1).float()
    opcheck(torch.ops.curoi.crop_and_resize.default,
            (ti.detach().float().permute(0, 3, 1, 2), rois, 3, 4, "bilinear", 0.0))

    def head(x, b, i):
        return ct.crop_and_resize(torch.relu(x), b, i, (3, 4)).sum()

    compiled = torch.compile(head, backend="aot_eager", fullgraph=True, dynamic=True)
    for seed, k in ((7, 3), (8, 6)):
        _, image, boxes, indices = _case(seed, k=k)
        a, b = (torch.tensor(image, requires_grad=True) for _ in range(2))
        compiled(a, torch.tensor(boxes), torch.tensor(indices)).backward()
        head(b, torch.tensor(boxes), torch.tensor(indices)).backward()
        torch.testing.assert_close(a.grad, b.grad)


# -------------------------------------------------------------------- JAX
jax = pytest.importorskip("jax")
import curoi.jax as cj  # noqa: E402
jnp = jax.numpy


def test_jax_jit_grad_and_vmap():
    rng, image, boxes, indices = _case(9)
    g = rng.standard_normal((5, 2, 3, 3)).astype(np.float32)
    gx, gb = curoi.crop_and_resize_backward(g, image, boxes, indices, (2, 3))

    def loss(x, b):
        return jnp.sum(cj.crop_and_resize(x, b, jnp.asarray(indices), (2, 3)) * g)

    jx, jb = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(image), jnp.asarray(boxes))
    np.testing.assert_allclose(np.asarray(jx), gx, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jb), gb, rtol=1e-5, atol=1e-5)
    ys = jax.vmap(lambda x: cj.crop_and_resize(x, jnp.asarray(boxes), jnp.asarray(indices),
                                               (2, 3)))(jnp.asarray(np.stack([image, -image])))
    np.testing.assert_allclose(np.asarray(ys[1]),
                               -curoi.crop_and_resize(image, boxes, indices, (2, 3)),
                               rtol=1e-6, atol=1e-6)

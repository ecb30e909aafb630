"""curoi.jax: RoI Align and RoI Pool under JAX's transformations.

Expected values come from the independent NumPy reference in
tests/reference.py, from finite differences and from hand computation; the
NumPy entry point (curoi.roi_align on NumPy arrays) is compared too, since
curoi.jax promises the same numbers. GPU tests run only with a CUDA device
that both JAX and CuPy can see.
"""

import dataclasses
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy
ml_dtypes = pytest.importorskip("ml_dtypes")

import curoi  # noqa: E402
import curoi.jax as cj  # noqa: E402
from curoi import _gpu, _ops  # noqa: E402

import reference as ref  # noqa: E402

TOL = {np.float64: dict(rtol=1e-10, atol=1e-12),
       np.float32: dict(rtol=1e-5, atol=1e-5)}


@pytest.fixture
def x64():
    """JAX's 64-bit mode for one test, restored afterwards."""
    with jax.enable_x64(True):
        yield


def _case(seed, dtype=np.float32, n=2, c=3, h=9, w=11, k=6, scale=0.5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    boxes = ref.random_boxes(rng, n, h, w, scale, k, dtype=dtype)
    return rng, x, boxes


def _spy(monkeypatch, name):
    """Record the kernel views that curoi.jax hands to one _ops function."""
    calls = []
    original = getattr(_ops, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(_ops, name, spy)
    return calls


# --------------------------------------------------------------------------
# forward: eager and jit, against the reference and the NumPy entry point
# --------------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_roi_align_matches_reference_and_numpy(aligned, sampling_ratio, mode):
    _, x, boxes = _case(10 + sampling_ratio + 7 * aligned)
    boxes[1, 0] = 5          # batch index out of range: zeros
    args = ((2, 3), 0.5, sampling_ratio, aligned)
    f = lambda x, b: cj.roi_align(x, b, *args)  # noqa: E731
    if mode == "jit":
        f = jax.jit(f)
    xj, bj = jnp.asarray(x), jnp.asarray(boxes)
    y = f(xj, bj)
    assert isinstance(y, jax.Array) and y.dtype == jnp.float32
    assert y.devices() == xj.devices()
    np.testing.assert_allclose(np.asarray(y), ref.roi_align(x, boxes, *args),
                               **TOL[np.float32])
    np.testing.assert_array_equal(np.asarray(y), curoi.roi_align(x, boxes, *args))
    np.testing.assert_array_equal(np.asarray(y)[1], 0)


def test_roi_align_float64(x64):
    _, x, boxes = _case(3, np.float64)
    args = (3, 0.5, 0, True)
    y = jax.jit(lambda x, b: cj.roi_align(x, b, *args))(jnp.asarray(x),
                                                        jnp.asarray(boxes))
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(y), ref.roi_align(x, boxes, *args),
                               **TOL[np.float64])


def test_worked_example_by_hand():
    """The 8x8 map of DESIGN.md, box (0, 3)-(6, 7), RoI Pool 2x2 gives
    [[0.85, 0.96], [0.97, 0.96]] (torchvision bins overlap by one pixel)."""
    x = jnp.asarray(ref.WORKED_EXAMPLE_MAP[None, None], jnp.float32)
    boxes = jnp.asarray([[0, 0, 3, 6, 7]], jnp.float32)
    y = jax.jit(lambda x, b: cj.roi_pool(x, b, 2))(x, boxes)
    np.testing.assert_allclose(np.asarray(y)[0, 0], [[0.85, 0.96], [0.97, 0.96]],
                               rtol=1e-6)


def test_list_of_per_image_boxes_matches_k_by_5():
    rng, x, _ = _case(4)
    per_image = [ref.random_boxes(rng, 1, 9, 11, 0.5, L, dtype=np.float32)[:, 1:]
                 for L in (3, 2)]
    k5 = ref.normalize_boxes(per_image).astype(np.float32)
    args = (2, 0.5, 2, True)
    y_list = cj.roi_align(jnp.asarray(x), [jnp.asarray(b) for b in per_image], *args)
    np.testing.assert_allclose(np.asarray(y_list), ref.roi_align(x, k5, *args),
                               **TOL[np.float32])
    y_pool = jax.jit(lambda x, b: cj.roi_pool(x, b, 2, 0.5))(
        jnp.asarray(x), [jnp.asarray(b) for b in per_image])
    np.testing.assert_allclose(np.asarray(y_pool), ref.roi_pool(x, k5, 2, 0.5)[0])


@pytest.mark.parametrize("convention", ["torchvision", "mmcv"])
@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_roi_pool_forward_and_gradient_match_reference(convention, mode):
    rng = np.random.default_rng(7 + len(convention))
    x = ref.permutation_map(rng, (2, 2, 8, 9), np.float32)  # no ties
    boxes = ref.random_boxes(rng, 2, 8, 9, 0.5, 5, dtype=np.float32)
    y_ref, argmax = ref.roi_pool(x, boxes, (2, 3), 0.5, convention)
    g = rng.standard_normal(y_ref.shape).astype(np.float32)

    def loss(x):
        return jnp.sum(cj.roi_pool(x, jnp.asarray(boxes), (2, 3), 0.5,
                                   convention=convention) * g)

    forward = lambda x: cj.roi_pool(x, jnp.asarray(boxes), (2, 3), 0.5,  # noqa: E731
                                    convention=convention)
    grad = jax.grad(loss)
    if mode == "jit":
        forward, grad = jax.jit(forward), jax.jit(grad)
    np.testing.assert_array_equal(np.asarray(forward(jnp.asarray(x))), y_ref)
    np.testing.assert_allclose(np.asarray(grad(jnp.asarray(x))),
                               ref.roi_pool_backward(g, argmax, boxes, x.shape),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_roi_pool_saved_positions_in_either_width(dtype, monkeypatch):
    # curoi.jax keeps RoI Pool's argmax in int32, or in int64 (as int32
    # pairs, JAX having no int64 without x64) for feature planes of 2**31
    # pixels or more; too big to build here, so the operator is told to
    # use int64 anyway: forward, gradient and vmap must be the reference's.
    from curoi import _operators
    saved = dataclasses.replace(_operators.ROI_POOL.saved[0],
                                dtype=lambda h, w: dtype)
    op = dataclasses.replace(_operators.ROI_POOL, saved=(saved,))
    monkeypatch.setattr(cj, "ROI_POOL", op)
    calls = _spy(monkeypatch, "roi_pool_backward")
    rng = np.random.default_rng(31)
    x = np.stack([ref.permutation_map(rng, (2, 2, 8, 9), np.float32) for _ in range(3)])
    boxes = np.stack([ref.random_boxes(rng, 2, 8, 9, 0.5, 5, dtype=np.float32)
                      for _ in range(3)])
    g = rng.standard_normal((3, 5, 2, 2, 3)).astype(np.float32)

    def loss(x, boxes, g):
        return jnp.sum(cj.roi_pool(x, boxes, (2, 3), 0.5) * g)

    y = jax.vmap(lambda x, b: cj.roi_pool(x, b, (2, 3), 0.5))(x, boxes)
    grad = jax.vmap(jax.grad(loss))(x, boxes, g)
    for b in range(3):
        y_ref, argmax = ref.roi_pool(x[b], boxes[b], (2, 3), 0.5, "torchvision")
        np.testing.assert_array_equal(np.asarray(y[b]), y_ref)
        np.testing.assert_allclose(np.asarray(grad[b]),
                                   ref.roi_pool_backward(g[b], argmax, boxes[b], x[b].shape),
                                   rtol=1e-6, atol=1e-6)
    assert calls and all(args[1].dtype == np.dtype(dtype) for args in calls)


# --------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_grad_matches_finite_differences(x64, aligned):
    """jax.grad of sum(g * roi_align(x)) against central differences in
    float64. Boxes keep every sample away from the cut-offs, so the forward
    is linear in x around the point."""
    rng = np.random.default_rng(42 + aligned)
    x = rng.standard_normal((2, 2, 5, 6))
    boxes = ref.random_boxes(rng, 2, 5, 6, 0.5, 4,
                             kinds=("inside", "partly_out", "tiny"))
    args = ((2, 3), 0.5, 2, aligned)
    g = rng.standard_normal((4, 2, 2, 3))
    bj = jnp.asarray(boxes)
    loss = jax.jit(lambda x: jnp.sum(cj.roi_align(x, bj, *args) * g))
    gx = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x)))
    assert gx.dtype == np.float64

    # All perturbations at once: row i of the batch moves element i.
    eps = 1e-3
    eye = np.eye(x.size).reshape((x.size,) + x.shape) * eps
    batched = jax.jit(jax.vmap(loss))
    fd = (np.asarray(batched(jnp.asarray(x + eye)))
          - np.asarray(batched(jnp.asarray(x - eye)))) / (2 * eps)
    np.testing.assert_allclose(gx, fd.reshape(x.shape), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(gx, ref.roi_align_backward(g, boxes, x.shape, *args),
                               **TOL[np.float64])
    assert np.abs(gx).max() > 0.1


def test_roi_pool_grad_matches_finite_differences(x64):
    rng = np.random.default_rng(5)
    # Distinct values at least 1 apart: a 1e-3 step never changes a maximum.
    x = ref.permutation_map(rng, (1, 2, 6, 6))
    boxes = ref.random_boxes(rng, 1, 6, 6, 1.0, 4, kinds=("inside", "partly_out"))
    g = rng.standard_normal((4, 2, 2, 2))
    bj = jnp.asarray(boxes)
    loss = jax.jit(lambda x: jnp.sum(cj.roi_pool(x, bj, 2) * g))
    gx = np.asarray(jax.grad(loss)(jnp.asarray(x)))
    eps = 1e-3
    eye = np.eye(x.size).reshape((x.size,) + x.shape) * eps
    batched = jax.jit(jax.vmap(loss))
    fd = (np.asarray(batched(jnp.asarray(x + eye)))
          - np.asarray(batched(jnp.asarray(x - eye)))) / (2 * eps)
    np.testing.assert_allclose(gx, fd.reshape(x.shape), rtol=1e-7, atol=1e-9)
    assert np.abs(gx).max() > 0.1


@pytest.mark.parametrize("sampling_ratio", [-1, 3])
def test_vjp_matches_numpy_backward_for_features_and_boxes(sampling_ratio):
    rng, x, boxes = _case(20 + sampling_ratio)
    args = ((3, 2), 0.5, sampling_ratio, False)
    y, vjp = jax.vjp(lambda x, b: cj.roi_align(x, b, *args),
                     jnp.asarray(x), jnp.asarray(boxes))
    g = rng.standard_normal(y.shape).astype(np.float32)
    gx, gb = vjp(jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(gx),
                               curoi.roi_align_backward(g, boxes, x.shape, *args),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gx),
                               ref.roi_align_backward(g, boxes, x.shape, *args),
                               **TOL[np.float32])
    assert gb.shape == boxes.shape and gb.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(gb),
                               ref.roi_align_boxes_backward(g, x, boxes, *args),
                               rtol=1e-4, atol=1e-4)


def test_jit_of_grad_with_list_boxes():
    rng, x, _ = _case(30)
    per_image = [jnp.asarray(ref.random_boxes(rng, 1, 9, 11, 0.5, 3,
                                              dtype=np.float32)[:, 1:])
                 for _ in range(2)]
    k5 = ref.normalize_boxes([np.asarray(b) for b in per_image])
    g = rng.standard_normal((6, 3, 2, 2)).astype(np.float32)
    grad = jax.jit(jax.grad(lambda x, b: jnp.sum(cj.roi_align(x, b, 2, 0.5) * g),
                            argnums=(0, 1)))
    gx, gb = grad(jnp.asarray(x), per_image)
    np.testing.assert_allclose(np.asarray(gx),
                               ref.roi_align_backward(g, k5, x.shape, 2, 0.5),
                               **TOL[np.float32])
    assert [b.shape for b in gb] == [(3, 4), (3, 4)]
    expected = ref.roi_align_boxes_backward(g, x, k5, 2, 0.5)
    np.testing.assert_allclose(np.concatenate([np.asarray(b) for b in gb]), expected[:, 1:],
                               rtol=1e-4, atol=1e-4)


def test_box_gradient_under_vmap_and_for_roi_pool():
    rng, x, boxes = _case(31)
    boxes2 = np.stack([boxes, boxes + 0.25])
    g = rng.standard_normal((2, len(boxes), 3, 2, 2)).astype(np.float32)

    def loss(b, g):
        return jnp.sum(cj.roi_align(jnp.asarray(x), b, 2, 0.5, 2) * g)

    gb = jax.vmap(jax.grad(loss))(jnp.asarray(boxes2), jnp.asarray(g))
    for i in range(2):
        np.testing.assert_allclose(
            np.asarray(gb[i]), ref.roi_align_boxes_backward(g[i], x, boxes2[i], 2, 0.5, 2),
            rtol=1e-4, atol=1e-4)
    # roi_pool's maxima do not move with the boxes: zero
    gp = jax.grad(lambda b: jnp.sum(cj.roi_pool(jnp.asarray(x), b, 2, 0.5)))(
        jnp.asarray(boxes))
    np.testing.assert_array_equal(np.asarray(gp), 0)


@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_deterministic_gradients_are_bitwise_reproducible(op):
    """Many boxes over one small map make the backward's sums collide on
    every pixel, where atomic adds in varying order differ in the last bits."""
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((1, 4, 6, 6)).astype(np.float32))
    boxes = jnp.asarray(ref.random_boxes(rng, 1, 6, 6, 1.0, 300,
                                         kinds=("inside",), dtype=np.float32))
    g = jnp.asarray(rng.standard_normal((300, 4, 3, 3)).astype(np.float32))
    fn = getattr(cj, op)
    grad = jax.jit(jax.grad(
        lambda x: jnp.sum(fn(x, boxes, 3, deterministic=True) * g)))
    first = np.asarray(grad(x))
    for _ in range(5):
        np.testing.assert_array_equal(np.asarray(grad(x)), first)
    if op == "roi_align":
        exact = ref.roi_align_backward(np.asarray(g), np.asarray(boxes), x.shape, 3)
        np.testing.assert_allclose(first, exact, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------
# vmap
# --------------------------------------------------------------------------


def _batched_case(seed, batch=3, n=2, k=5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, n, 2, 8, 9)).astype(np.float32)
    boxes = np.stack([ref.random_boxes(rng, n, 8, 9, 0.5, k, dtype=np.float32)
                      for _ in range(batch)])
    # Indices the kernel skips must stay skipped after folding: n (which
    # would be image 0 of the next batch element), -1, NaN; and 1.5, which
    # the kernel truncates to image 1 of its own batch element.
    boxes[0, 0, 0] = n
    boxes[1, 1, 0] = -1
    boxes[1, 2, 0] = np.nan
    boxes[2, 0, 0] = 1.5
    return rng, x, boxes


@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_vmap_is_one_launch_with_the_numbers_of_a_loop(monkeypatch, op):
    rng, x, boxes = _batched_case(1)
    calls = _spy(monkeypatch, f"{op}_forward")
    fn = getattr(cj, op)
    y = jax.vmap(lambda x, b: fn(x, b, (2, 2), 0.5))(jnp.asarray(x),
                                                      jnp.asarray(boxes))
    assert len(calls) == 1       # the batch folded into N: one launch
    assert calls[0][0].shape == (6, 2, 8, 9)
    assert y.shape == (3, 5, 2, 2, 2)
    for b in range(3):
        if op == "roi_align":
            expected = ref.roi_align(x[b], boxes[b], (2, 2), 0.5)
        else:
            expected = ref.roi_pool(x[b], boxes[b], (2, 2), 0.5)[0]
        np.testing.assert_allclose(np.asarray(y[b]), expected, **TOL[np.float32])
    np.testing.assert_array_equal(np.asarray(y[0, 0]), 0)
    np.testing.assert_array_equal(np.asarray(y[1, 1:3]), 0)


def test_vmap_with_shared_features_or_shared_boxes():
    rng, x, boxes = _batched_case(2)
    args = (2, 0.5, 2, True)
    f = jax.jit(jax.vmap(lambda x, b: cj.roi_align(x, b, *args), in_axes=(None, 0)))
    y = f(jnp.asarray(x[0]), jnp.asarray(boxes))
    for b in range(3):
        np.testing.assert_allclose(np.asarray(y[b]),
                                   ref.roi_align(x[0], boxes[b], *args),
                                   **TOL[np.float32])
    f = jax.jit(jax.vmap(lambda x, b: cj.roi_align(x, b, *args), in_axes=(0, None)))
    y = f(jnp.asarray(x), jnp.asarray(boxes[2]))
    for b in range(3):
        np.testing.assert_allclose(np.asarray(y[b]),
                                   ref.roi_align(x[b], boxes[2], *args),
                                   **TOL[np.float32])


def test_nested_vmap():
    rng, x, boxes = _batched_case(3)
    xx, bb = np.stack([x, -x]), np.stack([boxes, boxes[::-1]])
    f = jax.jit(jax.vmap(jax.vmap(lambda x, b: cj.roi_align(x, b, 2, 0.5))))
    y = f(jnp.asarray(xx), jnp.asarray(bb))
    assert y.shape == (2, 3, 5, 2, 2, 2)
    for i in range(2):
        for b in range(3):
            np.testing.assert_allclose(np.asarray(y[i, b]),
                                       ref.roi_align(xx[i, b], bb[i, b], 2, 0.5),
                                       **TOL[np.float32])


@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_grad_through_vmap(op, monkeypatch):
    rng, x, boxes = _batched_case(4)
    fn = getattr(cj, op)
    g = rng.standard_normal((3, 5, 2, 2, 2)).astype(np.float32)
    bj = jnp.asarray(boxes)

    def loss(x):
        return jnp.sum(jax.vmap(lambda x, b: fn(x, b, 2, 0.5))(x, bj) * g)

    calls = _spy(monkeypatch, f"{op}_backward")
    gx = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x)))
    assert len(calls) == 1
    for b in range(3):
        if op == "roi_align":
            expected = ref.roi_align_backward(g[b], boxes[b], x[b].shape, 2, 0.5)
        else:
            _, argmax = ref.roi_pool(x[b], boxes[b], 2, 0.5)
            expected = ref.roi_pool_backward(g[b], argmax, boxes[b], x[b].shape)
        np.testing.assert_allclose(gx[b], expected, **TOL[np.float32])


def test_per_example_gradients_of_shared_features():
    """vmap of grad, features shared: the gradient of each batch element is
    its own, and grad of the vmapped sum is their sum."""
    rng, x, boxes = _batched_case(5)
    g = rng.standard_normal((5, 2, 2, 2)).astype(np.float32)
    x0 = jnp.asarray(x[0])

    def loss(x, b):
        return jnp.sum(cj.roi_align(x, b, 2, 0.5) * g)

    per_example = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(
        x0, jnp.asarray(boxes))
    total = jax.grad(lambda x: jnp.sum(jax.vmap(loss, in_axes=(None, 0))(
        x, jnp.asarray(boxes))))(x0)
    expected = [ref.roi_align_backward(g, boxes[b], x[0].shape, 2, 0.5)
                for b in range(3)]
    for b in range(3):
        np.testing.assert_allclose(np.asarray(per_example[b]), expected[b],
                                   **TOL[np.float32])
    np.testing.assert_allclose(np.asarray(total), sum(expected), rtol=1e-5,
                               atol=1e-5)


# --------------------------------------------------------------------------
# shapes, dtypes, copies
# --------------------------------------------------------------------------


def test_eval_shape_runs_no_kernel(monkeypatch):
    calls = _spy(monkeypatch, "roi_align_forward")
    x = jax.ShapeDtypeStruct((2, 8, 20, 30), jnp.bfloat16)
    boxes = jax.ShapeDtypeStruct((17, 5), jnp.float32)
    out = jax.eval_shape(lambda x, b: cj.roi_align(x, b, (7, 5), 1 / 16), x, boxes)
    assert out.shape == (17, 8, 7, 5) and out.dtype == jnp.bfloat16
    out = jax.eval_shape(lambda x, b: cj.roi_pool(x, b, 3), x,
                         [jax.ShapeDtypeStruct((4, 4), jnp.float32)] * 2)
    assert out.shape == (8, 8, 3, 3) and out.dtype == jnp.bfloat16
    grad = jax.eval_shape(jax.grad(lambda x, b: jnp.sum(
        cj.roi_align(x, b, 2).astype(jnp.float32))), x, boxes)
    assert grad.shape == x.shape and grad.dtype == jnp.bfloat16
    assert calls == []


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_kernel_reads_and_writes_xla_buffers_in_place(monkeypatch, mode):
    """The kernel's views are XLA's own buffers: the features and boxes the
    caller passed, and the buffer that becomes the result (read-only inputs,
    writable output)."""
    calls = _spy(monkeypatch, "roi_align_forward")
    _, x, boxes = _case(6)
    xj, bj = jnp.asarray(x), jnp.asarray(boxes)
    f = lambda x, b: cj.roi_align(x, b, 2, 0.5)  # noqa: E731
    y = (jax.jit(f) if mode == "jit" else f)(xj, bj)
    xv, rois, out = calls[-1][:3]
    assert isinstance(xv, np.ndarray) and not xv.flags.writeable
    assert xv.ctypes.data == xj.unsafe_buffer_pointer()
    assert rois.ctypes.data == bj.unsafe_buffer_pointer()
    assert out.flags.writeable
    assert out.ctypes.data == y.unsafe_buffer_pointer()


def test_no_host_to_device_transfer():
    """JAX's transfer guard forbids host-to-device copies; on the CPU it
    still sees any array that curoi would build on the host and upload."""
    _, x, boxes = _case(8)
    xj, bj = jnp.asarray(x), jnp.asarray(boxes)
    per_image = [jnp.asarray(boxes[:3, 1:]), jnp.asarray(boxes[3:, 1:])]
    grad = jax.jit(jax.grad(lambda x: jnp.sum(cj.roi_pool(x, bj, 2))))
    with jax.transfer_guard("disallow"):
        y = cj.roi_align(xj, bj, 2, 0.5)
        cj.roi_align(xj, per_image, 2, 0.5)
        cj.roi_pool(xj, bj, 2, 0.5)
        grad(xj)
    np.testing.assert_allclose(np.asarray(y), ref.roi_align(x, boxes, 2, 0.5),
                               **TOL[np.float32])


HALF = {"float16": (jnp.float16, np.float16, 2.0 ** -10),
        "bfloat16": (jnp.bfloat16, ml_dtypes.bfloat16, 2.0 ** -7)}


@pytest.mark.parametrize("name", sorted(HALF))
def test_half_precision_gives_the_input_dtype(name):
    jdtype, ndtype, ulp = HALF[name]
    rng, x32, boxes = _case(9)
    x = x32.astype(ndtype)
    xf = x.astype(np.float32)
    args = (2, 0.5, 2, True)
    xj = jnp.asarray(x32).astype(jdtype)
    y = jax.jit(lambda x: cj.roi_align(x, jnp.asarray(boxes), *args))(xj)
    assert y.dtype == jdtype
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)),
                                  curoi.roi_align(x, boxes, *args).astype(np.float32))
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)),
                               ref.roi_align(xf, boxes, *args), rtol=ulp, atol=1e-3)
    g = rng.standard_normal(y.shape).astype(np.float32)
    gx = jax.grad(lambda x: jnp.sum(
        cj.roi_align(x, jnp.asarray(boxes), *args).astype(jnp.float32) * g))(xj)
    assert gx.dtype == jdtype
    gq = g.astype(ndtype).astype(np.float32)  # the cotangent arrives rounded
    np.testing.assert_allclose(np.asarray(gx.astype(jnp.float32)),
                               ref.roi_align_backward(gq, boxes, x.shape, *args),
                               rtol=2 * ulp, atol=1e-2)
    yp = cj.roi_pool(xj, jnp.asarray(boxes), 2, 0.5)
    assert yp.dtype == jdtype
    np.testing.assert_array_equal(np.asarray(yp.astype(jnp.float32)),
                                  ref.roi_pool(xf, boxes, 2, 0.5)[0])


def test_no_boxes_gives_an_empty_result_and_zero_gradient():
    x = jnp.ones((1, 2, 5, 5))
    boxes = jnp.zeros((0, 5))
    assert cj.roi_align(x, boxes, 3).shape == (0, 2, 3, 3)
    assert cj.roi_pool(x, [], 3).shape == (0, 2, 3, 3)
    gx = jax.grad(lambda x: jnp.sum(cj.roi_align(x, boxes, 3)))(x)
    np.testing.assert_array_equal(np.asarray(gx), 0)


# --------------------------------------------------------------------------
# a training step
# --------------------------------------------------------------------------


def test_tiny_detection_head_trains():
    """conv -> roi_align -> linear on synthetic data: plain gradient descent
    lowers the loss."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((2, 3, 16, 16)).astype(np.float32))
    boxes = jnp.asarray(ref.random_boxes(rng, 2, 16, 16, 1.0, 8,
                                         kinds=("inside",), dtype=np.float32))
    targets = jnp.asarray(rng.standard_normal((8, 1)).astype(np.float32))
    def weights(*shape):
        return jnp.asarray(0.3 * rng.standard_normal(shape).astype(np.float32))

    params = {"conv": weights(4, 3, 3, 3), "dense": weights(4 * 2 * 2, 1)}

    def loss_fn(params):
        features = jax.lax.conv_general_dilated(
            images, params["conv"], (1, 1), "SAME",
            dimension_numbers=("NCHW", "OIHW", "NCHW"))
        pooled = cj.roi_align(jax.nn.relu(features), boxes, 2, 1.0, 2, True)
        predictions = pooled.reshape(pooled.shape[0], -1) @ params["dense"]
        return jnp.mean((predictions - targets) ** 2)

    step = jax.jit(jax.value_and_grad(loss_fn))
    losses = []
    for _ in range(30):
        loss, grads = step(params)
        losses.append(float(loss))
        params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


# --------------------------------------------------------------------------
# errors and limits
# --------------------------------------------------------------------------


def test_errors_name_the_argument():
    x = jnp.ones((1, 2, 5, 5))
    b = jnp.asarray([[0, 0, 0, 2, 2]], jnp.float32)
    cases = [
        (lambda: cj.roi_align([[1.0]], b, 2), TypeError, "input"),
        (lambda: cj.roi_align(jnp.ones((2, 5, 5)), b, 2), ValueError, "input"),
        (lambda: cj.roi_align(jnp.ones((1, 2, 5, 5), jnp.int32), b, 2),
         TypeError, "input"),
        (lambda: cj.roi_align(x, jnp.ones((1, 4)), 2), ValueError, "boxes"),
        (lambda: cj.roi_align(x, jnp.ones((1, 5), jnp.int32), 2), TypeError, "boxes"),
        (lambda: cj.roi_align(x, [jnp.ones((1, 5))], 2), ValueError, r"boxes\[0\]"),
        (lambda: cj.roi_align(x, [jnp.ones((1, 4))] * 2, 2), ValueError, "2 per-image"),
        (lambda: cj.roi_align(x, [[0.0, 0, 0, 2, 2]], 2), TypeError, "boxes"),
        (lambda: cj.roi_align(x, b, 0), ValueError, "output_size"),
        (lambda: cj.roi_align(x, b, 2, spatial_scale=-1.0), ValueError, "spatial_scale"),
        (lambda: cj.roi_align(x, b, 2, sampling_ratio=1.5), TypeError, "sampling_ratio"),
        (lambda: cj.roi_align(x, b, 2, aligned=1), TypeError, "aligned"),
        (lambda: cj.roi_align(x, b, 2, deterministic="yes"), TypeError, "deterministic"),
        (lambda: cj.roi_pool(x, b, 2, convention="caffe"), ValueError, "convention"),
        (lambda: cj.roi_pool(x, b, (2, 0)), ValueError, "output_size"),
    ]
    for call, error, name in cases:
        with pytest.raises(error, match=name):
            call()


def test_errors_are_raised_at_trace_time():
    b = jnp.asarray([[0, 0, 0, 2, 2]], jnp.float32)
    with pytest.raises(ValueError, match="sampling_ratio|input"):
        jax.jit(lambda x: cj.roi_align(x, b, 2))(jnp.ones((2, 5, 5)))


def test_missing_buffer_callback_names_the_jax_version():
    def no_module(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    def empty_module(name):
        return types.ModuleType(name)

    for importer in (no_module, empty_module):
        with pytest.raises(ImportError) as info:
            cj._load_buffer_callback(importer, jax_version="0.4.30")
        message = str(info.value)
        assert "buffer_callback" in message and "0.4.30" in message
        assert f"JAX {cj.MIN_JAX_VERSION} or newer" in message
    assert cj._load_buffer_callback() is not None


def test_documented_limitations_fail_loudly():
    """jax.export cannot serialise the kernels (Python callbacks), and only
    reverse mode is defined: both raise rather than give wrong numbers."""
    x = jnp.ones((1, 1, 4, 4))
    b = jnp.asarray([[0, 0, 0, 2, 2]], jnp.float32)
    with pytest.raises(NotImplementedError, match="host_callback"):
        jax.export.export(jax.jit(lambda x, b: cj.roi_align(x, b, 2)))(x, b)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda x: cj.roi_align(x, b, 2), (x,), (x,))


def test_vmap_refuses_more_images_than_float32_indices_hold():
    """2**23 batches of 4 images need batch indices past 2**24, where
    float32 no longer holds every integer; 2**22 batches still fit. Checked
    on shapes only (eval_shape), so nothing is allocated."""
    f = jax.vmap(lambda x, b: cj.roi_align(x, b, 2))

    def shapes(batch):
        return (jax.ShapeDtypeStruct((batch, 4, 1, 6, 6), jnp.float32),
                jax.ShapeDtypeStruct((batch, 1, 5), jnp.float32))

    with pytest.raises(ValueError, match="vmap folds 8388608 batches"):
        jax.eval_shape(f, *shapes(2**23))
    assert jax.eval_shape(f, *shapes(2**22)).shape == (2**22, 1, 1, 2, 2)


def test_example_runs_and_matches_its_hand_computed_values():
    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    done = subprocess.run([sys.executable, str(root / "examples" / "jax_roi_align.py")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "match: True" in done.stdout
    assert "sums to 4.0" in done.stdout
    assert "[39.5, 79.0, 118.5]" in done.stdout


# --------------------------------------------------------------------------
# GPU (skipped without a CUDA device that JAX and CuPy both see)
# --------------------------------------------------------------------------


def _cuda_device():
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return None
    if not gpus or _gpu.device_count() == 0:
        return None
    return gpus[0]


def gpu(test):
    """A GPU test: skipped without a device, selected by `pytest -m cuda`."""
    return pytest.mark.cuda(pytest.mark.skipif(
        _cuda_device() is None, reason="no CUDA device for JAX and CuPy")(test))


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_gpu_jit_matches_cpu(dtype, op):
    device, cpu = _cuda_device(), jax.devices("cpu")[0]
    rng, x, boxes = _case(40)
    fn = getattr(cj, op)
    g = rng.standard_normal((6, 3, 2, 2)).astype(np.float32)

    def loss(x, b):
        return jnp.sum(fn(x, b, 2, 0.5).astype(jnp.float32) * g)

    forward = jax.jit(lambda x, b: fn(x, b, 2, 0.5))
    grad = jax.jit(jax.grad(loss))
    results = {}
    for where in (device, cpu):
        xj = jax.device_put(jnp.asarray(x).astype(dtype), where)
        bj = jax.device_put(jnp.asarray(boxes), where)
        y, gx = forward(xj, bj), grad(xj, bj)
        assert y.devices() == {where} and y.dtype == xj.dtype and gx.dtype == xj.dtype
        results[where.platform] = (np.asarray(y.astype(jnp.float32)),
                                   np.asarray(gx.astype(jnp.float32)))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=1e-2, atol=1e-2)
    for a, b in zip(results[device.platform], results["cpu"]):
        np.testing.assert_allclose(a, b, **tol)


@gpu
def test_gpu_vmap_and_grad_match_reference():
    device = _cuda_device()
    rng, x, boxes = _batched_case(41)
    g = rng.standard_normal((3, 5, 2, 2, 2)).astype(np.float32)
    xj = jax.device_put(jnp.asarray(x), device)
    bj = jax.device_put(jnp.asarray(boxes), device)

    def loss(x):
        return jnp.sum(jax.vmap(lambda x, b: cj.roi_align(x, b, 2, 0.5))(x, bj) * g)

    y = jax.jit(jax.vmap(lambda x, b: cj.roi_align(x, b, 2, 0.5)))(xj, bj)
    gx = jax.jit(jax.grad(loss))(xj)
    for b in range(3):
        np.testing.assert_allclose(np.asarray(y[b]),
                                   ref.roi_align(x[b], boxes[b], 2, 0.5),
                                   **TOL[np.float32])
        np.testing.assert_allclose(
            np.asarray(gx[b]),
            ref.roi_align_backward(g[b], boxes[b], x[b].shape, 2, 0.5),
            **TOL[np.float32])

"""Spatial pyramid pooling through the public front ends: curoi.roi_spp and
roi_spp_backward (NumPy), curoi.torch.roi_spp and curoi.jax.roi_spp.

Expected values come from the NumPy reference (tests/reference.py), from
curoi.roi_pool level by level (the definition the docs give), from the
whole-map maximum computed directly, and from finite differences (torch's
gradcheck). The kernels themselves are tested in test_roi_spp_kernels.py.
"""

import numpy as np
import pytest

import curoi
import reference as ref

LEVELS = (1, 2, 3)
SCALE = 0.25
BOXES = np.array([[0, 1.0, 1.0, 30.0, 20.0],
                  [1, 0.0, 2.0, 10.0, 40.0],
                  [0, 12.0, 5.0, 43.0, 35.0],
                  [1, 7.0, 7.0, 7.0, 7.0]])


def _features(dtype=np.float64, shape=(2, 3, 9, 11), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _nhwc(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


# -------------------------------------------------------------------- NumPy
@pytest.mark.parametrize("convention", ["torchvision", "mmcv"])
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_forward_matches_reference(mode, convention):
    x = _features()
    y, argmax = curoi.roi_spp(x, BOXES, LEVELS, SCALE, mode=mode, convention=convention,
                              return_argmax=True)
    expected, expected_argmax = ref.roi_spp(x, BOXES, LEVELS, SCALE, convention, mode)
    assert y.shape == (4, 3 * (1 + 4 + 9)) and y.dtype == np.float64
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-14)
    assert argmax.dtype == np.int32
    np.testing.assert_array_equal(argmax, expected_argmax)


def test_max_mode_is_roi_pool_level_by_level():
    x = _features(np.float32)
    y = curoi.roi_spp(x, BOXES.astype(np.float32), LEVELS, SCALE)
    pooled = [curoi.roi_pool(x, BOXES.astype(np.float32), (l, l), SCALE).reshape(4, -1)
              for l in LEVELS]
    np.testing.assert_array_equal(y, np.concatenate(pooled, axis=1))


def test_nhwc_gives_the_same_result_and_gradient():
    x = _features()
    y, argmax = curoi.roi_spp(x, BOXES, LEVELS, SCALE, return_argmax=True)
    y_nhwc, argmax_nhwc = curoi.roi_spp(_nhwc(x), BOXES, LEVELS, SCALE,
                                        return_argmax=True, data_format="NHWC")
    np.testing.assert_array_equal(y_nhwc, y)
    np.testing.assert_array_equal(argmax_nhwc, argmax)
    g = np.random.default_rng(1).standard_normal(y.shape)
    gx = curoi.roi_spp_backward(g, BOXES, x.shape, LEVELS, SCALE, argmax=argmax)
    gx_nhwc = curoi.roi_spp_backward(g, BOXES, _nhwc(x).shape, LEVELS, SCALE,
                                     argmax=argmax, data_format="NHWC")
    np.testing.assert_array_equal(gx_nhwc, _nhwc(gx))


def test_per_image_lists_equal_batch_index_rows():
    x = _features()
    lists = [BOXES[BOXES[:, 0] == i, 1:] for i in range(2)]
    order = np.concatenate([np.flatnonzero(BOXES[:, 0] == i) for i in range(2)])
    np.testing.assert_array_equal(curoi.roi_spp(x, lists, LEVELS, SCALE),
                                  curoi.roi_spp(x, BOXES[order], LEVELS, SCALE))


@pytest.mark.parametrize("convention", ["torchvision", "mmcv"])
def test_no_boxes_pools_each_whole_map(convention):
    x = _features(shape=(3, 2, 7, 5))
    # spatial_scale does not apply to the whole maps.
    y = curoi.roi_spp(x, None, (1, 2), spatial_scale=1 / 16, convention=convention)
    assert y.shape == (3, 2 * 5)
    np.testing.assert_array_equal(y[:, :2], x.max(axis=(2, 3)))  # level 1: the map's max
    whole = np.array([[n, 0, 0, 4, 6] for n in range(3)], np.float64)
    expected, _ = ref.roi_spp(x, whole, (1, 2), 1.0, convention)
    np.testing.assert_array_equal(y, expected)
    avg = curoi.roi_spp(x, None, (1,), mode="avg", convention=convention)
    np.testing.assert_allclose(avg, x.mean(axis=(2, 3)), rtol=1e-12)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_backward_matches_reference(mode):
    x = _features()
    y, argmax = curoi.roi_spp(x, BOXES, LEVELS, SCALE, mode=mode, return_argmax=True)
    g = np.random.default_rng(2).standard_normal(y.shape)
    gx = curoi.roi_spp_backward(g, BOXES, x.shape, LEVELS, SCALE, mode=mode,
                                argmax=argmax if mode == "max" else None)
    expected = ref.roi_spp_backward(g, argmax, BOXES, LEVELS, x.shape, SCALE, mode=mode)
    np.testing.assert_allclose(gx, expected, rtol=1e-12, atol=1e-14)
    deterministic = curoi.roi_spp_backward(g, BOXES, x.shape, LEVELS, SCALE, mode=mode,
                                           argmax=argmax, deterministic=True)
    np.testing.assert_allclose(deterministic, expected, rtol=1e-12, atol=1e-14)


def test_backward_of_whole_maps():
    x = _features(shape=(2, 3, 6, 6))
    y, argmax = curoi.roi_spp(x, None, (1, 2), return_argmax=True)
    g = np.ones_like(y)
    gx = curoi.roi_spp_backward(g, None, x.shape, (1, 2), spatial_scale=1 / 16,
                                argmax=argmax)
    # Level 1's maximum of each plane and level 2's four bin maxima get 1
    # each; the global maximum is also its bin's, so it gets 2.
    assert gx.sum() == 2 * 3 * 5
    flat = gx.reshape(6, 36)
    np.testing.assert_array_equal(flat[np.arange(6), x.reshape(6, 36).argmax(axis=1)], 2)


def test_int64_argmax_is_read_and_out_of_range_positions_pass_nothing():
    x = _features()
    y, argmax = curoi.roi_spp(x, BOXES, LEVELS, SCALE, return_argmax=True)
    g = np.ones_like(y)
    plain = curoi.roi_spp_backward(g, BOXES, x.shape, LEVELS, SCALE, argmax=argmax)
    wide = argmax.astype(np.int64)
    np.testing.assert_array_equal(
        curoi.roi_spp_backward(g, BOXES, x.shape, LEVELS, SCALE, argmax=wide), plain)
    wide[:, 0] = 2**32  # would wrap to 0 in int32: must pass nothing instead
    expected = plain.copy()
    for k in range(4):  # each box's level-1 entry of channel 0 is dropped
        n = int(BOXES[k, 0])
        if argmax[k, 0] >= 0:
            expected[n, 0].flat[argmax[k, 0]] -= 1
    np.testing.assert_array_equal(
        curoi.roi_spp_backward(g, BOXES, x.shape, LEVELS, SCALE, argmax=wide), expected)


@pytest.mark.parametrize("levels, error, match", [
    ((), ValueError, "levels must hold at least one"),
    ((1, 0), ValueError, "levels must hold whole numbers"),
    ((1, 2.5), ValueError, "levels must hold whole numbers"),
    (3, TypeError, "levels must be a sequence"),
    ("124", TypeError, "levels must be a sequence"),
])
def test_bad_levels_are_named(levels, error, match):
    with pytest.raises(error, match=match):
        curoi.roi_spp(_features(), BOXES, levels)


def test_bad_arguments_are_named():
    x = _features()
    with pytest.raises(ValueError, match="mode must be one of"):
        curoi.roi_spp(x, BOXES, mode="sum")
    with pytest.raises(ValueError, match="convention must be one of"):
        curoi.roi_spp(x, BOXES, convention="caffe")
    y = curoi.roi_spp(x, BOXES, LEVELS, SCALE)
    with pytest.raises(ValueError, match="argmax is required for mode='max'"):
        curoi.roi_spp_backward(y, BOXES, x.shape, LEVELS, SCALE)
    with pytest.raises(ValueError, match=r"grad_output must have shape \(K, columns\)"):
        curoi.roi_spp_backward(y[:, :-1], BOXES, x.shape, LEVELS, SCALE, mode="avg")
    with pytest.raises(ValueError, match="grad_output must be a 2-D array"):
        curoi.roi_spp_backward(y[..., None], BOXES, x.shape, LEVELS, SCALE, mode="avg")


def test_empty_inputs():
    x = _features()
    assert curoi.roi_spp(x, np.zeros((0, 5)), LEVELS).shape == (0, 42)
    y = curoi.roi_spp(np.zeros((2, 3, 0, 4)), BOXES, (1, 2), mode="avg")
    np.testing.assert_array_equal(y, np.zeros((4, 15)))


# -------------------------------------------------------------------- torch
@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_torch_matches_numpy_and_gradcheck(torch, mode):
    import curoi.torch as ct
    x = torch.tensor(_features(), requires_grad=True)
    boxes = torch.tensor(BOXES)
    y = ct.roi_spp(x, boxes, LEVELS, SCALE, mode=mode)
    np.testing.assert_array_equal(
        y.detach().numpy(), curoi.roi_spp(_features(), BOXES, LEVELS, SCALE, mode=mode))
    # Finite differences (the boxes stay clear of ties on random features).
    assert torch.autograd.gradcheck(
        lambda x: ct.roi_spp(x, boxes, LEVELS, SCALE, mode=mode), (x,))


def test_torch_whole_maps_channels_last_and_determinism(torch):
    import curoi.torch as ct
    x = torch.tensor(_features(shape=(3, 2, 7, 5)))
    np.testing.assert_array_equal(ct.roi_spp(x, None, (1, 2)).numpy(),
                                  curoi.roi_spp(x.numpy(), None, (1, 2)))
    for run in (ct.roi_spp, curoi.roi_spp):  # checked even where it does not apply
        with pytest.raises(ValueError, match="spatial_scale"):
            run(x if run is ct.roi_spp else x.numpy(), None, (1, 2), spatial_scale=-1.0)
    xl = torch.tensor(_features()).to(memory_format=torch.channels_last).requires_grad_()
    x = torch.tensor(_features(), requires_grad=True)
    boxes = torch.tensor(BOXES)
    y, yl = ct.roi_spp(x, boxes, LEVELS, SCALE), ct.roi_spp(xl, boxes, LEVELS, SCALE)
    assert torch.equal(y, yl)
    g = torch.randn(y.shape, dtype=y.dtype)
    (gx,) = torch.autograd.grad(y, x, g)
    (gxl,) = torch.autograd.grad(yl, xl, g)
    assert torch.equal(gx, gxl) and gxl.is_contiguous(memory_format=torch.channels_last)
    torch.use_deterministic_algorithms(True)
    try:
        first = torch.autograd.grad(ct.roi_spp(x, boxes, LEVELS, SCALE, mode="avg"), x, g)[0]
        again = torch.autograd.grad(ct.roi_spp(x, boxes, LEVELS, SCALE, mode="avg"), x, g)[0]
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first, again)


def test_torch_opcheck_and_compile(torch):
    import curoi.torch as ct
    x = torch.tensor(_features(), requires_grad=True)
    boxes = torch.tensor(BOXES)
    for mode in ("max", "avg"):
        torch.library.opcheck(torch.ops.curoi.roi_spp.default,
                              (x, boxes, [1, 2, 3], SCALE, mode, "torchvision"))
    compiled = torch.compile(lambda x, b: ct.roi_spp(x, b, LEVELS, SCALE), fullgraph=True)
    y = compiled(x, boxes)
    assert torch.equal(y, ct.roi_spp(x, boxes, LEVELS, SCALE))
    (gx,) = torch.autograd.grad(y.sum(), x)
    np.testing.assert_array_equal(gx.numpy(), curoi.roi_spp_backward(
        np.ones(y.shape), BOXES, x.shape, LEVELS, SCALE,
        argmax=curoi.roi_spp(_features(), BOXES, LEVELS, SCALE, return_argmax=True)[1]))


# ---------------------------------------------------------------------- JAX
@pytest.fixture
def jax64():
    jax = pytest.importorskip("jax")
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_jax_matches_numpy_under_jit_grad_and_vmap(jax64, mode):
    import jax.numpy as jnp
    import curoi.jax as cj
    jax = jax64
    x, boxes = _features(), jnp.asarray(BOXES)
    y, argmax = curoi.roi_spp(x, BOXES, LEVELS, SCALE, mode=mode, return_argmax=True)
    run = jax.jit(lambda x: cj.roi_spp(x, boxes, LEVELS, SCALE, mode=mode))
    np.testing.assert_array_equal(np.asarray(run(jnp.asarray(x))), y)
    g = np.random.default_rng(3).standard_normal(y.shape)
    gx = jax.grad(lambda x: (run(x) * g).sum())(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(gx), curoi.roi_spp_backward(
        g, BOXES, x.shape, LEVELS, SCALE, mode=mode, argmax=argmax))
    batch = jnp.stack([jnp.asarray(x), jnp.asarray(x) * 2])
    yv = jax.vmap(lambda x: cj.roi_spp(x, boxes, LEVELS, SCALE, mode=mode))(batch)
    np.testing.assert_allclose(np.asarray(yv[1]), 2 * y, rtol=1e-15)


def test_jax_whole_maps_and_nhwc(jax64):
    import jax.numpy as jnp
    import curoi.jax as cj
    x = _features(shape=(3, 2, 7, 5))
    np.testing.assert_array_equal(np.asarray(cj.roi_spp(jnp.asarray(x), None, (1, 2))),
                                  curoi.roi_spp(x, None, (1, 2)))
    np.testing.assert_array_equal(
        np.asarray(cj.roi_spp(jnp.asarray(_nhwc(x)), None, (1, 2), data_format="NHWC")),
        curoi.roi_spp(x, None, (1, 2)))

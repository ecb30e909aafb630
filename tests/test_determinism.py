"""deterministic=True: bitwise the same gradient in every run and on every
thread count, within the documented precision of the reference, and with
inf/NaN gradients where the plain sum puts them.

Two sums are checked on the CPU: its own (each gradient plane summed by one
thread in a fixed order, what deterministic=True uses on the CPU) and the
GPU's int64 fixed-point sum, which curoi._ops.FIXED_POINT_ON_CPU runs through
the CPU backend so that its kernels are tested without a GPU."""

import numpy as np
import pytest

import curoi
import reference
from curoi import _ops

RNG_SEED = 1234


def _case(dtype, k=96, n=2, c=3, h=13, w=17, output_size=(3, 4), seed=RNG_SEED):
    """Many overlapping boxes, so that every pixel receives many terms and
    the order of a floating-point sum matters."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    boxes = reference.random_boxes(rng, n, h, w, 1.0, k)
    boxes = boxes.astype(dtype if dtype == np.float64 else np.float32)
    g = rng.standard_normal((boxes.shape[0], c) + output_size).astype(dtype)
    return x, boxes, g


def _align_backward(g, boxes, shape, deterministic, **kw):
    kw = {"output_size": g.shape[2:], "sampling_ratio": 2, "aligned": True, **kw}
    return curoi.roi_align_backward(g, boxes, shape, deterministic=deterministic, **kw)


def _pool_backward(x, boxes, g, deterministic, convention="torchvision"):
    _, argmax = curoi.roi_pool(x, boxes, g.shape[2:], convention=convention,
                               return_argmax=True)
    return curoi.roi_pool_backward(g, argmax, boxes, x.shape,
                                   deterministic=deterministic)


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint32 if a.dtype.itemsize == 4 else np.uint64)


@pytest.fixture(params=["cpu-sum", "fixed-point"])
def sum_method(request, monkeypatch):
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", request.param == "fixed-point")
    return request.param


@pytest.fixture
def fixed_point(monkeypatch):
    monkeypatch.setattr(_ops, "FIXED_POINT_ON_CPU", True)


@pytest.fixture
def restore_threads():
    before = curoi.get_num_threads()
    yield
    curoi.set_num_threads(before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_roi_align_backward_is_bitwise_reproducible(dtype, sum_method,
                                                    restore_threads):
    x, boxes, g = _case(dtype)
    results = []
    for threads in (1, 2, 5, 2, 1):
        curoi.set_num_threads(threads)
        results.append(_align_backward(g, boxes, x.shape, True))
    for other in results[1:]:
        assert np.array_equal(_bits(results[0]), _bits(other))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_roi_pool_backward_is_bitwise_reproducible(dtype, sum_method,
                                                   restore_threads):
    # Few distinct pixels and many boxes: argmaxes collide.
    x, boxes, g = _case(dtype, h=5, w=6, output_size=(2, 2))
    results = []
    for threads in (1, 2, 5, 2, 1):
        curoi.set_num_threads(threads)
        results.append(_pool_backward(x, boxes, g, True))
    for other in results[1:]:
        assert np.array_equal(_bits(results[0]), _bits(other))


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 2, 72])
def test_deterministic_roi_align_backward_matches_the_reference(
        aligned, sampling_ratio, sum_method):
    # sampling_ratio=72 puts more than 64 samples per bin side on small bins:
    # the closed-form per-pixel sums of dense sampling (fewer boxes there:
    # the reference visits every one of the 72 x 72 samples of each bin).
    x, boxes, g = _case(np.float64, k=24 if sampling_ratio < 64 else 8)
    boxes[0] = [0, 1.3, 1.7, 12.2, 9.6]  # on the map: its samples are summed
    expected = reference.roi_align_backward(g, boxes, x.shape, g.shape[2:], 1.0,
                                            sampling_ratio, aligned)
    got = _align_backward(g, boxes, x.shape, True, aligned=aligned,
                          sampling_ratio=sampling_ratio)
    # Terms are multiples of 2**-e with max|g| * K*PH*PW * 2**e <= 2**61:
    # each rounding is at most half of that step.
    terms = g.shape[0] * g.shape[2] * g.shape[3]
    step = np.abs(g).max() * terms * 2.0**-60
    assert np.abs(got - expected).max() <= 1e-12 + 1e4 * step


@pytest.mark.parametrize("convention", ["torchvision", "mmcv"])
def test_deterministic_roi_pool_backward_matches_the_reference(convention,
                                                               sum_method):
    x, boxes, g = _case(np.float32, h=6, w=7, output_size=(2, 3))
    # The argmax of the reference, so that nothing expected comes from curoi.
    _, argmax = reference.roi_pool(x.astype(np.float64), boxes, (2, 3), 1.0,
                                   convention)
    expected = reference.roi_pool_backward(g.astype(np.float64), argmax, boxes,
                                           x.shape)
    got = curoi.roi_pool_backward(g, argmax, boxes, x.shape, deterministic=True)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_float32_result_is_the_exact_sum_rounded_once(fixed_point):
    # With a few terms the fixed-point sum is exact: the float32 result is the
    # float64 sum of the same float32 terms, rounded once. The plain atomic
    # sum rounds at every add instead.
    x = np.zeros((1, 1, 4, 4), np.float32)
    boxes = np.array([[0, 0, 0, 3, 3]] * 3, np.float32)
    g = np.array([1.0, 2.0**-30, -(2.0**-30) * 3], np.float32).reshape(3, 1, 1, 1)
    _, argmax = curoi.roi_pool(x, boxes, 1, return_argmax=True)
    got = curoi.roi_pool_backward(g, argmax, boxes, x.shape, deterministic=True)
    assert got[0, 0, 0, 0] == np.float32(1.0 + 2.0**-30 - 3 * 2.0**-30)


@pytest.mark.parametrize("power", [-100, 60, 100])
def test_power_of_two_scaling_of_gradients_is_exact(power, sum_method):
    # The fixed-point step follows max|g|: scaling g by 2**power scales every
    # integer term's unit by the same power, so the result scales exactly.
    x, boxes, g = _case(np.float32, k=40)
    base = _align_backward(g, boxes, x.shape, True)
    scaled = _align_backward(g * np.float32(2.0**power), boxes, x.shape, True)
    assert np.array_equal(scaled, base * np.float32(2.0**power))


def test_non_finite_gradients_land_where_the_plain_sum_puts_them(fixed_point):
    x, boxes, g = _case(np.float32, k=30)
    boxes[[0, 3, 7]] = [[0, 1, 1, 12, 9], [1, 2, 3, 9, 11], [0, 0, 0, 16, 12]]
    g[0, 0, 0, 0] = np.inf
    g[3, 1, 1, 2] = -np.inf
    g[7, 2, 2, 3] = np.nan
    plain = _align_backward(g, boxes, x.shape, False)
    fixed = _align_backward(g, boxes, x.shape, True)
    assert np.array_equal(np.isnan(plain), np.isnan(fixed))
    assert np.array_equal(np.isposinf(plain), np.isposinf(fixed))
    assert np.array_equal(np.isneginf(plain), np.isneginf(fixed))
    assert (~np.isfinite(fixed)).any()
    finite = np.isfinite(plain)
    np.testing.assert_allclose(fixed[finite], plain[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sums_beyond_the_float_range_overflow_to_inf_not_wrap(dtype, sum_method):
    big = np.finfo(dtype).max
    x = np.zeros((1, 1, 3, 3), dtype)
    boxes = np.array([[0, 0, 0, 2, 2]] * 4, dtype)
    g = np.full((4, 1, 1, 1), big, dtype)
    g[3] = -big / 2
    _, argmax = curoi.roi_pool(x, boxes, 1, return_argmax=True)
    got = curoi.roi_pool_backward(g, argmax, boxes, x.shape, deterministic=True)
    assert got[0, 0, 0, 0] == np.inf  # 2.5 * max, as the plain sum gives
    assert np.count_nonzero(got) == 1


def test_all_zero_and_empty_gradients(sum_method):
    x, boxes, g = _case(np.float32, k=10)
    zero = _align_backward(np.zeros_like(g), boxes, x.shape, True)
    assert not zero.any()
    none = _align_backward(g[:0], boxes[:0], x.shape, True)
    assert none.shape == x.shape and not none.any()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_gradients_are_reproducible_and_keep_their_dtype(
        dtype, sum_method):
    torch = pytest.importorskip("torch")
    x, boxes, g = _case(np.float32, k=50)
    gt = torch.from_numpy(g).to(getattr(torch, dtype))
    bt = torch.from_numpy(boxes)
    first = _align_backward(gt, bt, x.shape, True)
    second = _align_backward(gt, bt, x.shape, True)
    assert first.dtype == getattr(torch, dtype)
    assert torch.equal(first, second)
    # Accumulated in float32 and rounded once: the float32 result of the same
    # (rounded) gradients, rounded to the half type.
    wide = _align_backward(gt.float().numpy(), boxes, x.shape, True)
    assert torch.equal(first, torch.from_numpy(wide).to(first.dtype))


def test_deterministic_must_be_a_bool():
    x, boxes, g = _case(np.float32, k=4)
    with pytest.raises(TypeError, match="deterministic"):
        _align_backward(g, boxes, x.shape, 1)
    _, argmax = curoi.roi_pool(x, boxes, g.shape[2:], return_argmax=True)
    with pytest.raises(TypeError, match="deterministic"):
        curoi.roi_pool_backward(g, argmax, boxes, x.shape, deterministic="yes")


# ------------------------------------------------- the fixed-point scale
def _four_pass_scale(g):
    """The scale as the front end once computed it, in four array passes
    with temporaries of the gradient's size: |g|, isfinite, where, max."""
    magnitude = np.abs(g)
    finite = np.where(np.isfinite(magnitude), magnitude, 0)
    return float(finite.max()) if finite.size else 0.0


def _one_pass_scale(g):
    max_abs = np.zeros(1, np.float64)
    _ops._finite_max_abs(np.ascontiguousarray(g), max_abs, cuda=False)
    return float(max_abs[0])


def _scale_cases():
    rng = np.random.default_rng(99)
    for dtype in (np.float32, np.float64):
        for size in (1, 7, 4096, 100_003):
            g = (rng.standard_normal(size) * 10.0 ** rng.integers(-30, 30)).astype(dtype)
            yield dtype, "random", g
            special = g.copy()
            special[rng.integers(0, size, max(size // 5, 1))] = [np.inf, -np.inf, np.nan][
                size % 3]
            yield dtype, "non-finite entries", special
        yield dtype, "all non-finite", np.array([np.nan, np.inf, -np.inf], dtype)
        yield dtype, "zeros", np.zeros(10, dtype)
        yield dtype, "negative largest", np.array([1.0, -3.5, 2.0], dtype)
        yield dtype, "tiny", np.array([5e-324 if dtype == np.float64 else 1e-45], dtype)
        yield dtype, "largest finite", np.array([np.finfo(dtype).max, -1.0], dtype)


@pytest.mark.parametrize("dtype, what, g", list(_scale_cases()),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_the_one_pass_scale_is_the_four_pass_one(dtype, what, g, restore_threads):
    expected = _four_pass_scale(g)
    for threads in (1, 2, 3):
        curoi.set_num_threads(threads)
        got = _one_pass_scale(g)
        assert got == expected, (what, threads, got, expected)


def test_the_scale_of_a_strided_gradient_reads_it_once(restore_threads):
    # A gradient of many pixels whose largest magnitude sits at the very end
    # and at the very start: every share of the work is folded in.
    for position in (0, -1):
        g = np.ones(1_000_001, np.float32)
        g[position] = -1e30
        curoi.set_num_threads(2)
        assert _one_pass_scale(g) == np.float32(1e30)

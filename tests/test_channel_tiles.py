"""The families whose GPU loops take a thread per box, bin and tile of
channels (curoi_channel_tile): RoI Pool's forward, position-sensitive RoI
Pool, RoI Align (average and max modes), position-sensitive, multiscale and
rotated RoI Align, Precise RoI Pooling and crop_and_resize, forward and
backward.

The tile a call gets is chosen by curoi._ops.channel_groups; here it is
forced to every kind of split (one tile for all channels, uneven tiles,
a tile per channel, more tiles than channels), and every split must give
the reference's numbers and the same bits as any other split (the
deterministic backward included), in both layouts, on hostile boxes. On the CPU loops the split
means nothing and the same assertions hold; tests/test_gpu_loops.py runs
this file with the GPU's loops, where it is what they check.
"""

import numpy as np
import pytest

import curoi
from curoi import _ops

import reference as ref

CONVENTIONS = ["torchvision", "mmcv"]


def _forced(monkeypatch, groups):
    """Every tiled launch splits each (box, bin)'s channels into
    ``groups(channels)`` tiles."""
    monkeypatch.setattr(_ops, "channel_groups", lambda bins, channels: groups(channels))


SPLITS = {
    "one tile": lambda c: 1,
    "two uneven tiles": lambda c: 2,
    "three tiles": lambda c: 3,
    "a tile per channel": lambda c: c,
    "more tiles than channels": lambda c: c + 3,
}


def _case(seed, channels, dtype):
    rng = np.random.default_rng(seed)
    n, h, w = 2, 9, 11
    x = rng.standard_normal((n, channels, h, w)).astype(dtype)
    x[0, 0, 2, 3] = np.nan  # a NaN wins its bins
    boxes = ref.random_boxes(rng, n, h, w, 1.0, 12)
    boxes = ref.spoil_boxes(rng, boxes, n, probability=1.0)
    return x, boxes.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels", [1, 5, 37])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_every_split_gives_the_reference_and_the_same_bits(monkeypatch, convention,
                                                           channels, dtype):
    x, boxes = _case(channels, channels, dtype)
    want, want_argmax = ref.roi_pool(x, boxes, (3, 2), 0.8, convention=convention)
    results = {}
    for name, groups in SPLITS.items():
        _forced(monkeypatch, groups)
        for data_format in ("NCHW", "NHWC"):
            features = x if data_format == "NCHW" else np.ascontiguousarray(
                x.transpose(0, 2, 3, 1))
            y, argmax = curoi.roi_pool(features, boxes, (3, 2), 0.8,
                                       convention=convention, return_argmax=True,
                                       data_format=data_format)
            if data_format == "NHWC":
                y, argmax = y.transpose(0, 3, 1, 2), argmax.transpose(0, 3, 1, 2)
            np.testing.assert_array_equal(argmax, want_argmax, err_msg=f"{name} {data_format}")
            np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
            np.testing.assert_array_equal(y, want.astype(dtype), err_msg=f"{name} {data_format}")
            results[name, data_format] = y.tobytes()
    assert len(set(results.values())) == 1


def test_the_maxima_alone_follow_the_tiles(monkeypatch):
    # Without argmax the forward writes only the maxima, through the same
    # tiled output addresses.
    x, boxes = _case(3, 6, np.float32)
    want, _ = ref.roi_pool(x, boxes, 4, 1.0)
    for groups in SPLITS.values():
        _forced(monkeypatch, groups)
        y = curoi.roi_pool(x, boxes, 4, 1.0)
        np.testing.assert_array_equal(y, want.astype(np.float32))


def test_the_default_split_fills_a_launch_and_bounds_the_tile():
    # Large calls get tiles of up to MAX_CHANNEL_TILE channels and still
    # TILE_THREADS threads or more; small calls a thread per channel.
    w1_bins, w1_channels = 1024 * 7 * 7, 256
    groups = _ops.channel_groups(w1_bins, w1_channels)
    tile = -(-w1_channels // groups)
    assert 1 < tile <= _ops.MAX_CHANNEL_TILE
    assert w1_bins * groups >= _ops.TILE_THREADS
    assert _ops.channel_groups(4 * 49, 256) == 256


def _nhwc(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def _nchw(a):
    return a.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("out_channels", [1, 3, 11])
def test_ps_roi_pool_every_split_gives_the_reference_and_the_same_bits(
        monkeypatch, out_channels, dtype):
    size = (3, 2)
    rng = np.random.default_rng(out_channels)
    n, h, w = 2, 9, 11
    x = rng.standard_normal((n, out_channels * 6, h, w)).astype(dtype)
    boxes = ref.spoil_boxes(rng, ref.random_boxes(rng, n, h, w, 1.0, 10), n,
                            probability=1.0).astype(dtype)
    gy = rng.standard_normal((len(boxes), out_channels) + size).astype(dtype)
    want = ref.ps_roi_pool(x, boxes, size, 0.8)
    want_grad = ref.ps_roi_pool_backward(gy, boxes, x.shape, size, 0.8)
    rtol = 1e-6 if dtype == np.float32 else 1e-13
    forwards, fixed = set(), set()
    for name, groups in SPLITS.items():
        _forced(monkeypatch, groups)
        for data_format in ("NCHW", "NHWC"):
            nhwc = data_format == "NHWC"
            y = curoi.ps_roi_pool(_nhwc(x) if nhwc else x, boxes, size, 0.8,
                                  data_format=data_format)
            y = _nchw(y) if nhwc else y
            np.testing.assert_allclose(y, want, rtol=rtol, atol=rtol,
                                       err_msg=f"{name} {data_format}")
            forwards.add(np.ascontiguousarray(y).tobytes())
            for deterministic in (False, True):
                g = curoi.ps_roi_pool_backward(_nhwc(gy) if nhwc else gy, boxes,
                                               x.shape if not nhwc else _nhwc(x).shape,
                                               size, 0.8, deterministic=deterministic,
                                               data_format=data_format)
                g = _nchw(g) if nhwc else g
                np.testing.assert_allclose(g, want_grad, rtol=rtol, atol=rtol,
                                           err_msg=f"{name} {data_format} {deterministic}")
                if deterministic:
                    fixed.add(np.ascontiguousarray(g).tobytes())
    assert len(forwards) == 1
    assert len(fixed) == 1


# RoI Align's tiles sum CUROI_ALIGN_CHUNK (8) channels at a time: channel
# counts below, at and across a chunk, and across several.
ALIGN_CHANNELS = [1, 3, 8, 17]
# (output size, sampling_ratio, aligned): fixed, adaptive and a one-sample
# grid; a grid of 65 samples per side, past the scanned ones (found by
# binary search); and one of 200, summed per pixel (roi_align_geometry.cuh's
# dense axes). The reference visits every sample: few boxes for the large
# grids.
ALIGN_SAMPLING = [((3, 2), 2, True), ((2, 3), 0, False), (1, 1, True), (2, 65, True),
                  (1, 200, False)]


def _align_case(seed, channels, dtype, k=12):
    rng = np.random.default_rng(seed)
    n, h, w = 2, 9, 11
    x = rng.standard_normal((n, channels, h, w)).astype(dtype)
    boxes = ref.random_boxes(rng, n, h, w, 1.0, k)
    boxes = ref.spoil_boxes(rng, boxes, n, probability=1.0)
    huge = np.array([[0, -1e9, -1e9, 1e9, 1e9], [1, 2, 3, 2, 3]])  # huge, and a point
    return x, np.concatenate([boxes, huge]).astype(dtype), rng


def _layouts(x):
    yield "NCHW", x, lambda a: a
    yield "NHWC", _nhwc(x), _nchw


def _tolerance(dtype):
    return (dict(rtol=1e-5, atol=1e-5) if dtype == np.float32
            else dict(rtol=1e-12, atol=1e-12))


# The large grids' reference is slow: float64 alone there.
@pytest.mark.parametrize("sampling,dtype", [
    (sampling, dtype) for sampling in ALIGN_SAMPLING for dtype in (np.float32, np.float64)
    if sampling[1] < 64 or dtype == np.float64])
@pytest.mark.parametrize("channels", ALIGN_CHANNELS)
def test_roi_align_every_split_gives_the_reference_and_the_same_bits(
        monkeypatch, channels, sampling, dtype):
    size, ratio, aligned = sampling
    x, boxes, rng = _align_case(channels, channels, dtype, k=12 if ratio < 64 else 2)
    gy = rng.standard_normal((len(boxes), channels) + ref._pair(size)).astype(dtype)
    # The huge box samples densely: its reference would visit every sample.
    # It is compared across splits only, and sends no gradient here.
    usable = np.abs(boxes).max(axis=1) < 1e6
    gy[~usable] = 0
    want = ref.roi_align(x, boxes[usable], size, 0.8, ratio, aligned)
    want_grad = ref.roi_align_backward(gy[usable], boxes[usable], x.shape, size, 0.8,
                                       ratio, aligned)
    forwards, backwards, fixed = set(), set(), set()
    for name, groups in SPLITS.items():
        _forced(monkeypatch, groups)
        for data_format, features, back in _layouts(x):
            y = back(curoi.roi_align(features, boxes, size, 0.8, ratio, aligned,
                                     data_format=data_format))
            np.testing.assert_allclose(y[usable], want, **_tolerance(dtype),
                                       err_msg=f"{name} {data_format}")
            forwards.add(np.ascontiguousarray(y).tobytes())
            g = _nhwc(gy) if data_format == "NHWC" else gy
            for deterministic in (False, True):
                gx = curoi.roi_align_backward(g, boxes, features.shape, size, 0.8, ratio,
                                              aligned, deterministic=deterministic,
                                              data_format=data_format)
                gx = back(gx)
                np.testing.assert_allclose(gx, want_grad, **_tolerance(dtype),
                                           err_msg=f"{name} {data_format} {deterministic}")
                (fixed if deterministic else backwards).add(
                    np.ascontiguousarray(gx).tobytes())
    # The split never changes a sum's terms or their order: the forward and
    # the deterministic backward are the same bits for every split and
    # layout; the plain backward too here, where the loops run serially.
    assert len(forwards) == 1
    assert len(fixed) == 1
    assert len(backwards) == 1


def test_roi_align_huge_box_gives_the_same_finite_numbers_in_every_split():
    # A box of 2e9 pixels with adaptive sampling: some 1e9 samples per bin
    # side, summed per pixel (dense axes), the same whatever the split.
    x = np.ones((1, 3, 5, 6), np.float64)
    boxes = np.array([[0, -1e9, -1e9, 1e9, 1e9]])
    results = set()
    for groups in SPLITS.values():
        with pytest.MonkeyPatch.context() as m:
            _forced(m, groups)
            y = curoi.roi_align(x, boxes, 2, 1.0, 0, True)
        assert np.isfinite(y).all() and (y >= 0).all()
        results.add(y.tobytes())
    assert len(results) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("out_channels", [1, 3, 10])
def test_ps_roi_align_every_split_gives_the_reference_and_the_same_bits(
        monkeypatch, out_channels, dtype):
    size = (3, 2)
    rng = np.random.default_rng(out_channels + 50)
    n, h, w = 2, 9, 11
    x = rng.standard_normal((n, out_channels * 6, h, w)).astype(dtype)
    boxes = ref.spoil_boxes(rng, ref.random_boxes(rng, n, h, w, 1.0, 10), n,
                            probability=1.0).astype(dtype)
    gy = rng.standard_normal((len(boxes), out_channels) + size).astype(dtype)
    forwards, fixed = set(), set()
    for ratio in (2, 0):
        want = ref.ps_roi_align(x, boxes, size, 0.8, ratio)
        want_grad = ref.ps_roi_align_backward(gy, boxes, x.shape, size, 0.8, ratio)
        for name, groups in SPLITS.items():
            _forced(monkeypatch, groups)
            for data_format, features, back in _layouts(x):
                y = back(curoi.ps_roi_align(features, boxes, size, 0.8, ratio,
                                            data_format=data_format))
                np.testing.assert_allclose(y, want, **_tolerance(dtype),
                                           err_msg=f"{name} {data_format}")
                forwards.add((ratio, np.ascontiguousarray(y).tobytes()))
                g = _nhwc(gy) if data_format == "NHWC" else gy
                for deterministic in (False, True):
                    gx = back(curoi.ps_roi_align_backward(
                        g, boxes, features.shape, size, 0.8, ratio,
                        deterministic=deterministic, data_format=data_format))
                    np.testing.assert_allclose(gx, want_grad, **_tolerance(dtype),
                                               err_msg=f"{name} {data_format}")
                    if deterministic:
                        fixed.add((ratio, np.ascontiguousarray(gx).tobytes()))
    assert len(forwards) == 2
    assert len(fixed) == 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels", [1, 11])
def test_multiscale_roi_align_every_split_gives_the_reference_and_the_same_bits(
        monkeypatch, channels, dtype):
    rng = np.random.default_rng(channels)
    scales = [1 / 4, 1 / 8, 1 / 16]
    image = (128, 160)
    features = [rng.standard_normal((2, channels, round(image[0] * s), round(image[1] * s)))
                .astype(dtype) for s in scales]
    side = np.exp(rng.uniform(np.log(8), np.log(400), 30))
    x1, y1 = rng.uniform(-10, 150, 30), rng.uniform(-10, 120, 30)
    boxes = np.stack([rng.integers(0, 2, 30), x1, y1, x1 + side, y1 + side * 0.7], axis=1)
    boxes = np.concatenate([boxes, [[0, 300, 40, 100, 400], [np.nan, 1, 1, 9, 9]]])
    boxes = boxes.astype(dtype)
    size = (3, 2)
    level_dtype = np.float64 if dtype == np.float64 else np.float32
    want = ref.multiscale_roi_align(features, boxes, size, scales, 2, True,
                                    level_dtype=level_dtype)
    gy = rng.standard_normal((len(boxes), channels) + size).astype(dtype)
    want_grads = ref.multiscale_roi_align_backward(gy, boxes, [f.shape for f in features],
                                                   size, scales, 2, True,
                                                   level_dtype=level_dtype)
    assert np.count_nonzero(want) > 0.5 * want.size
    forwards, fixed = set(), set()
    for name, groups in SPLITS.items():
        _forced(monkeypatch, groups)
        for data_format in ("NCHW", "NHWC"):
            nhwc = data_format == "NHWC"
            levels = [_nhwc(f) for f in features] if nhwc else features
            y = curoi.multiscale_roi_align(levels, boxes, size, scales, 2, True,
                                           data_format=data_format)
            y = _nchw(y) if nhwc else y
            np.testing.assert_allclose(y, want, **_tolerance(dtype),
                                       err_msg=f"{name} {data_format}")
            forwards.add(np.ascontiguousarray(y).tobytes())
            grads = curoi.multiscale_roi_align_backward(
                _nhwc(gy) if nhwc else gy, boxes, [f.shape for f in levels], size, scales,
                2, True, data_format=data_format, deterministic=True)
            for got, expected in zip(grads, want_grads):
                got = _nchw(got) if nhwc else got
                np.testing.assert_allclose(got, expected, **_tolerance(dtype),
                                           err_msg=f"{name} {data_format}")
            fixed.add(b"".join(np.ascontiguousarray(_nchw(g) if nhwc else g).tobytes()
                               for g in grads))
    assert len(forwards) == 1
    assert len(fixed) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("convention,ratio", [("detectron2", 2), ("mmcv", 0)])
@pytest.mark.parametrize("channels", [1, 3, 17])
def test_roi_align_rotated_every_split_gives_the_reference_and_the_same_bits(
        monkeypatch, channels, convention, ratio, dtype):
    rng = np.random.default_rng(channels + 7)
    n, h, w, k = 2, 9, 11, 10
    x = rng.standard_normal((n, channels, h, w)).astype(dtype)
    boxes = np.stack([rng.integers(0, n, k), rng.uniform(-2, 13, k), rng.uniform(-2, 11, k),
                      rng.uniform(0, 9, k), rng.uniform(0, 9, k), rng.uniform(-180, 180, k)], 1)
    boxes[0] = [np.nan, 3, 3, 4, 4, 10]  # reads nothing
    boxes[1] = [n, 4, 5, 3, 3, 30]       # no such image: nothing
    boxes = boxes.astype(dtype)
    size = (3, 2)
    gy = rng.standard_normal((k, channels) + size).astype(dtype)
    want = ref.roi_align_rotated(x, boxes, size, 0.8, ratio, convention)
    want_grad = ref.roi_align_rotated_backward(gy, boxes, x.shape, size, 0.8, ratio,
                                               convention)
    forwards, fixed = set(), set()
    for name, groups in SPLITS.items():
        _forced(monkeypatch, groups)
        for data_format, features, back in _layouts(x):
            y = back(curoi.roi_align_rotated(features, boxes, size, 0.8, ratio,
                                             convention=convention,
                                             data_format=data_format))
            np.testing.assert_allclose(y, want, **_tolerance(dtype),
                                       err_msg=f"{name} {data_format}")
            forwards.add(np.ascontiguousarray(y).tobytes())
            g = _nhwc(gy) if data_format == "NHWC" else gy
            for deterministic in (False, True):
                gx = back(curoi.roi_align_rotated_backward(
                    g, boxes, features.shape, size, 0.8, ratio, convention=convention,
                    deterministic=deterministic, data_format=data_format))
                np.testing.assert_allclose(gx, want_grad, **_tolerance(dtype),
                                           err_msg=f"{name} {data_format} {deterministic}")
                if deterministic:
                    fixed.add(np.ascontiguousarray(gx).tobytes())
    assert np.count_nonzero(want) > 0.5 * want.size
    assert len(forwards) == 1
    assert len(fixed) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sampling", [((3, 2), 2, True), ((2, 3), 0, False)])
@pytest.mark.parametrize("channels", [1, 3, 17])
def test_roi_align_max_every_split_gives_the_reference_and_the_same_bits(
        monkeypatch, channels, sampling, dtype):
    size, ratio, aligned = sampling
    x, boxes, rng = _align_case(channels + 30, channels, dtype)
    x[0, 0, 2, 3] = np.nan  # a NaN wins its bins
    usable = np.abs(boxes).max(axis=1) < 1e6  # the huge box: across splits only
    want, want_argmax = ref.roi_align_max_interpolated(x, boxes[usable], size, 0.8, ratio,
                                                       aligned)
    gy = rng.standard_normal((len(boxes), channels) + ref._pair(size)).astype(dtype)
    gy[~usable] = 0
    results, fixed = set(), set()
    for name, groups in SPLITS.items():
        _forced(monkeypatch, groups)
        for data_format, features, back in _layouts(x):
            y, argmax = curoi.roi_align(features, boxes, size, 0.8, ratio, aligned,
                                        mode="max", return_argmax=True,
                                        data_format=data_format)
            y, argmax_nchw = back(y), back(argmax)
            np.testing.assert_allclose(y[usable], want, **_tolerance(dtype),
                                       err_msg=f"{name} {data_format}")
            if dtype == np.float64:  # float32 may break a tie differently
                np.testing.assert_array_equal(argmax_nchw[usable], want_argmax)
            want_grad = ref.roi_align_max_interpolated_backward(
                gy[usable], argmax_nchw[usable], boxes[usable], x.shape, size, 0.8, ratio,
                aligned)
            g = _nhwc(gy) if data_format == "NHWC" else gy
            for deterministic in (False, True):
                gx = back(curoi.roi_align_backward(
                    g, boxes, features.shape, size, 0.8, ratio, aligned, mode="max",
                    argmax=argmax, deterministic=deterministic, data_format=data_format))
                np.testing.assert_allclose(gx, want_grad, **_tolerance(dtype),
                                           err_msg=f"{name} {data_format} {deterministic}")
                if deterministic:
                    fixed.add(np.ascontiguousarray(gx).tobytes())
            results.add(np.ascontiguousarray(y).tobytes() + argmax_nchw.tobytes())
    assert len(results) == 1
    assert len(fixed) == 1


@pytest.mark.parametrize("channels", [1, 11])
def test_roi_align_max_onnx_mode_is_the_same_bits_in_every_split(monkeypatch, channels):
    # ONNX RoiAlign's max (the largest weighted corner term; no gradient):
    # onnxruntime checks its numbers (test_onnx_roi_align.py); here every
    # split and layout must give the same bits as the one-channel tiles.
    x, boxes, _ = _align_case(channels + 60, channels, np.float32)
    results = set()
    for groups in SPLITS.values():
        _forced(monkeypatch, groups)
        for channels_last in (False, True):
            features = _nhwc(x) if channels_last else x
            shape = (len(boxes), 3, 2, channels) if channels_last else (len(boxes), channels, 3, 2)
            y = np.full(shape, 7, np.float32)  # not zeros: the kernel must write all
            _ops.roi_align_max_forward(features, boxes, y, None, 0.8, 2, True, "onnx",
                                       channels_last)
            results.add((_nchw(y) if channels_last else y).tobytes())
    assert len(results) == 1
    assert not np.isin(7, y)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels", [1, 3, 17])
def test_prroi_pool_every_split_gives_the_reference_and_the_same_bits(monkeypatch, channels,
                                                                      dtype):
    rng = np.random.default_rng(channels + 90)
    x = rng.standard_normal((2, channels, 9, 11)).astype(dtype)
    boxes = np.concatenate([ref.random_boxes(rng, 2, 9, 11, 1.0, 12,
                                             kinds=("inside", "partly_out")),
                            [[np.nan, 1, 1, 5, 5], [0, -1e9, -1e9, 1e9, 1e9]]]).astype(dtype)
    usable = np.abs(boxes).max(axis=1) < 1e6  # the huge box: across splits only
    size = (3, 2)
    gy = rng.standard_normal((len(boxes), channels) + size).astype(dtype)
    gy[~usable] = 0
    want = ref.prroi_pool(x, boxes[usable], size, 0.8)
    want_grad = ref.prroi_pool_backward(gy[usable], boxes[usable], x.shape, size, 0.8)
    forwards, fixed = set(), set()
    for name, groups in SPLITS.items():
        _forced(monkeypatch, groups)
        for data_format, features, back in _layouts(x):
            y = back(curoi.prroi_pool(features, boxes, size, 0.8, data_format=data_format))
            np.testing.assert_allclose(y[usable], want, **_tolerance(dtype),
                                       err_msg=f"{name} {data_format}")
            forwards.add(np.ascontiguousarray(y).tobytes())
            g = _nhwc(gy) if data_format == "NHWC" else gy
            for deterministic in (False, True):
                gx = back(curoi.prroi_pool_backward(g, boxes, features.shape, size, 0.8,
                                                    deterministic=deterministic,
                                                    data_format=data_format))
                np.testing.assert_allclose(gx, want_grad, **_tolerance(dtype),
                                           err_msg=f"{name} {data_format} {deterministic}")
                if deterministic:
                    fixed.add(np.ascontiguousarray(gx).tobytes())
    assert np.count_nonzero(want) > 0.5 * want.size
    assert len(forwards) == 1
    assert len(fixed) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("method", ["bilinear", "nearest"])
@pytest.mark.parametrize("channels", [1, 3, 17])
def test_crop_and_resize_every_split_gives_the_reference_and_the_same_bits(
        monkeypatch, channels, method, dtype):
    rng = np.random.default_rng(channels + 120)
    n, h, w, k = 2, 9, 11, 12
    image = rng.standard_normal((n, h, w, channels)).astype(dtype)
    boxes = rng.uniform(-0.3, 1.3, (k, 4)).astype(dtype)
    boxes[0] = [np.nan, 0, 1, 1]
    indices = rng.integers(0, n, k).astype(np.int32)
    indices[1] = n  # no such image
    size = (3, 4)
    gy = rng.standard_normal((k,) + size + (channels,)).astype(dtype)
    usable = np.isfinite(boxes).all(axis=1) & (indices < n)
    want = ref.crop_and_resize(image, boxes[usable], indices[usable], size, method, 0.5)
    want_grad = ref.crop_and_resize_backward(gy[usable], boxes[usable], indices[usable],
                                             image.shape, method)
    forwards, fixed = set(), set()
    for name, groups in SPLITS.items():
        _forced(monkeypatch, groups)
        for data_format in ("NHWC", "NCHW"):
            nchw = data_format == "NCHW"
            features = np.ascontiguousarray(image.transpose(0, 3, 1, 2)) if nchw else image
            y = curoi.crop_and_resize(features, boxes, indices, size, method, 0.5,
                                      data_format=data_format)
            y = _nhwc(y) if nchw else y
            np.testing.assert_allclose(y[usable], want, **_tolerance(dtype),
                                       err_msg=f"{name} {data_format}")
            np.testing.assert_array_equal(y[~usable], 0.5)  # the extrapolation value
            forwards.add(np.ascontiguousarray(y).tobytes())
            g = np.ascontiguousarray(gy.transpose(0, 3, 1, 2)) if nchw else gy
            for deterministic in (False, True):
                gx, _ = curoi.crop_and_resize_backward(g, features, boxes, indices, size,
                                                       method, deterministic=deterministic,
                                                       data_format=data_format)
                gx = _nhwc(gx) if nchw else gx
                np.testing.assert_allclose(gx, want_grad, **_tolerance(dtype),
                                           err_msg=f"{name} {data_format} {deterministic}")
                if deterministic:
                    fixed.add(np.ascontiguousarray(gx).tobytes())
    assert len(forwards) == 1
    assert len(fixed) == 1

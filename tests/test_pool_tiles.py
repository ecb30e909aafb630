"""RoI Pool's forward and position-sensitive RoI Pool's forward and backward
in tiles of channels (the GPU loops: a thread per box, bin and tile,
curoi_channel_tile).

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

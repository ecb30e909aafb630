"""Half precision for the operators beyond roi_align and roi_pool: float16
and bfloat16 features (NumPy with ml_dtypes, and torch) give the float32
computation on the same (half) values, rounded once to the half type, and
gradients likewise. The float32 results themselves are checked against the
NumPy references in each operator's own tests."""

import numpy as np
import pytest

import curoi
import reference as ref

ml_dtypes = pytest.importorskip("ml_dtypes")
HALF = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _case(seed, channels):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, channels, 9, 11)).astype(np.float32)
    boxes = ref.random_boxes(rng, 2, 9, 11, 0.5, 6, dtype=np.float32)
    rotated = np.concatenate([boxes[:, :1], (boxes[:, 1:3] + boxes[:, 3:5]) / 2,
                              np.abs(boxes[:, 3:5] - boxes[:, 1:3]),
                              rng.uniform(-90, 90, (6, 1)).astype(np.float32)], axis=1)
    return rng, x, boxes, rotated


# name -> (channels, forward(x, boxes, rotated), backward(g, boxes, rotated, shape))
OPS = {
    "ps_roi_pool": (12, lambda x, b, r: curoi.ps_roi_pool(x, b, (2, 3), 0.5),
                    lambda g, b, r, s: curoi.ps_roi_pool_backward(g, b, s, (2, 3), 0.5)),
    "ps_roi_align": (12, lambda x, b, r: curoi.ps_roi_align(x, b, (2, 3), 0.5, 2),
                     lambda g, b, r, s: curoi.ps_roi_align_backward(g, b, s, (2, 3), 0.5, 2)),
    "roi_align_rotated": (
        3, lambda x, b, r: curoi.roi_align_rotated(x, r, (2, 3), 0.5, 2),
        lambda g, b, r, s: curoi.roi_align_rotated_backward(g, r, s, (2, 3), 0.5, 2)),
    "roi_align_max": (
        3, lambda x, b, r: curoi.roi_align(x, b, (2, 3), 0.5, 2, True, mode="max"),
        None),
}


@pytest.mark.parametrize("half", sorted(HALF))
@pytest.mark.parametrize("name", sorted(OPS))
def test_half_precision_is_float32_rounded_once(name, half):
    channels, forward, backward = OPS[name]
    rng, x, boxes, rotated = _case(3, channels)
    xh = x.astype(HALF[half])
    y = forward(xh, boxes, rotated)
    assert y.dtype == HALF[half]
    want = forward(xh.astype(np.float32), boxes, rotated).astype(HALF[half])
    np.testing.assert_array_equal(y.astype(np.float32), want.astype(np.float32))
    if backward is None:
        return
    g = rng.standard_normal(y.shape).astype(HALF[half])
    gx = backward(g, boxes, rotated, x.shape)
    assert gx.dtype == HALF[half]
    want = backward(g.astype(np.float32), boxes, rotated, x.shape).astype(HALF[half])
    np.testing.assert_array_equal(gx.astype(np.float32), want.astype(np.float32))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_half_precision(dtype):
    torch = pytest.importorskip("torch")
    import curoi.torch as ct

    _, x, boxes, rotated = _case(4, 12)
    tdtype = getattr(torch, dtype)
    tx = torch.tensor(x).to(tdtype).requires_grad_()
    for fn, b in ((lambda t, b: ct.ps_roi_align(t, b, (2, 3), 0.5, 2), boxes),
                  (lambda t, b: ct.roi_align_rotated(t, b, (2, 3), 0.5, 2), rotated),
                  (lambda t, b: ct.roi_align(t, b, (2, 3), 0.5, 2, True, mode="max"), boxes)):
        y = fn(tx, torch.tensor(b))
        assert y.dtype == tdtype
        want = fn(tx.detach().float(), torch.tensor(b)).to(tdtype)
        torch.testing.assert_close(y, want, rtol=0, atol=0)
        y.float().sum().backward()
        assert tx.grad.dtype == tdtype
        tx.grad = None

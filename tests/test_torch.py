"""curoi.torch: torchvision-compatible roi_align / roi_pool as torch custom
ops, with autograd, torch.compile, opcheck, autocast and CUDA streams.

Expected values come from the independent NumPy reference in
tests/reference.py (written from DESIGN.md section 3, not from the kernels),
from hand computation (DESIGN.md's worked example) and from finite
differences (gradcheck). Where a test relates two curoi results (NumPy entry
point vs torch entry point, compiled vs eager, two backward runs, GPU vs
CPU) it says so: those check the plumbing, the numbers are checked above.
"""

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import curoi  # noqa: E402
import curoi.torch as ct  # noqa: E402

import reference as ref  # noqa: E402

from torch.library import opcheck  # noqa: E402

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12),
       torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _case(seed, dtype=torch.float32, shape=(2, 3, 11, 13), k=7, scale=0.5):
    """Random features and [K, 5] boxes of every kind the reference knows
    (inside, partly and wholly outside, tiny, zero, reversed)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    n, _, h, w = shape
    boxes = ref.random_boxes(rng, n, h, w, scale, k)
    return (torch.tensor(x, dtype=dtype), torch.tensor(boxes, dtype=dtype))


def _as_list(rois, n):
    """[K, 5] -> torchvision's list of per-image [L, 4] boxes."""
    return [rois[rois[:, 0] == i, 1:] for i in range(n)]


# ------------------------------------------------------------ signatures
def test_signatures_are_torchvisions():
    # torchvision.ops.roi_align / roi_pool / RoIAlign / RoIPool, by name,
    # order and default (torchvision 0.2x); curoi's own options follow
    # them (positional or keyword, as TorchScript wants: no keyword-only
    # argument in a function it compiles).
    def params(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()
                if p.kind is not p.KEYWORD_ONLY]

    empty = inspect.Parameter.empty
    assert params(ct.roi_align) == [
        ("input", empty), ("boxes", empty), ("output_size", empty),
        ("spatial_scale", 1.0), ("sampling_ratio", -1), ("aligned", False),
        ("mode", "avg"), ("boxes_grad", False)]
    assert params(ct.roi_pool) == [
        ("input", empty), ("boxes", empty), ("output_size", empty),
        ("spatial_scale", 1.0), ("convention", "torchvision")]
    assert params(ct.RoIAlign.__init__)[1:] == [
        ("output_size", empty), ("spatial_scale", empty),
        ("sampling_ratio", empty), ("aligned", False)]
    assert params(ct.RoIPool.__init__)[1:] == [
        ("output_size", empty), ("spatial_scale", empty)]
    for fn in (ct.roi_align, ct.roi_pool, ct.ps_roi_align, ct.ps_roi_pool,
               ct.roi_align_rotated, ct.prroi_pool, ct.crop_and_resize, ct.roi_spp,
               ct.multiscale_roi_align):
        kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
        assert kinds == {inspect.Parameter.POSITIONAL_OR_KEYWORD}, fn.__name__


def test_ops_are_registered_in_the_curoi_namespace():
    for name in ("roi_align", "roi_align_backward", "roi_pool", "roi_pool_backward"):
        op = getattr(torch.ops.curoi, name).default
        assert op.name() == f"curoi::{name}"


# ------------------------------------------------------- numbers: forward
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("as_list", [False, True])
def test_roi_align_matches_reference(dtype, aligned, sampling_ratio, as_list):
    x, rois = _case(1, dtype)
    boxes = _as_list(rois, x.shape[0]) if as_list else rois
    y = ct.roi_align(x, boxes, (2, 3), 0.5, sampling_ratio, aligned)
    # The list form numbers boxes image by image, as torchvision does.
    order = rois if not as_list else torch.cat(
        [rois[rois[:, 0] == i] for i in range(x.shape[0])])
    expected = ref.roi_align(x.numpy(), order.numpy(), (2, 3), 0.5,
                             sampling_ratio, aligned)
    assert y.dtype == dtype and y.shape == (len(order), 3, 2, 3)
    assert y.is_contiguous()
    np.testing.assert_allclose(y.numpy(), expected, **TOL[dtype])


@pytest.mark.parametrize("convention", ["torchvision", "mmcv"])
@pytest.mark.parametrize("as_list", [False, True])
def test_roi_pool_matches_reference(convention, as_list):
    x, rois = _case(2, torch.float64)
    boxes = _as_list(rois, x.shape[0]) if as_list else rois
    y = ct.roi_pool(x, boxes, (3, 2), 0.5, convention=convention)
    order = rois if not as_list else torch.cat(
        [rois[rois[:, 0] == i] for i in range(x.shape[0])])
    expected, _ = ref.roi_pool(x.numpy(), order.numpy(), (3, 2), 0.5, convention)
    np.testing.assert_array_equal(y.numpy(), expected)


def test_roi_pool_worked_example():
    """DESIGN.md section 3: box (0, 3, 6, 7) of the 8 x 8 map pooled to 2 x 2
    under torchvision's convention gives [[0.85, 0.96], [0.97, 0.96]]."""
    x = torch.tensor(ref.WORKED_EXAMPLE_MAP, dtype=torch.float32)[None, None]
    y = ct.roi_pool(x, torch.tensor([[0, 0.0, 3.0, 6.0, 7.0]]), 2)
    np.testing.assert_allclose(y[0, 0].numpy(), [[0.85, 0.96], [0.97, 0.96]],
                               rtol=1e-6)
    y = ct.RoIPool((2, 2), 1.0)(x, [torch.tensor([[0.0, 3.0, 6.0, 7.0]])])
    np.testing.assert_allclose(y[0, 0].numpy(), [[0.85, 0.96], [0.97, 0.96]],
                               rtol=1e-6)


def test_same_numbers_as_the_numpy_entry_point():
    """curoi.torch and curoi on NumPy arrays run the same kernels: equal
    bits, and the torch entry point hands back torch tensors."""
    x, rois = _case(3)
    y_np = curoi.roi_align(x.numpy(), rois.numpy(), 3, spatial_scale=0.5,
                           sampling_ratio=2, aligned=True)
    y_t = ct.roi_align(x, rois, 3, 0.5, 2, True)
    assert isinstance(y_t, torch.Tensor) and y_t.device == x.device
    np.testing.assert_array_equal(y_t.numpy(), y_np)
    p_np = curoi.roi_pool(x.numpy(), rois.numpy(), 3, spatial_scale=0.5,
                          convention="mmcv")
    p_t = ct.roi_pool(x, rois, 3, 0.5, convention="mmcv")
    assert isinstance(p_t, torch.Tensor) and p_t.device == x.device
    np.testing.assert_array_equal(p_t.numpy(), p_np)


# ------------------------------------------------------ numbers: backward
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_backward_matches_reference(aligned):
    x, rois = _case(4, torch.float64)
    x.requires_grad_()
    y = ct.roi_align(x, rois, (2, 2), 0.5, -1, aligned)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y.backward(g)
    expected = ref.roi_align_backward(g.numpy(), rois.numpy(), x.shape, (2, 2),
                                      0.5, -1, aligned)
    np.testing.assert_allclose(x.grad.numpy(), expected, **TOL[torch.float64])


@pytest.mark.parametrize("convention", ["torchvision", "mmcv"])
def test_roi_pool_backward_matches_reference(convention):
    rng = np.random.default_rng(5)
    x = torch.tensor(ref.permutation_map(rng, (2, 3, 9, 10)), requires_grad=True)
    rois = torch.tensor(ref.random_boxes(rng, 2, 9, 10, 1.0, 8))
    y = ct.roi_pool(x, rois, (2, 3), convention=convention)
    g = torch.tensor(rng.standard_normal(y.shape))
    y.backward(g)
    _, argmax = ref.roi_pool(x.detach().numpy(), rois.numpy(), (2, 3), 1.0, convention)
    expected = ref.roi_pool_backward(g.numpy(), argmax, rois.numpy(), x.shape)
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_roi_pool_op_saves_int32_argmax_as_torchvision(channels_last):
    # torchvision's op keeps int32 positions; so does curoi's (half the
    # memory saved for the backward), with the reference's values.
    rng = np.random.default_rng(8)
    x = torch.tensor(ref.permutation_map(rng, (2, 3, 9, 10)))
    rois = torch.tensor(ref.random_boxes(rng, 2, 9, 10, 1.0, 8))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y, argmax = torch.ops.curoi.roi_pool(x, rois, 1.0, 2, 3, "torchvision")
    assert argmax.dtype == torch.int32
    _, expected = ref.roi_pool(x.numpy(), rois.numpy(), (2, 3), 1.0, "torchvision")
    np.testing.assert_array_equal(argmax.numpy(), expected)


def test_boxes_get_roi_align_gradient_and_no_roi_pool_gradient():
    # roi_align's gradient with respect to the boxes, asked for, is the
    # reference's; roi_pool's maxima do not move with the boxes: no
    # gradient (None).
    x, rois = _case(6, torch.float64)
    x.requires_grad_()
    rois.requires_grad_()
    g = torch.randn(rois.shape[0], x.shape[1], 2, 2, dtype=torch.float64)
    (ct.roi_align(x, rois, 2, 0.5, 2, boxes_grad=True) * g).sum().backward()
    expected = ref.roi_align_boxes_backward(g.numpy(), x.detach().numpy(),
                                            rois.detach().numpy(), 2, 0.5, 2)
    np.testing.assert_allclose(rois.grad.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert (rois.grad[:, 0] == 0).all()
    rois2 = rois.detach().clone().requires_grad_()
    y = ct.roi_pool(x, rois2, 2, 0.5)
    y.sum().backward()
    assert rois2.grad is None
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gradcheck_with_respect_to_the_boxes():
    # Boxes inside the map whose samples are not on pixel edges (where the
    # slope changes): the value is smooth around them.
    x, _ = _case(17, torch.float64, shape=(2, 2, 8, 9), k=3, scale=1.0)
    rois = torch.tensor([[0, 1.31, 1.13, 6.73, 5.97], [1, 2.23, 0.61, 4.93, 6.37],
                         [1, 0.47, 3.29, 7.61, 6.83]], dtype=torch.float64,
                        requires_grad=True)
    # The batch index is a whole number, not a coordinate: only the corners
    # are perturbed (its own gradient is 0).
    batch, corners = rois[:, :1].detach(), rois[:, 1:].detach().clone().requires_grad_()
    for aligned in (False, True):
        assert torch.autograd.gradcheck(
            lambda c: ct.roi_align(x, torch.cat([batch, c], 1), (2, 3), 1.0, 2, aligned,
                                   boxes_grad=True),
            (corners,), eps=1e-7, atol=1e-6)
    per_image = [rois[:1, 1:].detach().clone().requires_grad_(),
                 rois[1:, 1:].detach().clone().requires_grad_()]
    assert torch.autograd.gradcheck(
        lambda a, b: ct.roi_align(x, [a, b], (2, 3), 1.0, 2, True, "avg", True),
        tuple(per_image),
        eps=1e-7, atol=1e-6)


def test_opcheck_boxes_backward():
    x, rois = _case(18)
    g = torch.randn(rois.shape[0], x.shape[1], 2, 3)
    opcheck(torch.ops.curoi.roi_align_boxes_backward.default,
            (g, x, rois, 0.5, 2, 3, 2, True))


def test_gradcheck_roi_align():
    x, rois = _case(7, torch.float64, shape=(2, 2, 6, 7), k=4, scale=1.0)
    x.requires_grad_()
    for aligned in (False, True):
        assert torch.autograd.gradcheck(
            lambda t: ct.roi_align(t, rois, (2, 3), 1.0, 2, aligned), (x,))


@pytest.mark.parametrize("convention", ["torchvision", "mmcv"])
def test_gradcheck_roi_pool(convention):
    # Distinct values 1 apart: a step of 1e-6 never changes which pixel is the
    # maximum, so finite differences see the same piece as the gradient.
    rng = np.random.default_rng(8)
    x = torch.tensor(ref.permutation_map(rng, (2, 2, 6, 7)), requires_grad=True)
    rois = torch.tensor(ref.random_boxes(rng, 2, 6, 7, 1.0, 5))
    assert torch.autograd.gradcheck(
        lambda t: ct.roi_pool(t, rois, (2, 2), convention=convention), (x,))


# ------------------------------------------------------------ edge cases
def test_empty_boxes():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    for boxes in (torch.zeros(0, 5), []):
        y = ct.roi_align(x, boxes, (2, 3))
        p = ct.roi_pool(x, boxes, (2, 3))
        assert y.shape == p.shape == (0, 3, 2, 3)
        (y.sum() + p.sum()).backward()
        assert torch.equal(x.grad, torch.zeros_like(x))
        x.grad = None


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_non_contiguous_input(layout):
    x, rois = _case(9, torch.float64)
    if layout == "channels_last":
        xs = x.contiguous(memory_format=torch.channels_last)
    else:  # every other element of a wider tensor
        xs = torch.stack([x, -x], dim=-1)[..., 0]
    assert not xs.is_contiguous() and torch.equal(xs, x)
    xs.requires_grad_()
    y = ct.roi_align(xs, rois, 2, 0.5, 2, True)
    np.testing.assert_allclose(
        y.detach().numpy(), ref.roi_align(x.numpy(), rois.numpy(), 2, 0.5, 2, True),
        **TOL[torch.float64])
    g = torch.ones_like(y)
    y.backward(g)
    np.testing.assert_allclose(
        xs.grad.numpy(),
        ref.roi_align_backward(g.numpy(), rois.numpy(), x.shape, 2, 0.5, 2, True),
        **TOL[torch.float64])


# ----------------------------------------------------------- half, autocast
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_natively(dtype):
    x, rois = _case(10)
    xh = x.to(dtype).requires_grad_()
    y = ct.roi_align(xh, rois, 2, 0.5, 2, False)  # float32 boxes, half features
    assert y.dtype == dtype
    # The CPU computes in float32 from the half values and rounds once.
    expected = ref.roi_align(xh.detach().float().numpy(), rois.numpy(), 2, 0.5, 2, False)
    eps = torch.finfo(dtype).eps
    np.testing.assert_allclose(y.detach().float().numpy(), expected, rtol=eps, atol=eps)
    y.sum().backward()
    assert xh.grad.dtype == dtype


def test_autocast_keeps_the_input_dtype():
    """The ops are not registered with autocast: bf16 stays bf16 (no silent
    float32 round trip) and float32 stays float32 under a bf16 autocast."""
    x, rois = _case(11)
    results = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (torch.bfloat16, torch.float32):
            xi = x.to(dtype, copy=True).requires_grad_()
            y = ct.roi_align(xi, rois, 2, 0.5, 2, True)
            p = ct.roi_pool(xi, rois, 2, 0.5)
            assert y.dtype == dtype and p.dtype == dtype
            (y.float().sum() + p.float().sum()).backward()
            assert xi.grad.dtype == dtype
            results[dtype] = y.detach()
        # A conv under autocast gives bf16 features; roi_align keeps them bf16.
        conv = torch.nn.Conv2d(3, 4, 1)
        assert ct.roi_align(conv(x), rois, 2, 0.5).dtype == torch.bfloat16
    # float32 under autocast is computed in float32, not through bf16.
    np.testing.assert_allclose(
        results[torch.float32].numpy(),
        ref.roi_align(x.numpy(), rois.numpy(), 2, 0.5, 2, True), **TOL[torch.float32])


# --------------------------------------------------------------- modules
def test_modules():
    align = ct.RoIAlign((7, 7), 0.0625, 2)
    pool = ct.RoIPool((7, 7), 0.0625)
    # torchvision's __repr__ text
    assert repr(align) == ("RoIAlign(output_size=(7, 7), spatial_scale=0.0625, "
                           "sampling_ratio=2, aligned=False)")
    assert repr(ct.RoIAlign(5, 0.5, -1, aligned=True)) == (
        "RoIAlign(output_size=5, spatial_scale=0.5, sampling_ratio=-1, aligned=True)")
    assert repr(pool) == "RoIPool(output_size=(7, 7), spatial_scale=0.0625)"
    assert repr(ct.RoIPool(3, 0.5, convention="mmcv")) == (
        "RoIPool(output_size=3, spatial_scale=0.5, convention='mmcv')")
    for m in (align, pool):
        assert len(m.state_dict()) == 0
        assert list(m.parameters()) == [] and list(m.buffers()) == []
    x, rois = _case(12)
    m = ct.RoIAlign((2, 3), 0.5, 2, aligned=True)
    np.testing.assert_allclose(
        m(x, rois).numpy(), ref.roi_align(x.numpy(), rois.numpy(), (2, 3), 0.5, 2, True),
        **TOL[torch.float32])
    m = ct.RoIPool((2, 3), 0.5)
    np.testing.assert_array_equal(
        m(x, _as_list(rois, 2)).numpy(),
        ref.roi_pool(x.numpy(), torch.cat([rois[rois[:, 0] == i] for i in range(2)]).numpy(),
                     (2, 3), 0.5)[0].astype(np.float32))


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("call, name", [
    (lambda x, b: ct.roi_align(x, b[:, 1:], 2), "boxes"),
    (lambda x, b: ct.roi_align(x, [b[:2, 1:], b[:2]], 2), r"boxes\[1\]"),
    (lambda x, b: ct.roi_align(x, b.numpy(), 2), "boxes"),
    (lambda x, b: ct.roi_align(x, b.long(), 2), "boxes"),
    (lambda x, b: ct.roi_align(x[0], b, 2), "input"),
    (lambda x, b: ct.roi_align(x.long(), b, 2), "input"),
    (lambda x, b: ct.roi_align(x, b, (2, 0)), "output_size"),
    (lambda x, b: ct.roi_align(x, b, 2, -1.0), "spatial_scale"),
    (lambda x, b: ct.roi_align(x, b, 2, 1.0, 1.5), "sampling_ratio"),
    (lambda x, b: ct.roi_align(x, b, 2, 1.0, 2, "yes"), "aligned"),
    (lambda x, b: ct.roi_pool(x, b, 2, convention="caffe"), "convention"),
    (lambda x, b: ct.roi_pool(x, [b[:, 1:]] * 3, 2), "boxes"),
])
def test_errors_name_the_argument(call, name):
    x, rois = _case(13)
    with pytest.raises((TypeError, ValueError), match=name):
        call(x, rois)


# --------------------------------------------------------- determinism
def test_backward_receives_the_deterministic_flag(monkeypatch):
    """The autograd backward asks curoi for a deterministic sum exactly when
    torch.use_deterministic_algorithms(True) is in effect."""
    seen = []
    real = curoi._frontend.backward

    def spy(op, grad, boxes, shape, output_size, values, deterministic, *args, **kwargs):
        seen.append(deterministic)
        return real(op, grad, boxes, shape, output_size, values, deterministic,
                    *args, **kwargs)

    monkeypatch.setattr(curoi._frontend, "backward", spy)
    x, rois = _case(14)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        for flag in (False, True):
            torch.use_deterministic_algorithms(flag)
            xi = x.clone().requires_grad_()
            (ct.roi_align(xi, rois, 2, 0.5).sum() + ct.roi_pool(xi, rois, 2, 0.5).sum()).backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert seen == [False, False, True, True]


def test_deterministic_backward_is_bitwise_reproducible():
    # Many boxes over one small map: many atomic adds to the same pixels.
    rng = np.random.default_rng(15)
    x = torch.tensor(rng.standard_normal((1, 4, 16, 16)), dtype=torch.float32)
    rois = torch.tensor(ref.random_boxes(rng, 1, 16, 16, 1.0, 200, kinds=("inside",)),
                        dtype=torch.float32)
    g = torch.tensor(rng.standard_normal((200, 4, 7, 7)), dtype=torch.float32)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        grads = []
        for _ in range(2):
            xi = x.clone().requires_grad_()
            ct.roi_align(xi, rois, 7, 1.0, 2, True).backward(g)
            ct.roi_pool(xi, rois, 7, 1.0).backward(g)
            grads.append(xi.grad)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(grads[0].view(torch.int32), grads[1].view(torch.int32))
    # ... and it is still the gradient.
    expected = ref.roi_align_backward(g.numpy(), rois.numpy(), x.shape, 7, 1.0, 2, True)
    _, argmax = ref.roi_pool(x.numpy(), rois.numpy(), 7, 1.0)
    expected += ref.roi_pool_backward(g.numpy(), argmax, rois.numpy(), x.shape)
    np.testing.assert_allclose(grads[0].numpy(), expected, rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------- opcheck
def _opcheck_samples():
    x, rois = _case(16, shape=(2, 3, 7, 9), k=5)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    empty = rois[:0]
    for xi in (x, x.clone().requires_grad_(), channels_last, x.double()):
        for bi in (rois, empty):
            yield xi, bi.to(xi.dtype) if xi.dtype == torch.float64 else bi


@pytest.mark.parametrize("sample", list(range(8)))
def test_opcheck(sample):
    x, rois = list(_opcheck_samples())[sample]
    n, c, h, w = x.shape
    k = rois.shape[0]
    opcheck(torch.ops.curoi.roi_align.default, (x, rois, 0.5, 2, 3, 2, True))
    opcheck(torch.ops.curoi.roi_align.default, (x, rois, 0.5, 3, 2, -1, False))
    opcheck(torch.ops.curoi.roi_pool.default, (x, rois, 0.5, 2, 3, "torchvision"))
    opcheck(torch.ops.curoi.roi_pool.default, (x, rois, 0.5, 2, 3, "mmcv"))
    grad = torch.randn(k, c, 2, 3, dtype=x.dtype)
    opcheck(torch.ops.curoi.roi_align_backward.default,
            (grad, rois, 0.5, 2, 3, n, c, h, w, 2, True, False))
    _, argmax = torch.ops.curoi.roi_pool.default(x.detach(), rois, 0.5, 2, 3, "torchvision")
    opcheck(torch.ops.curoi.roi_pool_backward.default,
            (grad, rois, argmax, n, c, h, w, False))


# --------------------------------------------------------- torch.compile
class AlignHead(torch.nn.Module):
    """conv -> roi_align -> flatten -> linear, a minimal box head."""

    def __init__(self, channels=3, hidden=4, classes=5):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.pool = ct.RoIAlign((2, 2), 0.5, 2, aligned=True)
        self.fc = torch.nn.Linear(hidden * 4, classes)

    def forward(self, x, boxes):
        return self.fc(self.pool(torch.relu(self.conv(x)), boxes).flatten(1))


class PoolHead(torch.nn.Module):
    """conv -> roi_pool (list of boxes) -> flatten -> linear."""

    def __init__(self, channels=3, hidden=4, classes=5):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.fc = torch.nn.Linear(hidden * 6, classes)

    def forward(self, x, boxes):
        return self.fc(ct.roi_pool(self.conv(x), boxes, (2, 3), 0.5).flatten(1))


def _compile_matches_eager(model, backend, boxes_as_list=False, shapes=None):
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch.fx.experimental import _config as fx_config

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    # Two feature shapes and box counts: with dynamic shapes, no recompile.
    # Duck sizing is off so that sizes that happen to be equal in the first
    # call (K = 5 and the 5 box columns, L = C = 3) do not share a symbol
    # that the shape checks then fix. A list of boxes has one entry per
    # image, so with a list the batch size stays.
    if shapes is None:
        second_batch = 2 if boxes_as_list else 3
        shapes = (((2, 3, 10, 12), 5), ((second_batch, 3, 14, 11), 9))
    cases = [(seed, shape, k) for seed, (shape, k) in enumerate(shapes)]
    with fx_config.patch(use_duck_shape=False), \
            torch._dynamo.config.patch(error_on_recompile=True):
        for seed, shape, k in cases:
            x, rois = _case(seed, shape=shape, k=k)
            boxes = _as_list(rois, shape[0]) if boxes_as_list else rois
            xe = x.clone().requires_grad_()
            xc = x.clone().requires_grad_()
            ye = model(xe, boxes)
            yc = compiled(xc, boxes)
            torch.testing.assert_close(yc, ye)
            ye.square().sum().backward()
            eager_grads = [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
            yc.square().sum().backward()
            torch.testing.assert_close(xc.grad, xe.grad)
            for p, g in zip(model.parameters(), eager_grads):
                torch.testing.assert_close(p.grad, g)
            model.zero_grad()
    torch._dynamo.reset()
    # At least one graph went to the backend (two when Dynamo restarts its
    # analysis after fixing spatial_scale, a float attribute, to its value).
    assert counter.frame_count >= 1


@pytest.mark.parametrize("head, as_list", [(AlignHead, False), (AlignHead, True),
                                           (PoolHead, True)])
def test_compile_fullgraph_dynamic_aot_eager(head, as_list):
    torch.manual_seed(0)
    _compile_matches_eager(head(), "aot_eager", as_list)


def test_compile_fullgraph_dynamic_inductor():
    # Inductor's CPU lowering of the conv's backward fixes the map width, so
    # here only the batch size and the box count vary.
    torch.manual_seed(0)
    _compile_matches_eager(AlignHead(), "inductor",
                           shapes=(((2, 3, 10, 12), 5), ((3, 3, 10, 12), 9)))


def test_compiled_graph_calls_the_curoi_ops():
    """The traced forward and backward hold the curoi ops themselves (not a
    graph break or a decomposition)."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    torch._dynamo.reset()
    backend = AotEagerAndRecordGraphs()
    x, rois = _case(17)
    x.requires_grad_()
    f = torch.compile(lambda t, b: ct.roi_align(t, b, 2, 0.5).sum()
                      + ct.roi_pool(t, b, 2, 0.5).sum(),
                      backend=backend, fullgraph=True, dynamic=True)
    f(x, rois).backward()
    fw = "".join(g.code for g in backend.fw_graphs)
    bw = "".join(g.code for g in backend.bw_graphs)
    assert "curoi.roi_align.default" in fw and "curoi.roi_pool.default" in fw
    assert "curoi.roi_align_backward.default" in bw
    assert "curoi.roi_pool_backward.default" in bw
    torch._dynamo.reset()


# ------------------------------------------------------------- training
def _train(head_type, boxes_as_list, optimizer, lr, steps=30):
    """Fit a student head to a teacher's outputs on fixed synthetic data.
    The student shares the teacher's (frozen) linear layer, so the target is
    reachable and every step's progress comes through the RoI op's backward
    into the conv: a wrong or missing gradient leaves the loss where it was.
    """
    torch.manual_seed(1)
    teacher = head_type()
    torch.manual_seed(0)
    student = head_type()
    student.fc.load_state_dict(teacher.fc.state_dict())
    student.fc.requires_grad_(False)
    x, rois = _case(18, shape=(2, 3, 12, 12), k=10)
    boxes = _as_list(rois, 2) if boxes_as_list else rois
    with torch.no_grad():
        target = teacher(x, boxes)
    opt = optimizer([p for p in student.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(student(x, boxes), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_reduces_the_loss_roi_align():
    losses = _train(AlignHead, False, torch.optim.SGD, lr=2.0)
    assert losses[-1] < 0.2 * losses[0], losses


def test_training_reduces_the_loss_roi_pool():
    losses = _train(PoolHead, True, torch.optim.Adam, lr=0.05)
    assert losses[-1] < 0.1 * losses[0], losses


# ------------------------------------------------------------------ CUDA
def cuda(test):
    """A CUDA test: skipped without a device, selected by `pytest -m cuda`."""
    return pytest.mark.cuda(
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")(test))


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_on_a_side_stream_matches_cpu(dtype):
    """Work queued on a side stream s: the input is written on s after a
    delay, so a kernel launched on any other stream would read the zeros
    that are there before. The CPU backend (checked against the reference
    above) gives the expected numbers."""
    x, rois = _case(20, shape=(2, 4, 13, 17), k=32)
    x = x.to(dtype)
    device = torch.device("cuda")
    xd = torch.zeros(x.shape, dtype=dtype, device=device)
    rd = rois.to(device)
    gd_src = torch.randn(32, 4, 3, 2, dtype=dtype)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)
        xd.copy_(x.to(device, non_blocking=True))
        xd.requires_grad_()
        y = ct.roi_align(xd, rd, (3, 2), 0.5, 2, True)
        y.backward(gd_src.to(device))
        p = ct.roi_pool(xd.detach(), rd, (3, 2), 0.5)
    s.synchronize()
    xc = x.clone().requires_grad_()
    yc = ct.roi_align(xc, rois, (3, 2), 0.5, 2, True)
    yc.backward(gd_src)
    pc = ct.roi_pool(x, rois, (3, 2), 0.5)
    tol = dict(rtol=1.6e-2, atol=3.2e-2) if dtype == torch.bfloat16 else {}
    assert y.device == xd.device and y.dtype == dtype
    torch.testing.assert_close(y.cpu(), yc, **tol)
    torch.testing.assert_close(xd.grad.cpu(), xc.grad, **tol)
    torch.testing.assert_close(p.cpu(), pc, rtol=0, atol=0)


@cuda
def test_cuda_compile_matches_cpu():
    torch.manual_seed(0)
    head = AlignHead()
    x, rois = _case(21, shape=(2, 3, 12, 12), k=8)
    expected = head(x, rois)
    compiled = torch.compile(head.cuda(), backend="aot_eager", fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(x.cuda(), rois.cuda()).cpu(), expected)


# --------------------------------------------------------------- example
def test_example_runs_and_checks_itself():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(root, "examples", "torch_roi_align.py")],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert run.returncode == 0, run.stderr
    # The example compares with hand-computed values and finite differences.
    assert "match: True" in run.stdout
    assert "sums to 4.0 (4 bins)" in run.stdout
    assert "gradcheck against finite differences: True" in run.stdout
    assert "same numbers: True" in run.stdout

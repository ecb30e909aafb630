"""curoi.torch as a drop-in for torchvision in a deployed PyTorch model:
TorchScript (script, trace, save and load), torch.fx leaves, quantized
roi_align, torchvision's argument lists on the ``torch.ops.curoi`` ops,
torchvision's AssertionError for malformed boxes, and the box gradient
that is given only when asked for.

Expected numbers come from the NumPy reference (tests/reference.py) where
a test checks values; where it checks that a scripted, traced or FX-traced
call gives the eager call's numbers and gradients, it says so (the eager
numbers are checked against the reference in tests/test_torch.py and the
operators' own files).
"""

import io
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import curoi.torch as ct  # noqa: E402
# Bound before any tracing: torch.fx.wrap patches curoi.torch's own names
# only, so this one reaches the function itself under symbolic_trace.
from curoi.torch import roi_pool as imported_roi_pool  # noqa: E402

import reference as ref  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script.*is deprecated:DeprecationWarning",
    "ignore:.*torch.jit.(trace|save|load).*is deprecated:DeprecationWarning",
    "ignore:.*quantize.*deprecated:UserWarning")


def _case(seed, dtype=torch.float64, shape=(2, 8, 11, 13), k=7, scale=0.5):
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.standard_normal(shape), dtype=dtype)
    boxes = torch.tensor(ref.random_boxes(rng, shape[0], shape[2], shape[3], scale, k),
                         dtype=dtype)
    return x, boxes


def _rotated_boxes(seed, n=2, k=5):
    rng = np.random.default_rng(seed)
    return torch.tensor(np.column_stack([
        rng.integers(0, n, k), rng.uniform(2, 20, k), rng.uniform(2, 16, k),
        rng.uniform(1, 10, k), rng.uniform(1, 8, k), rng.uniform(-90, 90, k)]))


def _as_list(rois, n):
    return [rois[rois[:, 0] == i, 1:] for i in range(n)]


X, ROIS = _case(1)
ROTATED = _rotated_boxes(2)

# (name, module, boxes): every curoi.torch module with boxes it takes.
MODULES = [
    ("RoIAlign", lambda: ct.RoIAlign((2, 3), 0.5, 2, True), ROIS),
    ("RoIAlign max", lambda: ct.RoIAlign(3, 0.5, 2, mode="max"), ROIS),
    ("RoIPool", lambda: ct.RoIPool([3, 2], 0.5), ROIS),
    ("RoIPool mmcv", lambda: ct.RoIPool(2, 0.5, convention="mmcv"), ROIS),
    ("PSRoIAlign", lambda: ct.PSRoIAlign(2, 0.5, 2), ROIS),
    ("PSRoIPool", lambda: ct.PSRoIPool(2, 0.5), ROIS),
    ("RoIAlignRotated", lambda: ct.RoIAlignRotated(3, 0.5, 0), ROTATED),
    ("RoIAlignRotated mmcv", lambda: ct.RoIAlignRotated(
        3, 0.5, 2, convention="mmcv", aligned=False, clockwise=True), ROTATED),
    ("PrRoIPool", lambda: ct.PrRoIPool(2, 0.5), ROIS),
]

# (name, function, args after the features and boxes, boxes).
FUNCTIONS = [
    ("roi_align", ct.roi_align, (3, 0.5, -1, True), ROIS),
    ("roi_align max", ct.roi_align, (3, 0.5, 2, False, "max"), ROIS),
    ("roi_pool", ct.roi_pool, ((2, 3), 0.5), ROIS),
    ("ps_roi_pool", ct.ps_roi_pool, (2, 0.5), ROIS),
    ("ps_roi_align", ct.ps_roi_align, (2, 0.5, 2), ROIS),
    ("roi_align_rotated", ct.roi_align_rotated, (3, 0.5, 2), ROTATED),
    ("prroi_pool", ct.prroi_pool, (3, 0.5), ROIS),
    ("roi_spp", ct.roi_spp, ((1, 2), 0.5, "avg"), ROIS),
]


def _grads(fn, x, boxes):
    """(result, gradient of the features) for a fixed upstream gradient."""
    xi = x.clone().requires_grad_()
    y = fn(xi, boxes)
    g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    (grad,) = torch.autograd.grad(y, xi, g)
    return y, grad


def _same(a, b):
    ya, ga = a
    yb, gb = b
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    torch.testing.assert_close(ga, gb, rtol=0, atol=0)


# ------------------------------------------------------------- TorchScript
@pytest.mark.parametrize("name, fn, args, boxes", FUNCTIONS, ids=[f[0] for f in FUNCTIONS])
@pytest.mark.parametrize("as_list", [False, True])
def test_scripted_function_gives_eager_numbers_and_gradients(name, fn, args, boxes,
                                                             as_list):
    scripted = torch.jit.script(fn)
    if as_list:
        boxes = _as_list(boxes, X.shape[0])
    _same(_grads(lambda x, b: scripted(x, b, *args), X, boxes),
          _grads(lambda x, b: fn(x, b, *args), X, boxes))


def test_scripted_function_takes_keywords_and_torchvisions_output_size_forms():
    scripted = torch.jit.script(ct.roi_align)
    for size in (3, (3, 3), [3, 3]):
        torch.testing.assert_close(
            scripted(X, ROIS, size, spatial_scale=0.5, aligned=True, mode="avg"),
            ct.roi_align(X, ROIS, 3, 0.5, aligned=True), rtol=0, atol=0)


def test_scripted_crop_and_resize_and_multiscale():
    img = torch.tensor(np.random.default_rng(3).standard_normal((2, 10, 12, 3)))
    boxes = torch.tensor([[0.1, 0.1, 0.8, 0.9], [0.0, 0.2, 1.3, 0.7]], dtype=torch.float64)
    index = torch.tensor([1, 0])
    for data_format, image in (("NHWC", img), ("NCHW", img.permute(0, 3, 1, 2))):
        _same(_grads(lambda x, b: torch.jit.script(ct.crop_and_resize)(
                  x, b, index, (4, 5), "bilinear", 0.0, data_format), image, boxes),
              _grads(lambda x, b: ct.crop_and_resize(
                  x, b, index, (4, 5), data_format=data_format), image, boxes))
    levels = [torch.tensor(np.random.default_rng(4).standard_normal((2, 4, 16, 16))),
              torch.tensor(np.random.default_rng(5).standard_normal((2, 4, 8, 8)))]
    scripted = torch.jit.script(ct.multiscale_roi_align)
    for i in range(2):
        def pyramid(fn):
            def call(level, b):
                features = list(levels)
                features[i] = level
                return fn(features, b, 3, [0.5, 0.25], 2, True)
            return call
        _same(_grads(pyramid(scripted), levels[i], ROIS),
              _grads(pyramid(ct.multiscale_roi_align), levels[i], ROIS))


@pytest.mark.parametrize("name, make, boxes", MODULES, ids=[m[0] for m in MODULES])
def test_scripted_module_saves_loads_and_gives_eager_numbers(name, make, boxes):
    module = make()
    scripted = torch.jit.script(module)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    eager = _grads(module, X, boxes)
    _same(_grads(scripted, X, boxes), eager)
    _same(_grads(loaded, X, boxes), eager)
    _same(_grads(loaded, X, _as_list(boxes, X.shape[0])), _grads(module, X, _as_list(
        boxes, X.shape[0])))


def test_scripted_multiscale_module_infers_torchvisions_scales():
    module = ct.MultiScaleRoIAlign(["p2", "p3"], 3, 2)
    scripted = torch.jit.script(module)
    x = {"p2": torch.randn(1, 4, 16, 16, dtype=torch.float64),
         "skip": torch.randn(1, 4, 2, 2, dtype=torch.float64),
         "p3": torch.randn(1, 4, 8, 8, dtype=torch.float64)}
    boxes = [torch.tensor([[1.0, 1.0, 20.0, 30.0], [0.0, 0.0, 60.0, 60.0]],
                          dtype=torch.float64)]
    want = module(x, boxes, [(64, 60)])
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    torch.testing.assert_close(loaded(x, boxes, [(64, 60)]), want, rtol=0, atol=0)
    assert loaded.scales == module.scales == [0.25, 0.125]


def test_scripted_channels_last_and_errors():
    # channels-last features stay channels-last, with the eager bits; a bad
    # argument fails with curoi's message (TorchScript wraps its class).
    scripted = torch.jit.script(ct.roi_align)
    x = X.to(memory_format=torch.channels_last)
    y = scripted(x, ROIS, 3, 0.5, 2, True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ct.roi_align(X, ROIS, 3, 0.5, 2, True), rtol=0, atol=0)
    with pytest.raises(Exception, match="sampling_ratio"):
        scripted(X, ROIS, 3, 0.5, 10**12, True)
    with pytest.raises(Exception, match=r"boxes must be a \[K, 5\]"):
        scripted(X, ROIS[:, 1:], 3)
    with pytest.raises(Exception, match="mode must be 'avg' or 'max'"):
        scripted(X, ROIS, 3, 1.0, 2, False, "mean")


def test_scripted_graph_calls_the_curoi_op_directly():
    graph = str(torch.jit.script(ct.roi_align).graph)
    assert "curoi::roi_align" in graph
    assert "prim::PythonOp" not in graph


@pytest.mark.parametrize("name, make, boxes", MODULES, ids=[m[0] for m in MODULES])
def test_traced_module_gives_eager_numbers_and_gradients(name, make, boxes):
    module = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, (X, boxes))
    other_x, _ = _case(9)
    _same(_grads(traced, other_x, boxes), _grads(module, other_x, boxes))
    assert any(n.kind().startswith("curoi::") for n in traced.graph.nodes())


def test_traced_boxes_get_no_gradient_unless_asked():
    # The trace cuts the boxes off whether or not the example boxes needed
    # grad; boxes_grad=True keeps the gradient in the trace.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        plain = torch.jit.trace(ct.RoIAlign(2, 0.5, 2), (X, ROIS))
        asked = torch.jit.trace(ct.RoIAlign(2, 0.5, 2, boxes_grad=True), (X, ROIS))
    boxes = ROIS.clone().requires_grad_()
    assert not plain(X, boxes).requires_grad
    (grad,) = torch.autograd.grad(asked(X, boxes).sum(), boxes)
    (want,) = torch.autograd.grad(ct.roi_align(X, boxes, 2, 0.5, 2, boxes_grad=True).sum(),
                                  boxes)
    torch.testing.assert_close(grad, want, rtol=0, atol=0)


# ------------------------------------------------------------------ torch.fx
class _Head(torch.nn.Module):
    """A conv, then each curoi.torch function called through the module
    attribute and by a name imported on its own."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 1).double()

    def forward(self, x, boxes):
        f = self.conv(x)
        return torch.cat([ct.roi_align(f, boxes, 2, 0.5, 2, True).flatten(1),
                          imported_roi_pool(f, boxes, 2, 0.5).flatten(1),
                          ct.ps_roi_align(f, boxes, 2, 0.5, 2).flatten(1),
                          ct.prroi_pool(f, boxes, 2, 0.5).flatten(1),
                          ct.roi_spp(f, boxes, [1, 2], 0.5).flatten(1)], 1)


def test_fx_symbolic_trace_keeps_each_function_as_a_leaf():
    head = _Head()
    traced = torch.fx.symbolic_trace(head)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    for fn in (ct.roi_align, ct.roi_pool, ct.ps_roi_align, ct.prroi_pool, ct.roi_spp):
        assert fn in targets
    _same(_grads(traced, X, ROIS), _grads(head, X, ROIS))
    # The graph module's code imports the functions by their names.
    recompiled = torch.fx.GraphModule(head, traced.graph)
    _same(_grads(recompiled, X, _as_list(ROIS, 2)), _grads(head, X, _as_list(ROIS, 2)))


@pytest.mark.parametrize("name, make, boxes", MODULES, ids=[m[0] for m in MODULES])
def test_fx_traced_module_gives_eager_numbers(name, make, boxes):
    module = make()
    traced = torch.fx.symbolic_trace(module)
    _same(_grads(traced, X, boxes), _grads(module, X, boxes))


def test_fx_traced_multiscale_module_and_function():
    module = ct.MultiScaleRoIAlign(["p2", "p3"], 3, 2)
    traced = torch.fx.symbolic_trace(module)
    x = {"p2": torch.randn(1, 4, 16, 16), "p3": torch.randn(1, 4, 8, 8)}
    boxes = [torch.tensor([[1.0, 1.0, 20.0, 30.0], [0.0, 0.0, 60.0, 60.0]])]
    torch.testing.assert_close(traced(x, boxes, [(64, 60)]), module(x, boxes, [(64, 60)]),
                               rtol=0, atol=0)

    class Pyramid(torch.nn.Module):
        def forward(self, a, b, rois):
            return ct.multiscale_roi_align([a, b], rois, 3, [0.25, 0.125], 2)

    traced = torch.fx.symbolic_trace(Pyramid())
    rois = torch.tensor([[0, 1.0, 1.0, 20.0, 30.0]])
    torch.testing.assert_close(traced(x["p2"], x["p3"], rois),
                               Pyramid()(x["p2"], x["p3"], rois), rtol=0, atol=0)


# ---------------------------------------------------------------- quantized
def _quantize(values, scale, zero_point, dtype):
    """NumPy's quantization: round half to even, clamp to the type."""
    info = {torch.quint8: (0, 255), torch.qint8: (-128, 127),
            torch.qint32: (-2**31, 2**31 - 1)}[dtype]
    q = np.rint(values / scale) + zero_point
    return np.clip(q, *info).astype(np.int64)


@pytest.mark.parametrize("qdtype", [torch.quint8, torch.qint8, torch.qint32])
@pytest.mark.parametrize("scale, zero_point", [(1.0, 0), (2.0, 10), (0.1, 50)])
@pytest.mark.parametrize("aligned", [False, True])
def test_quantized_roi_align_is_torchvisions(qdtype, scale, zero_point, aligned):
    # torchvision's quantized RoI Align: features and boxes quantized, one
    # image, the boxes' batch index not read, the result quantized with the
    # features' scale and zero point. Expected: the reference on the
    # dequantized numbers (batch index 0), quantized by NumPy.
    rng = np.random.default_rng(7)
    x = torch.tensor(rng.integers(50, 100, (1, 2, 10, 10)), dtype=torch.float32)
    boxes = torch.tensor(ref.random_boxes(rng, 1, 10, 10, 1.0, 12, kinds=("inside",)),
                         dtype=torch.float32)
    boxes[:, 0] = torch.tensor(rng.integers(0, 3, 12), dtype=torch.float32)
    qx = torch.quantize_per_tensor(x, scale, zero_point, qdtype)
    qboxes = torch.quantize_per_tensor(boxes.abs(), scale, zero_point, qdtype)
    qy = ct.roi_align(qx, qboxes, 5, 1.0, 2, aligned)
    assert qy.dtype == qdtype and qy.shape == (12, 2, 5, 5)
    assert qy.q_scale() == scale and qy.q_zero_point() == zero_point
    rois = qboxes.dequantize().double().numpy()
    rois[:, 0] = 0
    y = ref.roi_align(qx.dequantize().double().numpy(), rois, 5, 1.0, 2, aligned)
    want = _quantize(y, scale, zero_point, qdtype)
    got = qy.int_repr().long().numpy()
    # float32 against float64 can land on the other side of a rounding
    # tie: one step at most, rarely.
    assert np.abs(got - want).max() <= 1
    assert (got != want).mean() < 0.05
    # Within half a step (and the float32 rounding) of the float result.
    np.testing.assert_allclose(qy.dequantize().double().numpy(),
                               np.clip(y, scale * (want.min() - zero_point), None),
                               atol=scale * 0.5 + 1e-4, rtol=0)
    # The same through a list of per-image boxes, float boxes, and the
    # scripted function and the module.
    per_image = [qboxes.dequantize()[:, 1:]]
    torch.testing.assert_close(ct.roi_align(qx, per_image, 5, 1.0, 2, aligned), qy,
                               rtol=0, atol=0)
    torch.testing.assert_close(torch.jit.script(ct.roi_align)(qx, qboxes, 5, 1.0, 2, aligned),
                               qy, rtol=0, atol=0)
    torch.testing.assert_close(ct.RoIAlign(5, 1.0, 2, aligned)(qx, qboxes), qy,
                               rtol=0, atol=0)


def test_quantized_roi_align_takes_one_image():
    x = torch.quantize_per_tensor(torch.rand(2, 3, 10, 10) * 50, 1.0, 0, torch.qint8)
    boxes = torch.quantize_per_tensor(torch.tensor([[0.0, 1.0, 1.0, 5.0, 5.0]]), 1.0, 0,
                                      torch.qint8)
    # torchvision's words and class (RuntimeError); curoi's ValueError too.
    for error in (RuntimeError, ValueError):
        with pytest.raises(error, match="Only one image per batch is allowed"):
            ct.roi_align(x, boxes, 5)
    with pytest.raises(RuntimeError, match="Only one image per batch is allowed"):
        torch.ops.curoi.roi_align(x, boxes.dequantize(), 1.0, 5, 5, 2, False)


def test_quantized_features_elsewhere_are_refused_by_name():
    x = torch.quantize_per_tensor(torch.rand(1, 4, 10, 10), 0.1, 0, torch.quint8)
    boxes = torch.tensor([[0.0, 1.0, 1.0, 5.0, 5.0]])
    for call in (lambda: ct.roi_pool(x, boxes, 2), lambda: ct.ps_roi_align(x, boxes, 2),
                 lambda: ct.roi_align(x, boxes, 2, mode="max")):
        with pytest.raises(TypeError, match="input is quantized.*only roi_align"):
            call()
    channel = torch.quantize_per_channel(torch.rand(1, 4, 10, 10), torch.ones(4) * 0.1,
                                         torch.zeros(4, dtype=torch.long), 1, torch.quint8)
    with pytest.raises(TypeError, match="per channel"):
        ct.roi_align(channel, boxes, 2)


# ------------------------------------------- torchvision's argument lists
# torchvision's schemas (torchvision/csrc/ops/*.cpp), written out.
TORCHVISION_SCHEMAS = {
    "roi_align": "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                 "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "roi_pool": "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                "SymInt pooled_width) -> (Tensor, Tensor)",
    "ps_roi_align": "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                    "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)",
    "ps_roi_pool": "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                   "SymInt pooled_width) -> (Tensor, Tensor)",
    "roi_align_backward": "(Tensor grad, Tensor rois, float spatial_scale, "
                          "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, "
                          "SymInt channels, SymInt height, SymInt width, int sampling_ratio, "
                          "bool aligned) -> Tensor",
}


def _argument_names(schema):
    inner = schema[schema.index("(") + 1:schema.index(") ->")]
    return [a.split()[-1] for a in inner.split(", ")]


@pytest.mark.parametrize("name", sorted(TORCHVISION_SCHEMAS))
def test_curoi_ops_take_torchvisions_argument_lists(name):
    schema = getattr(torch.ops.curoi, name).default._schema
    names = _argument_names(TORCHVISION_SCHEMAS[name])
    assert [a.name for a in schema.arguments[:len(names)]] == names
    types = [a.split()[0] for a in TORCHVISION_SCHEMAS[name].split("(")[1].split(")")[0]
             .split(", ")]
    # torchvision's int sampling_ratio is a SymInt here: it takes an int.
    assert [str(a.type).replace("SymInt", "int") for a in schema.arguments[:len(names)]] == [
        t.replace("SymInt", "int") for t in types]
    extra = schema.arguments[len(names):]
    assert all(a.has_default_value() for a in extra), str(schema)


def test_curoi_ops_called_with_torchvisions_arguments_match_the_reference():
    x, rois = _case(11)
    xn, rn = x.numpy(), rois.numpy()
    y = torch.ops.curoi.roi_align(x, rois, 0.5, 2, 3, 2, True)
    np.testing.assert_allclose(y.numpy(), ref.roi_align(xn, rn, (2, 3), 0.5, 2, True),
                               rtol=1e-12, atol=1e-12)
    y, argmax = torch.ops.curoi.roi_pool(x, rois, 0.5, 2, 3)
    want, want_argmax = ref.roi_pool(xn, rn, (2, 3), 0.5, "torchvision")
    np.testing.assert_array_equal(y.numpy(), want)
    np.testing.assert_array_equal(argmax.numpy(), want_argmax)
    y = torch.ops.curoi.ps_roi_pool(x, rois, 0.5, 2, 2)
    np.testing.assert_allclose(y.numpy(), ref.ps_roi_pool(xn, rn, 2, 0.5),
                               rtol=1e-12, atol=1e-12)
    y = torch.ops.curoi.ps_roi_align(x, rois, 0.5, 2, 2, 2)
    np.testing.assert_allclose(y.numpy(), ref.ps_roi_align(xn, rn, 2, 0.5, 2),
                               rtol=1e-12, atol=1e-12)
    g = torch.tensor(np.random.default_rng(12).standard_normal((len(rois), 8, 2, 3)))
    grad = torch.ops.curoi.roi_align_backward(g, rois, 0.5, 2, 3, *x.shape, 2, True)
    np.testing.assert_allclose(
        grad.numpy(), ref.roi_align_backward(g.numpy(), rn, x.shape, (2, 3), 0.5, 2, True),
        rtol=1e-10, atol=1e-12)


def test_every_curoi_op_argument_after_torchvisions_has_a_default():
    # The schemas' arguments past the features, boxes, scale and output
    # size (or the backward's features' shape) all have defaults.
    ops = [n for n in dir(torch.ops.curoi)
           if isinstance(getattr(torch.ops.curoi, n), torch._ops.OpOverloadPacket)]
    assert len(ops) >= 20
    for name in ops:
        schema = getattr(torch.ops.curoi, name).default._schema
        arguments = [a.name for a in schema.arguments]
        after = arguments.index("width") + 1 if "width" in arguments else (
            arguments.index("widths") + 1 if "widths" in arguments else
            max(i for i, a in enumerate(arguments)
                if a in ("rois", "spatial_scale", "pooled_width")) + 1)
        for a in schema.arguments[after:]:
            if name.startswith("multiscale") and a.name in (
                    "sampling_ratio", "aligned", "canonical_scale", "canonical_level", "eps",
                    "level_rule") and "backward" in name:
                continue  # the pyramid's backward restates its forward's rule
            assert a.has_default_value(), f"{name}: {a.name} ({schema})"


# ------------------------------------------------------- errors for boxes
@pytest.mark.parametrize("call", [
    lambda: ct.roi_align(X, ROIS[:, 1:], 2),
    lambda: ct.roi_align(X, [ROIS[:, 1:], ROIS], 2),
    lambda: ct.roi_pool(X, ROIS[:, :3], 2),
    lambda: ct.ps_roi_pool(X, ROIS[0], 2),
    lambda: ct.roi_align_rotated(X, ROIS, 2),
    lambda: ct.prroi_pool(X, [ROIS[:, 1:]] * 3, 2),
    lambda: ct.multiscale_roi_align([X], ROIS[:, 1:], 2, [1.0]),
    lambda: ct.crop_and_resize(X, ROIS, torch.zeros(7, dtype=torch.long), 2),
])
def test_malformed_boxes_raise_an_assertion_error_that_is_a_value_error(call):
    with pytest.raises(AssertionError, match="boxes") as info:
        call()
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ct.BoxesShapeError)


def test_boxes_of_the_wrong_type_raise_an_assertion_error_that_is_a_type_error():
    for boxes in (ROIS.numpy(), "boxes", 3):
        with pytest.raises(AssertionError, match="boxes") as info:
            ct.roi_align(X, boxes, 2)
        assert isinstance(info.value, TypeError)


# -------------------------------------------------------------- box gradients
def _boxes_grad(fn, boxes, x=X):
    boxes = boxes.clone().requires_grad_()
    y = fn(x.clone().requires_grad_(), boxes)
    y.sum().backward()
    return boxes.grad


@pytest.mark.parametrize("name, fn, args, boxes", FUNCTIONS, ids=[f[0] for f in FUNCTIONS])
def test_boxes_get_no_gradient_by_default_as_upstream(name, fn, args, boxes):
    # torchvision, detectron2 and mmcv give these boxes no gradient; nor
    # does curoi.torch, though the boxes require grad.
    if fn is ct.prroi_pool:
        pytest.skip("mmcv's PrRoIPool gives the boxes a gradient (below)")
    assert _boxes_grad(lambda x, b: fn(x, b, *args), boxes) is None
    assert _boxes_grad(lambda x, b: torch.jit.script(fn)(x, b, *args), boxes) is None


def test_multiscale_boxes_get_no_gradient():
    levels = [X.clone().requires_grad_(), X[:, :, ::2, ::2].clone().requires_grad_()]
    boxes = ROIS.clone().requires_grad_()
    ct.multiscale_roi_align(levels, boxes, 2, [0.5, 0.25]).sum().backward()
    assert boxes.grad is None and levels[0].grad is not None


def test_boxes_gradient_when_asked_matches_the_reference_and_finite_differences():
    x, _ = _case(17, shape=(2, 2, 8, 9))
    rois = torch.tensor([[0, 1.31, 1.13, 6.73, 5.97], [1, 2.23, 0.61, 4.93, 6.37]],
                        dtype=torch.float64)
    batch, corners = rois[:, :1], rois[:, 1:].clone().requires_grad_()
    scripted = torch.jit.script(ct.roi_align)
    for fn in (ct.roi_align, scripted):
        assert torch.autograd.gradcheck(
            lambda c: fn(x, torch.cat([batch, c], 1), (2, 3), 1.0, 2, True, "avg", True),
            (corners,), eps=1e-7, atol=1e-6)
    module = torch.jit.script(ct.RoIAlign((2, 3), 1.0, 2, True, boxes_grad=True))
    boxes = rois.clone().requires_grad_()
    g = torch.tensor(np.random.default_rng(18).standard_normal((2, 2, 2, 3)))
    (grad,) = torch.autograd.grad(module(x, boxes), boxes, g)
    np.testing.assert_allclose(grad.numpy(), ref.roi_align_boxes_backward(
        g.numpy(), x.numpy(), rois.numpy(), (2, 3), 1.0, 2, True), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="boxes_grad=True: roi_align\\(mode='max'\\)"):
        ct.roi_align(x, boxes, 2, 1.0, 2, True, "max", True)


def test_rotated_boxes_gradient_when_asked():
    rng = np.random.default_rng(19)
    x = torch.tensor(rng.standard_normal((1, 2, 9, 10)))
    boxes = torch.tensor([[0, 4.3, 4.1, 4.7, 3.3, 20.0], [0, 5.1, 3.9, 3.1, 4.9, -35.0]],
                         dtype=torch.float64)
    index, numbers = boxes[:, :1], boxes[:, 1:].clone().requires_grad_()
    for fn in (ct.roi_align_rotated, torch.jit.script(ct.roi_align_rotated)):
        assert torch.autograd.gradcheck(
            lambda b: fn(x, torch.cat([index, b], 1), 2, 1.0, 2, "detectron2", True, False,
                         True), (numbers,), eps=1e-6, atol=1e-5)
    module = ct.RoIAlignRotated(2, 1.0, 2, boxes_grad=True)
    tb = boxes.clone().requires_grad_()
    module(x, tb).sum().backward()
    assert tb.grad is not None and tb.grad[:, 1:].abs().sum() > 0


def test_prroi_pool_and_crop_and_resize_keep_their_box_gradients():
    # mmcv's PrRoIPool and TensorFlow's crop_and_resize give the boxes a
    # gradient; boxes_grad=False cuts it off.
    x, _ = _case(21, shape=(1, 2, 8, 9))
    rois = torch.tensor([[0, 1.3, 1.1, 6.7, 5.9]], dtype=torch.float64)
    corners = rois[:, 1:].clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda c: ct.prroi_pool(x, torch.cat([rois[:, :1], c], 1), 2),
        (corners,), eps=1e-7, atol=1e-6)
    assert _boxes_grad(ct.PrRoIPool(2), rois, x) is not None
    assert _boxes_grad(lambda f, b: ct.prroi_pool(f, b, 2, 1.0, False), rois, x) is None
    image = x.permute(0, 2, 3, 1).contiguous()
    crop = torch.tensor([[0.1, 0.2, 0.7, 0.9]], dtype=torch.float64)
    index = torch.zeros(1, dtype=torch.long)
    assert torch.autograd.gradcheck(
        lambda b: ct.crop_and_resize(image, b, index, 3), (crop.clone().requires_grad_(),),
        eps=1e-7, atol=1e-6)
    assert _boxes_grad(lambda f, b: ct.crop_and_resize(f, b, index, 3, boxes_grad=False),
                       crop, image) is None


def test_compiled_boxes_gradient_defaults():
    compiled = torch.compile(lambda x, b, asked: ct.roi_align(x, b, 2, 0.5, 2, True, "avg",
                                                                asked),
                             fullgraph=True, backend="aot_eager")
    boxes = ROIS.clone().requires_grad_()
    assert not compiled(X, boxes, False).requires_grad
    (grad,) = torch.autograd.grad(compiled(X, boxes, True).sum(), boxes)
    (want,) = torch.autograd.grad(ct.roi_align(X, boxes, 2, 0.5, 2, True, "avg", True).sum(),
                                  boxes)
    torch.testing.assert_close(grad, want, rtol=0, atol=0)


def test_module_reprs_show_the_box_gradient_option():
    assert re.search(r"boxes_grad=True\)$", repr(ct.RoIAlign(2, 1.0, 2, boxes_grad=True)))
    assert "boxes_grad" not in repr(ct.RoIAlign(2, 1.0, 2))
    assert "boxes_grad=False" in repr(ct.PrRoIPool(2, boxes_grad=False))

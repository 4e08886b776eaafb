"""Every operation and module a saved trimmed model may hold survives save and load.

The allow-lists (:mod:`velcro.trim._allowlist`) are derived from PyTorch; each entry is
round-tripped here: every function and tensor method (the loaded node calls the very same
function, with equal arguments), every standard layer (rebuilt from its constructor
arguments, it computes exactly what the original computes), and small models using the
operations timm and torchvision models use (``torch._assert(x.ndim == 4)``, ``F.pad``,
functional norms, ``split``, ``reshape_as``, ``x.shape[1] // 2``) through trim, save and load.
"""

import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from zoo import images

import velcro
from velcro.trim import _allowlist, _modules

LITERALS = (1, 2.5, (1, 2), None, "s", slice(0, 2, None), torch.float32, [1, -2],
            Ellipsis, float("inf"), float("nan"), True, torch.device("cpu"))


def _same(a, b):
    """Equal, NaN equal to NaN, nodes compared by name."""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.name == b.name
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, slice):
        return _same((a.start, a.stop, a.step), (b.start, b.stop, b.step))
    return type(a) is type(b) and a == b


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """One graph calling every allowed function and method, saved and loaded."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    calls = {}
    for name, fn in _allowlist.FUNCTIONS.items():
        args = (x, "shape") if fn is getattr else (x, *LITERALS)
        calls[f"function {name}"] = graph.call_function(fn, args, {} if fn is getattr else
                                                        {"dim": 1, "out_dtype": torch.int8})
    for name in sorted(_allowlist.METHODS):
        calls[f"method {name}"] = graph.call_method(name, (x, *LITERALS), {"keepdim": True})
    graph.output(tuple(calls.values()))
    original = fx.GraphModule(nn.Module(), graph, "Everything")
    path = tmp_path_factory.mktemp("ops") / "everything.json"
    velcro.save_trimmed(original, path)
    loaded = velcro.load_trimmed(path)
    by_name = {n.name: n for n in loaded.graph.nodes}
    return {label: (node, by_name[node.name]) for label, node in calls.items()}


@pytest.mark.parametrize("name", sorted(_allowlist.FUNCTIONS))
def test_every_allowed_function_round_trips(round_trip, name):
    before, after = round_trip[f"function {name}"]
    assert after.op == "call_function" and after.target is _allowlist.FUNCTIONS[name]
    assert _same(after.args, before.args) and _same(after.kwargs, before.kwargs)


@pytest.mark.parametrize("name", sorted(_allowlist.METHODS))
def test_every_allowed_method_round_trips(round_trip, name):
    before, after = round_trip[f"method {name}"]
    assert after.op == "call_method" and after.target == name
    assert _same(after.args, before.args) and _same(after.kwargs, before.kwargs)


@pytest.mark.parametrize("name", [
    "torch.save", "torch.load", "torch.manual_seed", "torch.set_default_dtype",
    "torch.set_num_threads", "torch.from_file", "torch.rand_like", "torch.bernoulli",
    "torch.multinomial", "torch.autocast", "torch.nn.functional.gumbel_softmax",
    "torch.nn.functional.rrelu", "torch.Tensor.apply_", "torch.Tensor.set_",
    "torch.Tensor.register_hook", "torch.Tensor.cuda", "torch.Tensor.untyped_storage",
    "torch.Tensor.share_memory_", "torch.Tensor.resize_", "torch.Tensor.normal_",
    "torch.Tensor.backward", "torch.Tensor.__reduce_ex__", "operator.setitem",
    "operator.methodcaller", "operator.attrgetter", "builtins.eval", "builtins.exec",
])
def test_effects_beyond_the_graph_are_not_allowed(name):
    assert name not in _allowlist.FUNCTIONS
    if name.startswith("torch.Tensor."):
        assert name.removeprefix("torch.Tensor.") not in _allowlist.METHODS


X = (2, 4, 6, 6)
VOLUME = (2, 4, 4, 4, 4)
SEQUENCE = (2, 4, 9)
# class name -> (constructor args, constructor kwargs, input shapes); default ((), {}, [X])
MODULE_CASES = {
    "AdaptiveAvgPool1d": ((3,), {}, [SEQUENCE]), "AdaptiveAvgPool2d": (((2, 3),), {}, [X]),
    "AdaptiveAvgPool3d": ((2,), {}, [VOLUME]), "AdaptiveMaxPool1d": ((3,), {}, [SEQUENCE]),
    "AdaptiveMaxPool2d": ((2,), {}, [X]), "AdaptiveMaxPool3d": ((2,), {}, [VOLUME]),
    "AlphaDropout": ((0.2,), {}, [X]), "AvgPool1d": ((2,), {}, [SEQUENCE]),
    "AvgPool2d": ((2,), {"stride": 1, "padding": 1, "ceil_mode": True,
                         "count_include_pad": False, "divisor_override": 3}, [X]),
    "AvgPool3d": ((2,), {}, [VOLUME]), "BatchNorm1d": ((4,), {}, [SEQUENCE]),
    "BatchNorm2d": ((4,), {"eps": 1e-3, "momentum": None}, [X]),
    "BatchNorm3d": ((4,), {"affine": False}, [VOLUME]),
    "Bilinear": ((4, 3, 5), {}, [(2, 4), (2, 3)]), "CELU": ((), {"alpha": 0.5}, [X]),
    "ChannelShuffle": ((2,), {}, [X]), "CircularPad1d": ((2,), {}, [SEQUENCE]),
    "CircularPad2d": (((1, 2, 0, 1),), {}, [X]), "CircularPad3d": ((1,), {}, [VOLUME]),
    "ConstantPad1d": ((2, 0.5), {}, [SEQUENCE]), "ConstantPad2d": (((1, 0, 2, 1), -1.0), {}, [X]),
    "ConstantPad3d": ((1, 2.0), {}, [VOLUME]),
    "Conv1d": ((4, 5, 3), {"padding": 1}, [SEQUENCE]),
    "Conv2d": ((4, 6, 3), {"stride": 2, "padding": 1, "groups": 2, "bias": False,
                           "padding_mode": "reflect"}, [X]),
    "Conv3d": ((4, 2, 2), {}, [VOLUME]), "Conv1dWithMap": ((4, 5, 3), {}, [SEQUENCE]),
    "Conv2dWithMap": ((4, 6, 3), {"padding": "same"}, [X]),
    "Conv3dWithMap": ((4, 2, 2), {}, [VOLUME]), "LinearWithMap": ((6, 3), {}, [X]),
    "ConvTranspose1d": ((4, 3, 3), {"stride": 2, "output_padding": 1}, [SEQUENCE]),
    "ConvTranspose2d": ((4, 3, 2), {"stride": 2, "dilation": 2}, [X]),
    "ConvTranspose3d": ((4, 2, 2), {}, [VOLUME]),
    "CosineSimilarity": ((), {"dim": 1}, [X, X]), "CrossMapLRN2d": ((3,), {}, [X]),
    "Dropout1d": ((), {}, [SEQUENCE]), "Dropout3d": ((), {}, [VOLUME]),
    "ELU": ((), {"alpha": 0.7}, [X]),
    "Embedding": ((10, 3), {"padding_idx": 1, "max_norm": 2.0}, ["long (2, 5)"]),
    "EmbeddingBag": ((10, 3), {"mode": "max"}, ["long (2, 4)"]),
    "Flatten": ((2, -1), {}, [X]), "Fold": (((4, 5), 2), {}, [(2, 16, 12)]),
    "GELU": (("tanh",), {}, [X]), "GLU": ((), {"dim": 1}, [X]), "GroupNorm": ((2, 4), {}, [X]),
    "Hardshrink": ((0.3,), {}, [X]), "Hardtanh": ((-0.5, 0.5), {}, [X]),
    "InstanceNorm1d": ((4,), {"affine": True}, [SEQUENCE]),
    "InstanceNorm2d": ((4,), {"track_running_stats": True}, [X]),
    "InstanceNorm3d": ((4,), {}, [VOLUME]), "LPPool1d": ((2, 3), {}, [SEQUENCE]),
    "LPPool2d": ((2, 2), {}, [X]), "LPPool3d": ((2, 2), {}, [VOLUME]),
    "LayerNorm": (((6, 6),), {"eps": 1e-3, "bias": False}, [X]),
    "LeakyReLU": ((0.2,), {}, [X]), "Linear": ((6, 3), {}, [X]),
    "LocalResponseNorm": ((2,), {}, [X]), "LogSoftmax": ((), {"dim": 1}, [X]),
    "MaxPool1d": ((2,), {}, [SEQUENCE]),
    "MaxPool2d": ((3,), {"stride": 2, "padding": 1, "ceil_mode": True}, [X]),
    "MaxPool3d": ((2,), {}, [VOLUME]), "MaxUnpool1d": ((2,), {}, ["unpool 1"]),
    "MaxUnpool2d": ((2,), {}, ["unpool 2"]), "MaxUnpool3d": ((2,), {}, ["unpool 3"]),
    "PReLU": ((), {"num_parameters": 4}, [X]), "PairwiseDistance": ((), {}, [(2, 6), (2, 6)]),
    "PixelShuffle": ((2,), {}, [X]), "PixelUnshuffle": ((2,), {}, [X]),
    "RMSNorm": (([6],), {}, [X]), "ReflectionPad1d": ((2,), {}, [SEQUENCE]),
    "ReflectionPad2d": (((1, 1, 2, 0),), {}, [X]), "ReflectionPad3d": ((1,), {}, [VOLUME]),
    "ReplicationPad1d": ((2,), {}, [SEQUENCE]), "ReplicationPad2d": ((1,), {}, [X]),
    "ReplicationPad3d": ((1,), {}, [VOLUME]), "Softmax": ((), {"dim": 1}, [X]),
    "Softmin": ((), {"dim": 1}, [X]), "Softplus": ((), {"beta": 2.0, "threshold": 10.0}, [X]),
    "Softshrink": ((0.2,), {}, [X]), "SyncBatchNorm": ((4,), {}, [X]),
    "Threshold": ((0.1, 20.0), {}, [X]), "Unflatten": ((1, (2, 2)), {}, [X]),
    "Unfold": ((2,), {}, [X]), "Upsample": ((), {"scale_factor": 2, "mode": "nearest"}, [X]),
    "UpsamplingBilinear2d": ((), {"scale_factor": 2}, [X]),
    "UpsamplingNearest2d": ((), {"size": (7, 9)}, [X]), "ZeroPad1d": ((1,), {}, [SEQUENCE]),
    "ZeroPad2d": (((1, 2),), {}, [X]), "ZeroPad3d": ((1,), {}, [VOLUME]),
}


class One(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class Two(One):
    def forward(self, x, y):
        return self.layer(x, y)


class Leaves(fx.Tracer):
    """Every module a leaf (velcro's own modules too, as trim's graphs hold them)."""

    def is_leaf_module(self, module, qualified_name):
        return True


def _inputs(spec, gen):
    if spec == "long (2, 5)" or spec == "long (2, 4)":
        return [torch.randint(2, 10, (2, 5 if "5" in spec else 4), generator=gen)]
    if spec.startswith("unpool"):
        dims = int(spec[-1])
        x = torch.randn((2, 4) + (4,) * dims, generator=gen)
        return list(getattr(F, f"max_pool{dims}d")(x, 2, return_indices=True))
    raise AssertionError(spec)


def _build(name, gen):
    args, kwargs, shapes = MODULE_CASES.get(name, ((), {}, [X]))
    torch.manual_seed(0)
    layer = _allowlist.MODULES[name](*args, **kwargs)
    inputs = []
    for shape in shapes:
        inputs += _inputs(shape, gen) if isinstance(shape, str) else [
            torch.randn(shape, generator=gen)]
    bases = {with_map: base for base, with_map in _modules.WITH_MAP.items()}
    if type(layer) in bases:  # a bias map of the plain layer's output shape (one image)
        out = bases[type(layer)].forward(layer, inputs[0])
        layer.register_buffer("bias_map", torch.randn(out.shape[1:], generator=gen))
    for buffer in layer.buffers():  # e.g. batch-norm statistics
        if buffer.is_floating_point():
            buffer.copy_(torch.rand(buffer.shape, generator=gen) + 0.5)
    return layer.eval(), inputs


@pytest.mark.parametrize("name", sorted(_allowlist.MODULES))
def test_every_allowed_module_round_trips_exactly(tmp_path, name):
    gen = torch.Generator().manual_seed(1)
    layer, inputs = _build(name, gen)
    wrapper = (Two if len(inputs) == 2 else One)(layer)
    traced = fx.GraphModule(wrapper, Leaves().trace(wrapper))
    velcro.save_trimmed(traced, tmp_path / "layer.json")
    loaded = velcro.load_trimmed(tmp_path / "layer.json")
    assert type(loaded.layer) is type(layer) and repr(loaded.layer) == repr(layer)
    for key, value in layer.state_dict().items():
        assert torch.equal(loaded.layer.state_dict()[key], value), key
    with torch.no_grad():
        expected = wrapper(*[x.clone() for x in inputs])
        got = loaded(*[x.clone() for x in inputs])
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


class TimmLike(nn.Module):
    """The operations issue 17 found save_trimmed refusing, as timm and torchvision use them."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.register_buffer("running_mean", torch.randn(8) * 0.1)
        self.register_buffer("running_var", torch.rand(8) + 0.5)
        self.weight = nn.Parameter(torch.rand(8) + 0.5)
        self.bias = nn.Parameter(torch.randn(8) * 0.1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        torch._assert(x.ndim == 4, "Input image must be 4-D (N, C, H, W), isn't it?")
        x = F.pad(x, (1, 1, 1, 1))
        x = F.batch_norm(self.conv1(x), self.running_mean, self.running_var, self.weight,
                         self.bias, False, 0.1, 1e-5).relu()
        a, b = torch.split(x, 4, dim=1)
        x = torch.cat([b, a], 1)
        half = x.shape[1] // 2
        x = F.group_norm(F.relu(self.conv2(x)), 2)
        y = x[:, :half].reshape_as(x[:, half:])
        x = torch.cat([x[:, half:], y], 1)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2)
        x = F.gelu(self.conv3(x))
        return self.head(x.mean((2, 3)))


# (trim turns the functional batch-norm into a module it folds into conv1, and reads the
# parts of torch.split as channel slices: those two no longer reach the saved graph)
ISSUE_17_OPS = ["operator.eq", "torch._assert", "operator.floordiv",
                "torch.nn.functional.pad", "torch.nn.functional.layer_norm",
                "torch.nn.functional.group_norm", "reshape_as", "builtins.getattr"]


@pytest.mark.parametrize("threshold", [0.0, 0.4])
def test_models_using_real_models_operations_trim_save_and_load(tmp_path, threshold):
    torch.manual_seed(0)
    model = TimmLike().eval()
    shape = (3, 10, 10)
    stats = velcro.calibrate(model, images(shape, 16), progress=False)
    small = velcro.trim(model, velcro.plan(stats, threshold, granularity="channel"),
                        channel_multiple=1)
    velcro.save_trimmed(small, tmp_path / "timm.json")
    text = (tmp_path / "timm.json").read_text()
    for op in ISSUE_17_OPS:
        assert f'"{op}"' in text, op
    loaded = velcro.load_trimmed(tmp_path / "timm.json")
    x = images(shape, 4, seed=5)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
        if threshold == 0.0:  # nothing removed: the saved model is the original
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)


class SharedWeight(nn.Module):
    """A convolution called as a module and its weight read directly (functional conv)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(6, 1, 1))

    def forward(self, x):
        return F.relu(self.conv(x)) + F.conv2d(x, self.conv.weight, padding=1) * self.scale


def test_a_parameter_read_through_its_module_and_directly_round_trips(tmp_path):
    torch.manual_seed(0)
    model = SharedWeight().eval()
    traced = fx.symbolic_trace(model)
    assert {n.target for n in traced.graph.nodes if n.op == "get_attr"} == {"conv.weight",
                                                                             "scale"}
    velcro.save_trimmed(traced, tmp_path / "shared.json")
    loaded = velcro.load_trimmed(tmp_path / "shared.json")
    assert loaded.get_parameter("conv.weight") is loaded.conv.weight  # one tensor, not two
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


class WithFactories(nn.Module):
    """Tensors made inside forward from shapes, as timm's edgenext (a positional-encoding
    mask from ``torch.zeros(B, H, W)``) and others do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        batch, _, height, width = y.shape
        mask = torch.zeros((batch, height, width), dtype=torch.float32, device=y.device)
        ramp = torch.arange(width, dtype=torch.float32).view(1, 1, 1, width)
        grid = torch.ones(1, 1, height, 1) * torch.full((1, 1, 1, width), 0.5) + torch.eye(height)
        return y + mask.unsqueeze(1) + ramp * 0.01 + grid


def test_tensor_factories_round_trip(tmp_path):
    torch.manual_seed(0)
    model = WithFactories().eval()
    shape = (3, 6, 6)
    stats = velcro.calibrate(model, images(shape, 8), progress=False)
    small = velcro.trim(model, velcro.plan(stats, 0.3, granularity="channel"),
                        channel_multiple=1)
    velcro.save_trimmed(small, tmp_path / "factories.json")
    text = (tmp_path / "factories.json").read_text()
    for op in ("torch.zeros", "torch.arange", "torch.ones", "torch.full", "torch.eye"):
        assert f'"{op}"' in text, op
    loaded = velcro.load_trimmed(tmp_path / "factories.json")
    x = images(shape, 2, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


def test_an_unsaveable_function_is_named_without_a_memory_address(tmp_path):
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.manual_seed, (0,)))  # a global effect: refused
    del x
    module = fx.GraphModule(nn.Module(), graph)
    with pytest.raises(velcro.VelcroError) as caught:
        velcro.save_trimmed(module, tmp_path / "seed.json")
    message = str(caught.value)
    assert "torch.manual_seed" in message or "torch.random.manual_seed" in message
    assert " at 0x" not in message and len(message.splitlines()) == 1
    assert not (tmp_path / "seed.json").exists()

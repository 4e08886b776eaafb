from collections import Counter

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo import TOPOLOGIES, Misaligned, build, images, randomize_batchnorm

import velcro
from velcro.errors import VelcroError
from velcro.export import DATA_DEPENDENT_OPS
from velcro.trim._modules import ChannelSelect, ChannelSum, Materialize
from velcro.trim._place import conv_placeable, is_identity_placement

# What a trimmed graph may add to the original's operators: bias maps and constants are
# added, channels placed by pads, slices and gathers with constant indices.
PLACEMENT_OPS = {"Add", "Sub", "Pad", "Slice", "Gather"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_onnxruntime_agrees(model, path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4 * max(np.abs(expected).max(), 1e-6)


def graph_of(path):
    return onnx.load(str(path)).graph


def placement_budget(small: nn.Module) -> int:
    """Nodes a trimmed graph may hold beyond the original's, counted from its modules: one
    ``Add`` per bias map or added constant, at most two nodes (a 1x1 convolution, or a
    gather or slice and a pad) per input a channel sum places, three per materialisation
    (pad, gather, add of the constants) and one per selection (a ``ChannelSelect``, or the
    ``narrow`` before a depthwise convolution whose input carries channels it does not
    need)."""
    modules = list(small.modules())
    narrows = sum(n.op == "call_method" and n.target == "narrow" for n in small.graph.nodes)
    maps = sum(isinstance(getattr(m, "bias_map", None), torch.Tensor) for m in modules)
    placed = sum(len(m.signs) - 1 for m in modules if isinstance(m, ChannelSum))
    constants = sum(1 for n in small.graph.nodes
                    if n.op == "get_attr" and n.target.startswith("velcro.constant"))
    return (maps + constants + 2 * placed
            + 3 * sum(isinstance(m, Materialize) for m in modules)
            + sum(isinstance(m, ChannelSelect) for m in modules) + narrows)


def conv_placements(small: nn.Module) -> int:
    """The residual-sum inputs the export places with a 1x1 ``Conv`` (not added as they
    are, on channels-first maps), found by running the model at its input size."""
    count = [0]

    def hook(module, args, _out):
        base, *others = args
        for pairs, x in zip(module.pairs, others, strict=True):
            where = [-1] * base.shape[module.dim]
            for target, source in pairs:
                where[target] = source
            count[0] += (not is_identity_placement(where, x.shape[module.dim])
                         and conv_placeable(x, module.dim))

    hooks = [m.register_forward_hook(hook) for m in small.modules()
             if isinstance(m, ChannelSum)]
    with torch.no_grad():
        small(torch.zeros(1, *small.velcro_input_shape))
    for handle in hooks:
        handle.remove()
    return count[0]


def assert_static(trimmed_path, original_path, small):
    """No data-dependent operator, constant positions only, and no more nodes than the
    original's beyond what the trimmed model's own modules add (its bias maps and
    placements)."""
    graph, original = graph_of(trimmed_path), graph_of(original_path)
    ops = Counter(node.op_type for node in graph.node)
    original_ops = Counter(node.op_type for node in original.node)
    assert not set(ops) & DATA_DEPENDENT_OPS, ops
    assert set(ops) <= set(original_ops) | PLACEMENT_OPS, ops - original_ops
    constant = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Gather":
            assert node.input[1] in constant, node  # indices known when trimmed
        if node.op_type in ("Pad", "Slice"):
            assert all(name in constant for name in node.input[1:] if name), node
    assert ops["Conv"] == original_ops["Conv"] + conv_placements(small), ops - original_ops
    assert ops["Gemm"] == original_ops["Gemm"]
    assert len(graph.node) <= len(original.node) + placement_budget(small), (
        len(graph.node), len(original.node), ops - original_ops)


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_original_applied_and_trimmed_zoo_models_export(tmp_path, name):
    model, shape = build(name)
    stats = velcro.calibrate(model, images(shape, 16), progress=False)
    plan = velcro.plan(stats, 0.4, granularity="channel")
    x = images(shape, 5, seed=3)[0]  # a batch of 5 through a file exported at batch 1
    variants = {
        "original": model,
        "applied": velcro.apply(model, plan),
        "element": velcro.apply(model, velcro.plan(stats, 0.4)),
        "trimmed": velcro.trim(model, plan, channel_multiple=1),
        "padded": velcro.trim(model, plan, channel_multiple=4),
    }
    for kind, variant in variants.items():
        path = velcro.export_onnx(variant, tmp_path / f"{kind}.onnx", x[:1])
        onnx.checker.check_model(str(path))
        assert_onnxruntime_agrees(variant, path, x)
    for kind in ("trimmed", "padded"):
        assert_static(tmp_path / f"{kind}.onnx", tmp_path / "original.onnx", variants[kind])


def builtin(name):
    kwargs = {"aux_logits": False} if name == "googlenet" else {}
    torch.manual_seed(0)
    model = randomize_batchnorm(velcro.models.create(name, num_classes=10, **kwargs))
    for module in model.modules():  # activations near unit scale (no slow denormals)
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model.eval()


@pytest.mark.parametrize("name", ["mobilenet_v2", "googlenet"])
def test_trimmed_builtin_models_export_static_graphs(tmp_path, name):
    model = builtin(name)
    shape = (3, 32, 32)
    stats = velcro.calibrate(model, images(shape, 4), progress=False)
    small = velcro.trim(model, velcro.plan(stats, 0.3, granularity="channel"))
    x = images(shape, 3, seed=2)[0]
    original = velcro.export_onnx(model, tmp_path / "original.onnx", x[:1])
    trimmed = velcro.export_onnx(small, tmp_path / "trimmed.onnx", x[:1])
    assert_onnxruntime_agrees(small, trimmed, x)
    assert_static(trimmed, original, small)


def test_trimmed_cifar_resnet_with_channel_padding_shortcuts_exports_statically(tmp_path):
    # option-A shortcuts pad zero channels (F.pad on the channel axis): known placements
    model = builtin("cifar_resnet20")
    shape = (3, 32, 32)
    stats = velcro.calibrate(model, images(shape, 8), progress=False)
    plan = velcro.plan(stats, 0.3, granularity="channel")
    x = images(shape, 3, seed=2)[0]
    original = velcro.export_onnx(model, tmp_path / "original.onnx", x[:1])
    for multiple in (1, 8):
        small = velcro.trim(model, plan, channel_multiple=multiple)
        path = velcro.export_onnx(small, tmp_path / f"trimmed{multiple}.onnx", x[:1])
        assert_onnxruntime_agrees(small, path, x)
        assert_onnxruntime_agrees(velcro.apply(model, plan), path, x)
        assert_static(path, original, small)
        assert velcro.cost(small, x[:1]).macs < velcro.cost(model, x[:1]).macs


def test_trimmed_resnet18_exports(tmp_path):
    model = randomize_batchnorm(velcro.models.create("resnet18", num_classes=10)).eval()
    shape = (3, 64, 64)
    stats = velcro.calibrate(model, images(shape, 4), progress=False)
    plan = velcro.plan(stats, 0.3, granularity="channel")
    small = velcro.trim(model, plan)
    x = images(shape, 3, seed=2)[0]
    path = velcro.export_onnx(small, tmp_path / "resnet18.onnx", x[:1])
    assert_onnxruntime_agrees(small, path, x)
    assert_onnxruntime_agrees(velcro.apply(model, plan), path, x)
    original = velcro.export_onnx(model, tmp_path / "original.onnx", x[:1])
    assert_static(path, original, small)
    graph = graph_of(path)
    convs = [node for node in graph.node if node.op_type == "Conv"]
    # batch-norms folded, no convolution left out; one 1x1 placement per identity shortcut
    # (5 in ResNet-18) whose two sides hold different channels
    assert len(convs) == 20 + conv_placements(small)
    assert conv_placements(small) <= 5
    # the three downsampling blocks add their two bias maps as one constant
    maps = sum(isinstance(getattr(m, "bias_map", None), torch.Tensor) for m in small.modules())
    adds = Counter(node.op_type for node in graph.node)["Add"]
    assert adds == 8 + maps - 3


def kill_channels(model: nn.Module, share: float = 0.3) -> nn.Module:
    """Channels whose batch-norm bias is so negative that ReLU always gives 0."""
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.bias[torch.rand(module.num_features, generator=gen) < share] = -1e4
    return model


def test_without_bias_maps_or_placements_the_trimmed_graph_is_no_larger(tmp_path):
    model, shape = build("chain")
    kill_channels(model)
    stats = velcro.calibrate(model, images(shape, 8), progress=False)
    plan = velcro.plan(stats, 0.2, granularity="channel")
    small = velcro.trim(model, plan, channel_multiple=1)
    assert placement_budget(small) == 0  # dead channels are constants 0: nothing to add
    x = images(shape, 4, seed=1)[0]
    original = velcro.export_onnx(model, tmp_path / "original.onnx", x[:1])
    trimmed = velcro.export_onnx(small, tmp_path / "trimmed.onnx", x[:1])
    assert_onnxruntime_agrees(small, trimmed, x)
    assert len(graph_of(trimmed).node) <= len(graph_of(original).node)
    assert velcro.cost(small, x[:1]).macs < velcro.cost(model, x[:1]).macs


def test_channel_placement_and_materialize_export_statically(tmp_path):
    model = Misaligned().eval()
    shape = (3, 6, 6)
    stats = velcro.calibrate(model, images(shape, 16), progress=False)
    plan = velcro.plan(stats, [0.5, 0.25, 0.5], granularity="channel")
    small = velcro.trim(model, plan, channel_multiple=1)
    kinds = {type(m).__name__ for m in small.modules()}
    assert {"Materialize", "ChannelSum"} <= kinds  # the placement paths are exercised
    x = images(shape, 4, seed=1)[0]
    path = velcro.export_onnx(small, tmp_path / "small.onnx", x[:1])
    assert_onnxruntime_agrees(small, path, x)
    assert_onnxruntime_agrees(velcro.apply(model, plan), path, x)
    original = velcro.export_onnx(model, tmp_path / "original.onnx", x[:1])
    assert_static(path, original, small)


class Attention(nn.Module):
    """Multi-head self-attention as timm writes it: optional mask and causal flag."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, is_causal=False):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class TinyViT(nn.Module):
    """Patches, one attention block, an MLP, a head; forward has non-tensor defaults."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.attn = Attention()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, classes)

    def forward(self, x, attn_mask=None, is_causal=False):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = x + self.attn(x, attn_mask, is_causal)
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(1))


def test_an_attention_model_exports_as_given_and_traced(tmp_path):
    torch.manual_seed(0)
    model = TinyViT().eval()
    shape = (3, 16, 16)
    traced = velcro.graph.trace(model)  # velcro's capture binds non-tensor defaults
    assert [n.name for n in traced.graph.nodes if n.op == "placeholder"] == ["x"]
    pretraced = torch.fx.GraphModule(model, torch.fx.Tracer().trace(model))  # plain fx keeps
    placeholders = [n.name for n in pretraced.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x", "attn_mask", "is_causal"]  # what broke the old exporter
    stats = velcro.calibrate(model, images(shape, 8), progress=False)
    plan = velcro.plan(stats, 0.4, granularity="channel")
    x = images(shape, 3, seed=1)[0]
    variants = {"eager": model, "traced": traced, "pretraced": pretraced,
                "applied": velcro.apply(model, plan),
                "trimmed": velcro.trim(model, plan, input_shape=shape, channel_multiple=1)}
    for kind, variant in variants.items():
        path = velcro.export_onnx(variant, tmp_path / f"{kind}.onnx", x[:1])
        assert [i.name for i in graph_of(path).input] == ["input"]  # is_causal is no input
        assert_onnxruntime_agrees(variant, path, x)


def test_fixed_batch_and_failures_leave_no_file(tmp_path):
    model, shape = build("chain")
    x = images(shape, 2)[0]
    path = velcro.export_onnx(model, tmp_path / "fixed.onnx", x, dynamic_batch=False)
    dims = graph_of(path).input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 2
    with pytest.raises(VelcroError, match="does not exist"):
        velcro.export_onnx(model, tmp_path / "missing" / "m.onnx", x)
    with pytest.raises(VelcroError, match=r"Chain does not run on example_input of shape "
                       r"\[1, 5, 12, 12\]: Given groups=1.*to have 3 channels") as failure:
        velcro.export_onnx(model, tmp_path / "bad.onnx", torch.zeros(1, 5, 12, 12))
    assert "opset" not in str(failure.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx"]


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # a Python decision on a value: torch.export cannot capture it
            return y.relu()
        return -y


def test_failures_name_their_cause_and_hint_at_the_opset_only_when_it_is_the_cause(
        tmp_path, capfd):
    with pytest.raises(VelcroError) as failure:
        velcro.export_onnx(Branchy().eval(), tmp_path / "b.onnx", torch.randn(1, 3, 8, 8))
    message = str(failure.value)
    assert message.startswith("cannot export Branchy to ONNX: torch.export cannot capture it")
    assert "data-dependent" in message and "opset" not in message and "\n" not in message
    model, shape = build("chain")
    with pytest.raises(VelcroError, match="at opset 7: .* try opset=18"):
        velcro.export_onnx(model, tmp_path / "old.onnx", images(shape, 1)[0], opset=7)
    assert list(tmp_path.iterdir()) == []
    out, err = capfd.readouterr()
    assert "def forward" not in out + err  # the exporter's graph dumps stay quiet


class Disagrees(nn.Module):
    """Computes something else when exported (what a check must catch)."""

    def forward(self, x):
        return x + 1 if torch.compiler.is_exporting() else x


def test_a_file_onnxruntime_disagrees_with_is_not_written(tmp_path):
    x = torch.randn(1, 3)
    with pytest.raises(VelcroError, match="onnxruntime's outputs differ from PyTorch's by 1"):
        velcro.export_onnx(Disagrees(), tmp_path / "d.onnx", x)
    assert list(tmp_path.iterdir()) == []
    path = velcro.export_onnx(Disagrees(), tmp_path / "d.onnx", x, check=False)
    assert path.is_file()


def test_training_flags_are_restored(tmp_path):
    model, shape = build("chain")
    model.train()
    model.bn1.eval()
    velcro.export_onnx(model, tmp_path / "m.onnx", images(shape, 1)[0][:1])
    assert model.training and model.conv1.training and not model.bn1.training

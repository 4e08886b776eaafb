import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo import TOPOLOGIES, build, images, randomize_batchnorm

import velcro
from velcro.errors import VelcroError


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


class Misaligned(nn.Module):
    """A residual sum whose sides compute different channels, and a transposed output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        a = F.relu(self.a(x))
        b = F.relu(self.b(x))
        s = F.relu(self.c(a) + b)
        return (s - a).transpose(1, 3).flatten(1)


def test_channel_placement_exports(tmp_path):
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
    graph = onnx.load(str(path)).graph
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert len(convs) == 20  # batch-norms folded, no convolution left out


def test_fixed_batch_and_failures_leave_no_file(tmp_path):
    model, shape = build("chain")
    x = images(shape, 2)[0]
    path = velcro.export_onnx(model, tmp_path / "fixed.onnx", x, dynamic_batch=False)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 2
    with pytest.raises(VelcroError, match="does not exist"):
        velcro.export_onnx(model, tmp_path / "missing" / "m.onnx", x)
    with pytest.raises(VelcroError, match="cannot export"):
        velcro.export_onnx(model, tmp_path / "bad.onnx", torch.zeros(1, 5, 12, 12))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx"]

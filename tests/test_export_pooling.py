"""Exporting a trimmed model that pools to a size other than 1 (timm's VGG head pools a 2x2
map up to 7x7 at small inputs): the constants trimming folds into the consumer of the pool
leave the pool as it is, and the export runs in onnxruntime like the original's (torch
decomposes ``adaptive_avg_pool2d`` into gathers and reductions in both graphs alike)."""

import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo import images

import velcro
from velcro.errors import VelcroWarning
from velcro.export import DATA_DEPENDENT_OPS


class PooledTo(nn.Module):
    """conv > relu > adaptive_avg_pool2d(output_size) > conv > relu > mean > linear."""

    def __init__(self, output_size: tuple[int, int]) -> None:
        super().__init__()
        self.output_size = output_size
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.fc1 = nn.Conv2d(8, 8, 3)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.act(self.conv(x)), self.output_size)
        return self.head(self.act2(self.fc1(x)).mean((2, 3)))


def run(path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize(("output_size", "size"), [((3, 5), 6), ((4, 4), 6), ((7, 7), 2)],
                         ids=["uneven", "even", "upwards"])
def test_trimmed_model_pooling_to_a_size_exports(tmp_path, output_size, size):
    torch.manual_seed(0)
    model = PooledTo(output_size).eval()
    shape = (3, size, size)
    stats = velcro.calibrate(model, images(shape, 8), progress=False)
    plan = velcro.plan(stats, 0.3, granularity="channel")
    assert plan.sites["act"].units.numel() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VelcroWarning)
        small = velcro.trim(model, plan, channel_multiple=1)
    assert small.get_submodule("conv").out_channels < 8  # trimmed before the pool
    x = images(shape, 4, seed=2)[0]
    with torch.no_grad():
        want = velcro.apply(model, plan)(x)
        assert float((small(x) - want).abs().max()) <= 1e-5 * float(want.abs().max())
    original = velcro.export_onnx(model, tmp_path / "original.onnx", x[:1])
    trimmed = velcro.export_onnx(small, tmp_path / "trimmed.onnx", x[:1])
    np.testing.assert_allclose(run(trimmed, x), want.numpy(), rtol=1e-4, atol=1e-5)
    ops = Counter(n.op_type for n in onnx.load(str(trimmed)).graph.node)
    original_ops = Counter(n.op_type for n in onnx.load(str(original)).graph.node)
    # the same pooling as the original's; only the consumer's bias map is added
    assert ops - original_ops == Counter({"Add": 1}), ops - original_ops
    assert {op: ops[op] for op in DATA_DEPENDENT_OPS if ops[op]} == {
        op: original_ops[op] for op in DATA_DEPENDENT_OPS if original_ops[op]}

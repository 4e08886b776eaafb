"""Capture beyond symbolic torch.fx (issue 17): control flow on shapes and TensorFlow padding
are captured at the example's size and checked there; module subclasses with their own
forward are traced into, never taken for their base class; sites are found behind fused
norm-activation blocks and before pre-activation norms."""

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from patterns import BatchNormAct, ConvSame, ShiftedReLU, build_pattern
from zoo import images

import velcro
from velcro.errors import VelcroError
from velcro.graph.capture import CAPTURE_SHAPE, CaptureShapeError


def test_control_flow_on_shapes_is_captured_at_the_example_size():
    model, shape = build_pattern("shape_reads")
    with pytest.raises(VelcroError, match="example_inputs"):  # symbolic fx alone cannot
        velcro.trace(model)
    x = images(shape, 3, seed=1)[0]
    gm = velcro.trace(model, x[:1])
    assert getattr(gm, CAPTURE_SHAPE) == shape
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)
        # the branch taken at 6x6 (interpolate to 8x8) is what the graph computes
        assert any(n.target is torch.nn.functional.interpolate for n in gm.graph.nodes)


def test_a_captured_graph_refuses_another_size():
    model, shape = build_pattern("shape_reads")
    gm = velcro.trace(model, images(shape, 1)[0])
    other = images((3, 10, 10), 1)[0]
    with pytest.raises(CaptureShapeError, match=r"captured at input size 3x6x6.*got 3x10x10"):
        gm(other)


def test_tf_same_padding_is_captured_and_exact():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = ConvSame(3, 8, 3, stride=2)

        def forward(self, x):
            return torch.relu(self.conv(x))

    torch.manual_seed(0)
    model = Net().eval()
    x = images((3, 11, 11), 2)[0]  # odd size: the TF pads are asymmetric
    gm = velcro.trace(model, x[:1])
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)
    assert [s.producer for s in velcro.find_sites(gm)] == ["conv"]


def test_control_flow_on_values_still_names_the_module():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(VelcroError, match=r"'<root>'.*Branchy.*shapes were not the cause"):
        velcro.trace(Branchy(), torch.ones(1, 3, 4, 4))


def test_sites_behind_fused_norm_activation_and_before_pre_activation_norms():
    gm = velcro.trace(build_pattern("timm_blocks")[0], images((3, 12, 12), 1)[0])
    sites = velcro.find_sites(gm)
    assert {s.kind for s in sites} >= {"relu", "leaky_relu", "silu"}
    assert [s.producer for s in sites][:3] == ["stem", "conv2", "grouped"]
    gm = velcro.trace(build_pattern("pre_activation")[0])
    assert [s.producer for s in velcro.find_sites(gm)] == ["stem", "conv1"]


class KeepLeaves(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, (BatchNormAct, ShiftedReLU)) or super().is_leaf_module(m, qualname)


def test_a_pretraced_model_with_subclass_leaves_is_traced_into():
    model, shape = build_pattern("subclasses")
    pretraced = fx.GraphModule(model, KeepLeaves().trace(model))
    assert any(n.op == "call_module" and n.target == "bnact" for n in pretraced.graph.nodes)
    gm = velcro.trace(pretraced)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "bnact" not in called and "act" not in called and "bnact.act" in called
    x = images(shape, 2)[0]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)
    # ShiftedReLU (relu(x - 0.5)) is not a relu: no site at it
    assert "act" not in {s.name for s in velcro.find_sites(gm)}

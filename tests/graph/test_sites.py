import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo import TOPOLOGIES, build

import velcro
from velcro.errors import VelcroError


def names(model):
    return [s.name for s in velcro.find_sites(velcro.trace(model))]


def test_reused_module_is_one_site_per_call():
    model, _ = build("residual")
    assert names(model) == ["relu:0", "relu:1", "relu:2", "relu:3"]
    sites = velcro.find_sites(velcro.trace(model))
    assert [s.producer for s in sites] == ["stem", "conv1", "conv2", "conv3"]
    assert len({s.node for s in sites}) == 4


def test_functional_sites_are_named_by_their_module():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)), inplace=True)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.branch = nn.Sequential(Inner())
            self.other = Inner()

        def forward(self, x):
            return self.other(self.branch(x)[:, :3])

    assert names(Outer()) == ["branch.0.relu", "other.relu"]


def test_all_activation_kinds_found():
    kinds = {}
    for name in TOPOLOGIES:
        model, _ = build(name)
        for site in velcro.find_sites(velcro.trace(model)):
            kinds[site.kind] = kinds.get(site.kind, 0) + 1
    assert set(kinds) == {"relu", "relu6", "silu", "gelu", "hardswish"}


def test_activation_not_fed_by_conv_or_linear_is_no_site():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            x = F.relu(x)  # acts on the input, no producer
            # channels moved to the last axis, a gate: not sites
            y = torch.relu(self.conv(x).permute(0, 2, 3, 1))
            return torch.sigmoid(self.conv(y.permute(0, 3, 1, 2)))

    assert names(Net()) == []


def test_channel_axis_after_linear_is_last():
    model, _ = build("chain")
    sites = velcro.find_sites(velcro.trace(model))
    assert [s.channel_axis for s in sites] == [0, 0, 0, -1]


def test_trace_does_not_touch_the_model():
    model, _ = build("chain")
    model.train()
    gm = velcro.trace(model)
    assert model.training and not gm.training
    assert gm.conv1 is not model.conv1


def test_untraceable_model_names_the_module():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.conv(x)
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 3, 1), Branchy())

        def forward(self, x):
            return self.body(x)

    with pytest.raises(VelcroError, match=r"body\.1.*Branchy"):
        velcro.trace(Net())


@pytest.mark.parametrize(
    "name, count, first, last",
    [
        ("resnet18", 17, "relu", "layer4.1.relu:1"),
        ("mobilenet_v2", 35, "features.0.2", "features.18.2"),
        ("googlenet", 57, "conv1.relu", "inception5b.branch4.1.relu"),
    ],
)
def test_builtin_model_sites(name, count, first, last):
    model = velcro.models.create(name)
    found = names(model)
    assert len(found) == count == len(set(found))
    assert found[0] == first and found[-1] == last


def test_resnet_block_relu_is_two_sites():
    sites = velcro.find_sites(velcro.trace(velcro.models.resnet18()))
    block = [s for s in sites if s.name.startswith("layer1.0.relu")]
    assert [s.name for s in block] == ["layer1.0.relu:0", "layer1.0.relu:1"]
    assert [s.producer for s in block] == ["layer1.0.conv1", "layer1.0.conv2"]

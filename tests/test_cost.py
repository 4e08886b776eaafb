import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo import build

import velcro
from velcro.errors import VelcroError


def test_chain_counts_match_a_hand_computation():
    model, shape = build("chain")
    cost = velcro.cost(model, torch.zeros(3, *shape))
    # conv1 3->8 k3 pad1 on 12x12; conv2 8->12 k3 stride2 pad1 -> 6x6; conv3 12->16 k3 -> 4x4;
    # fc1 16->10; fc2 10->5.
    macs = [8 * 12 * 12 * 3 * 9, 12 * 6 * 6 * 8 * 9, 16 * 4 * 4 * 12 * 9, 10 * 16, 5 * 10]
    assert cost.macs == sum(macs)
    assert [row.macs for row in cost.layers if row.macs] == macs
    assert cost.parameters == sum(p.numel() for p in model.parameters())
    assert cost.sites == {"act1": 8 * 144, "act2": 12 * 36, "act3": 16 * 16, "relu": 10}
    assert cost.activations == 8 * 144 + 12 * 36 + 16 * 16 + 10
    assert cost.input_shape == shape


class Functional(nn.Module):
    """Grouped functional convolution, a matmul, and a module called twice."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 2, 3, 3))
        self.proj = nn.Parameter(torch.randn(6 * 4 * 4, 7))
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.act(F.conv2d(x, self.weight, stride=2, padding=1, groups=2))
        x = self.act(x + 1.0)
        return x.flatten(1) @ self.proj


def test_functional_grouped_conv_matmul_and_shared_parameters():
    cost = velcro.cost(Functional(), torch.zeros(2, 4, 8, 8))
    assert cost.macs == 6 * 4 * 4 * 2 * 9 + 7 * 96
    assert cost.parameters == 6 * 2 * 9 + 96 * 7
    # the ReLU module called twice: two activation nodes, each 96 elements
    relus = [row for row in cost.layers if row.kind == "ReLU"]
    assert [row.elementwise for row in relus] == [96, 96]


@pytest.mark.parametrize(
    "name, published_gmacs, published_mparams",
    [("resnet18", 1.81, 11.69), ("mobilenet_v2", 0.30, 3.50), ("googlenet", 1.50, 6.62)],
)
def test_builtin_models_match_the_published_counts(name, published_gmacs, published_mparams):
    # googlenet's auxiliary heads are built but unused in eval mode: not counted.
    model = velcro.models.create(name)
    cost = velcro.cost(model, torch.zeros(1, 3, 224, 224))
    assert cost.macs / 1e9 == pytest.approx(published_gmacs, rel=0.02)
    assert cost.parameters / 1e6 == pytest.approx(published_mparams, rel=0.01)
    assert len(cost.sites) == len(velcro.find_sites(velcro.trace(model)))


def test_counts_are_per_image_and_reduction_compares_two_models():
    model, shape = build("residual")
    one = velcro.cost(model, torch.zeros(1, *shape))
    four = velcro.cost(model, torch.zeros(4, *shape))
    assert one.macs == four.macs and one.activations == four.activations
    half = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    full = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    x = torch.zeros(1, 3, 6, 6)
    reduction = velcro.cost(full, x).reduction(velcro.cost(half, x))
    assert reduction["macs"] == pytest.approx(0.5)
    assert reduction["mac_speedup"] == pytest.approx(2.0)
    assert reduction["activations"] == pytest.approx(0.5)
    assert reduction["parameters"] == pytest.approx(1 - (4 * 27 + 4) / (8 * 27 + 8))
    assert "| total |" in velcro.cost(full, x).table()


def test_an_input_the_model_rejects_is_a_velcro_error():
    model, _ = build("chain")
    with pytest.raises(VelcroError, match="does not run on an input of shape"):
        velcro.cost(model, torch.zeros(1, 5, 12, 12))
    with pytest.raises(VelcroError, match="batch tensor"):
        velcro.cost(model, torch.tensor(1.0))


def test_a_trimmed_models_bias_maps_count_as_elementwise_adds():
    model, shape = build("chain")
    stats = velcro.calibrate(model, [torch.randn(8, *shape)], progress=False)
    small = velcro.trim(model, velcro.plan(stats, 0.5, granularity="channel"), channel_multiple=1)
    cost = velcro.cost(small, torch.zeros(2, *shape))
    mapped = {name: module for name, module in small.named_modules()
              if hasattr(module, "bias_map")}
    assert mapped  # map constants and zero padding make position-dependent biases
    for row in cost.layers:
        if row.name in mapped:
            assert row.elementwise == mapped[row.name].bias_map.numel()
            in_channels = mapped[row.name].weight.shape[1]
            assert row.macs == row.elementwise * in_channels * 9


def test_a_trimmed_model_reports_its_sites_under_the_original_names():
    model, shape = build("chain")
    stats = velcro.calibrate(model, [torch.randn(8, *shape)], progress=False)
    plan = velcro.plan(stats, [0.25, 0.5, 0.5, 0.3], granularity="channel")
    small = velcro.trim(model, plan, channel_multiple=1)
    before = velcro.cost(model, torch.zeros(1, *shape)).sites
    after = velcro.cost(small, torch.zeros(1, *shape)).sites
    assert list(after) == list(before)
    for name, elements in before.items():
        site = plan.sites[name]
        live = site.channels - site.units.numel()
        assert after[name] == elements // site.channels * live

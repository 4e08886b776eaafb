import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo import TOPOLOGIES, build, images

import velcro
from velcro.errors import VelcroError


def masked(act, plan, name):
    """Replace the planned positions of one site's activation, by hand."""
    site = plan.sites[name]
    out = act.clone()
    if plan.granularity == "channel":
        for c in site.units.tolist():
            if site.channel_axis == 0:
                out[:, c] = site.constant[c]
            else:
                out[..., c] = site.constant[..., c]
    else:
        flat = out.view(out.shape[0], -1)
        flat[:, site.units] = site.constant.flatten()[site.units]
    return out


@torch.no_grad()
def hand_forward_chain(model, plan, x):
    a = masked(F.relu(model.bn1(model.conv1(x))), plan, "act1")
    a = masked(F.relu6(model.bn2(model.conv2(a))), plan, "act2")
    a = masked(F.silu(model.conv3(a)), plan, "act3")
    a = masked(F.relu(model.fc1(F.adaptive_avg_pool2d(a, 1).flatten(1))), plan, "relu")
    return model.fc2(a)


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_apply_matches_a_hand_built_masked_forward(granularity):
    model, shape = build("chain")
    stats = velcro.calibrate(model, images(shape, 24), progress=False)
    plan = velcro.plan(stats, [0.3, 0.5, 0.25, 0.4], granularity=granularity)
    applied = velcro.apply(model, plan)
    x = images(shape, 6, seed=5)[0]
    with torch.no_grad():
        expected = hand_forward_chain(model, plan, x)
        torch.testing.assert_close(applied(x), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(model(x), expected, atol=1e-4)


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_zero_thresholds_change_nothing_and_the_original_is_untouched(name):
    model, shape = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = velcro.calibrate(model, images(shape, 8), progress=False)
    x = images(shape, 4, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(velcro.apply(model, velcro.plan(stats, 0.0))(x), model(x))
        velcro.apply(model, velcro.plan(stats, 0.7, granularity="channel"))(x)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


class DeadChannels(nn.Module):
    """conv -> relu where two filters have zero weights: their outputs are constant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight[[1, 4]] = 0.0
            self.conv.bias[[1, 4]] = torch.tensor([0.7, 0.2])

    def forward(self, x):
        x = F.relu(self.conv(x))
        return self.conv2(x).mean(dim=(2, 3))


@pytest.mark.parametrize("constant", ["map", "scalar"])
def test_replacing_a_channel_that_is_constant_changes_no_output(constant):
    model = DeadChannels().eval()
    data = images((3, 8, 8), 16)
    stats = velcro.calibrate(model, data, progress=False)
    plan = velcro.plan(stats, {"relu": 2 / 6}, granularity="channel", constant=constant)
    assert plan.sites["relu"].units.tolist() == [1, 4]
    applied = velcro.apply(model, plan)
    with torch.no_grad():
        for batch in data:
            torch.testing.assert_close(applied(batch), model(batch), rtol=1e-5, atol=1e-5)


def test_plan_of_another_model_is_refused():
    model, shape = build("chain")
    plan = velcro.plan(velcro.calibrate(model, images(shape, 4), progress=False), 0.2)
    with pytest.raises(VelcroError, match="another model"):
        velcro.apply(build("residual")[0], plan)
    with pytest.raises(VelcroError, match="other weights"):
        velcro.apply(build("chain", seed=4)[0], plan)

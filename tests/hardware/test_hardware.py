import math

import pytest
import torch
from zoo import build, images

import velcro
from velcro.errors import VelcroError
from velcro.hardware import HardwareConfig, conv_layer, estimate, layer_shapes
from velcro.plan import SitePlan

FRACTIONS = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9]


def random_mask(shape, fraction, seed=0):
    """A bool mask with exactly round(fraction * numel) True elements."""
    gen = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=gen)[: round(fraction * numel)]] = True
    return mask.view(shape)


def test_the_papers_module_by_hand():
    # 16 modules, one 3x3 window (9 MACs) per cycle: a 64x64 map costs 4096 / 16 cycles.
    layer = {"m": conv_layer("m", 1, 1, 64, 3)}
    mac, read, write, control, bit = 4.6, 5.0, 5.0, 1.0, 5.0 / 32
    for fraction in FRACTIONS:
        skipped = round(fraction * 4096)
        cost = estimate(layer, {"m": random_mask((1, 64, 64), fraction)})
        assert cost.cycles == pytest.approx((4096 - skipped) / 16, rel=1e-12)
        energy_pj = ((4096 - skipped) * (9 * (mac + read) + write)
                     + skipped * (read + write + control) + 4096 * bit)
        assert cost.energy_uj == pytest.approx(energy_pj * 1e-6, rel=1e-12)
        assert cost.seconds == pytest.approx((4096 - skipped) / 16 / 300e6, rel=1e-12)


@pytest.mark.parametrize("channels", [1, 64])
def test_throughput_grows_as_one_over_one_minus_c_and_energy_falls_linearly(channels):
    layer = {"m": conv_layer("m", channels, channels, 64, 3)}
    base = estimate(layer, {"m": torch.zeros(channels, 64, 64, dtype=torch.bool)})
    points = []
    for seed, fraction in enumerate(FRACTIONS):
        cost = estimate(layer, {"m": random_mask((channels, 64, 64), fraction, seed)})
        c = cost.saving_ratio
        assert c == pytest.approx(fraction, abs=1e-3)
        assert cost.relative_to(base)["throughput"] == pytest.approx(1 / (1 - c), rel=1e-12)
        points.append((c, cost.energy_uj))
    # Energy is affine in C: every point lies on the line through the first and the last.
    (c0, e0), (c1, e1) = points[0], points[-1]
    slope = (e1 - e0) / (c1 - c0)
    assert slope < 0
    for c, energy in points:
        assert energy == pytest.approx(e0 + slope * (c - c0), rel=1e-12)
    # The slope by hand: each skipped output saves its compute energy, costs its skip energy.
    k = channels * 9
    outputs = channels * 4096
    by_hand = -outputs * (k * (4.6 + 5.0) + 5.0 - (5.0 + 5.0 + 1.0)) * 1e-6
    assert slope == pytest.approx(by_hand, rel=1e-9)


def test_overheads_bend_the_throughput_law_but_energy_stays_linear():
    config = HardwareConfig(skip_cycles=0.25, layer_overhead_cycles=100, static_power_w=2.0)
    layer = {"m": conv_layer("m", 64, 64, 64, 3)}
    cycles_per_output = math.ceil(64 * 9 / 9)
    energies = []
    for seed, fraction in enumerate([0.0, 0.3, 0.6, 0.9]):
        mask = random_mask((64, 64, 64), fraction, seed)
        skipped = int(mask.sum())
        cost = estimate(layer, {"m": mask}, config)
        hand = ((64 * 4096 - skipped) * cycles_per_output + skipped * 0.25) / 16 + 100
        assert cost.cycles == pytest.approx(hand, rel=1e-12)
        assert cost.layers[0].energy_parts["static"] == pytest.approx(
            2.0 * hand / 300e6 * 1e12, rel=1e-12)
        energies.append((skipped, cost.energy_uj))
        if fraction:
            base = estimate(layer, None, config)
            assert cost.relative_to(base)["throughput"] < 1 / (1 - cost.saving_ratio)
    slopes = [(e - energies[0][1]) / s for s, e in energies[1:]]
    assert max(slopes) == pytest.approx(min(slopes), rel=1e-9)


def test_the_channel_schedule_departs_from_the_law_for_uneven_masks():
    layer = {"m": conv_layer("m", 32, 32, 16, 3)}
    base = estimate(layer, None, schedule="channels")
    uneven = estimate(layer, {"m": random_mask((32, 16, 16), 0.5, 1)}, schedule="channels")
    assert uneven.relative_to(base)["throughput"] < 1 / (1 - uneven.saving_ratio)
    # Half of every channel compressed: each module's load halves, the law holds again.
    even = torch.zeros(32, 16, 16, dtype=torch.bool)
    even[:, :8] = True
    speedup = estimate(layer, {"m": even}, schedule="channels").relative_to(base)["throughput"]
    assert speedup == pytest.approx(2.0, rel=1e-12)


def test_layer_shapes_agree_with_the_mac_count_of_velcro_cost():
    model = velcro.models.resnet18()
    shapes = layer_shapes(model, (3, 224, 224))
    assert len(shapes) == 17
    assert shapes["relu"].output_shape == (64, 112, 112)
    assert shapes["relu"].macs_per_output == 3 * 7 * 7
    counted = {layer.name: layer.macs for layer in velcro.cost(
        model, torch.zeros(1, 3, 224, 224)).layers}
    producers = {site.name: site.producer for site in velcro.find_sites(velcro.trace(model))}
    total = estimate(shapes)
    for layer in total.layers:
        assert layer.macs == counted[producers[layer.name]]


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_a_plan_of_a_model_costs_what_its_masks_say(granularity):
    model, shape = build("chain")
    stats = velcro.calibrate(model, images(shape, 16), progress=False)
    plan = velcro.plan(stats, [0.3, 0.5, 0.25, 0.4], granularity=granularity)
    shapes = layer_shapes(model, shape)
    assert set(shapes) == set(plan.sites)  # the linear site "relu" included
    cost = estimate(shapes, plan)
    assert cost.saving_ratio == pytest.approx(plan.saving_ratio, rel=1e-12)
    masks = {name: plan.mask(name) for name in plan.sites}
    by_masks = estimate(shapes, masks)
    assert cost.cycles == pytest.approx(by_masks.cycles, rel=1e-12)
    if granularity == "channel":  # no per-element mask or control logic for whole filters
        assert cost.energy_uj < by_masks.energy_uj
    else:
        assert cost.energy_uj == pytest.approx(by_masks.energy_uj, rel=1e-12)
    assert cost.images_per_second > estimate(shapes).images_per_second


def test_channel_plans_load_only_live_filters():
    layer = {"m": conv_layer("m", 8, 8, 4, 3)}
    site = SitePlan(0.25, torch.tensor([0, 1]), torch.zeros(8, 4, 4), (8, 4, 4))
    plan = velcro.Plan("channel", {"m": site}, "", "")
    cost = estimate(layer, plan, load_energy_pj=10.0)
    assert cost.layers[0].energy_parts["load"] == pytest.approx(
        (8 * 16 + 6 * 8 * 9) * 10.0)


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(VelcroError, match="schedule"):
        HardwareConfig(schedule="greedy")
    with pytest.raises(VelcroError, match="modules"):
        HardwareConfig(modules=0)
    layer = {"m": conv_layer("m", 1, 2, 8, 3)}
    with pytest.raises(VelcroError, match="site 'm'"):
        estimate(layer, {"m": torch.zeros(2, 8, 7, dtype=torch.bool)})

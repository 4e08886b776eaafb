import json

import pytest
import torch

import velcro
from velcro.errors import VelcroError
from velcro.stats import SiteStats, Stats


def hand_stats():
    """Two conv sites and one linear site with known means and variances."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (4, 3, 3), "b": (6, 2, 2), "c": (10,)}
    sites = {}
    for name, shape in shapes.items():
        mean = torch.randn(shape, generator=gen, dtype=torch.float64)
        variance = torch.rand(shape, generator=gen, dtype=torch.float64)
        sites[name] = SiteStats(5, mean, variance * 5, -1 if name == "c" else 0)
    # channel 2 of "a" is the most constant; channel 0 of "b" the next
    sites["a"].m2[2] = 0.0
    sites["b"].m2[0] *= 0.01
    return Stats(sites, structure="s", weights="w")


def test_saving_ratio_by_hand():
    stats = hand_stats()
    p = velcro.plan(stats, {"a": 0.25, "b": 0.5, "c": 0.3}, granularity="channel")
    # a: 1 of 4 channels x 9; b: 3 of 6 channels x 4; c: 3 of 10 units
    assert p.saving_ratio == pytest.approx((1 * 9 + 3 * 4 + 3) / (36 + 24 + 10))
    e = velcro.plan(stats, [0.5, 0.25, 1.0], granularity="element")
    # a: round(18) of 36; b: 6 of 24; c: 10 of 10
    assert e.saving_ratio == pytest.approx((18 + 6 + 10) / 70)
    assert velcro.plan(stats, 0.0).saving_ratio == 0.0
    assert velcro.plan(stats, 1.0, granularity="channel").saving_ratio == 1.0


def test_element_plan_takes_the_lowest_variances_and_their_means():
    stats = hand_stats()
    p = velcro.plan(stats, {"b": 0.25}, granularity="element")
    variance = stats["b"].variance.flatten()
    expected = sorted(variance.argsort()[:6].tolist())
    assert p.sites["b"].units.tolist() == expected
    mask = p.mask("b")
    assert int(mask.sum()) == 6
    torch.testing.assert_close(p.sites["b"].constant[mask],
                               stats["b"].mean[mask].to(torch.float32))
    assert p.sites["a"].units.numel() == 0


def test_channel_plan_ranks_by_mean_variance_and_keeps_the_mean_map():
    stats = hand_stats()
    p = velcro.plan(stats, {"a": 0.25, "b": 1 / 6}, granularity="channel")
    assert p.sites["a"].units.tolist() == [2]
    scores = stats["b"].variance.mean(dim=(1, 2))
    assert p.sites["b"].units.tolist() == [int(scores.argmin())] == [0]
    torch.testing.assert_close(p.sites["a"].constant[2], stats["a"].mean[2].float())
    assert torch.all(p.sites["a"].constant[[0, 1, 3]] == 0)
    assert p.mask("a")[2].all() and not p.mask("a")[[0, 1, 3]].any()


def test_scalar_constants_are_channel_means():
    stats = hand_stats()
    p = velcro.plan(stats, {"a": 0.25}, granularity="channel", constant="scalar")
    constant = p.sites["a"].constant[2]
    assert torch.allclose(constant, torch.full_like(constant, float(stats["a"].mean[2].mean())))


def test_relative_score_is_scale_free():
    stats = hand_stats()
    site = stats["a"]
    site.m2[2] = 1.0  # no longer zero variance
    # scale channel 1 down: its variance becomes tiny but not relative to its mean
    site.mean[1] *= 1e-3
    site.m2[1] *= 1e-6
    by_variance = velcro.plan(stats, {"a": 0.25}, granularity="channel")
    by_relative = velcro.plan(stats, {"a": 0.25}, granularity="channel", score="relative")
    assert by_variance.sites["a"].units.tolist() == [1]
    ratio = site.variance.sum(dim=(1, 2)) / site.mean.square().sum(dim=(1, 2))
    assert by_relative.sites["a"].units.tolist() == [int(ratio.argmin())]


def test_linear_site_channels_are_units():
    stats = hand_stats()
    p = velcro.plan(stats, {"c": 0.2}, granularity="channel")
    expected = sorted(stats["c"].variance.argsort()[:2].tolist())
    assert p.sites["c"].units.tolist() == expected


@pytest.mark.parametrize(
    "thresholds, message",
    [
        (1.5, "out of range"),
        (-0.1, "out of range"),
        ({"a": float("nan")}, "out of range"),
        ([0.1, 0.2], "got 2 thresholds for 3 sites"),
        ({"nope": 0.1}, "unknown site 'nope'"),
        ("0.3", "must be a fraction"),
    ],
)
def test_bad_thresholds(thresholds, message):
    with pytest.raises(VelcroError, match=message):
        velcro.plan(hand_stats(), thresholds)


def test_bad_options():
    with pytest.raises(VelcroError, match="granularity"):
        velcro.plan(hand_stats(), 0.1, granularity="filter")
    with pytest.raises(VelcroError, match="score"):
        velcro.plan(hand_stats(), 0.1, score="l1")


def test_save_load_round_trip_is_readable(tmp_path):
    p = velcro.plan(hand_stats(), {"a": 0.5, "b": 0.5}, granularity="channel")
    path = tmp_path / "plan.json"
    p.save(path)
    document = json.loads(path.read_text())
    assert document["granularity"] == "channel"
    assert document["saving_ratio"] == pytest.approx(p.saving_ratio)
    assert document["sites"][0]["channels"] == p.sites["a"].units.tolist()
    loaded = velcro.Plan.load(path)
    assert loaded.saving_ratio == pytest.approx(p.saving_ratio)
    for name in p.sites:
        assert torch.equal(loaded.sites[name].units, p.sites[name].units)
        assert torch.equal(loaded.sites[name].constant, p.sites[name].constant)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["plan.json", "plan.json.safetensors"]


def test_load_rejects_a_non_plan(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("[1, 2]")
    with pytest.raises(VelcroError, match="is not a velcro plan"):
        velcro.Plan.load(path)

"""search with affine constants: the ridge chosen on the search split, never below the mean."""

import math

import pytest
import torch
from tinytask import one_thread, trained_task
from trim.test_trim import big_model

import velcro
from velcro.search import UNGUARDED, SearchSchedule, search
from velcro.search._candidates import Rankings
from velcro.search._evaluator import CandidateEvaluator
from velcro.trim._affine import affine_sites

SCHEDULE = SearchSchedule(levels=4, refine_rounds=1)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def task():
    task = dict(trained_task())
    task["stats"] = velcro.calibrate(task["model"], task["calibration"], progress=False,
                                     covariance=True)
    return task


def run(task, **options):
    """The search without guard or check unless asked (top-1 point estimate on every search
    image): what these tests compare exactly; the guarded search has its own test."""
    return search(task["model"], task["stats"], task["search"], granularity="channel",
                  schedule=SCHEDULE, progress=False, **{**UNGUARDED, **options})


def test_an_infinite_ridge_searches_exactly_like_mean_maps(task):
    mean = run(task, constant="map")
    affine = run(task, constant="affine", ridge=math.inf)
    assert affine.thresholds == mean.thresholds
    assert [(r["accuracy"], r["loss"]) for r in affine.trajectory] == \
        [(r["accuracy"], r["loss"]) for r in mean.trajectory]
    assert all(s.coefficients is None for s in affine.plan.sites.values())


def test_the_ridge_is_chosen_on_the_search_split_and_never_saves_less_than_the_mean(task):
    mean = run(task, constant="map")
    result = run(task, constant="affine")  # per-site ridges, then compared with mean maps
    trials = result.settings["ridge_trials"]
    assert [t["ridge"] for t in trials] == ["inf", "site"]
    assert trials[0]["objective_value"] == mean.objective_value
    assert result.objective_value == max(t["objective_value"] for t in trials)
    assert result.objective_value >= mean.objective_value
    assert result.evaluations == sum(t["evaluations"] for t in trials)
    assert result.plan.constant_kind == ("affine" if trials[1]["objective_value"]
                                         > mean.objective_value else "map")
    grid = run(task, constant="affine", ridge="grid")
    trials = grid.settings["ridge_trials"]
    assert [t["ridge"] for t in trials] == ["inf", 1.0, 0.1, 0.01]
    assert trials[0]["objective_value"] == mean.objective_value
    assert grid.objective_value == max(t["objective_value"] for t in trials)
    chosen = grid.settings["ridge"]
    assert chosen == next(t["ridge"] for t in trials  # ties go to the stronger ridge
                          if t["objective_value"] == grid.objective_value)
    site = run(task, constant="affine", ridge="site")
    assert site.settings["ridge"] == "site" and site.plan.ridge is None
    assert set(site.plan.info["ridges"]) <= set(task["stats"].names)
    for plan in (site.plan, grid.plan):
        # what the search measured is what the reference semantics compute; trim agrees
        model, data = task["model"], task["search"]
        after = velcro.evaluate(velcro.apply(model, plan), data, progress=False)
        assert after.correct >= velcro.evaluate(model, data, progress=False).correct
        x = data[0][0][:16]
        with torch.no_grad():
            expected = velcro.apply(model, plan)(x)
            got = velcro.trim(model, plan)(x)
        assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    assert site.search_accuracy == velcro.evaluate(velcro.apply(model, site.plan), data,
                                                   progress=False).accuracy


def test_a_search_goes_on_from_its_start(task):
    mean = run(task, constant="map", tolerance=0.03)
    assert mean.objective_value > 0
    started = run(task, constant="map", start=mean.thresholds, tolerance=0.03)
    names = task["stats"].names
    rankings = Rankings(task["stats"], "channel")
    doubled = rankings.counts([min(1.0, 2 * mean.thresholds[n]) for n in names])
    starts = [r for r in started.trajectory if r["phase"] == "start"]
    assert starts and rankings.counts(starts[0]["thresholds"]) == doubled  # the far end first
    assert started.objective_value >= mean.objective_value  # the start itself is feasible
    for row in starts:  # every point is the start scaled up (sites it left alone stay so)
        assert all(t == 0 for t, n in zip(row["thresholds"], names, strict=True)
                   if mean.thresholds[n] == 0)


def test_the_evaluator_computes_the_affine_reference(task):
    model, stats, data = task["model"], task["stats"], task["search"]
    rankings = Rankings(stats, "channel", "residual", "affine", ridge=0.0)
    evaluator = CandidateEvaluator(model, rankings, data, cache_mb=64)
    for fractions in ([0.5, 0.25, 0.75, 0.5], [0.25, 0.5, 0.0, 0.75], [0.5, 0.25, 0.75, 0.25]):
        counts = rankings.counts(fractions)
        plan = rankings.plan(fractions, counts)
        assert any(s.coefficients is not None for s in plan.sites.values())
        outcome, _ = evaluator.evaluate(counts, reuse_from=2)
        reference = velcro.evaluate(velcro.apply(model, plan), data, progress=False)
        assert outcome.correct == reference.correct
        direct = velcro.plan(stats, dict(zip(rankings.names, fractions, strict=True)),
                             granularity="channel", score="residual", constant="affine",
                             ridge=0.0)
        for name in stats.names:  # Rankings' plans are velcro.plan's
            assert torch.equal(direct.sites[name].units, plan.sites[name].units)
            torch.testing.assert_close(direct.sites[name].coefficients,
                                       plan.sites[name].coefficients)


def test_predictions_go_where_they_fold_or_cost_little():
    resnet = affine_sites(big_model("resnet18"))
    # inside blocks the prediction folds into conv2; block outputs are computed for the sum
    # (64 MACs against 576 per position and channel); the fc's input is pooled first
    assert {"layer1.0.relu:0", "layer1.0.relu:1", "layer4.1.relu:0", "layer4.1.relu:1"} <= resnet
    assert "relu" not in resnet  # the stem feeds a max-pool: 64 against 3 x 7 x 7 = 147
    mobilenet = big_model("mobilenet_v2")
    sites = velcro.find_sites(velcro.trace(mobilenet))
    chosen = affine_sites(mobilenet)
    # the depthwise outputs fold into the 1x1 projections; the expansions feeding the
    # depthwise convolutions would cost more to predict than their filters
    assert "features.1.conv.0.2" in chosen and "features.2.conv.1.2" in chosen
    assert "features.2.conv.0.2" not in chosen
    assert len(chosen) < len(sites)


def test_affine_searches_check_their_inputs_before_searching(task):
    plain = velcro.calibrate(task["model"], task["calibration"], progress=False)
    with pytest.raises(velcro.VelcroError, match="covariance=True"):
        search(task["model"], plain, task["search"], granularity="channel", constant="affine",
               progress=False)
    with pytest.raises(velcro.VelcroError, match="channel plans"):
        search(task["model"], task["stats"], task["search"], constant="affine", progress=False)
    with pytest.raises(velcro.VelcroError, match="ridge 'wide'"):
        run(task, constant="affine", ridge="wide")


def test_affine_searches_keep_the_guard_and_the_check(task):
    # the library's defaults: the confidence bound and the check on held-back images hold
    # for each trial, and the mean-map trial is the guarded mean-map search itself
    mean = search(task["model"], task["stats"], task["search"], granularity="channel",
                  schedule=SCHEDULE, progress=False)
    result = search(task["model"], task["stats"], task["search"], granularity="channel",
                    schedule=SCHEDULE, progress=False, constant="affine")
    assert result.confidence == mean.confidence is not None
    assert result.check is not None and result.check["images"] == mean.check["images"] > 0
    trials = result.settings["ridge_trials"]
    assert trials[0]["objective_value"] == mean.objective_value
    assert result.objective_value == max(t["objective_value"] for t in trials)
    assert result.objective_value >= mean.objective_value
    # the chosen plan passed its check: its row on the check path says so
    if result.check["chosen"] is not None:
        assert result.check["path"][result.check["chosen"]]["passed"]


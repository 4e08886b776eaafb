import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tinytask import one_thread, trained_task
from zoo import TOPOLOGIES, build, images

import velcro
from velcro.errors import VelcroError
from velcro.search import UNGUARDED, SearchSchedule, search, validate
from velcro.search._candidates import Rankings, filter_norm_score, random_score
from velcro.search._evaluator import CandidateEvaluator

GRID = [round(0.05 * i, 2) for i in range(21)]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def task():
    task = trained_task()
    task["stats"] = velcro.calibrate(task["model"], task["calibration"], progress=False)
    return task


def accuracy(model, data):
    return velcro.evaluate(model, data, progress=False)


@pytest.fixture(scope="module")
def uniform_curves(task):
    """(C, correct on the search split) per uniform threshold on GRID, via plan/apply/evaluate."""
    model, stats, data = task["model"], task["stats"], task["search"]
    curves = {}
    for granularity in ("element", "channel"):
        curves[granularity] = []
        for threshold in GRID:
            plan = velcro.plan(stats, threshold, granularity=granularity)
            correct = accuracy(velcro.apply(model, plan), data).correct
            curves[granularity].append((plan.saving_ratio, correct))
    return curves


@pytest.mark.parametrize("granularity", ["element", "channel"])
@pytest.mark.parametrize("tolerance", [0.0, 0.02])
def test_search_stays_within_tolerance_and_beats_every_uniform_threshold(
        task, uniform_curves, granularity, tolerance):
    search_ids, validation_ids = set(task["search_ids"]), set(task["validation_ids"])
    assert not search_ids & validation_ids
    assert not search_ids & set(task["calibration_ids"])
    model = task["model"]
    # the search before issue 14: top-1 point estimate on every search image, no check
    result = search(model, task["stats"], task["search"], granularity=granularity,
                    progress=False, **{**UNGUARDED, "tolerance": tolerance})

    # search accuracy, recomputed through the reference semantics
    before = accuracy(model, task["search"])
    after = accuracy(velcro.apply(model, result.plan), task["search"])
    assert result.baseline_accuracy == before.accuracy
    assert result.search_accuracy == after.accuracy
    assert after.correct >= before.correct - tolerance * before.images - 1e-9
    assert result.saving_ratio == pytest.approx(result.plan.saving_ratio)
    assert result.plan.thresholds() == pytest.approx(result.thresholds)
    assert result.saving_ratio > 0
    best_uniform = max(c for c, correct in uniform_curves[granularity]
                       if correct >= before.correct - tolerance * before.images - 1e-9)
    assert result.saving_ratio >= best_uniform

    # the validation images are measured once, after the search, beside it
    validate(result, model, task["validation"], search_ids=task["search_ids"],
             validation_ids=task["validation_ids"], progress=False)
    val_after = accuracy(velcro.apply(model, result.plan), task["validation"])
    assert result.validation["compressed"]["accuracy"] == val_after.accuracy
    assert result.validation["baseline"]["accuracy"] == accuracy(model, task["validation"]).accuracy
    assert result.validation["images"] == len(validation_ids)
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["search_accuracy"] == result.search_accuracy
    assert summary["validation"]["compressed"]["accuracy"] == val_after.accuracy


def test_validate_refuses_overlapping_splits(task):
    result = search(task["model"], task["stats"], task["search"], budget=3, progress=False)
    with pytest.raises(VelcroError, match=r"share 1 image \(e.g."):
        validate(result, task["model"], task["validation"], search_ids=[1, 2, 3],
                 validation_ids=[3, 4], progress=False)


def test_trajectory_budget_and_reuse(task):
    model, stats, data = task["model"], task["stats"], task["search"]
    limited = search(model, stats, data, granularity="channel", budget=6, progress=False)
    assert limited.evaluations <= 6
    assert sum(not row["memoised"] for row in limited.trajectory) == limited.evaluations
    legacy = {**UNGUARDED, "tolerance": 0.02}
    first = search(model, stats, data, granularity="channel", progress=False, **legacy)
    phases = {row["phase"] for row in first.trajectory}
    assert {"baseline", "profile", "refine"} <= phases
    best = max((r for r in first.trajectory if r["feasible"]), key=lambda r: r["objective"])
    assert best["objective"] == pytest.approx(first.objective_value)
    assert best["accuracy"] == first.search_accuracy
    # a second search with the same settings finds everything already evaluated
    again = search(model, stats, data, granularity="channel", reuse=first, progress=False,
                   **legacy)
    assert again.evaluations == 0
    assert again.thresholds == first.thresholds


def test_macs_objective_weights_sites_by_their_producers(task):
    model, stats, data = task["model"], task["stats"], task["search"]
    result = search(model, stats, data, objective="macs", tolerance=0.02,
                    schedule=SearchSchedule(levels=4, refine_rounds=1), progress=False)
    # hand count: conv/linear MACs per image of the chain model on 10x10 inputs
    producer_macs = {"act1": 8 * 100 * 3 * 9, "act2": 12 * 25 * 8 * 9, "act3": 16 * 9 * 12 * 9,
                     "relu": 10 * 16}
    total = sum(producer_macs.values()) + 5 * 10
    expected = sum(result.thresholds[s] * m / total for s, m in producer_macs.items())
    assert result.objective_value == pytest.approx(expected)


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_cached_evaluation_equals_the_applied_model(name, granularity):
    model, shape = build(name)
    data = images(shape, 24, batch=8)
    with torch.no_grad():
        labelled = [(x, (model(x).argmax(1) + i) % 5) for i, x in enumerate(data)]
    stats = velcro.calibrate(model, data, progress=False)
    rankings = Rankings(stats, granularity)
    evaluator = CandidateEvaluator(model, rankings, labelled, cache_mb=64)
    sites = len(rankings.sites)
    generator = torch.Generator().manual_seed(1)
    # profile-like then refine-like sequences: each candidate reuses the previous cut
    state = [0.0] * sites
    candidates = []
    for k in range(sites):
        candidates += [(k, [0.0] * k + [level] + [0.0] * (sites - k - 1)) for level in (0.5, 1.0)]
    for k in range(sites):
        state[k] = float(torch.rand(1, generator=generator))
        candidates.append((k, list(state)))
    started = []
    for reuse_from, fractions in candidates:
        outcome, start = evaluator.evaluate(rankings.counts(fractions), reuse_from)
        started.append(start)
        plan = velcro.plan(stats, fractions, granularity=granularity)
        applied = velcro.apply(model, plan)
        with torch.no_grad():
            loss = sum(float(F.cross_entropy(applied(x), y, reduction="sum"))
                       for x, y in labelled)
        assert outcome.correct == accuracy(applied, labelled).correct
        assert outcome.loss_sum == pytest.approx(loss, rel=1e-5)
        # fidelity to the uncompressed model, recomputed in NumPy from both models' logits
        with torch.no_grad():
            p = torch.cat([model(x) for x, _ in labelled]).double().numpy()
            q = torch.cat([applied(x) for x, _ in labelled]).double().numpy()
        log_p = p - np.log(np.exp(p - p.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - p.max(1, keepdims=True)
        log_q = q - np.log(np.exp(q - q.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - q.max(1, keepdims=True)
        kl = (np.exp(log_p) * (log_p - log_q)).sum(1)
        assert outcome.changed == int((p.argmax(1) != q.argmax(1)).sum())
        assert outcome.kl_sum == pytest.approx(kl.sum(), rel=1e-4, abs=1e-6)
    assert any(s is not None and s > 0 for s in started)  # the cache was used
    # with caching off every run starts from the images, with the same results
    plain = CandidateEvaluator(model, rankings, labelled, cache_mb=0)
    for reuse_from, fractions in candidates[-3:]:
        outcome, start = plain.evaluate(rankings.counts(fractions), reuse_from)
        assert start is None
        cached, _ = evaluator.evaluate(rankings.counts(fractions), reuse_from)
        assert (outcome.correct, outcome.loss_sum) == pytest.approx(
            (cached.correct, cached.loss_sum))


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_candidate_plans_equal_velcro_plan(granularity):
    model, shape = build("residual")
    stats = velcro.calibrate(model, images(shape, 16), progress=False)
    rankings = Rankings(stats, granularity, "relative", "map")
    fractions = [0.13, 0.5, 0.77, 1.0, 0.0][: len(stats.names)]
    expected = velcro.plan(stats, fractions, granularity=granularity, score="relative")
    got = rankings.plan(fractions)
    assert got.saving_ratio == expected.saving_ratio
    for name in stats.names:
        assert torch.equal(got.sites[name].units, expected.sites[name].units)
        assert torch.equal(got.sites[name].constant, expected.sites[name].constant)


def test_baseline_hooks_rank_by_filter_norm_random_order_and_zero_constants():
    model, shape = build("chain")
    stats = velcro.calibrate(model, images(shape, 16), progress=False)
    norms = model.conv2.weight.detach().abs().sum(dim=(1, 2, 3))
    rankings = Rankings(stats, "channel", filter_norm_score(model), "zero")
    plan = rankings.plan([0.0, 0.5, 0.0, 0.0])
    assert plan.sites["act2"].units.tolist() == sorted(torch.argsort(norms)[:6].tolist())
    assert not plan.sites["act2"].constant.any()
    shuffled = Rankings(stats, "channel", random_score(3)).plan([0.0, 0.5, 0.0, 0.0])
    again = Rankings(stats, "channel", random_score(3)).plan([0.0, 0.5, 0.0, 0.0])
    assert torch.equal(shuffled.sites["act2"].units, again.sites["act2"].units)
    with pytest.raises(VelcroError, match="score hook gave 3 scores"):
        Rankings(stats, "channel", lambda name, site: torch.zeros(3))


@pytest.mark.parametrize("kwargs, message", [
    ({"objective": "flops"}, "objective 'flops' is unknown"),
    ({"tolerance": -0.1}, "tolerance -0.1 is out of range"),
    ({"budget": 0}, "budget 0 is too small"),
    ({"granularity": "block"}, "granularity 'block' is unknown"),
])
def test_bad_arguments_are_one_line_errors(task, kwargs, message):
    with pytest.raises(VelcroError, match=message):
        search(task["model"], task["stats"], task["search"], progress=False, **kwargs)


def test_statistics_of_another_model_are_refused(task):
    other, _ = build("chain", seed=5)
    with pytest.raises(VelcroError, match="made for"):
        search(other, task["stats"], task["search"], progress=False)
    assert math.isfinite(task["stats"].count)

"""Automatic threshold search: the per-layer thresholds that save most within a tolerance.

The papers try threshold tuples by hand. :func:`search` finds them on a *search split* of the
task's images (carved from the non-validation images); the validation images are used once,
afterwards, by :func:`validate`, which records the accuracy, the fidelity and the trade-off
on them beside the search's figures.

**What is kept** (``criterion``, ``tolerance``, ``confidence``; see ``_criteria``): top-1
accuracy against the labels (``accuracy``, the default), or fidelity to the uncompressed
model, which needs no labels so that every non-held-out image of the task can serve: the
share of images whose top-1 prediction changes (``agreement``; it bounds the top-1 loss on
any images) or the mean KL divergence of the softmax (``kl``). Every candidate is compared
with the uncompressed model image by image, and is *feasible* when a one-sided paired upper
confidence bound on its loss is within the tolerance (the point estimate with
``confidence=None``).

**Nested validation** (``check_fraction``; see ``_check``): a part of the search images is
held back; after the search, a fixed sequence of candidates of growing saving, taken from
the trajectory (the searched plan and the feasible candidates inside it), is tested on it
and the plan is the last that passes (backing off from the searched plan when it fails).

The search before issue 14 (top-1 point estimate on every search image, tolerance 0, no
check) is ``search(..., **UNGUARDED)``. It picks candidates that got lucky on the search
images: on CIFAR ResNets it lost 3 points of held-out top-1 while keeping search top-1.

Design (every candidate is one evaluation on the search images; a candidate is the tuple
of chosen units per site, and one met twice is evaluated once):

1. **Baseline**: the uncompressed model; every candidate is compared with it image by image.
2. **Profile** (``schedule.profile``): each site alone, bisecting over ``levels`` evenly
   spaced fractions for the highest one feasible alone, its *cap* (about log2(levels)
   evaluations per site). Each run starts from cached activations at that site, so only
   the layers after it are computed.
3. **Capped uniform**: T_k = min(lambda, cap_k), bisection on lambda: uniform thresholds
   that spare the sites that cannot take them alone (about log2(levels) evaluations).
4. **Uniform check**: uniform thresholds on ``uniform_levels`` above the best objective found,
   ascending, until ``uniform_patience`` consecutive infeasible ones: where the loss grows
   with the threshold, the result is never worse than the best feasible uniform threshold
   (``uniform_patience=None`` tries every level above, which makes that hold always).
5. **Refinement**: coordinate ascent from the best candidate, site by site in graph order
   (each run starts at the changed site's cached activations), raising one site by a step
   and keeping the rise when still feasible; the step starts at 1/levels and halves each
   round; fractions found infeasible (alone, or from a lower state) are not tried again.
6. **Check** (with ``check_fraction > 0``): the nested validation above.

What we measured (benchmarks/bench_search.py): joint feasibility is poorly predicted by
the sites' separate effects (compression on several sites hurts more than the sum of its
parts), so allocations computed from the profile alone (greedy by loss per saving, equal
loss per site) lost to plain uniform thresholds; the evaluated coordinate ascent is what
gains over them. The profile pays where some sites are sensitive (it keeps them out of the
uniform and the ascent); on a model with none, ``SearchSchedule(profile=False)`` halves the
evaluations for the same result.

Example:
    >>> result = velcro.search(model, stats, search_loader, granularity="element")
    >>> result.saving_ratio, result.check["images"], result.evaluations
    (0.24, 150, 97)
    >>> validate(result, model, validation_loader).validation["paired"]["difference"]
    -0.0015
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from velcro.calibrate import model_device
from velcro.errors import VelcroError
from velcro.graph.capture import recorded_example
from velcro.plan import Thresholds
from velcro.search._candidates import Rankings, ScoreFn, filter_norm_score, random_score
from velcro.search._check import backoff_path, fixed_sequence, split_check
from velcro.search._criteria import CRITERIA, Guard, check_settings, warn_unresolved
from velcro.search._evaluator import CandidateEvaluator, load_batches
from velcro.search._result import SearchResult, SearchSchedule
from velcro.search._ridge import (
    RIDGES,
    choose_ridge,
    make_rankings,
    ridge_settings,
    scaled_path,
    set_site_ridges,
)
from velcro.search._steps import Searcher
from velcro.search._validate import validate
from velcro.stats import Stats

__all__ = ["CRITERIA", "DEFAULTS", "UNGUARDED", "SearchResult", "SearchSchedule",
           "filter_norm_score", "random_score", "search", "validate"]

OBJECTIVES = ("saving_ratio", "macs")
DEFAULTS = {"criterion": "accuracy", "tolerance": 0.02, "confidence": 0.8,
            "check_fraction": 0.25}
"""The defaults of :func:`search` and ``velcro search``: top-1 within 2 points at 80%
confidence, a quarter of the search images held back for the check. Why accuracy and not
agreement: on the CIFAR ResNets a plan changes many predictions that cancel out (5% of the
elements replaced changed 9% of the top-1 predictions of {cat, dog} and none of its
accuracy), so a bound on agreement that protects top-1 keeps a small share of the saving;
measured in benchmarks/RESULTS.md."""
UNGUARDED = {"criterion": "accuracy", "tolerance": 0.0, "confidence": None,
             "check_fraction": 0.0}
"""The search before issue 14: top-1 point estimate on every search image, no check."""


def _site_weights(model: nn.Module, rankings: Rankings, objective: str, example) -> list[float]:
    """Each site's objective at threshold 1: its activation share, or its producer's MACs."""
    if objective == "saving_ratio":
        total = sum(s.elements for s in rankings.sites)
        return [s.elements / total for s in rankings.sites]
    from velcro.cost import cost
    from velcro.graph import find_sites, trace

    model_cost = cost(model, example[:1])
    layer_macs = {layer.name: layer.macs for layer in model_cost.layers}
    producers = {s.name: s.producer for s in find_sites(trace(model, example[:1]))}
    total = model_cost.macs or 1
    return [layer_macs.get(producers[s.name], 0) / total for s in rankings.sites]


def search(
    model: nn.Module,
    stats: Stats,
    data: Iterable,
    *,
    granularity: str = "element",
    criterion: str = DEFAULTS["criterion"],
    tolerance: float = DEFAULTS["tolerance"],
    confidence: float | None = DEFAULTS["confidence"],
    check_fraction: float = DEFAULTS["check_fraction"],
    objective: str = "saving_ratio",
    budget: int | None = None,
    score: str | ScoreFn = "variance",
    constant: str = "map",
    schedule: SearchSchedule | None = None,
    task_classes: Sequence[int] | None = None,
    cache_mb: float = 1024.0,
    reuse: SearchResult | None = None,
    progress: bool = True,
    ridge: float | str | None = None,
    ridges: Sequence[float] = RIDGES,
    start: Thresholds | None = None,
) -> SearchResult:
    """Per-site thresholds maximising ``objective`` with the ``criterion`` loss within
    ``tolerance`` (at ``confidence``), checked on search images held back from the search.

    Args:
        model: the uncompressed model the statistics came from.
        stats: calibration statistics (:func:`velcro.calibrate`).
        data: batches of the *search split*: task images that are neither the validation
            images nor (ideally) the calibration images; ``(images, labels)`` pairs, or bare
            image tensors (no labels) for the ``agreement`` and ``kl`` criteria. Held in
            memory.
        granularity: ``element`` (VELCRO) or ``channel`` (S-VELCRO).
        criterion: ``agreement`` (share of top-1 predictions changed; no labels needed),
            ``kl`` (mean KL divergence of the softmax, nats) or ``accuracy`` (top-1 lost).
        tolerance: the loss allowed under ``criterion`` (0.02 = 2% of the images).
        confidence: one-sided confidence of the paired bound that must stay within the
            tolerance (None: the point estimate, as before issue 14).
        check_fraction: share of ``data`` held back for the nested check (0: none).
        objective: ``saving_ratio`` (the papers' C) or ``macs`` (MACs of the producing
            convolutions of the replaced activations, as a fraction of the model's).
        budget: the most candidate evaluations to spend (None: the schedule's own length,
            at most about sites * (log2(levels) + 1 + refine_rounds) + 30).
        score: how units are ranked: ``variance``, ``relative`` or a hook
            ``score(site_name, site_stats) -> per-channel scores`` (lowest replaced first),
            e.g. :func:`filter_norm_score` or :func:`random_score` for baselines.
        constant: ``map`` (the mean), ``scalar`` (per-channel scalar), ``zero`` (a
            zero-pruning baseline) or ``affine`` (channels predicted from the kept ones
            where that folds or costs little, mean maps elsewhere; statistics calibrated
            with ``covariance=True``; see ``velcro.search._ridge``).
        schedule: profile levels, uniform check, refinement and check points
            (:class:`SearchSchedule`).
        task_classes: restrict the argmax to these classes (default: all, the papers').
        cache_mb: memory for cached activations (0: every run starts from the images).
        reuse: an earlier result on the same model, statistics, data and ranking; its
            evaluations are reused (a sweep over tolerances profiles once).
        progress: show a progress bar on stderr.
        ridge: ``affine`` constants (and ``residual`` scores): the ridge strength. None:
            chosen per site on the search split (less its check images), and the result
            compared with a mean-map search (never below it there); ``"grid"``: one search
            per ``ridges``.
        ridges: the grid of ``ridge="grid"``.
        start: thresholds to begin from (e.g. another search's ``thresholds``): they and
            their multiples up to 2x are bisected first, then the usual phases follow.

    Returns:
        A :class:`SearchResult`.

    Example:
        >>> result = velcro.search(model, stats, search_loader, granularity="channel",
        ...                        tolerance=0.02, confidence=0.9, criterion="agreement")
        >>> result.plan.save("cats.plan.json")
        >>> from velcro.search import UNGUARDED
        >>> today = velcro.search(model, stats, search_loader, **UNGUARDED)
    """
    if objective not in OBJECTIVES:
        raise VelcroError(f"objective '{objective}' is unknown; use 'saving_ratio' or 'macs'")
    if isinstance(tolerance, float) and math.isnan(tolerance):
        raise VelcroError(f"tolerance {tolerance} is out of range; give a number >= 0")
    check_settings(criterion, tolerance, confidence)
    if not (isinstance(check_fraction, (int, float)) and 0.0 <= check_fraction < 1.0):
        raise VelcroError(f"check_fraction {check_fraction} is out of range; give a fraction "
                          "in [0, 1)")
    if budget is not None and budget < 1:
        raise VelcroError(f"budget {budget} is too small; allow at least one evaluation")
    schedule = schedule or SearchSchedule()
    levels = schedule.levels
    if levels < 1:
        raise VelcroError(f"schedule levels {levels} is too small; profile at least one level")
    if constant == "affine" and (ridge is None or ridge == "grid"):
        return choose_ridge(search, ridge, ridges, model=model, stats=stats, data=data,
                            granularity=granularity, criterion=criterion,
                            tolerance=tolerance, confidence=confidence,
                            check_fraction=check_fraction, objective=objective,
                            budget=budget, score=score, constant=constant,
                            schedule=schedule, task_classes=task_classes,
                            cache_mb=cache_mb, reuse=reuse, progress=progress)
    stats.check_model(model)
    began = time.perf_counter()
    guard = Guard(criterion, tolerance, confidence)
    rankings = make_rankings(model, stats, granularity, score, constant, ridge)
    batches = load_batches(data, model_device(model))
    if criterion == "accuracy" and batches[0][1] is None:
        raise VelcroError("criterion 'accuracy' needs labelled search images; give (images, "
                          "labels) batches or use criterion 'agreement'")
    if criterion == "accuracy" and len(torch.cat([y for _, y in batches]).unique()) == 1:
        warnings.warn("the search images hold a single class: a constant model keeps their "
                      "top-1, so the accuracy criterion cannot tell plans apart; use "
                      "criterion 'agreement' or images of at least two classes", stacklevel=2)
    check_batches: list = []
    if check_fraction > 0:
        batches, check_batches, check_indices = split_check(batches, check_fraction)
    warn_unresolved(guard, [("search", batches), ("check", check_batches)])
    example = recorded_example(model, stats.info)  # where only a capture at that size works
    evaluator = CandidateEvaluator(model, rankings, batches, task_classes=task_classes,
                                   cache_mb=cache_mb, example=example)
    weights = _site_weights(model, rankings, objective, evaluator.batches[0][0])
    set_site_ridges(rankings, model, evaluator.batches)
    memo = None
    if reuse is not None and reuse.settings.get("key") == _reuse_key(rankings, evaluator):
        memo = reuse.memo
    sites = len(rankings.sites)
    expected = budget or sites * (math.ceil(math.log2(levels + 1)) + schedule.refine_rounds) + 30
    bar = tqdm(total=expected, unit="eval", desc="search", disable=not progress,
               file=sys.stderr, leave=False)
    with bar:
        searcher = Searcher(evaluator, rankings, weights, guard, budget, memo, bar)
        if start is not None:  # the start, then all its thresholds scaled up together
            searcher.bisect_path(scaled_path(rankings, start), "start")
        curves = (searcher.profile([i / levels for i in range(1, levels + 1)])
                  if schedule.profile else searcher.no_profile())
        searcher.bisect_path(searcher.capped_uniform_path(curves, levels), "capped-uniform")
        searcher.uniform(list(schedule.uniform_levels), schedule.uniform_patience)
        searcher.refine(1.0 / levels, schedule.refine_rounds)
    searched = searcher.best
    feasible = [(counts, searcher.objective(counts)) for counts, outcome in searcher.memo.items()
                if counts != searcher.zeros and searcher.feasible(outcome)]
    path = backoff_path(feasible, searched, schedule.check_points)
    check = None
    best = searched
    if check_batches:
        best, check = _check(model, rankings, check_batches, path, guard, searcher,
                             task_classes, cache_mb, example)
        check["indices"] = check_indices
    fractions = searcher.fractions(best)
    plan = rankings.plan(fractions, best)
    plan.info = {**plan.info, "search": {"objective": objective, **guard.to_dict(),
                                         "check_fraction": check_fraction}}
    outcome = searcher.memo[best]
    forward_nodes = len(evaluator.nodes) - evaluator.root.position
    phases: dict[str, int] = {}
    for row in searcher.trajectory:
        if not row["memoised"]:
            phases[row["phase"]] = phases.get(row["phase"], 0) + 1
    settings = {
        "score": rankings.score_name, "constant": constant, **schedule.to_dict(),
        **ridge_settings(rankings),
        "budget": budget, "task_classes": list(task_classes) if task_classes else None,
        "cache_mb": cache_mb, "evaluations_per_phase": phases, "check_fraction": check_fraction,
        "searched_objective": searcher.objective(searched),
        "searched_saving_ratio": rankings.saving_ratio(searched),
        # the share of graph nodes the evaluations ran, against running each one fully
        "graph_share_run": evaluator.nodes_run / max(
            1, forward_nodes * searcher.evaluations * len(evaluator.batches)),
        "key": _reuse_key(rankings, evaluator),
    }
    tested = check["path"] if check else [{"passed": None} for _ in path]
    result_path = [{"counts": counts, "objective": searcher.objective(counts),
                    "passed": row["passed"], "chosen": counts == best,
                    "plan": rankings.plan(searcher.fractions(counts), counts)}
                   for counts, row in zip(path, tested, strict=False)]
    return SearchResult(
        plan=plan,
        thresholds=dict(zip(rankings.names, fractions, strict=True)),
        objective=objective,
        objective_value=searcher.objective(best),
        saving_ratio=plan.saving_ratio,
        baseline_accuracy=searcher.baseline.accuracy,
        search_accuracy=outcome.accuracy,
        tolerance=tolerance,
        search_images=evaluator.images,
        evaluations=searcher.evaluations,
        wall_time_s=time.perf_counter() - began,
        trajectory=searcher.trajectory,
        settings=settings,
        criterion=criterion,
        confidence=confidence,
        search_agreement=outcome.agreement,
        search_kl=outcome.kl,
        check=check,
        memo=searcher.memo,
        path=result_path,
    )


def _check(model, rankings, batches, path, guard, searcher, task_classes, cache_mb, example):
    """The fixed-sequence test of ``path`` on the check images; (chosen counts, summary)."""
    evaluator = CandidateEvaluator(model, rankings, batches, task_classes=task_classes,
                                   cache_mb=min(cache_mb, 256.0), example=example)
    zeros = searcher.zeros
    baseline, _ = evaluator.evaluate(zeros)
    rows = []

    def passes(counts) -> bool:
        outcome, _ = evaluator.evaluate(counts)
        tally = outcome.tally(baseline)
        rows.append({"thresholds": [round(f, 6) for f in searcher.fractions(counts)],
                     "objective": searcher.objective(counts),
                     "saving_ratio": rankings.saving_ratio(counts),
                     "accuracy": outcome.accuracy, "agreement": outcome.agreement,
                     "kl": outcome.kl, "criterion_loss": guard.loss(tally),
                     "bound": guard.bound(tally), "passed": guard.passes(tally)})
        return rows[-1]["passed"]

    chosen, _ = fixed_sequence(path, passes)
    best = zeros if chosen is None else path[chosen]
    return best, {"images": evaluator.images, "baseline_accuracy": baseline.accuracy,
                  "path": rows, "chosen": chosen,
                  "backed_off": best != searcher.best, "searched_passed": (
                      rows[-1]["passed"] if len(rows) == len(path) and path else None)}


def _reuse_key(rankings: Rankings, evaluator: CandidateEvaluator) -> str:
    labels = (-1 if not evaluator.labelled else
              int(torch.cat([labels.cpu() for _, labels in evaluator.batches]).sum()))
    checksum = float(sum(float(x.double().sum()) for x, _ in evaluator.batches))
    return (f"{rankings.stats.structure}/{rankings.stats.weights}/{rankings.granularity}/"
            f"{rankings.score_name}/{rankings.constant}/{rankings.ridge}/{evaluator.images}/"
            f"{labels}/{checksum:.6e}/{evaluator.task_classes is not None}")

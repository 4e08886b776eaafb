"""Automatic threshold search: the per-layer thresholds that save most at no accuracy loss.

The papers try threshold tuples by hand. :func:`search` finds them on a *search split* of the
task's images (carved from the non-validation images); the validation images are used once,
afterwards, by :func:`validate`, which records both accuracies side by side.

Design (every candidate is one top-1 evaluation on the search split; a candidate is the tuple
of chosen units per site, and one met twice is evaluated once):

1. **Baseline**: the uncompressed model; a candidate is *feasible* when its search accuracy
   is at least the baseline's minus ``tolerance``.
2. **Profile** (``schedule.profile``): each site alone, bisecting over ``levels`` evenly
   spaced fractions for the highest one feasible alone, its *cap* (about log2(levels)
   evaluations per site). Each run starts from cached activations at that site, so only
   the layers after it are computed. The mean cross-entropy is recorded beside top-1.
3. **Capped uniform**: T_k = min(lambda, cap_k), bisection on lambda: uniform thresholds
   that spare the sites that cannot take them alone (about log2(levels) evaluations).
4. **Uniform check**: uniform thresholds on ``uniform_levels`` above the best objective found,
   ascending, until ``uniform_patience`` consecutive infeasible ones: where accuracy falls
   with the threshold, the result is never worse than the best feasible uniform threshold
   (``uniform_patience=None`` tries every level above, which makes that hold always).
5. **Refinement**: coordinate ascent from the best candidate, site by site in graph order
   (each run starts at the changed site's cached activations), raising one site by a step
   and keeping the rise when still feasible; the step starts at 1/levels and halves each
   round; fractions found infeasible (alone, or from a lower state) are not tried again.

What we measured (benchmarks/bench_search.py): joint feasibility is poorly predicted by
the sites' separate effects (compression on several sites hurts more than the sum of its
parts), so allocations computed from the profile alone (greedy by loss per saving, equal
loss per site) lost to plain uniform thresholds; the evaluated coordinate ascent is what
gains over them. The profile pays where some sites are sensitive (it keeps them out of the
uniform and the ascent); on a model with none, ``SearchSchedule(profile=False)`` halves the
evaluations for the same result.

Example:
    >>> result = velcro.search(model, stats, search_loader, granularity="element")
    >>> result.saving_ratio, result.search_accuracy, result.evaluations
    (0.31, 0.954, 97)
    >>> validate(result, model, validation_loader).validation["compressed"]["accuracy"]
    0.949
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from velcro._io import write_text_atomic
from velcro.apply import apply
from velcro.errors import VelcroError
from velcro.evaluate import Report, evaluate
from velcro.plan import Plan, Thresholds
from velcro.search._candidates import Rankings, ScoreFn, filter_norm_score, random_score
from velcro.search._evaluator import CandidateEvaluator
from velcro.search._ridge import (
    RIDGES,
    choose_ridge,
    make_rankings,
    ridge_settings,
    scaled_path,
    set_site_ridges,
)
from velcro.search._steps import Searcher
from velcro.stats import Stats

__all__ = ["SearchResult", "SearchSchedule", "filter_norm_score", "random_score", "search",
           "validate"]

OBJECTIVES = ("saving_ratio", "macs")


@dataclass
class SearchSchedule:
    """How the search spends its evaluations (see the module docstring).

    Attributes:
        levels: profile levels per site: fractions 1/levels, 2/levels, ..., 1.
        uniform_levels: the uniform thresholds the result is checked against.
        uniform_patience: stop the uniform check after this many consecutive infeasible
            levels (None: try every level above the best found).
        refine_rounds: coordinate-ascent rounds; the step starts at 1/levels, halved each.
        profile: profile each site alone first (its cap keeps it out of the uniform
            thresholds and of the ascent beyond what it can take).
    """

    levels: int = 8
    uniform_levels: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 21))
    uniform_patience: int | None = 3
    refine_rounds: int = 3
    profile: bool = True

    def to_dict(self) -> dict:
        return {"levels": self.levels, "uniform_levels": list(self.uniform_levels),
                "uniform_patience": self.uniform_patience, "refine_rounds": self.refine_rounds,
                "profile": self.profile}


@dataclass
class SearchResult:
    """What :func:`search` found and how.

    Attributes:
        plan: the chosen :class:`Plan`.
        thresholds: the fraction chosen per site.
        objective, objective_value: what was maximised and its value (``saving_ratio``: the
            papers' C; ``macs``: the fraction of the model's MACs in the producers of the
            replaced activations).
        saving_ratio: the papers' C of the plan.
        baseline_accuracy, search_accuracy: top-1 on the search split, before and after.
        tolerance: the accuracy loss allowed.
        search_images: images in the search split.
        evaluations: candidates evaluated on the search split (memoised ones not counted).
        wall_time_s: seconds the search took.
        trajectory: every candidate in order: phase, thresholds, objective, saving_ratio,
            accuracy, loss, feasible, where the run started.
        settings: the search's settings and cache figures.
        validation: filled by :func:`validate`: the accuracies on the validation split.
    """

    plan: Plan
    thresholds: dict[str, float]
    objective: str
    objective_value: float
    saving_ratio: float
    baseline_accuracy: float
    search_accuracy: float
    tolerance: float
    search_images: int
    evaluations: int
    wall_time_s: float
    trajectory: list[dict]
    settings: dict = field(default_factory=dict)
    validation: dict | None = None
    memo: dict = field(default_factory=dict, repr=False)
    reports: dict = field(default_factory=dict, repr=False)

    @property
    def granularity(self) -> str:
        return self.plan.granularity

    def to_dict(self) -> dict:
        """A JSON-serialisable summary (the plan itself is saved with ``plan.save``)."""
        return {
            "granularity": self.granularity,
            "objective": self.objective,
            "objective_value": self.objective_value,
            "saving_ratio": self.saving_ratio,
            "tolerance": self.tolerance,
            "baseline_accuracy": self.baseline_accuracy,
            "search_accuracy": self.search_accuracy,
            "search_images": self.search_images,
            "evaluations": self.evaluations,
            "wall_time_s": self.wall_time_s,
            "thresholds": self.thresholds,
            "settings": self.settings,
            "validation": self.validation,
            "trajectory": self.trajectory,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON (atomically)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")


def _site_weights(model: nn.Module, rankings: Rankings, objective: str, example) -> list[float]:
    """Each site's objective at threshold 1: its activation share, or its producer's MACs."""
    if objective == "saving_ratio":
        total = sum(s.elements for s in rankings.sites)
        return [s.elements / total for s in rankings.sites]
    from velcro.cost import cost
    from velcro.graph import find_sites, trace

    model_cost = cost(model, example[:1])
    layer_macs = {layer.name: layer.macs for layer in model_cost.layers}
    producers = {s.name: s.producer for s in find_sites(trace(model))}
    total = model_cost.macs or 1
    return [layer_macs.get(producers[s.name], 0) / total for s in rankings.sites]


def search(
    model: nn.Module,
    stats: Stats,
    data: Iterable,
    *,
    granularity: str = "element",
    tolerance: float = 0.0,
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
    """Per-site thresholds maximising ``objective`` with search accuracy within ``tolerance``.

    Args:
        model: the uncompressed model the statistics came from.
        stats: calibration statistics (:func:`velcro.calibrate`).
        data: labelled batches of the *search split*: task images that are neither the
            validation images nor (ideally) the calibration images. Held in memory.
        granularity: ``element`` (VELCRO) or ``channel`` (S-VELCRO).
        tolerance: accuracy loss allowed on the search split (0.01 = one point).
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
        schedule: profile levels, uniform check and refinement (:class:`SearchSchedule`).
        task_classes: restrict the argmax to these classes (default: all, the papers').
        cache_mb: memory for cached activations (0: every run starts from the images).
        reuse: an earlier result on the same model, statistics, data and ranking; its
            evaluations are reused (a sweep over tolerances profiles once).
        progress: show a progress bar on stderr.
        ridge: ``affine`` constants (and ``residual`` scores): the ridge strength. None:
            chosen per site on the search split, and the result compared with a mean-map
            search (never below it there); ``"grid"``: one search per ``ridges``.
        ridges: the grid of ``ridge="grid"``.
        start: thresholds to begin from (e.g. another search's ``thresholds``): they and
            their multiples up to 2x are bisected first, then the usual phases follow.

    Returns:
        A :class:`SearchResult`.

    Example:
        >>> result = velcro.search(model, stats, search_loader, granularity="channel",
        ...                        tolerance=0.0, budget=200)
        >>> result.plan.save("cats.plan.json")
    """
    if objective not in OBJECTIVES:
        raise VelcroError(f"objective '{objective}' is unknown; use 'saving_ratio' or 'macs'")
    if not 0.0 <= tolerance <= 1.0 or math.isnan(tolerance):
        raise VelcroError(f"tolerance {tolerance} is out of range; give a fraction in [0, 1]")
    if budget is not None and budget < 1:
        raise VelcroError(f"budget {budget} is too small; allow at least one evaluation")
    schedule = schedule or SearchSchedule()
    levels = schedule.levels
    if levels < 1:
        raise VelcroError(f"schedule levels {levels} is too small; profile at least one level")
    if constant == "affine" and (ridge is None or ridge == "grid"):
        return choose_ridge(search, ridge, ridges, model=model, stats=stats, data=data,
                            granularity=granularity, tolerance=tolerance,
                            objective=objective, budget=budget, score=score,
                            constant=constant, schedule=schedule, task_classes=task_classes,
                            cache_mb=cache_mb, reuse=reuse, progress=progress)
    stats.check_model(model)
    began = time.perf_counter()
    rankings = make_rankings(model, stats, granularity, score, constant, ridge)
    evaluator = CandidateEvaluator(model, rankings, data, task_classes=task_classes,
                                   cache_mb=cache_mb)
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
        searcher = Searcher(evaluator, rankings, weights, tolerance, budget, memo, bar)
        if start is not None:  # the start, then all its thresholds scaled up together
            searcher.bisect_path(scaled_path(rankings, start), "start")
        curves = (searcher.profile([i / levels for i in range(1, levels + 1)])
                  if schedule.profile else searcher.no_profile())
        searcher.bisect_path(searcher.capped_uniform_path(curves, levels), "capped-uniform")
        searcher.uniform(list(schedule.uniform_levels), schedule.uniform_patience)
        searcher.refine(1.0 / levels, schedule.refine_rounds)
    best = searcher.best
    fractions = searcher.fractions(best)
    plan = rankings.plan(fractions, best)
    plan.info = {**plan.info, "search": {"objective": objective, "tolerance": tolerance}}
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
        "cache_mb": cache_mb, "evaluations_per_phase": phases,
        # the share of graph nodes the evaluations ran, against running each one fully
        "graph_share_run": evaluator.nodes_run / max(
            1, forward_nodes * searcher.evaluations * len(evaluator.batches)),
        "key": _reuse_key(rankings, evaluator),
    }
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
        memo=searcher.memo,
    )


def _reuse_key(rankings: Rankings, evaluator: CandidateEvaluator) -> str:
    labels = torch.cat([labels.cpu() for _, labels in evaluator.batches])
    checksum = float(sum(float(x.double().sum()) for x, _ in evaluator.batches))
    return (f"{rankings.stats.structure}/{rankings.stats.weights}/{rankings.granularity}/"
            f"{rankings.score_name}/{rankings.constant}/{rankings.ridge}/{evaluator.images}/"
            f"{int(labels.sum())}/{checksum:.6e}/{evaluator.task_classes is not None}")


def validate(
    result: SearchResult,
    model: nn.Module,
    data: Iterable,
    *,
    task_classes: Sequence[int] | None = None,
    search_ids: Iterable | None = None,
    validation_ids: Iterable | None = None,
    progress: bool = True,
) -> SearchResult:
    """Measure the searched plan once on the validation split; record it beside the search.

    Args:
        result: from :func:`search`.
        model: the uncompressed model.
        data: labelled batches of the validation split (never seen by the search).
        task_classes: restrict the argmax to these classes, as in the search.
        search_ids, validation_ids: identities of the images of both splits (indices or
            file names); when both are given they must be disjoint.
        progress: show progress bars on stderr.

    Returns:
        ``result``, with ``validation`` = ``{"images", "baseline", "compressed", "paired"}``
        (report summaries and the paired difference) and the two :class:`Report` objects in
        ``result.reports``.

    Example:
        >>> validate(result, model, val_loader, search_ids=search_idx, validation_ids=val_idx)
    """
    if search_ids is not None and validation_ids is not None:
        shared = set(search_ids) & set(validation_ids)
        if shared:
            raise VelcroError(
                f"the search and validation splits share {len(shared)} images (e.g. "
                f"{sorted(map(str, shared))[0]}); carve the search split from non-validation "
                "images"
            )
    before: Report = evaluate(model, data, task_classes=task_classes, progress=progress)
    after: Report = evaluate(apply(model, result.plan), data, task_classes=task_classes,
                             progress=progress)
    result.reports = {"baseline": before, "compressed": after}
    result.validation = {
        "images": before.images,
        "baseline": {"accuracy": before.accuracy, "ci95": list(before.ci95),
                     "correct": before.correct, "images": before.images},
        "compressed": {"accuracy": after.accuracy, "ci95": list(after.ci95),
                       "correct": after.correct, "images": after.images},
        "paired": after.paired_difference(before),
        "disjoint_checked": search_ids is not None and validation_ids is not None,
    }
    return result

"""What a search is told (:class:`SearchSchedule`) and what it returns (:class:`SearchResult`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from velcro._format import objective_label, percent, plural, points
from velcro._io import write_text_atomic
from velcro.plan import Plan


@dataclass
class SearchSchedule:
    """How the search spends its evaluations (see :func:`velcro.search`).

    Attributes:
        levels: profile levels per site: fractions 1/levels, 2/levels, ..., 1.
        uniform_levels: the uniform thresholds the result is checked against.
        uniform_patience: stop the uniform check after this many consecutive infeasible
            levels (None: try every level above the best found).
        refine_rounds: coordinate-ascent rounds; the step starts at 1/levels, halved each.
        profile: profile each site alone first (its cap keeps it out of the uniform
            thresholds and of the ascent beyond what it can take).
        check_points: candidates of the search trajectory tested on the check images (the
            nested validation), at 1/check_points, 2/check_points, ..., 1 of the best
            objective found.

    Example:
        >>> quick = SearchSchedule(levels=4, refine_rounds=1)
        >>> result = velcro.search(model, stats, search_loader, schedule=quick)
    """

    levels: int = 8
    uniform_levels: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 21))
    uniform_patience: int | None = 3
    refine_rounds: int = 3
    profile: bool = True
    check_points: int = 6

    def to_dict(self) -> dict:
        """The schedule as plain data (JSON-ready)."""
        return {"levels": self.levels, "uniform_levels": list(self.uniform_levels),
                "uniform_patience": self.uniform_patience, "refine_rounds": self.refine_rounds,
                "profile": self.profile, "check_points": self.check_points}


@dataclass
class SearchResult:
    """What :func:`velcro.search` found and how.

    Attributes:
        plan: the chosen :class:`Plan` (after the nested check, if one ran).
        thresholds: the fraction chosen per site.
        objective, objective_value: what was maximised and its value (``saving_ratio``: the
            papers' C; ``macs``: the fraction of the model's MACs in the producers of the
            replaced activations).
        saving_ratio: the papers' C of the plan.
        baseline_accuracy, search_accuracy: top-1 on the search images (those the search
            ran on, without the check images), before and after; None without labels.
        tolerance: the loss allowed under ``criterion``.
        search_images: images the search ran on (the check images not counted).
        evaluations: candidates evaluated on the search images (memoised ones not counted).
        wall_time_s: seconds the search took.
        trajectory: every candidate in order: phase, thresholds, objective, saving_ratio,
            accuracy, loss (cross-entropy), agreement, kl, criterion_loss, bound, feasible,
            where the run started.
        settings: the search's settings and cache figures.
        criterion, confidence: what the guard bounds, and at what confidence (None: the
            point estimate).
        search_agreement, search_kl: fidelity of the plan on the search images.
        check: the nested validation: images, the tested path (ascending), the chosen
            point; None when no check ran.
        validation: filled by :func:`velcro.search.validate`: accuracy, fidelity and the
            trade-off on the validation images.

    ``print(result)`` shows the headline figures in a few lines; the plan, the trajectory and
    the memo stay in the attributes, and :meth:`to_dict` gives them as plain data.

    Example:
        >>> result = velcro.search(model, stats, search_loader, granularity="channel",
        ...                        objective="macs")
        >>> result
        SearchResult: channel plan, C 21.40%, 61 evaluations in 80.3 s
          objective: MACs in replaced producers 27.12%
          guard: top-1 loss within 2.00 pp at 80% confidence
          search split: 200 images (50 held back for the check: passed), top-1 100.00% -> 99.33%
    """

    plan: Plan
    thresholds: dict[str, float]
    objective: str
    objective_value: float
    saving_ratio: float
    baseline_accuracy: float | None
    search_accuracy: float | None
    tolerance: float
    search_images: int
    evaluations: int
    wall_time_s: float
    trajectory: list[dict]
    settings: dict = field(default_factory=dict)
    criterion: str = "accuracy"
    confidence: float | None = None
    search_agreement: float = 1.0
    search_kl: float = 0.0
    check: dict | None = None
    validation: dict | None = None
    memo: dict = field(default_factory=dict, repr=False)
    reports: dict = field(default_factory=dict, repr=False)
    path: list = field(default_factory=list, repr=False)  # unit counts of check["path"]

    def __repr__(self) -> str:
        held = int(self.check["images"]) if self.check else 0
        guard = (f"at {percent(self.confidence, 0)} confidence" if self.confidence is not None
                 else "(point estimate)")
        what = {"accuracy": "top-1 loss", "agreement": "disagreement with the original",
                "kl": "KL divergence"}.get(self.criterion, self.criterion)
        bound = (f"{self.tolerance:.4g} nats" if self.criterion == "kl"
                 else points(self.tolerance).lstrip("+"))
        state = ""
        if self.check:
            state = (": nothing passed, the plan is empty" if self.check.get("chosen") is None
                     else ": failed, backed off" if self.check.get("backed_off") else ": passed")
        split = (f"  search split: {plural(self.search_images + held, 'image')}"
                 + (f" ({held} held back for the check{state})" if held else ""))
        if self.baseline_accuracy is not None:
            split += (f", top-1 {percent(self.baseline_accuracy)} -> "
                      f"{percent(self.search_accuracy)}")
        lines = [
            f"SearchResult: {self.granularity} plan, C {percent(self.saving_ratio)}, "
            f"{plural(self.evaluations, 'evaluation')} in {self.wall_time_s:.1f} s",
            f"  objective: {objective_label(self.objective)} {percent(self.objective_value)}",
            f"  guard: {what} within {bound} {guard}",
            split,
        ]
        if self.validation:
            before, after = self.validation["baseline"], self.validation["compressed"]
            lines.append(
                f"  validation: {plural(self.validation['images'], 'image')}, top-1 "
                f"{percent(before['accuracy'])} -> {percent(after['accuracy'])} "
                f"({points(after['accuracy'] - before['accuracy'])})")
        return "\n".join(lines)

    @property
    def granularity(self) -> str:
        """``element`` or ``channel``: the plan's granularity."""
        return self.plan.granularity

    def to_dict(self) -> dict:
        """A JSON-serialisable summary (the plan itself is saved with ``plan.save``).

        Example:
            >>> result.to_dict()["evaluations"]
            87
        """
        return {
            "granularity": self.granularity,
            "objective": self.objective,
            "objective_value": self.objective_value,
            "saving_ratio": self.saving_ratio,
            "criterion": self.criterion,
            "tolerance": self.tolerance,
            "confidence": self.confidence,
            "baseline_accuracy": self.baseline_accuracy,
            "search_accuracy": self.search_accuracy,
            "search_agreement": self.search_agreement,
            "search_kl": self.search_kl,
            "search_images": self.search_images,
            "evaluations": self.evaluations,
            "wall_time_s": self.wall_time_s,
            "thresholds": self.thresholds,
            "settings": self.settings,
            "check": self.check,
            "validation": self.validation,
            "trajectory": self.trajectory,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON (atomically).

        Example:
            >>> result.save("cats.search.json")
        """
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

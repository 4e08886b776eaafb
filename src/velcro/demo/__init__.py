"""The embedded demo: compress a digits classifier for a task of a few digits, end to end.

Nothing is downloaded. scikit-learn's bundled handwritten digits (1,797 real 8x8 scans,
upscaled to 32x32) train the built-in ResNet-18 on all ten digits once (the weights are cached);
then, for a task such as the digits 3 and 8:

1. the task's training images are split per digit: 20% for calibration, the other 80% as the
   search split; the task's test images (never trained on, never searched on) are the
   held-out validation set;
2. calibrate on the calibration images;
3. search element (VELCRO) and channel (S-VELCRO) plans that lose no top-1 on the search
   images, as point estimates (the papers' criterion), checked on a quarter of them held
   back (:data:`SEARCH_OPTIONS`). Not the library's default guard (2 points at 80%
   confidence): the 50 check images of a two-digit task cannot resolve 2 points at 80%
   (``Guard.resolves``), so it keeps only plans that change none of their predictions (an
   element plan of C 0% for seed 0); point estimates at 2 points lost up to 5.6 points of
   held-out top-1 over seeds 0-2, no loss and the check lost at most one of 107 images;
4. trim the channel plan into a smaller dense model;
5. evaluate the original, the element plan, the channel plan and the trimmed model on the
   held-out images, count MACs and parameters, time original against trimmed.

Why 20% for calibration: a two-digit task has about 250 training images here, so 20% is about
50 images, enough for stable per-element variances at this size; the papers' "under 2%" is of
thousands of ImageNet images, which would be 5 images here.

Example:
    >>> from velcro.demo import run_demo
    >>> result = run_demo(task=(3, 8), seed=0)
    >>> print(result.table())
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from velcro._format import objective_label, percent, plural
from velcro._io import atomic_group, folder_problem, write_text_atomic
from velcro.apply import apply
from velcro.calibrate import calibrate
from velcro.cost import cost
from velcro.data import digits
from velcro.demo import _parts as parts
from velcro.demo._digits_model import Recipe, trained_model
from velcro.errors import VelcroError
from velcro.evaluate import Report, evaluate
from velcro.plan import Plan
from velcro.report import measure_costs, write_report
from velcro.report._timing import latency_ms
from velcro.search import SearchResult, SearchSchedule
from velcro.stats import Stats
from velcro.trim import trim

__all__ = ["DemoResult", "Recipe", "run_demo"]

CALIBRATION_FRACTION = 0.2
# A shorter search than velcro.search's default (8 levels, 3 refinement rounds): about 90
# evaluations per granularity, so that the demo runs in well under a minute from the cache.
SCHEDULE = SearchSchedule(levels=4, refine_rounds=1)
LATENCY_BATCH = 32
# no top-1 loss on the search images and on the held-back check, as point estimates (see the
# module docstring); the held-out test is what tells
SEARCH_OPTIONS = {"tolerance": 0.0, "confidence": None}
# what the demo writes into its output folder
OUTPUT_FILES = tuple(
    f"{granularity}.{suffix}" for granularity in ("element", "channel")
    for suffix in ("plan.json", "plan.json.safetensors", "search.json", "report.html",
                   "report.md")
) + ("table.txt", "results.json")


@dataclass
class DemoResult:
    """Everything the demo measured.

    Attributes:
        task: the task's digits.
        seed: seed of the split and of the training.
        from_cache: True when the model's weights came from the cache (no training ran).
        weights_path: the cached weights file.
        model_accuracy: the model's top-1 on all ten digits' test images.
        images: image counts of the ``calibration``, ``search`` and ``test`` sets.
        searches: the ``element`` and ``channel`` search results (plans, search accuracy,
            evaluations, trajectory).
        reports: held-out evaluation per model variant (``original``, ``element``,
            ``channel``, ``trimmed``).
        rows: the table's rows (see :meth:`table`).
        stats: the calibration statistics.
        costs: per granularity, MACs and parameters before and after (and latency for the
            trimmed channel plan), as :func:`velcro.report.measure_costs` gives them.
        seconds: wall time per stage.
        files: files written to the output folder.

    Example:
        >>> result = run_demo(out_dir=None)
        >>> result
        DemoResult: digits 3,8, seed 0; 107 held-out test images
          original 97.20%; element plan C 30.00%: 98.13%; channel plan C 29.35%, trimmed: 96.26%
    """

    task: tuple[int, ...]
    seed: int
    from_cache: bool
    weights_path: Path
    model_accuracy: float
    images: dict[str, int]
    searches: dict[str, SearchResult]
    reports: dict[str, Report]
    rows: list[dict]
    stats: Stats
    costs: dict[str, dict]
    seconds: dict[str, float] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def __repr__(self) -> str:
        element, channel = self.searches["element"], self.searches["channel"]
        accuracy = {name: percent(report.accuracy) for name, report in self.reports.items()}
        return (f"DemoResult: digits {','.join(map(str, self.task))}, seed {self.seed}; "
                f"{plural(self.images['test'], 'held-out test image')}\n"
                f"  original {accuracy['original']}; element plan C "
                f"{percent(element.saving_ratio)}: {accuracy['element']}; channel plan C "
                f"{percent(channel.saving_ratio)}, trimmed: {accuracy['trimmed']}")

    @property
    def plans(self) -> dict[str, Plan]:
        """The ``element`` and ``channel`` plans the searches found."""
        return {granularity: found.plan for granularity, found in self.searches.items()}

    def table(self) -> str:
        """A plain-text table: C, MACs and parameters saved, latency, accuracy with 95% CI,
        and below it what the figures are (which MACs are saved, the latency's batch and
        runs, the channel search's objective beside the MACs the trimmed model saves).

        Example:
            >>> print(run_demo(out_dir=None).table())
        """
        source = "from cache" if self.from_cache else f"trained in {self.seconds['model']:.0f} s"
        head = (
            f"velcro demo: digits {','.join(map(str, self.task))} | ResNet-18 on 32x32 digits, "
            f"seed {self.seed}, {source}, {100 * self.model_accuracy:.1f}% on all ten digits\n"
            f"the task's {plural(sum(self.images.values()), 'image')}: "
            f"{self.images['calibration']} for calibration, {self.images['search']} for the "
            f"search, {self.images['test']} held out for the test; top-1 over all 10 classes\n"
        )
        channel = self.searches["channel"]
        costs = self.costs["channel"]
        saved = 1 - costs["compressed"]["macs"] / costs["original"]["macs"]
        latency = costs["latency_ms"]
        notes = [
            "* MACs that hardware skipping single outputs would save; run densely (velcro.apply)"
            " an element plan saves none.",
            f"latency: ms per batch of {plural(latency['batch'], 'image')}, median [interquartile "
            f"range] of {plural(latency['runs'], 'interleaved run')}.",
            f"channel search objective: {objective_label(channel.objective)} "
            f"{percent(channel.objective_value)}; MACs the trimmed model saves (counted on it): "
            f"{percent(saved)}.",
            parts.guard_note(channel),
        ]
        return head + parts.format_table(self.rows) + "\n" + "\n".join(notes)

    def to_dict(self) -> dict:
        """A JSON-ready summary (search trajectories left out; see the search files)."""
        searches = {}
        for granularity, found in self.searches.items():
            summary = found.to_dict()
            summary.pop("trajectory")
            searches[granularity] = summary
        return {
            "task": list(self.task),
            "seed": self.seed,
            "from_cache": self.from_cache,
            "weights_path": str(self.weights_path),
            "model_accuracy": self.model_accuracy,
            "images": self.images,
            "rows": self.rows,
            "searches": searches,
            "reports": {name: report.to_dict() for name, report in self.reports.items()},
            "costs": self.costs,
            "seconds": self.seconds,
            "files": [str(p) for p in self.files],
        }


def run_demo(
    task: Sequence[int] | str = (3, 8),
    *,
    seed: int = 0,
    budget: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    out_dir: str | os.PathLike[str] | None = "velcro-demo",
    progress: bool = True,
    recipe: Recipe | None = None,
    schedule: SearchSchedule | None = None,
    calibration_fraction: float = CALIBRATION_FRACTION,
    latency_repeats: int = 21,
    search_options: dict | None = None,
) -> DemoResult:
    """Train (or load) the digits model, compress it for ``task`` and measure the result.

    Args:
        task: the task's digits, e.g. ``(3, 8)`` or ``"4,7,9"``.
        seed: seed of the train/test split, the training and the calibration/search split.
        budget: the most candidate evaluations each search (element, channel) may spend
            (None: the schedule's own length, about 90).
        cache_dir: folder of the cached weights (default: $VELCRO_CACHE, else
            $XDG_CACHE_HOME/velcro, else ~/.cache/velcro).
        use_cache: False retrains the model and overwrites the cached weights.
        out_dir: folder for ``results.json``, the plans and the report; None writes nothing.
        progress: show progress bars and stage lines on stderr.
        recipe: training recipe (tests use a tiny one).
        schedule: the search schedule (default :data:`SCHEDULE`).
        search_options: :func:`velcro.search`'s criterion, tolerance, confidence and
            check_fraction, over :data:`SEARCH_OPTIONS` (no loss as point estimates, a
            quarter of the search images held back for the check).
        calibration_fraction: share of the task's training images used for calibration.
        latency_repeats: interleaved timing runs per model (the median is reported).

    Returns:
        A :class:`DemoResult`; ``print(result.table())`` shows the table.

    Example:
        >>> result = run_demo(task="4,7,9", seed=1, out_dir=None)
        >>> result.reports["trimmed"].accuracy == result.reports["channel"].accuracy
        True
    """
    task = digits.parse_task(task)
    if len(task) == digits.CLASSES:
        raise VelcroError("task names all ten digits; a specialized task is a few of them, "
                          "e.g. --task 3,8")
    if budget is not None and budget < 1:
        raise VelcroError(f"budget {budget} is too small; allow at least one evaluation")
    if out_dir is not None and (problem := folder_problem(out_dir)) is not None:
        raise VelcroError(f"output folder: {problem}")  # now, not after minutes of work
    recipe = recipe or Recipe()

    def say(text: str) -> None:
        if progress:
            print(f"velcro demo: {text}", file=sys.stderr, flush=True)

    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    split = digits.load(seed=seed, size=recipe.size, test_fraction=recipe.test_fraction)
    trained = trained_model(split, seed=seed, recipe=recipe, cache=cache_dir,
                            use_cache=use_cache, progress=progress)
    model = trained.model
    seconds["model"] = time.perf_counter() - clock
    if trained.cache_problem is not None:
        say(f"the cached model was unusable ({trained.cache_problem}); trained it again")
    say(("loaded " if trained.from_cache else "trained and cached ") + str(trained.path))

    task_train = digits.select(split.train, task)
    search_index, calibration_index = digits.split_stratified(
        task_train.tensors[1], calibration_fraction, seed)
    calibration_set = parts.subset(task_train, calibration_index)
    search_set = parts.subset(task_train, search_index)
    test_set = digits.select(split.test, task)
    search_data, test_data = parts.loader(search_set), parts.loader(test_set)

    clock = time.perf_counter()
    stats = calibrate(model, parts.loader(calibration_set), progress=progress)
    stats.info.update({"task": list(task), "data": f"sklearn digits {recipe.size}x{recipe.size}"})
    seconds["calibrate"] = time.perf_counter() - clock

    searches = {}
    for granularity in ("element", "channel"):
        say(f"searching {granularity} thresholds on the search split (top-1 within the "
            "tolerance, checked on held-back search images)")
        clock = time.perf_counter()
        searches[granularity] = parts.search_plan(model, stats, search_data, granularity, budget,
                                        schedule or SCHEDULE, progress,
                                        {**SEARCH_OPTIONS, **(search_options or {})})
        seconds[f"search_{granularity}"] = time.perf_counter() - clock

    clock = time.perf_counter()
    variants: dict[str, nn.Module] = {
        "original": model,
        "element": apply(model, searches["element"].plan),
        "channel": apply(model, searches["channel"].plan),
        "trimmed": trim(model, searches["channel"].plan),
    }
    seconds["trim"] = time.perf_counter() - clock

    clock = time.perf_counter()
    reports = {name: evaluate(variant, test_data, task_classes=task, progress=progress)
               for name, variant in variants.items()}
    seconds["evaluate"] = time.perf_counter() - clock

    say("counting MACs and timing the original against the trimmed model")
    clock = time.perf_counter()
    example = test_set.tensors[0][:1]
    base_cost, trimmed_cost = cost(model, example), cost(variants["trimmed"], example)
    savings = {"original": base_cost.reduction(base_cost),
               "trimmed": base_cost.reduction(trimmed_cost)}
    batch = test_set.tensors[0][:LATENCY_BATCH]
    latency = latency_ms({k: variants[k] for k in ("original", "trimmed")}, batch,
                         repeats=latency_repeats)
    costs = {
        "channel": {
            "original": {"macs": base_cost.macs, "parameters": base_cost.parameters},
            "compressed": {"macs": trimmed_cost.macs, "parameters": trimmed_cost.parameters},
            "saved_by": "trimmed model",
            "latency_ms": {"original": latency["original"], "compressed": latency["trimmed"],
                           "batch": latency["batch"], "runs": latency["runs"],
                           "spread": {"original": latency["spread"]["original"],
                                      "compressed": latency["spread"]["trimmed"]}},
            "method": "trimmed model (velcro.trim), counted by velcro.cost",
        },
        "element": measure_costs(model, searches["element"].plan, example, latency=False),
    }
    element = costs["element"]
    savings["element"] = {"macs": 1 - element["compressed"]["macs"] / element["original"]["macs"],
                          "parameters": 0.0}
    seconds["cost_and_latency"] = time.perf_counter() - clock

    rows = [_row("original", 0.0, savings["original"], latency["spread"]["original"],
                 searches["channel"].baseline_accuracy, reports["original"])]
    for name, label in (("element", "element plan (VELCRO)"),
                        ("channel", "channel plan (S-VELCRO)"),
                        ("trimmed", "channel plan, trimmed")):
        found = searches["element" if name == "element" else "channel"]
        rows.append(_row(label, found.saving_ratio, savings.get(name),
                         latency["spread"].get(name), found.search_accuracy, reports[name]))
    rows[1]["macs_saved_by"] = "skipping hardware"

    result = DemoResult(
        task, seed, trained.from_cache, trained.path, trained.test_accuracy,
        {"calibration": len(calibration_set), "search": len(search_set), "test": len(test_set)},
        searches, reports, rows, stats, costs, seconds,
    )
    if out_dir is not None:
        clock = time.perf_counter()
        with atomic_group():  # every result file, or none
            result.files = _write(result, Path(out_dir))
        seconds["write"] = time.perf_counter() - clock
    return result


def _row(label: str, saving_ratio: float, saved: dict | None, latency: dict | None,
         search_accuracy: float, report: Report) -> dict:
    return {
        "model": label,
        "saving_ratio": saving_ratio,
        "macs_saved": saved["macs"] if saved else None,
        "macs_saved_by": "model" if saved else None,
        "parameters_saved": saved["parameters"] if saved else None,
        "latency_ms": latency["median"] if latency else None,
        "latency": latency,
        "search_accuracy": search_accuracy,
        "accuracy": report.accuracy,
        "ci95": list(report.ci95),
        "correct": report.correct,
        "images": report.images,
    }


def _write(result: DemoResult, out_dir: Path) -> list[Path]:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VelcroError(f"cannot create output folder '{out_dir}': {exc.strerror or exc}; "
                          "pass a writable --out") from None
    files = []
    names = {"element": "element plan (VELCRO)", "channel": "channel plan (S-VELCRO), trimmed"}
    task = ",".join(map(str, result.task))
    for granularity, found in result.searches.items():
        plan_path = out_dir / f"{granularity}.plan.json"
        found.plan.save(plan_path)
        search_path = out_dir / f"{granularity}.search.json"
        found.save(search_path)
        report = write_report({
            "title": f"velcro demo: digits {task}, {names[granularity]}",
            "model": "resnet18 trained on sklearn digits at 32x32",
            "weights": str(result.weights_path),
            "task": f"digits {task}",
            "classes": list(result.task),
            "splits": result.images,
            "plan": found.plan,
            "stats": result.stats,
            "search": found,
            "baseline": result.reports["original"],
            "compressed": result.reports["trimmed" if granularity == "channel"
                                         else "element"],
            "cost": result.costs[granularity],
        }, out_dir / f"{granularity}.report.html")
        files += [plan_path, search_path, report["html"], report["markdown"]]
    table_path = out_dir / "table.txt"
    write_text_atomic(table_path, result.table() + "\n")
    results_path = out_dir / "results.json"
    files += [table_path, results_path]
    result.files = files
    write_text_atomic(results_path, json.dumps(result.to_dict(), indent=1) + "\n")
    return files

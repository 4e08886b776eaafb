"""Accuracy against compression-saving ratio, and the papers' tables, from stored curve points.

A sweep evaluates, on a task's validation images, uniform thresholds (every site the same
T) and searched plans (:func:`velcro.search` on the search split at several tolerances), at
element (VELCRO) and channel (S-VELCRO) granularity. Each evaluated plan is one *point*; the
tables and the Figure-2-style plots are computed from the points alone, so they can be
recomputed from the saved ``points.json`` / ``points.csv``.

Table definitions (per model, task, granularity and method):

- **maximum C at no accuracy loss**: the largest ``saving_ratio`` among the points that lose
  no top-1 *on the search split* (``search_correct >= search_baseline_correct``): every
  uniform threshold is evaluated on the search images too, and a searched plan was chosen
  there. The validation top-1 shown beside it is therefore held out: the images it is
  measured on played no part in choosing the point. Without search images (``search_data``
  None) the point is chosen on the validation images themselves, as the papers did, and the
  table says so (``chosen_on``). 0 when no point qualifies (C = 0 is the uncompressed model).
- **zero share**: of the compressed elements of a plan, those whose constant is exactly 0.0
  (float32 ``==``, no epsilon: a ReLU output whose mean is exactly 0 was 0 on every
  calibration image). Given at the maximum-C point, and as the range over all points with
  compressed elements.
- **largest accuracy gain**: the largest ``accuracy - baseline_accuracy`` on the validation
  images among the points, and the C where it happens (ties: the larger C); ``gain`` is None
  when no point beats the uncompressed model (a loss is never listed as a gain). This one
  is the best of many points measured on the same images, so it is optimistic.

Example:
    >>> result = velcro.sweep(model, stats, val_loader, search_data=search_loader,
    ...                       model_name="resnet18", task="cats")
    >>> result.save("sweeps/cats")          # points.json, points.csv, tables.md, curves PNG
    >>> print(result.markdown())
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from velcro._format import percent, plural
from velcro._io import atomic_path, write_text_atomic
from velcro.apply import apply
from velcro.errors import VelcroError
from velcro.evaluate import evaluate
from velcro.plan import GRANULARITIES, plan
from velcro.report._points import point as _point
from velcro.report._points import zero_elements
from velcro.search import UNGUARDED, SearchSchedule, search
from velcro.stats import Stats

__all__ = ["Sweep", "sweep", "zero_elements"]

FORMAT = "velcro.sweep/1"
THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(11))
TOLERANCES = (0.0, 0.01, 0.02, 0.05)
COLUMNS = ("model", "task", "granularity", "method", "setting", "saving_ratio", "accuracy",
           "correct", "images", "baseline_accuracy", "baseline_correct", "search_accuracy",
           "search_correct", "search_images", "search_baseline_correct",
           "compressed_elements", "zero_elements", "zero_share", "evaluations")
_GROUP = ("model", "task", "granularity", "method")


@dataclass
class Sweep:
    """Curve points of one or more models and tasks, and the tables computed from them.

    Attributes:
        points: one dict per evaluated plan, with the keys of ``COLUMNS``.
        info: free-form metadata (split sizes, settings).

    ``print(sweep)`` shows the maximum C per task in a few lines; :meth:`markdown` gives
    the papers' tables and :meth:`to_dict` everything as plain data.

    Example:
        >>> result
        Sweep: 30 points of 1 model (resnet18) on 1 task (cats)
          cats element uniform: max C 30.00% at no loss on the search split, held-out top-1 97.50%
    """

    points: list[dict]
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        models = list(dict.fromkeys(str(p["model"]) for p in self.points))
        tasks = list(dict.fromkeys(str(p["task"]) for p in self.points))
        lines = [f"Sweep: {plural(len(self.points), 'point')} of "
                 f"{plural(len(models), 'model')} ({', '.join(models[:3])}"
                 f"{', ...' if len(models) > 3 else ''}) on {plural(len(tasks), 'task')} "
                 f"({', '.join(tasks[:3])}{', ...' if len(tasks) > 3 else ''})"]
        rows = self.tables()["max_saving_ratio"]
        for row in rows[:6]:
            where = ("on the search split, held-out top-1" if row["chosen_on"] == "search"
                     else "on the validation images, top-1 there")
            lines.append(f"  {row['task']} {row['granularity']} {row['method']}: max C "
                         f"{percent(row['max_saving_ratio'])} at no loss {where} "
                         f"{percent(row['accuracy'])}")
        if len(rows) > 6:
            lines.append(f"  ... {len(rows) - 6} more (see .markdown())")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The points, the tables and the info as plain data (JSON-ready).

        Example:
            >>> result.to_dict()["tables"]["max_saving_ratio"][0]["chosen_on"]
            'search'
        """
        return {"format": FORMAT, "info": self.info, "columns": list(COLUMNS),
                "points": self.points, "tables": self.tables()}

    @classmethod
    def merge(cls, *sweeps: Sweep) -> Sweep:
        """One sweep holding the points of all (e.g. several tasks or models)."""
        return cls([p for s in sweeps for p in s.points],
                   {"merged": [s.info for s in sweeps]})

    def groups(self) -> dict[tuple, list[dict]]:
        """Points by (model, task, granularity, method), in first-seen order."""
        result: dict[tuple, list[dict]] = {}
        for point in self.points:
            result.setdefault(tuple(point[k] for k in _GROUP), []).append(point)
        return result

    def tables(self) -> dict[str, list[dict]]:
        """The papers' tables (see the module docstring) as rows of plain values.

        Example:
            >>> result.tables()["max_saving_ratio"][0]["max_saving_ratio"]
            0.3
        """
        max_rows, gain_rows, zero_rows = [], [], []
        for key, points in self.groups().items():
            row = dict(zip(_GROUP, key, strict=True))
            # choose on the search split whenever every point was measured there
            on_search = all(p.get("search_correct") is not None
                            and p.get("search_baseline_correct") is not None for p in points)
            if on_search:
                lossless = [p for p in points
                            if p["search_correct"] >= p["search_baseline_correct"]]
            else:
                lossless = [p for p in points if p["correct"] >= p["baseline_correct"]]
            best = max(lossless, key=lambda p: p["saving_ratio"], default=None)
            baseline = points[0]["baseline_accuracy"]
            accuracy = best["accuracy"] if best else baseline
            max_rows.append({
                **row,
                "chosen_on": "search" if on_search else "validation",
                "baseline_accuracy": baseline,
                "max_saving_ratio": best["saving_ratio"] if best else 0.0,
                "accuracy": accuracy,
                "change": (best["correct"] - best["baseline_correct"]) / best["images"]
                if best else 0.0,
                "search_accuracy": best.get("search_accuracy") if best else None,
                "zero_share": best["zero_share"] if best else None,
                "setting": best["setting"] if best else None,
            })
            change, at = max(((p["correct"] - p["baseline_correct"]) / p["images"],
                              p["saving_ratio"]) for p in points)
            gain_rows.append({**row, "gain": change if change > 0 else None,
                              "saving_ratio": at if change > 0 else None,
                              "best_change": change})
        by_task: dict[tuple, list[dict]] = {}
        for point in self.points:
            if point["compressed_elements"] > 0:
                key = (point["model"], point["task"], point["granularity"])
                by_task.setdefault(key, []).append(point)
        for (model, task, granularity), points in by_task.items():
            shares = [p["zero_share"] for p in points]
            zero_rows.append({"model": model, "task": task, "granularity": granularity,
                              "min_zero_share": min(shares), "max_zero_share": max(shares),
                              "points": len(points)})
        return {"max_saving_ratio": max_rows, "zero_share": zero_rows,
                "accuracy_gain": gain_rows}

    def markdown(self) -> str:
        """The tables as Markdown."""
        from velcro.report._tables import sweep_tables_markdown

        return sweep_tables_markdown(self.tables())

    def to_csv(self) -> str:
        """The points as CSV text, one row per plan, columns ``COLUMNS``."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        for point in self.points:
            writer.writerow({k: ("" if point.get(k) is None else point.get(k))
                             for k in COLUMNS})
        return buffer.getvalue()

    def plot(self, folder: str | os.PathLike) -> list[Path]:
        """Figure-2-style PNGs, one per model: top-1 against C, a panel per task."""
        from velcro.report._plots import sweep_figure

        folder = Path(folder)
        written = []
        for model in dict.fromkeys(p["model"] for p in self.points):
            path = folder / curves_file_name(model)
            with atomic_path(path) as tmp:
                tmp.write_bytes(sweep_figure([p for p in self.points if p["model"] == model],
                                             title=model))
            written.append(path)
        return written

    def save(self, folder: str | os.PathLike) -> list[Path]:
        """Write ``points.json``, ``points.csv``, ``tables.json``, ``tables.md`` and the
        curves into ``folder`` (created if missing); returns the paths written."""
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VelcroError(f"cannot create sweep folder '{folder}': {exc.strerror}; "
                              "choose a writable location") from None
        document = {"format": FORMAT, "info": self.info, "columns": list(COLUMNS),
                    "points": self.points}
        files = {
            "points.json": json.dumps(document, indent=1) + "\n",
            "points.csv": self.to_csv(),
            "tables.json": json.dumps(self.tables(), indent=1) + "\n",
            "tables.md": self.markdown() + "\n",
        }
        written = []
        for name, text in files.items():
            write_text_atomic(folder / name, text)
            written.append(folder / name)
        return written + self.plot(folder)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Sweep:
        """Read ``points.json`` (or a folder holding it) written by :meth:`save`; every
        point's fields are checked (see :mod:`velcro.report._inputs`)."""
        from velcro.report._inputs import read_sweep_file

        points, info = read_sweep_file(path)
        return cls(points, info)


def curves_file_name(model: str) -> str:
    """The name of a model's figure in a sweep folder: ``curves_<model>.png``, the model's
    name with anything but letters, digits, ``-`` and ``_`` replaced by ``_``."""
    return f"curves_{_slug(model)}.png"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(text)) or "model"


def sweep(
    model: nn.Module,
    stats: Stats,
    validation_data: Iterable,
    *,
    search_data: Iterable | None = None,
    model_name: str | None = None,
    task: str = "task",
    granularities: Sequence[str] = GRANULARITIES,
    thresholds: Sequence[float] = THRESHOLDS,
    tolerances: Sequence[float] = TOLERANCES,
    task_classes: Sequence[int] | None = None,
    schedule: SearchSchedule | None = None,
    budget: int | None = None,
    search_options: dict | None = None,
    progress: bool = True,
) -> Sweep:
    """Top-1 on the validation images against C, for uniform and searched plans.

    Args:
        model: the uncompressed model.
        stats: its calibration statistics on the task.
        validation_data: labelled batches of the validation split (re-iterated per point).
        search_data: labelled batches of the search split (images neither calibrated nor
            validated on). Every point is also evaluated on them, and the tables choose the
            maximum C there, so the validation top-1 they show is held out; the searched
            plans are searched on them. Without it only uniform thresholds are swept and
            the tables choose on the validation images themselves (as the papers did).
        model_name, task: labels of the points (tables and plots are per model and task).
        granularities: ``element`` and/or ``channel``.
        thresholds: the uniform thresholds.
        tolerances: the search tolerances (each a searched point per granularity; empty:
            no search, the search images still choose among the uniform thresholds).
        task_classes: restrict the argmax to these classes, if given.
        schedule, budget: passed to :func:`velcro.search`.
        search_options: the search's criterion, confidence and check
            (:func:`velcro.search`'s keywords); default ``UNGUARDED`` (from
            ``velcro.search``) without its tolerance: top-1 point estimates on every search
            image, so that the tolerances are points of search top-1. Give e.g.
            ``{"confidence": 0.8, "check_fraction": 0.25}`` with tolerances above 0 to
            sweep the guarded search.
        progress: show progress on stderr.

    Returns:
        A :class:`Sweep`; merge several with :meth:`Sweep.merge`.

    Example:
        >>> cats = velcro.sweep(model, cats_stats, cats_val, search_data=cats_search,
        ...                     model_name="resnet18", task="cats")
        >>> both = Sweep.merge(cats, dogs)
        >>> both.save("sweeps")
    """
    for granularity in granularities:
        if granularity not in GRANULARITIES:
            raise VelcroError(f"granularity '{granularity}' is unknown; use 'element' or "
                              "'channel'")
    stats.check_model(model)
    name = model_name or type(model).__name__
    labels = {"model": name, "task": task}
    steps = len(granularities) * (len(thresholds) + (len(tolerances) if search_data else 0))
    bar = tqdm(total=steps + 1, unit="plan", desc=f"sweep {task}", disable=not progress,
               file=sys.stderr)

    def measure(candidate, data=validation_data):
        return evaluate(candidate, data, task_classes=task_classes, progress=False)

    def on_search(candidate, baseline_correct: int | None) -> dict:
        """The candidate's top-1 on the search images: what chooses the table's point."""
        if search_data is None:
            return {"search_correct": None, "search_images": None,
                    "search_baseline_correct": None}
        report = measure(candidate, search_data)
        return {"search_correct": report.correct, "search_images": report.images,
                "search_baseline_correct": baseline_correct}

    options = {key: value for key, value in UNGUARDED.items() if key != "tolerance"}
    options.update(search_options or {})
    points = []
    previous = None
    with bar:
        baseline = measure(model)
        search_baseline = on_search(model, None)["search_correct"]
        bar.update(1)
        for granularity in granularities:
            for threshold in thresholds:
                uniform = plan(stats, threshold, granularity=granularity)
                compressed = apply(model, uniform, check=False)
                points.append(_point(uniform, measure(compressed), baseline, **labels,
                                     method="uniform", setting=float(threshold),
                                     search_accuracy=None, evaluations=None,
                                     **on_search(compressed, search_baseline)))
                bar.update(1)
            if search_data is None:
                continue
            previous = None
            # the largest tolerance first: its profile holds every point the smaller need
            for tolerance in sorted(tolerances, reverse=True):
                result = search(model, stats, search_data, granularity=granularity,
                                **{**options, "tolerance": tolerance},
                                schedule=schedule, budget=budget,
                                task_classes=task_classes, reuse=previous, progress=False)
                previous = result
                compressed = apply(model, result.plan, check=False)
                points.append(_point(result.plan, measure(compressed), baseline, **labels,
                                     method="search", setting=float(tolerance),
                                     search_accuracy=result.search_accuracy,
                                     evaluations=result.evaluations,
                                     **on_search(compressed, search_baseline)))
                bar.update(1)
    info = {"model": name, "task": task, "stats_images": stats.count,
            "validation_images": baseline.images,
            "search_images": (previous.search_images if previous is not None
                              else points[0]["search_images"] if points else None),
            "chosen_on": "search" if search_data is not None else "validation",
            "thresholds": list(thresholds), "tolerances": list(tolerances),
            "torch": torch.__version__}
    return Sweep(points, info)

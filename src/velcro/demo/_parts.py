"""Pieces of the digits demo: data loaders and the results table."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from velcro._format import percent, plural, points
from velcro.search import SearchResult, SearchSchedule, search


def loader(dataset: TensorDataset, batch_size: int = 256) -> DataLoader:
    """In-order batches (no shuffling: evaluations must pair image by image)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def subset(dataset: TensorDataset, indices: torch.Tensor) -> TensorDataset:
    return TensorDataset(*(t[indices] for t in dataset.tensors))


def _percent(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def format_table(rows: list[dict]) -> str:
    """The demo's results as an aligned plain-text table, one row per model variant.

    Each row has ``model``, ``saving_ratio``, ``macs_saved`` (``macs_saved_by``: ``skipping
    hardware`` marks it with ``*``), ``parameters_saved``, ``latency`` (median, q1, q3),
    ``search_accuracy``, ``accuracy`` and ``ci95`` (None where it does not apply).
    """
    header = ["model", "C", "MACs saved", "params saved", "latency ms [IQR]",
              "search acc", "test accuracy (95% CI)"]
    lines = []
    for row in rows:
        ci = row.get("ci95")
        accuracy = _percent(row.get("accuracy"))
        if ci is not None:
            accuracy += f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})"
        latency = row.get("latency")
        macs = _percent(row.get("macs_saved"))
        if row.get("macs_saved_by") == "skipping hardware":
            macs += "*"
        lines.append([
            row["model"],
            _percent(row.get("saving_ratio")),
            macs,
            _percent(row.get("parameters_saved")),
            "-" if not latency else
            f"{latency['median']:.2f} [{latency['q1']:.2f}-{latency['q3']:.2f}]",
            _percent(row.get("search_accuracy")),
            accuracy,
        ])
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(header), rule, *(render(r) for r in lines)])


def guard_note(found: SearchResult) -> str:
    """What the searches kept, in a line: the tolerance, the estimate, the check."""
    held = found.check["images"] if found.check else 0
    estimate = ("point estimates" if found.confidence is None
                else f"{percent(found.confidence, 0)} confidence bounds")
    bound = ("no top-1 loss" if found.tolerance == 0
             else f"top-1 within {points(found.tolerance).lstrip('+')}")
    line = f"search: {bound} on {plural(found.search_images, 'search image')} ({estimate})"
    return line + (f", checked on {held} held back from them." if held else ".")


def search_plan(model: nn.Module, stats, data, granularity: str, budget: int | None,
                schedule: SearchSchedule, progress: bool, options: dict) -> SearchResult:
    """The most saving plan the search's guard accepts on ``data`` (and its held-back check):
    C for element plans, MACs for channel plans (those are trimmed, so their MACs are really
    saved)."""
    objective = "saving_ratio" if granularity == "element" else "macs"
    return search(model, stats, data, granularity=granularity, objective=objective,
                  budget=budget, schedule=schedule, progress=progress, **options)

"""A report a person would read: one self-contained HTML page and a Markdown twin per run.

The page holds the model and task, split sizes, accuracy before and after with 95%
intervals, C, MACs and parameters saved, latency, the plan per site (thresholds and the
variance distribution), the search's candidates and the sweep's curves and tables. Images
are PNGs embedded as data URIs, the CSS is inline, nothing is fetched. The Markdown twin
references the same PNGs, written to a folder beside it.

Example:
    >>> write_report({"model": "resnet18", "task": "cats", "plan": result.plan,
    ...               "stats": stats, "search": result, "splits": {"search": 250}},
    ...              "cats.report.html")
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from velcro._io import atomic_path, write_text_atomic
from velcro.errors import VelcroError
from velcro.plan import Plan
from velcro.report._html import page
from velcro.report._sections import markdown, sections, with_recorded_info
from velcro.report._timing import latency_ms
from velcro.stats import Stats

__all__ = ["measure_costs", "write_report"]


def _plan(value) -> Plan | None:
    if value is None or isinstance(value, Plan):
        return value
    return Plan.load(value)


def _stats(value) -> Stats | None:
    if value is None or isinstance(value, Stats):
        return value
    return Stats.load(value)


def _search(value) -> dict | None:
    if value is None or isinstance(value, Mapping):
        return value
    return value.to_dict()


def _sweep(value):
    if value is None:
        return None
    from velcro.report.sweep import Sweep

    return value if isinstance(value, Sweep) else Sweep.load(value)


def measure_costs(model: nn.Module, plan: Plan, example_input: torch.Tensor, *,
                  latency: bool = True, repeats: int = 10) -> dict:
    """MACs, parameters and (optionally) latency of the model before and after the plan.

    Channel plans are trimmed (:func:`velcro.trim`) and the smaller model is counted and
    timed: its MACs are really saved (``"saved_by": "trimmed model"``). Element plans keep
    every weight and a dense framework computes every output anyway: their MACs after are
    the original's minus the MACs of the convolution outputs that hardware skipping single
    outputs would not compute (each replaced element saves its producer's MACs per output
    element; ``"saved_by": "skipping hardware"``), and they are not timed.

    Args:
        model: the uncompressed model.
        plan: the plan.
        example_input: a batch of inputs (its batch size is the timed batch).
        latency: time both models (``repeats`` interleaved runs: median, quartiles, extremes).
        repeats: timed runs per model.

    Returns:
        ``{"original": {"macs", "parameters"}, "compressed": {...}, "saved_by": text,
        "latency_ms": {"original": median, "compressed": median, "batch", "runs",
        "spread"} or None, "method": text}``, ready for :func:`write_report`'s ``cost``.

    Example:
        >>> costs = measure_costs(model, result.plan, torch.zeros(32, 3, 224, 224))
    """
    from velcro.cost import cost
    from velcro.graph import find_sites, trace

    before = cost(model, example_input[:1])
    original = {"macs": before.macs, "parameters": before.parameters}
    timings = None
    if plan.granularity == "channel":
        from velcro.trim import trim

        small = trim(model, plan, input_shape=tuple(example_input.shape[1:]))
        after = cost(small, example_input[:1])
        compressed = {"macs": after.macs, "parameters": after.parameters}
        method = "trimmed model (velcro.trim), counted by velcro.cost"
        saved_by = "trimmed model"
        if latency:
            timings = latency_ms({"original": model.eval(), "compressed": small},
                                 example_input, repeats=repeats)
    else:
        layer_macs = {layer.name: layer.macs for layer in before.layers}
        producers = {s.name: s.producer for s in find_sites(trace(model))}
        thresholds = plan.thresholds()
        saved = sum(thresholds[name] * layer_macs.get(producers.get(name, ""), 0)
                    for name in plan.sites)
        compressed = {"macs": int(round(before.macs - saved)), "parameters": before.parameters}
        method = ("element plan: producer MACs of the replaced elements subtracted, what "
                  "hardware skipping single outputs saves; a dense framework (and the "
                  "trimmed model) computes them all and saves none; weights are kept")
        saved_by = "skipping hardware"
    return {"original": original, "compressed": compressed, "saved_by": saved_by,
            "latency_ms": timings, "method": method}


def write_report(run: Mapping, out_path: str | os.PathLike) -> dict[str, Path]:
    """Write ``out_path`` (one self-contained HTML file) and its Markdown twin.

    Args:
        run: what to report; every entry is optional:
            ``title``, ``model``, ``weights``, ``task``, ``classes`` (task class indices),
            ``splits`` (set name -> image count), ``plan`` (:class:`Plan` or its file),
            ``stats`` (:class:`Stats` or its file), ``search`` (:class:`SearchResult` or
            its ``to_dict()``), ``baseline`` / ``compressed`` (validation
            :class:`Report` or ``{"accuracy", "images", ...}``; default: the search
            result's validation), ``validation`` (as ``SearchResult.validation``),
            ``cost`` (from :func:`measure_costs`), ``sweep`` (:class:`Sweep` or its folder).
            ``model``, ``weights``, ``task`` and ``classes`` default to what the
            statistics (or the plan) record.
        out_path: the HTML file; the Markdown twin is written beside it with the suffix
            ``.md``, its PNGs in the folder ``<name>_files``.

    Returns:
        ``{"html": path, "markdown": path, "figures": folder}``.

    Example:
        >>> write_report({"model": "resnet18", "task": "cats", "search": result,
        ...               "plan": result.plan, "stats": stats}, "cats.report.html")
    """
    out_path = Path(out_path)
    plan = _plan(run.get("plan") or getattr(run.get("search"), "plan", None))
    stats, search, sweep = _stats(run.get("stats")), _search(run.get("search")), \
        _sweep(run.get("sweep"))
    figures: dict[str, bytes] = {}
    run = with_recorded_info(run, stats, plan)
    cards, parts = sections(run, plan, stats, search, sweep, figures)
    title = run.get("title") or "velcro report: " + " · ".join(
        str(x) for x in (run.get("model"), run.get("task")) if x)
    made = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    subtitle = ("Value-locality compression (VELCRO / S-VELCRO): activations with low "
                "variance on the task's images replaced by their means.")
    footer = f"written by velcro on {made}"
    html_text = page(title, subtitle, cards, parts, footer)
    files_dir = out_path.with_name(out_path.stem + "_files")
    markdown_path = out_path.with_suffix(".md")
    write_text_atomic(out_path, html_text)
    try:
        files_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise VelcroError(f"cannot create '{files_dir}' for the report's images: "
                          f"{exc.strerror}; choose a writable location") from None
    for name, png in figures.items():
        with atomic_path(files_dir / name) as tmp:
            tmp.write_bytes(png)
    write_text_atomic(markdown_path, markdown(title, subtitle, cards, parts,
                                              files_dir.name) + f"\n_{footer}_\n")
    return {"html": out_path, "markdown": markdown_path, "figures": files_dir}

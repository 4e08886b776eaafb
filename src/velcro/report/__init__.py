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
import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from velcro._io import atomic_path, write_text_atomic
from velcro.errors import VelcroError
from velcro.evaluate import Report, wilson_interval
from velcro.plan import Plan
from velcro.report import _plots as plots
from velcro.report._html import page
from velcro.report._search import search_parts
from velcro.report._tables import Table, count, interval, pct, points, sweep_tables
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


def _accuracy(value) -> dict | None:
    """{accuracy, ci95, images, correct} from a Report or a dict holding those."""
    if value is None:
        return None
    if isinstance(value, Report):
        return {"accuracy": value.accuracy, "ci95": list(value.ci95), "images": value.images,
                "correct": value.correct}
    images = value.get("images")
    correct = value.get("correct")
    if correct is None and images:
        correct = round(value["accuracy"] * images)
    ci95 = value.get("ci95") or (list(wilson_interval(correct, images)) if images else None)
    return {"accuracy": value["accuracy"], "ci95": ci95, "images": images, "correct": correct}


def _search(value) -> dict | None:
    if value is None or isinstance(value, Mapping):
        return value
    return value.to_dict()


def _sweep(value):
    if value is None:
        return None
    from velcro.report.sweep import Sweep

    return value if isinstance(value, Sweep) else Sweep.load(value)


@torch.no_grad()
def _latency_ms(models: dict[str, nn.Module], batch: torch.Tensor, repeats: int) -> dict:
    for model in models.values():
        for _ in range(2):
            model(batch)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):  # interleaved, so a busy machine slows both alike
        for name, model in models.items():
            began = time.perf_counter()
            model(batch)
            times[name].append(1e3 * (time.perf_counter() - began))
    return {name: statistics.median(values) for name, values in times.items()}


def measure_costs(model: nn.Module, plan: Plan, example_input: torch.Tensor, *,
                  latency: bool = True, repeats: int = 10) -> dict:
    """MACs, parameters and (optionally) latency of the model before and after the plan.

    Channel plans are trimmed (:func:`velcro.trim`) and the smaller model is counted and
    timed. Element plans keep every weight; their MACs after are the original's minus the
    MACs of the convolution outputs no longer computed (each replaced element of a site
    saves its producer's MACs per output element), and they are not timed (a dense
    framework computes them anyway).

    Args:
        model: the uncompressed model.
        plan: the plan.
        example_input: a batch of inputs (its batch size is the timed batch).
        latency: time both models (median of ``repeats`` interleaved runs).

    Returns:
        ``{"original": {"macs", "parameters"}, "compressed": {...}, "latency_ms": {...} or
        None, "method": text}``, ready for :func:`write_report`'s ``cost`` entry.

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
        if latency:
            timed = _latency_ms({"original": model.eval(), "compressed": small}, example_input,
                                repeats)
            timings = {**timed, "batch": int(example_input.shape[0])}
    else:
        layer_macs = {layer.name: layer.macs for layer in before.layers}
        producers = {s.name: s.producer for s in find_sites(trace(model))}
        thresholds = plan.thresholds()
        saved = sum(thresholds[name] * layer_macs.get(producers.get(name, ""), 0)
                    for name in plan.sites)
        compressed = {"macs": int(round(before.macs - saved)), "parameters": before.parameters}
        method = ("element plan: producer MACs of the replaced elements subtracted "
                  "(what skipping hardware saves); weights are kept")
    return {"original": original, "compressed": compressed, "latency_ms": timings,
            "method": method}


def _site_rows(plan: Plan) -> list[dict]:
    total = sum(s.elements for s in plan.sites.values()) or 1
    thresholds = plan.thresholds()
    rows = []
    for name, site in plan.sites.items():
        units = site.elements if plan.granularity == "element" else site.channels
        mask = plan.mask(name)
        zeros = int((site.constant[mask] == 0).sum()) if site.units.numel() else 0
        rows.append({"site": name, "shape": "x".join(map(str, site.shape)),
                     "threshold": thresholds[name], "chosen": int(site.units.numel()),
                     "units": units, "elements": site.elements,
                     "share": site.elements / total, "zero_constants": zeros,
                     "replaced_elements": plan.chosen_elements(name)})
    return rows


def _sections(run: Mapping, plan: Plan | None, stats: Stats | None, search: dict | None,
              sweep, figures: dict) -> tuple[list[tuple[str, str]], list]:
    """Cards and sections; ``figures`` collects name -> PNG for the Markdown twin."""
    def figure(name: str, png: bytes, caption: str):
        figures[name] = png
        return ("figure", png, caption, name)

    cards, sections = [], []
    overview = [["model", str(run.get("model") or "–")],
                ["weights", str(run.get("weights") or "–")],
                ["task", str(run.get("task") or "–")]]
    if run.get("classes"):
        classes = list(run["classes"])
        shown = ", ".join(map(str, classes[:12])) + (" ..." if len(classes) > 12 else "")
        overview.append(["task classes", f"{shown} ({len(classes)})"])
    for name, n in (run.get("splits") or {}).items():
        overview.append([f"{name} images", count(int(n))])
    if stats is not None and (run.get("splits") or {}).get("calibration") != stats.count:
        overview.append(["images the statistics hold", count(stats.count)])
    if plan is not None:
        overview += [["granularity", plan.granularity], ["ranking score", plan.score],
                     ["constant", plan.constant_kind],
                     ["compression-saving ratio C", pct(plan.saving_ratio)]]
        cards.append(("C (compression-saving ratio)", pct(plan.saving_ratio)))
    sections.append(("Run", [Table("", ["", "value"], overview, "ll")]))

    validation = run.get("validation") or (search or {}).get("validation") or {}
    before = _accuracy(run.get("baseline") or validation.get("baseline"))
    after = _accuracy(run.get("compressed") or validation.get("compressed"))
    rows = []
    for label, result in (("uncompressed, validation", before),
                          ("compressed, validation", after)):
        if result is not None:
            rows.append([label, pct(result["accuracy"]), interval(result["ci95"]),
                         count(result["images"])])
    if search is not None:
        images = search.get("search_images")
        for label, key in (("uncompressed, search split", "baseline_accuracy"),
                           ("compressed, search split", "search_accuracy")):
            if search.get(key) is None:  # searched on unlabelled images
                continue
            result = _accuracy({"accuracy": search[key], "images": images})
            rows.append([label, pct(result["accuracy"]), interval(result["ci95"]),
                         count(images)])
    if rows:
        parts: list = [Table("Top-1 accuracy (argmax over all classes)",
                             ["model", "top-1", "95% CI (Wilson)", "images"], rows, "lrrr")]
        paired = validation.get("paired") if isinstance(validation, Mapping) else None
        if before and after and not paired and before["images"] == after["images"]:
            paired = {"difference": after["accuracy"] - before["accuracy"], "ci95": None}
        if paired:
            note = f"compressed − uncompressed on the validation images: " \
                   f"{points(paired['difference'])}"
            if paired.get("ci95"):
                note += f", 95% CI [{points(paired['ci95'][0])}, {points(paired['ci95'][1])}]"
            if "gained" in paired:
                note += f"; {paired['gained']} images gained, {paired['lost']} lost"
            if validation.get("agreement") is not None:
                note += (f"; top-1 agreement with the uncompressed model "
                         f"{pct(validation['agreement'])}")
            parts.append(("note", note + " (paired, same images)."))
        if before and after:
            cards.append(("top-1 before → after", f"{pct(before['accuracy'], 1)} → "
                                                   f"{pct(after['accuracy'], 1)}"))
        sections.append(("Accuracy", parts))

    costs = run.get("cost")
    if costs:
        original, compressed = costs["original"], costs["compressed"]
        rows = []
        for key, label in (("macs", "MACs per image"), ("parameters", "parameters")):
            o, c = int(original[key]), int(compressed[key])
            rows.append([label, count(o), count(c), pct(1 - c / o if o else 0.0)])
        latency = costs.get("latency_ms") or run.get("latency_ms")
        if latency:
            o, c = latency["original"], latency["compressed"]
            rows.append([f"latency, ms per batch of {latency.get('batch', '?')}", f"{o:.2f}",
                         f"{c:.2f}", pct(1 - c / o if o else 0.0)])
            cards.append(("speed-up (measured)", f"{o / c:.2f}x" if c else "–"))
        saved = 1 - int(compressed["macs"]) / int(original["macs"]) if original["macs"] else 0
        cards.append(("MACs saved", pct(saved)))
        parts = [Table("", ["", "uncompressed", "compressed", "saved"], rows, "lrrr")]
        if costs.get("method"):
            parts.append(("note", f"compressed cost: {costs['method']}."))
        sections.append(("Cost", parts))

    if plan is not None:
        site_rows = _site_rows(plan)
        parts = [figure("plan.png", plots.threshold_bars(
            plan.thresholds(), {r["site"]: r["share"] for r in site_rows}),
            "Threshold T_k per site and the site's share of all activation elements")]
        if stats is not None:
            parts.append(figure("variance.png", plots.variance_boxes(
                {name: stats.sites[name].variance for name in plan.sites if name in stats.sites}),
                "Distribution of log10 variance of each site's activation elements: box = "
                "quartiles, whiskers = 5th and 95th percentiles"))
        unit = "elements" if plan.granularity == "element" else "channels"
        table = Table(f"Plan per site ({plan.granularity}: {unit} replaced by constants)",
                      ["site", "shape", "T_k", f"{unit} replaced", "share of activations",
                       "zero constants"],
                      [[r["site"], r["shape"], pct(r["threshold"]),
                        f"{count(r['chosen'])} / {count(r['units'])}", pct(r["share"]),
                        count(r["zero_constants"])] for r in site_rows], "llrrrr")
        sections.append(("Plan", [*parts, ("scroll", table)]))

    if search is not None:
        sections.append(("Search", search_parts(search, figure)))

    if sweep is not None and sweep.points:
        parts = []
        for model in dict.fromkeys(p["model"] for p in sweep.points):
            chosen = [p for p in sweep.points if p["model"] == model]
            parts.append(figure(f"curves_{len(parts)}.png", plots.sweep_figure(chosen, model),
                                f"{model}: validation top-1 against C (uniform thresholds "
                                "and searched plans)"))
        parts += sweep_tables(sweep.tables())
        sections.append(("Accuracy against compression", parts))
    return cards, sections


def _markdown(title: str, subtitle: str, cards, sections, files_dir: str) -> str:
    lines = [f"# {title}", "", subtitle, ""]
    lines += [f"- **{label}**: {value}" for label, value in cards]
    for heading, parts in sections:
        lines += ["", f"## {heading}", ""]
        for part in parts:
            if isinstance(part, Table):
                lines += [part.markdown(), ""]
            elif part[0] == "figure":
                lines += [f"![{part[2]}]({files_dir}/{part[3]})", ""]
            elif part[0] == "scroll":
                lines += [part[1].markdown(), ""]
            elif part[0] == "note":
                lines += [part[1], ""]
    return "\n".join(lines).rstrip() + "\n"


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
    cards, sections = _sections(run, plan, stats, search, sweep, figures)
    title = run.get("title") or "velcro report: " + " · ".join(
        str(x) for x in (run.get("model"), run.get("task")) if x)
    made = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    subtitle = ("Value-locality compression (VELCRO / S-VELCRO): activations with low "
                "variance on the task's images replaced by their means.")
    footer = f"written by velcro on {made}"
    html_text = page(title, subtitle, cards, sections, footer)
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
    write_text_atomic(markdown_path, _markdown(title, subtitle, cards, sections,
                                               files_dir.name) + f"\n_{footer}_\n")
    return {"html": out_path, "markdown": markdown_path, "figures": files_dir}

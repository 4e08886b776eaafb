"""The report's content: cards and sections (tables, figures, notes), each figure named for
what it is: C, MACs saved by the trimmed model or by skipping hardware, the search's
objective, latency with its batch and spread, accuracy changes with their sign."""

from __future__ import annotations

from collections.abc import Mapping

from velcro._format import plural
from velcro.evaluate import Report, wilson_interval
from velcro.plan import Plan
from velcro.report import _plots as plots
from velcro.report._search import search_parts
from velcro.report._tables import Cell, Table, count, interval, pct, points, sweep_tables
from velcro.report._timing import latency_text
from velcro.stats import Stats

RECORDED = ("model", "weights", "task", "classes")


def with_recorded_info(run: Mapping, stats: Stats | None, plan: Plan | None) -> dict:
    """``run`` with the model, weights, task and classes the statistics (or the plan, which
    copies them) record, where ``run`` itself does not say."""
    recorded = {**(plan.info if plan is not None else {}),
                **(stats.info if stats is not None else {})}
    filled = dict(run)
    for key in RECORDED:
        if filled.get(key) in (None, "", []) and recorded.get(key) not in (None, "", []):
            filled[key] = recorded[key]
    return filled


def accuracy_of(value) -> dict | None:
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


def _overview(run: Mapping, plan: Plan | None, stats: Stats | None, cards: list) -> Table:
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
    return Table("", ["", "value"], overview, "ll")


def _accuracy_section(run: Mapping, search: dict | None, cards: list) -> list | None:
    validation = run.get("validation") or (search or {}).get("validation") or {}
    before = accuracy_of(run.get("baseline") or validation.get("baseline"))
    after = accuracy_of(run.get("compressed") or validation.get("compressed"))
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
            result = accuracy_of({"accuracy": search[key], "images": images})
            rows.append([label, pct(result["accuracy"]), interval(result["ci95"]),
                         count(images)])
    if not rows:
        return None
    parts: list = [Table("Top-1 accuracy (argmax over all classes)",
                         ["model", "top-1", "95% CI (Wilson)", "images"], rows, "lrrr")]
    paired = validation.get("paired") if isinstance(validation, Mapping) else None
    given = run.get("baseline"), run.get("compressed")
    if not paired and all(isinstance(r, Report) for r in given) and \
            given[0].images == given[1].images and bool((given[0].labels == given[1].labels).all()):
        paired = given[1].paired_difference(given[0])
    if before and after and not paired and before["images"] == after["images"]:
        paired = {"difference": after["accuracy"] - before["accuracy"], "ci95": None}
    if paired:
        change = points(paired["difference"])
        what = {"down": "a drop", "up": "a gain"}.get(change.tone, "no change")
        note = (f"top-1 change, compressed against uncompressed on the same validation "
                f"images: {change}, {what}")
        if paired.get("ci95"):
            note += f"; 95% CI [{points(paired['ci95'][0])}, {points(paired['ci95'][1])}]"
        if "gained" in paired:
            note += (f"; {plural(paired['gained'], 'image')} right only after compression, "
                     f"{plural(paired['lost'], 'image')} right only before")
        if isinstance(validation, Mapping) and validation.get("agreement") is not None:
            note += (f"; top-1 agreement with the uncompressed model "
                     f"{pct(validation['agreement'])}")
        parts.append(("note", Cell(note + " (paired).", change.tone)))
        cards.append(("top-1 change (validation)", change))
    if before and after:
        cards.append(("top-1 before → after", f"{pct(before['accuracy'], 1)} → "
                                               f"{pct(after['accuracy'], 1)}"))
    return parts


def _cost_section(costs: Mapping, plan: Plan | None, cards: list) -> list:
    original, compressed = costs["original"], costs["compressed"]
    saved_by = costs.get("saved_by") or ("skipping hardware" if plan is not None and
                                         plan.granularity == "element" else "trimmed model")
    column = ("with skipping hardware" if saved_by == "skipping hardware"
              else "trimmed model" if saved_by == "trimmed model" else "compressed")
    rows = []
    for key, label in (("macs", "MACs per image"), ("parameters", "parameters")):
        o, c = int(original[key]), int(compressed[key])
        rows.append([label, count(o), count(c), pct(1 - c / o if o else 0.0)])
    latency = costs.get("latency_ms")
    if latency:
        o, c = latency["original"], latency["compressed"]
        runs = f" over {plural(latency['runs'], 'run')}" if latency.get("runs") else ""
        batch = latency.get("batch")
        rows.append([f"latency per batch of {plural(batch, 'image') if batch else '?'} "
                     f"(median [IQR]{runs})", latency_text(latency, "original"),
                     latency_text(latency, "compressed"), pct(1 - c / o if o else 0.0)])
        cards.append((f"speed-up, batch of {batch} (measured)", f"{o / c:.2f}x" if c else "–"))
    saved = 1 - int(compressed["macs"]) / int(original["macs"]) if original["macs"] else 0
    cards.append((f"MACs saved ({saved_by})", pct(saved)))
    parts: list = [Table("", ["", "uncompressed", column, "saved"], rows, "lrrr")]
    if saved_by == "skipping hardware":
        parts.append(("note", "An element plan keeps every filter: the MACs saved are what "
                              "hardware that skips single outputs would save; the model as "
                              "a dense framework runs it saves none."))
    if costs.get("method"):
        parts.append(("note", f"how the compressed cost was counted: {costs['method']}."))
    return parts


def sections(run: Mapping, plan: Plan | None, stats: Stats | None, search: dict | None,
             sweep, figures: dict) -> tuple[list[tuple[str, str]], list]:
    """Cards and sections; ``figures`` collects name -> PNG for the Markdown twin."""
    def figure(name: str, png: bytes, caption: str):
        figures[name] = png
        return ("figure", png, caption, name)

    cards: list = []
    result = [("Run", [_overview(run, plan, stats, cards)])]
    accuracy = _accuracy_section(run, search, cards)
    if accuracy:
        result.append(("Accuracy", accuracy))
    costs = run.get("cost")
    if costs:
        result.append(("Cost", _cost_section(costs, plan, cards)))

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
        result.append(("Plan", [*parts, ("scroll", table)]))

    if search is not None:
        result.append(("Search", search_parts(search, costs, figure)))

    if sweep is not None and sweep.points:
        parts = []
        for model in dict.fromkeys(p["model"] for p in sweep.points):
            chosen = [p for p in sweep.points if p["model"] == model]
            parts.append(figure(f"curves_{len(parts)}.png", plots.sweep_figure(chosen, model),
                                f"{model}: validation top-1 against C (uniform thresholds "
                                "and searched plans)"))
        parts += sweep_tables(sweep.tables())
        result.append(("Accuracy against compression", parts))
    return cards, result


def markdown(title: str, subtitle: str, cards, sections, files_dir: str) -> str:
    """The Markdown twin of the page: the same cards, tables and notes, PNGs by file."""
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

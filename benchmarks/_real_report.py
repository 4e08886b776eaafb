"""bench_real's tables (Markdown) and figures (PNG) from its stored rows. Private."""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from pathlib import Path

from velcro._io import write_text_atomic

BEGIN, END = "<!-- bench_real:begin -->", "<!-- bench_real:end -->"


def _mean_sd(values, scale: float = 100.0, unit: str = "%") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.1f} ± {scale * sd:.1f}{unit}"


def _delta(rows) -> str:
    values = [r["heldout"]["difference"] for r in rows]
    return f"{100 * statistics.mean(values):+.2f} / {100 * min(values):+.2f}" if values else "–"


def _holds(rows) -> str:
    return f"{sum(r['heldout']['holds'] for r in rows)}/{len(rows)}" if rows else "–"


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "error" not in r and "heldout" in r]


def _groups(rows, *fields):
    grouped = defaultdict(list)
    for row in rows:
        grouped[tuple(row[f] for f in fields)].append(row)
    return grouped


def _issue14(rows: list[dict], figures: Path) -> list[str]:
    lines = ["### Issue 14: the search before the guard against the new defaults, same splits",
             "", "| task | model | granularity | today C | today Δ top-1 (mean / worst, pp) | "
             "today holds | new C | new Δ (mean / worst, pp) | new holds | C kept |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    pairs, today_all, new_all = [], [], []
    for granularity in ("element", "channel"):
        today = _groups([r for r in rows if r["method"] == f"today-{granularity}"],
                        "task", "model")
        new = _groups([r for r in rows if r["method"] == f"velcro-{granularity}"],
                      "task", "model")
        for (task, model), old in sorted(today.items()):
            mine = new.get((task, model), [])
            if not mine:
                continue
            old_c = statistics.mean(r["saving_ratio"] for r in old)
            new_c = statistics.mean(r["saving_ratio"] for r in mine)
            kept = f"{new_c / old_c:.2f}x" if old_c > 0 else "–"
            old_text = _mean_sd(r["saving_ratio"] for r in old)
            new_text = _mean_sd(r["saving_ratio"] for r in mine)
            lines.append(f"| {task} | {model} | {granularity} | {old_text} | {_delta(old)} | "
                         f"{_holds(old)} | {new_text} | {_delta(mine)} | {_holds(mine)} | "
                         f"{kept} |")
            pairs.append((old_c, new_c))
            today_all += old
            new_all += mine
    if not pairs:
        return []
    ratio_of_means = (sum(n for _, n in pairs) / sum(o for o, _ in pairs)
                      if sum(o for o, _ in pairs) > 0 else float("nan"))
    held = sum(r["heldout"]["holds"] for r in new_all)
    lines += ["", f"New defaults: held-out top-1 within -0.5 points or a 95% interval that "
              f"includes 0 in **{held}/{len(new_all)} runs ({100 * held / len(new_all):.0f}%; "
              f"goal >= 90%)**, keeping **{100 * ratio_of_means:.0f}% of today's C** on "
              "average (mean C over the same runs; goal >= 80%). Today's search: "
              f"{sum(r['heldout']['holds'] for r in today_all)}/{len(today_all)} runs hold.",
              "", "![C against the held-out top-1 change](" + _link(figures, "bench_real_"
                                                                   "tradeoff.png") + ")", ""]
    return lines


def _table1(rows: list[dict]) -> list[str]:
    lines = ["### Table 1 (VELCRO, element-wise): largest C with no held-out top-1 loss", "",
             "| task | model | searched C (new defaults) | held-out Δ ≥ 0 | papers' protocol: "
             "largest C on the held-out images with Δ ≥ 0 (chosen on them) |",
             "|---|---|---:|---:|---:|"]
    for (task, model), group in sorted(_groups(rows, "task", "model").items()):
        searched = [r for r in group if r["method"] == "velcro-element"]
        best = []
        for by_seed in _groups(group, "seed").values():
            points = [p for r in by_seed if r["method"] == "curve" for p in r["points"]
                      if p["granularity"] == "element"]
            points += [p for r in by_seed if r["method"] in ("velcro-element", "today-element")
                       for p in r.get("path", [])]
            best.append(max([p["saving_ratio"] for p in points if p["difference"] >= 0],
                            default=0.0))
        if searched:
            none_lost = sum(r["heldout"]["difference"] >= 0 for r in searched)
            lines.append(f"| {task} | {model} | {_mean_sd(r['saving_ratio'] for r in searched)}"
                         f" | {none_lost}/{len(searched)} | {_mean_sd(best)} |")
    return lines


def _table3_4(rows: list[dict]) -> list[str]:
    lines = ["### Table 3: compressed elements whose constant is 0 (element plans)", "",
             "| task | model | searched plan (new defaults) | uniform thresholds (range) |",
             "|---|---|---:|---:|"]
    for (task, model), group in sorted(_groups(rows, "task", "model").items()):
        searched = [r["zero_share"] for r in group if r["method"] == "velcro-element"]
        curve = [p["zero_share"] for r in group if r["method"] == "curve"
                 for p in r["points"] if p["granularity"] == "element" and p["zero_share"]
                 is not None]
        span = f"{100 * min(curve):.2f}-{100 * max(curve):.2f}%" if curve else "–"
        lines.append(f"| {task} | {model} | {_mean_sd(searched, unit='%')} | {span} |")
    lines += ["", "### Table 4: largest held-out top-1 increase over every plan measured", "",
              "| task | model | largest increase (mean over seeds, pp) | at C | "
              "granularity (seed 0) |", "|---|---|---:|---:|---|"]
    for (task, model), group in sorted(_groups(rows, "task", "model").items()):
        best = []
        for _, by_seed in sorted(_groups(group, "seed").items()):
            points = [p for r in by_seed if r["method"] == "curve" for p in r["points"]]
            points += [{**p, "granularity": r["method"].split("-")[-1]} for r in by_seed
                       for p in r.get("path", [])]
            if points:
                best.append(max(points, key=lambda p: (p["difference"], p["saving_ratio"])))
        if best:
            lines.append(f"| {task} | {model} | "
                         f"{100 * statistics.mean(p['difference'] for p in best):+.2f} | "
                         f"{_mean_sd(p['saving_ratio'] for p in best)} | "
                         f"{best[0]['granularity']} |")
    return lines


def _latency(timed: list[dict], batch: str) -> str:
    values = [t[batch] for t in timed if t.get(batch)]
    if not values:
        return "run --latency"
    return (f"{statistics.median(v['original'] for v in values):.2f} → "
            f"{statistics.median(v['compressed'] for v in values):.2f}")


def _svelcro(rows: list[dict], methods) -> list[str]:
    lines = ["### S-VELCRO: channel plans (new defaults), trimmed", "",
             "| task | model | C | MACs saved | filter memory saved | held-out Δ (mean / "
             "worst, pp) | holds | latency b1 (ms, orig → trimmed) | b32 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (task, model), group in sorted(_groups(
            [r for r in rows if r["method"] == "velcro-channel"], "task", "model").items()):
        timed = [r["latency_ms"] for r in group if r.get("latency_ms")]
        lines.append(f"| {task} | {model} | {_mean_sd(r['saving_ratio'] for r in group)} | "
                     f"{_mean_sd(r['macs_saved'] for r in group)} | "
                     f"{_mean_sd(r['parameters_saved'] for r in group)} | {_delta(group)} | "
                     f"{_holds(group)} | {_latency(timed, '1')} | {_latency(timed, '32')} |")
    lines += ["", "### Against what a user would pick instead (same splits, same guard and "
              "check)", "", "| method | MACs saved | C | parameters saved | held-out Δ "
              "(mean / worst, pp) | holds | runs |", "|---|---:|---:|---:|---:|---:|---:|"]
    means = {}
    for method in methods:
        chosen = [r for r in rows if r["method"] == method.name]
        if not chosen:
            continue
        macs = [r.get("macs_saved") for r in chosen]
        element = [r.get("element_macs_saved") for r in chosen]
        means[method.name] = (statistics.mean(m for m in macs if m is not None)
                              if any(m is not None for m in macs) else None)
        macs_text = (_mean_sd(macs) if means[method.name] is not None
                     else f"({_mean_sd(element)} if outputs are skipped)")
        lines.append(f"| {method.label} | {macs_text} | "
                     f"{_mean_sd(r.get('saving_ratio') for r in chosen)} | "
                     f"{_mean_sd(r.get('parameters_saved') for r in chosen)} | "
                     f"{_delta(chosen)} | {_holds(chosen)} | {len(chosen)} |")
    baselines = {m: v for m, v in means.items() if m in ("l1", "random", "torch-pruning")
                 and v is not None}
    if means.get("velcro-channel") is not None and baselines:
        best = max(baselines, key=baselines.get)
        ratio = means["velcro-channel"] / baselines[best] if baselines[best] > 0 else None
        lines += ["", f"velcro channel plans save {ratio:.2f}x the MACs of the best baseline "
                  f"({best}) (goal: at least 1.5x)." if ratio else
                  f"The best baseline ({best}) saves no MACs."]
    for granularity in ("element", "channel"):
        searched = [r["saving_ratio"] for r in rows if r["method"] == f"velcro-{granularity}"]
        uniform = [r["saving_ratio"] for r in rows if r["method"] == f"uniform-{granularity}"]
        if searched and uniform:
            lines.append(f"Searched {granularity} plans: C {_mean_sd(searched)}; best uniform "
                         f"threshold under the same guard: C {_mean_sd(uniform)}.")
    return lines


def _splits(rows: list[dict]) -> list[str]:
    lines = ["| task | model | images | classes | calibration (classes covered) | search "
             "(of which check) | held-out |", "|---|---|---:|---:|---:|---:|---:|"]
    seen = set()
    for row in rows:
        if row["method"] != "velcro-channel" or (row["task"], row["model"]) in seen:
            continue
        seen.add((row["task"], row["model"]))
        s = row["splits"]
        lines.append(f"| {row['task']} | {row['model']} | {s['task_images']} | {s['classes']} "
                     f"| {s['calibration']} ({s['calibration_covers_classes']}) | {s['search']}"
                     f" ({row.get('check_images', 0)}) | {s['heldout']} |")
    return lines


def _link(figures: Path, name: str) -> str:
    """A figure's link: its bare name beside RESULTS.md (benchmarks/), else its path."""
    return name if figures.resolve() == Path(__file__).resolve().parent else str(figures / name)


def markdown(document: dict, methods, figures: Path) -> str:
    """The RESULTS.md section from the stored rows; writes the figures into ``figures``."""
    from _real_plots import task_figures, tradeoff_figure

    rows = document["rows"]
    meta = document.get("meta", {})
    ok = _ok(rows) + [r for r in rows if r["method"] == "curve"]
    errors = [r for r in rows if "error" in r]
    seconds = sum(r.get("seconds", 0) for r in rows)
    lines = [BEGIN, "## Real networks: the papers' experiment and the guarded search "
             "(issues 12 and 14)", "",
             "The rows come from these runs (each with `--resume`: a row is computed once):",
             "", *[f"    {c}" for c in meta.get("commands") or [meta.get("command",
                                                                        "bench_real.py")]],
             "",
             f"Machine: {meta.get('machine', '?')}. Rows: {len(rows)}, {seconds / 60:.0f} min "
             f"of row time (last run {meta.get('wall_seconds_last_run', 0) / 60:.0f} min of "
             f"wall time). Search schedule '{meta.get('schedule')}'; search split at most "
             f"{meta.get('max_search')} images, held-out at most {meta.get('max_heldout')}. "
             f"New defaults: {meta.get('defaults')}; today's: {meta.get('today')}. "
             "Δ = compressed - uncompressed top-1 on the held-out images, paired; a run "
             "*holds* when Δ >= -0.5 points or its 95% interval includes 0.", "",
             *_splits(rows), ""]
    tradeoff_figure(ok, figures / "bench_real_tradeoff.png")
    lines += [*_issue14(ok, figures), *_table1(ok), "", *_table3_4(ok), "",
              *_svelcro(ok, methods), "", "### Specialized tasks against their controls", ""]
    for name in task_figures(ok, figures):
        lines += [f"![held-out top-1 change against C]({_link(figures, name)})", ""]
    if errors:
        lines += ["Rows that failed: " + "; ".join(
            f"{r['task']} {r['model']} seed {r['seed']} {r['method']}: {r['error']}"
            for r in errors), ""]
    return "\n".join(lines + [END]) + "\n"


def update_results(path: Path, section: str) -> None:
    """Replace the section between the markers in RESULTS.md (or append it)."""
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END) + "\n?", re.S)
    text = pattern.sub(lambda _: section, text) if BEGIN in text else text.rstrip() + \
        "\n\n" + section
    write_text_atomic(path, text)

"""bench_real's figures: the trade-off (issue 14) and held-out top-1 against C per task,
specialized against control (issue 12). Private."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

COLOURS = {"element": "#1f77b4", "channel": "#d62728"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tradeoff_figure(rows: list[dict], path: Path) -> None:
    """Per task: C against the held-out top-1 change of every plan on the back-off paths
    (small dots), the chosen plans of the new defaults (filled) and of today's search
    (crosses); both granularities."""
    tasks = list(dict.fromkeys(r["task"] for r in rows if r["method"] != "curve"))
    if not tasks:
        return
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), dpi=110,
                                squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        for granularity, colour in COLOURS.items():
            mine = [r for r in rows if r["task"] == task and r["method"].endswith(granularity)
                    and r["method"].split("-")[0] in ("today", "velcro")]
            path_points = [p for r in mine if r["method"].startswith("velcro")
                           for p in r.get("path", [])]
            axis.scatter([100 * p["saving_ratio"] for p in path_points],
                         [100 * p["difference"] for p in path_points], s=8, color=colour,
                         alpha=0.35)
            for prefix, marker in (("velcro", "o"), ("today", "x")):
                chosen = [r for r in mine if r["method"].startswith(prefix)]
                which = "new defaults" if prefix == "velcro" else "today"
                axis.scatter([100 * r["saving_ratio"] for r in chosen],
                             [100 * r["heldout"]["difference"] for r in chosen], s=40,
                             marker=marker, color=colour, label=f"{granularity}, {which}")
        axis.axhline(0.0, color="grey", linestyle=":")
        axis.axhline(-0.5, color="grey", linestyle="--", linewidth=0.8)
        axis.set_title(task, fontsize=9)
        axis.set_xlabel("C (%)")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out top-1 change (points)")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _curve(rows: list[dict], task: str, model: str, granularity: str):
    """Mean held-out change per uniform threshold over the seeds: (C, change) lists."""
    by_threshold = defaultdict(list)
    for row in rows:
        if row["method"] == "curve" and row["task"] == task and row["model"] == model:
            for p in row["points"]:
                if p["granularity"] == granularity:
                    by_threshold[p["threshold"]].append(p)
    ordered = [by_threshold[t] for t in sorted(by_threshold)]
    return ([100 * statistics.mean(p["saving_ratio"] for p in ps) for ps in ordered],
            [100 * statistics.mean(p["difference"] for p in ps) for ps in ordered])


def task_figures(rows: list[dict], folder: Path) -> list[str]:
    """One PNG per specialized task: held-out top-1 change against C, element and channel,
    uniform thresholds (lines, mean over seeds) and searched plans (markers), the task
    against its non-specialized control; one panel per model."""
    from _real_cases import TASKS

    names = []
    plt = _pyplot()
    for task in dict.fromkeys(r["task"] for r in rows):
        control = TASKS[task].control
        if control is None:
            continue
        model_names = sorted({r["model"] for r in rows if r["task"] == task})
        figure, axes = plt.subplots(1, len(model_names), figsize=(5.0 * len(model_names), 3.9),
                                    dpi=110, squeeze=False)
        for axis, model in zip(axes[0], model_names, strict=True):
            for granularity, colour in COLOURS.items():
                for which, style in ((task, "-"), (control, ":")):
                    x, y = _curve(rows, which, model, granularity)
                    if x:
                        axis.plot(x, y, style, color=colour, marker=".",
                                  label=f"{which}, {granularity}, uniform T")
                searched = [r for r in rows if r["task"] == task and r["model"] == model
                            and r["method"] == f"velcro-{granularity}"]
                axis.scatter([100 * r["saving_ratio"] for r in searched],
                             [100 * r["heldout"]["difference"] for r in searched], marker="*",
                             s=90, color=colour, label=f"{task}, {granularity}, searched")
            axis.axhline(0.0, color="grey", linewidth=0.8)
            axis.set_title(f"{model}: {task} (solid) vs {control} (dotted)", fontsize=9)
            axis.set_xlabel("C (%)")
            axis.set_ylabel("held-out top-1 change (points)")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=6)
        figure.tight_layout()
        name = f"bench_real_{task}.png"
        figure.savefig(folder / name)
        plt.close(figure)
        names.append(name)
    return names

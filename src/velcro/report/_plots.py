"""The report's and the sweep's figures, as PNG bytes (matplotlib's Agg canvas).

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas, never through pyplot,
so that the caller's global backend is left alone.
"""

from __future__ import annotations

import io
import math

import torch

from velcro.errors import VelcroError

COLOURS = {"element": "#1f77b4", "channel": "#d62728"}
STYLES = {"uniform": {"linestyle": "-", "marker": "o"},
          "search": {"linestyle": "--", "marker": "*", "markersize": 10}}


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise VelcroError("plots need matplotlib; install it with `pip install matplotlib`") \
            from None
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def sweep_figure(points: list[dict], title: str = "") -> bytes:
    """Top-1 (%) against compression-saving ratio C (%), one panel per task (Figure 2)."""
    tasks = list(dict.fromkeys(p["task"] for p in points))
    columns = min(3, len(tasks)) or 1
    rows = math.ceil(len(tasks) / columns) or 1
    figure = _figure(4.6 * columns, 3.6 * rows)
    for index, task in enumerate(tasks):
        axes = figure.add_subplot(rows, columns, index + 1)
        mine = [p for p in points if p["task"] == task]
        baseline = 100 * mine[0]["baseline_accuracy"]
        axes.axhline(baseline, color="grey", linestyle=":", linewidth=1,
                     label=f"uncompressed ({baseline:.1f}%)")
        series = dict.fromkeys((p["granularity"], p["method"]) for p in mine)
        for granularity, method in series:
            chosen = sorted((p for p in mine
                             if p["granularity"] == granularity and p["method"] == method),
                            key=lambda p: p["saving_ratio"])
            label = f"{granularity}, {'searched' if method == 'search' else 'uniform T'}"
            axes.plot([100 * p["saving_ratio"] for p in chosen],
                      [100 * p["accuracy"] for p in chosen],
                      color=COLOURS.get(granularity, "black"), label=label,
                      **STYLES.get(method, {}))
        axes.set_title(f"{title}: {task}" if title else str(task))
        axes.set_xlabel("compression-saving ratio C (%)")
        axes.set_ylabel("top-1 accuracy (%)")
        axes.set_xlim(-2, 102)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    return _png(figure)


def threshold_bars(thresholds: dict[str, float], shares: dict[str, float] | None = None) -> bytes:
    """Per-site thresholds T_k (bars) and, if given, each site's share of activations."""
    names = list(thresholds)
    figure = _figure(max(6.0, 0.32 * len(names) + 2), 3.6)
    axes = figure.add_subplot(1, 1, 1)
    positions = range(len(names))
    axes.bar(positions, [100 * thresholds[n] for n in names], color=COLOURS["element"],
             label="threshold T_k (% of units replaced)")
    if shares:
        axes.plot(positions, [100 * shares.get(n, 0.0) for n in names], color="black",
                  marker=".", linestyle="none", label="share of all activations (%)")
    axes.set_xticks(list(positions))
    axes.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    axes.set_ylabel("%")
    axes.set_ylim(0, 122)  # room for the legend above the 100% mark
    axes.set_yticks(range(0, 101, 20))
    axes.set_title("Plan per site")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, loc="upper center", ncol=2)
    figure.tight_layout()
    return _png(figure)


def variance_boxes(variances: dict[str, torch.Tensor]) -> bytes:
    """Box plot of log10 element variance per site (whiskers at the 5th/95th percentiles)."""
    names = list(variances)
    boxes = []
    floor = 1e-12  # exact zeros (dead units) are drawn at this floor
    for name in names:
        values = variances[name].double().flatten().clamp_min(floor).log10()
        if values.numel() > 1_000_000:  # quantile's size limit; a fixed subsample is plenty
            generator = torch.Generator().manual_seed(0)
            values = values[torch.randperm(values.numel(), generator=generator)[:1_000_000]]
        q = torch.quantile(values, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95],
                                                dtype=torch.float64)).tolist()
        boxes.append({"label": name, "whislo": q[0], "q1": q[1], "med": q[2], "q3": q[3],
                      "whishi": q[4], "fliers": []})
    figure = _figure(max(6.0, 0.32 * len(names) + 2), 3.6)
    axes = figure.add_subplot(1, 1, 1)
    axes.bxp(boxes, showfliers=False)
    axes.set_xticks(range(1, len(names) + 1))
    axes.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    axes.set_ylabel("log10 variance")
    axes.set_title("Per-site variance of activation elements (calibration images)")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return _png(figure)

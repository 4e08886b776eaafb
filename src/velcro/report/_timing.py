"""Wall-clock latency of models on one batch: interleaved runs, median and spread."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch
from torch import nn


def spread(values: list[float]) -> dict:
    """``{"median", "q1", "q3", "min", "max", "runs"}`` of a list of timings.

    Example:
        >>> spread([1.0, 2.0, 3.0, 4.0, 5.0])["q1"]
        2.0
    """
    ordered = sorted(values)
    if len(ordered) > 1:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3,
            "min": ordered[0], "max": ordered[-1], "runs": len(ordered)}


@torch.no_grad()
def latency_ms(models: Mapping[str, nn.Module], batch: torch.Tensor, *, repeats: int = 15,
               warmup: int = 2) -> dict:
    """Time one forward pass of each model on ``batch``, runs interleaved model by model.

    Interleaving spreads any slowdown of a loaded machine over all models alike.

    Returns:
        ``{name: median ms, ..., "batch": images per batch, "runs": repeats,
        "spread": {name: spread(...)}}``: the medians at the top (what tables show), the
        quartiles and extremes of the runs under ``spread``.

    Example:
        >>> latency_ms({"original": model, "trimmed": small}, images[:32])["trimmed"]
    """
    for model in models.values():
        model.eval()
        for _ in range(warmup):
            model(batch)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(max(1, repeats)):
        for name, model in models.items():
            began = time.perf_counter()
            model(batch)
            times[name].append(1e3 * (time.perf_counter() - began))
    spreads = {name: spread(values) for name, values in times.items()}
    return {**{name: s["median"] for name, s in spreads.items()},
            "batch": int(batch.shape[0]), "runs": max(1, repeats), "spread": spreads}


def latency_text(latency: Mapping, name: str) -> str:
    """``12.30 ms [11.90–12.80]``: the median and the interquartile range of the runs.

    Example:
        >>> latency_text(latency_ms({"m": model}, x), "m")
        '4.12 ms [4.05–4.30]'
    """
    median = latency[name]
    quartiles = (latency.get("spread") or {}).get(name)
    if not quartiles:
        return f"{median:.2f} ms"
    return f"{median:.2f} ms [{quartiles['q1']:.2f}–{quartiles['q3']:.2f}]"

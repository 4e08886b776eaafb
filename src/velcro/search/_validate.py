"""The searched plan on the validation images, once, with its fidelity and the trade-off."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

import torch.nn as nn
from tqdm.auto import tqdm

from velcro._format import plural
from velcro.apply import apply
from velcro.errors import VelcroError
from velcro.evaluate import Report, evaluate
from velcro.search._result import SearchResult


def _summary(report: Report) -> dict:
    return {"accuracy": report.accuracy, "ci95": list(report.ci95), "correct": report.correct,
            "images": report.images}


def _agreement(after: Report, before: Report) -> float:
    if after.predicted is None or before.predicted is None or not after.images:
        return float("nan")
    return float((after.predicted == before.predicted).double().mean())


def validate(
    result: SearchResult,
    model: nn.Module,
    data: Iterable,
    *,
    task_classes: Sequence[int] | None = None,
    search_ids: Iterable | None = None,
    validation_ids: Iterable | None = None,
    tradeoff: bool = True,
    progress: bool = True,
) -> SearchResult:
    """Measure the searched plan once on the validation split; record it beside the search.

    Args:
        result: from :func:`velcro.search`.
        model: the uncompressed model.
        data: labelled batches of the validation split (never seen by the search); iterated
            once per measured plan.
        task_classes: restrict the argmax to these classes, as in the search.
        search_ids, validation_ids: identities of the images of both splits (indices or
            file names); when both are given they must be disjoint.
        tradeoff: also measure the other plans of the search's back-off path (at most
            ``schedule.check_points``): C against the validation loss, so that the chosen
            saving can be read against what more or less compression does on unseen images.
            Only shown, never used to choose.
        progress: show progress bars on stderr.

    Returns:
        ``result``, with ``validation`` = ``{"images", "baseline", "compressed", "paired",
        "agreement", "tradeoff"}`` and the two :class:`Report` objects in ``result.reports``.

    Example:
        >>> validate(result, model, val_loader, search_ids=search_idx, validation_ids=val_idx)
        >>> result.validation["paired"]["difference"], result.validation["agreement"]
        (-0.0021, 0.987)
    """
    if search_ids is not None and validation_ids is not None:
        shared = set(search_ids) & set(validation_ids)
        if shared:
            raise VelcroError(
                f"the search and validation splits share {plural(len(shared), 'image')} (e.g. "
                f"{sorted(map(str, shared))[0]}); carve the search split from non-validation "
                "images"
            )
    before: Report = evaluate(model, data, task_classes=task_classes, progress=progress)
    after: Report = evaluate(apply(model, result.plan), data, task_classes=task_classes,
                             progress=progress)
    result.reports = {"baseline": before, "compressed": after}
    points = []
    others = [p for p in result.path if p["plan"] is not None] if tradeoff else []
    bar = tqdm(total=len(others), unit="plan", desc="trade-off", disable=not progress or
               not others, file=sys.stderr, leave=False)
    with bar:
        for point in others:
            if point["chosen"]:
                report = after
            else:
                report = evaluate(apply(model, point["plan"], check=False), data,
                                  task_classes=task_classes, progress=False)
            bar.update(1)
            paired = report.paired_difference(before)
            points.append({"saving_ratio": point["plan"].saving_ratio,
                           "objective": point["objective"], "passed": point["passed"],
                           "chosen": point["chosen"], "accuracy": report.accuracy,
                           "difference": paired["difference"], "ci95": paired["ci95"],
                           "gained": paired["gained"], "lost": paired["lost"],
                           "agreement": _agreement(report, before)})
    result.validation = {
        "images": before.images,
        "baseline": _summary(before),
        "compressed": _summary(after),
        "paired": after.paired_difference(before),
        "agreement": _agreement(after, before),
        "tradeoff": points,
        "disjoint_checked": search_ids is not None and validation_ids is not None,
    }
    return result

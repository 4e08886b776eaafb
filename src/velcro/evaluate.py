"""Top-1 evaluation on a task's images, with confidence intervals and paired comparison."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from velcro._format import percent, plural
from velcro.calibrate import _total, model_device
from velcro.distributed import (
    batch_positions,
    gather_in_order,
    is_main,
    process_group,
    run_together,
    shard,
)
from velcro.errors import VelcroError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

Z95 = 1.959963984540054


def wilson_interval(successes: int, total: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if total == 0:
        return (0.0, 1.0)
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class Report:
    """Top-1 results of one model on one set of labelled images.

    Attributes:
        hits: per-image correctness, argmax over all of the model's classes (the papers'
            protocol), in data order.
        task_hits: per-image correctness with the argmax restricted to ``task_classes``
            (None when no task was given).
        labels: per-image label.
        task_classes: the task's class indices, if given.
        predicted: per-image top-1 class over all classes (to compare two models' outputs).
        info: free-form labels (``model``: what was evaluated), kept in :meth:`to_dict`.

    ``print(report)`` shows a short summary; the per-image tensors stay in the attributes.

    Example:
        >>> report = velcro.evaluate(model, val_loader, task_classes=[281, 282])
        >>> report
        Report: top-1 97.50% [94.65%, 98.85%] on 240 images (234 correct)
          within the 2 task classes: 98.75% [96.39%, 99.57%]
        >>> report.to_dict()["per_class"]["281"]["accuracy"]
        0.975
    """

    hits: torch.Tensor
    labels: torch.Tensor
    task_hits: torch.Tensor | None = None
    task_classes: list[int] | None = None
    info: dict = field(default_factory=dict)
    predicted: torch.Tensor | None = None

    def __repr__(self) -> str:
        low, high = self.ci95
        what = f" of {self.info['model']}" if self.info.get("model") else ""
        lines = [f"Report{what}: top-1 {percent(self.accuracy)} [{percent(low)}, "
                 f"{percent(high)}] on {plural(self.images, 'image')} ({self.correct} correct)"]
        if self.task_hits is not None:
            low, high = self.task_ci95
            lines.append(f"  within the {plural(len(self.task_classes or []), 'task class')}: "
                         f"{percent(self.task_accuracy)} [{percent(low)}, {percent(high)}]")
        return "\n".join(lines)

    @property
    def images(self) -> int:
        """Number of images evaluated."""
        return int(self.hits.numel())

    @property
    def correct(self) -> int:
        """Number of images whose top-1 prediction is their label."""
        return int(self.hits.sum())

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy over all classes."""
        return self.correct / self.images if self.images else 0.0

    @property
    def ci95(self) -> tuple[float, float]:
        """95% Wilson interval of :attr:`accuracy`."""
        return wilson_interval(self.correct, self.images)

    @property
    def task_accuracy(self) -> float | None:
        """Top-1 accuracy with the argmax restricted to the task's classes."""
        if self.task_hits is None:
            return None
        return int(self.task_hits.sum()) / self.images if self.images else 0.0

    @property
    def task_ci95(self) -> tuple[float, float] | None:
        """95% Wilson interval of :attr:`task_accuracy`."""
        if self.task_hits is None:
            return None
        return wilson_interval(int(self.task_hits.sum()), self.images)

    def per_class(self) -> dict[int, dict]:
        """Accuracy per label: ``{label: {"images", "correct", "accuracy"}}``."""
        result = {}
        for label in sorted(set(self.labels.tolist())):
            chosen = self.labels == label
            images, correct = int(chosen.sum()), int(self.hits[chosen].sum())
            result[label] = {"images": images, "correct": correct,
                             "accuracy": correct / images}
        return result

    def paired_difference(self, baseline: Report) -> dict:
        """This model's accuracy minus ``baseline``'s on the same images, paired.

        Returns the difference, its 95% interval (normal approximation of the paired
        differences), and how many images each model alone got right (the McNemar counts).

        Example:
            >>> after.paired_difference(before)["difference"]
            0.004
        """
        if self.images != baseline.images or not torch.equal(self.labels, baseline.labels):
            raise VelcroError(
                "paired comparison needs both reports on the same images in the same order; "
                "evaluate both models on the same data"
            )
        diff = self.hits.double() - baseline.hits.double()
        n = self.images
        mean = float(diff.mean()) if n else 0.0
        sd = float(diff.std(correction=1)) if n > 1 else 0.0
        half = Z95 * sd / math.sqrt(n) if n else 0.0
        return {
            "difference": mean,
            "ci95": [mean - half, mean + half],
            "gained": int(((~baseline.hits) & self.hits).sum()),
            "lost": int((baseline.hits & ~self.hits).sum()),
            "images": n,
        }

    def to_dict(self) -> dict:
        """A JSON-ready summary."""
        summary = {
            "images": self.images,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "ci95": list(self.ci95),
            "per_class": {str(k): v for k, v in self.per_class().items()},
        }
        if self.task_hits is not None:
            summary["task_classes"] = self.task_classes
            summary["task_accuracy"] = self.task_accuracy
            summary["task_ci95"] = list(self.task_ci95)
        summary.update(self.info)
        return summary


def _labelled(item) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(item, dict):
        values = list(item.values())
        item = (values[0], values[1]) if len(values) > 1 else values
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise VelcroError(
            "evaluation data must yield (images, labels) batches; give a labelled DataLoader"
        )
    return item[0], torch.as_tensor(item[1])


def _check_finite(values: object, batch: int, seen: int, problem: str, fix: str) -> None:
    """Refuse a batch (images or logits) holding NaN or Inf: top-1 of such a batch is
    meaningless, and a NaN can turn accuracy from 0% to 100% without a word."""
    if not isinstance(values, torch.Tensor) or not values.is_floating_point() or not values.dim():
        return
    finite = torch.isfinite(values)
    bad = ~(finite.flatten(1).all(1) if finite.dim() > 1 else finite)
    if bool(bad.any()):
        image = int(bad.nonzero()[0])
        raise VelcroError(f"evaluation batch {batch}, image {image} of the batch (image "
                          f"{seen + image} of the data), {problem}; {fix}")


@torch.no_grad()
def predict(model: nn.Module, data: Iterable, *, max_images: int | None = None,
            progress: bool = True, desc: str = "evaluate"):
    """Yield ``(logits, labels)`` per batch, in eval mode without gradients."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    seen = 0
    bar = tqdm(total=_total(data, max_images), unit="img", desc=desc, disable=not progress,
               file=sys.stderr, leave=False)
    try:
        with bar:
            for batch, item in enumerate(data):
                images, labels = _labelled(item)
                if max_images is not None:
                    if seen >= max_images:
                        break
                    images, labels = images[: max_images - seen], labels[: max_images - seen]
                _check_finite(images, batch, seen, "holds non-finite pixel values (NaN or Inf)",
                              "check the images and their preprocessing")
                logits = model(images.to(device, non_blocking=True))
                _check_finite(logits, batch, seen, "gets non-finite outputs (NaN or Inf) from the "
                              "model", "check the model's weights and the plan applied to it")
                seen += images.shape[0]
                bar.update(images.shape[0])
                yield logits.float().cpu(), labels.cpu()
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    data: Iterable,
    *,
    task_classes: Sequence[int] | None = None,
    max_images: int | None = None,
    progress: bool = True,
    group: ProcessGroup | None = None,
) -> Report:
    """Top-1 accuracy of ``model`` on labelled images.

    Args:
        model: any classifier (original, applied or trimmed).
        data: an iterable of ``(images, labels)`` batches; labels are the model's class
            indices.
        task_classes: the task's class indices; when given, the report also holds top-1 with
            the argmax restricted to them.
        max_images: stop after this many images.
        progress: show a progress bar on stderr (on rank 0 only, when distributed).
        group: a torch.distributed process group; by default the one ``torchrun`` sets up,
            if any. Each rank then evaluates every world-th batch and the per-image results
            are gathered back in data order: every rank returns the same :class:`Report`,
            equal to one process's (see :mod:`velcro.distributed`).

    Returns:
        A :class:`Report` with per-image hits, accuracy, 95% intervals and per-class figures.

    Example:
        >>> before = velcro.evaluate(model, val_loader, task_classes=[281, 282, 283])
        >>> after = velcro.evaluate(small, val_loader, task_classes=[281, 282, 283])
        >>> after.paired_difference(before)
    """
    hits, task_hits, all_labels, predicted = [], [], [], []
    classes = torch.as_tensor(list(task_classes), dtype=torch.long) if task_classes else None
    group = process_group(group)
    if group is not None:
        data, max_images = shard(data, group, max_images=max_images), None
        progress = progress and is_main(group)

    def collect() -> None:
        for logits, labels in predict(model, data, max_images=max_images, progress=progress):
            if logits.dim() != 2:
                raise VelcroError(
                    f"the model returned outputs of shape {tuple(logits.shape)}; evaluation "
                    "needs (batch, classes) logits"
                )
            if classes is not None and int(classes.max()) >= logits.shape[1]:
                raise VelcroError(
                    f"task class {int(classes.max())} is out of range for a model with "
                    f"{logits.shape[1]} classes; check --classes"
                )
            predicted.append(logits.argmax(1))
            hits.append(predicted[-1] == labels)
            if classes is not None:
                task_hits.append(classes[logits[:, classes].argmax(1)] == labels)
            all_labels.append(labels)

    if group is None:
        collect()
    else:
        run_together(group, collect)
        positions = batch_positions(data.starts, [h.numel() for h in hits])
        columns = [torch.cat(c) if c else torch.zeros(0, dtype=torch.int64)
                   for c in (hits, all_labels, predicted, task_hits)]
        merged = gather_in_order(positions, columns if classes is not None else columns[:3],
                                 group)
        hits, all_labels, predicted = [merged[0].bool()], [merged[1]], [merged[2]]
        task_hits = [merged[3].bool()] if classes is not None else []
    if not sum(h.numel() for h in hits):
        raise VelcroError("evaluation data yielded no images; give at least one labelled image")
    return Report(
        torch.cat(hits),
        torch.cat(all_labels),
        torch.cat(task_hits) if classes is not None else None,
        [int(c) for c in task_classes] if task_classes else None,
        predicted=torch.cat(predicted),
    )

"""Calibration: run the unchanged model on task images and keep per-site moments."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from velcro._moments import ShapeChanged
from velcro.data._preprocess import Preprocess
from velcro.distributed import is_main, merge_stats, process_group, run_together, shard
from velcro.distributed._shard import Shard
from velcro.errors import VelcroError
from velcro.graph import find_sites, insert_after_sites, trace
from velcro.graph.capture import CaptureShapeError
from velcro.graph.fingerprint import structure_fingerprint, weights_fingerprint
from velcro.stats import SiteStats, Stats

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class _Observer(nn.Module):
    """Passes its input through and folds it into the site's running moments."""

    def __init__(self, name: str, channel_axis: int, covariance: bool = False) -> None:
        super().__init__()
        self.site_name = name
        comoment = torch.zeros((0, 0), dtype=torch.float64) if covariance else None
        self.moments = SiteStats(0, torch.zeros(0, dtype=torch.float64),
                                 torch.zeros(0, dtype=torch.float64), channel_axis, comoment)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before = self.moments.count
        try:
            self.moments.update(x)
        except ShapeChanged as exc:
            exc.site = self.site_name
            raise
        if self.moments.count > before and not torch.isfinite(self.moments.mean).all():
            raise VelcroError(
                f"site '{self.site_name}' produced NaN or inf activations during calibration; "
                "check the input images and their normalisation, and the model's weights"
            )
        return x


def batches(data: Iterable, max_images: int | None = None) -> Iterator[torch.Tensor]:
    """Yield input tensors from ``data``: tensors, or ``(tensor, label, ...)`` batches.

    Stops after ``max_images`` images (the last batch is cut) when given.
    """
    seen = 0
    for item in data:
        if isinstance(item, (tuple, list)):
            item = item[0]
        if isinstance(item, dict):
            item = next(iter(item.values()))
        if not isinstance(item, torch.Tensor):
            raise VelcroError(
                f"data must yield tensors or (tensor, label) batches, got {type(item).__name__}; "
                "wrap your images in a DataLoader"
            )
        if max_images is not None:
            if seen >= max_images:
                return
            item = item[: max_images - seen]
        seen += item.shape[0]
        yield item


def _total(data: Iterable, max_images: int | None) -> int | None:
    if isinstance(data, Shard):
        return data.images
    dataset = getattr(data, "dataset", None)
    try:
        total = len(dataset) if dataset is not None else None
    except TypeError:
        total = None
    if max_images is not None:
        return min(total, max_images) if total is not None else max_images
    return total


def _text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _mixed_sizes(exc: ShapeChanged, first: tuple[int, ...],
                 now: tuple[int, ...]) -> VelcroError:
    def text(shape: tuple[int, ...]) -> str:
        return "x".join(map(str, shape))

    images = (f"the calibration images are of two sizes ({text(first)} and {text(now)})"
              if first != now else "the activations changed size")
    return VelcroError(
        f"site '{getattr(exc, 'site', '?')}' saw activations of {text(exc.after)} after "
        f"{exc.count} images of {text(exc.before)}: {images}; statistics are per element, "
        "so every image needs one size: give --crop (and --resize) on the command line, or "
        "resize the images to one size in your loader"
    )


def _preprocess_of(data: Iterable) -> Preprocess | None:
    """The preprocessing of an :class:`~velcro.data.ImageLoader` (or a DataLoader over an
    :class:`~velcro.data.ImageFolder`), recorded with the statistics."""
    preprocess = getattr(getattr(data, "dataset", None), "preprocess", None)
    return preprocess if isinstance(preprocess, Preprocess) else None


def model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def calibrate(
    model: nn.Module,
    data: Iterable,
    *,
    max_images: int | None = None,
    progress: bool = True,
    group: ProcessGroup | None = None,
    covariance: bool = False,
) -> Stats:
    """Per-site, per-element mean and population variance over the task's images.

    Inference only (eval mode, no gradients); the model is not modified. Moments are
    accumulated batch by batch in float64 with Chan's formula, so memory does not grow with
    the number of images.

    Args:
        model: the unchanged, pretrained model (any torch.fx-traceable module).
        data: an iterable of image batches: tensors, or ``(tensor, label)`` tuples
            (a ``DataLoader`` works as is).
        max_images: stop after this many images.
        progress: show a progress bar on stderr (on rank 0 only, when distributed).
        group: a torch.distributed process group; by default the one ``torchrun`` sets up,
            if any. Each rank then calibrates on every world-th batch and the ranks'
            moments are merged exactly: every rank returns the same :class:`Stats`, equal
            to one process's up to rounding (see :mod:`velcro.distributed`).
        covariance: also keep each site's channel co-moment (``channels x channels``
            float64: deviations from the per-position means, summed over images and
            positions), which ``velcro.plan(..., constant="affine")`` fits its predictions
            from. It costs a ``channels^2 x positions`` product per image and site (about a
            tenth of a ResNet's own MACs) and ``8 channels^2`` bytes per site.

    Returns:
        :class:`Stats` for every activation site, tied to ``model`` by its fingerprints. Its
        ``info`` records the input shape, and the preprocessing when ``data`` is an
        :class:`~velcro.data.ImageLoader` (:func:`velcro.data.loader_for` reuses it).

    Example:
        >>> stats = velcro.calibrate(model, DataLoader(cats, batch_size=32))
        >>> stats.count
        256
    """
    preprocess = _preprocess_of(data)  # before sharding wraps the loader
    device = model_device(model)
    group = process_group(group)
    if group is not None:
        data, max_images = shard(data, group, max_images=max_images), None
        progress = progress and is_main(group)
    stream = batches(data, max_images)
    first_batch = next(stream, None)
    # a model symbolic torch.fx cannot trace is captured at the first batch's size
    gm = trace(model, first_batch[:1].to(device) if first_batch is not None else None)
    sites = find_sites(gm)
    if not sites:
        raise VelcroError(
            f"{type(model).__name__} has no activation site (an activation after a conv or "
            "linear layer); velcro has nothing to compress"
        )
    observers = {s.name: _Observer(s.name, s.channel_axis, covariance) for s in sites}
    insert_after_sites(gm, sites, observers, prefix="velcro_observer")
    gm.to(device)
    bar = tqdm(total=_total(data, max_images), unit="img", desc="calibrate",
               disable=not progress, file=sys.stderr, leave=False)

    def observe() -> int:
        images, first = 0, None
        with bar:
            for batch in itertools.chain([first_batch] if first_batch is not None else [],
                                         stream):
                first = first or tuple(batch.shape[1:])
                try:
                    gm(batch.to(device, non_blocking=True))
                except ShapeChanged as exc:
                    raise _mixed_sizes(exc, first, tuple(batch.shape[1:])) from None
                except CaptureShapeError as exc:
                    raise VelcroError(
                        f"the calibration images are of two sizes ({_text(exc.expected)} and "
                        f"{_text(exc.got)}); every image needs one size: give --crop (and "
                        "--resize) on the command line, or resize the images to one size in "
                        "your loader") from None
                images += batch.shape[0]
                bar.update(batch.shape[0])
        return images

    if group is not None:
        run_together(group, observe)  # no image on some rank is fine; merge_stats checks all
    elif observe() == 0:
        raise VelcroError("calibration data yielded no images; give at least one image")
    names = [s.name for s in sites]
    moments = {}
    for name, obs in observers.items():
        m = obs.moments
        moments[name] = SiteStats(m.count, m.mean.cpu(), m.m2.cpu(), m.channel_axis,
                                  None if m.comoment is None else m.comoment.cpu())
    stats = Stats(
        moments,
        structure=structure_fingerprint(model, names),
        weights=weights_fingerprint(model),
        info={"model": type(model).__name__,
              **({"input_shape": list(first_batch.shape[1:])} if first_batch is not None
                 else {})},
    )
    if preprocess is not None:  # what the images went through: reused by loader_for
        stats.info["preprocess"] = preprocess.to_dict()
    return stats if group is None else merge_stats(stats, group)

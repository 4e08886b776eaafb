"""Calibration and evaluation across processes and machines, with torch.distributed.

Launch the same program once per process with ``torchrun``; ``calibrate``, ``evaluate`` and
``search`` then find the process group on their own (or take ``group=``), give each rank its
own batches of the data (:mod:`velcro.distributed._shard`), and merge the partial results
exactly, so every rank ends with the same :class:`Stats` and :class:`Report` as one
process would make.
Backends: gloo on CPU, NCCL for CUDA tensors (``cpu:gloo,cuda:nccl`` when velcro starts
the group itself on a machine with CUDA).

Example:
    $ torchrun --nproc-per-node 4 my_calibration.py     # calls velcro.calibrate(...)

    >>> stats = velcro.calibrate(model, loader)          # each rank: its batches, merged
    >>> if velcro.distributed.is_main():
    ...     stats.save("cats.stats.safetensors")         # one writer
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
import torch.distributed as dist

from velcro.distributed._group import is_main, process_group, rank, world_size
from velcro.distributed._shard import Shard, ShardSampler
from velcro.distributed._shard import shard as _shard
from velcro.errors import VelcroError
from velcro.stats import SiteStats, Stats

T = TypeVar("T")


def shard(data: Iterable, group: dist.ProcessGroup | None = None, *,
          max_images: int | None = None) -> Iterable:
    """This rank's batches of ``data``: batches ``rank, rank + world, ...``.

    Whole batches keep each image's computation identical to a single process's (see
    :mod:`velcro.distributed._shard`). A map-style ``DataLoader`` is rebuilt over this rank's
    batches only; any other iterable is read in full on every rank, and must yield the same batches
    in the same order on each. Returns ``data`` itself when there is no process group.

    Args:
        data: a ``DataLoader`` or any iterable of batches.
        group: the process group (default: the default group, if any).
        max_images: keep only the first ``max_images`` images of the whole.

    Example:
        >>> for images, labels in velcro.distributed.shard(loader):
        ...     ...
    """
    group = process_group(group)
    if group is None:
        return data
    return _shard(data, group, max_images=max_images)


def run_together(group: dist.ProcessGroup, work: Callable[[], T]) -> T:
    """Run ``work`` on every rank; if it fails on any, raise on all (nobody is left waiting).

    The failing rank re-raises its own exception; the others raise a VelcroError naming it.

    Example:
        >>> stats = run_together(group, lambda: velcro.calibrate(model, loader, group=group))
    """
    try:
        result, error = work(), None
    except Exception as exc:  # noqa: BLE001 - every rank must reach the exchange below
        result, error = None, exc
    messages: list = [None] * dist.get_world_size(group)
    mine = None if error is None else f"{type(error).__name__}: {error}".splitlines()[0]
    dist.all_gather_object(messages, mine, group=group)
    if error is not None:
        raise error
    for peer, message in enumerate(messages):
        if message is not None:
            raise VelcroError(f"rank {peer} failed ({message}); see its output")
    return result


def _tensor_device(group: dist.ProcessGroup) -> torch.device:
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def merge_moments(parts: list[tuple], channel_axis: int = 0) -> SiteStats:
    """Merge ``(count, mean, m2)`` or ``(count, mean, m2, comoment)`` parts with Chan's
    formula, strictly in the given order.

    The same parts in the same order give the same bits, which is what lets every rank end
    with identical statistics.

    Example:
        >>> site = merge_moments([(n_a, mean_a, m2_a), (n_b, mean_b, m2_b)])
        >>> site.count == n_a + n_b
        True
    """
    merged = SiteStats(0, torch.zeros(0, dtype=torch.float64),
                       torch.zeros(0, dtype=torch.float64), channel_axis)
    for count, mean, m2, *comoment in parts:
        merged.merge_moments(count, mean, m2, comoment[0] if comoment else None)
    return merged


def merge_stats(stats: Stats, group: dist.ProcessGroup | None = None) -> Stats:
    """Merge every rank's partial statistics into the statistics of all their images.

    Counts, means and M2 (and the channel co-moments, where calibrated with
    ``covariance=True``) are gathered in float64 (one site at a time, so memory stays at
    one site's worth per rank) and merged with Chan's formula in rank order on every rank:
    all ranks return bit-identical :class:`Stats`. A rank that saw no image contributes
    nothing.

    Args:
        stats: this rank's statistics (sites with count 0 are allowed).
        group: the process group (default: the default group; no group returns ``stats``).

    Example:
        >>> whole = velcro.distributed.merge_stats(velcro.calibrate(model, my_shard))
    """
    group = process_group(group)
    if group is None:
        return stats
    world = dist.get_world_size(group)
    layout = {
        "structure": stats.structure,
        "weights": stats.weights,
        "sites": [(name, s.count, list(s.shape)) for name, s in stats.sites.items()],
        "covariance": all(s.comoment is not None for s in stats.sites.values()),
    }
    layouts: list = [None] * world
    dist.all_gather_object(layouts, layout, group=group)
    _check_same_model(layouts)
    covariance = all(lay["covariance"] for lay in layouts)
    device = _tensor_device(group)
    merged = {}
    for index, (name, site) in enumerate(stats.sites.items()):
        shapes = [tuple(lay["sites"][index][2]) for lay in layouts if lay["sites"][index][1]]
        if not shapes:
            raise VelcroError(
                "calibration data yielded no images on any rank; give at least one image"
            )
        if len(set(shapes)) > 1:
            raise VelcroError(
                f"site '{name}' has activations of different shapes on different ranks "
                f"({sorted(set(shapes))}); give every rank images of the same size"
            )
        shape = shapes[0]
        if site.count:
            local = torch.stack([site.mean.reshape(shape), site.m2.reshape(shape)])
        else:
            local = torch.zeros((2, *shape), dtype=torch.float64)
        local = local.to(device=device, dtype=torch.float64).contiguous()
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        counts = [lay["sites"][index][1] for lay in layouts]
        parts = [(n, g[0].cpu(), g[1].cpu()) for n, g in zip(counts, gathered, strict=True)]
        if covariance:
            comoments = _gather_comoment(site, shape, device, group)
            parts = [(*part, c) for part, c in zip(parts, comoments, strict=True)]
        merged[name] = merge_moments(parts, site.channel_axis)
    return Stats(merged, stats.structure, stats.weights, dict(stats.info))


def _gather_comoment(site: SiteStats, shape: tuple[int, ...], device: torch.device,
                     group: dist.ProcessGroup) -> list[torch.Tensor]:
    """Every rank's ``(channels, channels)`` co-moment of one site (zeros where no image)."""
    channels = shape[site.channel_axis]
    local = site.comoment if site.count else None
    if local is None or local.shape != (channels, channels):
        local = torch.zeros((channels, channels), dtype=torch.float64)
    local = local.to(device=device, dtype=torch.float64).contiguous()
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return [g.cpu() for g in gathered]


def _check_same_model(layouts: list[dict]) -> None:
    first = layouts[0]
    for peer, layout in enumerate(layouts[1:], start=1):
        names = [s[0] for s in layout["sites"]]
        if layout["structure"] != first["structure"] or names != [s[0] for s in first["sites"]]:
            raise VelcroError(
                f"rank {peer} calibrated another model than rank 0 (structure "
                f"{layout['structure']} vs {first['structure']}); load the same model on "
                "every rank"
            )
        if layout["weights"] != first["weights"]:
            raise VelcroError(
                f"rank {peer} has other weights than rank 0 ({layout['weights']} vs "
                f"{first['weights']}); load the same weights on every rank"
            )


def gather_in_order(positions: torch.Tensor, columns: list[torch.Tensor],
                    group: dist.ProcessGroup) -> list[torch.Tensor]:
    """Gather per-image integer columns from every rank, back in single-process order.

    Args:
        positions: this rank's images' global positions (int64), one per image.
        columns: 1-D integer or bool tensors of this rank's per-image values, aligned with
            ``positions``.
        group: the process group.

    Returns:
        Each column over all ranks' images, ordered by global position, as int64. Every
        rank gets the same. Raises VelcroError unless the positions are 0..N-1, each once.

    Example:
        >>> hits, labels = gather_in_order(positions, [my_hits, my_labels], group)
    """
    images = int(positions.numel())
    local = torch.stack([positions.to(torch.int64)] + [c.to(torch.int64) for c in columns])
    world = dist.get_world_size(group)
    counts: list = [None] * world
    dist.all_gather_object(counts, images, group=group)
    # all_gather needs equal sizes: pad to the longest shard, then drop the padding.
    padded = torch.zeros((local.shape[0], max(counts)), dtype=torch.int64)
    padded[:, :images] = local
    padded = padded.to(_tensor_device(group))
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    whole = torch.cat([g[:, :n].cpu() for g, n in zip(gathered, counts, strict=True)], dim=1)
    whole = whole[:, torch.argsort(whole[0], stable=True)]
    if not torch.equal(whole[0], torch.arange(whole.shape[1])):
        raise VelcroError(
            "the ranks' shards do not cover the data exactly once; make the data yield the "
            "same batches in the same order on every rank"
        )
    return list(whole[1:])


def batch_positions(starts: list[int], sizes: list[int]) -> torch.Tensor:
    """Global positions of the images of batches starting at ``starts`` with ``sizes``.

    Example:
        >>> batch_positions([0, 64], [2, 3])
        tensor([ 0,  1, 64, 65, 66])
    """
    if not starts:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([torch.arange(start, start + size, dtype=torch.int64)
                      for start, size in zip(starts, sizes, strict=True)])


__all__ = [
    "Shard",
    "ShardSampler",
    "batch_positions",
    "gather_in_order",
    "is_main",
    "merge_moments",
    "merge_stats",
    "process_group",
    "rank",
    "run_together",
    "shard",
    "world_size",
]

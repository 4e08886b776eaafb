"""Splitting calibration and evaluation data across ranks, by whole batches.

Rank r of w takes batches r, r + w, r + 2w, ... of the data's batch order. Whole batches,
not images, because a float32 convolution's result for one image can change in the last bits
with the other images of its batch (the kernel's blocking depends on the batch size): by
keeping every batch as a single process would form it, each rank computes every one of its
images bit for bit as one process does, so evaluation counts match exactly and statistics
differ from one process's only by the rounding of the final merge (about 1e-16).

Two ways in:
- a map-style ``DataLoader`` (the common case): rank 0 lists the loader's batches of
  indices once (its sampler may shuffle), every rank receives the list and builds a loader
  over its own batches only, so no rank loads another's images;
- any other iterable of batches (lists, generators, iterable datasets): every rank iterates
  all of it, in the same order, and keeps its own batches (the others are loaded and
  dropped, so give a map-style dataset when loading is costly).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from velcro.distributed._group import process_group
from velcro.errors import VelcroError


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of a data set: disjoint shards, nothing repeated.

    Unlike ``torch.utils.data.distributed.DistributedSampler``, which pads the last shards
    by repeating images so all ranks have the same length, shards here differ by at most one
    image and the union is the data set exactly once. ``calibrate`` and ``evaluate`` shard
    their data themselves (by batches); this sampler is for loops of your own.

    Args:
        data: a data set (anything with ``len``) or its length.
        group: the process group whose rank and size to use (default: the default group).
        rank, world_size: give both to shard without a process group.

    Example:
        >>> loader = DataLoader(images, batch_size=64, sampler=ShardSampler(images))
    """

    def __init__(self, data: Sized | int, *, group: dist.ProcessGroup | None = None,
                 rank: int | None = None, world_size: int | None = None) -> None:
        self.length = data if isinstance(data, int) else len(data)
        if (rank is None) != (world_size is None):
            raise VelcroError("ShardSampler needs both rank and world_size, or neither")
        if rank is None:
            group = process_group(group)
            rank, world_size = (0, 1) if group is None else (
                dist.get_rank(group), dist.get_world_size(group))
        if not 0 <= rank < world_size:
            raise VelcroError(f"rank {rank} is outside a world of {world_size} processes")
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


class Shard:
    """This rank's batches of some data, and where each sits in the whole.

    Attributes:
        images: how many images this rank will see, when known before iterating (map-style
            loaders), else None.
        starts: the global position (in the single-process order) of the first image of each
            batch yielded so far; evaluation uses it to put per-image results back in order.

    Example:
        >>> mine = shard(loader, group)  # this rank's batches
        >>> for images, labels in mine:
        ...     pass
        >>> mine.starts[:2]
        [0, 64]
    """

    def __init__(self, batches: Iterable, images: int | None, starts: list[int] | None,
                 rank: int, world: int, max_images: int | None) -> None:
        self._batches = batches
        self._planned_starts = starts
        self._rank = rank
        self._world = world
        self._max_images = max_images
        self.images = images
        self.starts: list[int] = []

    def __iter__(self) -> Iterator:
        self.starts = []
        if self._planned_starts is not None:
            for start, item in zip(self._planned_starts, self._batches, strict=True):
                self.starts.append(start)
                yield item
            return
        seen = 0
        for position, item in enumerate(self._batches):
            if self._max_images is not None and seen >= self._max_images:
                return
            size = batch_size(item)
            if self._max_images is not None and seen + size > self._max_images:
                item = first_images(item, self._max_images - seen)
                size = self._max_images - seen
            if position % self._world == self._rank:
                self.starts.append(seen)
                yield item
            seen += size


def batch_size(item) -> int:
    """Images in one batch: the first axis of its image tensor."""
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    if isinstance(item, dict) and item:
        item = next(iter(item.values()))
    if not isinstance(item, torch.Tensor) or item.dim() == 0:
        raise VelcroError(
            f"data must yield image tensors or (images, labels) batches, got "
            f"{type(item).__name__}; wrap your images in a DataLoader"
        )
    return int(item.shape[0])


def first_images(item, count: int):
    """The first ``count`` images of a batch: a tensor, or a tuple, list or dict of fields
    (tensors and lists are cut, anything else is kept)."""
    if isinstance(item, torch.Tensor):
        return item[:count]
    if isinstance(item, dict):
        return {key: _first(value, count) for key, value in item.items()}
    if isinstance(item, (tuple, list)):
        fields = [_first(value, count) for value in item]
        return type(item)(*fields) if hasattr(item, "_fields") else type(item)(fields)
    return item


def _first(field, count: int):
    return field[:count] if isinstance(field, (torch.Tensor, list, tuple)) else field


def shard(data: Iterable, group: dist.ProcessGroup, *, max_images: int | None = None) -> Shard:
    """This rank's share of ``data``: every world-th batch, counted from this rank's index.

    ``max_images`` applies to the whole (the first ``max_images`` images of the single-process
    order), so the union of all ranks' shards is exactly what one process would see.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if isinstance(data, DataLoader):
        _refuse_presharded(data)
        if data.batch_sampler is not None and not isinstance(data.dataset, IterableDataset):
            index_batches = _cut(_agreed_index_batches(data, group), max_images)
            starts, position = [], 0
            for indices in index_batches:
                starts.append(position)
                position += len(indices)
            mine = index_batches[rank::world]
            return Shard(_loader_over(data, mine), sum(map(len, mine)), starts[rank::world],
                         rank, world, None)
    return Shard(data, None, None, rank, world, max_images)


def _refuse_presharded(loader: DataLoader) -> None:
    sampler = getattr(loader.batch_sampler, "sampler", loader.sampler)
    if isinstance(sampler, (DistributedSampler, ShardSampler)) or isinstance(
        loader.sampler, (DistributedSampler, ShardSampler)
    ):
        raise VelcroError(
            f"the data loader already has a {type(sampler).__name__}; give velcro the whole "
            "data set's loader: it gives each rank its own batches, with none repeated"
        )


def _agreed_index_batches(loader: DataLoader, group: dist.ProcessGroup) -> list[list[int]]:
    # A sampler may shuffle with each process's own random state: rank 0's order is the
    # order, and an error there must reach every rank rather than leave them waiting.
    payload: list = [None]
    if dist.get_rank(group) == 0:
        try:
            payload[0] = [[int(i) for i in batch] for batch in loader.batch_sampler]
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            payload[0] = f"{type(exc).__name__}: {exc}"
    dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0), group=group)
    if isinstance(payload[0], str):
        raise VelcroError(f"rank 0 could not list the data loader's batches ({payload[0]})")
    return payload[0]


def _cut(index_batches: list[list[int]], max_images: int | None) -> list[list[int]]:
    if max_images is None:
        return index_batches
    kept, seen = [], 0
    for indices in index_batches:
        if seen >= max_images:
            break
        kept.append(indices[: max_images - seen])
        seen += len(kept[-1])
    return kept


def _loader_over(loader: DataLoader, index_batches: list[list[int]]) -> DataLoader:
    """A loader like ``loader`` (workers, collation, pinning) over the given batches only."""
    options = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
        options["persistent_workers"] = loader.persistent_workers
    for name in ("pin_memory_device", "in_order"):  # newer torch only
        if hasattr(loader, name):
            options[name] = getattr(loader, name)
    return DataLoader(loader.dataset, batch_sampler=index_batches, **options)

"""One channel order per residual stream, so that residual sums move channels in runs.

A residual stream (the tensors joined by sums, the channelwise operations between them, and
the producers feeding them) carries one channel space, but each of its tensors computes a
different subset of the channels: a site makes some constant, and a constant channel is never
stored. A sum adds the channels its two sides share; where the shared channels are scattered
through a side's layout, the trimmed model gathers them (an ONNX ``Gather``). Ordering every
tensor of the stream by one shared permutation of the stream's channels keeps the shared
channels in the same relative order on both sides; choosing that permutation so that each
sum's shared channels are also contiguous on both sides turns the gather into a slice (or
nothing, where the sides hold the same channels).

Only the order changes: every tensor keeps exactly the channels it had (a constant channel
is still never stored), so trimming stays exact. Making every moved set contiguous on every
side is a consecutive-ones problem with no solution in general (a channel that is computed,
then constant at one site, then computed again, cuts a run); the order is chosen by a small
local search over the channels' membership classes, and a sum whose shared channels stay
scattered keeps its gather.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from velcro.trim import _ops as ops
from velcro.trim._analysis import Analysis

MAX_CLASSES = 128  # beyond this, the search is skipped (the natural order is kept)
PASSES = 6  # rounds of moves per local search
RESTARTS = 8  # further searches from shuffled orders (seeded)
MAX_EVALUATIONS = 40_000  # orders evaluated per stream, at most (about 1 s at 40 classes)


def stream_orders(gm: fx.GraphModule, analysis: Analysis) -> dict[fx.Node, torch.Tensor]:
    """node -> rank of each of its channels in its stream's order (lower first), for the
    tensors of every stream that holds a residual sum."""
    edges = _edges(gm, analysis)
    orders: dict[fx.Node, torch.Tensor] = {}
    seen: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if analysis.kinds.get(node) != "sum" or node not in analysis.states or node in seen:
            continue
        offsets = _component(node, edges, analysis)
        if offsets is None:
            seen.add(node)
            continue
        seen.update(offsets)
        ranks = _stream_ranks(gm, analysis, offsets)
        if ranks is None:
            continue
        for member, offset in offsets.items():
            channels = analysis.states[member].channels
            orders[member] = ranks[offset:offset + channels]
    return orders


def _edges(gm: fx.GraphModule, a: Analysis) -> dict[fx.Node, list[tuple[fx.Node, int]]]:
    """Links between tensors sharing one channel space: (neighbour, its channel id offset
    relative to this node's: channel c here is channel c + offset there)."""
    edges: dict[fx.Node, list[tuple[fx.Node, int]]] = {}

    def link(x: fx.Node, y: fx.Node, offset: int) -> None:
        if x in a.states and y in a.states and a.states[x].axis == a.states[y].axis:
            edges.setdefault(x, []).append((y, offset))
            edges.setdefault(y, []).append((x, -offset))

    for node in gm.graph.nodes:
        kind = a.kinds.get(node)
        if node not in a.states:
            continue
        if kind == "sum":
            first, second, _ = ops.sum_operands(node)
            link(node, first, 0)
            link(node, second, 0)
        elif kind == "channelwise":
            source = ops.tensor_arg(node)
            if source in a.states and a.states[source].channels == a.states[node].channels:
                link(node, source, 0)
        elif kind == "chanpad":
            source, before, _ = a.ranges[node]
            link(node, source, -before)  # channel c of the pad is c - before of its source
    return edges


def _component(start: fx.Node, edges: dict, a: Analysis) -> dict[fx.Node, int] | None:
    """Every tensor of ``start``'s stream with its offset in the stream's channel space (ids
    from 0), or None where two paths disagree on an offset."""
    offsets = {start: 0}
    frontier = [start]
    while frontier:
        node = frontier.pop()
        for neighbour, offset in edges.get(node, []):
            where = offsets[node] - offset
            if neighbour not in offsets:
                offsets[neighbour] = where
                frontier.append(neighbour)
            elif offsets[neighbour] != where:
                return None
    low = min(offsets.values())
    return {node: offset - low for node, offset in offsets.items()}


def _stream_ranks(gm: fx.GraphModule, a: Analysis,
                  offsets: dict[fx.Node, int]) -> torch.Tensor | None:
    """The stream's channel order (rank per stream channel id), or None: nothing to order."""
    size = max(offset + a.states[n].channels for n, offset in offsets.items())

    stored = _stored(gm, a, offsets)

    def held(node: fx.Node) -> np.ndarray:  # the channels a tensor stores, in stream ids
        mask = np.zeros(size, dtype=bool)
        offset = offsets[node]
        mask[offset:offset + a.states[node].channels] = stored[node].numpy()
        return mask

    constraints = []  # (where, moved): moved must be a run of where's channels
    for node in offsets:
        if a.kinds.get(node) != "sum":
            continue
        result = held(node)
        for operand in ops.sum_operands(node)[:2]:
            if operand not in offsets:
                continue
            side = held(operand)
            moved = result & side
            for where in (side, result):
                if moved.any() and not np.array_equal(moved, where):
                    constraints.append((where, moved))
    if not constraints:
        return None
    where = np.stack([w for w, _ in constraints])
    moved = np.stack([m for _, m in constraints])
    # channels with the same membership in every set move together: order the classes
    keys, class_of = np.unique(np.concatenate([where, moved]).T, axis=0, return_inverse=True)
    class_of = class_of.reshape(-1)
    if len(keys) > MAX_CLASSES:
        return None
    count = len(constraints)
    in_where, in_moved = keys[:, :count].T, keys[:, count:].T  # constraint x class
    order = _search(in_where, in_moved, _start(keys))
    class_rank = np.empty(len(order), dtype=np.int64)
    class_rank[order] = np.arange(len(order))
    # channels ordered by class, then by id (a stable order inside a class)
    sort = np.lexsort((np.arange(size), class_rank[class_of]))
    ranks = np.empty(size, dtype=np.int64)
    ranks[sort] = np.arange(size)
    return torch.from_numpy(ranks)


def _stored(gm: fx.GraphModule, a: Analysis,
            offsets: dict[fx.Node, int]) -> dict[fx.Node, torch.Tensor]:
    """The channels each tensor of the stream will store (as the builder lays them out):
    a producer or a sum its needed channels, a channelwise operation its input's less the
    plan's constants at a site, a channel pad its input's shifted."""
    stored: dict[fx.Node, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node not in offsets:
            continue
        kind, source = a.kinds.get(node), ops.tensor_arg(node)
        if kind == "channelwise" and source in stored:
            mask = stored[source].clone()
            if node in a.site_units:
                mask[a.site_units[node]] = False
        elif kind == "chanpad" and source in stored:
            _, before, _ = a.ranges[node]
            mask = torch.zeros(a.states[node].channels, dtype=torch.bool)
            mask[before:before + stored[source].numel()] = stored[source]
        else:
            mask = a.needed[node].clone()
        stored[node] = mask
    return stored


def _start(keys: np.ndarray) -> np.ndarray:
    """Classes sorted by membership (held by more sets first): a reasonable first order."""
    return np.lexsort(keys.T[::-1] * -1 + 1)


def _broken(in_where: np.ndarray, in_moved: np.ndarray, order: np.ndarray) -> int:
    """How many constraints' moved classes are not consecutive among their where classes."""
    where, moved = in_where[:, order], in_moved[:, order]
    index = np.cumsum(where, axis=1)  # position among the where classes, from 1
    big = order.size + 1
    first = np.where(moved, index, big).min(axis=1)
    last = np.where(moved, index, 0).max(axis=1)
    return int((last - first + 1 != moved.sum(axis=1)).sum())


def _search(in_where: np.ndarray, in_moved: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The best of a local search from ``start`` and from up to ``RESTARTS`` seeded shuffles,
    within ``MAX_EVALUATIONS`` orders evaluated in all (a count, not a time: the same plan
    gives the same layout on any machine, so a trimmed state_dict reloads into a rebuild)."""
    rng = np.random.default_rng(0)
    budget = [MAX_EVALUATIONS]
    best, best_cost = start, _broken(in_where, in_moved, start)
    for attempt in range(RESTARTS + 1):
        if best_cost == 0 or budget[0] <= 0:
            break
        order = start if attempt == 0 else rng.permutation(start)
        order, cost = _descend(in_where, in_moved, order, budget)
        if cost < best_cost:
            best, best_cost = order, cost
    return best


def _descend(in_where: np.ndarray, in_moved: np.ndarray, order: np.ndarray,
             budget: list[int]) -> tuple[np.ndarray, int]:
    """Move one class to another place while that breaks fewer constraints."""
    best = _broken(in_where, in_moved, order)
    for _ in range(PASSES):
        improved = False
        for item in list(order):
            if best == 0 or budget[0] <= 0:
                return order, best
            rest = order[order != item]
            budget[0] -= rest.size + 1
            for place in range(rest.size + 1):
                candidate = np.insert(rest, place, item)
                cost = _broken(in_where, in_moved, candidate)
                if cost < best:
                    best, order, improved = cost, candidate, True
        if not improved:
            break
    return order, best

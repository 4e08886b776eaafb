"""Evaluate candidate plans on the search split, reusing activations that cannot change.

The model is traced once with a ``ConstantReplace`` after every site (the building blocks of
``velcro.apply``); a candidate only swaps the masks. The graph is run node by node, so a run
can start at a *cut*: the point just before site k's replacement. Every value computed before
that cut depends only on the masks of sites 0..k-1, so the live values there (the tensors still
needed later) are cached per batch, keyed by those sites' unit counts, and any later candidate
that agrees on them starts there. The cache is a small LRU bounded in megabytes.

In-place ops are made out-of-place in the evaluator's private copy, so cached tensors are never
overwritten by a later run.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from velcro.apply import AffineReplace, ConstantReplace, check_activation_shape
from velcro.calibrate import model_device
from velcro.distributed import process_group
from velcro.errors import VelcroError
from velcro.evaluate import _labelled
from velcro.graph import find_sites, insert_after_sites, site_nodes, trace
from velcro.search._candidates import Rankings
from velcro.search._criteria import Tally, compare_outputs

_OUT_OF_PLACE = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, torch.relu_: torch.relu, F.relu_: F.relu,
}


@dataclass
class Outcome:
    """One candidate on the search images, paired with the uncompressed model on the same ones.

    ``correct``, ``loss_sum``, ``lost`` and ``gained`` are None when the images have no labels.
    """

    correct: int | None
    images: int
    loss_sum: float | None
    changed: int = 0  # top-1 differs from the uncompressed model's
    kl_sum: float = 0.0  # sum over images of KL(p_uncompressed || p_candidate)
    kl_square_sum: float = 0.0
    lost: int | None = None  # right before, wrong now
    gained: int | None = None  # wrong before, right now

    @property
    def accuracy(self) -> float | None:
        if self.correct is None:
            return None
        return self.correct / self.images if self.images else 0.0

    @property
    def loss(self) -> float | None:
        """Mean cross-entropy against the labels."""
        if self.loss_sum is None:
            return None
        return self.loss_sum / self.images if self.images else 0.0

    @property
    def agreement(self) -> float:
        """Share of images whose top-1 is the uncompressed model's."""
        return 1.0 - self.changed / self.images if self.images else 1.0

    @property
    def kl(self) -> float:
        """Mean KL divergence of the softmax from the uncompressed model's (nats)."""
        return self.kl_sum / self.images if self.images else 0.0

    def tally(self, baseline: Outcome) -> Tally:
        """The paired counts the guard reads; ``baseline`` is the uncompressed model's."""
        return Tally(self.images, self.changed, self.kl_sum, self.kl_square_sum,
                     baseline.correct, self.correct, self.lost, self.gained)


@dataclass
class _Entry:
    position: int  # index into the node list where a run resumes
    key: tuple[int, ...]  # unit counts of the sites before the cut
    envs: list[dict]  # per batch: node -> value, the values live at the cut
    nbytes: int


def _out_of_place(gm: fx.GraphModule) -> None:
    for module in gm.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    for node in gm.graph.nodes:
        if node.op == "call_function":
            if node.target in _OUT_OF_PLACE:
                node.target = _OUT_OF_PLACE[node.target]
            if node.kwargs.get("inplace") is True:
                node.kwargs = {**node.kwargs, "inplace": False}
        elif node.op == "call_method":
            name = node.target
            if name.endswith("_") and not name.endswith("__") and hasattr(torch.Tensor, name[:-1]):
                node.target = name[:-1]
    gm.recompile()


def load_batches(data, device) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Batches of ``(images, labels)`` on ``device``; a batch that is a bare tensor has no
    labels (the fidelity criteria need none), but labels are given for all or for none."""
    batches = []
    for item in data:
        if isinstance(item, torch.Tensor):
            images, labels = item, None
        elif isinstance(item, (tuple, list)) and len(item) == 2 and item[1] is None:
            images, labels = item[0], None
        else:
            images, labels = _labelled(item)
            labels = labels.to(device)
        if batches and (labels is None) != (batches[0][1] is None):
            raise VelcroError("search data mixes labelled and unlabelled batches; give labels "
                              "for every batch or for none")
        batches.append((images.to(device), labels))
    if not batches:
        raise VelcroError("search data yielded no images; give the search split's images")
    return batches


def _nbytes(env: dict) -> int:
    return sum(v.element_size() * v.numel() for v in env.values() if isinstance(v, torch.Tensor))


class CandidateEvaluator:
    """Top-1 and cross-entropy of candidate unit counts on fixed, in-memory data.

    Args:
        model: the uncompressed model.
        rankings: the search's :class:`Rankings` (site order and constants).
        data: labelled batches of the search split; held in memory (on the model's device).
        task_classes: restrict the argmax to these classes, if given.
        cache_mb: memory for cached activations; 0 turns caching off (per rank).
        group: a torch.distributed process group (default: torchrun's, if any). Every rank
            holds all batches (they must come in the same order on each) but runs only
            batches ``rank, rank + world, ...``; per-batch results are gathered and summed in
            batch order, so every rank gets the single-process outcome, bit for bit, and
            all ranks take the same search steps.
    """

    def __init__(self, model: nn.Module, rankings: Rankings, data, *, task_classes=None,
                 cache_mb: float = 1024.0, group: dist.ProcessGroup | None = None,
                 example: torch.Tensor | None = None) -> None:
        self.rankings = rankings
        self.group = process_group(group)
        self.rank, self.world = ((0, 1) if self.group is None else
                                 (dist.get_rank(self.group), dist.get_world_size(self.group)))
        self.device = model_device(model)
        gm = trace(model, example)  # example: where only a capture at that size works
        sites = find_sites(gm)
        if [s.name for s in sites] != rankings.names:
            raise VelcroError("the statistics' sites differ from the model's; calibrate this model")
        replacers = {
            r.name: ConstantReplace(torch.zeros(r.shape, dtype=torch.bool), r.source, r.name)
            for r in rankings.sites
        }
        insert_after_sites(gm, sites, replacers, prefix="velcro_constant")
        _out_of_place(gm)
        self.gm = gm.to(self.device).eval()
        self.nodes = list(gm.graph.nodes)
        position = {node: i for i, node in enumerate(self.nodes)}
        activation = site_nodes(gm, sites)
        # the replacer is the one user of each site's activation node
        self.replacer_positions = [
            position[next(iter(activation[s.name].users))] for s in sites
        ]
        self.replacer_site = {p: k for k, p in enumerate(self.replacer_positions)}
        self.last_use = {}
        for i, node in enumerate(self.nodes):
            for arg in node.all_input_nodes:
                self.last_use[arg] = i
        self.modules = dict(gm.named_modules())
        self.masks: list[torch.Tensor | None] = [None] * len(sites)
        # affine candidates: per site the module computing the predictions, or None
        self.predictors: list[AffineReplace | None] = [None] * len(sites)
        self._mask_cache: dict[tuple[int, int], torch.Tensor] = {}
        self.task_classes = (torch.as_tensor(list(task_classes), device=self.device)
                             if task_classes else None)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise VelcroError("search needs a model with one input tensor")
        self.batches = load_batches(data, self.device)
        self.labelled = self.batches[0][1] is not None
        self.images = sum(int(images.shape[0]) for images, _ in self.batches)
        # per batch: the uncompressed model's logits (filled on first use)
        self.reference: dict[int, tuple] | None = None
        start = position[placeholders[0]] + 1
        self.root = _Entry(start, (), [{placeholders[0]: x} for x, _ in self.batches], 0)
        self.cache: OrderedDict[tuple, _Entry] = OrderedDict()
        self.cache_bytes = int(cache_mb * 2**20)
        self.nodes_run = 0

    def _set_masks(self, counts) -> None:
        for k, (ranking, count) in enumerate(zip(self.rankings.sites, counts, strict=True)):
            self.predictors[k] = self._predictor(ranking, count)
            if count == 0:
                self.masks[k] = None
                continue
            key = (k, count)
            if key not in self._mask_cache:
                if len(self._mask_cache) > 4 * len(self.masks):
                    self._mask_cache.clear()
                mask = ranking.mask(count, self.rankings.granularity)
                self._mask_cache[key] = mask.to(self.device)
            self.masks[k] = self._mask_cache[key]

    def _predictor(self, ranking, count: int) -> AffineReplace | None:
        affine = ranking.affine(count)
        if affine is None:
            return None
        key = ("affine", ranking.name, count)
        if key not in self._mask_cache:
            units, offset, coefficients = affine
            module = AffineReplace(units, offset, coefficients, ranking.channel_axis,
                                   ranking.name)
            self._mask_cache[key] = module.to(self.device)
        return self._mask_cache[key]

    def _best_entry(self, counts) -> _Entry:
        best = self.root
        for entry in self.cache.values():
            if entry.position > best.position and tuple(counts[: len(entry.key)]) == entry.key:
                best = entry
        if best is not self.root:
            self.cache.move_to_end((best.position, best.key))
        return best

    def _run(self, env: dict, start: int, stop: int) -> dict:
        """Run nodes ``start..stop-1`` on a copy of ``env``; return the env after them."""
        env = dict(env)
        self.nodes_run += stop - start
        for i in range(start, stop):
            node = self.nodes[i]
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            if node.op == "call_module":
                site = self.replacer_site.get(i)
                if site is not None:
                    mask = self.masks[site]
                    module = self.modules[node.target]
                    check_activation_shape(args[0], module.mask.shape, module.site)
                    if self.predictors[site] is not None:
                        value = self.predictors[site](args[0])
                    else:
                        value = args[0] if mask is None else torch.where(
                            mask, module.constant.to(args[0].dtype), args[0])
                else:
                    value = self.modules[node.target](*args, **kwargs)
            elif node.op == "call_function":
                value = node.target(*args, **kwargs)
            elif node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "get_attr":
                value = self.gm
                for part in node.target.split("."):
                    value = getattr(value, part)
            elif node.op == "output":
                return {"output": args[0]}
            else:
                raise VelcroError(f"unexpected graph node {node.op} '{node.name}'")
            env[node] = value
            for arg in node.all_input_nodes:
                if self.last_use.get(arg) == i:
                    env.pop(arg, None)
            if node not in self.last_use:
                env.pop(node, None)
        return env

    def _store(self, entry: _Entry) -> None:
        if entry.nbytes > self.cache_bytes:
            return
        while self.cache and (sum(e.nbytes for e in self.cache.values()) + entry.nbytes
                              > self.cache_bytes):
            self.cache.popitem(last=False)
        self.cache[(entry.position, entry.key)] = entry

    @torch.no_grad()
    def evaluate(self, counts, reuse_from: int | None = None) -> tuple[Outcome, int | None]:
        """Evaluate unit counts per site.

        Returns the outcome and the site whose cached inputs the run started from (None: it
        ran from the images).

        ``reuse_from``: the caller expects more candidates that agree with this one on sites
        before ``reuse_from``; the live values at that cut are kept for them.
        """
        counts = tuple(int(c) for c in counts)
        if self.reference is None:  # the uncompressed model first: every outcome is paired
            zeros = tuple(0 for _ in counts)
            self._set_masks(zeros)
            self.reference = {}
            try:
                baseline = self._outcome(self.root, None)
            except BaseException:
                self.reference = None
                raise
            if counts == zeros:
                return baseline, None
        self._set_masks(counts)
        start = self._best_entry(counts)
        cut = None
        if reuse_from is not None and self.cache_bytes > 0:
            position = self.replacer_positions[reuse_from]
            if position > start.position:
                cut = _Entry(position, counts[:reuse_from], [], 0)
        return self._outcome(start, cut), self.replacer_site.get(start.position)

    def _outcome(self, start: _Entry, cut: _Entry | None) -> Outcome:
        per_batch: list[tuple] = []  # (batch, correct, cross-entropy, changed, lost, ...)
        try:
            cut = self._run_batches(start, cut, per_batch)
        except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it
            if self.group is None:
                raise
            self._gather(per_batch, exc)
        if self.group is not None:
            per_batch = self._gather(per_batch, None)
        columns = [0, 0.0, 0, 0, 0, 0.0, 0.0]
        for row in sorted(per_batch):  # batch order: the same float sums on every rank
            for i, value in enumerate(row[1:]):
                columns[i] += value
        if cut is not None:
            self._store(cut)
        correct, loss_sum, changed, lost, gained, kl_sum, kl_square_sum = columns
        if not self.labelled:
            correct = loss_sum = lost = gained = None
        return Outcome(correct, self.images, loss_sum, changed, kl_sum, kl_square_sum, lost,
                       gained)

    def _run_batches(self, start: _Entry, cut: _Entry | None, per_batch: list) -> _Entry | None:
        end = len(self.nodes)
        for index, (_, labels) in enumerate(self.batches):
            if index % self.world != self.rank:  # another rank's batch
                if cut is not None:
                    cut.envs.append(None)
                continue
            env = start.envs[index]
            position = start.position
            if cut is not None:
                env = self._run(env, position, cut.position)
                position = cut.position
                cut.envs.append(env)
                cut.nbytes += _nbytes(env)
                if cut.nbytes * len(self.batches) > self.cache_bytes * (index + 1):
                    cut = None  # it would not fit: stop keeping it
            logits = self._run(env, position, end)["output"]
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise VelcroError("search needs a model that returns (batch, classes) logits")
            per_batch.append((index, *self._compare(index, logits.float(), labels)))
        return cut

    def _compare(self, index: int, logits: torch.Tensor, labels) -> tuple:
        """One batch's sums: correct, cross-entropy, changed, lost, gained, KL, KL squared."""
        if index not in self.reference:  # the uncompressed model's logits
            self.reference[index] = logits
        tally = compare_outputs(self.reference[index], logits, labels, self.task_classes)
        if labels is None:
            return 0, 0.0, tally.changed, 0, 0, tally.kl_sum, tally.kl_square_sum
        return (tally.correct, float(F.cross_entropy(logits, labels, reduction="sum")),
                tally.changed, tally.lost, tally.gained, tally.kl_sum, tally.kl_square_sum)

    def _gather(self, per_batch: list, error: Exception | None) -> list:
        """Every rank's per-batch results (or its error), the same on every rank."""
        payloads: list = [None] * self.world
        mine = per_batch if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(payloads, mine, group=self.group)
        if error is not None:
            raise error
        for peer, payload in enumerate(payloads):
            if isinstance(payload, str):
                raise VelcroError(f"rank {peer} failed during the search ({payload})")
        return [row for payload in payloads for row in payload]

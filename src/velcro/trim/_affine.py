"""Affine plans in ``trim``: the predictions folded into the consumers, before the analysis.

An affine site's trimmed channels r are ``offset_r(p) + sum_k beta_rk a_k(p)`` (see
:mod:`velcro._affine`). Before the analysis, the (batch-norm folded) graph is rewritten so that
the ordinary constant machinery does the rest, with the site's constants being the offsets:

- a consumer *linear in the site* (a convolution with groups = 1 or a linear layer reading
  the site alone, called once) gets weights ``W'[:, k] = W[:, k] + sum_r beta_rk W[:, r]``:
  ``W' * x`` with x's trimmed channels set to their offsets equals ``W * prediction``,
  zero padding included (the prediction is linear in the kept channels per position with no
  constant term beyond the offsets, which the bias map folds as for any constant);
- every other consumer (a residual sum, a concatenation, a depthwise convolution, pooling,
  the output) reads ``x + correction(x)``, where the correction is a 1x1 convolution (a
  linear layer for channels-last sites) whose only non-zero filters are the trimmed
  channels' rows beta: the analysis sees its other filters as constant zeros, so it computes
  ``len(R) x len(K)`` MACs per position, the price of the explicit prediction.

The rewritten graph computes exactly what ``velcro.apply`` computes for the plan.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn

from velcro.plan import Plan
from velcro.trim import _ops as ops

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def fold_affine(gm: fx.GraphModule, site_nodes: dict[str, fx.Node], plan: Plan) -> None:
    """Rewrite ``gm`` in place for the plan's affine sites (``site_nodes``: name -> node)."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    changed = False
    for index, (name, site_plan) in enumerate(plan.sites.items()):
        if site_plan.coefficients is None or site_plan.units.numel() == 0:
            continue
        node = site_nodes[name]
        beta = site_plan.coefficients.double()
        units = site_plan.units.to(torch.int64)
        ndim = len(site_plan.shape) + 1
        axis = site_plan.channel_axis + 1 if site_plan.channel_axis >= 0 \
            else ndim + site_plan.channel_axis
        others = []
        for user in list(node.users):
            module = _linear_consumer(gm, user, node, axis, ndim, calls)
            if module is None:
                others.append(user)
            else:
                _set_module(gm, user.target, _folded(module, beta, units))
        if others:
            _predict_explicitly(gm, node, others, beta, units, axis, ndim,
                                f"velcro_predict_{index}")
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def _linear_consumer(gm: fx.GraphModule, user: fx.Node, site: fx.Node, axis: int, ndim: int,
                     calls: dict[str, int]) -> nn.Module | None:
    """The conv/linear module of ``user`` when it is linear in the site alone, else None."""
    if user.op != "call_module" or user.args != (site,) or user.kwargs \
            or calls.get(user.target, 0) != 1:
        return None
    module = gm.get_submodule(user.target)
    if isinstance(module, ops.CONV_MODULES) and module.groups == 1 and axis == 1 \
            and module.weight.dim() == ndim:
        return module
    if isinstance(module, nn.Linear) and axis == ndim - 1:
        return module
    return None


def _folded(module: nn.Module, beta: torch.Tensor, units: torch.Tensor) -> nn.Module:
    """A copy of ``module`` whose kept input channels also carry the trimmed ones' weights."""
    weight = module.weight.detach()
    wide = weight.double()
    dropped = wide.index_select(1, units)  # (out, R, *kernel)
    extra = torch.einsum("or...,rc->oc...", dropped, beta)
    folded = copy.copy(module)  # shares nothing it keeps: the weight is replaced
    folded._parameters = dict(module._parameters)
    folded.weight = nn.Parameter((wide + extra).to(weight.dtype))
    return folded


def _predict_explicitly(gm: fx.GraphModule, site: fx.Node, users: list[fx.Node],
                        beta: torch.Tensor, units: torch.Tensor, axis: int, ndim: int,
                        target: str) -> None:
    """``users`` read ``site + correction(site)``: the trimmed channels predicted."""
    channels = beta.shape[1]
    if axis == 1 and ndim > 2:
        correction = _CONVS[ndim - 2](channels, channels, 1, bias=False)
    else:
        correction = nn.Linear(channels, channels, bias=False)
    with torch.no_grad():
        correction.weight.zero_()
        rows = correction.weight.view(channels, channels)
        rows[units] = beta.to(rows.dtype)
    gm.add_submodule(target, correction)
    with gm.graph.inserting_after(site):
        corrected = gm.graph.call_module(target, (site,))
    with gm.graph.inserting_after(corrected):
        predicted = gm.graph.call_function(operator.add, (site, corrected))
    for user in users:
        user.replace_input_with(site, predicted)


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, name, module)


def affine_sites(model: nn.Module, share: float = 0.25) -> set[str]:
    """The sites where an affine prediction is worth its cost in a trimmed model.

    Where every consumer is linear in the site, the prediction folds into their weights for
    free. Elsewhere it is computed, ``len(K)`` MACs per position for each trimmed channel,
    at most ``channels``; the site qualifies when that is at most ``share`` of the MACs per
    position of the filter trimmed (a ResNet block's output qualifies: 64 against 576; a
    MobileNet expansion feeding a depthwise convolution does not: 96 against 16).
    """
    from velcro.graph import find_sites, site_nodes, trace

    gm = trace(model)
    sites = find_sites(gm)
    nodes = site_nodes(gm, sites)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    chosen = set()
    for site in sites:
        node = nodes[site.name]
        try:
            producer = gm.get_submodule(site.producer)
        except AttributeError:  # a functional producer: its filters' cost is unknown
            producer = None
        weight = getattr(producer, "weight", None)
        ndim = weight.dim() if isinstance(producer, ops.CONV_MODULES) else 2
        axis = 1 if site.channel_axis == 0 else ndim - 1
        folds = all(_linear_consumer(gm, user, node, axis, ndim, calls) is not None
                    for user in node.users)
        if folds or (isinstance(weight, torch.Tensor)
                     and weight.shape[0] <= share * weight[0].numel()):
            chosen.add(site.name)
    return chosen

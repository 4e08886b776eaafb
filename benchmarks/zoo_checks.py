"""Measurements of bench_zoo.py that read graphs and models (velcro's public API only).

- activation calls: an eager count through a ``TorchFunctionMode`` and the traced nodes, both
  named the same way (``hardtanh(0, 6)`` is relu6);
- why an activation is not a site: the ops that end the walk back to a conv/linear;
- whether a planned site's producer lost its filters in the trimmed model, and the op chain
  from producer to site when it did not;
- the trimmed graph's ops, and ONNX parity.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from velcro.graph.sites import ACTIVATION_FUNCTIONS, ACTIVATION_MODULES

# the kinds velcro.find_sites knows, from its own tables (a hand-kept copy here went stale
# when leaky_relu, elu, mish... became sites)
VELCRO_KINDS = tuple(sorted(set(ACTIVATION_MODULES.values()) | set(ACTIVATION_FUNCTIONS.values())))
ACTIVATION_NAMES = {"relu", "relu6", "hardtanh", "silu", "gelu", "hardswish", "hardsigmoid",
                    "sigmoid", "tanh", "mish", "leaky_relu", "elu", "selu", "celu", "softplus",
                    "prelu"}
MODULE_KINDS = {"ReLU": "relu", "ReLU6": "relu6", "Hardtanh": "hardtanh", "SiLU": "silu",
                "GELU": "gelu", "Hardswish": "hardswish", "Hardsigmoid": "hardsigmoid",
                "Sigmoid": "sigmoid", "Tanh": "tanh", "Mish": "mish", "LeakyReLU": "leaky_relu",
                "ELU": "elu", "SELU": "selu", "CELU": "celu", "Softplus": "softplus",
                "PReLU": "prelu"}


def activation_kind(name: str, args: tuple, kwargs: dict) -> str | None:
    name = name.rstrip("_")
    if name != "hardtanh":
        return name if name in ACTIVATION_NAMES else None
    low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
    high = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
    return "relu6" if (low, high) == (0.0, 6.0) else "hardtanh"


def count_eager_activations(model, x) -> Counter:
    """Activation calls of one forward, by kind, seen through a TorchFunctionMode."""
    import torch
    from torch.overrides import TorchFunctionMode

    class Calls(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.counts: Counter = Counter()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            kind = activation_kind(getattr(func, "__name__", ""), args, kwargs)
            if kind:
                self.counts[kind] += 1
            return func(*args, **kwargs)

    with torch.no_grad(), Calls() as calls:
        model(x)
    return calls.counts


def node_kind(gm, node) -> str | None:
    """The activation kind of a traced node (same naming as the eager count), or None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not type(module).__module__.startswith("torch.nn"):
            return None
        kind = MODULE_KINDS.get(type(module).__name__)
        if kind == "hardtanh" and (module.min_val, module.max_val) == (0.0, 6.0):
            return "relu6"
        return kind
    if node.op == "call_function":
        return activation_kind(getattr(node.target, "__name__", ""), node.args, node.kwargs)
    if node.op == "call_method":
        return activation_kind(node.target, node.args, node.kwargs)
    return None


def label(gm, node) -> str:
    """A short name of what a node does: module class, ``fn()`` or ``.method()``."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        text = type(module).__name__
        groups = getattr(module, "groups", 1)
        if isinstance(groups, int) and groups > 1:
            depthwise = groups == getattr(module, "in_channels", 0)
            text += "(depthwise)" if depthwise else f"(groups={groups})"
        return text
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target)) + "()"
    if node.op == "call_method":
        return f".{node.target}()"
    return node.op


def producer_path(gm, site_node, producer: str) -> list | None:
    """Nodes from the site's producer to the site (depth-first, as velcro.sites walks)."""
    def is_producer(node) -> bool:
        if node.op == "call_module":
            return node.target == producer
        name = getattr(node.target, "__name__", "")
        return node.op == "call_function" and f"{name}@{node.name}" == producer

    seen = set()

    def walk(node, depth: int) -> list | None:
        if is_producer(node):
            return [node]
        if depth == 0:
            return None
        for source in node.all_input_nodes:
            if source in seen or source.op in ("get_attr", "placeholder"):
                continue
            seen.add(source)
            path = walk(source, depth - 1)
            if path:
                return [*path, node]
        return None

    return walk(site_node, 24)


def blockers(gm, node) -> list[str]:
    """The ops that end the walk back from an activation before any conv/linear.

    The walk goes through what ``velcro.sites`` sees through (batch-norm, identity, dropout,
    additions), as its docstring says.
    """
    import operator

    import torch
    import torch.nn.functional as F

    see_through = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.Identity, torch.nn.Dropout,
                   torch.nn.Dropout2d)
    functions = (operator.add, operator.iadd, torch.add, F.batch_norm, F.dropout)
    found, seen, frontier = [], set(), [node]
    while frontier:
        current = frontier.pop()
        for source in current.all_input_nodes:
            if source in seen or source.op == "get_attr":
                continue
            seen.add(source)
            module = gm.get_submodule(source.target) if source.op == "call_module" else None
            if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
                continue
            if (isinstance(module, see_through)
                    or source.op == "call_function" and source.target in functions
                    or source.op == "call_method" and source.target in ("add", "add_")):
                frontier.append(source)
            else:
                found.append(label(gm, source))
    return found or ["nothing"]


def rel_diff(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def live_filters(module) -> int | None:
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() < 2:
        return None
    return int((weight.detach().flatten(1).abs().sum(1) > 0).sum())


def computed_filters(original, trimmed) -> set[int] | None:
    """The original filters a trimmed layer still computes, matched by weight direction.

    Only where rows keep their shape (no input column removed: depthwise convolutions,
    layers whose inputs were not trimmed); batch-norm folding scales rows, so |cosine| = 1.
    """
    before, after = original.weight.detach(), trimmed.weight.detach()
    if before.shape[1:] != after.shape[1:]:
        return None
    rows = after.flatten(1)
    rows = rows[rows.abs().sum(1) > 0]
    unit = before.flatten(1) / before.flatten(1).norm(dim=1, keepdim=True).clamp_min(1e-12)
    gram = (unit @ unit.T).abs().fill_diagonal_(0.0)
    if len(unit) > 1 and bool((gram > 0.9999).any()):
        return None  # filters of one direction (1x1 depthwise: one scalar each): count instead
    rows = rows / rows.norm(dim=1, keepdim=True)
    similarity, index = (rows @ unit.T).abs().max(dim=1)
    return set(index[similarity > 0.9999].tolist()) if len(rows) else set()


def producer_drops(gm, small, producer: str, chosen: list[int]) -> bool:
    """The trimmed model's ``producer`` computes none of the site's chosen channels.

    Matched filter by filter where rows keep their shape (a depthwise producer also loses
    the channels its input site made constant, which says nothing of its own site);
    elsewhere by count: at least as many filters gone as the site chose.
    """
    if "@" in producer:  # a functional conv/linear: no module to trim
        return False
    original = gm.get_submodule(producer)
    try:
        trimmed = small.get_submodule(producer)
    except AttributeError:
        return True  # every filter removed
    computed = computed_filters(original, trimmed)
    if computed is not None:
        return not computed & set(chosen)
    return live_filters(trimmed) <= live_filters(original) - len(chosen)


def trimmed_producers(gm, small, sites, plan) -> dict:
    """Planned sites whose producer loses filters; the others with their op chain."""
    nodes = {node.name: node for node in gm.graph.nodes}
    planned = [s for s in sites if s.name in plan.sites and plan.sites[s.name].units.numel()]
    trimmed, kept = 0, []
    for site in planned:
        if producer_drops(gm, small, site.producer, plan.sites[site.name].units.tolist()):
            trimmed += 1
            continue
        path = producer_path(gm, nodes[site.node], site.producer) or []
        side = sorted({label(gm, user) for node in path[:-1] for user in node.users
                       if user not in path})
        kept.append({"site": site.name, "producer": site.producer,
                     "chain": " > ".join(label(gm, node) for node in path),
                     "other_users": side})
    return {"planned": len(planned), "trimmed": trimmed, "kept": kept}


def graph_inventory(small) -> dict:
    """Ops of the trimmed graph, and the ops that receive a re-materialized full tensor."""
    ops, full = Counter(), Counter()
    materialize = {node for node in small.graph.nodes if node.op == "call_module"
                   and type(small.get_submodule(node.target)).__name__ == "Materialize"}
    for node in small.graph.nodes:
        if node.op == "call_module":
            ops[type(small.get_submodule(node.target)).__name__] += 1
        elif node.op == "call_function":
            fn = node.target
            text = f"{getattr(fn, '__module__', None) or ''}.{getattr(fn, '__name__', fn)}"
            ops[text + (f"(.{node.args[1]})" if fn is getattr else "")] += 1
        elif node.op == "call_method":
            ops[f"Tensor.{node.target}"] += 1
        if any(source in materialize for source in node.all_input_nodes):
            full[label(small, node)] += 1
    return {"ops": dict(ops), "materialized_into": dict(full)}


def onnx_check(velcro, module, x, path: Path, threads: int) -> dict:
    import onnx
    import onnxruntime as ort
    import torch

    # check=False: the parity is measured (and reported) here instead of refused
    velcro.export_onnx(module, path, x[:1], check=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        want = module(x)
    graph = onnx.load(str(path), load_external_data=False).graph
    data_dependent = sum(node.op_type in velcro.export.DATA_DEPENDENT_OPS for node in graph.node)
    return {"parity": rel_diff(got, want), "nodes": len(graph.node),
            "data_dependent": data_dependent}

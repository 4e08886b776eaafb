"""`velcro inspect`: what a statistics, plan, split, weights or model holds."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from velcro._format import plural
from velcro.cli import _common as common
from velcro.errors import VelcroError

DESCRIPTION = """\
Show what a file holds: statistics (sites, shapes, image count, variance quantiles), a plan
(sites, thresholds, chosen units, the compression-saving ratio C), a split (set sizes), a
weights file (tensors, parameters) or an ONNX file (inputs, outputs, operators). With
--model and no FILE: the model's activation sites and their shapes.

examples:
  velcro inspect cats.stats.safetensors
  velcro inspect cats.plan.json --json
  velcro inspect --model resnet18
"""
QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


def add_parser(subparsers) -> None:
    parser = common.new_parser(
        subparsers, "inspect", help="what a stats, plan, split, weights file or model holds",
        description=DESCRIPTION)
    parser.add_argument("file", nargs="?", metavar="FILE")
    common.add_model_options(parser, required=False)
    parser.add_argument("--input-shape", default=None, metavar="C,H,W",
                        help="input shape for a model's site shapes (default: a registered "
                             "model's, from its preprocessing; else 3,224,224)")
    common.add_runtime_options(parser, data=False, device=False)
    parser.set_defaults(run=run)


def _kind(path: Path) -> tuple[str, object]:
    """Guess what ``path`` holds; returns the kind and the parsed header/document."""
    if not path.is_file():
        raise VelcroError(f"'{path}' does not exist or is not a file")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.lstrip().startswith(b"{"):
        from velcro._validate import Fields, read_json

        document = read_json(path, Fields(path, "file", "give a velcro plan, split, trimmed "
                                          "model or results file"))
        fmt = document.get("format", "") if isinstance(document, dict) else ""
        for kind in ("plan", "split", "trimmed"):
            if fmt.startswith(f"velcro.{kind}/"):
                return kind, document
        if isinstance(document, dict) and document.get("command"):
            return "results", document
        raise VelcroError(f"'{path}' is JSON but not a velcro plan, split or results file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        velcro_meta = json.loads(meta["velcro"]) if "velcro" in meta else {}
        fmt = velcro_meta.get("format") or meta.get("format", "")
        if fmt.startswith("velcro.stats/"):
            return "stats", velcro_meta
        if fmt.startswith("velcro.plan/"):
            return "plan-tensors", meta
        if fmt.startswith("velcro.trimmed/"):
            return "trimmed", velcro_meta
        return "weights", None
    except Exception:  # not safetensors: a PyTorch file, read safely below, or garbage
        return "weights", None


def _quantiles(values: torch.Tensor) -> dict[str, float]:
    array = values.detach().double().flatten().numpy()
    names = ("min", "q25", "median", "q75", "max")
    return dict(zip(names, (float(q) for q in np.quantile(array, QUANTILES)), strict=True))


def _stats(path: Path) -> tuple[dict, list[str]]:
    from velcro.stats import Stats

    stats = Stats.load(path)
    rows = []
    for name, site in stats.sites.items():
        variance = site.variance
        rows.append({"site": name, "shape": list(site.shape), "elements": variance.numel(),
                     "channel_axis": site.channel_axis,
                     "zero_variance": float((variance == 0).double().mean()),
                     "variance": _quantiles(variance)})
    summary = {"kind": "stats", "file": str(path), "images": stats.count,
               "structure": stats.structure, "weights": stats.weights, "info": stats.info,
               "sites": rows}
    lines = [f"{path}: statistics of {plural(len(rows), 'site')} over "
             f"{plural(stats.count, 'image')} "
             f"(model {stats.info.get('model', '?')}, task {stats.info.get('task') or '-'})",
             *_recorded_lines(stats.info, f"'{path}'"),
             f"{'site':<32} {'shape':<16} {'var min':>9} {'median':>9} {'max':>9} {'zero':>6}"]
    for row in rows:
        q = row["variance"]
        lines.append(f"{row['site']:<32} {'x'.join(map(str, row['shape'])):<16} "
                     f"{q['min']:9.2e} {q['median']:9.2e} {q['max']:9.2e} "
                     f"{common.percent(row['zero_variance']):>6}")
    return summary, lines


def _recorded_lines(info: dict, where: str) -> list[str]:
    """The preprocessing and weights a statistics file or plan records, as lines."""
    from velcro.data import describe_preprocess, recorded_preprocess

    lines = []
    preprocess = recorded_preprocess(info, where)
    if preprocess is not None:
        shape = info.get("input_shape")
        size = f"; input {'x'.join(map(str, shape))}" if shape else ""
        lines.append(f"preprocessing: {describe_preprocess(preprocess)}{size}")
    if info.get("weights"):
        lines.append(f"weights: {info['weights']} (fingerprint "
                     f"{info.get('weights_fingerprint', '?')})")
    return lines


def _plan(path: Path) -> tuple[dict, list[str]]:
    from velcro.plan import Plan

    plan = Plan.load(path)
    rows = plan.summary()
    summary = {"kind": "plan", "file": str(path), "granularity": plan.granularity,
               "score": plan.score, "constant": plan.constant_kind,
               "saving_ratio": plan.saving_ratio, "structure": plan.structure,
               "weights": plan.weights, "info": plan.info, "sites": rows}
    lines = [f"{path}: {plan.granularity} plan over {plural(len(rows), 'site')}, C = "
             f"{common.percent(plan.saving_ratio)}", *_recorded_lines(plan.info, f"'{path}'"),
             f"{'site':<32} {'shape':<16} {'threshold':>9} {'chosen':>14}"]
    for row in rows:
        lines.append(f"{row['site']:<32} {'x'.join(map(str, row['shape'])):<16} "
                     f"{row['threshold']:9.3f} {row['chosen']:>6}/{row['of']:<7}")
    return summary, lines


def _weights(path: Path, kind: str, meta: object) -> tuple[dict, list[str]]:
    from velcro.models import read_state_dict

    state = read_state_dict(path)
    parameters = sum(t.numel() for t in state.values())
    tensors = [{"key": k, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
               for k, t in state.items()]
    summary = {"kind": kind, "file": str(path), "tensors": len(state),
               "elements": parameters, "entries": tensors}
    if meta:
        summary["info"] = meta
    lines = [f"{path}: {kind}, {plural(len(state), 'tensor')}, {plural(parameters, 'element')}"]
    lines += [f"  {t['key']:<48} {'x'.join(map(str, t['shape'])) or 'scalar':<18} {t['dtype']}"
              for t in tensors[:12]]
    if len(tensors) > 12:
        lines.append(f"  ... {len(tensors) - 12} more (see --json)")
    return summary, lines


def _onnx(path: Path) -> tuple[dict, list[str]]:
    try:
        import onnx
    except ImportError:
        raise VelcroError("inspecting ONNX files needs the onnx package: pip install onnx"
                          ) from None
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # onnx raises DecodeError and others for a bad file
        raise VelcroError(f"'{path}' is not a readable ONNX file ({type(exc).__name__})"
                          ) from None

    def shape(value) -> list:
        return [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]

    operators = Counter(node.op_type for node in graph.node)
    parameters = sum(int(np.prod(t.dims)) for t in graph.initializer)
    summary = {"kind": "onnx", "file": str(path),
               "inputs": [{"name": v.name, "shape": shape(v)} for v in graph.input],
               "outputs": [{"name": v.name, "shape": shape(v)} for v in graph.output],
               "nodes": len(graph.node), "operators": dict(operators.most_common()),
               "initializer_elements": parameters}
    lines = [f"{path}: ONNX graph of {len(graph.node)} nodes, {parameters:,} weight elements",
             *(f"  input {v['name']}: {v['shape']}" for v in summary["inputs"]),
             *(f"  output {v['name']}: {v['shape']}" for v in summary["outputs"]),
             "  operators: " + ", ".join(f"{op} x{n}" for op, n in operators.most_common())]
    return summary, lines


def _trimmed(path: Path) -> tuple[dict, list[str]]:
    model = common.velcro_api("load_trimmed")(path)
    parameters = sum(p.numel() for p in model.parameters())
    layers = Counter(type(m).__name__ for m in model.modules() if not list(m.children()))
    sites = getattr(model, "velcro_sites", None) or {}
    summary = {"kind": "trimmed", "file": str(path), "parameters": parameters,
               "layers": dict(layers.most_common()), "sites": sites}
    lines = [f"{path}: trimmed model, {plural(parameters, 'parameter')}, "
             f"{plural(len(sites), 'site')}",
             "  layers: " + ", ".join(f"{name} x{n}" for name, n in layers.most_common())]
    return summary, lines


def _model(args: argparse.Namespace) -> tuple[dict, list[str]]:
    from torch.fx.passes.shape_prop import ShapeProp

    from velcro.graph import find_sites, site_nodes, trace

    model = common.load_model(args, torch.device("cpu"))
    gm = trace(model)
    sites = find_sites(gm)
    shape = common.default_input_shape(args, model)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(1, *shape))
    except Exception as exc:  # the model rejects this input shape
        raise VelcroError(f"the model does not run on an input of shape {(1, *shape)} "
                          f"({type(exc).__name__}); set --input-shape") from None
    nodes = site_nodes(gm, sites)
    rows = []
    for site in sites:
        meta = nodes[site.name].meta.get("tensor_meta")
        site_shape = list(meta.shape[1:]) if meta is not None else None
        rows.append({"site": site.name, "kind": site.kind, "producer": site.producer,
                     "shape": site_shape,
                     "elements": int(np.prod(site_shape)) if site_shape else None})
    parameters = sum(p.numel() for p in model.parameters())
    summary = {"kind": "model", **common.model_info(args), "parameters": parameters,
               "input_shape": [1, *shape], "sites": rows}
    lines = [f"{args.model}: {type(model).__name__}, {parameters:,} parameters, "
             f"{len(rows)} activation sites",
             f"{'site':<32} {'kind':<9} {'shape':<16} producer"]
    lines += [f"{r['site']:<32} {r['kind']:<9} {'x'.join(map(str, r['shape'] or [])):<16} "
              f"{r['producer']}" for r in rows]
    return summary, lines


def run(args: argparse.Namespace) -> int:
    if args.file is None:
        if not args.model:
            raise VelcroError("give a FILE to inspect, or --model to list a model's sites")
        summary, lines = _model(args)
    else:
        path = Path(args.file)
        kind, meta = ("onnx", None) if path.suffix.lower() == ".onnx" else _kind(path)
        if kind == "onnx":
            summary, lines = _onnx(path)
        elif kind == "stats":
            summary, lines = _stats(path)
        elif kind == "plan":
            summary, lines = _plan(path)
        elif kind == "plan-tensors":
            raise VelcroError(f"'{path}' holds a plan's tensors; inspect the plan's JSON "
                              f"'{path.with_suffix('')}' instead")
        elif kind == "trimmed":
            summary, lines = _trimmed(path)
        elif kind == "split":
            counts = {name: len(items) for name, items in meta["sets"].items()}
            info = meta.get("info", {})
            summary = {"kind": "split", "file": str(path), "root": meta.get("root"),
                       "seed": meta.get("seed"), "fractions": meta.get("fractions"),
                       "counts": counts, "task": info.get("task"),
                       "classes": info.get("classes")}
            lines = [f"{path}: split of {meta.get('root')} (seed {meta.get('seed')}, task "
                     f"{info.get('task') or '-'}): "
                     + ", ".join(f"{n} {name}" for name, n in counts.items())]
        elif kind == "results":
            summary, lines = meta, [json.dumps(meta, indent=1)]
        else:
            summary, lines = _weights(path, kind, meta)
    common.emit(args, summary, lines)
    return 0

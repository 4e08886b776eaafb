"""onnxruntime speed and ONNX graph size of trimmed models (issue 17, item 5).

**Speed.** ResNet-18 (velcro's built-in, 224x224, kaiming-scaled random weights, batch-norm
statistics randomised), statistics from 8 random images, a channel plan at uniform
T = 0.3, ``velcro.trim`` with ``channel_multiple=8`` (the default until it became "auto",
which times torch's kernels, not onnxruntime's). Both models are exported with
``velcro.export_onnx`` (dynamic batch) and run by onnxruntime's CPU provider with its default
graph optimisations and ``--threads`` intra-op threads. Paired rounds: each round runs the
original and the trimmed model once each, alternating which goes first, and takes the
round's ratio original / trimmed; quoted is the median of those ratios, at batch 1 and 32,
and its share of the MAC speedup (``velcro.cost``: original MACs / trimmed MACs). The load
average is recorded before and after: on a shared machine, only the paired ratios mean
anything.

``--bound`` adds two models to the rounds: the trimmed one exported with its residual
placements as ``Slice``/``Pad``/``Gather`` (as before they became 1x1 convolutions), and the
trimmed one with its bias maps dropped. The latter computes something else (it is not
checked) and only shows what the maps cost:
onnxruntime fuses a convolution with its activation and with a residual addition, but not
with the ``Add`` of a constant map broadcast over the batch, so a convolution with a bias map
leaves its NCHWc layout and comes back (``ReorderOutput``, ``Add``, ``Relu``,
``ReorderInput``).

A residual sum exports the placement of its shortcut's channels as a 1x1 ``Conv`` with a
0/1 weight (it stays in onnxruntime's NCHWc layout and takes the ``Add``); its MACs are not
in ``velcro.cost`` (the eager model adds slices in place): "MAC speedup with placements"
counts them.

**Graph size.** Node counts of the exported original and trimmed graphs (T = 0.3, 4 random
images of the model's input size) for resnet18, mobilenet_v2, googlenet, cifar_resnet20/32/44/56
(``../shared/data/cifar10/resnet*.safetensors``), efficientnet_lite0 (``weights=
"pretrained"``) and timm's vit_tiny_patch16_224 at 64x64 (random weights; skipped without
timm), the operators the trimmed graph adds, how many of those are bias maps, and any
data-dependent operator (``velcro.export.DATA_DEPENDENT_OPS``). A model whose original
exports but whose trimming fails is one row saying why.

    .venv/bin/python benchmarks/bench_onnx.py --bound            # ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_onnx.py --quick            # 64x64, a few rounds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import _bench
import torch
import torch.nn as nn
from tqdm.auto import tqdm

import velcro
from velcro.trim import _modules

ROOT = Path(__file__).resolve().parents[1]
CIFAR = tuple(f"cifar_resnet{depth}" for depth in (20, 32, 44, 56))
COUNTED = ("resnet18", "mobilenet_v2", "googlenet", *CIFAR, "efficientnet_lite0", "vit_tiny")
WEIGHTS = {**{name: f"cifar10/resnet{name[12:]}.safetensors" for name in CIFAR},
           "efficientnet_lite0": "pretrained"}
SIZES = {**dict.fromkeys(CIFAR, 32), "vit_tiny": 64}


def vit_tiny() -> nn.Module | str:
    """timm's vit_tiny_patch16_224 at 64x64 (random weights), or why it is skipped."""
    import types

    # torchvision's compiled ops do not load here; timm needs only its Python parts
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    try:
        import timm
    except ImportError as exc:
        return f"skipped: timm does not import ({exc})"
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()


def build(name: str, data: Path) -> nn.Module | str:
    """The model, or why it is skipped."""
    if name == "vit_tiny":
        return vit_tiny()
    weights = WEIGHTS.get(name)
    if weights and weights != "pretrained":
        weights = data / weights
        if not weights.is_file():
            return f"skipped: {weights} is absent"
    kwargs = {"aux_logits": False} if name == "googlenet" else {}
    try:
        model = velcro.models.create(name, weights=weights, **kwargs)
    except velcro.VelcroError as exc:
        return f"skipped: {exc}"
    if weights is None:
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        for module in model.modules():  # activations near unit scale, no denormals
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model.eval()


def trimmed(model: nn.Module, size: int, threshold: float, images: int) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(images, 3, size, size, generator=gen)]
    stats = velcro.calibrate(model, data, progress=False)
    return velcro.trim(model, velcro.plan(stats, threshold, granularity="channel"),
                       input_shape=(3, size, size), channel_multiple=8)


def without_maps(small: nn.Module) -> nn.Module:
    """The trimmed model with its bias maps dropped (not exact: a bound for timing only)."""
    import copy

    small = copy.deepcopy(small)
    for name, module in list(small.named_modules()):
        if isinstance(module, _modules._BiasMapMixin):
            plain = _modules.rebuild(module, module.weight.detach(), module.bias.detach(),
                                     torch.empty(0))
            parent, _, leaf = name.rpartition(".")
            setattr(small.get_submodule(parent) if parent else small, leaf, plain)
    return small


def placement_macs(small: nn.Module, one: torch.Tensor) -> int:
    """MACs per image of the 1x1 placement convolutions a trimmed model exports (one per
    residual sum input that is not added as it is; ``velcro.cost`` counts the eager model,
    which adds slices in place instead)."""
    from velcro.trim._place import conv_placeable, is_plain

    total = [0]

    def count(module, args, _out):
        base, *others = args
        for i, x in enumerate(others):
            where = [-1] * base.shape[module.dim]
            for target, source in module.pairs[i]:
                where[target] = source
            if not is_plain(where, x.shape[module.dim]) and conv_placeable(x, module.dim):
                total[0] += base[0].numel() * x.shape[module.dim]

    hooks = [m.register_forward_hook(count) for m in small.modules()
             if isinstance(m, _modules.ChannelSum)]
    with torch.no_grad():
        small(one)
    for hook in hooks:
        hook.remove()
    return total[0]


@contextlib.contextmanager
def sliced_placements(active: bool):
    """Export residual sums' placements as before they became convolutions (``Slice``,
    ``Pad``, ``Gather``), for comparison."""
    saved = _modules.conv_placeable
    if active:
        _modules.conv_placeable = lambda x, dim: False
    try:
        yield
    finally:
        _modules.conv_placeable = saved


def nodes(path: Path) -> Counter:
    import onnx

    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def paired_rounds(sessions: dict, x, rounds: int, desc: str) -> dict[str, list[float]]:
    """Seconds per model and round; each round runs every model once, in a rotated order."""
    feed = {"input": x}
    for s in sessions.values():
        s.run(None, feed)  # warm up
    names = list(sessions)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in tqdm(range(rounds), desc=desc, leave=False):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            sessions[name].run(None, feed)
            times[name].append(time.perf_counter() - start)
    return times


def speed(args: argparse.Namespace, folder: Path) -> list[dict]:
    model = build("resnet18", args.data)
    small = trimmed(model, args.size, args.threshold, 8)
    one = torch.zeros(1, 3, args.size, args.size)
    original_macs, small_macs = velcro.cost(model, one).macs, velcro.cost(small, one).macs
    mac_speedup = original_macs / small_macs
    exported_speedup = original_macs / (small_macs + placement_macs(small, one))
    variants = {"original": model, "trimmed": small}
    if args.bound:
        variants["trimmed, maps dropped"] = without_maps(small)
        variants["trimmed, placements sliced"] = small
    paths = {}
    for number, (kind, variant) in enumerate(variants.items()):
        _bench.say(f"  export {kind} ...")
        with sliced_placements(kind.endswith("placements sliced")):
            paths[kind] = velcro.export_onnx(variant, folder / f"model{number}.onnx", one,
                                             check=kind != "trimmed, maps dropped")
    sessions = {kind: session(path, args.threads) for kind, path in paths.items()}
    gen = torch.Generator().manual_seed(2)
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size, generator=gen).numpy()
        rounds = args.rounds if batch == 1 else max(3, args.rounds // 2)
        load_before = os.getloadavg()[0]
        times = paired_rounds(sessions, x, rounds, f"batch {batch}")
        load_after = os.getloadavg()[0]
        for kind in variants:
            if kind == "original":
                continue
            ratios = [a / b for a, b in zip(times["original"], times[kind], strict=True)]
            speedup = statistics.median(ratios)
            rows.append({
                "model": "resnet18", "variant": kind, "batch": batch, "rounds": rounds,
                "original_ms": 1e3 * statistics.median(times["original"]),
                "trimmed_ms": 1e3 * statistics.median(times[kind]),
                "speedup": speedup, "speedup_quartiles": statistics.quantiles(ratios, n=4)
                if len(ratios) > 1 else [speedup] * 3,
                "mac_speedup": mac_speedup, "share_of_mac_speedup": speedup / mac_speedup,
                "exported_mac_speedup": exported_speedup,
                "load_before": load_before, "load_after": load_after,
                "nodes": sum(nodes(paths[kind]).values()),
            })
            _bench.say(f"  batch {batch} {kind}: {speedup:.2f}x against {mac_speedup:.2f}x "
                       f"MACs = {speedup / mac_speedup:.2f} (load {load_before:.1f}"
                       f" -> {load_after:.1f})")
    return rows


def graph_sizes(args: argparse.Namespace, folder: Path) -> list[dict]:
    rows = []
    for name in args.models:
        model = build(name, args.data)
        if isinstance(model, str):
            rows.append({"model": name, "note": model})
            _bench.say(f"  {name}: {model}")
            continue
        size = min(SIZES.get(name, args.size), args.size)
        one = torch.zeros(1, 3, size, size)
        original = nodes(velcro.export_onnx(model, folder / f"{name}.onnx", one))
        try:
            small = trimmed(model, size, args.threshold, 4)
            trim = nodes(velcro.export_onnx(small, folder / f"{name}-trimmed.onnx", one))
        except velcro.VelcroError as exc:  # the original exported: said, not fatal
            note = f"original {sum(original.values())} nodes; trimmed: {exc}"
            rows.append({"model": name, "size": size, "note": note})
            _bench.say(f"  {name}: {note}")
            continue
        maps = sum(isinstance(getattr(m, "bias_map", None), torch.Tensor)
                   for m in small.modules())
        dependent = sum(trim[op] for op in velcro.export.DATA_DEPENDENT_OPS)
        rows.append({"model": name, "size": size, "original": sum(original.values()),
                     "data_dependent": dependent,
                     "trimmed": sum(trim.values()), "added": dict(trim - original),
                     "removed": dict(original - trim), "bias_maps": maps,
                     "mac_speedup": velcro.cost(model, one).macs / velcro.cost(small, one).macs,
                     "exported_mac_speedup": velcro.cost(model, one).macs / (
                         velcro.cost(small, one).macs + placement_macs(small, one))})
        _bench.say(f"  {name}: {sum(original.values())} -> {sum(trim.values())} nodes "
                   f"(added {dict(trim - original)}, {maps} bias maps)")
    return rows


def markdown(speed_rows: list[dict], size_rows: list[dict], args) -> str:
    lines = ["| model | variant | batch | rounds | original ms | trimmed ms | speedup (median "
             "of paired rounds) | MAC speedup | share of MAC speedup | MAC speedup with "
             "placements | load before / after |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in speed_rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['rounds']} "
                     f"| {r['original_ms']:.1f} | {r['trimmed_ms']:.1f} | {r['speedup']:.2f}x "
                     f"| {r['mac_speedup']:.2f}x | {r['share_of_mac_speedup']:.2f} "
                     f"| {r['exported_mac_speedup']:.2f}x "
                     f"| {r['load_before']:.1f} / {r['load_after']:.1f} |")
    lines += ["", f"| model | input | ONNX nodes original -> trimmed (T = {args.threshold}) "
              "| operators added | bias maps | MAC speedup | with placements |",
              "|---|---:|---|---|---:|---:|---:|"]
    for r in size_rows:
        if "note" in r:
            lines.append(f"| {r['model']} | {r.get('size', '-')} | {r['note']} | - | - | - | - |")
            continue
        added = ", ".join(f"{k} {v}" for k, v in sorted(r["added"].items())) or "-"
        dependent = f" ({r['data_dependent']} data-dependent)" if r["data_dependent"] else ""
        lines.append(f"| {r['model']} | {r['size']} | {r['original']} -> {r['trimmed']}{dependent} "
                     f"| {added} | {r['bias_maps']} | {r['mac_speedup']:.2f}x "
                     f"| {r['exported_mac_speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(COUNTED), choices=COUNTED,
                        help="models whose graph sizes are counted")
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=20,
                        help="paired rounds at batch 1 (half, at least 3, above)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--bound", action="store_true",
                        help="also time the trimmed model without its bias maps (not exact)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    _bench.add_options(parser)
    args = parser.parse_args(argv)
    _bench.quick(args, size=64, batches=[1, 4], rounds=3, models=["resnet18",
                                                                     "cifar_resnet20", "vit_tiny"])
    _bench.started("bench_onnx", args, f"onnxruntime latency of trimmed ResNet-18 against "
                   f"the original (T = {args.threshold}, {args.size}x{args.size}, batches "
                   f"{args.batches}) and ONNX node counts of {', '.join(args.models)}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        speed_rows = speed(args, Path(tmp))
        size_rows = graph_sizes(args, Path(tmp))
    import onnxruntime

    header = (f"bench_onnx: {args.threads} threads, onnxruntime {onnxruntime.__version__}, "
              f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, {time.perf_counter() - start:.0f} s in all")
    table = markdown(speed_rows, size_rows, args)
    out = _bench.output_dir(args, "bench_onnx")
    (out / "bench_onnx.json").write_text(json.dumps(
        {"header": header, "args": {k: str(v) for k, v in vars(args).items()},
         "speed": speed_rows, "graph_sizes": size_rows}, indent=1))
    (out / "bench_onnx.md").write_text(header + "\n\n" + table + "\n")
    print(header + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

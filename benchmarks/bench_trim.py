"""Measured speedup of trimmed models against their MAC-theoretical speedup (issue 3).

For ResNet-18, MobileNet-V2 and GoogLeNet at 224x224, channel plans at uniform thresholds
(default 0.1, 0.3, 0.5; statistics from a few generated images, which is all timing needs),
the median latency of the original and the trimmed model, at batch 1 and 32, in

- ``eager``: PyTorch eager, NCHW tensors (the default memory format);
- ``eager-cl``: PyTorch eager, channels_last tensors and weights (both models);
- ``onnxruntime``: both models exported with ``velcro.export_onnx``, CPU provider.

Runs are interleaved (one run of each model in turn, ``--repeats`` rounds) so that load
drifts hit all models alike. ``speedup`` = original / trimmed latency; ``MAC speedup`` =
original MACs / trimmed MACs (``velcro.cost``, convs + linears, zero padding filters counted);
``ratio`` = speedup / MAC speedup. ``vs folded`` is the speedup against the original with
its batch-norms folded into the convolutions (``velcro.trim`` with an empty plan), which
isolates what trimming itself gains in eager mode (onnxruntime folds batch-norms itself).

Each trimmed model is first checked against ``velcro.apply`` (relative difference <= 1e-4).
Weights are random (kaiming-scaled so that no activation decays to slow denormal floats)
unless ``--weights-dir`` holds ``<model>.safetensors``; timing does not depend on them.

    .venv/bin/python benchmarks/bench_trim.py                      # full table, ~5 min
    .venv/bin/python benchmarks/bench_trim.py --models resnet18 --batches 1 --repeats 5
    .venv/bin/python benchmarks/bench_trim.py --quick   # resnet18 at 64x64, eager: a check
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _bench
import torch
import torch.nn as nn

import velcro

MODELS = ("resnet18", "mobilenet_v2", "googlenet")
SIZES: list[dict] = []  # per model and threshold: what the trimmed model computes
BACKENDS = ("eager", "eager-cl", "onnxruntime")


def build(name: str, weights_dir: Path | None) -> nn.Module:
    kwargs = {"aux_logits": False} if name == "googlenet" else {}
    path = weights_dir / f"{name}.safetensors" if weights_dir else None
    if path is not None and path.is_file():
        return velcro.models.create(name, weights=path, **kwargs).eval()
    model = velcro.models.create(name, **kwargs)
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model.eval()


def runner(backend: str, model: nn.Module, example: torch.Tensor, folder: Path, tag: str,
           threads: int):
    """A zero-argument callable running one batch through ``model`` on ``backend``."""
    if backend == "onnxruntime":
        import onnxruntime

        path = velcro.export_onnx(model, folder / f"{tag}.onnx", example[:1])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options,
                                               providers=["CPUExecutionProvider"])
        feed = {"input": example.numpy()}
        return lambda: session.run(None, feed)
    if backend == "eager-cl":
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        example = example.contiguous(memory_format=torch.channels_last)

    def run() -> None:
        with torch.inference_mode():
            model(example)

    return run


def interleaved_medians(runs: dict[str, object], repeats: int) -> dict[str, float]:
    """Median milliseconds per callable, running them in turn ``repeats`` times."""
    for run in runs.values():
        run()  # warm up: kernel selection, caches
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for round_index in range(repeats):
        shift = round_index % len(order)  # rotate who goes first
        for name in order[shift:] + order[:shift]:
            start = time.perf_counter()
            runs[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_model(name: str, args: argparse.Namespace, folder: Path) -> list[dict]:
    model = build(name, args.weights_dir)
    gen = torch.Generator().manual_seed(1)
    calibration = [torch.randn(4, 3, args.size, args.size, generator=gen)]
    stats = velcro.calibrate(model, calibration, progress=False)
    one = torch.zeros(1, 3, args.size, args.size)
    original_cost = velcro.cost(model, one)
    plans = {t: velcro.plan(stats, t, granularity="channel") for t in args.thresholds}
    trimmed = {t: velcro.trim(model, plan) for t, plan in plans.items()}
    probe = torch.randn(2, 3, args.size, args.size, generator=gen)
    with torch.inference_mode():  # time the right thing: trimmed = applied
        for t, small in trimmed.items():
            expected = velcro.apply(model, plans[t])(probe)
            error = float((small(probe) - expected).abs().max() / expected.abs().max())
            if error > 1e-4:
                raise SystemExit(f"{name} at {t}: trimmed differs from applied by {error:.1e}")
    folded = velcro.trim(model, velcro.plan(stats, 0.0, granularity="channel"))
    costs = {t: velcro.cost(m, one) for t, m in trimmed.items()}
    mac_speedup = {t: original_cost.macs / c.macs for t, c in costs.items()}
    for t, c in costs.items():
        SIZES.append({"model": name, "threshold": t, "saving_ratio": plans[t].saving_ratio,
                      "gmacs": (original_cost.macs / 1e9, c.macs / 1e9),
                      "mparams": (original_cost.parameters / 1e6, c.parameters / 1e6)})
    rows = []
    for batch in args.batches:
        example = torch.randn(batch, 3, args.size, args.size, generator=gen)
        for backend in args.backends:
            variants = {"original": model, **{f"t{t}": m for t, m in trimmed.items()}}
            if backend != "onnxruntime":
                variants["folded"] = folded
            runs = {tag: runner(backend, m, example, folder, f"{name}-{tag}", args.threads)
                    for tag, m in variants.items()}
            repeats = args.repeats if batch == 1 else max(3, args.repeats // 4)
            median = interleaved_medians(runs, repeats)
            for t in args.thresholds:
                speedup = median["original"] / median[f"t{t}"]
                rows.append({
                    "model": name, "threshold": t, "batch": batch, "backend": backend,
                    "original_ms": median["original"], "trimmed_ms": median[f"t{t}"],
                    "speedup": speedup, "mac_speedup": mac_speedup[t],
                    "ratio": speedup / mac_speedup[t],
                    "vs_folded": (median["folded"] / median[f"t{t}"]
                                  if "folded" in median else None),
                })
            print(f"  {name} batch {batch} {backend}: original {median['original']:.1f} ms",
                  file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | threshold | batch | backend | original ms | trimmed ms | speedup "
        "| MAC speedup | ratio | vs folded |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        folded = f"{r['vs_folded']:.2f}x" if r["vs_folded"] is not None else "-"
        lines.append(
            f"| {r['model']} | {r['threshold']:.1f} | {r['batch']} | {r['backend']} "
            f"| {r['original_ms']:.1f} | {r['trimmed_ms']:.1f} | {r['speedup']:.2f}x "
            f"| {r['mac_speedup']:.2f}x | {r['ratio']:.2f} | {folded} |"
        )
    return "\n".join(lines)


def sizes_markdown() -> str:
    lines = ["| model | threshold | saving ratio C | GMACs original -> trimmed "
             "| M parameters original -> trimmed |", "|---|---:|---:|---:|---:|"]
    for r in SIZES:
        lines.append(f"| {r['model']} | {r['threshold']:.1f} | {r['saving_ratio']:.3f} "
                     f"| {r['gmacs'][0]:.3f} -> {r['gmacs'][1]:.3f} "
                     f"| {r['mparams'][0]:.2f} -> {r['mparams'][1]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.1, 0.3, 0.5])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--repeats", type=int, default=15,
                        help="interleaved rounds at batch 1 (a quarter, at least 3, above)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--weights-dir", type=Path, default=None)
    _bench.add_options(parser)
    args = parser.parse_args(argv)
    _bench.quick(args, models=["resnet18"], thresholds=[0.3], batches=[1], backends=["eager"],
                 repeats=3, size=64)
    _bench.started("bench_trim", args,
                   f"trimmed against original latency, {', '.join(args.models)} at "
                   f"{args.size}x{args.size}, batches {args.batches}, {', '.join(args.backends)}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            _bench.say(f"  {name}: calibrate, plan, trim, check against apply ...")
            rows.extend(bench_model(name, args, Path(folder)))
    print(f"velcro.trim speedups, {args.size}x{args.size}, {args.threads} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"median of interleaved runs ({time.perf_counter() - start:.0f} s in all)\n")
    print(markdown(rows))
    print()
    print(sizes_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Narrow networks and padding ops (issue 17 item 6): MACs that ``velcro.trim`` saves on the
real CIFAR-10 ResNets and EfficientNet-Lite0 (../shared/data) with ``channel_multiple`` 1,
8 and "auto" (rounded to 8 only where timed faster), and Lite0 with its explicit TensorFlow
pads against the same network with the pads folded into the convolutions.

For each model: calibrate on the task's first images (CIFAR cats and dogs; ImageNet dogs for
Lite0), uniform channel plans at each T of --thresholds, ``velcro.trim`` with
``channel_multiple`` 1, 8 and auto. Per row: MACs saved (``velcro.cost``, trimmed against the
original), planned sites whose producer lost every planned filter (the trim report), trim
against ``velcro.apply`` (max |a - b| / max |b| on 4 held-out images); for auto, how many
trimmed convolutions it rounded and how long trimming took against multiple 1. For the CIFAR
ResNets, the latency speedup of each trimmed model over the original at --batch: paired
rounds (the four models in a rotating order each round, each run as often as one sample of
about 20 ms needs), the median of the per-round ratios original / trimmed. Auto times its
convolutions at the same batch and thread count.

"Lite0, pads folded" is the same network with each ``ZeroPad2d`` removed and its convolution
given the symmetric padding ``k // 2`` (same output sizes and MACs; a one-pixel shift, so it
is calibrated on its own): what trim saves once pads cannot stand in its way.

    .venv/bin/python benchmarks/bench_narrow.py            # 3 models (+ Lite0 folded)
    .venv/bin/python benchmarks/bench_narrow.py --quick    # ResNet-20, 32 images
    .venv/bin/python benchmarks/bench_narrow.py --models cifar_resnet20,cifar_resnet56 \
        --threads 1 --rounds 30                            # the auto column and latencies
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import _bench
import torch
import torch.nn as nn

import velcro
from velcro import models
from velcro.data import ImageFolder, ImageLoader
from velcro.errors import VelcroWarning

DATA = _bench.ROOT.parent / "shared" / "data"
CASES = {  # name: (registered model, image folder, class indices)
    "cifar_resnet20": ("cifar_resnet20", "cifar10/test", (3, 5)),
    "cifar_resnet56": ("cifar_resnet56", "cifar10/test", (3, 5)),
    "efficientnet_lite0": ("efficientnet_lite0", "imagenet-val1300/images",
                           tuple(range(151, 269))),
}


def fold_pads(model: nn.Module) -> nn.Module:
    """Lite0 without its explicit pads: each strided conv pads ``k // 2`` on every side."""
    def fold(owner: nn.Module, pad: str, conv: str) -> None:
        if getattr(owner, pad) is not None:
            setattr(owner, pad, None)
            layer = getattr(owner, conv)
            layer.padding = tuple(k // 2 for k in layer.kernel_size)

    fold(model, "_stem_pad", "_conv_stem")
    for block in model._blocks:
        fold(block, "_depthwise_pad", "_depthwise_conv")
    return model


def images(name: str, count: int) -> torch.Tensor:
    model_name, folder, classes = CASES[name]
    root = DATA / folder
    found = ImageFolder(root, classes=classes, labels="index", missing_classes="skip",
                        preprocess=models.preprocess_for(model_name))
    batches, total = [], 0
    for x, _ in ImageLoader(found, batch_size=32):
        batches.append(x)
        total += len(x)
        if total >= count:
            break
    return torch.cat(batches)[:count]


MULTIPLES = (1, 8, "auto")
SAMPLE_S = 0.02  # one latency sample repeats the call until it lasts about this long


@torch.inference_mode()
def speedups(original: nn.Module, trimmed: list[nn.Module], x: torch.Tensor,
             rounds: int) -> list[float]:
    """Per trimmed model, the median over paired rounds of original / trimmed latency."""
    everyone = [original, *trimmed]
    for model in everyone:  # warm-up
        model(x)
    start = time.perf_counter()
    original(x)
    calls = max(1, round(SAMPLE_S / max(time.perf_counter() - start, 1e-6)))
    ratios: list[list[float]] = [[] for _ in trimmed]
    for round_index in range(rounds):
        shift = round_index % len(everyone)
        seconds = [0.0] * len(everyone)
        for i in [*range(shift, len(everyone)), *range(shift)]:
            start = time.perf_counter()
            for _ in range(calls):
                everyone[i](x)
            seconds[i] = time.perf_counter() - start
        for i in range(len(trimmed)):
            ratios[i].append(seconds[0] / seconds[i + 1])
    return [statistics.median(r) for r in ratios]


def rows_for(label: str, model: nn.Module, calibration: torch.Tensor, heldout: torch.Tensor,
             thresholds: list[float], args: argparse.Namespace) -> list[dict]:
    stats = velcro.calibrate(model, calibration.split(32), progress=False)
    original = velcro.cost(model, heldout[:1]).macs
    timed = args.rounds > 0 and label.startswith("cifar_")
    x = torch.randn(args.batch, *heldout.shape[1:], generator=torch.Generator().manual_seed(1))
    rows = []
    for threshold in thresholds:
        plan = velcro.plan(stats, threshold, granularity="channel")
        with torch.no_grad():
            applied = velcro.apply(model, plan)(heldout)
        smalls, trim_s = [], []
        for multiple in MULTIPLES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", VelcroWarning)
                start = time.perf_counter()
                small = velcro.trim(model, plan, channel_multiple=multiple,
                                    auto_batch=args.batch)
                trim_s.append(time.perf_counter() - start)
            smalls.append(small)
        ratios = speedups(model, smalls, x, args.rounds) if timed else [None] * len(smalls)
        exact = smalls[0].velcro_channel_widths
        for multiple, small, ratio, seconds in zip(MULTIPLES, smalls, ratios, trim_s, strict=True):
            with torch.no_grad():
                diff = float((small(heldout) - applied).abs().max() / applied.abs().max())
            report = small.velcro_trim_report.values()
            planned = [e for e in report if e["planned"]]
            widths = small.velcro_channel_widths
            rows.append({
                "model": label, "T": threshold, "channel_multiple": multiple,
                "macs_saved": 1 - velcro.cost(small, heldout[:1]).macs / original,
                "planned_sites": len(planned),
                "producer_trimmed": sum(e["removed"] >= e["planned"] for e in planned),
                "trim_vs_apply": diff, "speedup": ratio, "batch": args.batch,
                "rounded_convs": sum(widths[c] > exact[c] for c in widths),
                "unaligned_convs": sum(exact[c] % 8 != 0 for c in exact),
                "trim_s": seconds, "auto_overhead_s": seconds - trim_s[0],
            })
            row = rows[-1]
            latency = f", speedup {ratio:.2f}x" if ratio is not None else ""
            rounded = (f", rounded {row['rounded_convs']}/{row['unaligned_convs']} unaligned "
                       f"convs (+{row['auto_overhead_s']:.1f}s)" if multiple == "auto" else "")
            print(f"{label:28s} T={threshold:.1f} multiple={multiple}: MACs saved "
                  f"{row['macs_saved']:6.1%}, producers trimmed {row['producer_trimmed']}/"
                  f"{row['planned_sites']}, trim vs apply {diff:.1e}{latency}{rounded}",
                  flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="calibration images per task")
    parser.add_argument("--thresholds", default="0.1,0.3,0.5")
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--batch", type=int, default=1, help="latency (and auto) batch")
    parser.add_argument("--rounds", type=int, default=20,
                        help="paired latency rounds, CIFAR ResNets only (0: no latency)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's)")
    _bench.add_options(parser)
    args = parser.parse_args(argv)
    _bench.started("bench_narrow", args, "MACs trim saves on the CIFAR ResNets and Lite0, "
                   "channel_multiple 1 vs 8 vs auto, Lite0 pads explicit vs folded")
    if args.quick:
        args.models, args.thresholds = "cifar_resnet20", "0.3"
        _bench.quick(args, images=32, rounds=3)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not DATA.is_dir():
        print(f"bench_narrow: {DATA} is absent (the real models and images)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    rows = []
    for name in args.models.split(","):
        data = images(name, args.images + 4)
        calibration, heldout = data[:args.images], data[args.images:]
        weights = ("pretrained" if name == "efficientnet_lite0"
                   else DATA / "cifar10" / f"{name.split('_')[-1]}.safetensors")
        model = models.create(CASES[name][0], weights=weights).eval()
        rows += rows_for(name, model, calibration, heldout, thresholds, args)
        if name == "efficientnet_lite0":
            rows += rows_for("efficientnet_lite0 (pads folded)", fold_pads(model), calibration,
                             heldout, thresholds, args)
    out = _bench.output_dir(args, "bench_narrow") / "bench_narrow.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"rows: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

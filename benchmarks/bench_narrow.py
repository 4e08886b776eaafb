"""Narrow networks and padding ops (issue 17 item 6): MACs that ``velcro.trim`` saves on the
real CIFAR-10 ResNets and EfficientNet-Lite0 (../shared/data) with ``channel_multiple`` 1
against 8, and Lite0 with its explicit TensorFlow pads against the same network with the
pads folded into the convolutions.

For each model: calibrate on the task's first images (CIFAR cats and dogs; ImageNet dogs for
Lite0), uniform channel plans at each T of --thresholds, ``velcro.trim`` with
``channel_multiple`` 1 and 8. Per row: MACs saved (``velcro.cost``, trimmed against the
original), planned sites whose producer lost every planned filter (the trim report), trim
against ``velcro.apply`` (max |a - b| / max |b| on 4 held-out images).

"Lite0, pads folded" is the same network with each ``ZeroPad2d`` removed and its convolution
given the symmetric padding ``k // 2`` (same output sizes and MACs; a one-pixel shift, so it
is calibrated on its own): what trim saves once pads cannot stand in its way.

    .venv/bin/python benchmarks/bench_narrow.py            # 3 models (+ Lite0 folded)
    .venv/bin/python benchmarks/bench_narrow.py --quick    # ResNet-20, 32 images
"""

from __future__ import annotations

import argparse
import json
import sys
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


def rows_for(label: str, model: nn.Module, calibration: torch.Tensor, heldout: torch.Tensor,
             thresholds: list[float]) -> list[dict]:
    stats = velcro.calibrate(model, calibration.split(32), progress=False)
    original = velcro.cost(model, heldout[:1]).macs
    rows = []
    for threshold in thresholds:
        plan = velcro.plan(stats, threshold, granularity="channel")
        with torch.no_grad():
            applied = velcro.apply(model, plan)(heldout)
        for multiple in (1, 8):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", VelcroWarning)
                small = velcro.trim(model, plan, channel_multiple=multiple)
            with torch.no_grad():
                diff = float((small(heldout) - applied).abs().max() / applied.abs().max())
            report = small.velcro_trim_report.values()
            planned = [e for e in report if e["planned"]]
            rows.append({
                "model": label, "T": threshold, "channel_multiple": multiple,
                "macs_saved": 1 - velcro.cost(small, heldout[:1]).macs / original,
                "planned_sites": len(planned),
                "producer_trimmed": sum(e["removed"] >= e["planned"] for e in planned),
                "trim_vs_apply": diff,
            })
            row = rows[-1]
            print(f"{label:28s} T={threshold:.1f} multiple={multiple}: MACs saved "
                  f"{row['macs_saved']:6.1%}, producers trimmed {row['producer_trimmed']}/"
                  f"{row['planned_sites']}, trim vs apply {diff:.1e}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="calibration images per task")
    parser.add_argument("--thresholds", default="0.1,0.3,0.5")
    parser.add_argument("--models", default=",".join(CASES))
    _bench.add_options(parser)
    args = parser.parse_args(argv)
    _bench.started("bench_narrow", args, "MACs trim saves on the CIFAR ResNets and Lite0, "
                   "channel_multiple 1 vs 8, Lite0 pads explicit vs folded")
    if args.quick:
        args.models, args.thresholds = "cifar_resnet20", "0.3"
        _bench.quick(args, images=32)
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
        rows += rows_for(name, model, calibration, heldout, thresholds)
        if name == "efficientnet_lite0":
            rows += rows_for("efficientnet_lite0 (pads folded)", fold_pads(model), calibration,
                             heldout, thresholds)
    out = _bench.output_dir(args, "bench_narrow") / "bench_narrow.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"rows: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

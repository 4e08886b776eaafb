"""Calibration cost against plain inference, and its memory against the image count.

Claims checked (issue 2): calibrating ResNet-18 at 224x224 on 256 images takes at most
1.15x the time of plain inference on the same images, and peak memory does not grow
between 64 and 512 images.

    .venv/bin/python benchmarks/bench_calibrate.py [--images 256] [--repeats 7]   # full, ~5 min
    .venv/bin/python benchmarks/bench_calibrate.py --quick   # 64x64, 32 images: a check only

Timing: plain inference and calibration alternate on the same generated batches (P C P ...
C P); each calibration is divided by the mean of the plain runs either side of it, and the
median of those --repeats ratios is reported; calibration time includes everything
`velcro.calibrate` does (trace, fingerprints, statistics). Memory: each image count runs in
a fresh subprocess that streams generated batches (nothing is kept), reporting its peak
resident set size.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import _bench
import torch
from tqdm.auto import tqdm

import velcro
from velcro.models import resnet18

BATCH = 32


def generated_batches(images: int, size: int = 224, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, images, BATCH):
        yield torch.randn(min(BATCH, images - start), 3, size, size, generator=gen)


def peak_memory_child(images: int, size: int) -> None:
    model = resnet18().eval()
    velcro.calibrate(model, generated_batches(images, size), progress=False)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": images, "peak_rss_mib": peak_mib}))


def time_it(images: int, repeats: int, size: int) -> tuple[list[float], list[float]]:
    """Plain inference and calibration times, run P C P C ... C P: each calibration is
    compared with the mean of the plain runs on either side of it, which cancels a linear
    drift of the machine's speed (it drifts by 10-20% within seconds here)."""
    model = resnet18().eval()
    batches = list(generated_batches(images, size))
    with torch.no_grad():
        model(batches[0])  # warm up kernels
    velcro.calibrate(model, batches[:1], progress=False)  # warm up the numba cache

    def plain_run() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                model(batch)
        return time.perf_counter() - start

    plain, calib = [plain_run()], []
    for _ in tqdm(range(repeats), desc="calibrate between plain runs", file=sys.stderr):
        start = time.perf_counter()
        velcro.calibrate(model, batches, progress=False)
        calib.append(time.perf_counter() - start)
        plain.append(plain_run())
    return plain, calib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory-images", default="64,512")
    parser.add_argument("--size", type=int, default=224, help="image side (default 224)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    _bench.add_options(parser)
    args = parser.parse_args()
    if args.child:
        peak_memory_child(args.child, args.size)
        return
    _bench.quick(args, images=32, repeats=2, memory_images="16,32", size=64)
    _bench.started("bench_calibrate", args, f"calibration time against plain inference, "
                   f"ResNet-18 at {args.size}x{args.size}, {args.images} images")
    plain, calib = time_it(args.images, args.repeats, args.size)
    around = [(a + b) / 2 for a, b in zip(plain[:-1], plain[1:], strict=True)]  # either side
    ratios = [c / p for p, c in zip(around, calib, strict=True)]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    print(f"\nResNet-18, {args.size}x{args.size}, {args.images} images, batch {BATCH}, "
          f"{args.repeats} calibrations, each between two plain inference runs\n")
    print("| run | plain inference, mean of the runs either side (s) | calibrate (s) | ratio |")
    print("|---|---|---|---|")
    for i, (p, c) in enumerate(zip(around, calib, strict=True)):
        print(f"| {i + 1} | {p:.2f} | {c:.2f} | {c / p:.3f} |")
    print(f"| **median** | {statistics.median(around):.2f} | {statistics.median(calib):.2f} | "
          f"**{statistics.median(ratios):.3f}** |")
    print("\n| images | peak RSS (MiB) |")
    print("|---|---|")
    for count in (int(n) for n in args.memory_images.split(",")):
        out = subprocess.run([sys.executable, __file__, "--child", str(count),
                              "--size", str(args.size)],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {result['images']} | {result['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()

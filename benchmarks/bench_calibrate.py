"""Calibration cost against plain inference, and its memory against the image count.

Claims checked (issue 2): calibrating ResNet-18 at 224x224 on 256 images takes at most
1.15x the time of plain inference on the same images, and peak memory does not grow
between 64 and 512 images.

    .venv/bin/python benchmarks/bench_calibrate.py [--images 256] [--repeats 7]   # full, ~5 min
    .venv/bin/python benchmarks/bench_calibrate.py --quick   # 64x64, 32 images: a check only
    .venv/bin/python benchmarks/bench_calibrate.py --covariance   # + channel co-moments

``--covariance`` times ``velcro.calibrate(..., covariance=True)`` (issue 13: the channel
co-moments of the affine constants, a ``channels^2 x positions`` product per image and site)
and reports their memory (8 bytes x channels^2 per site); ``--model``/``--size`` pick
another built-in model and input size (e.g. ``--model cifar_resnet20 --size 32``).

Timing: plain inference and calibration alternate on the same generated batches (P C P ...
C P); each calibration is divided by the mean of the plain runs either side of it, and the
median of those --repeats ratios is reported; calibration time includes everything
`velcro.calibrate` does (trace, fingerprints, statistics). On a shared, loaded machine,
``--threads 1 --clock cpu`` times the process's CPU time on one thread (torch and numba)
instead of wall time: waiting for a core is not counted (with more threads, CPU time would
count idle spinning). Memory: each image count runs in a fresh subprocess that streams
generated batches (nothing is kept), reporting its peak resident set size.
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
from velcro._moments import fused_available

BATCH = 32
MODEL = {"name": "resnet18", "size": 224, "covariance": False}
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
TIMER = [time.perf_counter]


def make_model() -> torch.nn.Module:
    return velcro.models.create(MODEL["name"]).eval()


def generated_batches(images: int, size: int | None = None, seed: int = 0):
    size = size or MODEL["size"]
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, images, BATCH):
        yield torch.randn(min(BATCH, images - start), 3, size, size, generator=gen)


def peak_memory_child(images: int, size: int) -> None:
    model = make_model()
    velcro.calibrate(model, generated_batches(images, size), progress=False,
                     covariance=MODEL["covariance"])
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": images, "peak_rss_mib": peak_mib}))


def time_it(images: int, repeats: int, size: int) -> tuple[list[float], list[float]]:
    """Plain inference and calibration times, run P C P C ... C P: each calibration is
    compared with the mean of the plain runs on either side of it, which cancels a linear
    drift of the machine's speed (it drifts by 10-20% within seconds here)."""
    model = make_model()
    batches = list(generated_batches(images, size))
    covariance = MODEL["covariance"]
    with torch.no_grad():
        model(batches[0])  # warm up kernels
    velcro.calibrate(model, batches[:1], progress=False, covariance=covariance)  # numba cache

    clock = TIMER[0]

    def plain_run() -> float:
        start = clock()
        with torch.no_grad():
            for batch in batches:
                model(batch)
        return clock() - start

    plain, calib = [plain_run()], []
    for _ in tqdm(range(repeats), desc="calibrate between plain runs", file=sys.stderr):
        start = clock()
        velcro.calibrate(model, batches, progress=False, covariance=covariance)
        calib.append(clock() - start)
        plain.append(plain_run())
    return plain, calib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory-images", default="64,512")
    parser.add_argument("--covariance", action="store_true",
                        help="calibrate with covariance=True (the channel co-moments)")
    parser.add_argument("--model", default="resnet18", help="a built-in model name")
    parser.add_argument("--size", type=int, default=224, help="image side (default 224)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice)")
    parser.add_argument("--clock", choices=sorted(CLOCK), default="wall",
                        help="wall time (default) or the process's CPU time (use with "
                             "--threads 1 on a loaded machine)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    _bench.add_options(parser)
    args = parser.parse_args()
    MODEL.update(name=args.model, size=args.size, covariance=args.covariance)
    if args.threads:
        torch.set_num_threads(args.threads)
        if fused_available():  # the Welford kernel's threads (numba)
            import numba
            numba.set_num_threads(args.threads)
    TIMER[0] = CLOCK[args.clock]
    if args.child:
        peak_memory_child(args.child, args.size)
        return
    _bench.quick(args, images=32, repeats=2, memory_images="16,32", size=64)
    _bench.started("bench_calibrate", args, f"calibration time against plain inference, "
                   f"{args.model} at {args.size}x{args.size}, {args.images} images")
    plain, calib = time_it(args.images, args.repeats, args.size)
    around = [(a + b) / 2 for a, b in zip(plain[:-1], plain[1:], strict=True)]  # either side
    ratios = [c / p for p, c in zip(around, calib, strict=True)]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, {args.clock} time")
    print(f"\n{args.model}, {args.size}x{args.size}, {args.images} images, batch {BATCH}, "
          f"{args.repeats} calibrations{' with covariance' if args.covariance else ''}, "
          "each between two plain inference runs\n")
    if args.covariance:
        stats = velcro.calibrate(make_model(), generated_batches(2, args.size), progress=False,
                                 covariance=True)
        comoments = sum(s.channels ** 2 * 8 for s in stats.sites.values())
        moments = sum(s.mean.numel() * 16 for s in stats.sites.values())
        print(f"channel co-moments: {comoments / 2**20:.1f} MiB over {len(stats)} sites "
              f"(means and M2: {moments / 2**20:.1f} MiB)\n")
    print("| run | plain inference, mean of the runs either side (s) | calibrate (s) | ratio |")
    print("|---|---|---|---|")
    for i, (p, c) in enumerate(zip(around, calib, strict=True)):
        print(f"| {i + 1} | {p:.2f} | {c:.2f} | {c / p:.3f} |")
    print(f"| **median** | {statistics.median(around):.2f} | {statistics.median(calib):.2f} | "
          f"**{statistics.median(ratios):.3f}** |")
    print("\n| images | peak RSS (MiB) |")
    print("|---|---|")
    for count in (int(n) for n in args.memory_images.split(",")):
        child = [sys.executable, __file__, "--child", str(count), "--model", args.model,
                 "--size", str(args.size)] + (["--covariance"] if args.covariance else [])
        out = subprocess.run(child, capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {result['images']} | {result['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()

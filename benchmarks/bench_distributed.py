"""Calibration and evaluation wall time with 1 and 2 processes (torchrun, gloo, CPU).

    .venv/bin/python benchmarks/bench_distributed.py [--size 112] [--calibration-images 256]
        [--evaluation-images 512] [--repeats 2] [--layouts 1x2,2x1]     # full run
    .venv/bin/python benchmarks/bench_distributed.py --quick   # 32x32, 32/64 images: a check

Each row launches ``torchrun --standalone --nproc-per-node P`` on this script with T threads
per process (OMP_NUM_THREADS): the default layouts give the two cores of this machine to one
process, then one core to each of two (add 1x1 to see one core alone). Each process builds
the same ResNet-18 (random weights, seeded) and the same generated images (a map-style
DataLoader, batch 32, so each rank loads only its own batches), warms up, and then times
``velcro.calibrate`` and ``velcro.evaluate`` between barriers: sharding, the model work, and
the merge of statistics or per-image hits. Median of --repeats. The last columns check the
result against the first row's: the largest difference of the statistics (relative to each
site's largest value) and whether the evaluation's per-image hits agree. Threads alone can
move float32 results in the last bits, so compare rows with equal threads per process for a
bit-level check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _bench
import torch
from torch.utils.data import DataLoader, TensorDataset

BATCH = 32


def dataset(images: int, size: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(images, 3, size, size, generator=gen)
    return TensorDataset(x, torch.randint(0, 1000, (images,), generator=gen))


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    import velcro
    from velcro import distributed
    from velcro.models import resnet18

    torch.manual_seed(0)
    model = resnet18().eval()
    calibration = DataLoader(dataset(args.calibration_images, args.size, 1), batch_size=BATCH)
    evaluation = DataLoader(dataset(args.evaluation_images, args.size, 2), batch_size=BATCH)
    warm = DataLoader(dataset(2 * BATCH, args.size, 3), batch_size=BATCH)
    velcro.calibrate(model, warm, progress=False)  # kernels, the numba cache, the group
    velcro.evaluate(model, warm, progress=False)
    group = distributed.process_group()

    def timed(call) -> float:
        if group is not None:
            dist.barrier(group)
        start = time.perf_counter()
        call()
        if group is not None:
            dist.barrier(group)
        return time.perf_counter() - start

    results: dict = {"calibrate_s": [], "evaluate_s": []}
    for _ in range(args.repeats):
        results["calibrate_s"].append(timed(lambda: results.update(
            stats=velcro.calibrate(model, calibration, progress=False))))
        results["evaluate_s"].append(timed(lambda: results.update(
            report=velcro.evaluate(model, evaluation, progress=False))))
    if distributed.is_main():
        out = Path(args.worker)
        results["stats"].save(out / "stats.safetensors")
        torch.save(results["report"].hits, out / "hits.pt")
        (out / "times.json").write_text(json.dumps(
            {k: results[k] for k in ("calibrate_s", "evaluate_s")}))


def launch(processes: int, threads: int, args: argparse.Namespace, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(processes), __file__, "--worker", str(out),
               "--size", str(args.size), "--repeats", str(args.repeats),
               "--calibration-images", str(args.calibration_images),
               "--evaluation-images", str(args.evaluation_images)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        sys.exit(f"{processes} process(es) failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    times = json.loads((out / "times.json").read_text())
    return {"threads": threads, **{k: statistics.median(v) for k, v in times.items()}}


def largest_difference(stats, reference) -> float:
    worst = 0.0
    for name in reference.names:
        for a, b in ((stats[name].mean, reference[name].mean),
                     (stats[name].m2, reference[name].m2)):
            scale = float(b.abs().max()) or 1.0
            worst = max(worst, float((a - b).abs().max()) / scale)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--evaluation-images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layouts", default="1x2,2x1",
                        help="processes x threads per process, comma separated")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    _bench.add_options(parser)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    _bench.quick(args, size=32, calibration_images=32, evaluation_images=64, repeats=1)
    _bench.started("bench_distributed", args, f"calibrate and evaluate under torchrun, layouts "
                   f"{args.layouts} (processes x threads)")

    import velcro

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layouts.split(","):
            processes, threads = (int(n) for n in layout.lower().split("x"))
            out = Path(tmp) / layout
            out.mkdir()
            _bench.say(f"  torchrun: {processes} process{'es' * (processes != 1)} x {threads} "
                       f"thread{'s' * (threads != 1)} ...")
            row = launch(processes, threads, args, out)
            row["processes"] = processes
            row["stats"] = velcro.Stats.load(out / "stats.safetensors")
            row["hits"] = torch.load(out / "hits.pt", weights_only=True)
            rows.append(row)
    first = rows[0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          "gloo on loopback")
    print(f"\nResNet-18 (random weights), {args.size}x{args.size}, batch {BATCH}; calibration "
          f"on {args.calibration_images} images, evaluation on {args.evaluation_images}; "
          f"median of {args.repeats}\n")
    print("| processes x threads | calibrate (s) | speed-up | evaluate (s) | speed-up | "
          "stats vs first row (max rel. diff) | same hits |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['processes']} x {row['threads']} | {row['calibrate_s']:.2f} | "
              f"{first['calibrate_s'] / row['calibrate_s']:.2f}x | {row['evaluate_s']:.2f} | "
              f"{first['evaluate_s'] / row['evaluate_s']:.2f}x | "
              f"{largest_difference(row['stats'], first['stats']):.1e} | "
              f"{'yes' if torch.equal(row['hits'], first['hits']) else 'NO'} |")


if __name__ == "__main__":
    main()

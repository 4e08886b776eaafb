"""The papers' hardware experiment in software: a conv+ReLU that skips compressed outputs.

Claim checked (issue 7): the skipping kernel (velcro.hardware.kernels.SkippingConv) on the papers'
module (64x64 input maps, 3x3 filter; here 64 -> 64 channels, same padding) runs at
C = 0.5 at least 1.6x its own C = 0 throughput (1/(1-C) = 2 is the limit), and the hardware
model (velcro.hardware) predicts throughput 1/(1-C) and energy linear in C.

    .venv/bin/python benchmarks/bench_hardware.py [--channels 64] [--batch 8] [--repeats 15]
    .venv/bin/python benchmarks/bench_hardware.py --plan PLAN.json --model NAME \\
        --weights FILE [--num-classes 10] [--input-size 32]
    .venv/bin/python benchmarks/bench_hardware.py --random-plan 0.3   # resnet18, random weights
    .venv/bin/python benchmarks/bench_hardware.py --quick   # 16 channels, 3 rounds: a check

Module part: for C = 0, 0.1, ..., 0.9, a random element mask of exactly C of the outputs;
in each of --repeats rounds every C is timed right after a run at C = 0 ("C = 0" is the same
kernel computing every output), and the speed-up is the median of those paired ratios (this
machine's speed drifts by 10-20% within seconds, so only runs close in time compare); the
dense torch conv2d + ReLU (+ torch.where for the constants, i.e. what velcro.apply runs) is
timed beside it (--clock cpu: CPU seconds instead of wall seconds). Every output is checked
against the dense result. Plan part: every conv site of the plan runs on the kernel with the
inputs it sees inside velcro.apply(model, plan), timed against the same kernel with nothing
compressed and against the dense layer; the hardware model prices the same layers. Writes
Markdown tables to stdout and a PNG plot (Agg; runs/bench/bench_hardware/ by default, --plot
FILE, or benchmarks/bench_hardware.png with --update-results).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import _bench
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numba  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import velcro  # noqa: E402
from velcro import hardware  # noqa: E402
from velcro.hardware.kernels import SkippingConv, activation_function, conv_sites, layer_io  # noqa: E402

FRACTIONS = [round(0.1 * i, 1) for i in range(10)]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def best_times(functions: dict, repeats: int) -> dict:
    """Best time (``--clock``) of each function over ``repeats`` interleaved rounds."""
    for function in functions.values():
        function()  # warm up (numba compiles on first use, oneDNN picks kernels)
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(repeats):
        for name, function in functions.items():
            start = clock()
            function()
            best[name] = min(best[name], clock() - start)
    return best


def paired_speedups(pairs: dict, repeats: int) -> tuple[dict, dict, dict]:
    """Speed-up of each ``(base, function)`` pair: the median over ``repeats`` rounds of
    time(base) / time(function), each function timed right after a run of its base; and
    the median times of each function and of its base runs.

    Pairs, because this machine's speed drifts by 10-20% within seconds: only runs close in
    time compare, and a ratio of best times taken seconds apart carries that drift.
    """
    for base, function in pairs.values():
        base()
        function()  # warm up (numba compiles on first use)
    ratios = {name: [] for name in pairs}
    times = {name: [] for name in pairs}
    base_times = {name: [] for name in pairs}
    for _ in range(repeats):
        for name, (base, function) in pairs.items():
            start = clock()
            base()
            middle = clock()
            function()
            end = clock()
            ratios[name].append((middle - start) / (end - middle))
            times[name].append(end - middle)
            base_times[name].append(middle - start)
    return tuple({name: statistics.median(v) for name, v in values.items()}
                 for values in (ratios, times, base_times))


def dense_layer(kernel: SkippingConv, act):
    """What a dense framework runs for the layer: folded conv, activation, then the constants."""
    conv = kernel.conv
    weight, bias = kernel.weight.float(), kernel.bias.float()
    constant = kernel.constant.view(kernel.out_shape)

    def run(x, residual=None):
        with torch.no_grad():
            y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            if residual is not None:
                y = y + residual
            return torch.where(kernel.mask, constant, act(y))

    return run


def random_mask(shape, fraction, gen):
    numel = torch.Size(shape).numel()
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=gen)[: round(fraction * numel)]] = True
    return mask.view(shape)


def module_experiment(args) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    channels, size = args.channels, 64
    conv = nn.Conv2d(channels, channels, 3, padding=1).eval()
    x = torch.randn(args.batch, channels, size, size, generator=gen).relu()
    shape = (channels, size, size)
    layer = {"module": hardware.conv_layer("module", channels, channels, size, 3)}
    paper = {"module": hardware.conv_layer("module", 1, 1, size, 3)}  # one 2-D map per module
    runs, masks = {}, {}
    for fraction in FRACTIONS:
        masks[fraction] = random_mask(shape, fraction, gen)
        kernel = SkippingConv(conv, masks[fraction], torch.randn(shape, generator=gen))
        runs[("skip", fraction)] = kernel
        runs[("dense", fraction)] = dense_layer(kernel, F.relu)
    for fraction in FRACTIONS:  # correctness first: the kernel equals the dense layer
        error = (runs[("skip", fraction)](x) - runs[("dense", fraction)](x)).abs().max()
        if error > 1e-4:
            sys.exit(f"kernel differs from the dense layer by {error:.2e} at C={fraction}")
    speedups, times, _ = paired_speedups(
        {fraction: (lambda k=runs[("skip", 0.0)]: k(x), lambda k=runs[("skip", fraction)]: k(x))
         for fraction in FRACTIONS}, args.repeats)
    dense = best_times({f: (lambda d=runs[("dense", f)]: d(x)) for f in FRACTIONS},
                       args.repeats)
    base_model = hardware.estimate(layer, {"module": masks[0.0]})
    base_paper = hardware.estimate(paper, {"module": masks[0.0][:1]})
    rows = []
    for fraction in FRACTIONS:
        mask = masks[fraction]
        c = mask.float().mean().item()
        model = hardware.estimate(layer, {"module": mask}).relative_to(base_model)
        paper_model = hardware.estimate(paper, {"module": mask[:1]}).relative_to(base_paper)
        rows.append({
            "C": c, "law": 1 / (1 - c),
            "skip_ips": args.batch / times[fraction],
            "speedup": speedups[fraction],
            "dense_ips": args.batch / dense[fraction],
            "model_speedup": model["throughput"], "model_energy": model["energy"],
            "paper_speedup": paper_model["throughput"], "paper_energy": paper_model["energy"],
        })
    return rows


def module_table(rows, args) -> str:
    lines = [
        f"Module: {args.channels}->{args.channels} channels, 64x64, 3x3, same padding, batch "
        f"{args.batch}; kernel: median of {args.repeats} rounds, each C timed right after "
        "C = 0 (speed-up: median of those paired ratios; the img/s columns are each C's own "
        "median and carry the machine's drift between rounds, so read the speed-up); dense: "
        f"best of {args.repeats}; model: 16 modules, 9 MACs/cycle, 300 MHz.",
        "",
        "| C | 1/(1-C) | kernel img/s | measured speed-up | model speed-up | model energy "
        "| paper module (1 map) speed-up / energy | dense torch img/s | kernel / dense |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['C']:.2f} | {r['law']:.2f} | {r['skip_ips']:.1f} | {r['speedup']:.2f} | "
            f"{r['model_speedup']:.2f} | {r['model_energy']:.3f} | "
            f"{r['paper_speedup']:.2f} / {r['paper_energy']:.3f} | {r['dense_ips']:.1f} | "
            f"{r['skip_ips'] / r['dense_ips']:.2f} |")
    return "\n".join(lines)


def load_plan_model(args):
    if args.random_plan is not None:
        model = velcro.models.resnet18(num_classes=10).eval()
        gen = torch.Generator().manual_seed(1)
        shape = (3, args.input_size, args.input_size)
        batches = [torch.randn(8, *shape, generator=gen) for _ in range(4)]
        stats = velcro.calibrate(model, batches, progress=False)
        return model, velcro.plan(stats, args.random_plan), "resnet18 (random weights)"
    from velcro.cli._common import load_model

    namespace = argparse.Namespace(model=args.model, weights=args.weights,
                                   num_classes=args.num_classes, device="cpu")
    model = load_model(namespace, torch.device("cpu"))
    plan = velcro.Plan.load(args.plan)
    if plan.granularity != "element":
        print(f"note: {args.plan} is a {plan.granularity} plan; the kernel runs it element by "
              "element", file=sys.stderr)
    return model, plan, args.model


def plan_experiment(args) -> tuple[list[dict], str]:
    model, plan, label = load_plan_model(args)
    shape = (3, args.input_size, args.input_size)
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(args.batch, *shape, generator=gen)
    kernels = conv_sites(model, plan)
    if not kernels:
        sys.exit("the plan has no conv sites the kernel can run")
    recorded = layer_io(model, plan, images, kernels)
    functions, dense_runs, checked = {}, {}, []
    for name, site in kernels.items():
        io = recorded[name]
        skip = site.kernel
        full = skip.with_mask(torch.zeros_like(skip.mask))  # the same kernel, C = 0
        dense = dense_layer(skip, activation_function(skip.activation))
        error = (skip(io.input, io.residual) - io.output).abs().max().item()
        checked.append(error)
        functions[name] = (lambda k=full, io=io: k(io.input, io.residual),
                           lambda k=skip, io=io: k(io.input, io.residual))
        dense_runs[name] = lambda d=dense, io=io: d(io.input, io.residual)
    speedups, skip_times, full_times = paired_speedups(functions, args.repeats)
    dense_times = best_times(dense_runs, args.repeats)
    layers = hardware.layer_shapes(model, shape)
    modelled = {c.name: c for c in hardware.estimate(layers, plan).layers}
    baseline = {c.name: c for c in hardware.estimate(layers).layers}
    rows = []
    for name, site in kernels.items():
        c = site.kernel.saving_ratio
        rows.append({
            "site": name, "C": c, "law": 1 / (1 - c) if c < 1 else float("inf"),
            "speedup": speedups[name],
            "skip_ms": skip_times[name] * 1e3, "dense_ms": dense_times[name] * 1e3,
            "full_ms": full_times[name] * 1e3,
            "model_speedup": baseline[name].cycles / modelled[name].cycles
            if modelled[name].cycles else float("inf"),
            "model_energy": modelled[name].energy_pj / baseline[name].energy_pj,
        })
    total = {key: sum(r[key] for r in rows) for key in ("skip_ms", "dense_ms", "full_ms")}
    whole = hardware.estimate(layers, plan).relative_to(hardware.estimate(layers))
    lines = [
        f"Plan: {label}, {plan.granularity} plan, C = {plan.saving_ratio:.3f} over all sites; "
        f"input {shape}, batch {args.batch}; {len(kernels)} conv sites on the kernel (max "
        f"error vs apply {max(checked):.1e}); kernel: median of {args.repeats} rounds, each "
        "right after the same kernel at C = 0 (speed-up: median of the paired ratios); dense: "
        f"best of {args.repeats}.",
        "",
        "| site | C | 1/(1-C) | kernel ms | same kernel, C=0, ms | measured speed-up "
        "| model speed-up | model energy | dense torch ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['site']} | {r['C']:.3f} | {r['law']:.2f} | {r['skip_ms']:.2f} | "
                     f"{r['full_ms']:.2f} | {r['speedup']:.2f} | {r['model_speedup']:.2f} | "
                     f"{r['model_energy']:.3f} | {r['dense_ms']:.2f} |")
    lines.append(f"| all conv sites | | | {total['skip_ms']:.2f} | {total['full_ms']:.2f} | "
                 f"{total['full_ms'] / total['skip_ms']:.2f} | {whole['throughput']:.2f} | "
                 f"{whole['energy']:.3f} | {total['dense_ms']:.2f} |")
    return rows, "\n".join(lines)


def plot(module_rows, plan_rows, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    law = [r["law"] for r in module_rows]
    left.plot(law, law, "k--", label="1/(1-C) (the law)")
    left.plot(law, [r["model_speedup"] for r in module_rows], "s-", label="hardware model")
    left.plot(law, [r["speedup"] for r in module_rows], "o-", label="kernel, measured")
    left.plot(law, [r["skip_ips"] / module_rows[0]["dense_ips"] for r in module_rows], "^:",
              label="kernel vs dense torch at C=0")
    if plan_rows:
        finite = [r for r in plan_rows if r["C"] < 1]
        left.scatter([r["law"] for r in finite], [r["speedup"] for r in finite], marker="x",
                     color="C4", label="plan's conv sites, measured", zorder=3)
    left.set_xlabel("1 / (1 - C)")
    left.set_ylabel("throughput / throughput at C = 0")
    left.set_title("Throughput")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    c = [r["C"] for r in module_rows]
    right.plot(c, [1 - x for x in c], "k--", label="1 - C")
    right.plot(c, [r["model_energy"] for r in module_rows], "s-", label="model, 64->64 layer")
    right.plot(c, [r["paper_energy"] for r in module_rows], "d-", label="model, paper module")
    if plan_rows:
        right.scatter([r["C"] for r in plan_rows], [r["model_energy"] for r in plan_rows],
                      marker="x", color="C4", label="plan's conv sites (model)", zorder=3)
    right.set_xlabel("C (compressed output fraction)")
    right.set_ylabel("energy / energy at C = 0")
    right.set_title("Energy (hardware model)")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, help="torch and numba threads (default: all)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or process CPU time (steadier on a loaded machine; "
                        "with one thread it is the time the work needs)")
    parser.add_argument("--plan", help="a velcro plan file (JSON) to run layer by layer")
    parser.add_argument("--model", help="the plan's model: registry name, MODULE:FACTORY, ...")
    parser.add_argument("--weights", help="the model's weights file")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--input-size", type=int, default=32, help="input side for the plan")
    parser.add_argument("--random-plan", type=float, default=None, metavar="T",
                        help="instead of --plan: resnet18 with random weights, threshold T")
    parser.add_argument("--plot", default=None,
                        help="the PNG to write (default: bench_hardware.png in the output "
                             "folder, see --out and --update-results)")
    _bench.add_options(parser)
    args = parser.parse_args(argv)
    _bench.quick(args, channels=16, batch=1, repeats=3)
    _bench.started("bench_hardware", args, f"skipping conv kernel, {args.channels} -> "
                   f"{args.channels} channels, 64x64 maps, batch {args.batch}")
    if args.plot is None:
        args.plot = str(_bench.output_dir(args, "bench_hardware") / "bench_hardware.png")
    if args.plan and not args.model:
        parser.error("--plan needs --model (and usually --weights)")
    global clock
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"{numba.get_num_threads()} numba threads, torch {torch.__version__}, "
          f"{args.clock} clock\n")
    module_rows = module_experiment(args)
    print(module_table(module_rows, args))
    half = next(r for r in module_rows if abs(r["C"] - 0.5) < 1e-9)
    print(f"\nC = 0.5: measured {half['speedup']:.2f}x its own C = 0 (claim: >= 1.6x, limit 2)")
    plan_rows = []
    if args.plan or args.random_plan is not None:
        plan_rows, table = plan_experiment(args)
        print("\n" + table)
    plot(module_rows, plan_rows, Path(args.plot))
    print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

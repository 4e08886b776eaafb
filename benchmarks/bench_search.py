"""Evaluations and wall time of the threshold search against an exhaustive uniform grid.

On the digits model of the demo (the built-in ResNet-18 trained on scikit-learn's digits,
cached by ``velcro demo``), for one task: the task's training images are split 20%
calibration / 80% search, its test images are the validation set. For each granularity:

- the exhaustive grid over uniform thresholds (every site the same T, 0..1 in steps of
  --grid-step), each evaluated on the search split with velcro.plan + apply + evaluate;
- ``velcro.search`` with its default schedule, with the activation cache off
  (``cache_mb=0``), without the per-site profile, and with the demo's shorter schedule.

Each row: evaluations, wall time, the C found at no accuracy loss on the search split, and
top-1 on the validation images (which neither method saw). Prints a Markdown table.

    python benchmarks/bench_search.py --task 3,8          # full run
    python benchmarks/bench_search.py --quick             # tiny model, coarse grid: a check
    python benchmarks/bench_search.py --model mypkg.models:factory --weights w.safetensors \\
        --data-module mypkg.data:loaders   # any model: loaders() -> (calib, search, val)
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import _bench
import torch
from tqdm.auto import tqdm

import velcro
from velcro.search import SearchSchedule, search


def digits_task(task: str, seed: int, quick: bool = False):
    """The demo's model and its calibration, search and validation loaders (``quick``: a
    model trained on 512 images for one epoch)."""
    from velcro.data import digits
    from velcro.demo import _parts as parts
    from velcro.demo._digits_model import Recipe, trained_model

    recipe = Recipe(epochs=1, train_images=512) if quick else Recipe()
    split = digits.load(seed=seed, size=recipe.size, test_fraction=recipe.test_fraction)
    model = trained_model(split, seed=seed, recipe=recipe, progress=True).model.eval()
    chosen = digits.parse_task(task)
    task_train = digits.select(split.train, chosen)
    search_index, calibration_index = digits.split_stratified(task_train.tensors[1], 0.2, seed)
    return (model, parts.loader(parts.subset(task_train, calibration_index)),
            parts.loader(parts.subset(task_train, search_index)),
            parts.loader(digits.select(split.test, chosen)), f"digits {task}")


def user_task(model_spec: str, weights: str | None, data_spec: str):
    def load(spec):
        module, _, name = spec.rpartition(":")
        return getattr(importlib.import_module(module), name)

    model = load(model_spec)()
    if weights:
        velcro.models.load_weights(model, weights)
    calibration, search_data, validation = load(data_spec)()
    return model.eval(), calibration, search_data, validation, model_spec


def uniform_grid(model, stats, search_data, validation, granularity, step):
    """Every uniform threshold on the grid; the largest C at no loss on the search split."""
    began = time.perf_counter()
    baseline = velcro.evaluate(model, search_data, progress=False).correct
    levels = [round(i * step, 6) for i in range(int(round(1 / step)) + 1)]
    best = velcro.plan(stats, 0.0, granularity=granularity)
    best_correct = baseline
    for level in levels[1:]:
        plan = velcro.plan(stats, level, granularity=granularity)
        correct = velcro.evaluate(velcro.apply(model, plan), search_data, progress=False).correct
        if correct >= baseline and plan.saving_ratio > best.saving_ratio:
            best, best_correct = plan, correct
    seconds = time.perf_counter() - began
    images = sum(len(labels) for _, labels in search_data)
    validation_accuracy = velcro.evaluate(velcro.apply(model, best), validation,
                                          progress=False).accuracy
    return {"evaluations": len(levels), "seconds": seconds, "saving_ratio": best.saving_ratio,
            "search_accuracy": best_correct / images, "validation": validation_accuracy}


def searched(model, stats, search_data, validation, granularity, **kwargs):
    result = search(model, stats, search_data, granularity=granularity, progress=False,
                    **kwargs)
    validation_accuracy = velcro.evaluate(velcro.apply(model, result.plan), validation,
                                          progress=False).accuracy
    return {"evaluations": result.evaluations, "seconds": result.wall_time_s,
            "saving_ratio": result.saving_ratio, "search_accuracy": result.search_accuracy,
            "validation": validation_accuracy,
            "graph_share": result.settings["graph_share_run"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="3,8", help="digits of the task (default 3,8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="MODULE:FACTORY of another model (with --data-module)")
    parser.add_argument("--weights", help="its weights")
    parser.add_argument("--data-module", help="MODULE:FUNCTION -> (calib, search, val) loaders")
    parser.add_argument("--grid-step", type=float, default=0.05)
    parser.add_argument("--granularity", default="element,channel")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (set again after calibration, whose numba kernel "
                             "may change the OpenMP thread count)")
    _bench.add_options(parser)
    args = parser.parse_args()
    _bench.quick(args, grid_step=0.25)
    _bench.started("bench_search", args, "search evaluations and time against a uniform grid, "
                   f"granularity {args.granularity}")
    torch.set_num_threads(args.threads)
    if args.model:
        model, calibration, search_data, validation, label = user_task(
            args.model, args.weights, args.data_module)
    else:
        model, calibration, search_data, validation, label = digits_task(args.task, args.seed,
                                                                         args.quick)
    stats = velcro.calibrate(model, calibration, progress=False)
    torch.set_num_threads(args.threads)
    images = sum(len(labels) for _, labels in search_data)
    sites = len(stats.names)

    methods = {
        f"uniform grid, step {args.grid_step:g}": lambda g: uniform_grid(
            model, stats, search_data, validation, g, args.grid_step),
        "search (default schedule)": lambda g: searched(model, stats, search_data, validation,
                                                        g),
        "search, activation cache off": lambda g: searched(model, stats, search_data,
                                                           validation, g, cache_mb=0),
        "search, no profile": lambda g: searched(model, stats, search_data, validation, g,
                                                 schedule=SearchSchedule(profile=False)),
        "search, demo schedule (4 levels, 1 round)": lambda g: searched(
            model, stats, search_data, validation, g,
            schedule=SearchSchedule(levels=4, refine_rounds=1)),
    }
    if args.quick:  # the grid and the demo's schedule only
        methods = dict(list(methods.items())[::4])
    rows = []
    granularities = args.granularity.split(",")
    with tqdm(total=len(granularities) * len(methods), unit="run", desc="bench_search",
              file=sys.stderr) as bar:
        for granularity in granularities:
            for method, run in methods.items():
                bar.set_postfix(granularity=granularity, method=method[:24])
                rows.append((granularity, method, run(granularity)))
                bar.update(1)

    print(f"\n{label}: {type(model).__name__}, {sites} sites, {images} search images, "
          f"{torch.get_num_threads()} torch threads, tolerance 0 (no loss on the search split)\n")
    print("| granularity | method | evaluations | wall time (s) | share of graph run | C found "
          "| search top-1 | validation top-1 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for granularity, method, row in rows:
        share = f"{100 * row['graph_share']:.0f}%" if "graph_share" in row else "100%"
        print(f"| {granularity} | {method} | {row['evaluations']} | {row['seconds']:.1f} | "
              f"{share} | {100 * row['saving_ratio']:.2f}% | {100 * row['search_accuracy']:.2f}% "
              f"| {100 * row['validation']:.2f}% |")


if __name__ == "__main__":
    main()

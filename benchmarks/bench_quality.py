"""Is value locality a better pruning criterion than what a user would pick instead?

On the demo's digits model (the built-in ResNet-18 trained on scikit-learn's digits at 32x32,
cached by ``velcro demo``; one model per training seed), for several tasks and seeds, the
maximum MACs saved at no top-1 loss on held-out task images, without any fine-tuning, by:

- ``velcro``: channel plans, lowest mean variance first, channels replaced by their mean maps
  (S-VELCRO), searched by ``velcro.search`` (objective: MACs), then trimmed;
- ``velcro-scalar``: the same channels ranked the same way, replaced by one scalar per channel;
- ``velcro-element``: element plans (VELCRO); C only, as their MACs are saved only by
  hardware that skips single outputs (shown: the producers' MACs of the replaced elements);
- ``zeros``: ablation, velcro's channel choice replaced by zeros instead of means;
- ``l1``: L1-norm filter pruning (smallest filters first), channels replaced by mean maps;
- ``random``: random filters, replaced by mean maps;
- ``torch-pruning``: Torch-Pruning's ``MagnitudePruner`` with ``MagnitudeImportance`` (L2 group
  norm, residual couplings pruned together, one ratio for every layer: its usual use), no
  fine-tuning; ``torch-pruning-global``: the same with its global ranking across layers
  (``global_pruning=True``), which lets the ratio differ from layer to layer.

Every method with per-layer thresholds is searched by the same ``velcro.search`` call (same
schedule, budget, tolerance 0, objective MACs) through its score and constant hooks; the
Torch-Pruning ratio, which is a single number, is searched on the same uniform levels as the
search's uniform check, with the same patience, then bisected, within the same budget.
MACs and parameters are counted by ``velcro.cost`` on the trimmed or pruned model, whose
held-out top-1 is measured directly (the trimmed model, not the masked one).

Protocol (``--protocol``): ``heldout`` (default) searches on the task's test images, which the
model never trained on, so the figure is literally "the most MACs saved with no loss on
held-out images"; it is the papers' protocol (thresholds chosen on the validation images) and
asks every method the same question. ``split`` searches on the task's training images (as the
demo does) and reports the held-out change beside it. Calibration always uses 20% of the
task's training images.

    .venv/bin/python benchmarks/bench_quality.py                       # 3 tasks x 3 seeds
    .venv/bin/python benchmarks/bench_quality.py --tasks 3,8 --seeds 0 --methods velcro,l1
    .venv/bin/python benchmarks/bench_quality.py --quick   # a tiny model, one task: a check

Search settings (``--settings``): ``today`` is the search before issue 14 (top-1 point
estimate on every search image, tolerance 0, no check), ``defaults`` is ``velcro.search``'s
current defaults (criterion, paired confidence bound and nested check); with both, every
velcro method runs under each on the same splits, and the issue-14 comparison is printed
(held-out change within -0.5 points or a 95% interval that includes 0, and C kept).

Prints Markdown tables; writes a PNG plot and the raw rows as JSON into runs/bench/bench_quality/
(``--out DIR``; ``--update-results``: benchmarks/bench_quality[_split].png and .json, the
tracked copies; ``--plot``/``--json`` name the files).
Torch-Pruning is a benchmark-only dependency: ``pip install "torch==2.13.0" torch-pruning``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import _bench
import torch
from tqdm.auto import tqdm

import velcro
from velcro.cost import cost
from velcro.data import digits
from velcro.demo import _parts as parts
from velcro.demo._digits_model import Recipe, trained_model
from velcro.report import measure_costs
from velcro.search import (
    DEFAULTS,
    UNGUARDED,
    SearchSchedule,
    filter_norm_score,
    random_score,
    search,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _protocol import holds, magnitude_pruned  # noqa: E402

METHODS = {
    "velcro": "velcro channels, mean maps (S-VELCRO)",
    "velcro-scalar": "velcro channels, scalar constants",
    "velcro-element": "velcro elements (VELCRO), C only",
    "zeros": "ablation: velcro channels, zeros",
    "l1": "L1-norm filters, mean maps",
    "random": "random filters, mean maps",
    "torch-pruning": "Torch-Pruning magnitude, no fine-tuning",
    "torch-pruning-global": "Torch-Pruning magnitude, global ranking, no fine-tuning",
}
BASELINES = ("l1", "random", "torch-pruning", "torch-pruning-global")
SCHEDULES = {"demo": SearchSchedule(levels=4, refine_rounds=1), "full": SearchSchedule()}
SETTINGS = {"today": UNGUARDED, "defaults": DEFAULTS}


# --quick: a few hundred images for one epoch, enough to run every step (a weak model)
QUICK_RECIPE = Recipe(epochs=1, train_images=512)


def task_case(task: tuple[int, ...], seed: int, protocol: str, progress: bool,
              recipe: Recipe | None = None) -> dict:
    recipe = recipe or Recipe()
    split = digits.load(seed=seed, size=recipe.size, test_fraction=recipe.test_fraction)
    model = trained_model(split, seed=seed, recipe=recipe, progress=progress).model.eval()
    task_train = digits.select(split.train, task)
    search_index, calibration_index = digits.split_stratified(task_train.tensors[1], 0.2, seed)
    test = digits.select(split.test, task)
    stats = velcro.calibrate(model, parts.loader(parts.subset(task_train, calibration_index)),
                             progress=False)
    search_set = test if protocol == "heldout" else parts.subset(task_train, search_index)
    return {"model": model, "stats": stats, "search": parts.loader(search_set),
            "test": parts.loader(test), "example": test.tensors[0][:1],
            "search_images": len(search_set), "test_images": len(test)}


def correct(model: torch.nn.Module, data) -> int:
    return velcro.evaluate(model, data, progress=False).correct


def held_out(model: torch.nn.Module, case: dict) -> dict:
    """Held-out correct count and the paired change against the uncompressed model."""
    report = velcro.evaluate(model, case["test"], progress=False)
    paired = report.paired_difference(case["test_report"])
    return {"test_correct": report.correct, "test_ci95": paired["ci95"],
            "holds": holds(paired)}


def velcro_method(name: str, case: dict, schedule: SearchSchedule, budget: int | None,
                  seed: int, settings: str = "today") -> dict:
    model, example = case["model"], case["example"]
    granularity = "element" if name == "velcro-element" else "channel"
    score = {"l1": lambda: filter_norm_score(model), "random": lambda: random_score(seed)}.get(
        name, lambda: "variance")()
    constant = {"velcro-scalar": "scalar", "zeros": "zero"}.get(name, "map")
    objective = "saving_ratio" if granularity == "element" else "macs"
    found = search(model, case["stats"], case["search"], granularity=granularity,
                   objective=objective, score=score, constant=constant, schedule=schedule,
                   budget=budget, progress=False, **SETTINGS[settings])
    row = {"saving_ratio": found.saving_ratio, "evaluations": found.evaluations,
           "search_seconds": found.wall_time_s, "search_accuracy": found.search_accuracy,
           "search_baseline": found.baseline_accuracy}
    if granularity == "element":
        costs = measure_costs(model, found.plan, example, latency=False)
        before, after = costs["original"], costs["compressed"]
        row.update(macs_saved=None, element_macs_saved=1 - after["macs"] / before["macs"],
                   parameters_saved=0.0, **held_out(velcro.apply(model, found.plan), case))
        return row
    small = velcro.trim(model, found.plan)
    saved = cost(model, example).reduction(cost(small, example))
    row.update(macs_saved=saved["macs"], parameters_saved=saved["parameters"],
               **held_out(small, case))
    return row


def torch_pruning_method(case: dict, schedule: SearchSchedule, budget: int | None,
                         global_pruning: bool = False) -> dict:
    """The largest uniform ratio with no search-split loss: the search's uniform levels
    ascending (same patience), then bisection towards the first infeasible level."""
    model, example, data = case["model"], case["example"], case["search"]
    began = time.perf_counter()
    baseline = correct(model, data)
    budget = budget or 10**9
    evaluations, tried = 1, {}

    def feasible(ratio: float) -> bool:
        nonlocal evaluations
        if ratio not in tried:
            evaluations += 1
            pruned = magnitude_pruned(model, ratio, example, global_pruning)
            tried[ratio] = correct(pruned, data) >= baseline
        return tried[ratio]

    best, above, misses = 0.0, None, 0
    levels = [level for level in schedule.uniform_levels if level < 1.0]
    for level in levels:
        if evaluations >= budget:
            break
        if feasible(level):
            best, above, misses = level, None, 0
        else:
            above = level if above is None else above
            misses += 1
            if schedule.uniform_patience is not None and misses >= schedule.uniform_patience:
                break
    above = above if above is not None else min(1.0, best + 0.05)
    for _ in range(schedule.refine_rounds + 2):
        if evaluations >= budget or above - best < 1e-3:
            break
        middle = round((best + above) / 2, 4)
        if feasible(middle):
            best = middle
        else:
            above = middle
    pruned = magnitude_pruned(model, best, example, global_pruning)
    saved = cost(model, example).reduction(cost(pruned, example))
    return {"ratio": best, "saving_ratio": None, "macs_saved": saved["macs"],
            "parameters_saved": saved["parameters"], "evaluations": evaluations,
            "search_seconds": time.perf_counter() - began,
            "search_baseline": baseline / case["search_images"],
            "search_accuracy": correct(pruned, data) / case["search_images"],
            **held_out(pruned, case)}


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}%"


def summarise(rows: list[dict], methods: list[str], tasks: list[str]) -> str:
    lines = ["| method | MACs saved (mean ± sd) | C | parameters saved | held-out Δ top-1 "
             "(mean, worst) | evaluations | search s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    means = {}
    for method in methods:
        chosen = [r for r in rows if r["method"] == method]
        if not chosen:
            continue
        macs = [r["macs_saved"] for r in chosen if r["macs_saved"] is not None]
        element = [r["element_macs_saved"] for r in chosen if r.get("element_macs_saved")
                   is not None]
        means[method] = statistics.mean(macs) if macs else None
        c_values = [r["saving_ratio"] for r in chosen if r["saving_ratio"] is not None]
        deltas = [r["test_delta"] for r in chosen]
        macs_text = mean_sd(macs) if macs else f"({mean_sd(element)} if outputs are skipped)"
        lines.append(
            f"| {METHODS[method]} | {macs_text} | "
            f"{mean_sd(c_values) if c_values else '-'} | "
            f"{mean_sd([r['parameters_saved'] for r in chosen])} | "
            f"{100 * statistics.mean(deltas):+.2f} pp, {100 * min(deltas):+.2f} pp | "
            f"{statistics.mean(r['evaluations'] for r in chosen):.0f} | "
            f"{statistics.mean(r['search_seconds'] for r in chosen):.1f} |")
    lines += ["", "MACs saved per task (mean over seeds):", "",
              "| method | " + " | ".join(f"digits {t}" for t in tasks) + " |",
              "|---|" + "---:|" * len(tasks)]
    for method in methods:
        cells = []
        for task in tasks:
            values = [r["macs_saved"] for r in rows if r["method"] == method
                      and r["task"] == task and r["macs_saved"] is not None]
            cells.append(mean_sd(values))
        lines.append(f"| {METHODS[method]} | " + " | ".join(cells) + " |")
    baselines = {m: v for m, v in means.items() if m in BASELINES and v is not None}
    if means.get("velcro") is not None and baselines:
        best = max(baselines, key=baselines.get)
        ratio = means["velcro"] / baselines[best] if baselines[best] > 0 else float("inf")
        lines += ["", f"velcro channel plans save {ratio:.2f}x the MACs of the best baseline "
                  f"({METHODS[best]}), averaged over tasks and seeds (goal: at least 1.5x)."]
    for other in ("velcro-scalar", "zeros"):
        if means.get(other) is not None and means.get("velcro"):
            lines.append(f"{METHODS[other]}: {means[other] / means['velcro']:.2f}x velcro's "
                         "MACs saved.")
    return "\n".join(lines)


def issue14(rows: list[dict]) -> str:
    """Today's search against the defaults, same splits: how often the held-out change stays
    within -0.5 points or its 95% interval includes 0, and the C kept."""
    lines = ["| method | settings | C (mean ± sd) | held-out Δ top-1 (mean, worst) | holds |",
             "|---|---|---:|---:|---:|"]
    held, runs, kept = 0, 0, []
    for method in ("velcro", "velcro-element"):
        by = {name: [r for r in rows if r["method"] == method and r["settings"] == name]
              for name in SETTINGS}
        for name, chosen in by.items():
            if chosen:
                deltas = [r["test_delta"] for r in chosen]
                lines.append(f"| {METHODS[method]} | {name} | "
                             f"{mean_sd([r['saving_ratio'] for r in chosen])} | "
                             f"{100 * statistics.mean(deltas):+.2f} pp, "
                             f"{100 * min(deltas):+.2f} pp | "
                             f"{sum(r['holds'] for r in chosen)}/{len(chosen)} |")
        if by["today"] and by["defaults"]:
            held += sum(r["holds"] for r in by["defaults"])
            runs += len(by["defaults"])
            today_c = statistics.mean(r["saving_ratio"] for r in by["today"])
            kept.append(statistics.mean(r["saving_ratio"] for r in by["defaults"]) / today_c
                        if today_c > 0 else float("nan"))
    if runs:
        lines += ["", f"Defaults hold in {held}/{runs} runs ({100 * held / runs:.0f}%; goal "
                  ">= 90%) and keep " + ", ".join(f"{100 * k:.0f}%" for k in kept)
                  + " of today's C (channel, element; goal >= 80%)."]
    return "\n".join(lines)


def plot(rows: list[dict], methods: list[str], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(6.0, 2.0 + 2.4 * len(tasks)), 5.6), dpi=120)
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        means, sds = [], []
        for task in tasks:
            values = [r["macs_saved"] if r["macs_saved"] is not None else r["element_macs_saved"]
                      for r in rows if r["method"] == method and r["task"] == task]
            means.append(100 * statistics.mean(values) if values else 0.0)
            sds.append(100 * statistics.stdev(values) if len(values) > 1 else 0.0)
        positions = [t + (i - (len(methods) - 1) / 2) * width for t in range(len(tasks))]
        label = METHODS[method]
        if method == "velcro-element":
            label = "velcro elements (VELCRO): MACs of hardware that skips outputs"
        below = [min(m, sd) for m, sd in zip(means, sds, strict=True)]  # no bar under 0
        axis.bar(positions, means, width, yerr=[below, sds], capsize=2, label=label,
                 hatch="//" if method == "velcro-element" else None)
    axis.set_xticks(range(len(tasks)), [f"digits {t}" for t in tasks])
    axis.set_ylabel("MACs saved at no held-out top-1 loss (%)")
    axis.set_title("ResNet-18 on digits, no fine-tuning (mean ± sd over seeds)", fontsize=10)
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2,
                frameon=False)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def report(rows: list[dict], methods: list[str], tasks: list[str], plot_path: str | None):
    """The tables per search setting, the issue-14 comparison and the plot (first setting)."""
    names = list(dict.fromkeys(r.get("settings", "today") for r in rows))
    for name in names:
        chosen = [r for r in rows if r.get("settings", "today") == name]
        print(f"\nSearch settings '{name}':\n\n{summarise(chosen, methods, tasks)}")
    if len(names) > 1:
        print(f"\nIssue 14, same splits:\n\n{issue14(rows)}")
    if plot_path:
        plot([r for r in rows if r.get("settings", "today") == names[0]], methods, tasks,
             Path(plot_path))
        print(f"\nplot: {plot_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="3,8;4,7,9;1,7",
                        help="tasks separated by ';' (default '3,8;4,7,9;1,7')")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--protocol", choices=("heldout", "split"), default="heldout")
    parser.add_argument("--schedule", choices=tuple(SCHEDULES), default="demo")
    parser.add_argument("--settings", default="today",
                        help="comma-separated search settings: today (the search before issue "
                             "14) and/or defaults (velcro.search's defaults)")
    parser.add_argument("--budget", type=int, default=None,
                        help="most evaluations per search (default: the schedule's)")
    parser.add_argument("--plot", default=None, help="the PNG (default: in the output folder)")
    parser.add_argument("--json", default=None,
                        help="the raw rows' JSON (default: in the output folder)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--from-json", default=None,
                        help="summarise and plot rows written earlier by --json, run nothing")
    _bench.add_options(parser)
    args = parser.parse_args()
    quick_methods = "velcro,velcro-element,l1"
    try:
        import torch_pruning  # noqa: F401  (a bench extra: quick runs it when present)

        quick_methods += ",torch-pruning"
    except ImportError:
        pass
    _bench.quick(args, tasks="3,8", seeds=[0], methods=quick_methods, budget=20)
    _bench.started("bench_quality", args, f"MACs saved at no held-out loss, tasks {args.tasks}, "
                   f"seeds {args.seeds}")
    folder = _bench.output_dir(args, "bench_quality")
    stem = "bench_quality" + ("_split" if args.protocol == "split" else "")
    args.plot = args.plot or str(folder / f"{stem}.png")
    args.json = args.json or str(folder / f"{stem}.json")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    tasks = [",".join(map(str, digits.parse_task(t))) for t in args.tasks.split(";")]
    settings = [name.strip() for name in args.settings.split(",") if name.strip()]
    if not settings or any(name not in SETTINGS for name in settings):
        parser.error(f"--settings '{args.settings}': choose from {', '.join(SETTINGS)}")
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
        methods = [m for m in methods if any(r["method"] == m for r in rows)]
        tasks = list(dict.fromkeys(r["task"] for r in rows))
        report(rows, methods, tasks, args.plot)
        return
    schedule = SCHEDULES[args.schedule]
    rows = []
    began = time.perf_counter()
    runs = [(method, name) for name in settings for method in methods
            if name == settings[0] or not method.startswith("torch-pruning")]
    bar = tqdm(total=len(tasks) * len(args.seeds) * len(runs), unit="run",
               desc="bench_quality", file=sys.stderr)
    with bar:
        for seed in args.seeds:
            for task in tasks:
                torch.set_num_threads(args.threads)
                case = task_case(digits.parse_task(task), seed, args.protocol, progress=True,
                                 recipe=QUICK_RECIPE if args.quick else None)
                torch.set_num_threads(args.threads)
                case["test_report"] = velcro.evaluate(case["model"], case["test"],
                                                      progress=False)
                baseline_test = case["test_report"].correct
                for method, name in runs:
                    bar.set_postfix(seed=seed, task=task, method=method, settings=name)
                    if method.startswith("torch-pruning"):
                        row = torch_pruning_method(case, schedule, args.budget,
                                                   global_pruning=method.endswith("global"))
                    else:
                        row = velcro_method(method, case, schedule, args.budget, seed, name)
                    row.update(method=method, task=task, seed=seed, settings=name,
                               test_images=case["test_images"],
                               test_delta=(row["test_correct"] - baseline_test)
                               / case["test_images"])
                    rows.append(row)
                    bar.update(1)
    print(f"\nResNet-18 on scikit-learn digits (32x32), tasks {'; '.join(tasks)}, seeds "
          f"{' '.join(map(str, args.seeds))}; protocol '{args.protocol}' (search on "
          f"{'the held-out test' if args.protocol == 'heldout' else 'the task training'} "
          f"images; settings {', '.join(settings)}), schedule '{args.schedule}', budget "
          f"{args.budget or 'the schedule'}; {torch.get_num_threads()} torch threads; "
          f"{time.perf_counter() - began:.0f} s in all.\n")
    report(rows, methods, tasks, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        print(f"raw rows: {args.json}")


if __name__ == "__main__":
    main()

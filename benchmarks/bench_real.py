"""The papers' experiment on real pretrained networks and real photographs (issue 12, part 2).

Tasks (``../shared/data``): CIFAR-10 {cat, dog}, vehicles {airplane, automobile, ship,
truck}, animals {bird, cat, deer, dog, frog, horse} and all ten classes (the non-specialized
control), with ``cifar_resnet20`` and ``cifar_resnet56``; ImageNet dogs (classes 151-268)
and the whole 1,300-image set (its control) with ``efficientnet_lite0``.

Protocol, per task, model and split seed (3 seeds): a seeded, stratified split of the task's
images into calibration (2%: at least one image per class where 2% allows it), search (30%,
at most ``--max-search`` images) and held-out images (the rest, at most ``--max-heldout``);
the statistics come from the calibration images, every search runs on the search images
only, and every accuracy is top-1 over all of the model's classes on the held-out images,
paired with the uncompressed model on the same images (95% intervals). The uncompressed
model's held-out logits are computed once per split and reused.

Methods (``METHODS``, one entry per plan variant; a new variant is one more entry): velcro's
search before issue 14 (``today-*``: top-1 point estimate, tolerance 0, no check) and with
its current defaults (``velcro-*``), both granularities, on the same splits; the best
uniform threshold under the same guard; and the baselines a user would pick instead (L1-norm
and random filters with mean maps, velcro's channels zeroed, Torch-Pruning's magnitude
pruner without fine-tuning), each chosen by the same guard and check. Uniform thresholds
are also measured on the held-out images (the curves).

    .venv/bin/python benchmarks/bench_real.py --quick          # cat/dog, ResNet-20, seed 0
    .venv/bin/python benchmarks/bench_real.py --resume         # everything, resumable
    .venv/bin/python benchmarks/bench_real.py --latency        # timed pass, stored plans
    .venv/bin/python benchmarks/bench_real.py --report-only --update-results

Writes ``runs/bench/bench_real/results.json`` (or into ``--out DIR``: one row per task,
model, seed and method, saved as it completes), ``results.md`` and the plots;
``--update-results`` puts the plots in ``benchmarks/`` and the section in
``benchmarks/RESULTS.md``. Torch-Pruning is a benchmark-only dependency:
``pip install "torch==2.13.0" torch-pruning``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench  # noqa: E402
import _real_cases as cases  # noqa: E402
import _real_report as report  # noqa: E402

from velcro._io import write_text_atomic  # noqa: E402
from velcro.search import DEFAULTS, UNGUARDED  # noqa: E402


@dataclass(frozen=True)
class Method:
    """One plan variant: how its plan is searched (keywords of ``velcro.search``)."""

    name: str
    label: str
    granularity: str = "channel"
    settings: dict = field(default_factory=lambda: dict(DEFAULTS))
    score: str = "variance"  # or "l1", "random"
    constant: str = "map"
    schedule: str = "bench"  # or "uniform": the best uniform threshold under the same guard
    kind: str = "velcro"  # or "torch-pruning"


METHODS = [
    Method("today-element", "velcro elements, search before issue 14", "element", UNGUARDED),
    Method("today-channel", "velcro channels, search before issue 14", "channel", UNGUARDED),
    Method("velcro-element", "velcro elements (VELCRO)", "element"),
    Method("velcro-channel", "velcro channels, mean maps (S-VELCRO)", "channel"),
    # the same guard and check at 50% confidence (the bounds become point estimates): how
    # much of the saving the 80% default gives up on these networks, and what it buys
    Method("c50-element", "velcro elements, defaults at 50% confidence", "element",
           {**DEFAULTS, "confidence": 0.5}),
    Method("c50-channel", "velcro channels, defaults at 50% confidence", "channel",
           {**DEFAULTS, "confidence": 0.5}),
    Method("uniform-element", "best uniform threshold, elements", "element",
           schedule="uniform"),
    Method("uniform-channel", "best uniform threshold, channels", "channel",
           schedule="uniform"),
    Method("zeros", "ablation: velcro channels, zeros", constant="zero"),
    Method("l1", "L1-norm filters, mean maps", score="l1"),
    Method("random", "random filters, mean maps", score="random"),
    Method("torch-pruning", "Torch-Pruning magnitude, no fine-tuning", kind="torch-pruning"),
]
QUICK_METHODS = ["today-element", "today-channel", "velcro-element", "velcro-channel"]
SEEDS = (0, 1, 2)


def key(row: dict) -> tuple:
    return (row["task"], row["model"], row["seed"], row["method"])


class Store:
    """The rows of ``path``, rewritten atomically after every new row (for ``--resume``)."""

    def __init__(self, path: Path, resume: bool, meta: dict) -> None:
        self.path = path
        self.document = {"meta": meta, "rows": []}
        if resume and path.is_file():
            self.document = json.loads(path.read_text())
            old = self.document.get("meta", {})
            commands = old.get("commands") or ([old["command"]] if "command" in old else [])
            self.document["meta"] = {**old, **meta,
                                     "commands": [*commands, meta["command"]]}
        else:
            self.document["meta"]["commands"] = [meta["command"]]
        self.done = {key(r) for r in self.document["rows"]}

    def add(self, row: dict) -> None:
        self.document["rows"] = [r for r in self.document["rows"] if key(r) != key(row)]
        self.document["rows"].append(row)
        self.done.add(key(row))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self.document, indent=1) + "\n")


def plan_runs(args) -> list[tuple[str, str, int, list[str]]]:
    runs = []
    for task in args.tasks:
        for model in cases.TASKS[task].models:
            if args.models and model not in args.models:
                continue
            for seed in args.seeds:
                runs.append((task, model, seed, ["curve", *args.methods]))
    return runs


def run_all(args, store: Store) -> None:
    by_name = {m.name: m for m in METHODS}
    runs = plan_runs(args)
    todo = sum(1 for t, m, s, names in runs for n in names if (t, m, s, n) not in store.done)
    bar = tqdm(total=todo, unit="row", desc="bench_real", file=sys.stderr)
    with bar:
        for task, model_name, seed, names in runs:
            missing = [n for n in names if (task, model_name, seed, n) not in store.done]
            if not missing:
                continue
            bar.set_postfix(task=task, model=model_name, seed=seed, method="setup")
            case = cases.make_case(task, model_name, seed, args)
            for name in missing:
                bar.set_postfix(task=task, model=model_name, seed=seed, method=name)
                began = time.perf_counter()
                if name == "curve":
                    row = cases.curve_row(case, args.thresholds)
                elif by_name[name].kind == "torch-pruning":
                    row = cases.torch_pruning_row(case, by_name[name])
                else:
                    row = cases.velcro_row(case, by_name[name], args.out / "plans")
                row.update(task=task, model=model_name, seed=seed, method=name,
                           seconds=time.perf_counter() - began, splits=case.counts,
                           setup_seconds=case.setup_seconds)
                store.add(row)
                bar.update(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=list(cases.TASKS), default=None)
    parser.add_argument("--models", nargs="+", default=None,
                        help="only these models (default: every model of each task)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=None,
                        choices=[m.name for m in METHODS])
    parser.add_argument("--thresholds", type=float, nargs="+",
                        default=[0.05, 0.1, 0.2, 0.3, 0.4, 0.5],
                        help="uniform thresholds measured on the held-out images (curves)")
    parser.add_argument("--max-search", type=int, default=600)
    parser.add_argument("--max-heldout", type=int, default=2000)
    parser.add_argument("--schedule", choices=("bench", "full"), default="full",
                        help="search schedule: full (the library's default, what `velcro "
                             "search` runs) or bench (4 levels, 1 refinement round: about half "
                             "the evaluations, as bench_quality's demo schedule)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in OUT/results.json, run only the rest")
    parser.add_argument("--latency", action="store_true",
                        help="only time the stored channel plans' trimmed models (batch 1, 32)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the tables and plots from OUT/results.json, run nothing")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    _bench.add_options(parser)  # --quick: cifar-catdog, cifar_resnet20, seed 0, today's
    # search against the defaults; --out: rows, tables and plots (default runs/bench/bench_real/);
    # --update-results: the plots into benchmarks/ and the section into benchmarks/RESULTS.md
    args = parser.parse_args()
    _bench.quick(args, tasks=args.tasks or ["cifar-catdog"],
                 models=args.models or ["cifar_resnet20"], seeds=args.seeds or [0],
                 methods=args.methods or QUICK_METHODS)
    _bench.started("bench_real", args, "the papers' experiment on the real networks")
    figures = _bench.output_dir(args, "bench_real")
    if args.out is None:  # the rows stay untracked, also with --update-results
        args.out = _bench.ROOT / "runs" / "bench" / "bench_real"
    args.out.mkdir(parents=True, exist_ok=True)
    args.tasks = args.tasks or list(cases.TASKS)
    args.seeds = args.seeds or list(SEEDS)
    args.methods = args.methods or [m.name for m in METHODS]
    torch.set_num_threads(args.threads)
    results = args.out / "results.json"
    if not args.report_only and not (args.data / "cifar10").is_dir():
        print(f"bench_real: skipped: {args.data} holds no cifar10/ (the real data); give "
              "--data", file=sys.stderr)
        return
    meta = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                       f"Python {platform.python_version()}, torch {torch.__version__}",
            "command": " ".join(sys.argv), "schedule": args.schedule,
            "max_search": args.max_search, "max_heldout": args.max_heldout,
            "defaults": DEFAULTS, "today": UNGUARDED}
    began = time.perf_counter()
    if args.latency:
        cases.latency_pass(results, args)
        return
    if not args.report_only:
        store = Store(results, args.resume, meta)
        run_all(args, store)
        store.document["meta"]["wall_seconds_last_run"] = time.perf_counter() - began
        write_text_atomic(results, json.dumps(store.document, indent=1) + "\n")
    document = json.loads(results.read_text())
    markdown = report.markdown(document, [m for m in METHODS], figures)
    write_text_atomic(args.out / "results.md", markdown)
    print(markdown)
    if args.update_results:
        report.update_results(_bench.HERE / "RESULTS.md", markdown)
    print(f"\nrows: {results}; tables: {args.out / 'results.md'}; plots in {figures}; "
          f"{time.perf_counter() - began:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

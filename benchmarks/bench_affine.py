"""Affine compensation against mean maps: MACs saved at no held-out loss, same splits, same search.

S-VELCRO replaces a trimmed channel by its mean map; ``constant="affine"`` predicts it from the
site's kept channels (a ridge regression fitted on the calibration images; see
``velcro._affine``). For each model, task, split seed and calibration-set size:

- ``mean``: ``velcro.search(constant="map")``, channels ranked by variance (S-VELCRO);
- ``affine-only``: ``velcro.search(constant="affine", ridge="site", start=<the mean search's
  thresholds>)``: the same search with the predictions (per-site ridges chosen by their error
  on the search images), starting where the mean search ended;
- ``affine``: what ``velcro.search(constant="affine")`` returns: the better of the two above
  on the search split (so never below the mean there), computed here from both runs;
- ``affine-residual``: ``affine-only`` with channels ranked by residual variance.

Every search: objective MACs, the same schedule, and ``--search``: ``defaults`` (what
``velcro search`` runs: top-1 within 2 points at 80% confidence, a quarter of the search
images held back for the check) or ``unguarded`` (top-1 point estimate, tolerance 0, no check:
the search before issue 14).
Each plan is trimmed (``channel_multiple=1``: the MACs the plan saves, without the padding to
multiples of 8 that only speeds kernels up) and its MACs counted by ``velcro.cost``; held-out
top-1 is measured on the trimmed model, on images neither calibration nor search saw. Also:
*equal channels*: the affine predictions at the channels the mean search chose, against the
mean maps there (held-out accuracy at the same MACs saved, up to explicit predictions).

Suites: ``digits`` (the demo's ResNet-18 trained on scikit-learn's digits; calibration a
seeded share of the task's images drawn from its training images, search on the rest of
them, held out: the task's test images) and ``cifar`` (the CIFAR-10 ResNets of
``../shared/data``, {cat, dog} and vehicles on the 10,000 JPEG test copies, preprocessed as
the models register; split as bench_real does: stratified, calibration a share of the
task's images, search at most 600 others, held out: the rest).

    .venv/bin/python benchmarks/bench_affine.py --quick        # `make bench`: one small case
    .venv/bin/python benchmarks/bench_affine.py --suite digits --update-results
    .venv/bin/python benchmarks/bench_affine.py --suite cifar --models cifar_resnet20

Rows and the plot go to runs/bench/bench_affine/ (``--out DIR``; ``--update-results``:
benchmarks/bench_affine_<suite>.json and .png); ``--from-json`` re-summarises stored rows.
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
from velcro.data import split
from velcro.search import DEFAULTS, UNGUARDED, SearchSchedule, search
from velcro.search._candidates import Rankings
from velcro.search._ridge import SITE_RIDGES
from velcro.trim._affine import affine_sites

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
CIFAR_TASKS = {"cats-dogs": (3, 5), "vehicles": (0, 1, 8, 9)}
DIGIT_TASKS = ("3,8", "4,7,9", "1,7")
METHODS = {
    "mean": {"constant": "map"},
    "affine-only": {"constant": "affine", "ridge": "site"},
    "affine-residual": {"constant": "affine", "ridge": "site", "score": "residual"},
}
SCHEDULES = {"demo": SearchSchedule(levels=4, refine_rounds=1), "full": SearchSchedule()}
SEARCHES = {"defaults": DEFAULTS, "unguarded": UNGUARDED}
SEARCH_IMAGES = 600
BATCH = 200


def batches(images: torch.Tensor, labels: torch.Tensor) -> list:
    return [(images[i:i + BATCH], labels[i:i + BATCH]) for i in range(0, len(images), BATCH)]


def cifar_images(classes: tuple[int, ...], cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's JPEG test copies, preprocessed as the checkpoints expect (cached once)."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file, save_file

    path = cache / f"cifar_{'_'.join(map(str, classes))}.safetensors"
    if path.is_file():
        tensors = load_file(str(path))
        return tensors["images"], tensors["labels"]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    images, labels = [], []
    for label in classes:
        for file in sorted((DATA / "cifar10" / "test" / str(label)).glob("*.jpg")):
            with Image.open(file) as image:
                pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
            images.append((torch.from_numpy(pixels).permute(2, 0, 1) - mean) / std)
            labels.append(label)
    result = torch.stack(images).contiguous(), torch.tensor(labels)
    cache.mkdir(parents=True, exist_ok=True)
    save_file({"images": result[0], "labels": result[1]}, str(path))
    return result


def calibration_count(fraction: float, total: int, classes: int) -> int:
    return max(classes, round(fraction * total))


def cifar_case(model_name: str, task: str, seed: int, fraction: float, cache: Path) -> dict:
    classes = CIFAR_TASKS[task]
    depth = model_name.removeprefix("cifar_resnet")
    model = velcro.models.create(model_name, num_classes=10,
                                 weights=str(DATA / "cifar10" / f"resnet{depth}.safetensors"))
    images, labels = cifar_images(classes, cache)
    total = len(images)
    parts = split(list(range(total)), {"calibration": fraction,
                                       "search": min(0.3, SEARCH_IMAGES / total),
                                       "heldout": None}, seed=seed, labels=labels.tolist())
    calibration, search_part, held = (torch.as_tensor(parts[k])
                                      for k in ("calibration", "search", "heldout"))
    return {"model": model.eval(), "calibration": [images[calibration]],
            "search": batches(images[search_part], labels[search_part]),
            "heldout": batches(images[held], labels[held]), "example": images[:1],
            "sizes": (len(calibration), len(search_part), len(held))}


def digits_case(task: str, seed: int, fraction: float) -> dict:
    from velcro.data import digits
    from velcro.demo._digits_model import trained_model

    split = digits.load(seed=seed)
    model = trained_model(split, seed=seed, progress=True).model.eval()
    train, test = digits.select(split.train, task), digits.select(split.test, task)
    images, labels = train.tensors
    total = len(images) + len(test.tensors[0])
    count = calibration_count(fraction, total, len(digits.parse_task(task)))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    calibration, search_part = order[:count], order[count:]
    return {"model": model, "calibration": [images[calibration]],
            "search": batches(images[search_part], labels[search_part]),
            "heldout": batches(*test.tensors), "example": images[:1],
            "sizes": (len(calibration), len(search_part), len(test.tensors[0]))}


def correct(model: torch.nn.Module, data: list) -> int:
    with torch.no_grad():
        return sum(int((model(x).argmax(1) == y).sum()) for x, y in data)


def measure(case: dict, plan: velcro.Plan, base: dict) -> dict:
    """MACs saved by the trimmed plan and its held-out top-1 change (in images)."""
    model, example = case["model"], case["example"]
    small = velcro.trim(model, plan, channel_multiple=1)
    macs = cost(small, example).macs
    return {"macs_saved": 1 - macs / base["macs"],
            "heldout_delta": correct(small, case["heldout"]) - base["heldout_correct"]}


def run_case(case: dict, methods: list[str], schedule: SearchSchedule,
             settings: dict) -> list[dict]:
    model = case["model"]
    stats = velcro.calibrate(model, case["calibration"], progress=False, covariance=True)
    base = {"macs": cost(model, case["example"]).macs,
            "heldout_correct": correct(model, case["heldout"])}
    rows, results = [], {}
    for method in methods:
        began = time.perf_counter()
        options = dict(METHODS[method])
        if options["constant"] == "affine" and "mean" in results:
            options["start"] = results["mean"].thresholds  # as search(constant="affine")
        result = search(model, stats, case["search"], granularity="channel",
                        objective="macs", schedule=schedule, progress=False,
                        **settings, **options)
        results[method] = result
        rows.append({"method": method, "objective": result.objective_value,
                     "saving_ratio": result.saving_ratio, "evaluations": result.evaluations,
                     "search_accuracy": result.search_accuracy,
                     "backed_off": (result.check or {}).get("backed_off"),
                     "search_baseline": result.baseline_accuracy,
                     "ridges": result.plan.info.get("ridges"),
                     "search_seconds": time.perf_counter() - began,
                     **measure(case, result.plan, base)})
    by_method = {row["method"]: row for row in rows}
    if "mean" in results and "affine-only" in results:
        # what search(constant="affine") returns: the better on the search split (ties: mean)
        better = ("affine-only" if results["affine-only"].objective_value
                  > results["mean"].objective_value + 1e-12 else "mean")
        rows.append({**by_method[better], "method": "affine", "chosen": better})
        # equal channels: the affine predictions at the channels the mean search chose
        search_stats = velcro.calibrate(model, [x for x, _ in case["search"]], progress=False,
                                        covariance=True)
        rankings = Rankings(stats, "channel", "variance", "affine",
                            affine_sites=affine_sites(model), ridges=SITE_RIDGES)
        rankings.set_heldout(search_stats)
        mean_plan = results["mean"].plan
        fractions = [mean_plan.thresholds()[name] for name in rankings.names]
        counts = tuple(int(mean_plan.sites[n].units.numel()) for n in rankings.names)
        rows.append({"method": "affine@mean-channels",
                     **measure(case, rankings.plan(fractions, counts), base)})
    for row in rows:
        row.update(heldout_images=case["sizes"][2], calibration_images=case["sizes"][0],
                   search_images=case["sizes"][1], heldout_base=base["heldout_correct"])
    return rows


def mean_sd(values: list[float], scale: float = 100.0, unit: str = "%") -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.1f} ± {scale * sd:.1f}{unit}"


def summarise(rows: list[dict]) -> str:
    groups = sorted({(r["suite"], r["model"], r["task"], r["fraction"]) for r in rows})
    lines = ["| model | task | calibration | method | MACs saved | held-out Δ top-1 "
             "(mean, worst) | runs at no held-out loss | affine / mean MACs |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for suite, model, task, fraction in groups:
        chosen = [r for r in rows if (r["suite"], r["model"], r["task"], r["fraction"])
                  == (suite, model, task, fraction)]
        means = {}
        images = statistics.mean(r["calibration_images"] for r in chosen)
        for method in ("mean", "affine", "affine-only", "affine-residual",
                       "affine@mean-channels"):
            mine = [r for r in chosen if r["method"] == method]
            if not mine:
                continue
            macs = [r["macs_saved"] for r in mine]
            means[method] = statistics.mean(macs)
            deltas = [100 * r["heldout_delta"] / r["heldout_images"] for r in mine]
            ratio = (f"{means[method] / means['mean']:.2f}x"
                     if method != "mean" and means.get("mean") else "")
            lines.append(
                f"| {model} | {task} | {100 * fraction:g}% ({images:.0f} img) | {method} | "
                f"{mean_sd(macs)} | {statistics.mean(deltas):+.2f} pp, {min(deltas):+.2f} pp | "
                f"{sum(r['heldout_delta'] >= 0 for r in mine)}/{len(mine)} | {ratio} |")
    return "\n".join(lines)


KEYS = ("suite", "model", "task", "fraction", "seed")


def paired(rows: list[dict], method: str) -> list[tuple[dict, dict]]:
    """(row of ``method``, the mean search's row of the same case)."""
    means = {tuple(r[k] for k in KEYS): r for r in rows if r["method"] == "mean"}
    return [(r, means[tuple(r[k] for k in KEYS)]) for r in rows
            if r["method"] == method and tuple(r[k] for k in KEYS) in means]


def overall(rows: list[dict]) -> str:
    """Averages over every case: the headline figures."""
    lines = []
    for method in ("affine", "affine-only", "affine-residual"):
        pairs = paired(rows, method)
        if not pairs:
            continue
        ratio = (statistics.mean(a["macs_saved"] for a, _ in pairs)
                 / max(1e-12, statistics.mean(m["macs_saved"] for _, m in pairs)))
        per_run = statistics.median(a["macs_saved"] / max(1e-12, m["macs_saved"])
                                    for a, m in pairs)
        extra = statistics.mean(100 * (a["heldout_delta"] - m["heldout_delta"])
                                / a["heldout_images"] for a, m in pairs)
        no_worse = sum(a["heldout_delta"] >= m["heldout_delta"] for a, m in pairs)
        lossless = (sum(a["heldout_delta"] >= 0 for a, _ in pairs),
                    sum(m["heldout_delta"] >= 0 for _, m in pairs))
        lines.append(
            f"- {method}: {ratio:.2f}x the mean maps' MACs saved (ratio of the averages; "
            f"median per-run ratio {per_run:.2f}x) over {len(pairs)} runs; held-out top-1 "
            f"{extra:+.2f} pp against the mean maps' on average, no worse in {no_worse}/"
            f"{len(pairs)} runs; no held-out loss in {lossless[0]} runs (mean maps: "
            f"{lossless[1]})")
    pairs = paired(rows, "affine")
    for suite in sorted({a["suite"] for a, _ in pairs}):
        cells = []
        for fraction in sorted({a["fraction"] for a, _ in pairs if a["suite"] == suite}):
            some = [(a, m) for a, m in pairs if (a["suite"], a["fraction"]) == (suite, fraction)]
            ratio = (statistics.mean(a["macs_saved"] for a, _ in some)
                     / max(1e-12, statistics.mean(m["macs_saved"] for _, m in some)))
            cells.append(f"{100 * fraction:g}%: {ratio:.2f}x")
        lines.append(f"- {suite}, affine / mean MACs saved by calibration size: "
                     + ", ".join(cells))
    equal = paired(rows, "affine@mean-channels")
    if equal:
        gain = statistics.mean(100 * (a["heldout_delta"] - m["heldout_delta"])
                               / a["heldout_images"] for a, m in equal)
        macs = statistics.mean(a["macs_saved"] / max(1e-12, m["macs_saved"]) for a, m in equal)
        lines.append(f"- at the mean search's channels (equal MACs up to the explicit "
                     f"predictions: {macs:.3f}x), affine predictions change held-out top-1 by "
                     f"{gain:+.2f} pp against the mean maps ({len(equal)} runs)")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["task"]) for r in rows})
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), dpi=120,
                                squeeze=False)
    for axis, (model, task) in zip(axes[0], panels, strict=True):
        for method, style in (("mean", "o-"), ("affine", "s-"), ("affine-residual", "^--")):
            points = sorted({r["fraction"] for r in rows if (r["model"], r["task"], r["method"])
                             == (model, task, method)})
            if not points:
                continue
            values = [[100 * r["macs_saved"] for r in rows if (r["model"], r["task"],
                       r["method"], r["fraction"]) == (model, task, method, f)] for f in points]
            axis.errorbar([100 * f for f in points], [statistics.mean(v) for v in values],
                          yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in values],
                          fmt=style, capsize=2, label=method)
        axis.set_title(f"{model}, {task}", fontsize=9)
        axis.set_xlabel("calibration images (% of the task's)")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("MACs saved, trimmed (%)")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def cases(args) -> list[tuple]:
    found = []
    for suite in args.suite.split(","):
        models = ["resnet18-digits"] if suite == "digits" else args.models.split(",")
        tasks = args.digit_tasks.split(";") if suite == "digits" else args.tasks.split(",")
        for model in models:
            for task in tasks:
                for fraction in args.fractions:
                    for seed in args.seeds:
                        found.append((suite, model, task, fraction, seed))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="digits,cifar", help="digits, cifar or both")
    parser.add_argument("--models", default="cifar_resnet20,cifar_resnet56")
    parser.add_argument("--tasks", default="cats-dogs,vehicles")
    parser.add_argument("--digit-tasks", default=";".join(DIGIT_TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    parser.add_argument("--methods", default="mean,affine-only,affine-residual")
    parser.add_argument("--schedule", choices=tuple(SCHEDULES), default="demo")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: a shared machine's cores are contended)")
    parser.add_argument("--search", choices=tuple(SEARCHES), default="defaults",
                        help="the search's guard: the library's defaults or unguarded "
                             "(tolerance 0, no check)")
    parser.add_argument("--from-json", nargs="+", default=None,
                        help="summarise rows written earlier, run nothing")
    _bench.add_options(parser)  # --quick: one digits case (task 3,8, seed 0, 10%)
    args = parser.parse_args()
    _bench.quick(args, suite="digits", digit_tasks="3,8", seeds=[0], fractions=[0.1],
                 methods="mean,affine-only")
    torch.set_num_threads(args.threads)
    if args.from_json:
        rows = [row for file in args.from_json for row in json.loads(Path(file).read_text())]
        print(summarise(rows), "\n", overall(rows), sep="\n")
        return
    if "cifar" in args.suite and not (DATA / "cifar10").is_dir():
        sys.exit(f"the CIFAR suite needs {DATA / 'cifar10'} (see ../shared/data/README.md)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    schedule = SCHEDULES[args.schedule]
    out = _bench.output_dir(args, "bench_affine")
    cache = _bench.ROOT / "runs" / "bench" / "bench_affine" / "cache"  # never tracked
    _bench.started("bench_affine", args, f"MACs saved by affine compensation against mean "
                   f"maps, suites {args.suite}, search {args.search}, schedule {args.schedule}")
    rows, began = [], time.perf_counter()
    todo = cases(args)
    for suite, model, task, fraction, seed in tqdm(todo, desc="bench_affine", unit="case",
                                                   file=sys.stderr):
        if suite == "digits":
            case = digits_case(task, seed, fraction)
        else:
            case = cifar_case(model, task, seed, fraction, cache)
        for row in run_case(case, methods, schedule, SEARCHES[args.search]):
            rows.append({"suite": suite, "model": model, "task": task, "fraction": fraction,
                         "seed": seed, "search": args.search, **row})
        (out / "rows.json").write_text(json.dumps(rows, indent=1) + "\n")  # progress kept
    seconds = time.perf_counter() - began
    print(f"\n{len(todo)} cases, schedule '{args.schedule}', {torch.get_num_threads()} torch "
          f"thread(s), {seconds / 60:.0f} min in all.\n")
    print(summarise(rows), "", overall(rows), sep="\n")
    target = out
    name = "bench_affine" + ("" if args.suite == "digits,cifar" else "_" + args.suite)
    (target / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, target / f"{name}.png")
    print(f"\nrows: {target / (name + '.json')}; plot: {target / (name + '.png')}")


if __name__ == "__main__":
    main()

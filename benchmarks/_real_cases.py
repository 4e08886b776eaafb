"""bench_real's tasks, splits and rows: one (task, model, seed) case, and what each method does
on it. Private to ``bench_real.py``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import _protocol as protocol
import torch
import torch.nn as nn

import velcro
from velcro import models
from velcro.cost import cost
from velcro.data import ImageFolder, ImageLoader, resolve_task, split
from velcro.errors import VelcroError
from velcro.report import measure_costs
from velcro.report.sweep import zero_elements
from velcro.search import SearchSchedule, filter_norm_score, random_score, search
from velcro.search._check import split_check
from velcro.search._criteria import Guard, compare_outputs


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str  # "cifar10" or "imagenet"
    classes: tuple[int, ...] | None  # None: every image of the set
    models: tuple[str, ...]
    control: str | None  # the non-specialized control it is compared with


CIFAR_MODELS = ("cifar_resnet20", "cifar_resnet56")
TASKS = {t.name: t for t in [
    Task("cifar-catdog", "cifar10", (3, 5), CIFAR_MODELS, "cifar-all"),
    Task("cifar-vehicles", "cifar10", (0, 1, 8, 9), CIFAR_MODELS, "cifar-all"),
    Task("cifar-animals", "cifar10", (2, 3, 4, 5, 6, 7), CIFAR_MODELS, "cifar-all"),
    Task("cifar-all", "cifar10", tuple(range(10)), CIFAR_MODELS, None),
    Task("imagenet-dogs", "imagenet", tuple(range(151, 269)), ("efficientnet_lite0",),
         "imagenet-all"),
    Task("imagenet-all", "imagenet", None, ("efficientnet_lite0",), None),
]}
SCHEDULES = {"bench": SearchSchedule(levels=4, refine_rounds=1), "full": SearchSchedule(),
             "uniform": SearchSchedule(profile=False, refine_rounds=0, uniform_patience=None)}
_DATA: dict = {}


@dataclass
class Case:
    task: str
    model_name: str
    seed: int
    model: nn.Module
    stats: velcro.Stats
    search: list  # (images, labels) batches
    heldout: torch.Tensor
    labels: torch.Tensor
    reference: torch.Tensor  # the uncompressed model's held-out logits
    counts: dict
    schedule: str
    setup_seconds: float
    trimmed_cost: object = None  # the cost of the model trimmed by an empty channel plan


def _images(root: Path, model_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a class-index folder, preprocessed for ``model_name`` (cached)."""
    preprocess = models.preprocess_for(model_name)
    cache_key = (str(root), json.dumps(preprocess.to_dict(), sort_keys=True))
    if cache_key not in _DATA:
        folder = ImageFolder(root, labels="index", preprocess=preprocess)
        batches = list(ImageLoader(folder, batch_size=200))
        _DATA.clear()  # one set at a time: ImageNet's take most of a GiB
        _DATA[cache_key] = (torch.cat([x for x, _ in batches]),
                            torch.cat([y for _, y in batches]))
    return _DATA[cache_key]


def _model(name: str, data: Path) -> nn.Module:
    if name.startswith("cifar_"):
        weights = data / "cifar10" / f"{name.removeprefix('cifar_')}.safetensors"
        return models.create(name, num_classes=10, weights=str(weights)).eval()
    return models.create(name, weights="pretrained").eval()


def make_case(task_name: str, model_name: str, seed: int, args) -> Case:
    """Load, split (calibration 2%, search, held-out), calibrate, and run the uncompressed
    model once on the held-out images."""
    began = time.perf_counter()
    task = TASKS[task_name]
    if task.classes is not None:
        resolve_task(classes=task.classes)  # refuses a single-class task
    root = (args.data / "cifar10" / "test" if task.dataset == "cifar10"
            else args.data / "imagenet-val1300" / "images")
    images, labels = _images(root, model_name)
    chosen = (torch.arange(len(labels)) if task.classes is None
              else torch.nonzero(torch.isin(labels, torch.tensor(task.classes))).flatten())
    items, targets = chosen.tolist(), labels[chosen].tolist()
    total = len(items)
    search_fraction = min(0.3, args.max_search / total)
    parts = split(items, {"calibration": 0.02, "search": search_fraction, "heldout": None},
                  seed=seed, labels=targets)
    heldout = parts["heldout"][: args.max_heldout]  # a prefix of a stratified order
    model = _model(model_name, args.data)
    calibration = torch.as_tensor(parts["calibration"])
    stats = velcro.calibrate(model, [images[calibration[i : i + 100]]
                                     for i in range(0, len(calibration), 100)], progress=False)
    search_ids = torch.as_tensor(parts["search"])
    batches = [(images[search_ids[i : i + 100]], labels[search_ids[i : i + 100]])
               for i in range(0, len(search_ids), 100)]
    held = torch.as_tensor(heldout)
    classes = len(set(targets))
    counts = {"task_images": total, "classes": classes, **{k: len(v) for k, v in parts.items()},
              "heldout": len(heldout),
              "calibration_covers_classes": len({labels[i].item() for i in parts["calibration"]})}
    return Case(task_name, model_name, seed, model, stats, batches, images[held], labels[held],
                protocol.logits_of(model, images[held]), counts, args.schedule,
                time.perf_counter() - began)


def _outputs(case: Case, plan) -> tuple[torch.Tensor, dict]:
    """Held-out logits of the plan's model (trimmed for channel plans) and its costs."""
    example = case.heldout[:1]
    if plan.granularity == "element":
        costs = measure_costs(case.model, plan, example, latency=False)
        saved = 1 - costs["compressed"]["macs"] / costs["original"]["macs"]
        return protocol.logits_of(velcro.apply(case.model, plan), case.heldout), {
            "element_macs_saved": saved, "macs_saved": None, "parameters_saved": 0.0}
    try:
        small = velcro.trim(case.model, plan)
    except VelcroError as exc:  # a model trim cannot handle yet: the masked model, no costs
        return protocol.logits_of(velcro.apply(case.model, plan), case.heldout), {
            "macs_saved": None, "parameters_saved": None, "trim_error": str(exc)}
    if case.trimmed_cost is None:
        # against the model trimmed with nothing removed: batch norms folded either way, so
        # the figures count the filters removed, not the folding
        empty = velcro.plan(case.stats, 0.0, granularity="channel")
        case.trimmed_cost = cost(velcro.trim(case.model, empty), example)
    reduction = case.trimmed_cost.reduction(cost(small, example))
    return protocol.logits_of(small, case.heldout), {
        "macs_saved": reduction["macs"], "parameters_saved": reduction["parameters"]}


def _heldout(case: Case, outputs: torch.Tensor) -> dict:
    figures = protocol.paired(case.reference, outputs, case.labels)
    return {**figures, "holds": protocol.holds(figures)}


def curve_row(case: Case, thresholds) -> dict:
    """Uniform thresholds, both granularities, on the held-out images."""
    points = []
    for granularity in ("element", "channel"):
        for threshold in thresholds:
            plan = velcro.plan(case.stats, threshold, granularity=granularity)
            outputs = protocol.logits_of(velcro.apply(case.model, plan, check=False),
                                         case.heldout)
            compressed, zeros = zero_elements(plan)
            points.append({"granularity": granularity, "threshold": threshold,
                           "saving_ratio": plan.saving_ratio,
                           "zero_share": zeros / compressed if compressed else None,
                           **_heldout(case, outputs)})
    return {"points": points, "baseline_accuracy": points[0]["baseline_accuracy"]}


def velcro_row(case: Case, method, plans: Path) -> dict:
    score = {"l1": lambda: filter_norm_score(case.model),
             "random": lambda: random_score(case.seed)}.get(method.score, lambda: "variance")()
    schedule = SCHEDULES["uniform" if method.schedule == "uniform" else case.schedule]
    found = search(case.model, case.stats, case.search, granularity=method.granularity,
                   score=score, constant=method.constant, schedule=schedule, progress=False,
                   **method.settings)
    outputs, costs = _outputs(case, found.plan)
    compressed, zeros = zero_elements(found.plan)
    path = []
    for point in found.path if method.score == "variance" else []:
        logits = (outputs if point["chosen"] else protocol.logits_of(
            velcro.apply(case.model, point["plan"], check=False), case.heldout))
        path.append({"saving_ratio": point["plan"].saving_ratio, "passed": point["passed"],
                     "chosen": point["chosen"], **_heldout(case, logits)})
    if method.granularity == "channel":
        plans.mkdir(parents=True, exist_ok=True)
        found.plan.save(plans / f"{case.task}-{case.model_name}-{case.seed}-{method.name}"
                                ".plan.json")
    check = found.check or {}
    return {"saving_ratio": found.saving_ratio,
            "searched_saving_ratio": found.settings["searched_saving_ratio"],
            "evaluations": found.evaluations, "search_seconds": found.wall_time_s,
            "search_images": found.search_images, "check_images": check.get("images", 0),
            "backed_off": check.get("backed_off"), "search_accuracy": found.search_accuracy,
            "search_baseline": found.baseline_accuracy, "settings": method.settings,
            "thresholds": found.thresholds,
            "zero_share": zeros / compressed if compressed else None, **costs,
            "heldout": _heldout(case, outputs), "path": path}


def torch_pruning_row(case: Case, method) -> dict:
    """Torch-Pruning's one ratio, chosen by the same guard and nested check as velcro."""
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return {"error": "torch-pruning is not installed (pip install torch-pruning)"}
    settings = method.settings
    guard = Guard(settings["criterion"], settings["tolerance"], settings["confidence"])
    parts = {"search": case.search, "check": []}
    if settings["check_fraction"] > 0:
        parts["search"], parts["check"], _ = split_check(case.search,
                                                         settings["check_fraction"])
    data = {name: (torch.cat([x for x, _ in b]), torch.cat([y for _, y in b]))
            for name, b in parts.items() if b}
    reference = {name: protocol.logits_of(case.model, x) for name, (x, _) in data.items()}
    example = case.heldout[:1]
    pruned: dict = {}

    keep = (protocol.residual_convolutions(case.model)
            if case.model_name.startswith("cifar_") else [])

    def model_at(ratio: float):
        if ratio not in pruned:
            pruned[ratio] = protocol.magnitude_pruned(case.model, ratio, example, keep=keep)
        return pruned[ratio]

    def measure(ratio: float, part: str):
        images, labels = data[part]
        return compare_outputs(reference[part], protocol.logits_of(model_at(ratio), images),
                               labels)

    levels = [level for level in SCHEDULES[case.schedule].uniform_levels if level < 1.0]
    began = time.perf_counter()
    try:
        ratio, log = protocol.guarded_ratio(levels, measure, guard,
                                            SCHEDULES[case.schedule].uniform_patience,
                                            check=bool(parts["check"]))
        chosen = model_at(ratio)
        reduction = cost(case.model, example).reduction(cost(chosen, example))
    except Exception as exc:  # noqa: BLE001 - Torch-Pruning's failures are many; record it
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"ratio": ratio, "saving_ratio": None, "macs_saved": reduction["macs"],
            "kept_whole": keep,
            "parameters_saved": reduction["parameters"], "evaluations": len(log),
            "search_seconds": time.perf_counter() - began, "settings": settings,
            "heldout": _heldout(case, protocol.logits_of(chosen, case.heldout))}


def latency_pass(results: Path, args) -> None:
    """Time the trimmed models of the stored channel plans at batch 1 and 32 (run it on a
    quiet machine: the timings are medians of interleaved runs, and ratios of them)."""
    document = json.loads(results.read_text())
    rows = [r for r in document["rows"] if r["method"] in ("velcro-channel", "today-channel")]
    for row in rows:
        path = (args.out / "plans" /
                f"{row['task']}-{row['model']}-{row['seed']}-{row['method']}.plan.json")
        if not path.is_file():
            continue
        model = _model(row["model"], args.data)
        plan = velcro.Plan.load(path)
        shape = models.preprocess_for(row["model"]).crop_size
        latency = {}
        for batch in (1, 32):
            example = torch.randn(batch, 3, *shape, generator=torch.Generator().manual_seed(0))
            costs = measure_costs(model, plan, example, latency=True, repeats=21)
            latency[str(batch)] = costs.get("latency_ms")
        row["latency_ms"] = latency
        row["latency_code"] = (f"velcro.report.measure_costs(latency=True, repeats=21): eager "
                               f"float32, original and trimmed interleaved, medians; "
                               f"{torch.get_num_threads()} torch threads")
        results.write_text(json.dumps(document, indent=1) + "\n")

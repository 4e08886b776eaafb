"""`velcro search`: per-site thresholds found on the split's search set, checked on validation."""

from __future__ import annotations

import argparse
from pathlib import Path

from velcro._format import objective_label, plural, points
from velcro._io import atomic_group
from velcro.cli import _common as common
from velcro.cli import _values as values
from velcro.cli._files import Files, recorded_split
from velcro.cli._shapes import check_sites_fit
from velcro.distributed import is_main
from velcro.errors import VelcroError
from velcro.plan import GRANULARITIES
from velcro.search import CRITERIA, DEFAULTS, OBJECTIVES, SearchSchedule, search, validate
from velcro.search._criteria import UNITS, check_settings
from velcro.stats import Stats

DESCRIPTION = f"""\
Find the per-site thresholds that maximise the compression-saving ratio C (or the MACs saved)
while the loss under --criterion on the split's search images stays within --tolerance, with
a one-sided paired confidence bound at --confidence. A part of the search images
(--check-fraction) is held back: the plan is checked on it and backs off along the search's
trajectory if it fails. The validation images are used afterwards, for the report only
(the plan's top-1 and agreement, and the trade-off of C against the loss on them).
Writes the plan, a JSON summary (NAME.search.json) and a report (NAME.report.html + .md).

Defaults: --criterion {DEFAULTS["criterion"]} --tolerance {DEFAULTS["tolerance"]} \
--confidence {DEFAULTS["confidence"]} --check-fraction {DEFAULTS["check_fraction"]}.
The search before these guards: --criterion accuracy --tolerance 0 --confidence none
--check-fraction 0 (it keeps search top-1 and loses it on images it never saw).

The split must hold a search set: calibrate with --search-fraction, e.g.
  velcro calibrate imagenet/val --task cats --class-list LOC_synset_mapping.txt \\
      --model resnet18 --weights resnet18-f37072fd.pth --search-fraction 0.2 \\
      -o cats.stats.safetensors

example:
  velcro search --stats cats.stats.safetensors --model resnet18 \\
      --weights resnet18-f37072fd.pth --granularity channel -o cats.plan.json
"""


def _confidence(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.5 <= value < 1.0:
        raise argparse.ArgumentTypeError(
            f"--confidence '{text}' is not a level in [0.5, 1) such as 0.9, nor 'none'")
    return value


def _check_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(
            f"--check-fraction '{text}' is not a fraction in [0, 1) such as 0.25 (0: no check)")
    return value


def add_parser(subparsers) -> None:
    parser = common.new_parser(
        subparsers, "search", help="search thresholds at no accuracy loss (plan + report)",
        description=DESCRIPTION)
    common.add_data_options(parser, split_help="the split with the search and validation sets "
                                               "(default: the one recorded in --stats)")
    common.add_model_options(parser)
    group = parser.add_argument_group("search")
    group.add_argument("--stats", required=True, metavar="FILE",
                       help="statistics from `velcro calibrate`")
    group.add_argument("--granularity", default="element", choices=GRANULARITIES,
                       help="element (VELCRO) or channel (S-VELCRO); default element")
    group.add_argument("--criterion", default=DEFAULTS["criterion"], choices=CRITERIA,
                       help="what the plan must keep: accuracy (top-1 against the labels), "
                            "agreement (share of top-1 predictions unchanged; no labels "
                            "needed) or kl (mean KL divergence of the softmax); default "
                            f"{DEFAULTS['criterion']}")
    group.add_argument("--tolerance", type=float, default=DEFAULTS["tolerance"], metavar="F",
                       help="loss allowed under --criterion: a fraction of the images for "
                            "accuracy and agreement (0.01 = one point), nats for kl "
                            f"(default {DEFAULTS['tolerance']})")
    group.add_argument("--confidence", type=_confidence, default=DEFAULTS["confidence"],
                       metavar="C", help="one-sided confidence of the bound on the loss that "
                       "must stay within --tolerance, or 'none' for the point estimate "
                       f"(default {DEFAULTS['confidence']})")
    group.add_argument("--check-fraction", type=_check_fraction,
                       default=DEFAULTS["check_fraction"], metavar="F",
                       help="share of the search images held back to check the plan (0: no "
                            f"check; default {DEFAULTS['check_fraction']})")
    group.add_argument("--objective", default="saving_ratio", choices=OBJECTIVES,
                       help="what to maximise (default saving_ratio, the papers' C)")
    group.add_argument("--budget", type=values.POSITIVE, default=None, metavar="N",
                       help="at most N candidate evaluations (default: the schedule's length)")
    group.add_argument("--levels", type=values.LEVELS, default=8, metavar="N",
                       help="profile levels per site (default 8)")
    group.add_argument("--refine-rounds", type=values.REFINE_ROUNDS, default=3, metavar="N",
                       help="refinement rounds (default 3)")
    group.add_argument("--constant", default="map", choices=("map", "scalar", "affine"),
                       help="channel constant: the mean map (default), one scalar per "
                            "channel, or affine: predicted from the site's kept channels "
                            "(stats from calibrate --covariance; the ridge is chosen on the "
                            "search images, and mean maps are kept if they save more)")
    group.add_argument("--ridge", type=float, default=None, metavar="R",
                       help="affine: fix the ridge strength instead (inf: the mean)")
    group = parser.add_argument_group("output")
    group.add_argument("-o", "--output", required=True, metavar="PLAN",
                       help="plan file to write (.json); the summary and report go beside it")
    group.add_argument("--no-report", action="store_true", help="write no HTML/Markdown report")
    group.add_argument("--latency", action="store_true",
                       help="time the uncompressed and trimmed models for the report")
    group.add_argument("--no-tradeoff", action="store_true",
                       help="measure only the chosen plan on the validation images, not the "
                            "other plans of the back-off path (the report's trade-off)")
    common.add_runtime_options(parser)
    parser.set_defaults(run=run, preflight=preflight)


def _outputs(plan_path: Path, report: bool) -> tuple[Path, ...]:
    """The summary and report written beside the plan: NAME.search.json, NAME.report.*."""
    base = common.output_base(plan_path)
    names = [".search.json", *([".report.html", ".report.md"] if report else [])]
    return tuple(base.with_name(base.name + suffix) for suffix in names)


def preflight(args: argparse.Namespace) -> Files:
    """The options checked before any work, and the files read and written."""
    common.check_data_options(args)
    files = Files()
    files.read_model(args)
    files.read("--stats", args.stats)
    if not args.split:  # the split the statistics record is read too
        recorded = recorded_split(args.stats)
        files.read("--stats (the split it records)", recorded)
        files.read_data(argparse.Namespace(**{**vars(args), "split": recorded}))
    else:
        files.read_data(args)
    files.write("--output", args.output, tensors=True)
    for path in _outputs(Path(args.output), report=not args.no_report):
        files.write("--output", path)
    return files


def run(args: argparse.Namespace) -> int:
    plan_path = common.check_output(args.output, "--output")
    summary_path, report_path = _outputs(plan_path, report=True)[:2]
    try:
        check_settings(args.criterion, args.tolerance, args.confidence)
    except VelcroError as exc:
        raise VelcroError(f"--tolerance/--confidence: {exc}") from None
    stats = Stats.load(args.stats)
    if not args.split:
        args.split = stats.info.get("split")
        if not args.split:
            raise VelcroError("give --split FILE (with a search set); --stats records none")
    device = common.resolve_device(args.device)
    model = common.load_model(args, device)
    common.named("--stats", args.stats, stats.check_model, model)
    data = common.open_task_data(args, [(f"--stats '{args.stats}'", stats)])
    if "search" not in data.split.sets:
        raise VelcroError(f"split '{args.split}' has no search set; calibrate with "
                          "--search-fraction (e.g. 0.2) to carve one from the non-validation "
                          "images")
    search_folder = data.folder.subset(data.split["search"])
    check_sites_fit(model, {name: site.shape for name, site in stats.sites.items()},
                    search_folder, "--stats", args.stats)
    show = common.progress(args)
    task_classes = data.classes or data.folder.classes
    search_loader = common.make_loader(search_folder, args, device)
    validation_loader = common.make_loader(data.folder.subset(data.split["validation"]), args,
                                           device)
    result = search(model, stats, search_loader, granularity=args.granularity,
                    criterion=args.criterion, tolerance=args.tolerance,
                    confidence=args.confidence, check_fraction=args.check_fraction,
                    objective=args.objective, budget=args.budget,
                    constant=args.constant, ridge=args.ridge,
                    schedule=SearchSchedule(levels=args.levels,
                                            refine_rounds=args.refine_rounds),
                    progress=show)
    validate(result, model, validation_loader,
             search_ids=[path for path, _ in data.split["search"]],
             validation_ids=[path for path, _ in data.split["validation"]],
             tradeoff=not args.no_tradeoff, progress=show)
    if not is_main():  # under torchrun: the ranks shared the evaluations; rank 0 reports
        return 0
    result.plan.info.update({"stats": str(args.stats), "split": str(args.split),
                             **common.carried_info(stats)})
    costs = None
    example = next(iter(validation_loader))[0][: args.batch_size].to(device)
    try:
        from velcro.report import measure_costs

        costs = measure_costs(model, result.plan, example, latency=args.latency)
    except VelcroError as exc:  # e.g. a model trimming cannot handle: report without costs
        common.note(f"costs not measured: {exc}")
    run_info = {
        "command": "search", **common.model_info(args), "task": data.task,
        "classes": task_classes, "stats": str(args.stats), "split": str(args.split),
        **data.record(),
        "splits": {**data.split.counts(), "calibration (statistics)": stats.count},
        "plan": str(plan_path), "cost": costs,
    }
    document = {**run_info, **result.to_dict()}
    written = [plan_path, summary_path]
    with atomic_group():  # the plan, its summary and its report appear together
        result.plan.save(plan_path)
        common.write_json(summary_path, document)
        if not args.no_report:
            from velcro.report import write_report

            paths = write_report({**run_info, "splits": data.split.counts(),
                                  "plan": result.plan, "stats": stats, "search": result},
                                 report_path)
            written += [paths["html"], paths["markdown"]]

    validation = result.validation
    bound = ("point estimate" if args.confidence is None
             else f"{100 * args.confidence:g}% upper bound")
    tolerance = (f"{args.tolerance:g}" if args.criterion == "kl"
                 else common.percent(args.tolerance))
    lines = [
        f"{result.granularity} search on {plural(result.search_images, 'search image')}: "
        f"C = {common.percent(result.saving_ratio)} in "
        f"{plural(result.evaluations, 'evaluation')} "
        f"({result.wall_time_s:.1f} s)",
        f"objective (maximised): {objective_label(result.objective)} "
        f"{common.percent(result.objective_value)}",
        f"criterion {args.criterion}: {bound} of the loss within {tolerance} "
        f"{UNITS[args.criterion]}",
    ]
    if result.check is not None:
        check = result.check
        searched = common.percent(result.settings["searched_saving_ratio"])
        verdict = ("kept" if not check["backed_off"] else
                   f"failed; backed off to C = {common.percent(result.saving_ratio)}")
        lines.append(f"check on {plural(check['images'], 'held-back search image')}: "
                     f"searched C = {searched} {verdict}")
    if result.search_accuracy is not None:
        lines.append(f"search top-1 {common.percent(result.baseline_accuracy)} -> "
                     f"{common.percent(result.search_accuracy)}")
    paired = validation["paired"]
    lines += [
        f"validation top-1 {common.percent(validation['baseline']['accuracy'])} -> "
        f"{common.percent(validation['compressed']['accuracy'])} "
        f"({points(paired['difference'])}, 95% CI [{points(paired['ci95'][0])}, "
        f"{points(paired['ci95'][1])}]), top-1 agreement "
        f"{common.percent(validation['agreement'])}, on "
        f"{plural(validation['images'], 'image')} never searched on",
        *data.lines(),
        *[f"wrote {path}" for path in written],
    ]
    if costs is not None:
        saved = 1 - costs["compressed"]["macs"] / max(1, costs["original"]["macs"])
        lines.insert(len(lines) - len(written),
                     f"MACs saved by the trimmed model: {common.percent(saved)}"
                     if costs.get("saved_by") == "trimmed model" else
                     f"MACs saved with hardware that skips single outputs: "
                     f"{common.percent(saved)} (run densely, an element plan saves none)")
    common.emit(args, {**document, "trajectory": len(result.trajectory)}, lines)
    return 0

"""`velcro search`: per-site thresholds found on the split's search set, checked on validation."""

from __future__ import annotations

import argparse

from velcro.cli import _common as common
from velcro.distributed import is_main
from velcro.errors import VelcroError
from velcro.plan import GRANULARITIES
from velcro.search import OBJECTIVES, SearchSchedule, search, validate
from velcro.stats import Stats

DESCRIPTION = """\
Find the per-site thresholds that maximise the compression-saving ratio C (or the MACs saved)
while top-1 on the split's search images stays within --tolerance of the uncompressed model's.
The validation images are used once, afterwards, and reported beside the search accuracy.
Writes the plan, a JSON summary (NAME.search.json) and a report (NAME.report.html + .md).

The split must hold a search set: calibrate with --search-fraction, e.g.
  velcro calibrate imagenet/val --task cats --class-list LOC_synset_mapping.txt \\
      --model resnet18 --weights resnet18-f37072fd.pth --search-fraction 0.2 \\
      -o cats.stats.safetensors

example:
  velcro search --stats cats.stats.safetensors --model resnet18 \\
      --weights resnet18-f37072fd.pth --granularity channel --tolerance 0 -o cats.plan.json
"""


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
    group.add_argument("--tolerance", type=float, default=0.0, metavar="F",
                       help="top-1 loss allowed on the search images, as a fraction "
                            "(0.01 = one point; default 0)")
    group.add_argument("--objective", default="saving_ratio", choices=OBJECTIVES,
                       help="what to maximise (default saving_ratio, the papers' C)")
    group.add_argument("--budget", type=int, default=None, metavar="N",
                       help="at most N candidate evaluations (default: the schedule's length)")
    group.add_argument("--levels", type=int, default=8, metavar="N",
                       help="profile levels per site (default 8)")
    group.add_argument("--refine-rounds", type=int, default=3, metavar="N",
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
    common.add_runtime_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    plan_path = common.check_output(args.output, "--output")
    base = common.output_base(plan_path)
    summary_path = base.with_name(base.name + ".search.json")
    report_path = base.with_name(base.name + ".report.html")
    if args.tolerance < 0 or args.tolerance > 1:
        raise VelcroError(f"--tolerance {args.tolerance} is out of range; give a fraction "
                          "in [0, 1]")
    stats = Stats.load(args.stats)
    if not args.split:
        args.split = stats.info.get("split")
        if not args.split:
            raise VelcroError("give --split FILE (with a search set); --stats records none")
    device = common.resolve_device(args.device)
    model = common.load_model(args, device)
    common.named("--stats", args.stats, stats.check_model, model)
    data = common.open_task_data(args)
    if "search" not in data.split.sets:
        raise VelcroError(f"split '{args.split}' has no search set; calibrate with "
                          "--search-fraction (e.g. 0.2) to carve one from the non-validation "
                          "images")
    show = common.progress(args)
    task_classes = data.classes or data.folder.classes
    search_loader = common.make_loader(data.folder.subset(data.split["search"]), args, device)
    validation_loader = common.make_loader(data.folder.subset(data.split["validation"]), args,
                                           device)
    result = search(model, stats, search_loader, granularity=args.granularity,
                    tolerance=args.tolerance, objective=args.objective, budget=args.budget,
                    constant=args.constant, ridge=args.ridge,
                    schedule=SearchSchedule(levels=args.levels,
                                            refine_rounds=args.refine_rounds),
                    progress=show)
    validate(result, model, validation_loader,
             search_ids=[path for path, _ in data.split["search"]],
             validation_ids=[path for path, _ in data.split["validation"]], progress=show)
    if not is_main():  # under torchrun: the ranks shared the evaluations; rank 0 reports
        return 0
    result.plan.info.update({"stats": str(args.stats), "split": str(args.split)})
    result.plan.save(plan_path)

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
        "splits": {**data.split.counts(), "calibration (statistics)": stats.count},
        "plan": str(plan_path), "cost": costs,
    }
    document = {**run_info, **result.to_dict()}
    common.write_json(summary_path, document)
    written = [plan_path, summary_path]
    if not args.no_report:
        from velcro.report import write_report

        paths = write_report({**run_info, "splits": data.split.counts(), "plan": result.plan,
                              "stats": stats, "search": result}, report_path)
        written += [paths["html"], paths["markdown"]]

    validation = result.validation
    lines = [
        f"{result.granularity} search on {result.search_images} search images: "
        f"C = {common.percent(result.saving_ratio)} in {result.evaluations} evaluations "
        f"({result.wall_time_s:.1f} s)",
        f"search top-1 {common.percent(result.baseline_accuracy)} -> "
        f"{common.percent(result.search_accuracy)} (tolerance {common.percent(args.tolerance)})",
        f"validation top-1 {common.percent(validation['baseline']['accuracy'])} -> "
        f"{common.percent(validation['compressed']['accuracy'])} on {validation['images']} "
        "images never searched on",
        *[f"wrote {path}" for path in written],
    ]
    if costs is not None:
        saved = 1 - costs["compressed"]["macs"] / max(1, costs["original"]["macs"])
        lines.insert(3, f"MACs saved {common.percent(saved)}")
    common.emit(args, {**document, "trajectory": len(result.trajectory)}, lines)
    return 0

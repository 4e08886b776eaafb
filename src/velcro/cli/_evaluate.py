"""`velcro evaluate`: top-1 of the original and the compressed model on the same images."""

from __future__ import annotations

import argparse
from pathlib import Path

import velcro
from velcro._format import plural, points
from velcro.apply import check_plan_fits
from velcro.cli import _common as common
from velcro.cli._files import Files
from velcro.cli._shapes import check_input_fits, check_sites_fit
from velcro.errors import VelcroError
from velcro.plan import Plan

DESCRIPTION = """\
Top-1 accuracy over all of the model's classes (the papers' protocol) and restricted to the
task's classes, per class, with 95% intervals. With --plan, the model with the plan applied
(or trimmed) is evaluated on the same images as the model without it and the paired
difference is reported. With --split, the split's validation images are used (those
calibration never saw) and the task comes from it. The images are preprocessed as the plan
(else the split) records that calibration saw them, else as the model's weights expect; an
option that differs from the recorded setting is refused (--force-preprocess overrides).
Rows are named by what they are: the model (its registry name or file stem) and "with
plan"; in --json, "evaluated" and "with_plan".

example:
  velcro evaluate --split cats.stats.split.json --model resnet18 \\
      --weights resnet18-f37072fd.pth --plan cats.plan.json -o cats.eval.json
"""


def add_parser(subparsers) -> None:
    parser = common.new_parser(
        subparsers, "evaluate", help="top-1 accuracy, original vs compressed",
        description=DESCRIPTION)
    common.add_data_options(parser, split_help="evaluate on a set of this split (from "
                                               "`velcro calibrate`); its task is the default")
    parser.add_argument("--subset", default="validation", metavar="NAME",
                        help="which set of --split to evaluate on (default validation)")
    common.add_model_options(parser)
    parser.add_argument("--plan", metavar="FILE", help="evaluate the model compressed by this "
                                                       "plan, beside the original")
    parser.add_argument("--trim", action="store_true",
                        help="evaluate the trimmed model (channel plans) instead of the "
                             "reference constant replacement")
    parser.add_argument("--no-baseline", action="store_true",
                        help="with --plan, skip evaluating the original model")
    parser.add_argument("-o", "--output", metavar="FILE", help="write the results as JSON")
    common.add_runtime_options(parser)
    parser.set_defaults(run=run, preflight=preflight)


def preflight(args: argparse.Namespace) -> Files:
    """The options checked before any work, and the files read and written."""
    common.check_data_options(args)
    files = Files()
    files.read_model(args)
    files.read_data(args)
    files.read("--plan", args.plan, tensors=True)
    files.write("--output", args.output)
    return files


def model_label(spec: str) -> str:
    """What the evaluated model is called: ``cats.trimmed`` for ``cats.trimmed.json``, the
    registry name or ``MODULE:FACTORY`` otherwise (never "original": a trimmed file is not)."""
    return Path(spec).name.removesuffix(".json") if spec.endswith(".json") else spec


def _report_line(label: str, report, width: int) -> str:
    low, high = report.ci95
    line = (f"{label:>{width}}: top-1 {common.percent(report.accuracy)} "
            f"[{common.percent(low)}, {common.percent(high)}] on "
            f"{plural(report.images, 'image')}")
    if report.task_accuracy is not None:
        line += f"; within task classes {common.percent(report.task_accuracy)}"
    return line


def run(args: argparse.Namespace) -> int:
    out = common.check_output(args.output, "--output") if args.output else None
    if args.trim and not args.plan:
        raise VelcroError("--trim needs --plan FILE (a channel plan)")
    if args.no_baseline and not args.plan:
        raise VelcroError("--no-baseline needs --plan: without a plan the original model is "
                          "all there is to evaluate")
    device = common.resolve_device(args.device)
    model = common.load_model(args, device)
    plan = None
    if args.plan:
        plan = Plan.load(args.plan)
        common.named("--plan", args.plan, check_plan_fits, model, plan)
        if args.trim and plan.granularity != "channel":
            raise VelcroError(f"--trim needs a channel plan; '{args.plan}' is an element plan")
    recorded = [(f"--plan '{args.plan}'", plan)] if plan is not None else []
    data = common.open_task_data(args, recorded)
    folder = data.folder
    subset = None
    if data.split is not None:
        subset = args.subset
        folder = folder.subset(data.split[subset])
    elif args.subset != "validation":
        raise VelcroError("--subset needs --split FILE")
    if plan is not None:  # the plan's constants have its images' shape: check one image now
        check_sites_fit(model, {name: site.shape for name, site in plan.sites.items()},
                        folder, "--plan", args.plan)
    check_input_fits(model, folder, "--model", args.model)  # a trimmed model's size
    fixed = plan is not None or getattr(model, "velcro_input_shape", None) is not None
    loader = common.make_loader(folder, args, device, same_size=fixed)
    task_classes = data.classes or folder.classes
    show = common.progress(args)

    def run_on(candidate, desc):
        report = velcro.evaluate(candidate, loader, task_classes=task_classes,
                                 max_images=args.max_images, progress=show)
        report.info["model"] = desc
        return report

    reports, labels = {}, {}
    if plan is None or not args.no_baseline:
        # the model as given (a trimmed file too), without any --plan
        labels["evaluated"] = model_label(args.model)
        reports["evaluated"] = run_on(model, labels["evaluated"])
    if plan is not None:
        compressed = (common.velcro_api("trim")(model, plan) if args.trim
                      else velcro.apply(model, plan, check=False))
        labels["with_plan"] = "with plan, trimmed" if args.trim else "with plan"
        reports["with_plan"] = run_on(compressed, labels["with_plan"])

    first = next(iter(reports.values()))
    skipped = loader.skipped_list()
    summary = {
        "command": "evaluate", **common.model_info(args), "data": str(folder.root.resolve()),
        "split": args.split, "subset": subset, "task": data.task, "classes": task_classes,
        "images": first.images, **data.record(), "skipped": skipped,
        **{name: report.to_dict() for name, report in reports.items()},
    }
    lines = [f"{data.task or 'all folders'}: {plural(first.images, 'image')}"
             + (f" ({subset} set of {args.split})" if subset else ""), *data.lines()]
    width = max(len(label) for label in labels.values())
    lines += [_report_line(labels[key], report, width) for key, report in reports.items()]
    if plan is not None:
        summary["plan"] = {"file": args.plan, "granularity": plan.granularity,
                           "saving_ratio": plan.saving_ratio, "trimmed": args.trim}
        lines.append(f"plan {args.plan}: {plan.granularity}, C = "
                     f"{common.percent(plan.saving_ratio)}")
        if "evaluated" in reports:
            paired = reports["with_plan"].paired_difference(reports["evaluated"])
            summary["difference"] = paired
            low, high = paired["ci95"]
            lines.append(f"change with the plan: {points(paired['difference'])} "
                         f"[{points(low)}, {points(high)}] (paired); "
                         f"{plural(paired['gained'], 'image')} right only with it, "
                         f"{plural(paired['lost'], 'image')} right only without")
    lines += common.skipped_lines(skipped)
    if out is not None:
        common.write_json(out, summary)
        lines.append(f"wrote {out}")
    common.emit(args, summary, lines)
    return 0

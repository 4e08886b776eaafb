"""`velcro evaluate`: top-1 of the original and the compressed model on the same images."""

from __future__ import annotations

import argparse

import velcro
from velcro.apply import check_plan_fits
from velcro.cli import _common as common
from velcro.cli._files import Files
from velcro.cli._shapes import check_input_fits, check_sites_fit
from velcro.errors import VelcroError
from velcro.plan import Plan

DESCRIPTION = """\
Top-1 accuracy over all of the model's classes (the papers' protocol) and restricted to the
task's classes, per class, with 95% intervals. With --plan, the compressed model is evaluated
on the same images as the original and the paired difference is reported. With --split, the
split's validation images are used (those calibration never saw) and the task comes from it.

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


def _report_line(label: str, report) -> str:
    low, high = report.ci95
    line = (f"{label:>10}: top-1 {common.percent(report.accuracy)} "
            f"[{common.percent(low)}, {common.percent(high)}] on {report.images} images")
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
    data = common.open_task_data(args)
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

    reports = {}
    if plan is None or not args.no_baseline:
        # "original": the model as given (a trimmed file too), before any --plan
        reports["original"] = run_on(model, "original")
    if plan is not None:
        compressed = (common.velcro_api("trim")(model, plan) if args.trim
                      else velcro.apply(model, plan, check=False))
        reports["compressed"] = run_on(compressed, "trimmed" if args.trim else "applied")

    first = next(iter(reports.values()))
    skipped = loader.skipped_list()
    summary = {
        "command": "evaluate", **common.model_info(args), "data": str(folder.root.resolve()),
        "split": args.split, "subset": subset, "task": data.task, "classes": task_classes,
        "images": first.images, "skipped": skipped,
        **{name: report.to_dict() for name, report in reports.items()},
    }
    lines = [f"{data.task or 'all folders'}: {first.images} images"
             + (f" ({subset} set of {args.split})" if subset else "")]
    lines += [_report_line(name, report) for name, report in reports.items()]
    if plan is not None:
        summary["plan"] = {"file": args.plan, "granularity": plan.granularity,
                           "saving_ratio": plan.saving_ratio, "trimmed": args.trim}
        lines.append(f"plan {args.plan}: {plan.granularity}, C = "
                     f"{common.percent(plan.saving_ratio)}")
        if "original" in reports:
            paired = reports["compressed"].paired_difference(reports["original"])
            summary["difference"] = paired
            low, high = paired["ci95"]
            lines.append(f"difference: {100 * paired['difference']:+.2f} points "
                         f"[{100 * low:+.2f}, {100 * high:+.2f}]; {paired['gained']} images "
                         f"gained, {paired['lost']} lost")
    lines += common.skipped_lines(skipped)
    if out is not None:
        common.write_json(out, summary)
        lines.append(f"wrote {out}")
    common.emit(args, summary, lines)
    return 0

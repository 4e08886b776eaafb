"""`velcro compress`: statistics + thresholds -> a plan; optionally a trimmed model."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import velcro
from velcro._format import plural
from velcro._io import atomic_group
from velcro.apply import check_plan_fits
from velcro.cli import _common as common
from velcro.cli._files import Files
from velcro.errors import VelcroError
from velcro.plan import CONSTANTS, DEFAULT_RIDGE, GRANULARITIES, SCORES, Plan, resolve_thresholds
from velcro.stats import Stats

DESCRIPTION = """\
Choose, per activation site, the given fraction of units with the lowest variance and
replace them by their means (VELCRO: --granularity element; S-VELCRO: channel). Writes the
plan (readable JSON + tensors) and a report beside it (NAME.report.html + .md); with --trim
also the trimmed model (filters removed).

thresholds: one fraction for every site (0.3), one per site in site order (0.1,0.2,...),
or a JSON file mapping site name -> fraction (sites left out keep 0).

examples:
  velcro compress --stats cats.stats.safetensors --thresholds 0.3 -o cats.plan.json
  velcro compress --stats cats.stats.safetensors --thresholds 0.3 --granularity channel \\
      --model resnet18 --weights resnet18-f37072fd.pth -o cats.plan.json \\
      --trim cats.trimmed.json
"""


def add_parser(subparsers) -> None:
    parser = common.new_parser(
        subparsers, "compress", help="thresholds -> plan (and a trimmed model)",
        description=DESCRIPTION)
    parser.add_argument("--stats", metavar="FILE", help="statistics from `velcro calibrate`")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--thresholds", metavar="T",
                        help="a fraction, a comma list in site order, or a JSON file")
    source.add_argument("--plan", metavar="FILE", help="use this plan instead (with --trim)")
    parser.add_argument("--granularity", default="element", choices=GRANULARITIES,
                        help="element (VELCRO) or channel (S-VELCRO); default element")
    parser.add_argument("--score", default="variance", choices=SCORES,
                        help="channel ranking: variance, relative (variance / mean^2) or "
                             "residual (variance left after the prediction from the kept "
                             "channels; stats from calibrate --covariance)")
    parser.add_argument("--constant", default="map", choices=CONSTANTS,
                        help="channel constant: the mean map, one scalar per channel, or "
                             "affine: predicted from the site's kept channels (stats from "
                             "calibrate --covariance)")
    parser.add_argument("--ridge", type=float, default=DEFAULT_RIDGE, metavar="R",
                        help="affine constants / residual scores: ridge strength, relative "
                             f"to each channel's variance (default {DEFAULT_RIDGE}; inf: the "
                             "mean); `velcro search --constant affine` chooses it")
    parser.add_argument("-o", "--output", metavar="PLAN", help="plan file to write (.json)")
    parser.add_argument("--trim", metavar="FILE.json",
                        help="also write the trimmed model (JSON + .safetensors beside it, "
                             "loaded without pickle by velcro.load_trimmed or --model "
                             "FILE.json; channel plans; needs --model)")
    parser.add_argument("--no-report", action="store_true",
                        help="write no HTML/Markdown report beside the plan")
    common.add_model_options(parser, required=False)
    common.add_runtime_options(parser, data=False)
    parser.set_defaults(run=run, preflight=preflight)


def preflight(args: argparse.Namespace) -> Files:
    """The files read and written, checked before any work."""
    files = Files()
    files.read_model(args)
    files.read("--stats", args.stats)
    files.read("--plan", args.plan, tensors=True)
    if args.thresholds is not None and Path(args.thresholds.strip()).is_file():
        files.read("--thresholds", args.thresholds.strip())
    files.write("--output", args.output, tensors=True)
    if args.output and not args.no_report:
        base = common.output_base(Path(args.output))
        files.write("--output", base.with_name(base.name + ".report.html"))
        files.write("--output", base.with_name(base.name + ".report.md"))
    files.write("--trim", args.trim, tensors=True)
    return files


def parse_thresholds(text: str, names: list[str]) -> dict[str, float]:
    """``--thresholds`` as one fraction per site: a number, a comma list, or a JSON file."""
    text = text.strip()
    path = Path(text)
    if text.endswith(".json") or path.is_file():
        from velcro._validate import Fields, read_json

        if not path.exists():
            raise VelcroError(f"--thresholds: file '{path}' does not exist")
        value = read_json(path, Fields(path, "--thresholds file", "give a mapping site name "
                                       "-> fraction"))
        if isinstance(value, dict) and isinstance(value.get("thresholds"), (dict, list)):
            value = value["thresholds"]  # e.g. a search result
        if not isinstance(value, (dict, list, int, float)) or isinstance(value, bool):
            raise VelcroError(f"--thresholds: '{path}' holds {type(value).__name__}; give a "
                              "mapping site name -> fraction")
        source = f"'{path}'"
    else:
        try:
            parts = [float(v) for v in text.split(",")]
        except ValueError:
            raise VelcroError(f"--thresholds '{text}' is not a fraction, a comma list of "
                              "fractions, or a JSON file") from None
        value = parts[0] if len(parts) == 1 else parts
        source = f"'{text}'"
    try:
        if isinstance(value, dict):
            bad = [k for k, v in value.items()
                   if not isinstance(v, (int, float)) or isinstance(v, bool)]
            if bad:
                raise VelcroError(f"the value for site '{bad[0]}' is not a number")
        return resolve_thresholds(names, value)
    except VelcroError as exc:
        raise VelcroError(f"--thresholds {source}: {exc}") from None


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _input_shape(stats: Stats | None, trimmed) -> tuple[int, ...] | None:
    """One input's shape: the trimmed model's, or the calibration preprocessing's crop."""
    if trimmed is not None:
        shape = getattr(trimmed, "velcro_input_shape", None)
        if shape:
            return tuple(shape)
    crop = ((stats.info.get("preprocess") or {}).get("crop")) if stats is not None else None
    return (3, *crop) if crop else None


def _write_report(args, plan: Plan, stats: Stats | None, model, trimmed,
                  plan_path: Path) -> list[Path]:
    from velcro.report import measure_costs, write_report

    costs = None
    shape = _input_shape(stats, trimmed) if model is not None else None
    if shape is not None:
        try:
            costs = measure_costs(model, plan, torch.zeros(1, *shape), latency=False)
        except VelcroError as exc:  # a model trimming cannot handle: report without costs
            common.note(f"costs not measured: {exc}")
    info = stats.info if stats is not None else {}
    base = common.output_base(plan_path)
    paths = write_report({
        "command": "compress", **(common.model_info(args) if model is not None else {}),
        "task": info.get("task"), "classes": info.get("classes"), "plan": plan,
        "stats": stats, "cost": costs,
    }, base.with_name(base.name + ".report.html"))
    return [paths["html"], paths["markdown"]]


def run(args: argparse.Namespace) -> int:
    if args.thresholds is not None and not args.stats:
        raise VelcroError("--thresholds needs --stats FILE (from `velcro calibrate`)")
    if args.thresholds is not None and not args.output:
        raise VelcroError("give -o/--output PLAN to write the plan to")
    if args.plan and not args.trim:
        raise VelcroError("--plan is only useful with --trim; give --thresholds to make a plan")
    if args.trim and not args.model:
        raise VelcroError("--trim needs the model: give --model (and --weights)")
    plan_path = common.check_output(args.output, "--output") if args.output else None
    trim_path = common.check_output(args.trim, "--trim") if args.trim else None
    if trim_path is not None and trim_path.suffix.lower() != ".json":
        raise VelcroError(f"--trim {trim_path}: name a .json file (the trimmed model's "
                          "weights go beside it as .json.safetensors)")
    if plan_path and trim_path and plan_path.resolve() == trim_path.resolve():
        raise VelcroError("--trim and --output name the same file; give two names")

    model = common.load_model(args) if args.model else None
    stats = None
    if args.plan:
        plan = Plan.load(args.plan)
        if model is not None:
            common.named("--plan", args.plan, check_plan_fits, model, plan)
    else:
        stats = Stats.load(args.stats)
        if model is not None:
            common.named("--stats", args.stats, stats.check_model, model)
        thresholds = parse_thresholds(args.thresholds, stats.names)
        plan = velcro.plan(stats, thresholds, granularity=args.granularity, score=args.score,
                           constant=args.constant, ridge=args.ridge)
        plan.info.update({**common.carried_info(stats), "stats": str(args.stats),
                          "thresholds_given": args.thresholds})
    if trim_path is not None and plan.granularity != "channel":
        raise VelcroError("--trim needs a channel plan (whole filters); give --granularity "
                          "channel, or evaluate the element plan with `velcro evaluate --plan`")

    trimmed = None
    if trim_path is not None:
        trimmed = common.velcro_api("trim")(model, plan)
    reports = []
    with atomic_group():  # every file of the command, or none
        if trimmed is not None:  # first: it refuses graphs it cannot describe safely
            common.velcro_api("save_trimmed")(trimmed, trim_path)
        if plan_path is not None:
            plan.save(plan_path)
            if not args.no_report:
                reports = _write_report(args, plan, stats, model, trimmed, plan_path)

    summary = {
        "command": "compress", "plan": str(plan_path or args.plan),
        "granularity": plan.granularity, "score": plan.score, "constant": plan.constant_kind,
        "saving_ratio": plan.saving_ratio, "sites": plan.summary(),
    }
    lines = [f"{plan.granularity} plan over {plural(len(plan.sites), 'site')}: compression-saving "
             f"ratio C = {common.percent(plan.saving_ratio)}"]
    if plan_path is not None:
        lines.append(f"wrote {plan_path} (+ {plan_path.name}.safetensors)")
        lines += [f"wrote {path}" for path in reports]
        if reports:
            summary["report"] = str(reports[0])
    if trimmed is not None:
        before, after = _parameters(model), _parameters(trimmed)
        summary.update({"trimmed": str(trim_path),
                        "parameters": {"original": before, "trimmed": after}})
        lines.append(f"wrote {trim_path} (+ .safetensors): {plural(after, 'parameter')} "
                     f"(the model given: {before:,}, {common.percent(1 - after / before)} fewer)")
    common.emit(args, summary, lines)
    return 0

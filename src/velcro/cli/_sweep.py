"""`velcro sweep`: accuracy against compression-saving ratio, uniform and searched, per task."""

from __future__ import annotations

import argparse
from pathlib import Path

from velcro._io import atomic_group
from velcro.cli import _common as common
from velcro.cli import _values as values
from velcro.cli._files import Files, recorded_split
from velcro.cli._shapes import check_sites_fit
from velcro.distributed import is_main
from velcro.errors import VelcroError
from velcro.plan import GRANULARITIES
from velcro.report.sweep import THRESHOLDS, TOLERANCES, Sweep, curves_file_name, sweep
from velcro.search import SearchSchedule
from velcro.stats import Stats

DESCRIPTION = """\
For each task (one --stats file each, with the split recorded beside it), evaluate on the
validation images uniform thresholds and plans searched on the search images at several
tolerances, at element and channel granularity. Writes into OUTDIR: points.json and
points.csv (one row per plan), tables.md and tables.json (maximum C at no accuracy loss,
share of zero constants, largest accuracy gain), curves_MODEL.png and report.html (+ .md).

"Maximum C at no accuracy loss" is chosen on the search images (every plan is evaluated
there too) and its validation top-1 is held out. A split without a search set chooses on
the validation images themselves, as the papers did, and the table says so.

example:
  velcro sweep --stats cats.stats.safetensors --stats dogs.stats.safetensors \\
      --model resnet18 --weights resnet18-f37072fd.pth -o sweeps/resnet18
"""


def _fractions(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise VelcroError(f"{option} '{text}' is not a comma list of fractions") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise VelcroError(f"{option} '{text}': give fractions in [0, 1], e.g. 0,0.1,0.2")
    return values


def add_parser(subparsers) -> None:
    parser = common.new_parser(
        subparsers, "sweep", help="accuracy vs compression curves and the papers' tables",
        description=DESCRIPTION)
    common.add_data_options(parser, split_help="the split (only with one --stats; default: "
                                               "the one each --stats records)")
    common.add_model_options(parser)
    group = parser.add_argument_group("sweep")
    group.add_argument("--stats", required=True, action="append", metavar="FILE",
                       help="statistics of one task (repeat for several tasks)")
    group.add_argument("--granularity", default=",".join(GRANULARITIES), metavar="LIST",
                       help="element, channel or both (default element,channel)")
    group.add_argument("--thresholds", default=",".join(f"{t:g}" for t in THRESHOLDS),
                       metavar="LIST", help="uniform thresholds (default 0,0.1,...,1)")
    group.add_argument("--tolerances", default=",".join(f"{t:g}" for t in TOLERANCES),
                       metavar="LIST", help="search tolerances (default 0,0.01,0.02,0.05)")
    group.add_argument("--no-search", action="store_true",
                       help="uniform thresholds only, no searched plans (the search set, if "
                            "the split has one, still chooses the maximum C)")
    group.add_argument("--budget", type=values.POSITIVE, default=None, metavar="N",
                       help="at most N evaluations per search")
    group.add_argument("--levels", type=values.LEVELS, default=8, metavar="N",
                       help="search profile levels per site (default 8)")
    group.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                       help="folder to write the points, tables, curves and report into")
    common.add_runtime_options(parser)
    parser.set_defaults(run=run, preflight=preflight)


# what Sweep.save and the report write into OUTDIR, besides the model's curves_MODEL.png
WRITTEN = ("points.json", "points.csv", "tables.json", "tables.md", "report.html",
           "report.md")


def preflight(args: argparse.Namespace) -> Files:
    """The options checked before any work, and the files read and written: OUTDIR is
    checked now, not after minutes of evaluations."""
    _options(args)
    common.check_data_options(args)
    files = Files()
    files.read_model(args)
    for stats_file in args.stats:
        files.read("--stats", stats_file)
        split = args.split or recorded_split(stats_file)
        files.read("--split" if args.split else "--stats (the split it records)", split)
        files.read_data(argparse.Namespace(**{**vars(args), "split": split}))
    out = Path(args.output)
    files.folders.append(("--output", out))
    for name in (*WRITTEN, curves_file_name(args.model)):
        files.write("--output", out / name)
    return files


def _options(args: argparse.Namespace) -> tuple[list[str], list[float], list[float]]:
    granularities = [g.strip() for g in args.granularity.split(",") if g.strip()]
    bad = [g for g in granularities if g not in GRANULARITIES]
    if bad or not granularities:
        raise VelcroError(f"--granularity '{args.granularity}': use element, channel or "
                          "element,channel")
    thresholds = _fractions(args.thresholds, "--thresholds")
    tolerances = _fractions(args.tolerances, "--tolerances")
    if args.split and len(args.stats) > 1:
        raise VelcroError("--split goes with one --stats; with several, each uses the split "
                          "it records")
    return granularities, thresholds, tolerances


def run(args: argparse.Namespace) -> int:
    granularities, thresholds, tolerances = _options(args)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise VelcroError(f"--output '{out}' is a file; give a folder")
    device = common.resolve_device(args.device)
    model = common.load_model(args, device)
    given_split = args.split
    tasks = []  # every task's statistics and images first: a bad one stops before any work
    for stats_file in args.stats:
        stats = Stats.load(stats_file)
        common.named("--stats", stats_file, stats.check_model, model)
        args.split = given_split or stats.info.get("split")
        if not args.split:
            raise VelcroError(f"--stats '{stats_file}' records no split; give --split FILE")
        data = common.open_task_data(args, [(f"--stats '{stats_file}'", stats)])
        if not args.no_search and "search" not in data.split.sets:
            raise VelcroError(f"split '{args.split}' has no search set; calibrate with "
                              "--search-fraction, or give --no-search")
        validation_folder = data.folder.subset(data.split["validation"])
        check_sites_fit(model, {name: site.shape for name, site in stats.sites.items()},
                        validation_folder, "--stats", stats_file)
        tasks.append((stats_file, stats, data, args.split, validation_folder))
    sweeps, splits, preprocessing, remarks = [], {}, {}, []
    for stats_file, stats, data, split_file, validation_folder in tasks:
        task = data.task or stats.info.get("task") or Path(stats_file).name.split(".")[0]
        search_loader = None
        if "search" in data.split.sets:
            search_loader = common.make_loader(data.folder.subset(data.split["search"]),
                                               args, device)
        else:
            common.note(f"split '{split_file}' has no search set: the maximum C at no loss "
                        "is chosen on the validation images it is reported on")
        validation_loader = common.make_loader(validation_folder, args, device)
        sweeps.append(sweep(
            model, stats, validation_loader, search_data=search_loader,
            model_name=args.model, task=str(task), granularities=granularities,
            thresholds=thresholds, tolerances=() if args.no_search else tolerances,
            task_classes=data.classes or data.folder.classes,
            schedule=SearchSchedule(levels=args.levels), budget=args.budget,
            progress=common.progress(args)))
        splits[str(task)] = data.split.counts()
        preprocessing[str(task)] = data.record()
        remarks += [f"{task}: {line}" for line in data.lines()]
    if not is_main():  # under torchrun: the ranks shared the evaluations; rank 0 reports
        return 0
    result = Sweep.merge(*sweeps)
    result.info.update({"splits": splits, **common.model_info(args),
                        "preprocessing": preprocessing})
    from velcro.report import write_report

    with atomic_group():  # the points, tables, curves and report appear together
        written = result.save(out)
        paths = write_report({"title": f"velcro sweep: {args.model}", "model": args.model,
                              "weights": args.weights, "task": ", ".join(splits),
                              "sweep": result}, out / "report.html")
    written += [paths["html"], paths["markdown"]]
    summary = {"command": "sweep", **common.model_info(args), "splits": splits,
               "preprocessing": preprocessing,
               "tables": result.tables(), "points": len(result.points),
               "files": [str(p) for p in written]}
    lines = [result.markdown(), "", *remarks, *[f"wrote {p}" for p in written]]
    common.emit(args, summary, lines)
    return 0

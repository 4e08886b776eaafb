"""`velcro report`: one self-contained HTML page (and a Markdown twin) for a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from velcro._io import atomic_group
from velcro.cli import _common as common
from velcro.cli._files import Files, json_field
from velcro.errors import VelcroError

DESCRIPTION = """\
Render a run as one HTML file with everything embedded (open it in any browser, mail it)
and a Markdown twin with its PNGs in OUT_files/. The run is a summary from `velcro search`
(NAME.search.json, which records its plan and statistics), and/or a plan with its
statistics, and/or a sweep folder from `velcro sweep`.

examples:
  velcro report --run cats.search.json -o cats.report.html
  velcro report --plan cats.plan.json --stats cats.stats.safetensors -o cats.html
  velcro report --sweep sweeps/resnet18 -o resnet18.html
"""


def add_parser(subparsers) -> None:
    parser = common.new_parser(
        subparsers, "report", help="an HTML + Markdown report of a run",
        description=DESCRIPTION)
    parser.add_argument("--run", dest="run_file", metavar="FILE",
                        help="a summary from `velcro search` (NAME.search.json)")
    parser.add_argument("--plan", metavar="FILE", help="a plan (default: the run's)")
    parser.add_argument("--stats", metavar="FILE", help="statistics (default: the run's)")
    parser.add_argument("--sweep", metavar="DIR", help="a folder from `velcro sweep`")
    parser.add_argument("--title", help="the page's title")
    parser.add_argument("-o", "--output", required=True, metavar="HTML",
                        help="the HTML file to write (the .md twin goes beside it)")
    common.add_runtime_options(parser, data=False, device=False)
    parser.set_defaults(run=run, preflight=preflight)


def preflight(args: argparse.Namespace) -> Files:
    """The files read (the run's recorded plan and statistics too) and written."""
    files = Files()
    files.read("--run", args.run_file)
    files.read("--run (the plan it records)", json_field(args.run_file, "plan"), tensors=True)
    files.read("--run (the statistics it records)", json_field(args.run_file, "stats"))
    files.read("--plan", args.plan, tensors=True)
    files.read("--stats", args.stats)
    if args.sweep:
        files.read("--sweep", Path(args.sweep) / "points.json")
    out = Path(args.output)
    files.write("--output", out)
    files.write("--output", out.with_suffix(".md"))
    return files


def _read_run(path: str) -> dict:
    from velcro.report._inputs import read_search_summary

    return read_search_summary(path)


def run(args: argparse.Namespace) -> int:
    if not (args.run_file or args.plan or args.sweep):
        raise VelcroError("nothing to report: give --run, --plan or --sweep")
    out = common.check_output(args.output, "--output")
    from velcro.report import write_report

    report: dict = {}
    if args.run_file:
        document = _read_run(args.run_file)
        report.update({key: document.get(key) for key in
                       ("model", "weights", "task", "classes", "cost")})
        splits = dict(document.get("splits") or {})
        splits.pop("calibration (statistics)", None)
        report["splits"] = splits
        report["search"] = document
        report["plan"] = document.get("plan")
        report["stats"] = document.get("stats")
    if args.plan:
        report["plan"] = args.plan
    if args.stats:
        report["stats"] = args.stats
    if args.sweep:
        report["sweep"] = args.sweep
    if args.title:
        report["title"] = args.title
    for key, option in (("plan", "--plan"), ("stats", "--stats")):
        value = report.get(key)
        if isinstance(value, str) and not Path(value).is_file():
            raise VelcroError(f"{option} '{value}' does not exist (recorded in the run?); "
                              f"give {option} FILE")
    with atomic_group():  # the page, its Markdown twin and its figures appear together
        paths = write_report(report, out)
    summary = {"command": "report", **{k: str(v) for k, v in paths.items()}}
    common.emit(args, summary, [f"wrote {paths['html']}", f"wrote {paths['markdown']} "
                                f"(images in {paths['figures']})"])
    return 0

"""Every benchmark follows benchmarks/README.md: --quick (what `make bench` runs), a first
line at once, and files outside the tracked tree unless --update-results."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHES = sorted((ROOT / "benchmarks").glob("bench_*.py"))


def _bench_module(name: str):
    """A module of benchmarks/ (not a package), loaded from its file."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def calls(tree: ast.AST) -> set[str]:
    return {f"{node.func.value.id}.{node.func.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)}


@pytest.mark.parametrize("bench", BENCHES, ids=lambda p: p.name)
def test_bench_follows_the_convention(bench):
    source = bench.read_text(encoding="utf-8")
    made = calls(ast.parse(source))
    assert {"_bench.add_options", "_bench.quick", "_bench.started"} <= made, bench.name
    assert "--quick" in ast.get_docstring(ast.parse(source)), "the docstring shows --quick"
    # no default that writes into the tracked tree
    assert not re.search(r"default=[^,)]*benchmarks/", source), bench.name
    if re.search(r"savefig|args\.json|args\.plot", source):  # its results as files
        assert "_bench.output_dir" in made, f"{bench.name} writes files: use output_dir"


def test_make_bench_runs_every_bench_quick():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = makefile.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"benchmarks/bench_\*\.py.*\$\$b --quick", recipe)


def test_bench_outputs_are_untracked_by_default(tmp_path):
    import argparse
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    parser = argparse.ArgumentParser()
    _bench.add_options(parser)
    default = _bench.output_dir(parser.parse_args([]), "bench_x")
    assert default == ROOT / "runs" / "bench" / "bench_x"
    assert "/runs/" in (ROOT / ".gitignore").read_text().splitlines()
    assert _bench.output_dir(parser.parse_args(["--out", str(tmp_path / "o")]),
                             "bench_x") == tmp_path / "o"
    assert _bench.output_dir(parser.parse_args(["--update-results"]),
                             "bench_x") == ROOT / "benchmarks"
    args = parser.parse_args(["--quick"])
    args.images = 256
    _bench.quick(args, images=32)
    assert args.images == 32


def test_results_keeps_the_generated_sections():
    # bench_real --update-results rewrites what lies between its markers; a hand edit of
    # RESULTS.md once dropped the whole section (markers included) without anyone noticing
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    report = _bench_module("_real_report")
    begin, end = report.BEGIN, report.END
    assert results.count(begin) == 1 and results.count(end) == 1
    section = results.split(begin, 1)[1].split(end, 1)[0]
    assert "| task | model |" in section, "the bench_real tables are between the markers"


def test_zoo_producer_check_counts_one_by_one_depthwise_filters():
    # each filter of a 1x1 depthwise convolution is one scalar: every pair has |cosine| 1,
    # so matching filters by direction cannot tell which survived (mobileone's conv_scale
    # was reported keeping filters that trim had removed)
    import torch
    import torch.fx as fx
    import torch.nn as nn

    checks = _bench_module("zoo_checks")
    original = nn.Sequential(nn.Conv2d(4, 4, 1, groups=4, bias=False))
    with torch.no_grad():
        original[0].weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1))
    trimmed = nn.Sequential(nn.Conv2d(2, 2, 1, groups=2, bias=False))
    with torch.no_grad():
        trimmed[0].weight.copy_(torch.tensor([3.0, 4.0]).view(2, 1, 1, 1))
    gm, small = fx.symbolic_trace(original), fx.symbolic_trace(trimmed)
    assert checks.producer_drops(gm, small, "0", [0, 1])
    assert not checks.producer_drops(gm, small, "0", [0, 1, 2])  # only two filters gone

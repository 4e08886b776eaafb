"""`velcro search`'s guard flags: --criterion, --tolerance, --confidence, --check-fraction."""

import json

import pytest
from cli_workspace import DATA_OPTIONS, build

import velcro

TINY = ["--model", "clitiny:factory"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build(tmp_path_factory.mktemp("search_flags"))


@pytest.fixture(scope="module")
def stats(ws, tmp_path_factory):
    import sys

    from velcro.cli import main

    sys.path.insert(0, str(ws.module_dir))
    try:
        path = tmp_path_factory.mktemp("stats") / "t.stats.safetensors"
        assert main(["calibrate", str(ws.data), *TINY, "--weights", str(ws.weights),
                     "--calibration-fraction", "0.25", "--search-fraction", "0.4",
                     "-o", str(path), *DATA_OPTIONS]) == 0
    finally:
        sys.path.remove(str(ws.module_dir))
    return path


def search_args(ws, stats, out, *extra):
    return ("search", "--stats", stats, *TINY, "--weights", ws.weights, "-o",
            out / "t.plan.json", *extra, *DATA_OPTIONS)


@pytest.mark.parametrize("extra, names", [
    (["--criterion", "f1"], ["--criterion", "f1"]),
    (["--confidence", "1.2"], ["--confidence", "1.2"]),
    (["--confidence", "0.3"], ["--confidence", "0.3"]),
    (["--confidence", "high"], ["--confidence", "high"]),
    (["--check-fraction", "1"], ["--check-fraction", "1"]),
    (["--check-fraction", "-0.2"], ["--check-fraction", "-0.2"]),
    (["--tolerance", "1.5"], ["--tolerance", "1.5", "accuracy"]),
    (["--tolerance", "-0.01", "--criterion", "kl"], ["--tolerance", "-0.01", "kl"]),
    (["--tolerance", "0"], ["--tolerance", "tolerance 0 with a confidence bound"]),
])
def test_bad_guard_flags_are_one_line_errors(ws, stats, tmp_path, capsys, monkeypatch, extra,
                                            names):
    from velcro.cli import main

    monkeypatch.syspath_prepend(str(ws.module_dir))
    try:  # argparse's usage errors leave through SystemExit, the others through main's code
        code = main([str(a) for a in search_args(ws, stats, tmp_path, *extra)])
    except SystemExit as exc:
        code = exc.code
    stdout, stderr = capsys.readouterr()
    lines = stderr.strip().splitlines()
    assert code == 2 and stdout == "" and "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("velcro "), stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert not (tmp_path / "t.plan.json").exists()


def test_guard_flags_reach_the_search_and_its_summary(ws, cli, stats, tmp_path):
    code, stdout, stderr = cli(*search_args(ws, stats, tmp_path, "--criterion", "agreement",
                                            "--tolerance", "0.3", "--confidence", "0.8",
                                            "--check-fraction", "0.5", "--json"))
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert (summary["criterion"], summary["tolerance"], summary["confidence"]) == (
        "agreement", 0.3, 0.8)
    saved = json.loads((tmp_path / "t.search.json").read_text())
    check = saved["check"]
    assert check["images"] + saved["search_images"] == summary["splits"]["search"]
    assert check["images"] == round(0.5 * summary["splits"]["search"])
    plan = velcro.Plan.load(tmp_path / "t.plan.json")
    assert plan.info["search"]["criterion"] == "agreement"
    assert plan.info["search"]["confidence"] == 0.8
    # the validation figures: paired top-1 change and agreement on the validation images
    validation = saved["validation"]
    assert 0.0 <= validation["agreement"] <= 1.0
    assert {"difference", "ci95", "gained", "lost"} <= set(validation["paired"])


def test_the_search_before_the_guard_is_reachable(ws, cli, stats, tmp_path):
    code, stdout, stderr = cli(*search_args(ws, stats, tmp_path, "--criterion", "accuracy",
                                            "--tolerance", "0", "--confidence", "none",
                                            "--check-fraction", "0", "--json"))
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["confidence"] is None and summary["check"] is None
    assert summary["search_images"] == summary["splits"]["search"]
    assert summary["search_accuracy"] >= summary["baseline_accuracy"]

"""The command line with affine constants: calibrate --covariance, compress and search."""

import json

from cli_workspace import DATA_OPTIONS, build

import velcro
from velcro.cli import main


def test_covariance_compress_and_search_with_affine_constants(tmp_path, monkeypatch, capsys):
    ws = build(tmp_path / "ws")
    monkeypatch.syspath_prepend(str(ws.module_dir))
    model = ["--model", "clitiny:factory", "--weights", str(ws.weights)]
    plain, stats = tmp_path / "p.stats.safetensors", tmp_path / "t.stats.safetensors"
    assert main(["calibrate", str(ws.data), *model, "--calibration-fraction", "0.25",
                 "-o", str(plain), *DATA_OPTIONS]) == 0
    capsys.readouterr()
    assert main(["calibrate", str(ws.data), *model, "--calibration-fraction", "0.25",
                 "--search-fraction", "0.3", "--covariance", "-o", str(stats), "--json",
                 *DATA_OPTIONS]) == 0
    summary = json.loads(capsys.readouterr().out)
    loaded = velcro.Stats.load(stats)
    assert loaded.has_covariance and not velcro.Stats.load(plain).has_covariance
    assert summary["covariance_bytes"] == 8 * sum(s.channels ** 2 for s in loaded.sites.values())

    # compress: an affine plan equal to the API's, and a clear refusal without covariances
    plan_path = tmp_path / "a.plan.json"
    assert main(["compress", "--stats", str(stats), "--thresholds", "0.5", "--granularity",
                 "channel", "--constant", "affine", "--ridge", "0.2", "--score", "residual",
                 "-o", str(plan_path), "--no-report", "-q"]) == 0
    plan = velcro.Plan.load(plan_path)
    expected = velcro.plan(loaded, 0.5, granularity="channel", constant="affine", ridge=0.2,
                           score="residual")
    assert plan.ridge == 0.2 and plan.score == "residual"
    for name, site in expected.sites.items():
        assert site.units.tolist() == plan.sites[name].units.tolist()
    capsys.readouterr()
    assert main(["compress", "--stats", str(plain), "--thresholds", "0.5", "--granularity",
                 "channel", "--constant", "affine", "-o", str(tmp_path / "x.json"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "--covariance" in err and "Traceback" not in err
    assert not (tmp_path / "x.json").exists()

    # search: the ridge chosen on the search images, mean maps kept if they save more
    assert main(["search", "--stats", str(stats), *model, "--granularity", "channel",
                 "--constant", "affine", "--levels", "2", "--refine-rounds", "0",
                 "-o", str(tmp_path / "s.plan.json"), "--no-report", "--json",
                 *DATA_OPTIONS]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [t["ridge"] for t in result["settings"]["ridge_trials"]] == ["inf", "site"]
    assert velcro.Plan.load(tmp_path / "s.plan.json").constant_kind in ("map", "affine")

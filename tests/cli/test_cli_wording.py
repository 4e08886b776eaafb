"""What the commands print names each figure for what it is, with counts pluralised."""

import json

import pytest
from cli_workspace import CLASSES, DATA_OPTIONS, PER_CLASS, build, preprocess

import velcro
from velcro.data import ImageFolder, ImageLoader

TINY = ["--model", "clitiny:factory"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build(tmp_path_factory.mktemp("wording"))


@pytest.fixture(scope="module")
def files(ws, tmp_path_factory):
    """Statistics with a search set, a channel plan and its trimmed model, made by the API."""
    folder = tmp_path_factory.mktemp("files")
    model = ws.model()
    images = ImageLoader(ImageFolder(ws.data, preprocess=preprocess()), batch_size=8)
    stats = velcro.calibrate(model, images, progress=False)
    plan = velcro.plan(stats, 0.5, granularity="channel")
    plan.save(folder / "task.plan.json")
    velcro.save_trimmed(velcro.trim(model, plan), folder / "task.trimmed.json")
    return folder


def test_evaluate_names_a_trimmed_file_by_its_stem_never_original(ws, cli, files):
    code, out, err = cli("evaluate", ws.data, "--model", files / "task.trimmed.json",
                         *DATA_OPTIONS)
    assert code == 0, err
    assert "original" not in out
    assert "task.trimmed: top-1 " in out
    assert f"on {CLASSES * PER_CLASS} images" in out
    code, out, err = cli("evaluate", ws.data, "--model", files / "task.trimmed.json", "--json",
                         *DATA_OPTIONS)
    summary = json.loads(out)
    assert "original" not in summary and summary["evaluated"]["model"] == "task.trimmed"


def test_evaluate_with_a_plan_names_both_rows_and_signs_the_change(ws, cli, files):
    code, out, err = cli("evaluate", ws.data, *TINY, "--weights", ws.weights, "--plan",
                         files / "task.plan.json", *DATA_OPTIONS)
    assert code == 0, err
    lines = out.splitlines()
    assert any(line.lstrip().startswith("clitiny:factory: top-1") for line in lines)
    assert any(line.lstrip().startswith("with plan: top-1") for line in lines)
    change = next(line for line in lines if line.startswith("change with the plan:"))
    summary = json.loads(cli("evaluate", ws.data, *TINY, "--weights", ws.weights, "--plan",
                             files / "task.plan.json", "--json", *DATA_OPTIONS)[1])
    difference = 100 * summary["difference"]["difference"]
    shown = f"{difference:.2f}".lstrip("-")
    sign = "\u2212" if round(difference, 2) < 0 else "+" if round(difference, 2) > 0 else ""
    assert f"change with the plan: {sign}{shown} pp" in change
    assert "original" not in out


def test_one_image_is_one_image(ws, cli):
    code, out, err = cli("evaluate", ws.data, *TINY, "--weights", ws.weights, "--max-images",
                         "1", *DATA_OPTIONS)
    assert code == 0, err
    assert out.startswith("all folders: 1 image\n")
    assert "on 1 image;" in out or out.rstrip().endswith("on 1 image")
    assert "1 images" not in out


def test_search_names_its_objective_beside_the_macs_saved(ws, cli, tmp_path):
    stats = tmp_path / "t.stats.safetensors"
    model = [*TINY, "--weights", ws.weights]
    assert cli("calibrate", ws.data, *model, "--classes", "0,1,2", "--calibration-fraction",
               "0.25", "--search-fraction", "0.3", "-o", stats, *DATA_OPTIONS)[0] == 0
    code, out, err = cli("search", "--stats", stats, *model, "--granularity", "channel",
                         "--objective", "macs", "--tolerance", "0.05", "--no-report", "-o",
                         tmp_path / "t.plan.json", *DATA_OPTIONS)
    assert code == 0, err
    summary = json.loads((tmp_path / "t.search.json").read_text())
    assert (f"objective (maximised): MACs in replaced producers "
            f"{100 * summary['objective_value']:.2f}%") in out
    costs = summary["cost"]
    saved = 1 - costs["compressed"]["macs"] / costs["original"]["macs"]
    assert f"MACs saved by the trimmed model: {100 * saved:.2f}%" in out
    code, out, err = cli("search", "--stats", stats, *model, "--granularity", "element",
                         "--no-report", "-o", tmp_path / "e.plan.json", *DATA_OPTIONS)
    assert code == 0, err
    assert "objective (maximised): C (compression-saving ratio)" in out
    assert "MACs saved with hardware that skips single outputs" in out
    assert "an element plan saves none" in out

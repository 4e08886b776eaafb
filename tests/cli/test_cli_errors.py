"""Bad input to `velcro`: exit code 2, one line naming the culprit, no traceback, and nothing
of the user's overwritten or half-written."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from cli_workspace import DATA_OPTIONS, build, make_images
from safetensors.torch import save_file

TINY = ["--model", "clitiny:factory"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build(tmp_path_factory.mktemp("cli_errors"))


@pytest.fixture
def out(tmp_path):
    """An output folder holding an earlier result that a failed run must leave alone."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "result").write_bytes(b"an earlier result")
    return folder


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def assert_fails(run, *args, names, untouched):
    """Exit 2, one line on stderr naming ``names``, no traceback, ``untouched`` unchanged."""
    before = snapshot(untouched)
    code, stdout, stderr = run(*args)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert "Traceback" not in stderr and stdout == ""
    assert len(lines) == 1 and lines[0].startswith("velcro "), stderr
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    assert snapshot(untouched) == before  # no partial, temporary or overwritten file
    return lines[0]


def calibrate_args(ws, data, out, *extra):
    return ("calibrate", data, *TINY, "--weights", ws.weights, "-o", out / "result",
            *extra, *DATA_OPTIONS)


@pytest.fixture
def stats(ws, cli, tmp_path):
    path = tmp_path / "made" / "s.safetensors"
    path.parent.mkdir()
    assert cli(*calibrate_args(ws, ws.data, path.parent))[0] == 0
    (path.parent / "result").rename(path)
    return path


# ---- data -------------------------------------------------------------------------------

def test_missing_data_folder(ws, cli, out, tmp_path):
    missing = tmp_path / "nowhere"
    line = assert_fails(cli, *calibrate_args(ws, missing, out), names=[missing],
                        untouched=out)
    assert "does not exist" in line


def test_empty_data_folder(ws, cli, out, tmp_path):
    (tmp_path / "empty").mkdir()
    line = assert_fails(cli, *calibrate_args(ws, tmp_path / "empty", out),
                        names=[tmp_path / "empty"], untouched=out)
    assert "is empty" in line


def test_class_folder_without_images(ws, cli, out, tmp_path):
    data = tmp_path / "data"
    make_images(data)
    (data / "3").mkdir()
    (data / "3" / "README.txt").write_text("no pictures here")
    assert_fails(cli, *calibrate_args(ws, data, out), names=[data / "3", "no images"],
                 untouched=out)


def test_unreadable_images_are_skipped_counted_and_named(ws, cli, tmp_path):
    data = tmp_path / "data"
    make_images(data)
    png = data / "1" / "03.png"
    png.write_bytes(png.read_bytes()[:150])  # truncated
    (data / "2" / "fake.png").write_text("this is not an image")
    code, stdout, stderr = cli("evaluate", data, *TINY, "--weights", ws.weights, "--json",
                               *DATA_OPTIONS)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["images"] == 47  # 48 files of which 1 truncated, plus 1 fake
    assert [row["path"] for row in summary["skipped"]] == ["1/03.png", "2/fake.png"]
    code, stdout, _ = cli("evaluate", data, *TINY, "--weights", ws.weights, *DATA_OPTIONS)
    assert "skipped 2 unreadable images" in stdout and "1/03.png" in stdout


def test_nothing_readable_fails_and_names_a_file(ws, cli, out, tmp_path):
    data = tmp_path / "data"
    for label in ("0", "1"):
        (data / label).mkdir(parents=True)
        (data / label / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert_fails(cli, *calibrate_args(ws, data, out, "--calibration-fraction", "0.5"),
                 names=["the one image", "could not be read", "x.png"], untouched=out)


# ---- model and weights -------------------------------------------------------------------

def test_weights_that_do_not_fit_name_the_keys(ws, cli, out, tmp_path):
    state = ws.model().state_dict()
    state["conv2.weight"] = torch.zeros(5, 8, 3, 3)
    del state["fc.bias"]
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(wrong))
    args = list(calibrate_args(ws, ws.data, out))
    args[args.index("--weights") + 1] = wrong
    assert_fails(cli, *args, names=[wrong, "fc.bias", "conv2.weight"], untouched=out)


def test_a_file_that_is_not_weights(ws, cli, out, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights")
    args = list(calibrate_args(ws, ws.data, out))
    args[args.index("--weights") + 1] = text
    assert_fails(cli, *args, names=[text, "not a plain weights file"], untouched=out)


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_pickled_code_file_is_refused_and_never_run(ws, cli, out, tmp_path):
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as handle:
        pickle.dump({"conv1.weight": _Exploit(str(sentinel))}, handle, protocol=2)
    args = list(calibrate_args(ws, ws.data, out))
    args[args.index("--weights") + 1] = evil
    assert_fails(cli, *args, names=[evil, "pickled code"], untouched=out)
    assert not sentinel.exists()


def test_unknown_model_module(ws, cli, out):
    args = list(calibrate_args(ws, ws.data, out))
    args[args.index("--model") + 1] = "no_such_module:factory"
    assert_fails(cli, *args, names=["--model", "no_such_module"], untouched=out)


# ---- statistics, plans and thresholds ----------------------------------------------------

def other_weights(ws, tmp_path):
    state = ws.model().state_dict()
    state["fc.bias"] = state["fc.bias"] + 1
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_stats_made_for_another_model(ws, cli, out, stats, tmp_path):
    assert_fails(cli, "compress", "--stats", stats, "--thresholds", "0.2", "-o",
                 out / "result", *TINY, "--weights", other_weights(ws, tmp_path),
                 names=["--stats", stats, "other weights"], untouched=out)
    assert_fails(cli, "compress", "--stats", stats, "--thresholds", "0.2", "-o",
                 out / "result", "--model", "resnet18", "--num-classes", "3",
                 names=["--stats", stats, "another model"], untouched=out)


def test_plan_made_for_another_model(ws, cli, out, stats, tmp_path):
    plan = tmp_path / "made" / "p.json"
    assert cli("compress", "--stats", stats, "--thresholds", "0.2", "-o", plan)[0] == 0
    assert_fails(cli, "evaluate", ws.data, *TINY, "--weights", other_weights(ws, tmp_path),
                 "--plan", plan, "-o", out / "result", *DATA_OPTIONS,
                 names=["--plan", plan, "other weights"], untouched=out)


@pytest.mark.parametrize("thresholds, names", [
    ("1.5", ["--thresholds", "1.5", "out of range"]),
    ("0.1,0.2,0.3", ["--thresholds", "3 thresholds for 2 sites"]),
    ("0.1,-0.2", ["--thresholds", "-0.2", "out of range"]),
    ("lots", ["--thresholds", "lots"]),
    ("missing.json", ["--thresholds", "missing.json", "does not exist"]),
])
def test_bad_thresholds(cli, out, stats, thresholds, names):
    assert_fails(cli, "compress", "--stats", stats, "--thresholds", thresholds, "-o",
                 out / "result", names=names, untouched=out)


def test_thresholds_file_naming_an_unknown_site(cli, out, stats, tmp_path):
    mapping = tmp_path / "t.json"
    mapping.write_text(json.dumps({"layer9.relu": 0.5}))
    assert_fails(cli, "compress", "--stats", stats, "--thresholds", mapping, "-o",
                 out / "result", names=["--thresholds", mapping, "layer9.relu"], untouched=out)


def test_trim_output_that_is_not_json(ws, cli, out, stats):
    assert_fails(cli, "compress", "--stats", stats, "--thresholds", "0.2", "--granularity",
                 "channel", "-o", out / "result", *TINY, "--weights", ws.weights, "--trim",
                 out / "small.pt", names=["--trim", "small.pt", ".json"], untouched=out)


def test_a_plan_file_that_is_not_a_plan(ws, cli, out, stats):
    assert_fails(cli, "evaluate", ws.data, *TINY, "--weights", ws.weights, "--plan", stats,
                 *DATA_OPTIONS, "-o", out / "result", names=[stats, "not a velcro plan"],
                 untouched=out)


# ---- tasks and classes -------------------------------------------------------------------

@pytest.mark.parametrize("option, names", [
    (["--task", "birds"], ["unknown task 'birds'"]),
    (["--classes", "0,7"], ["class 7 has no folder"]),
    (["--classes", "0,cat"], ["--classes", "unknown class 'cat'"]),
])
def test_unknown_task_or_class(ws, cli, out, option, names):
    assert_fails(cli, *calibrate_args(ws, ws.data, out, *option), names=names, untouched=out)


def test_task_class_beyond_the_models_outputs(ws, cli, out, tmp_path):
    data = tmp_path / "data"
    make_images(data)
    (data / "2").rename(data / "5")  # the tiny model has 3 outputs
    assert_fails(cli, "evaluate", data, *TINY, "--weights", ws.weights, "-o",
                 out / "result", *DATA_OPTIONS, names=["class 5", "out of range"],
                 untouched=out)


# ---- outputs and numerics -----------------------------------------------------------------

def test_output_path_that_cannot_be_written(ws, cli, tmp_path):
    target = tmp_path / "no" / "such" / "folder" / "s.safetensors"
    assert_fails(cli, "calibrate", ws.data, *TINY, "--weights", ws.weights, "-o", target,
                 *DATA_OPTIONS, names=["--output", target, "does not exist"],
                 untouched=tmp_path)
    assert_fails(cli, "calibrate", ws.data, *TINY, "--weights", ws.weights, "-o", tmp_path,
                 *DATA_OPTIONS, names=["--output", tmp_path, "is a folder"],
                 untouched=tmp_path)


def test_nan_in_activations_leaves_the_earlier_result_alone(ws, cli, out, tmp_path):
    state = ws.model().state_dict()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    poisoned = tmp_path / "nan.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(poisoned))
    args = list(calibrate_args(ws, ws.data, out))
    args[args.index("--weights") + 1] = poisoned
    # non-finite weights are refused where they enter, naming the file and the first key
    assert_fails(cli, *args, names=[poisoned, "conv1.weight", "NaN or infinite"], untouched=out)


def test_a_real_process_exits_2_with_one_line(ws, tmp_path):
    missing = tmp_path / "nowhere"
    factory = f"{ws.module_dir / 'clitiny.py'}:factory"
    result = subprocess.run(
        [sys.executable, "-m", "velcro.cli", "calibrate", str(missing), "--model", factory,
         "--weights", str(ws.weights), "-o", str(tmp_path / "s.safetensors")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": ""},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []

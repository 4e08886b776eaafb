"""No output may destroy an input: an output that names a file the same command reads
(directly, through a symlink or a hard link, or as the second file of a two-file output) is
refused before any work, with one line naming both; an output naming a folder, device, FIFO
or socket is refused and the special file stays what it was (a folder already was)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest
from cli_workspace import DATA_OPTIONS, build

TINY = ["--model", "clitiny:factory"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build(tmp_path_factory.mktemp("outputs_safety"))


@pytest.fixture(scope="module")
def made(ws, tmp_path_factory):
    """Statistics with a search set, their split and a channel plan, made once."""
    from velcro.cli import main

    folder = tmp_path_factory.mktemp("made")
    factory = f"{ws.module_dir / 'clitiny.py'}:factory"
    assert main(["calibrate", str(ws.data), "--model", factory, "--weights", str(ws.weights),
                 "-o", str(folder / "s.safetensors"), "--search-fraction", "0.3",
                 *DATA_OPTIONS]) == 0
    assert main(["compress", "--stats", str(folder / "s.safetensors"), "--thresholds", "0.3",
                 "--granularity", "channel", "-o", str(folder / "p.json"),
                 "--no-report"]) == 0
    return folder


@pytest.fixture
def inputs(ws, made, tmp_path):
    """This test's own copies of every input (a failing check would overwrite them)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("s.safetensors", "s.split.json", "p.json", "p.json.safetensors"):
        shutil.copy2(made / name, folder / name)
    shutil.copy2(ws.weights, folder / "w.safetensors")
    (folder / "classes.txt").write_text("0\n1\n2\n")
    return folder


def state(*folders: Path) -> dict[str, tuple]:
    """Content hash, mtime and mode of every entry (special files included) under folders."""
    found = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            info = os.lstat(path)
            digest = (hashlib.sha256(path.read_bytes()).hexdigest()
                      if stat.S_ISREG(info.st_mode) else stat.S_IFMT(info.st_mode))
            found[str(path)] = (digest, info.st_mtime_ns, info.st_mode)
    return found


def refused(cli, args, *names, untouched):
    """Exit 2, one line naming ``names``, nothing under ``untouched`` created or changed."""
    before = state(*untouched)
    code, stdout, stderr = cli(*args)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert "Traceback" not in stderr and stdout == ""
    assert len(lines) == 1, stderr
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    assert state(*untouched) == before
    return lines[0]


def calibrate(ws, inputs, out, *extra):
    return ["calibrate", ws.data, *TINY, "--weights", inputs / "w.safetensors", "-o", out,
            *DATA_OPTIONS, *extra]


# ---- the same file, by name, symlink or hard link ----------------------------------------

@pytest.mark.parametrize("link", ["same name", "symlink", "hard link", "dotted path"])
def test_calibrate_output_onto_the_weights(ws, cli, inputs, tmp_path, link):
    weights = inputs / "w.safetensors"
    if link == "same name":
        out = weights
    elif link == "symlink":
        out = tmp_path / "link.safetensors"
        out.symlink_to(weights)
    elif link == "hard link":
        out = tmp_path / "hard.safetensors"
        os.link(weights, out)
    else:
        out = inputs / ".." / "in" / "w.safetensors"
    refused(cli, calibrate(ws, inputs, out), "--output", "--weights", untouched=[tmp_path])


@pytest.mark.parametrize("option, target", [
    ("--split-out", "w.safetensors"), ("--split-out", "classes.txt"),
])
def test_calibrate_split_out_onto_an_input(ws, cli, inputs, tmp_path, option, target):
    extra = [option, inputs / target]
    if target == "classes.txt":
        extra += ["--class-list", inputs / "classes.txt", "--labels", "class-list"]
    refused(cli, calibrate(ws, inputs, tmp_path / "new.safetensors", *extra), option,
            inputs / target, untouched=[tmp_path])


def test_calibrate_output_onto_the_split_it_reuses(ws, cli, inputs, tmp_path):
    split = inputs / "s.split.json"
    refused(cli, calibrate(ws, inputs, split, "--split", split), "--output", "--split",
            untouched=[tmp_path])


def test_calibrate_output_onto_an_image_it_reads(ws, cli, inputs, tmp_path):
    image = ws.data / "1" / "03.png"
    refused(cli, calibrate(ws, inputs, image), "--output", image,
            untouched=[tmp_path, ws.data])


# ---- compress, evaluate, export ----------------------------------------------------------

def test_compress_output_onto_the_stats(cli, inputs, tmp_path):
    stats = inputs / "s.safetensors"
    refused(cli, ["compress", "--stats", stats, "--thresholds", "0.2", "-o", stats],
            "--output", "--stats", untouched=[tmp_path])


def test_compress_plan_tensors_onto_the_stats(cli, inputs, tmp_path):
    """-o s writes s and s.safetensors beside it: the second file is the statistics."""
    stats = inputs / "s.safetensors"
    refused(cli, ["compress", "--stats", stats, "--thresholds", "0.2", "-o", inputs / "s",
                  "--no-report"], "--output", stats, "--stats", untouched=[tmp_path])


def test_compress_report_onto_an_input(ws, cli, inputs, tmp_path):
    """The report goes beside the plan (NAME.report.html): here that name is the weights."""
    weights = inputs / "cats.report.html"
    shutil.copy2(inputs / "w.safetensors", weights)
    refused(cli, ["compress", "--stats", inputs / "s.safetensors", "--thresholds", "0.2",
                  "-o", inputs / "cats.plan.json", *TINY, "--weights", weights],
            "--output", weights, "--weights", untouched=[tmp_path])


def test_compress_trim_onto_the_plan_it_reads(ws, cli, inputs, tmp_path):
    plan = inputs / "p.json"
    refused(cli, ["compress", "--plan", plan, "--trim", plan, *TINY, "--weights",
                  inputs / "w.safetensors"], "--trim", "--plan", untouched=[tmp_path])


@pytest.mark.parametrize("target, option", [
    ("p.json", "--plan"), ("p.json.safetensors", "--plan"), ("s.split.json", "--split"),
    ("w.safetensors", "--weights"),
])
def test_evaluate_output_onto_an_input(ws, cli, inputs, tmp_path, target, option):
    refused(cli, ["evaluate", "--split", inputs / "s.split.json", *TINY, "--weights",
                  inputs / "w.safetensors", "--plan", inputs / "p.json", "-o", inputs / target,
                  *DATA_OPTIONS], "--output", option, inputs / target, untouched=[tmp_path])


@pytest.mark.parametrize("target, option", [("w.safetensors", "--weights"),
                                            ("p.json", "--plan")])
def test_export_output_onto_an_input(ws, cli, inputs, tmp_path, target, option):
    refused(cli, ["export", *TINY, "--weights", inputs / "w.safetensors", "--plan",
                  inputs / "p.json", "--input-shape", "3,16,16", "--device", "cpu", "-o",
                  inputs / target], "--output", option, untouched=[tmp_path])


# ---- search, sweep, report ---------------------------------------------------------------

def test_search_summary_onto_the_split_the_stats_record(ws, cli, inputs, tmp_path):
    """search reads the split recorded in --stats; -o X writes X.search.json beside X."""
    work = tmp_path / "work"
    work.mkdir()
    stats, split = work / "x.safetensors", work / "x.search.json"
    assert cli(*calibrate(ws, inputs, stats, "--search-fraction", "0.3", "--split-out",
                          split))[0] == 0
    refused(cli, ["search", "--stats", stats, *TINY, "--weights", inputs / "w.safetensors",
                  "-o", work / "x.json", *DATA_OPTIONS], "--output", split,
            untouched=[tmp_path])


def test_sweep_folder_holding_an_input_at_a_name_it_writes(ws, cli, inputs, tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    stats = out / "points.json"
    shutil.copy2(inputs / "s.safetensors", stats)
    refused(cli, ["sweep", "--stats", stats, "--split", inputs / "s.split.json", *TINY,
                  "--weights", inputs / "w.safetensors", "--no-search", "-o", out,
                  *DATA_OPTIONS], "--output", stats, "--stats", untouched=[tmp_path])


def test_sweep_folder_holding_an_input_at_the_curves_name(ws, cli, inputs, tmp_path):
    """sweep writes curves_MODEL.png too (here curves_clitiny_factory.png)."""
    out = tmp_path / "sweep"
    out.mkdir()
    stats = out / "curves_clitiny_factory.png"
    shutil.copy2(inputs / "s.safetensors", stats)
    refused(cli, ["sweep", "--stats", stats, "--split", inputs / "s.split.json", *TINY,
                  "--weights", inputs / "w.safetensors", "--no-search", "-o", out,
                  *DATA_OPTIONS], "--output", stats, "--stats", untouched=[tmp_path])


@pytest.mark.parametrize("output, option", [("p.json", "--plan"), ("s.html", "--stats")])
def test_report_output_onto_an_input(cli, inputs, tmp_path, output, option):
    """report -o X.html also writes X.md: here s.md is the statistics."""
    stats = inputs / "s.md"
    shutil.copy2(inputs / "s.safetensors", stats)
    refused(cli, ["report", "--plan", inputs / "p.json", "--stats", stats, "-o",
                  inputs / output], "--output", option, untouched=[tmp_path])


def test_two_outputs_naming_the_same_file(ws, cli, inputs, tmp_path):
    """--trim t.json writes t.json.safetensors beside it, which -o names as the plan."""
    refused(cli, ["compress", "--stats", inputs / "s.safetensors", "--thresholds", "0.2",
                  "--granularity", "channel", *TINY, "--weights", inputs / "w.safetensors",
                  "--trim", tmp_path / "t.json", "-o", tmp_path / "t.json.safetensors",
                  "--no-report"], "--trim", "--output", "t.json.safetensors",
            "name the same file", untouched=[tmp_path])


# ---- special files -----------------------------------------------------------------------

def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()


def _device(path: Path) -> None:
    try:  # a private copy of /dev/null's node: replacing it would harm nothing else
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except OSError as exc:
        pytest.skip(f"cannot create a device node here ({exc.strerror})")


@pytest.mark.parametrize("make", [_fifo, _socket, _device], ids=["fifo", "socket", "device"])
@pytest.mark.parametrize("command", ["calibrate", "evaluate", "export", "compress"])
def test_an_output_that_is_not_a_regular_file(ws, cli, inputs, tmp_path, make, command):
    special = tmp_path / "special"
    make(special)
    args = {
        "calibrate": calibrate(ws, inputs, special),
        "evaluate": ["evaluate", ws.data, *TINY, "--weights", inputs / "w.safetensors", "-o",
                     special, *DATA_OPTIONS],
        "export": ["export", *TINY, "--weights", inputs / "w.safetensors", "--input-shape",
                   "3,16,16", "--device", "cpu", "-o", special],
        "compress": ["compress", "--stats", inputs / "s.safetensors", "--thresholds", "0.2",
                     "-o", special, "--no-report"],
    }[command]
    kind = stat.S_IFMT(os.lstat(special).st_mode)
    line = refused(cli, args, "--output", special, untouched=[tmp_path])
    assert "not a regular file" in line
    assert stat.S_IFMT(os.lstat(special).st_mode) == kind

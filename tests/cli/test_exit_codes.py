"""Exit codes and messages: every bad input is one line on stderr and exit code 2, checked
before the work starts; a full disk is the same; a closed pipe ends `velcro` quietly.

Options are checked with a "tripwire" model: its factory leaves a file behind when it is
called, so a test can tell that the command refused its arguments before loading anything.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_workspace import DATA_OPTIONS, build
from limited import run_velcro_limited

from velcro.errors import VelcroError

TINY = ["--model", "clitiny:factory"]
TRIPWIRE_SOURCE = '''
import os


def factory():
    open(os.environ["VELCRO_TRIPWIRE"], "w").close()
    raise RuntimeError("the tripwire model was loaded")
'''


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    workspace = build(tmp_path_factory.mktemp("exit_codes"))
    (workspace.module_dir / "tripwire.py").write_text(TRIPWIRE_SOURCE)
    return workspace


@pytest.fixture
def tripwire(tmp_path, monkeypatch):
    sentinel = tmp_path / "model-was-loaded"
    monkeypatch.setenv("VELCRO_TRIPWIRE", str(sentinel))
    return sentinel


@pytest.fixture
def run(cli):
    """`velcro ARGS` in process; a SystemExit (argparse's way out) counts as its code."""
    def call(*args):
        try:
            return cli(*args)
        except SystemExit as exc:  # today's argparse errors escape main()
            return exc.code, "", ""
    return call


def state(folder: Path) -> dict[str, tuple]:
    """Every file under ``folder``: content hash, size and mode (mtime can stay equal)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_size, p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(code, stdout, stderr, *names):
    lines = stderr.strip().splitlines()
    assert code == 2, (code, stderr)
    assert "Traceback" not in stderr and stdout == ""
    assert len(lines) == 1, stderr
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


# ---- usage errors ------------------------------------------------------------------------

def test_an_unknown_option_is_one_line_naming_the_command(ws, run, tmp_path):
    before = state(tmp_path)
    result = run("calibrate", ws.data, *TINY, "--weights", ws.weights, "-o",
                 tmp_path / "s.safetensors", "--bogus", *DATA_OPTIONS)
    line = one_line_error(*result, "--bogus")
    assert line.startswith("velcro calibrate: error: ")
    assert state(tmp_path) == before


@pytest.mark.parametrize("argv, names", [
    ([], ["velcro: error: ", "COMMAND"]),
    (["calibrat"], ["velcro: error: ", "calibrat"]),
    (["--bogus"], ["velcro: error: ", "--bogus"]),
])
def test_a_missing_or_unknown_command_is_one_line(ws, run, argv, names):
    one_line_error(*run(*argv), *names)


def test_help_still_prints_and_exits_0(ws, run):
    code, stdout, _ = run("calibrate", "--help")
    assert code == 0


# ---- options checked before any work -----------------------------------------------------

def calibrate_with(ws, out, *options):
    return ("calibrate", ws.data, "--model", "tripwire:factory", "-o", out / "s.safetensors",
            *DATA_OPTIONS, *options)


def search_with(ws, out, *options):
    return ("search", "--stats", ws.weights, "--model", "tripwire:factory", "-o",
            out / "p.json", *DATA_OPTIONS, *options)


BAD_OPTIONS = [
    (calibrate_with, ["--num-classes", "0"], "--num-classes"),
    (calibrate_with, ["--num-classes", "-1"], "--num-classes"),
    (calibrate_with, ["--num-classes", "1000000000000"], "--num-classes"),
    (calibrate_with, ["--batch-size", "0"], "--batch-size"),
    (calibrate_with, ["--workers", "-1"], "--workers"),
    (calibrate_with, ["--workers", "100000"], "--workers"),
    (calibrate_with, ["--max-images", "0"], "--max-images"),
    (calibrate_with, ["--calibration-fraction", "0"], "--calibration-fraction"),
    (calibrate_with, ["--calibration-fraction", "1"], "--calibration-fraction"),
    (calibrate_with, ["--calibration-fraction", "nan"], "--calibration-fraction"),
    (calibrate_with, ["--search-fraction", "-0.1"], "--search-fraction"),
    (calibrate_with, ["--search-fraction", "nan"], "--search-fraction"),
    (calibrate_with, ["--calibration-fraction", "0.6", "--search-fraction", "0.5"],
     "--search-fraction"),
    (calibrate_with, ["--seed", "-1"], "--seed"),
    (calibrate_with, ["--resize", "-5"], "--resize"),
    (calibrate_with, ["--crop", "100000"], "--crop"),
    (calibrate_with, ["--resize", "100000"], "--resize"),
    (calibrate_with, ["--mean", "0.5,nan,0.5"], "--mean"),
    (calibrate_with, ["--std", "0,1,1"], "--std"),
    (calibrate_with, ["--labels", "weird"], "--labels"),
    (search_with, ["--tolerance", "nan"], "--tolerance"),
    (search_with, ["--levels", "0"], "--levels"),
    (search_with, ["--levels", "1000000000"], "--levels"),
    (search_with, ["--refine-rounds", "-1"], "--refine-rounds"),
    (search_with, ["--budget", "0"], "--budget"),
]


@pytest.mark.parametrize("command, options, option", BAD_OPTIONS,
                         ids=[" ".join(o) for _, o, _ in BAD_OPTIONS])
def test_a_bad_option_is_refused_before_any_work(ws, run, tmp_path, tripwire, command,
                                                 options, option):
    out = tmp_path / "out"
    out.mkdir()
    before = state(tmp_path)
    one_line_error(*run(*command(ws, out, *options)), option)
    assert not tripwire.exists(), "the model was loaded before the options were checked"
    assert state(tmp_path) == before


@pytest.mark.parametrize("options, option", [
    (["--input-shape", "3,100000,100000"], "--input-shape"),
    (["--num-classes", "0"], "--num-classes"),
])
def test_export_options_are_checked_before_any_work(ws, run, tmp_path, tripwire, options,
                                                    option):
    one_line_error(*run("export", "--model", "tripwire:factory", "-o", tmp_path / "m.onnx",
                        "--device", "cpu", *options), option)
    assert not tripwire.exists() and not (tmp_path / "m.onnx").exists()


def test_a_class_range_is_bounded_before_it_is_expanded(ws, tmp_path):
    # 0-99999999999 would be a set of 10^11 integers: the check must come before that
    # (in a child process with capped memory, so that a regression cannot exhaust the machine)
    factory = f"{ws.module_dir / 'clitiny.py'}:factory"
    one_line_error(*run_velcro_limited(
        "calibrate", ws.data, "--model", factory, "--weights", ws.weights, "-o",
        tmp_path / "s.safetensors", "--classes", "0-99999999999", *DATA_OPTIONS,
        cwd=tmp_path), "--classes", "0-99999999999")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["--class-list", "--run"])
def test_an_input_that_is_a_fifo_is_refused_not_waited_on(ws, tmp_path, option):
    """Reading a FIFO waits for a writer that never comes; velcro refuses it up front."""
    fifo = tmp_path / "input.fifo"
    os.mkfifo(fifo)
    factory = f"{ws.module_dir / 'clitiny.py'}:factory"
    args = {
        "--class-list": ["calibrate", ws.data, "--model", factory, "--weights", ws.weights,
                         "-o", tmp_path / "s.safetensors", "--class-list", fifo,
                         *DATA_OPTIONS],
        "--run": ["report", "--run", fifo, "-o", tmp_path / "r.html"],
    }[option]
    try:
        result = run_velcro_limited(*args, cwd=tmp_path, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"velcro waited on the FIFO given as {option}")
    one_line_error(*result, option, fifo, "not a regular file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.fifo"]


# ---- output folders checked before the work ----------------------------------------------

def test_sweep_checks_its_output_folder_before_the_work(ws, run, tmp_path, tripwire):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    before = state(tmp_path)
    one_line_error(*run("sweep", "--stats", ws.weights, "--model", "tripwire:factory",
                        "-o", blocker / "sweep", *DATA_OPTIONS), "--output", blocker)
    assert not tripwire.exists()
    assert state(tmp_path) == before


def test_demo_checks_its_output_folder_before_the_work(run, tmp_path, monkeypatch):
    import velcro.demo

    def no_work(*args, **kwargs):
        raise AssertionError("the demo started working before checking --out")

    monkeypatch.setattr(velcro.demo.digits, "load", no_work)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    before = state(tmp_path)
    one_line_error(*run("demo", "--out", blocker / "demo", "-q"), "--out", blocker)
    one_line_error(*run("demo", "--out", blocker, "-q"), "--out", blocker)
    with pytest.raises(VelcroError, match="a-file' is a file, not a folder"):
        velcro.demo.run_demo("3,8", out_dir=blocker / "demo", progress=False)  # the API too
    assert state(tmp_path) == before


# ---- a full disk -------------------------------------------------------------------------

def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def earlier(tmp_path):
    """An output folder holding the results of an earlier run."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "s.safetensors").write_bytes(b"earlier statistics")
    (folder / "s.split.json").write_bytes(b"earlier split")
    return folder


def test_a_full_disk_while_writing_the_split_leaves_no_stats_without_it(ws, run, earlier,
                                                                         monkeypatch):
    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):
        if ".split.json" in self.name:
            _no_space()
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    before = state(earlier)
    result = run("calibrate", ws.data, *TINY, "--weights", ws.weights, "-o",
                 earlier / "s.safetensors", *DATA_OPTIONS)
    one_line_error(*result, earlier / "s.split.json", "No space left on device")
    assert state(earlier) == before  # neither file replaced, no temporary left


def test_a_full_disk_while_writing_the_stats(ws, run, earlier, monkeypatch):
    import velcro.stats

    monkeypatch.setattr(velcro.stats, "save_file", _no_space)
    before = state(earlier)
    result = run("calibrate", ws.data, *TINY, "--weights", ws.weights, "-o",
                 earlier / "s.safetensors", *DATA_OPTIONS)
    one_line_error(*result, earlier / "s.safetensors", "No space left on device")
    assert state(earlier) == before


# ---- a closed pipe -----------------------------------------------------------------------

def test_a_closed_pipe_ends_quietly(ws, tmp_path):
    """`velcro inspect FILE | head -0`: the reader is gone before velcro writes a byte."""
    process = subprocess.Popen(
        [sys.executable, "-m", "velcro.cli", "inspect", str(ws.weights)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert stderr.decode() == ""
    assert process.returncode == 141  # what a shell reports for a tool ended by SIGPIPE

"""Memory and time bombs in image folders: bounded before decoding or expanding, skipped and
named, never a hang, an exhausted machine or silently multiplied images.

The cases that could exhaust memory if a bound regressed run `velcro` in a child process
with capped memory (tests/limited.py); those that could hang run with a timeout.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from cli_workspace import DATA_OPTIONS, build, make_images
from limited import run_velcro_limited

from velcro.data import ImageFolder, Preprocess
from velcro.data.folder import MAX_ASPECT, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE
from velcro.errors import VelcroError


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build(tmp_path_factory.mktemp("bombs"))


def png_header(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A grey PNG of ``width x height``: whole when ``rows`` is given, else truncated."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0,
                                                             0, 0, 0))
    if rows is None:
        rows = b"\x00" * 64  # far fewer pixels than the header promises
    return head + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def thin_png(width: int = 1, height: int = 20000) -> bytes:
    """The issue's 121-byte bomb: a valid 1x20000 grey PNG, which resizing the shorter side
    to 256 would turn into 256 x 5,120,000 pixels (13 GB as RGB float)."""
    return png_header(width, height, b"\x00\x80" * height)


def evaluate_json(ws, data: Path, cwd: Path, *extra) -> dict:
    factory = f"{ws.module_dir / 'clitiny.py'}:factory"
    code, stdout, stderr = run_velcro_limited(
        "evaluate", data, "--model", factory, "--weights", ws.weights, "--json",
        *DATA_OPTIONS, *extra, cwd=cwd, timeout=180)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    return json.loads(stdout) | {"stderr": stderr}


# ---- image sizes, checked from the header before decoding ---------------------------------

def test_thin_and_long_images_are_skipped_and_named_before_they_are_resized(ws, tmp_path):
    data = tmp_path / "data"
    make_images(data)
    bomb = thin_png()
    assert len(bomb) < 200
    (data / "1" / "thin.png").write_bytes(bomb)
    # 95:1 passes the aspect bound, but its shorter side at 1000 makes 95000 x 1000 pixels
    (data / "2" / "long.png").write_bytes(png_header(95, 1, b"\x00" + b"\x80" * 95))
    summary = evaluate_json(ws, data, tmp_path, "--resize", "1000", "--crop", "16")
    assert summary["images"] == 48
    reasons = {row["path"]: row["reason"] for row in summary["skipped"]}
    assert sorted(reasons) == ["1/thin.png", "2/long.png"]
    assert "1x20000" in reasons["1/thin.png"] and str(MAX_ASPECT) in reasons["1/thin.png"]
    assert "95000x1000" in reasons["2/long.png"]
    assert f"{MAX_IMAGE_PIXELS:,}" in reasons["2/long.png"]


@pytest.mark.parametrize("width, height", [(12000, 10000), (40000, 40000)])
def test_a_huge_image_is_refused_from_its_header_alone(ws, tmp_path, width, height):
    """The header promises more pixels than the bound and the file holds almost none: the
    reason is the size (read from the header, before decoding), not the missing data."""
    data = tmp_path / "data"
    make_images(data)
    (data / "0" / "huge.png").write_bytes(png_header(width, height))
    folder = ImageFolder(data, preprocess=Preprocess(resize=20, crop=16))
    index = [path for path, _ in folder.samples].index("0/huge.png")
    with pytest.raises(VelcroError) as info:
        folder[index]
    message = str(info.value)
    assert "0/huge.png" in message and f"{width * height:,} pixels" in message
    assert f"{MAX_IMAGE_PIXELS:,}" in message


@pytest.mark.parametrize("field, value", [("crop", MAX_IMAGE_SIDE + 1),
                                          ("resize", 100000)])
def test_crop_and_resize_are_bounded_when_the_folder_is_opened(ws, field, value):
    with pytest.raises(VelcroError) as info:
        ImageFolder(ws.data, preprocess=Preprocess(**{field: value}))
    assert f"--{field}" in str(info.value) and str(MAX_IMAGE_SIDE) in str(info.value)


# ---- files that are not images -------------------------------------------------------------

def test_a_fifo_named_png_is_skipped_not_waited_on(ws, tmp_path):
    data = tmp_path / "data"
    make_images(data)
    os.mkfifo(data / "0" / "pipe.png")  # opening it for reading would wait for a writer
    try:
        summary = evaluate_json(ws, data, tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("velcro waited on a FIFO named .png")
    assert summary["images"] == 48
    assert "0/pipe.png" in summary["stderr"] and "not a regular file" in summary["stderr"]


def test_a_split_naming_a_fifo_does_not_hang_the_loader(ws, tmp_path):
    """A file replaced by a FIFO after the folder was listed (or listed in a split): the
    loader opens without blocking and skips it."""
    data = tmp_path / "data"
    make_images(data)
    folder = ImageFolder(data, preprocess=Preprocess(resize=20, crop=16))
    target = data / "0" / "00.png"
    target.unlink()
    os.mkfifo(target)
    code = ("import sys\nfrom velcro.data import ImageFolder, Preprocess\n"
            f"folder = ImageFolder({str(data)!r}, preprocess=Preprocess(resize=20, crop=16))\n"
            "try:\n    folder.load_image('0/00.png')\nexcept Exception as exc:\n"
            "    print(type(exc).__name__, exc)\n")
    assert any(path == "0/00.png" for path, _ in folder.samples)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30)
    assert "UnreadableImage" in result.stdout and "not a regular file" in result.stdout


# ---- symlinks ----------------------------------------------------------------------------

def test_a_symlink_loop_does_not_multiply_images(ws, tmp_path):
    data = tmp_path / "data"
    make_images(data)
    (data / "0" / "again").symlink_to("..")  # data/0/again/0/again/... forever
    outside = tmp_path / "elsewhere"
    make_images(outside, seed=1)
    (data / "1" / "more").symlink_to(outside / "1")  # a real folder elsewhere: followed
    folder = ImageFolder(data)
    assert len(folder) == 48 + 16
    assert sum(path.startswith("1/more/") for path, _ in folder.samples) == 16
    assert not any("again" in path for path, _ in folder.samples)
    assert "0/again" in folder.skipped


def test_the_same_file_twice_is_kept_once_and_named(ws, tmp_path):
    data = tmp_path / "data"
    make_images(data)
    (data / "2" / "copy.png").symlink_to(data / "0" / "05.png")
    os.link(data / "0" / "06.png", data / "1" / "hardlink.png")
    folder = ImageFolder(data)
    assert len(folder) == 48
    assert "0/05.png" in folder.skipped["2/copy.png"]
    assert "0/06.png" in folder.skipped["1/hardlink.png"]


def test_the_command_line_says_what_was_skipped_on_stderr(ws, tmp_path):
    data = tmp_path / "data"
    make_images(data)
    os.mkfifo(data / "0" / "pipe.png")
    (data / "1" / "loop").symlink_to("..")
    (data / "2" / "copy.png").symlink_to(data / "0" / "05.png")
    summary = evaluate_json(ws, data, tmp_path)
    lines = [line for line in summary["stderr"].splitlines() if "skipped" in line]
    assert len(lines) == 1, summary["stderr"]
    assert "skipped 3 entries" in lines[0]
    for name in ("0/pipe.png", "1/loop", "2/copy.png"):
        assert name in lines[0]
    assert summary["images"] == 48


# ---- class ranges ------------------------------------------------------------------------

def test_a_class_range_is_checked_before_it_is_expanded(tmp_path):
    code = ("from velcro.data import parse_classes\nfrom velcro.errors import VelcroError\n"
            "try:\n    parse_classes('0-99999999999')\n"
            "except VelcroError as exc:\n    print('refused:', exc)\n")
    import resource

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, preexec_fn=cap)
    assert result.stdout.startswith("refused: --classes"), result.stderr[-500:]
    assert "0-99999999999" in result.stdout

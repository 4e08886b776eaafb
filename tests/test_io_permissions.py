"""Outputs are written like any Unix tool writes them: new files follow the umask, a replaced
file keeps its mode, a device, FIFO or socket is never replaced by a regular file, a full disk
is one clear error with nothing left behind, and files written together appear together."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path

import pytest
import torch
from zoo import build, images

import velcro
from velcro import _io
from velcro._io import atomic_path, write_text_atomic
from velcro.data import Split
from velcro.errors import VelcroError


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def leftovers(folder: Path) -> list[str]:
    """Temporary files an atomic write might leave behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def chain():
    model, shape = build("chain")
    stats = velcro.calibrate(model, images(shape, 6, batch=3), progress=False)
    return model, stats, shape


def write_text(path: Path, chain) -> list[Path]:
    write_text_atomic(path, "hello\n")
    return [path]


def write_stats(path: Path, chain) -> list[Path]:
    chain[1].save(path)
    return [path]


def write_plan(path: Path, chain) -> list[Path]:
    velcro.plan(chain[1], 0.3).save(path)
    return [path, path.with_name(path.name + ".safetensors")]


def write_split(path: Path, chain) -> list[Path]:
    Split({"calibration": [("a.png", 0)], "validation": [("b.png", 1)]}, "/data", 0,
          {"calibration": 0.5, "validation": None}).save(path)
    return [path]


def write_trimmed(path: Path, chain) -> list[Path]:
    model, stats, _ = chain
    small = velcro.trim(model, velcro.plan(stats, 0.3, granularity="channel"))
    velcro.save_trimmed(small, path)
    return [path, path.with_name(path.name + ".safetensors")]


def write_onnx(path: Path, chain) -> list[Path]:
    pytest.importorskip("onnx")
    velcro.export_onnx(chain[0], path, torch.zeros(1, *chain[2]))
    return [path]


WRITERS = [write_text, write_stats, write_plan, write_split, write_trimmed, write_onnx]
NAMES = {write_text: "x.txt", write_stats: "s.safetensors", write_plan: "p.json",
         write_split: "s.split.json", write_trimmed: "t.json", write_onnx: "m.onnx"}


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.__name__)
@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664)],
                         ids=["umask022", "umask002"])
def test_new_outputs_follow_the_umask(tmp_path, chain, writer, mask, expected):
    with umask(mask):
        written = writer(tmp_path / NAMES[writer], chain)
    assert {p.name: oct(mode(p)) for p in written} == {p.name: oct(expected) for p in written}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.__name__)
@pytest.mark.parametrize("kept", [0o644, 0o640, 0o604], ids=oct)
def test_a_replaced_output_keeps_its_mode(tmp_path, chain, writer, kept):
    target = tmp_path / NAMES[writer]
    with umask(0o077):
        first = writer(target, chain)
    for path in first:
        path.chmod(kept)
    with umask(0o077):
        written = writer(target, chain)
    assert {p.name: oct(mode(p)) for p in written} == {p.name: oct(kept) for p in written}


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()  # the socket file stays


def _device(path: Path) -> None:
    try:  # a private copy of /dev/null's node: replacing it harms nothing but the test
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot create a device node here ({exc.strerror})")


@pytest.mark.parametrize("make, kind", [(_fifo, stat.S_ISFIFO), (_socket, stat.S_ISSOCK),
                                        (_device, stat.S_ISCHR)],
                         ids=["fifo", "socket", "device"])
def test_a_special_file_is_never_replaced(tmp_path, make, kind):
    special = tmp_path / "special"
    make(special)
    with pytest.raises(VelcroError) as info:
        write_text_atomic(special, "data")
    message = str(info.value)
    assert str(special) in message and "not a regular file" in message
    assert "\n" not in message
    assert kind(os.lstat(special).st_mode)  # still the special file
    assert leftovers(tmp_path) == []


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_one_clear_error_and_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("the earlier result")
    monkeypatch.setattr(Path, "write_text", _disk_full)
    with pytest.raises(VelcroError) as info:
        write_text_atomic(target, "the new result")
    message = str(info.value)
    assert str(target) in message and "No space left on device" in message
    assert "\n" not in message
    monkeypatch.undo()
    assert target.read_text() == "the earlier result"
    assert leftovers(tmp_path) == []


def test_files_written_together_appear_together_or_not_at_all(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("old a")
    with pytest.raises(VelcroError), _io.atomic_group():
        write_text_atomic(first, "new a")
        assert first.read_text() == "old a"  # not yet: the group renames at its end
        with atomic_path(second) as tmp:
            _disk_full(tmp)
    assert first.read_text() == "old a" and not second.exists()
    assert leftovers(tmp_path) == []
    with _io.atomic_group():
        write_text_atomic(first, "new a")
        write_text_atomic(second, "new b")
    assert (first.read_text(), second.read_text()) == ("new a", "new b")
    assert leftovers(tmp_path) == []


def test_an_interrupted_group_leaves_nothing(tmp_path):
    target = tmp_path / "a.txt"
    with pytest.raises(KeyboardInterrupt), _io.atomic_group():
        write_text_atomic(target, "new a")
        raise KeyboardInterrupt
    assert not target.exists() and leftovers(tmp_path) == []

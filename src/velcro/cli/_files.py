"""What a command reads and writes, checked once before any work: no output may be an input.

Each subcommand declares its files in a ``preflight(args) -> Files`` function (set as the
parser default ``preflight``); :func:`velcro.cli.main` calls it and :func:`check` before
``run``. Paths are compared by resolved name and by (device, inode), so a symlink or a hard
link to an input is caught as surely as its own name. Inputs include what the inputs name
(the split a statistics file records, the plan and statistics of a search summary) and the
second file of every two-file input and output (``X.json`` and ``X.json.safetensors``).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from velcro._io import folder_problem, output_problem
from velcro.data import IMAGE_EXTENSIONS
from velcro.errors import VelcroError

TENSORS = ".safetensors"  # the suffix of a plan's or a trimmed model's tensor file


@dataclass
class Files:
    """A command's inputs and outputs, each with the option that names it.

    Attributes:
        reads: ``(option, path)`` of every file the command reads.
        writes: ``(option, path)`` of every file it writes.
        folders: ``(option, path)`` of every folder it writes into (created if missing).
        images: image folders it reads (an existing image file in them is an input too).
    """

    reads: list[tuple[str, Path]] = field(default_factory=list)
    writes: list[tuple[str, Path]] = field(default_factory=list)
    folders: list[tuple[str, Path]] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)

    def read(self, option: str, path: str | os.PathLike | None, *,
             tensors: bool = False) -> None:
        """``path`` is read (with its ``.safetensors`` twin when ``tensors``)."""
        if path:
            self.reads.append((option, Path(path)))
            if tensors:
                self.reads.append((option, Path(f"{path}{TENSORS}")))

    def write(self, option: str, path: str | os.PathLike | None, *,
              tensors: bool = False) -> None:
        """``path`` is written (with its ``.safetensors`` twin when ``tensors``)."""
        if path:
            self.writes.append((option, Path(path)))
            if tensors:
                self.writes.append((option, Path(f"{path}{TENSORS}")))

    def read_model(self, args: argparse.Namespace) -> None:
        """--weights, a trimmed model's two files, a factory's Python file."""
        self.read("--weights", getattr(args, "weights", None))
        model = getattr(args, "model", None) or ""
        if model.endswith(".json"):
            self.read("--model", model, tensors=True)
        elif ":" in model and not os.path.exists(model):
            source = model.rpartition(":")[0]
            if source.endswith(".py"):
                self.read("--model", source)

    def read_data(self, args: argparse.Namespace) -> None:
        """--split, --class-list and the images of DATA (or of the split's folder)."""
        self.read("--split", getattr(args, "split", None))
        self.read("--class-list", getattr(args, "class_list", None))
        root = getattr(args, "data", None) or json_field(getattr(args, "split", None), "root")
        if root:
            self.images.append(Path(root))


def recorded_split(stats: str | os.PathLike | None) -> str | None:
    """The split a statistics file records (best effort: a bad file is reported later, by the
    command that loads it)."""
    if not stats or _special(Path(stats)):  # a FIFO is refused by check(), not read here
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(stats), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("velcro", "{}"))
        split = meta.get("info", {}).get("split")
        return split if isinstance(split, str) and split else None
    except Exception:  # noqa: BLE001 - any unreadable file: its loader names the problem
        return None


def json_field(path: str | os.PathLike | None, key: str) -> str | None:
    """``document[key]`` of a small JSON file, if it is one (best effort, as above)."""
    if not path or _special(Path(path)):  # a FIFO is refused by check(), not read here
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.loads(handle.read(1 << 24)).get(key)
        return value if isinstance(value, str) and value else None
    except Exception:  # noqa: BLE001 - reported later by the command's own loader
        return None


def _special(path: Path) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False  # missing: the command's own loader says so
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


@dataclass(frozen=True)
class _Identity:
    resolved: Path
    inode: tuple[int, int] | None

    @classmethod
    def of(cls, path: Path) -> _Identity:
        try:
            info = os.stat(path)
            inode = (info.st_dev, info.st_ino)
        except OSError:
            inode = None
        return cls(Path(os.path.abspath(path)).resolve(), inode)

    def same(self, other: _Identity) -> bool:
        return self.resolved == other.resolved or (
            self.inode is not None and self.inode == other.inode)


def check(files: Files) -> None:
    """Refuse, with one line, inputs that are FIFOs, sockets or devices (reading one could
    wait forever), outputs that are inputs, that name the same file twice, that name a
    folder, device, FIFO or socket, or whose folder cannot be written.

    Raises:
        VelcroError: naming the option(s) and the file.
    """
    for option, folder in files.folders:
        problem = folder_problem(folder)
        if problem is not None:
            raise VelcroError(f"{option}: {problem}")
    for option, path in files.reads:
        if _special(path):  # reading a FIFO waits for a writer that may never come
            raise VelcroError(f"{option} '{path}' is not a regular file (a FIFO, socket or "
                              "device); give a file")
    created = [_Identity.of(folder) for _, folder in files.folders]
    inputs = [(option, path, _Identity.of(path)) for option, path in files.reads]
    roots = [_Identity.of(root).resolved for root in files.images]
    written: list[tuple[str, Path, _Identity]] = []
    for option, path in files.writes:
        identity = _Identity.of(path)
        in_new_folder = any(folder.same(_Identity.of(path.parent)) for folder in created)
        if not (in_new_folder and not path.parent.exists()):
            problem = output_problem(path)
            if problem is not None:
                raise VelcroError(f"{option}: {problem}")
        for in_option, in_path, in_identity in inputs:
            if identity.same(in_identity):
                named = "" if str(in_path) == str(path) else f" ('{in_path}')"
                raise VelcroError(f"{option} would overwrite '{path}', the file {in_option} "
                                  f"reads{named}; give the output another name")
        for out_option, out_path, out_identity in written:
            if identity.same(out_identity):
                also = "" if str(out_path) == str(path) else f" (and '{out_path}')"
                raise VelcroError(f"{option} and {out_option} name the same file "
                                  f"'{path}'{also}; give two names")
        if identity.inode is not None and path.suffix.lower() in IMAGE_EXTENSIONS:
            for root in roots:
                if identity.resolved.is_relative_to(root):
                    raise VelcroError(f"{option} would overwrite '{path}', an image of the data "
                                      f"folder '{root}' this command reads; give another name")
        written.append((option, path, identity))

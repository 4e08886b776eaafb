"""Bounds on what an image folder may make velcro do: which entries are images, and how large
an image may be before it is decoded.

Only regular files are images (a FIFO named ``x.png`` would block its reader forever);
symlinked folders are followed, never into a folder already scanned (no symlink loop), and a
file reached twice (symlink, hard link) is kept once. An image's size is read from its header
and checked before it is decoded or resized.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from velcro.data._preprocess import MAX_IMAGE_SIDE, Preprocess, resized_size
from velcro.errors import VelcroError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Pillow's own decompression-bomb threshold (it warns above it, refuses above twice it): an
# image, decoded or resized, holds at most this many pixels (~268 MB as 8-bit RGB).
MAX_IMAGE_PIXELS = 89_478_485
# Longer side over shorter side: a 1x20000 strip is no photograph of the task, and resizing
# its shorter side to 256 would make it 256 x 5,120,000 pixels.
MAX_ASPECT = 100
# The largest --resize or --crop is MAX_IMAGE_SIDE (velcro.data._preprocess): beyond any model's
# input (a typo such as --crop 100000 would otherwise allocate 100000^2 pixels per image).
NOT_REGULAR = "not a regular file (a FIFO, socket or device)"


class Scan:
    """Walks class folders: regular image files only, each folder and each file once."""

    def __init__(self, root: Path, class_folders: Sequence[str]) -> None:
        self.root = root
        self.skipped: dict[str, str] = {}
        self.visited: set[tuple[int, int]] = set()
        # the root and every class folder count as visited before any walk starts, so that
        # a link back to them (class/again -> ..) is a loop, not more images
        for folder in [root, *(root / name for name in class_folders)]:
            info = _stat(folder)
            if info is not None:
                self.visited.add((info.st_dev, info.st_ino))
        self.found: list[tuple[str, tuple[int, int], bool]] = []

    def walk(self, folder: Path, *, linked: bool = False) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
            folder_dev = os.stat(folder).st_dev
        except OSError as exc:
            self.skipped[self.relative(folder)] = f"cannot list folder: {exc.strerror or exc}"
            return
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_link = entry.is_symlink()
                is_folder = entry.is_dir()  # follows a link
            except OSError:
                is_link, is_folder = False, False
            if is_folder:
                subfolders.append((entry, is_link))
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                self.add_file(entry, folder_dev, linked or is_link)
        for entry, is_link in subfolders:
            info = _stat(Path(entry.path))
            key = (info.st_dev, info.st_ino) if info is not None else None
            if key is None or key in self.visited:
                self.skipped[self.relative(Path(entry.path))] = (
                    "a folder already scanned (a symlink loop or a second link to it)")
                continue
            self.visited.add(key)
            self.walk(Path(entry.path), linked=linked or is_link)

    def add_file(self, entry: os.DirEntry, folder_dev: int, linked: bool) -> None:
        path = self.relative(Path(entry.path))
        if entry.is_symlink():
            info = _stat(Path(entry.path))
            if info is None:
                self.skipped[path] = "a broken symbolic link"
                return
            regular, key = stat.S_ISREG(info.st_mode), (info.st_dev, info.st_ino)
        else:  # no system call: the file type and inode come with the folder listing
            regular, key = entry.is_file(follow_symlinks=False), (folder_dev, entry.inode())
        if not regular:
            self.skipped[path] = NOT_REGULAR
            return
        self.found.append((path, key, linked))

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def keep_once(found: list[tuple[str, tuple[int, int], bool]],
               skipped: dict[str, str]) -> set[str]:
    """The paths to keep: one per file (device, inode), the one not reached through a link
    if there is one, else the first by path."""
    chosen: dict[tuple[int, int], tuple[bool, str]] = {}
    for path, key, linked in found:
        candidate = (linked, path)
        if key not in chosen or candidate < chosen[key]:
            chosen[key] = candidate
    keep = {path for _, path in chosen.values()}
    for path, key, _ in found:
        if path not in keep:
            skipped[path] = f"the same file as '{chosen[key][1]}'"
    return keep


class NotRegular(OSError):
    """The path is a FIFO, socket or device, not a file to decode."""


def open_regular(path: Path):
    """The file opened for reading, without waiting: a FIFO opened for reading blocks until a
    writer comes, so it is opened non-blocking and refused unless it is a regular file."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise NotRegular(NOT_REGULAR)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def size_problem(width: int, height: int, preprocess: Preprocess) -> str | None:
    """Why an image of ``width x height`` is refused before decoding, or None."""
    pixels = width * height
    if pixels > MAX_IMAGE_PIXELS:
        return (f"{pixels:,} pixels ({width}x{height}) is more than the {MAX_IMAGE_PIXELS:,} "
                "allowed (a decompression bomb?)")
    if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
        return (f"{width}x{height} pixels: one side is more than {MAX_ASPECT} times the other "
                "(no photograph of a task; resizing it would explode its size)")
    resize = getattr(preprocess, "resize", None)
    if isinstance(resize, int) and resize > 0 and min(width, height) > 0:
        new_width, new_height = resized_size(width, height, resize)
        if new_width * new_height > MAX_IMAGE_PIXELS:
            return (f"{width}x{height} pixels resized to {new_width}x{new_height} would be "
                    f"{new_width * new_height:,} pixels, more than the {MAX_IMAGE_PIXELS:,} "
                    "allowed")
    return None


def check_sizes(preprocess: Preprocess) -> None:
    """Refuse a resize or crop larger than :data:`MAX_IMAGE_SIDE` before any image is read."""
    resize = getattr(preprocess, "resize", None)
    crop = getattr(preprocess, "crop", None)
    sides = {"--resize": [resize] if isinstance(resize, int) else [],
             "--crop": list(preprocess.crop_size) if crop is not None else []}
    for option, values in sides.items():
        if any(v > MAX_IMAGE_SIDE for v in values):
            raise VelcroError(f"{option} {max(values)} is larger than {MAX_IMAGE_SIDE} pixels, "
                              "more than any model's input; give a smaller size")

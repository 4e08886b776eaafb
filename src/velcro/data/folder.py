"""Image folders (one sub-folder per class, the ImageFolder convention) read with Pillow.

Class folders are mapped to the model's class indices in one of three ways:

- ``class-list``: folders named by WordNet id (``n02123045``), mapped through a class-list
  file, one wnid per line in index order, as ImageNet distributions ship it
  (``LOC_synset_mapping.txt``: ``n01440764 tench, Tinca tinca``; text after the wnid is
  ignored);
- ``index``: folders named by class index (``281/``);
- ``sorted``: the dataset's own classes, numbered in sorted folder-name order.

``labels="auto"`` (the default) picks ``class-list`` when a class list is given, ``index``
when every folder name is a number, and ``sorted`` otherwise; folders named by wnid without a
class list are an error, since their sorted positions are ImageNet indices only when all 1000
are present. Folders named by index stay ``index`` beside a class list that does not name them
(``../shared/data/cifar10/test/3/`` with ``classes.txt``): the list then only gives the classes
names, for ``--classes cat,dog``.

A task's classes need not all have a folder where ``missing_classes="skip"`` (a subset of a
validation set, such as 82 of the 118 dog breeds): they are listed in ``missing_classes``.

Scanning and decoding are bounded, so that a folder cannot hang or exhaust the machine:
only regular files are images (a FIFO named ``x.png`` would block the reader forever),
symlinked folders are followed but never one already scanned (no symlink loop), a file
reached twice (symlink, hard link) is kept once, and an image's size is checked from its
header, before it is decoded or resized (:data:`MAX_IMAGE_PIXELS`, :data:`MAX_ASPECT`).
What is left out is listed in ``ImageFolder.skipped`` and, for unreadable images, in the
loader's ``skipped``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from velcro._format import plural
from velcro.data._class_list import MAX_CLASS_LIST_BYTES, read_class_list
from velcro.data._files import (
    IMAGE_EXTENSIONS,
    MAX_ASPECT,
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    NOT_REGULAR,
    NotRegular,
    Scan,
    check_sizes,
    keep_once,
    open_regular,
    size_problem,
)
from velcro.data._preprocess import Preprocess
from velcro.errors import VelcroError

__all__ = ["IMAGE_EXTENSIONS", "LABEL_MODES", "MAX_ASPECT", "MAX_CLASS_LIST_BYTES",
           "MAX_IMAGE_PIXELS", "MAX_IMAGE_SIDE", "MISSING_CLASSES", "ImageFolder",
           "UnreadableImage", "read_class_list"]
LABEL_MODES = ("auto", "class-list", "index", "sorted")
MISSING_CLASSES = ("error", "skip")
_WNID = re.compile(r"^n\d{8}$")


class UnreadableImage(VelcroError):
    """An image file that Pillow cannot decode (truncated, corrupt, not an image).

    Example:
        >>> try:
        ...     image = folder.load_image("n02123045/broken.JPEG")
        ... except UnreadableImage as error:
        ...     print(error.path, error.reason)
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot read image '{path}': {reason}; replace or remove the file")
        self.path = path
        self.reason = reason


def _class_folders(root: Path) -> list[str]:
    if not root.exists():
        raise VelcroError(
            f"data folder '{root}' does not exist; give the folder that holds one sub-folder "
            "per class"
        )
    if not root.is_dir():
        raise VelcroError(f"data path '{root}' is not a folder; give the folder that holds "
                          "one sub-folder per class")
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise VelcroError(f"cannot list data folder '{root}': {exc.strerror}") from None
    folders = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    if not folders:
        loose = any(e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries)
        where = "holds images but no class sub-folders" if loose else "is empty"
        raise VelcroError(
            f"data folder '{root}' {where}; put the images in one sub-folder per class "
            f"({root}/<class>/<image>.jpg)"
        )
    return folders


def _label_folders(folders: list[str], mode: str | Mapping[str, int],
                   class_list: list[str] | None, root: Path) -> tuple[str, dict[str, int]]:
    if isinstance(mode, Mapping):
        # an explicit folder -> index mapping (e.g. the one a saved split records); other
        # folders belong to other classes and are left out
        return "mapping", {name: int(mode[name]) for name in folders if name in mode}
    if mode not in LABEL_MODES:
        raise VelcroError(f"label mode '{mode}' is unknown; use one of {', '.join(LABEL_MODES)}")
    if class_list is not None and mode in ("auto", "class-list"):
        named = set(class_list)
        index_folders = all(name.isdigit() for name in folders)
        # class folders named by index beside a list of names: the list names the classes
        mode = "index" if mode == "auto" and index_folders and not named & set(folders) \
            else "class-list"
    elif mode == "class-list":
        raise VelcroError("labels 'class-list' need a class list; give --class-list FILE")
    elif mode == "auto":
        if all(name.isdigit() for name in folders):
            mode = "index"
        elif any(_WNID.match(name) for name in folders):
            raise VelcroError(
                f"the class folders of '{root}' are WordNet ids (e.g. '{folders[0]}'); give "
                "--class-list with the wnids in class-index order (ImageNet's "
                "LOC_synset_mapping.txt), or --labels sorted to number the folders in order"
            )
        else:
            mode = "sorted"
    if mode == "class-list":
        index_of = {wnid: i for i, wnid in enumerate(class_list or [])}
        unknown = [name for name in folders if name not in index_of]
        if unknown:
            raise VelcroError(
                f"class folder '{root / unknown[0]}' is not in the class list; name class "
                "folders by the wnids of the list, or remove the folder"
            )
        return mode, {name: index_of[name] for name in folders}
    if mode == "index":
        bad = [name for name in folders if not name.isdigit()]
        if bad:
            raise VelcroError(
                f"class folder '{root / bad[0]}' is not a class index; with --labels index "
                "every folder is named by its class number"
            )
        mapping = {name: int(name) for name in folders}
        if len(set(mapping.values())) != len(mapping):
            raise VelcroError(f"two class folders of '{root}' name the same index (e.g. 07 "
                              "and 7); keep one folder per class")
        return mode, mapping
    return mode, {name: i for i, name in enumerate(folders)}


def _classes_text(classes: list[int], limit: int = 6) -> str:
    """``0-9`` for a run, ``151, 153, ... (82)`` for a long list."""
    if not classes:
        return ""
    if classes == list(range(classes[0], classes[-1] + 1)) and len(classes) > 2:
        return f"{classes[0]}-{classes[-1]}"
    shown = ", ".join(map(str, classes[:limit]))
    return shown + (f", ... ({len(classes)})" if len(classes) > limit else "")


class ImageFolder(Dataset):
    """Labelled images from a folder with one sub-folder per class.

    Args:
        root: the data folder.
        classes: keep only these class indices (a task). None keeps every class folder.
        class_list: wnids in class-index order (a list or a class-list file) for folders
            named by wnid, or the class names of folders named by index.
        labels: how folders map to class indices: ``auto``, ``class-list``, ``index`` or
            ``sorted`` (see the module docstring), or an explicit mapping folder name ->
            class index (folders not in it are left out).
        preprocess: image -> tensor transform; default the ImageNet evaluation transform.
        missing_classes: ``"error"`` (default): every class of ``classes`` must have a
            folder; ``"skip"``: those without one are left out and listed in
            ``missing_classes`` (a task on a subset of a validation set).

    Attributes:
        samples: ``(path relative to root, class index)`` for every image, sorted by path.
        class_to_index: class folder name -> class index, for the folders in use.
        label_mode: the mode in use after ``auto`` was resolved.
        missing_classes: the classes of ``classes`` left out for want of a folder.

    Raises:
        VelcroError: missing or empty folder, a class folder without images, a task class
            without a folder (unless skipped; never all of them), folders that do not fit the
            label mode.

    Example:
        >>> cats = ImageFolder("val", classes=[281, 282, 283, 284, 285],
        ...                    class_list="LOC_synset_mapping.txt")
        >>> image, label = cats[0]
        >>> image.shape, label
        (torch.Size([3, 224, 224]), 281)
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        classes: Sequence[int] | None = None,
        class_list: Sequence[str] | str | os.PathLike | None = None,
        labels: str | Mapping[str, int] = "auto",
        preprocess: Preprocess | None = None,
        missing_classes: str = "error",
    ) -> None:
        self.root = Path(root)
        self.preprocess = preprocess if preprocess is not None else Preprocess()
        if class_list is not None and not isinstance(class_list, (list, tuple)):
            class_list = read_class_list(class_list)
        self.class_list = list(class_list) if class_list is not None else None
        folders = _class_folders(self.root)
        self.label_mode, mapping = _label_folders(folders, labels, self.class_list, self.root)
        #: task classes without a folder here (left out with ``missing_classes="skip"``)
        self.missing_classes: list[int] = []
        if missing_classes not in MISSING_CLASSES:
            raise VelcroError(f"missing_classes must be one of {', '.join(MISSING_CLASSES)}, "
                              f"got {missing_classes!r}")
        if classes is not None:
            wanted = sorted({int(c) for c in classes})
            present = set(mapping.values())
            missing = [c for c in wanted if c not in present]
            if len(missing) == len(wanted):
                raise VelcroError(
                    f"none of the task's {plural(len(wanted), 'class', 'classes')} "
                    f"({_classes_text(wanted)}) has a folder in '{self.root}', whose class "
                    f"folders are {_classes_text(sorted(present)) or 'other ones'}; check "
                    "the folder, --task/--classes and --class-list")
            if missing and missing_classes == "error":
                raise VelcroError(
                    f"class {missing[0]} has no folder in '{self.root}' "
                    f"({len(missing)} of the task's {plural(len(wanted), 'class', 'classes')} "
                    "missing); add its images or choose classes with --classes"
                )
            self.missing_classes = missing
            mapping = {name: index for name, index in mapping.items() if index in wanted}
        if not mapping:
            raise VelcroError(
                f"none of the class folders of '{self.root}' belong to the requested classes; "
                "check the folder, --task/--classes and --class-list"
            )
        self.class_to_index = mapping
        check_sizes(self.preprocess)
        scan = Scan(self.root, list(mapping))
        for name in sorted(mapping):
            scan.walk(self.root / name)
        keep = keep_once(scan.found, scan.skipped)
        #: entries left out while scanning, path relative to root -> reason
        self.skipped: dict[str, str] = dict(sorted(scan.skipped.items()))
        by_folder: dict[str, list[str]] = {}
        for path, _, _ in scan.found:
            if path in keep:
                by_folder.setdefault(path.split("/", 1)[0], []).append(path)
        self.samples: list[tuple[str, int]] = []
        for name, index in sorted(mapping.items()):
            found = by_folder.get(name, [])
            if not found:
                raise VelcroError(
                    f"class folder '{self.root / name}' holds no images "
                    f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
                )
            self.samples.extend((path, index) for path in found)
        self.samples.sort()

    @property
    def classes(self) -> list[int]:
        """The class indices in use, sorted."""
        return sorted(set(self.class_to_index.values()))

    @property
    def targets(self) -> list[int]:
        """The class index of every sample, in order."""
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.preprocess(self.load_image(path)), label

    def load_image(self, path: str) -> Image.Image:
        """Decode one image fully (so a truncated file fails here, not later).

        The size is checked from the header first: an image of more than
        :data:`MAX_IMAGE_PIXELS` pixels (before or after resizing), or whose sides differ more
        than :data:`MAX_ASPECT` times, is refused before it is decoded.

        Raises:
            UnreadableImage: the file cannot be decoded, is not a regular file or is too large.
        """
        try:
            with open_regular(self.root / path) as handle, warnings.catch_warnings():
                # our bound is Pillow's warning threshold: its warning would only repeat it
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(handle) as image:
                    problem = size_problem(*image.size, self.preprocess)
                    if problem is not None:
                        raise UnreadableImage(path, problem)
                    image.load()
                    return image.convert(self.preprocess.mode)
        except UnreadableImage:
            raise
        except NotRegular:
            raise UnreadableImage(path, NOT_REGULAR) from None
        except Image.DecompressionBombError as exc:
            pixels = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(pixels.group(1)):,} pixels" if pixels else "its size"
            raise UnreadableImage(path, f"{size} is more than the {MAX_IMAGE_PIXELS:,} "
                                        "allowed (a decompression bomb?)") from None
        except Exception as exc:  # Pillow raises many types for bad files; all mean "skip it"
            text = " ".join(str(exc).split()) or type(exc).__name__
            raise UnreadableImage(path, f"{type(exc).__name__}: {text}"[:200]) from None

    def subset(self, samples: Sequence[tuple[str, int]]) -> ImageFolder:
        """The same folder restricted to ``samples`` (e.g. one set of a split), in their order.

        Raises:
            VelcroError: a sample that is not an image of this folder with that label.
        """
        known = dict(self.samples)
        chosen = []
        for path, label in samples:
            if known.get(path) != int(label):
                raise VelcroError(
                    f"the split lists '{path}' (class {label}), which is not an image of that "
                    f"class in '{self.root}'; use the folder, task and class list the split "
                    "was made with"
                )
            chosen.append((path, int(label)))
        copy = object.__new__(ImageFolder)
        copy.__dict__.update(self.__dict__)
        copy.samples = chosen
        return copy

    def describe(self) -> dict:
        """JSON-ready description saved with results."""
        return {"root": str(self.root.resolve()), "labels": self.label_mode,
                "class_to_index": dict(sorted(self.class_to_index.items())),
                "images": len(self), "preprocess": self.preprocess.to_dict()}


"""Class-list files: the class names (wnids) in class-index order, read with bounds.

Two layouts are read: one name per line, first token of the line (ImageNet's
``LOC_synset_mapping.txt``, ``synset_words.txt``: ``n01440764 tench, Tinca tinca``), and
numbered lines whose first token is the line's class index (CIFAR-10's ``classes.txt``:
``3 cat``), whose name is the second token. The file is untrusted input: its size, the number
of names, their length and their characters are bounded before anything else uses them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from velcro.data._files import NotRegular, open_regular
from velcro.data.tasks import MAX_CLASSES
from velcro.errors import VelcroError

# ImageNet-21k's list with its names is ~1 MB; a class list of MAX_CLASSES long lines fits
MAX_CLASS_LIST_BYTES = 16 * 2**20
MAX_CLASS_NAME = 256  # characters of one class name
_NAME = re.compile(r"^[^\x00-\x20\x7f]+$")  # printable, no spaces or control characters
_SEPARATORS = re.compile(r"[\s,;]+")


def _read_text(path: Path) -> str:
    fix = "give a text file with one class name (wnid) per line in class-index order"
    try:
        with open_regular(path) as handle:  # a FIFO would wait for a writer forever
            data = handle.read(MAX_CLASS_LIST_BYTES + 1)
    except NotRegular:
        raise VelcroError(f"class list '{path}' is not a regular file (a FIFO, socket or "
                          f"device); {fix}") from None
    except FileNotFoundError:
        raise VelcroError(f"class list '{path}' does not exist; {fix}") from None
    except OSError as exc:
        raise VelcroError(f"cannot read class list '{path}' ({exc.strerror or exc}); "
                          f"{fix}") from None
    if len(data) > MAX_CLASS_LIST_BYTES:
        raise VelcroError(f"class list '{path}' is larger than {MAX_CLASS_LIST_BYTES >> 20} MiB, "
                          f"more than any list of {MAX_CLASSES:,} classes; {fix}")
    if b"\x00" in data:
        raise VelcroError(f"class list '{path}' holds NUL bytes (a binary file?); {fix}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise VelcroError(f"class list '{path}' is not UTF-8 text; {fix}") from None


def read_class_list(path: str | os.PathLike) -> list[str]:
    """The class names (wnids) of a class-list file, in index order.

    One class per line; the first token of the line is the name (so ImageNet's
    ``LOC_synset_mapping.txt`` works as is), unless every line starts with its own class
    index (``0 airplane``, ``1 automobile``, as CIFAR-10's ``classes.txt``): then the name is
    the second token. Blank lines and ``#`` comments are skipped.

    Args:
        path: the class-list file.

    Raises:
        VelcroError: a missing, special (FIFO), binary, non-UTF-8 or oversized file
            (:data:`MAX_CLASS_LIST_BYTES`), no names, more than ``MAX_CLASSES`` names, a
            name twice, or a name that is too long or holds control characters (the message
            names the line).

    Example:
        >>> read_class_list("LOC_synset_mapping.txt")[281]
        'n02123045'
        >>> read_class_list("cifar10/classes.txt")[3]
        'cat'
    """
    path = Path(path)
    rows: list[tuple[int, list[str]]] = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            rows.append((number, _SEPARATORS.split(line, maxsplit=2)))
            if len(rows) > MAX_CLASSES:
                raise VelcroError(f"class list '{path}' names more than {MAX_CLASSES:,} "
                                  "classes, more than any model has; give the model's class list")
    if not rows:
        raise VelcroError(f"class list '{path}' holds no class names; give one wnid per line")
    numbered = all(len(tokens) >= 2 and tokens[0] == str(index)
                   for index, (_, tokens) in enumerate(rows))
    names = []
    for number, tokens in rows:
        name = tokens[1] if numbered else tokens[0]
        if len(name) > MAX_CLASS_NAME or not _NAME.match(name):
            shown = name[:40] + ("..." if len(name) > 40 else "")
            raise VelcroError(f"class list '{path}' line {number}: {shown!r} is not a class "
                              f"name (at most {MAX_CLASS_NAME} printable characters); give "
                              "one wnid per line")
        names.append(name)
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise VelcroError(f"class list '{path}' names '{name}' twice; each class once")
        seen.add(name)
    return names

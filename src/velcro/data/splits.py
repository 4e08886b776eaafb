"""Deterministic, seeded, stratified splits of a task's images, saved as JSON.

The papers calibrate on under 2% of a task's images and validate on the rest, disjoint from
it. A search for thresholds needs a third set, carved from the non-validation images, so that
the final accuracy is measured on images the search never saw.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TypeVar

import numpy as np

from velcro._format import plural
from velcro._io import write_text_atomic
from velcro._validate import MAX_SPLIT_BYTES, Fields, read_json, show
from velcro.errors import VelcroError

FORMAT = "velcro.split/1"
MAX_SETS = 64
DEFAULT_FRACTIONS: dict[str, float | None] = {"calibration": 0.02, "validation": None}

T = TypeVar("T")


def split(
    items: Sequence[T],
    fractions: Mapping[str, float | None] | None = None,
    *,
    seed: int = 0,
    labels: Sequence[Hashable] | None = None,
) -> dict[str, list[T]]:
    """Split ``items`` into disjoint named sets of the given fractions, reproducibly.

    Every set but one gets ``round(fraction * len(items))`` items (at least one when its
    fraction is above 0); the set whose fraction is ``None`` gets the rest. With ``labels``
    the split is stratified: each set holds each label in about its share of the whole
    (systematic sampling of a per-label shuffle), so 2% of 5 classes of 50 images is one
    image per class. The same items in the same order and the same seed give the same split.

    Args:
        items: the things to split (e.g. ``(path, label)`` pairs), in a fixed order.
        fractions: set name -> fraction in (0, 1), one of them ``None`` for "the rest";
            default ``{"calibration": 0.02, "validation": None}``. Without a ``None`` the
            fractions must sum to 1 and the last set takes the rounding remainder.
        seed: the random seed.
        labels: one label per item, to stratify by.

    Returns:
        Set name -> items, each set in the order its items were drawn; names in the order
        of ``fractions``.

    Raises:
        VelcroError: bad fractions, or a set that would be empty.

    Example:
        >>> parts = split(samples, {"calibration": 0.02, "search": 0.1, "validation": None},
        ...               seed=0, labels=[label for _, label in samples])
        >>> len(parts["calibration"]) + len(parts["search"]) + len(parts["validation"])
        250
    """
    fractions = dict(DEFAULT_FRACTIONS if fractions is None else fractions)
    rest = _check_fractions(fractions)
    if labels is not None and len(labels) != len(items):
        raise VelcroError(f"got {plural(len(labels), 'label')} for {plural(len(items), 'item')}; "
                          "give one per item")
    total = len(items)
    order = _stratified_order(total, labels, seed)
    counts = {name: (max(1, round(f * total)) if f else 0)
              for name, f in fractions.items() if name != rest}
    remainder = total - sum(counts.values())
    if remainder < 1:
        raise VelcroError(
            f"cannot split {plural(total, 'image')} into {', '.join(fractions)} with fractions "
            f"{_describe(fractions)}: a set would be empty; add images or change the fractions"
        )
    counts[rest] = remainder
    result: dict[str, list[T]] = {}
    start = 0
    for name in fractions:
        chosen = order[start : start + counts[name]]
        result[name] = [items[i] for i in chosen]
        start += counts[name]
    return result


def _check_fractions(fractions: dict[str, float | None]) -> str:
    """Validate; return the name of the set that takes the rest."""
    if len(fractions) < 2:
        raise VelcroError("a split needs at least two sets (e.g. calibration and validation)")
    rests = [name for name, f in fractions.items() if f is None]
    if len(rests) > 1:
        raise VelcroError(f"only one set may take the rest; {', '.join(rests)} all do")
    for name, f in fractions.items():
        if f is not None and (math.isnan(f) or not 0.0 <= f < 1.0):
            raise VelcroError(
                f"split fraction {f} for '{name}' is out of range; give a fraction in [0, 1)"
            )
    fixed = sum(f for f in fractions.values() if f is not None)
    if rests:
        if fixed >= 1.0:
            raise VelcroError(
                f"split fractions {_describe(fractions)} leave nothing for '{rests[0]}'; "
                "make them sum to less than 1"
            )
        return rests[0]
    if abs(fixed - 1.0) > 1e-9:
        raise VelcroError(
            f"split fractions {_describe(fractions)} sum to {fixed:g}, not 1; make them sum "
            "to 1 or give one set the fraction None (the rest)"
        )
    return list(fractions)[-1]


def _describe(fractions: Mapping[str, float | None]) -> str:
    return ", ".join(f"{n}={'rest' if f is None else f'{f:g}'}" for n, f in fractions.items())


def _stratified_order(total: int, labels: Sequence[Hashable] | None, seed: int) -> list[int]:
    """An order of 0..total-1 whose every prefix holds each label in about its share.

    Each label's indices are shuffled, then item j of a label with n items gets the key
    (j + u) / n with u uniform in [0, 1) per label; sorting by key interleaves the labels
    in proportion (systematic sampling), so a prefix of length k holds k*n/total +- 1 of
    each label.
    """
    rng = np.random.default_rng(seed)
    if labels is None:
        return rng.permutation(total).tolist()
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        groups[label].append(index)
    keyed: list[tuple[float, int, int]] = []
    for rank, label in enumerate(sorted(groups, key=repr)):
        members = groups[label]
        shuffled = rng.permutation(len(members))
        offset = rng.random()
        for j, position in enumerate(shuffled):
            keyed.append(((j + offset) / len(members), rank, members[position]))
    keyed.sort()
    return [index for _, _, index in keyed]


@dataclass
class Split:
    """A saved split of one image folder: named sets of ``(relative path, label)`` pairs.

    Attributes:
        sets: set name -> list of ``(path relative to root, class index)``.
        root: the image folder the paths are relative to.
        seed: the seed the split was drawn with.
        fractions: the requested fractions (``None`` = the rest).
        info: task name, classes, class mapping and other metadata.

    Example:
        >>> s = Split.load("cats.split.json")
        >>> s
        Split of 'imagenet/val' (seed 0): 5 calibration, 245 validation images
        >>> len(s.sets["calibration"]), len(s.sets["validation"])
        (5, 245)
    """

    sets: dict[str, list[tuple[str, int]]]
    root: str
    seed: int = 0
    fractions: dict[str, float | None] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        sets = [f"{len(items):,} {name}" for name, items in self.sets.items()]
        total = sum(len(items) for items in self.sets.values())
        noun = plural(total, "image").split(" ", 1)[1]
        return f"Split of '{self.root}' (seed {self.seed}): {', '.join(sets)} {noun}"

    def counts(self) -> dict[str, int]:
        """Number of images in each set."""
        return {name: len(items) for name, items in self.sets.items()}

    def to_dict(self) -> dict:
        """Everything :meth:`save` writes, as plain data (JSON-ready).

        Example:
            >>> split.to_dict()["counts"]
            {'calibration': 5, 'validation': 245}
        """
        return {"format": FORMAT, "root": self.root, "seed": self.seed,
                "fractions": self.fractions, "counts": self.counts(), "info": self.info,
                "sets": {name: [[path, int(label)] for path, label in items]
                         for name, items in self.sets.items()}}

    def __getitem__(self, name: str) -> list[tuple[str, int]]:
        try:
            return self.sets[name]
        except KeyError:
            raise VelcroError(
                f"the split has no set '{name}'; it has {', '.join(self.sets)}"
            ) from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the split as JSON (atomically): one line per image.

        Example:
            >>> split.save("cats.split.json")
        """
        document = self.to_dict()
        del document["sets"]
        head = json.dumps(document, indent=1)[:-2]
        bodies = []
        for name, items in self.sets.items():
            rows = ",\n   ".join(json.dumps([p, int(label)]) for p, label in items)
            bodies.append(f'  {json.dumps(name)}: [\n   {rows}\n  ]' if items
                          else f"  {json.dumps(name)}: []")
        text = head + ',\n "sets": {\n' + ",\n".join(bodies) + "\n }\n}\n"
        write_text_atomic(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Split:
        """Read a split written by :meth:`save`, validating every field.

        Refused with a :class:`VelcroError` naming the file and the field: a missing or
        mistyped field, a path that is absolute or leaves the root (``..``), a negative or
        non-integer label, an image listed twice or in two sets, counts that disagree with
        the sets, fractions outside [0, 1).
        """
        fields = Fields(path, "split", "`velcro calibrate` writes one")
        if not Path(path).is_file():
            raise fields.error("", "does not exist")
        document = fields.document(read_json(path, fields, MAX_SPLIT_BYTES), (FORMAT,))
        sets_field = fields.dict(document, "sets")
        if len(sets_field) > MAX_SETS:
            raise fields.error("sets", f"has {len(sets_field)} sets, more than {MAX_SETS}")
        owner: dict[str, str] = {}
        sets = {}
        for name, items in sets_field.items():
            where = f"sets.{name}"
            if not isinstance(items, list):
                raise fields.error(where, f"must be a list of [path, label], not {show(items)}")
            sets[name] = [_item(item, f"{where}[{i}]", fields) for i, item in enumerate(items)]
            for i, (image, _) in enumerate(sets[name]):
                if image in owner:
                    other = owner[image]
                    raise fields.error(f"{where}[{i}]", f"lists {image!r}, already in set "
                                       f"{other!r}" + ("" if other == name else
                                                       " (sets must be disjoint)"))
                owner[image] = name
        counts = fields.dict(document, "counts", default={})
        for name, value in counts.items():
            if name not in sets or value != len(sets[name]):
                raise fields.error(f"counts.{name}", f"is {show(value)}, but the set lists "
                                   f"{plural(len(sets.get(name, [])), 'image')}")
        fractions = fields.dict(document, "fractions", default={})
        for name in fractions:
            fields.optional(fields.number, fractions, name, "fractions", low=0.0, high=1.0)
        return cls(sets, fields.string(document, "root", default="", max_len=4096),
                   fields.integer(document, "seed", default=0, low=0, high=2**63 - 1),
                   dict(fractions), fields.dict(document, "info", default={}))


def _item(item: object, where: str, fields: Fields) -> tuple[str, int]:
    """One ``[relative path, label]`` entry of a set."""
    if not isinstance(item, list) or len(item) != 2:
        raise fields.error(where, f"must be [path, label], not {show(item)}")
    image, label = item
    if not isinstance(image, str) or not image or len(image) > 4096 or "\x00" in image:
        raise fields.error(where, f"must start with a relative path, not {show(image)}")
    parts = PurePosixPath(image).parts
    if PurePosixPath(image).is_absolute() or ".." in parts or image.startswith("\\"):
        raise fields.error(where, f"names {image!r}, outside the split's root (paths are "
                           "relative to it)")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < 2**31:
        raise fields.error(where, f"has label {show(label)}, not a class index (an integer "
                           ">= 0)")
    return image, label

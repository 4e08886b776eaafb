"""Which preprocessing a command's images get: recorded, the model's own, or the options'.

``calibrate`` starts from the registered model's preprocessing (``models.preprocess_for``),
or from torchvision's ImageNet transform for a model of a factory or a trimmed file (and says
so), and records what it used in the statistics and the split. ``search``, ``sweep`` and
``evaluate`` start from what the statistics, the plan or the split record: the plan's
constants are per element of those images' activations, and the accuracy reported depends on
it. An option that differs from a recorded setting is refused before any work, unless
``--force-preprocess`` (then it is said on stderr and recorded in the summary).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence

from velcro.cli import _values as values
from velcro.data import (
    Preprocess,
    preprocess_differences,
    recorded_preprocess,
)
from velcro.data._preprocess import INTERPOLATIONS
from velcro.errors import VelcroError

# every field of Preprocess but the image mode (RGB for every model here)
FIELDS = ("resize", "crop", "mean", "std", "interpolation", "scale", "crop_fraction")
OPTIONS = {field: "--" + field.replace("_", "-") for field in FIELDS}


def add_preprocess_options(group) -> None:
    """--resize, --crop, --mean, --std, --interpolation, --scale, --crop-fraction and
    --force-preprocess; each left out keeps the recorded (or the model's) setting."""
    default = "(default: as calibration recorded; for calibrate, the model's own)"
    group.add_argument("--resize", type=values.IMAGE_SIDE, default=None, metavar="PX",
                       help=f"shorter side after resizing, 0: no resize {default}")
    group.add_argument("--crop", type=values.IMAGE_SIDE, default=None, metavar="PX",
                       help=f"center-crop size, 0: no crop {default}")
    group.add_argument("--mean", default=None, metavar="R,G,B",
                       help=f"normalisation mean, in units of pixels / scale {default}")
    group.add_argument("--std", default=None, metavar="R,G,B",
                       help=f"normalisation std, in units of pixels / scale {default}")
    group.add_argument("--interpolation", default=None, choices=tuple(INTERPOLATIONS),
                       help=f"resampling filter for resizing {default}")
    group.add_argument("--scale", type=values.fraction(0.0, 65535.0, open_low=True),
                       default=None, metavar="S",
                       help=f"pixels are divided by S before normalising: 255 gives [0, 1], "
                            f"1 keeps 0..255 {default}")
    group.add_argument("--crop-fraction", type=values.fraction(), default=None, metavar="F",
                       help="TensorFlow's evaluation crop: the central F of the shorter side, "
                            "resized to --crop (with --resize 0); 0: resize, then crop "
                            f"{default}")
    group.add_argument("--force-preprocess", action="store_true",
                       help="use the preprocessing options even where they differ from what "
                            "calibration recorded (the statistics' constants and the reported "
                            "accuracy then mean something else)")


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        numbers = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise VelcroError(f"{option} '{text}' is not a comma list of numbers") from None
    if not numbers or any(not math.isfinite(v) for v in numbers):
        raise VelcroError(f"{option} '{text}' is not a comma list of finite numbers")
    return numbers


def given_options(args: argparse.Namespace) -> dict[str, object]:
    """The preprocessing fields given on the command line, as :class:`Preprocess` values
    (0 turns resizing, cropping and the crop fraction off)."""
    given: dict[str, object] = {}
    for field in FIELDS:
        value = getattr(args, field, None)
        if value is None:
            continue
        if field in ("mean", "std"):
            value = _floats(value, OPTIONS[field])
        elif field in ("resize", "crop", "crop_fraction") and value == 0:
            value = None
        given[field] = value
    return given


def _with_options(base: Preprocess, given: dict[str, object], source: str) -> Preprocess:
    if not given:
        return base
    settings = dict(given)
    if "crop_fraction" not in settings and base.crop_fraction is not None \
            and settings.get("resize") is not None:
        raise VelcroError(
            f"--resize {settings['resize']}: the preprocessing of {source} cuts the central "
            f"{base.crop_fraction:g} of the shorter side and resizes it to the crop "
            "(--crop-fraction); give --crop-fraction 0 as well to resize, then crop")
    try:
        return dataclasses.replace(base, **settings)
    except VelcroError as exc:
        shown = " ".join(f"{OPTIONS[k]} {v}" for k, v in given.items())
        raise VelcroError(f"preprocessing options {shown} on {source}: {exc}") from None


def registered_name(spec: str | None) -> str | None:
    """The registry name of ``--model``, or None for a factory or a trimmed model file."""
    from velcro import models

    if not spec or spec.endswith(".json") or (":" in spec and not os.path.exists(spec)):
        return None
    return spec if spec in models.available() else None


def model_default(spec: str | None) -> tuple[Preprocess, str]:
    """The preprocessing a model gets when nothing is recorded: its registered one, or the
    ImageNet transform; and what to call it."""
    from velcro import models

    name = registered_name(spec)
    if name is not None:
        return models.preprocess_for(name), f"model {name}"
    return Preprocess(), "ImageNet default"


def check_values(args: argparse.Namespace) -> None:
    """The preprocessing options' values that need no model and no recorded setting,
    checked before any work: numbers, finite, a positive std."""
    given = given_options(args)
    std = given.get("std")
    if std is not None and any(not value > 0 for value in std):  # type: ignore[union-attr]
        raise VelcroError(f"--std '{args.std}': the values must be positive (they divide)")


def resolve(args: argparse.Namespace, recorded: Sequence[tuple[str, object]] = (),
            *, note=None) -> tuple[Preprocess, str, str | None]:
    """The preprocessing for this command, a few words on where it comes from, and a remark
    for the summary when a default applies that may not be the model's.

    Args:
        args: the parsed options (the preprocessing ones and ``model``).
        recorded: ``(how to name it, Stats/Plan/Split/info)`` in priority order; the first
            that records preprocessing is the base, and the options must agree with it.
        note: a function printing a one-line remark on stderr (``velcro.cli._common.note``),
            for options forced against the recorded preprocessing.

    Raises:
        VelcroError: an option that differs from the recorded setting (without
            ``--force-preprocess``), or settings that do not go together.
    """
    given = given_options(args)
    force = getattr(args, "force_preprocess", False)
    for label, source in recorded:
        base = recorded_preprocess(source, label) if source is not None else None
        if base is None:
            continue
        chosen = _with_options(base, given, label)
        differences = preprocess_differences(chosen, base)
        if not differences:
            return chosen, f"recorded in {label}", None
        listed = "; ".join(differences)
        if not force:
            raise VelcroError(
                f"{listed}: differs from the preprocessing recorded in {label} at calibration; "
                "the statistics' constants and the accuracy reported depend on it: leave the "
                "option out to reuse it, or give --force-preprocess")
        if note is not None:
            note(f"preprocessing differs from the one recorded in {label} (--force-preprocess): "
                 f"{listed}")
        return chosen, f"options, forced against {label}", None
    spec = getattr(args, "model", None)
    base, source = model_default(spec)
    chosen = _with_options(base, given, f"--model {spec}")
    missing = [OPTIONS[f] for f in ("resize", "crop", "mean", "std") if f not in given]
    remark = None
    if source == "ImageNet default" and missing:
        remark = (f"--model {spec} brings no preprocessing of its own and none is recorded: "
                  "torchvision's ImageNet transform applies where no option says otherwise; "
                  f"give {'/'.join(missing)} if its weights expect other")
    return chosen, source if not given else f"{source} with options", remark

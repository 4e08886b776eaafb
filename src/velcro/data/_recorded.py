"""Preprocessing recorded with results, and reused where their images are read again.

``velcro calibrate`` (and :func:`velcro.calibrate` on an :class:`ImageLoader`) record the
preprocessing in the statistics' ``info``; plans and splits carry it on. Statistics and plans
hold one tensor per element of the calibration images' activations, and the model saw those
images through that preprocessing: any other (a different mean, another crop) changes what the
constants mean and what accuracy is reported, so it is reused, never guessed again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from velcro.data._loader import ImageLoader
from velcro.data._preprocess import Preprocess
from velcro.data.folder import ImageFolder
from velcro.data.splits import Split
from velcro.errors import VelcroError

__all__ = ["describe_preprocess", "loader_for", "preprocess_differences", "recorded_preprocess"]

# the command-line option of each field, for messages
OPTION = {"resize": "--resize", "crop": "--crop", "mean": "--mean", "std": "--std",
          "mode": "mode", "interpolation": "--interpolation", "scale": "--scale",
          "crop_fraction": "--crop-fraction"}


def _info(source: object) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    info = getattr(source, "info", None)
    if not isinstance(info, Mapping):
        raise VelcroError(f"{type(source).__name__} records no information; give statistics, "
                          "a plan or a split made by velcro")
    return info


def recorded_preprocess(source: object, where: str = "") -> Preprocess | None:
    """The preprocessing that ``source`` records (``info["preprocess"]``), or None.

    Args:
        source: :class:`velcro.Stats`, :class:`velcro.Plan`, :class:`Split`, or their
            ``info`` mapping.
        where: how to name the source in an error (e.g. ``"--stats 'cats.stats.safetensors'"``).

    Raises:
        VelcroError: the recorded settings are not valid preprocessing.

    Example:
        >>> recorded_preprocess(velcro.Stats.load("cats.stats.safetensors")).crop
        224
    """
    settings = _info(source).get("preprocess")
    if settings is None:
        return None
    try:
        return Preprocess.from_dict(settings)
    except (VelcroError, TypeError) as exc:
        label = f"{where}: " if where else ""
        raise VelcroError(f"{label}the recorded preprocessing is not valid ({exc}); make the "
                          "file again with velcro calibrate") from None


def _show(field: str, value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        if field == "crop":
            return "x".join(str(v) for v in value)
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def preprocess_differences(first: Preprocess, second: Preprocess) -> list[str]:
    """The settings in which two preprocessings differ, as ``"--mean 0.5,0.5,0.5 (not
    0.485,0.456,0.406)"``: ``first``'s value, then ``second``'s.

    Example:
        >>> preprocess_differences(Preprocess(crop=32), Preprocess())
        ['--crop 32x32 (not 224x224)']
    """
    a, b = first.to_dict(), second.to_dict()
    return [f"{OPTION[key]} {_show(key, a[key])} (not {_show(key, b[key])})"
            for key in a if a[key] != b[key]]


def describe_preprocess(preprocess: Preprocess) -> str:
    """One line a person can check against a model's documentation.

    Example:
        >>> describe_preprocess(Preprocess(mean=(0.5,) * 3, std=(0.25,) * 3))
        'resize 256 (bilinear), crop 224x224, pixels / 255, mean 0.5,0.5,0.5, std 0.25,0.25,0.25'
    """
    settings = preprocess.to_dict()
    parts = []
    if preprocess.crop_fraction is not None:
        parts.append(f"central {preprocess.crop_fraction:g} of the shorter side resized to "
                     f"{_show('crop', settings['crop'])} ({preprocess.interpolation})")
    else:
        parts.append(f"resize {preprocess.resize} ({preprocess.interpolation})"
                     if preprocess.resize else "no resize")
        parts.append(f"crop {_show('crop', settings['crop'])}" if preprocess.crop
                     else "no crop")
    parts.append(f"pixels / {preprocess.scale:g}")
    parts.append(f"mean {_show('mean', settings['mean'])}, std {_show('std', settings['std'])}")
    if preprocess.mode != "RGB":
        parts.append(f"mode {preprocess.mode}")
    return ", ".join(parts)


def _split_of(images: object, info: Mapping[str, Any]) -> Split | None:
    if images is None:
        images = info.get("split")
        if not images:
            raise VelcroError("give the images: a split, a split file or an image folder (the "
                              "statistics record no split)")
    if isinstance(images, Split):
        return images
    path = Path(images)  # type: ignore[arg-type]
    if path.is_dir():
        return None
    return Split.load(path)


def loader_for(
    recorded: object,
    images: Split | str | os.PathLike | None = None,
    *,
    subset: str | None = "validation",
    preprocess: Preprocess | None = None,
    force: bool = False,
    batch_size: int = 32,
    workers: int = 0,
) -> ImageLoader:
    """Batches of a task's images, preprocessed as ``recorded`` says calibration saw them.

    Use it wherever images meet statistics or a plan again (search, evaluation): a plan's
    constants are per element of the calibration images' activations, and the accuracy it
    is reported with depends on the preprocessing.

    Args:
        recorded: :class:`velcro.Stats`, :class:`velcro.Plan` or :class:`Split` (or their
            ``info``) that records the preprocessing (``velcro calibrate`` and
            :func:`velcro.calibrate` on an :class:`ImageLoader` record it).
        images: a :class:`Split` or split file (its folder, classes and labels are used), or
            an image folder (the task classes ``recorded`` names are kept). None: the split
            that ``recorded`` names.
        subset: the set of the split to read (``"validation"``, ``"search"``, ...); None for
            all of its images. Ignored for a folder.
        preprocess: check that it equals the recorded one (an explicit choice); None reuses
            the recorded one.
        force: use ``preprocess`` even where it differs from the recorded one.
        batch_size: images per batch.
        workers: image-decoding worker processes.

    Returns:
        An :class:`ImageLoader` whose images must all have one size.

    Raises:
        VelcroError: nothing recorded and no ``preprocess`` given, a ``preprocess`` that
            differs from the recorded one (without ``force``), or images that do not fit.

    Example:
        >>> stats = velcro.Stats.load("cats.stats.safetensors")
        >>> validation = loader_for(stats, "cats.stats.split.json")
        >>> velcro.evaluate(velcro.apply(model, plan), validation)
    """
    info = _info(recorded)
    found = recorded_preprocess(info, type(recorded).__name__)
    if found is None and preprocess is None:
        raise VelcroError(f"{type(recorded).__name__} records no preprocessing; pass "
                          "preprocess=velcro.models.preprocess_for(name) or the Preprocess "
                          "calibration used")
    if found is not None and preprocess is not None and not force:
        differences = preprocess_differences(preprocess, found)
        if differences:
            raise VelcroError(
                f"the preprocessing given differs from the one recorded at calibration in "
                f"{', '.join(differences)}; the statistics' constants and the accuracy "
                "depend on it: leave preprocess out, or pass force=True")
    chosen = preprocess if preprocess is not None else found
    split = _split_of(images, info)
    if split is None:
        classes = info.get("classes")
        folder = ImageFolder(images, classes=classes, preprocess=chosen,  # type: ignore[arg-type]
                             missing_classes="skip" if classes else "error")
    else:
        mapping = split.info.get("class_to_index")
        labels: Any = ({str(k): int(v) for k, v in mapping.items()}
                       if isinstance(mapping, Mapping) and mapping else "auto")
        classes = split.info.get("classes")
        folder = ImageFolder(split.root, classes=classes, labels=labels, preprocess=chosen,
                             missing_classes="skip" if classes else "error")
        if subset is not None:
            folder = folder.subset(split[subset])
        else:
            folder = folder.subset([item for name in split.sets for item in split[name]])
    return ImageLoader(folder, batch_size=batch_size, workers=workers, same_size=True)

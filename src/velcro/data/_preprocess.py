"""Evaluation preprocessing as data, with Pillow and NumPy (no torchvision).

The default is torchvision's ImageNet transform with its numerics: resize the shorter side
(bilinear, antialiased as Pillow does), center-crop, scale to [0, 1] and normalise per channel,
``Resize(256) -> CenterCrop(224) -> ToTensor() -> Normalize``. The other fields describe the
models that were trained otherwise: Pillow's bicubic filter, pixels kept in 0..255
(``scale=1``), and TensorFlow's EfficientNet evaluation crop (``crop_fraction``: the central
``224 / (224 + 32)`` of the shorter side, cut first, then resized to the crop size).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image

from velcro.errors import VelcroError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
_CHANNELS = {"RGB": 3, "L": 1}
# The largest resize or crop: beyond any model's input (a typo such as --crop 100000 would
# otherwise allocate 100000^2 pixels per image).
MAX_IMAGE_SIDE = 4096
_MAX_SCALE = 65535.0
_FIELDS = ("resize", "crop", "mean", "std", "mode", "interpolation", "scale", "crop_fraction")


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """``(width, height)`` after scaling the shorter side to ``shorter`` (torchvision's rule:
    the longer side is truncated, ``int(shorter * long / short)``)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def resize_shorter(
    image: Image.Image, shorter: int, resample: int = Image.BILINEAR
) -> Image.Image:
    """Scale ``image`` so that its shorter side is ``shorter`` pixels (bilinear by default)."""
    size = resized_size(*image.size, shorter)
    if size == image.size:
        return image
    return image.resize(size, resample)


def central_fraction_box(width: int, height: int, fraction: float) -> tuple[int, int, int, int]:
    """The ``(left, top, right, bottom)`` square of TensorFlow's EfficientNet evaluation crop.

    Its side is ``int(fraction * shorter side)`` (truncated) and its offsets are rounded up,
    ``(size - side + 1) // 2``, as ``_decode_and_center_crop`` in tensorflow/tpu computes them.

    Example:
        >>> central_fraction_box(227, 227, 224 / 256)
        (15, 15, 213, 213)
    """
    side = max(1, int(fraction * min(width, height)))
    left, top = (width - side + 1) // 2, (height - side + 1) // 2
    return left, top, left + side, top + side


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """The central ``height x width`` window of an ``(H, W, C)`` array.

    An image smaller than the window is first padded with zeros on both sides, as
    torchvision's ``CenterCrop`` does; offsets are rounded the way it rounds them.
    """
    rows, cols = pixels.shape[:2]
    if rows < height or cols < width:
        pad_rows, pad_cols = max(height - rows, 0), max(width - cols, 0)
        pixels = np.pad(
            pixels,
            ((pad_rows // 2, (pad_rows + 1) // 2), (pad_cols // 2, (pad_cols + 1) // 2))
            + ((0, 0),) * (pixels.ndim - 2),
        )
        rows, cols = pixels.shape[:2]
    top = int(round((rows - height) / 2.0))
    left = int(round((cols - width) / 2.0))
    return pixels[top : top + height, left : left + width]


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _size(value: object, option: str) -> int:
    if not _is_int(value) or not 1 <= int(value) <= MAX_IMAGE_SIDE:  # type: ignore[call-overload]
        raise VelcroError(f"{option} must be a size in pixels from 1 to {MAX_IMAGE_SIDE}, got "
                          f"{value!r}")
    return int(value)  # type: ignore[call-overload]


def _values(value: object, option: str) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise VelcroError(f"{option} must be a list of numbers (one per channel), got {value!r}")
    values = tuple(value)  # type: ignore[call-overload]
    if not all(_is_number(v) for v in values):
        raise VelcroError(f"{option} must be a list of numbers (one per channel), got {value!r}")
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class Preprocess:
    """Image -> normalised float32 tensor ``(C, H, W)``; the default is the ImageNet transform.

    Two geometries: torchvision's (``resize`` the shorter side, then center-``crop``), or, with
    ``crop_fraction``, TensorFlow's EfficientNet one (cut the central ``crop_fraction`` of the
    shorter side, then resize that square to ``crop``; ``resize`` is then None). The tensor is
    ``(pixels / scale - mean) / std`` in float32, with pixels 0..255.

    Attributes:
        resize: the shorter side after resizing, or None to keep the image's size.
        crop: the crop size (an int for a square, or ``(height, width)``), or None. A square
            given as ``(s, s)`` is stored as ``s``.
        mean, std: per-channel normalisation, in the units of ``pixels / scale``.
        mode: the Pillow mode images are converted to (``RGB`` or ``L``).
        interpolation: Pillow's resampling filter for resizing, ``bilinear`` or ``bicubic``.
        scale: pixels are divided by it before normalising: 255 gives [0, 1] (torchvision's
            ``ToTensor``), 1 keeps 0..255 (TensorFlow models, with mean and std in pixels).
        crop_fraction: in (0, 1], selects TensorFlow's crop-then-resize; None for torchvision's.

    Raises:
        VelcroError: a setting of the wrong type or out of range (one line naming it).

    Example:
        >>> tensor = Preprocess()(Image.open("cat.jpg"))
        >>> tensor.shape
        torch.Size([3, 224, 224])
        >>> lite0 = Preprocess(resize=None, crop=224, crop_fraction=224 / 256,
        ...                    interpolation="bicubic", scale=1, mean=(127,) * 3,
        ...                    std=(128,) * 3)
    """

    resize: int | None = 256
    crop: int | tuple[int, int] | None = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    mode: str = "RGB"
    interpolation: str = "bilinear"
    scale: float = 255.0
    crop_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in _CHANNELS:
            raise VelcroError(f"image mode '{self.mode}' is unsupported; use RGB or L")
        if self.interpolation not in INTERPOLATIONS:
            raise VelcroError(f"interpolation {self.interpolation!r} is unsupported; use "
                              f"{' or '.join(INTERPOLATIONS)}")
        if not _is_number(self.scale) or not 0 < self.scale <= _MAX_SCALE:
            raise VelcroError(f"scale must be a number in (0, {_MAX_SCALE:g}] (255: pixels in "
                              f"[0, 1], 1: pixels in 0..255), got {self.scale!r}")
        set_field = partial(object.__setattr__, self)
        set_field("scale", float(self.scale))
        mean, std = _values(self.mean, "--mean"), _values(self.std, "--std")
        set_field("mean", mean)
        set_field("std", std)
        channels = _CHANNELS[self.mode]
        if len(mean) != channels or len(std) != channels:
            raise VelcroError(
                f"--mean and --std need {channels} values for {self.mode} images, got "
                f"{len(mean)} and {len(std)}"
            )
        if any(not s > 0 or math.isinf(s) for s in std):
            raise VelcroError(f"--std values must be positive and finite, got {std}")
        if any(math.isnan(m) or math.isinf(m) for m in mean):
            raise VelcroError(f"--mean values must be finite, got {mean}")
        top = 255.0 / self.scale
        if any(not 0 <= m <= top for m in mean):
            raise VelcroError(f"--mean values must lie in the pixel range [0, {top:g}] of "
                              f"scale {self.scale:g}, got {mean}; give mean and std in the "
                              "units of pixels / scale")
        if self.resize is not None:
            set_field("resize", _size(self.resize, "--resize"))
        if self.crop is not None:
            if _is_int(self.crop):
                set_field("crop", _size(self.crop, "--crop"))
            elif isinstance(self.crop, (tuple, list)) and len(self.crop) == 2:
                height, width = (_size(side, "--crop") for side in self.crop)
                set_field("crop", height if height == width else (height, width))
            else:
                raise VelcroError(f"--crop must be a size or (height, width), got {self.crop!r}")
        if self.crop_fraction is not None:
            fraction = self.crop_fraction
            if not _is_number(fraction) or not 0 < fraction <= 1:
                raise VelcroError(f"crop_fraction must be a number in (0, 1], got {fraction!r}")
            if self.crop is None or self.resize is not None:
                raise VelcroError("crop_fraction (crop, then resize to the crop size) needs a "
                                  "crop size and no resize; set crop and resize=None")
            set_field("crop_fraction", float(fraction))

    @property
    def crop_size(self) -> tuple[int, int]:
        """``(height, width)`` of the crop (only when ``crop`` is set)."""
        if isinstance(self.crop, int):
            return self.crop, self.crop
        return tuple(self.crop)  # type: ignore[arg-type, return-value]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != self.mode:
            image = image.convert(self.mode)
        resample = INTERPOLATIONS[self.interpolation]
        if self.crop_fraction is not None:
            height, width = self.crop_size
            image = image.crop(central_fraction_box(*image.size, self.crop_fraction))
            if image.size != (width, height):
                image = image.resize((width, height), resample)
        elif self.resize is not None:
            image = resize_shorter(image, self.resize, resample)
        pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.crop is not None and self.crop_fraction is None:
            pixels = center_crop(pixels, *self.crop_size)
        # torchvision's ToTensor + Normalize, in the same float32 operations
        scaled = pixels.astype(np.float32) / np.float32(self.scale)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        normalised = (scaled - mean) / std
        return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))

    def to_dict(self) -> dict:
        """JSON-ready settings, saved with results (read back by :meth:`from_dict`)."""
        return {"resize": self.resize,
                "crop": list(self.crop_size) if self.crop is not None else None,
                "mean": list(self.mean), "std": list(self.std), "mode": self.mode,
                "interpolation": self.interpolation, "scale": self.scale,
                "crop_fraction": self.crop_fraction}

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> Preprocess:
        """The preprocessing that :meth:`to_dict` wrote; settings it lacks take the defaults
        (so the older dicts without ``interpolation``, ``scale`` and ``crop_fraction`` read).

        Raises:
            VelcroError: not a mapping, an unknown setting, or a setting out of range.

        Example:
            >>> Preprocess.from_dict(Preprocess(crop=(4, 6)).to_dict()).crop
            (4, 6)
        """
        if not isinstance(settings, Mapping):
            raise VelcroError(f"preprocessing settings must be a mapping, got "
                              f"{type(settings).__name__}")
        unknown = sorted(str(key) for key in settings if key not in _FIELDS)
        if unknown:
            raise VelcroError(f"unknown preprocessing setting {unknown[0]!r}; the settings are "
                              f"{', '.join(_FIELDS)}")
        return cls(**settings)

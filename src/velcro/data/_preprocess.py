"""ImageNet evaluation preprocessing with Pillow and NumPy (torchvision's numerics, no torchvision).

Resize the shorter side (bilinear, antialiased as Pillow does), center-crop, scale to [0, 1]
and normalise per channel: ``Resize(256) -> CenterCrop(224) -> ToTensor() -> Normalize``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from velcro.errors import VelcroError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CHANNELS = {"RGB": 3, "L": 1}


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """``(width, height)`` after scaling the shorter side to ``shorter`` (torchvision's rule:
    the longer side is truncated, ``int(shorter * long / short)``)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def resize_shorter(image: Image.Image, shorter: int) -> Image.Image:
    """Scale ``image`` so that its shorter side is ``shorter`` pixels (bilinear)."""
    size = resized_size(*image.size, shorter)
    if size == image.size:
        return image
    return image.resize(size, Image.BILINEAR)


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


@dataclass(frozen=True)
class Preprocess:
    """Image -> normalised float32 tensor ``(C, H, W)``: the ImageNet evaluation transform.

    Attributes:
        resize: the shorter side after resizing, or None to keep the image's size.
        crop: the center-crop size (an int for a square, or ``(height, width)``), or None.
        mean, std: per-channel normalisation, applied after scaling pixels to [0, 1].
        mode: the Pillow mode images are converted to (``RGB`` or ``L``).

    Example:
        >>> tensor = Preprocess()(Image.open("cat.jpg"))
        >>> tensor.shape
        torch.Size([3, 224, 224])
    """

    resize: int | None = 256
    crop: int | tuple[int, int] | None = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    mode: str = "RGB"

    def __post_init__(self) -> None:
        if self.mode not in _CHANNELS:
            raise VelcroError(f"image mode '{self.mode}' is unsupported; use RGB or L")
        channels = _CHANNELS[self.mode]
        if len(self.mean) != channels or len(self.std) != channels:
            raise VelcroError(
                f"--mean and --std need {channels} values for {self.mode} images, got "
                f"{len(self.mean)} and {len(self.std)}"
            )
        if any(not s > 0 or math.isinf(s) for s in self.std):
            raise VelcroError(f"--std values must be positive and finite, got {self.std}")
        if any(math.isnan(m) or math.isinf(m) for m in self.mean):
            raise VelcroError(f"--mean values must be finite, got {self.mean}")
        if self.resize is not None and self.resize < 1:
            raise VelcroError(f"--resize must be a positive size, got {self.resize}")
        if self.crop is not None and min(self.crop_size) < 1:
            raise VelcroError(f"--crop must be a positive size, got {self.crop}")

    @property
    def crop_size(self) -> tuple[int, int]:
        """``(height, width)`` of the crop (only when ``crop`` is set)."""
        if isinstance(self.crop, int):
            return self.crop, self.crop
        return tuple(self.crop)  # type: ignore[arg-type, return-value]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != self.mode:
            image = image.convert(self.mode)
        if self.resize is not None:
            image = resize_shorter(image, self.resize)
        pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.crop is not None:
            pixels = center_crop(pixels, *self.crop_size)
        # torchvision's ToTensor + Normalize, in the same float32 operations
        scaled = pixels.astype(np.float32) / np.float32(255)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        normalised = (scaled - mean) / std
        return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))

    def to_dict(self) -> dict:
        """JSON-ready settings, saved with results."""
        return {"resize": self.resize,
                "crop": list(self.crop_size) if self.crop is not None else None,
                "mean": list(self.mean), "std": list(self.std), "mode": self.mode}

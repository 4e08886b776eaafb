"""Batches from an ImageFolder that skip unreadable images and remember them."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from velcro._format import plural
from velcro.data.folder import ImageFolder, UnreadableImage
from velcro.errors import VelcroError


class _Tolerant(Dataset):
    """Yields ``(tensor or None, label, path, reason)`` instead of raising on a bad image."""

    def __init__(self, folder: ImageFolder) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        path, label = self.folder.samples[index]
        try:
            return self.folder.preprocess(self.folder.load_image(path)), label, path, None
        except UnreadableImage as exc:
            return None, label, path, exc.reason


def _collate(batch):
    good = [item for item in batch if item[0] is not None]
    bad = [(item[2], item[3]) for item in batch if item[0] is None]
    if not good:
        return None, None, bad, None
    shapes = {tuple(item[0].shape) for item in good}
    if len(shapes) > 1:
        raise VelcroError(
            f"images have different sizes after preprocessing ({sorted(shapes)[:2]}); set a "
            "crop size (--crop) so that they can be batched"
        )
    images = torch.stack([item[0] for item in good])
    labels = torch.tensor([item[1] for item in good], dtype=torch.long)
    return images, labels, bad, good[0][2]


def _text(shape) -> str:
    return "x".join(map(str, shape))


class ImageLoader:
    """Iterable of ``(images, labels)`` batches over an :class:`ImageFolder`, in order.

    Images that cannot be decoded are left out of their batch and recorded in
    :attr:`skipped`; if no image at all can be read, iteration ends with a VelcroError that
    names the first bad file.

    Args:
        folder: the images.
        batch_size: images per batch.
        workers: DataLoader worker processes (0 decodes in this process).
        pin_memory: pin batches for faster copies to a GPU.
        same_size: every image must come out of preprocessing at the size of the first
            (statistics and plans are per element); another size is a VelcroError naming the
            image, instead of statistics over images of two sizes or a traceback.

    Example:
        >>> loader = ImageLoader(ImageFolder("val/cats"), batch_size=64, workers=4)
        >>> report = velcro.evaluate(model, loader)
        >>> loader.skipped
        {'n02123045/broken.JPEG': 'OSError: image file is truncated'}
    """

    def __init__(self, folder: ImageFolder, *, batch_size: int = 32, workers: int = 0,
                 pin_memory: bool = False, same_size: bool = False) -> None:
        if batch_size < 1:
            raise VelcroError(f"--batch-size must be at least 1, got {batch_size}")
        if workers < 0:
            raise VelcroError(f"--workers must be 0 or more, got {workers}")
        self.dataset = folder
        self.batch_size = batch_size
        self.workers = workers
        self.pin_memory = pin_memory
        self.same_size = same_size
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(_Tolerant(self.dataset), batch_size=self.batch_size,
                            shuffle=False, num_workers=self.workers, collate_fn=_collate,
                            pin_memory=self.pin_memory)
        read, size = 0, None
        for images, labels, bad, first_path in loader:
            self.skipped.update(bad)
            if images is None:
                continue
            size = size or tuple(images.shape[1:])
            if self.same_size and tuple(images.shape[1:]) != size:
                raise VelcroError(
                    f"image '{first_path}' is {_text(images.shape[1:])} after preprocessing, "
                    f"but the images before it are {_text(size)}; statistics and plans are per "
                    "element, so every image needs one size: set --crop (and --resize) as for "
                    "calibration"
                )
            read += labels.numel()
            yield images, labels
        if read == 0 and len(self.dataset) > 0:
            path, reason = next(iter(self.skipped.items()))
            count = len(self.dataset)
            which = (f"the one image in '{self.dataset.root}' could not be read" if count == 1
                     else f"none of the {plural(count, 'image')} in '{self.dataset.root}' "
                     "could be read")
            raise VelcroError(f"{which} (first: '{path}': {reason}); check the files")

    def skipped_list(self) -> list[dict[str, str]]:
        """The skipped images as JSON-ready ``{"path", "reason"}`` rows, sorted by path."""
        return [{"path": p, "reason": r} for p, r in sorted(self.skipped.items())]

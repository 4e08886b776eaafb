"""scikit-learn's bundled handwritten digits as a small, real, offline image task.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 grey-level scans (values 0..16, 10
classes, about 180 per digit) inside the package, so nothing is downloaded. They are upscaled
to 32x32 (bilinear), replicated to 3 channels (the built-in models take RGB) and normalised,
then split train/test per digit (stratified) with a seeded generator.

A *task* is a subset of digits; its images keep their original digit labels, so a model keeps
all 10 outputs and top-1 is taken over all 10 classes (the papers' protocol).

Example:
    >>> from velcro.data import digits
    >>> split = digits.load(seed=0)
    >>> task_test = digits.select(split.test, (3, 8))
    >>> task_test.tensors[0].shape[1:]
    torch.Size([3, 32, 32])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from velcro.errors import VelcroError

__all__ = ["CLASSES", "MEAN", "STD", "DigitsSplit", "load", "parse_task", "select",
           "split_stratified"]

CLASSES = 10
# Mean and standard deviation of all 1,797 images after scaling to [0, 1] and upscaling to
# 32x32; fixed constants so that normalisation does not depend on the split.
MEAN = 0.3053
STD = 0.3236


@dataclass
class DigitsSplit:
    """Train and test images of all ten digits.

    Attributes:
        train, test: ``TensorDataset(images float32 (N, 3, size, size), labels int64 (N,))``.
        train_index, test_index: positions of those images in ``load_digits()``'s order.
        seed: the seed of the stratified split.
    """

    train: TensorDataset
    test: TensorDataset
    train_index: torch.Tensor
    test_index: torch.Tensor
    seed: int


def _raw_digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise VelcroError(
            "the digits demo needs scikit-learn (its bundled digits images); install it with "
            "`pip install scikit-learn`"
        ) from None
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images, labels


def _prepare(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 8, 8) values 0..16 -> normalised (N, 3, size, size)."""
    scaled = (images / 16.0).unsqueeze(1)
    if size != scaled.shape[-1]:
        scaled = F.interpolate(scaled, size=(size, size), mode="bilinear", align_corners=False)
    return ((scaled - MEAN) / STD).expand(-1, 3, -1, -1).contiguous()


def split_stratified(
    labels: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices per label: ``round(fraction * n_label)`` of each label go to the second part.

    Args:
        labels: int64 labels, one per item.
        fraction: share of each label's items in the second part, in [0, 1].
        seed: seed of the permutation (the same seed gives the same split).

    Returns:
        ``(first, second)``: sorted int64 index tensors, disjoint, covering all items.

    Example:
        >>> rest, held_out = split_stratified(torch.tensor([0, 0, 1, 1]), 0.5, seed=0)
        >>> len(held_out)
        2
    """
    if not 0.0 <= fraction <= 1.0:
        raise VelcroError(f"split fraction {fraction} is out of range; give a fraction in [0, 1]")
    generator = torch.Generator().manual_seed(int(seed))
    first, second = [], []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        cut = int(round(fraction * members.numel()))
        second.append(members[:cut])
        first.append(members[cut:])
    return torch.sort(torch.cat(first)).values, torch.sort(torch.cat(second)).values


def load(*, size: int = 32, test_fraction: float = 0.3, seed: int = 0) -> DigitsSplit:
    """All 1,797 digits, upscaled and normalised, split train/test per digit.

    Args:
        size: image side after bilinear upscaling from 8x8.
        test_fraction: share of each digit's images held out for testing.
        seed: seed of the stratified split.

    Returns:
        A :class:`DigitsSplit`; images are ``(N, 3, size, size)`` float32, labels 0..9.

    Raises:
        VelcroError: scikit-learn is not installed, or ``size`` is below 8.

    Example:
        >>> split = load(seed=0)
        >>> len(split.train) + len(split.test)
        1797
    """
    if size < 8:
        raise VelcroError(f"digits size {size} is too small; give a side of at least 8 pixels")
    images, labels = _raw_digits()
    train, test = split_stratified(labels, test_fraction, seed)
    prepared = _prepare(images, size)
    return DigitsSplit(
        TensorDataset(prepared[train], labels[train]),
        TensorDataset(prepared[test], labels[test]),
        train,
        test,
        int(seed),
    )


def parse_task(text: str | Sequence[int]) -> tuple[int, ...]:
    """Digits of a task from ``"4,7,9"`` or a sequence; sorted, unique, each in 0..9.

    Example:
        >>> parse_task("8, 3")
        (3, 8)
    """
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            digits = [int(p) for p in parts]
        except ValueError:
            raise VelcroError(
                f"task '{text}' is not a list of digits; give digits 0-9 separated by commas, "
                "e.g. --task 3,8"
            ) from None
    else:
        digits = [int(d) for d in text]
    if not digits or any(not 0 <= d < CLASSES for d in digits):
        raise VelcroError(
            f"task {text!r} must name at least one digit in 0-9; e.g. --task 3,8"
        )
    return tuple(sorted(set(digits)))


def select(dataset: TensorDataset, task: Sequence[int]) -> TensorDataset:
    """The images of ``dataset`` whose label is one of the task's digits, labels unchanged.

    Args:
        dataset: a ``TensorDataset(images, labels)`` from :func:`load`.
        task: digits to keep.

    Example:
        >>> task_train = select(load().train, (3, 8))
        >>> sorted(set(task_train.tensors[1].tolist()))
        [3, 8]
    """
    images, labels = dataset.tensors[0], dataset.tensors[1]
    digits = torch.as_tensor(list(parse_task(task)), dtype=labels.dtype)
    keep = torch.isin(labels, digits)
    return TensorDataset(images[keep], labels[keep])

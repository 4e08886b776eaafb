"""The demo's model: ResNet-18 trained on the ten digits, cached as safetensors.

The built-in torchvision-compatible ResNet-18 is used unchanged (no stem adaptation): at 32x32
its 7x7/2 stem and max-pool leave 8x8 maps for ``layer1`` and 1x1 for ``layer4``, and it still
reaches about 98-99% test accuracy on the digits after a few epochs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from velcro._io import atomic_path
from velcro.data import digits
from velcro.errors import VelcroError
from velcro.models import create, load_weights

# Bump when the meaning of a recipe field changes, so older cache files are not reused.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    """How the digits model is trained; its hash keys the cache file.

    Example:
        >>> quick = Recipe(epochs=2, size=16)
        >>> result = run_demo(recipe=quick, out_dir=None)
    """

    model: str = "resnet18"
    size: int = 32
    test_fraction: float = 0.3
    epochs: int = 6
    batch_size: int = 64
    max_lr: float = 3e-3
    weight_decay: float = 0.0
    train_images: int | None = None  # a prefix of the shuffled training split (tests)

    def key(self) -> str:
        """A short hash of everything that decides the trained weights (the cache key)."""
        text = json.dumps({"version": RECIPE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Trained:
    """A trained digits model and where it came from."""

    model: nn.Module
    path: Path
    from_cache: bool
    train_seconds: float
    test_accuracy: float


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """``override``, else $VELCRO_CACHE, else $XDG_CACHE_HOME/velcro, else ~/.cache/velcro."""
    if override is not None:
        return Path(override)
    if os.environ.get("VELCRO_CACHE"):
        return Path(os.environ["VELCRO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "velcro"


def weights_path(recipe: Recipe, seed: int, directory: Path) -> Path:
    return directory / f"digits-{recipe.model}-seed{seed}-{recipe.key()}.safetensors"


def _accuracy(model: nn.Module, dataset) -> float:
    images, labels = dataset.tensors
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(images[i : i + 256]).argmax(1) == labels[i : i + 256]).sum())
                   for i in range(0, len(labels), 256))
    return hits / len(labels)


def _cached_accuracy(path: Path, model: nn.Module, split: digits.DigitsSplit) -> float:
    """The test accuracy recorded when the weights were cached (measured again if absent)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        recorded = (handle.metadata() or {}).get("test_accuracy")
    try:
        return float(recorded)
    except (TypeError, ValueError):
        return _accuracy(model, split.test)


def train(recipe: Recipe, split: digits.DigitsSplit, seed: int, *,
          progress: bool = True) -> nn.Module:
    """Train ``recipe.model`` on ``split.train`` (Adam, one-cycle schedule), seeded."""
    images, labels = split.train.tensors
    generator = torch.Generator().manual_seed(seed)
    if recipe.train_images is not None:
        keep = torch.randperm(len(labels), generator=generator)[: recipe.train_images]
        images, labels = images[keep], labels[keep]
    # Seed the weight initialisation without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create(recipe.model, num_classes=digits.CLASSES)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.max_lr,
                                 weight_decay=recipe.weight_decay)
    steps_per_epoch = -(-len(labels) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.max_lr, total_steps=recipe.epochs * steps_per_epoch)
    model.train()
    bar = tqdm(total=recipe.epochs * len(labels), unit="img", desc="train digits model",
               disable=not progress, file=sys.stderr, leave=False)
    with bar:
        for epoch in range(recipe.epochs):
            order = torch.randperm(len(labels), generator=generator)
            for start in range(0, len(labels), recipe.batch_size):
                batch = order[start : start + recipe.batch_size]
                loss = F.cross_entropy(model(images[batch]), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(len(batch))
                bar.set_postfix(epoch=f"{epoch + 1}/{recipe.epochs}", loss=f"{loss.item():.3f}")
    return model.eval()


def trained_model(
    split: digits.DigitsSplit,
    *,
    seed: int = 0,
    recipe: Recipe | None = None,
    cache: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> Trained:
    """Load the digits model from the cache, or train it and cache it (atomically).

    Args:
        split: the digits split to train on (its seed must be ``seed``).
        seed: seed of the weight initialisation and the batch order.
        recipe: training recipe (default :class:`Recipe`).
        cache: cache folder (default :func:`cache_dir`).
        use_cache: False retrains and overwrites the cached file.
        progress: show progress bars.
    """
    recipe = recipe or Recipe()
    directory = cache_dir(cache)
    path = weights_path(recipe, seed, directory)
    if use_cache and path.is_file():
        model = create(recipe.model, num_classes=digits.CLASSES)
        load_weights(model, path)
        model.eval()
        return Trained(model, path, True, 0.0, _cached_accuracy(path, model, split))
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VelcroError(
            f"cannot create the cache folder '{directory}': {exc.strerror or exc}; set "
            "VELCRO_CACHE to a writable folder"
        ) from None
    start = time.perf_counter()
    model = train(recipe, split, seed, progress=progress)
    seconds = time.perf_counter() - start
    accuracy = _accuracy(model, split.test)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {"recipe": json.dumps(asdict(recipe)), "seed": str(seed),
                "test_accuracy": f"{accuracy:.6f}", "train_seconds": f"{seconds:.1f}"}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return Trained(model, path, False, seconds, accuracy)

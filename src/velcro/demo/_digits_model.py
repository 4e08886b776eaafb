"""The demo's model: ResNet-18 trained on the ten digits, cached as safetensors.

The built-in torchvision-compatible ResNet-18 is used unchanged (no stem adaptation): at 32x32
its 7x7/2 stem and max-pool leave 8x8 maps for ``layer1`` and 1x1 for ``layer4``, and it still
reaches about 98-99% test accuracy on the digits after a few epochs.

Reproducible training: the seed fixes the initialisation and the batch order, and training
runs with a fixed number of intra-op threads (``Recipe.threads``) and deterministic kernels,
so that float sums are added in the same order whatever the caller's thread settings (which
are restored afterwards). Two fresh trainings in different processes give the same weights
bit for bit (tests/demo/test_reproducible.py). CPUs that torch dispatches to different
kernels (``torch.backends.cpu.get_cpu_capability()``: AVX2, AVX-512, ...) may still round
differently; the cache key records the capability, the torch version and the recipe, so a
cached file is never reused across torch versions, kernel families or recipes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterator
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

_HEADER_ALLOWANCE = 1 << 20  # bytes: a safetensors header of the demo's ~120 tensors is ~10 KiB

# Bump when the training code or the meaning of a recipe field changes, so that older cache
# files are not reused. 2: fixed threads and deterministic kernels.
RECIPE_VERSION = 2


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
    threads: int = 1  # intra-op threads while training: the order float sums are added in

    def key(self) -> str:
        """A short hash of everything that decides the trained weights (the cache key)."""
        text = json.dumps({"version": RECIPE_VERSION, **asdict(self), **_platform()},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _platform() -> dict:
    """What besides the recipe decides the trained bits: torch and the CPU kernels it uses."""
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine()}


@contextlib.contextmanager
def reproducible(threads: int) -> Iterator[None]:
    """Fixed intra-op threads, deterministic kernels and a private RNG for the duration;
    the caller's thread count, determinism flags and global RNG state come back after."""
    saved_threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(saved_threads)


@dataclass
class Trained:
    """A trained digits model and where it came from."""

    model: nn.Module
    path: Path
    from_cache: bool
    train_seconds: float
    test_accuracy: float
    cache_problem: str | None = None  # why a cached file was not used (and was replaced)


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
    """The test accuracy recorded when the weights were cached; measured again if it is
    absent or not a share in [0, 1] (the file is outside our control, like any input)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        recorded = (handle.metadata() or {}).get("test_accuracy")
    try:
        value = float(recorded)
    except (TypeError, ValueError):
        value = math.nan
    return value if 0.0 <= value <= 1.0 else _accuracy(model, split.test)


def _cache_problem(path: Path, model: nn.Module) -> str | None:
    """Why the cached weights file cannot be used, or None once ``model`` holds its weights.

    Bounded before anything is read: the file must be about the size of the model's own
    tensors (a safetensors file adds a header of a few KiB); then it is loaded as any weights
    file is (no pickle, names and shapes checked, every value finite).
    """
    expected = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size = path.stat().st_size
    if not expected <= size <= expected + _HEADER_ALLOWANCE:
        return (f"{size:,} bytes, where the weights of {type(model).__name__} take "
                f"{expected:,} plus a header")
    try:
        load_weights(model, path)
    except VelcroError as exc:
        return str(exc)
    return None


def train(recipe: Recipe, split: digits.DigitsSplit, seed: int, *,
          progress: bool = True) -> nn.Module:
    """Train ``recipe.model`` on ``split.train`` (Adam, one-cycle schedule), seeded, with
    ``recipe.threads`` threads and deterministic kernels (see the module docstring)."""
    if recipe.threads < 1:
        raise VelcroError(f"recipe threads {recipe.threads} is too small; train on at least one")
    with reproducible(recipe.threads):
        return _train(recipe, split, seed, progress)


def _train(recipe: Recipe, split: digits.DigitsSplit, seed: int,
           progress: bool) -> nn.Module:
    images, labels = split.train.tensors
    generator = torch.Generator().manual_seed(seed)
    if recipe.train_images is not None:
        keep = torch.randperm(len(labels), generator=generator)[: recipe.train_images]
        images, labels = images[keep], labels[keep]
    torch.manual_seed(seed)  # the weight initialisation (the caller's RNG is forked)
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

    A cached file that cannot be used (damaged, of another size than the model's weights,
    holding NaN or Inf) is trained again and replaced; ``Trained.cache_problem`` says why.

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
    problem = None
    if use_cache and path.is_file():
        model = create(recipe.model, num_classes=digits.CLASSES)
        problem = _cache_problem(path, model)
        if problem is None:
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
                "platform": json.dumps(_platform()), "recipe_version": str(RECIPE_VERSION),
                "test_accuracy": f"{accuracy:.6f}", "train_seconds": f"{seconds:.1f}"}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return Trained(model, path, False, seconds, accuracy, problem)

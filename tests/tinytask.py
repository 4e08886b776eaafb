"""A small classifier trained on generated images, with disjoint calibration, search and
validation splits: the shared fixture of the search, sweep and report tests."""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from zoo import build

CLASSES = 5
SHAPE = (3, 10, 10)


def generated_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class prototypes (fixed) plus seeded Gaussian noise: a task a small CNN half-solves."""
    prototypes = torch.randn(CLASSES, *SHAPE, generator=torch.Generator().manual_seed(99))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    noise = torch.randn(count, *SHAPE, generator=generator)
    return prototypes[labels] + 1.6 * noise, labels


def batches(images, labels, size: int = 100) -> list:
    return [(images[i : i + size], labels[i : i + size]) for i in range(0, len(images), size)]


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread: the tests' batches are tiny, and on a shared two-core machine a
    second thread only contends. Calibration's numba kernel sets the OpenMP thread count on its
    first launch, so it is launched once here, before the count is set."""
    import velcro

    threads = torch.get_num_threads()
    model, shape = build("mlp")
    velcro.calibrate(model, [torch.zeros(2, *shape)], progress=False)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def trained_task() -> dict:
    """The model (trained a few epochs) and three disjoint splits of one generated pool.

    Returns a dict: model, calibration, search, validation (lists of labelled batches) and
    the pool indices of each split (``*_ids``).
    """
    with one_thread():
        return _train_and_split()


def _train_and_split() -> dict:
    torch.manual_seed(0)
    model, _ = build("chain")
    train_x, train_y = generated_images(800, seed=1)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(5):
        order = torch.randperm(len(train_x))
        for start in range(0, len(train_x), 50):
            chosen = order[start : start + 50]
            loss = F.cross_entropy(model(train_x[chosen]), train_y[chosen])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    pool_x, pool_y = generated_images(900, seed=2)
    order = torch.randperm(900, generator=torch.Generator().manual_seed(3))
    ids = {"calibration": order[:200], "search": order[200:500], "validation": order[500:]}
    task = {"model": model}
    for name, chosen in ids.items():
        task[name] = batches(pool_x[chosen], pool_y[chosen])
        task[f"{name}_ids"] = chosen.tolist()
    return task

"""Nested validation inside the search: a fixed sequence of candidates tested on unseen images.

The search's own acceptance is biased upwards: among many candidates judged on the same
images it keeps the one that saves most, so it favours those that happened to do well on
those images (the winner's curse). Part of the search images (the *check* images) is
therefore held back from it. After the search:

1. **The path**: the searched plan and the feasible candidates it contains (every site's
   units a subset of the searched plan's: the steps the search climbed through, such as
   the capped-uniform points and the refinement's accepted rises), so that the risk grows
   along it; ``points`` of them at growing savings: for each target objective
   ``best * i / points`` (i = 1..points), the one with the largest objective not above
   it. The path depends on the search images only. (Candidates outside the searched plan,
   such as a single site compressed hard while profiling, can be riskier than it at a
   lower saving: a fixed sequence through them would stop early.)
2. **Fixed-sequence test**: the path's candidates are tested on the check images in
   ascending order with the same guard, stopping at the first that fails; the plan is the
   last that passed (the uncompressed model if the first fails). When the searched plan
   fails, this is the back-off along the trajectory to the largest saving that passes.

Why ascending and not "the best first, then back off until one passes": testing in an order
fixed in advance and stopping at the first failure accepts a plan whose true loss exceeds
the tolerance only if the *first* such plan of the path passes its own test, which happens
with probability at most 1 - confidence; no correction for the number of points is needed
(fixed-sequence testing, as in Learn-then-Test, Angelopoulos et al. 2021). Testing from the
top down until one passes would give every failing plan its own chance to slip through.
With ``confidence=None`` the same sequence is tested on the point estimate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from velcro.errors import VelcroError


def split_check(batches: list, fraction: float, seed: int = 0) -> tuple[list, list, list[int]]:
    """Split in-memory batches into (search, check) batches: ``fraction`` of the images go to
    the check, stratified by label when there are labels, seeded; batch size kept. Also
    returns the check images' positions in the data, ascending."""
    from velcro.data.splits import split  # velcro.data loads Pillow: not at import time

    if not 0.0 < fraction < 1.0:
        raise VelcroError(f"check_fraction {fraction} is out of range; give a fraction in "
                          "(0, 1), or 0 for no nested check")
    images = torch.cat([x for x, _ in batches])
    labels = None if batches[0][1] is None else torch.cat([y for _, y in batches])
    total = int(images.shape[0])
    if total < 2:
        raise VelcroError(f"the search data holds {total} image; a nested check needs at "
                          "least 2 (or give check_fraction 0)")
    parts = split(list(range(total)), {"check": fraction, "search": None}, seed=seed,
                  labels=None if labels is None else labels.tolist())
    size = int(batches[0][0].shape[0])

    def batched(indices: list[int]) -> list:
        order = torch.as_tensor(sorted(indices), dtype=torch.long, device=images.device)
        chunks = []
        for start in range(0, len(order), size):
            chosen = order[start : start + size]
            chunks.append((images[chosen], None if labels is None else labels[chosen]))
        return chunks

    return batched(parts["search"]), batched(parts["check"]), sorted(parts["check"])


def backoff_path(feasible: Sequence[tuple[tuple[int, ...], float]], searched: tuple[int, ...],
                 points: int) -> list:
    """The candidates to test, ascending: of the feasible candidates contained in the searched
    plan, per target ``best * i / points`` the one with the largest objective at or below it.

    Args:
        feasible: ``(counts, objective)`` of every candidate the search found feasible
            (the uncompressed model excluded).
        searched: the searched plan's unit counts per site (the last point of the path).
        points: how many targets.

    Returns:
        Distinct counts, in ascending objective.

    Example:
        >>> backoff_path([((1, 0), 0.1), ((0, 3), 0.2), ((2, 1), 0.3), ((3, 1), 0.4)],
        ...              (3, 1), 2)
        [(1, 0), (3, 1)]
    """
    if points < 1:
        raise VelcroError(f"check_points {points} is too small; test at least one point")
    ranked = sorted((objective, counts) for counts, objective in feasible if objective > 0
                    and all(c <= s for c, s in zip(counts, searched, strict=True)))
    if not ranked:
        return []
    best = ranked[-1][0]
    path: list = []
    for i in range(1, points + 1):
        target = best * i / points + 1e-12
        below = [counts for objective, counts in ranked if objective <= target]
        if below and below[-1] not in path:
            path.append(below[-1])
    return path


def fixed_sequence(path: Sequence, passes: Callable[[object], bool]) -> tuple[int | None, list]:
    """Test ``path`` in order, stopping at the first failure.

    Returns:
        ``(index of the last that passed or None, [passed, ...] for the tested ones)``.

    Example:
        >>> fixed_sequence(["a", "b", "c", "d"], lambda p: p != "c")
        (1, [True, True, False])
    """
    results: list[bool] = []
    for candidate in path:
        ok = bool(passes(candidate))
        results.append(ok)
        if not ok:
            break
    passed = [i for i, ok in enumerate(results) if ok]
    return (passed[-1] if passed else None), results

"""The phases of the threshold search (see :func:`velcro.search` for the design)."""

from __future__ import annotations

import math
import time

from velcro.search._candidates import Rankings
from velcro.search._criteria import Guard
from velcro.search._evaluator import CandidateEvaluator, Outcome


class Searcher:
    """Holds what the phases share: memoised outcomes, the trajectory, the budget.

    Feasible means the guard passes the candidate: its loss against the uncompressed model
    (or its confidence bound) is within the tolerance (see ``_criteria``).
    Every candidate is a tuple of unit counts per site; a candidate met twice is evaluated
    once (``memo``, which a later search on the same data may inherit).
    """

    def __init__(self, evaluator: CandidateEvaluator, rankings: Rankings, weights: list[float],
                 guard: Guard, budget: int | None, memo: dict | None, bar) -> None:
        self.evaluator = evaluator
        self.rankings = rankings
        self.weights = weights
        self.budget = budget
        self.memo: dict[tuple[int, ...], Outcome] = dict(memo or {})
        self.trajectory: list[dict] = []
        self.evaluations = 0
        self.bar = bar
        self.sites = rankings.sites
        self.zeros = tuple(0 for _ in self.sites)
        self.guard = guard
        self.baseline: Outcome | None = None
        self.baseline = self.measure(self.zeros, "baseline", force=True)
        self.best = self.zeros
        self.alone_infeasible = [math.inf] * len(self.sites)
        self.started = time.perf_counter()

    # -- bookkeeping ------------------------------------------------------------------------
    def objective(self, counts) -> float:
        return sum(w * c / s.units for w, c, s in zip(self.weights, counts, self.sites,
                                                      strict=True))

    def fractions(self, counts) -> list[float]:
        return [c / s.units for c, s in zip(counts, self.sites, strict=True)]

    def exhausted(self) -> bool:
        return self.budget is not None and self.evaluations >= self.budget

    def feasible(self, outcome: Outcome) -> bool:
        return self.guard.passes(outcome.tally(self.baseline))

    def measure(self, counts, phase: str, reuse_from: int | None = None,
                force: bool = False) -> Outcome | None:
        """The outcome of ``counts``; None when the budget is spent."""
        counts = tuple(counts)
        cached = counts in self.memo
        if not cached:
            if self.exhausted() and not force:
                return None
            began = time.perf_counter()
            outcome, start_site = self.evaluator.evaluate(counts, reuse_from)
            seconds = time.perf_counter() - began
            self.memo[counts] = outcome
            self.evaluations += 1
            self.bar.update(1)
        else:
            outcome, start_site, seconds = self.memo[counts], None, 0.0
        tally = outcome.tally(self.baseline or outcome)
        feasible = phase == "baseline" or self.guard.passes(tally)
        self.trajectory.append({
            "phase": phase,
            "thresholds": [round(f, 6) for f in self.fractions(counts)],
            "objective": self.objective(counts),
            "saving_ratio": self.rankings.saving_ratio(counts),
            "accuracy": outcome.accuracy,
            "loss": outcome.loss,
            "agreement": outcome.agreement,
            "kl": outcome.kl,
            "criterion_loss": self.guard.loss(tally),
            "bound": self.guard.bound(tally),
            "feasible": feasible,
            "memoised": cached,
            "started_at_site": start_site,
            "seconds": seconds,
        })
        if phase != "baseline" and feasible and self.objective(counts) > self.objective(self.best):
            self.best = counts
            self.bar.set_postfix(objective=f"{self.objective(counts):.4f}")
        return outcome

    # -- phase 1 ----------------------------------------------------------------------------
    def profile(self, levels: list[float]) -> list[list[tuple[float, float]]]:
        """Each site alone: bisection over ``levels`` for the highest level feasible alone
        (about log2(levels) evaluations per site, each from the cached activations at the
        site).

        Returns per site the feasible points met ``(fraction, mean loss)``, ascending,
        starting at (0, baseline loss).
        """
        curves = []
        self.alone_infeasible = [math.inf] * len(self.sites)
        for k, site in enumerate(self.sites):
            curve = [(0.0, self.baseline.loss)]
            curves.append(curve)
            if self.weights[k] <= 0:
                continue
            counts_at = sorted({site.count(level) for level in levels} - {0})
            low, high = -1, len(counts_at)  # counts_at[low] feasible (or none), [high] not
            while high - low > 1:
                middle = (low + high + 1) // 2
                counts = list(self.zeros)
                counts[k] = counts_at[middle]
                outcome = self.measure(counts, "profile", reuse_from=k)
                if outcome is None:
                    break
                if self.feasible(outcome):
                    curve.append((counts_at[middle] / site.units, outcome.loss))
                    low = middle
                else:
                    high = middle
                    self.alone_infeasible[k] = counts_at[middle] / site.units
            curve.sort()
        return curves

    def no_profile(self) -> list[list[tuple[float, float]]]:
        """Curves that cap no site (the profile skipped)."""
        self.alone_infeasible = [math.inf] * len(self.sites)
        return [[(0.0, self.baseline.loss), (1.0, self.baseline.loss)] for _ in self.sites]

    # -- phase 2 ----------------------------------------------------------------------------
    def capped_uniform_path(self, curves, levels: int) -> list[tuple[int, ...]]:
        """T_k = min(lambda, cap_k) for growing lambda, where cap_k is the highest fraction
        site k was feasible at alone: uniform thresholds that spare the sensitive sites."""
        caps = [curve[-1][0] for curve in curves]
        lambdas = sorted({i / levels for i in range(1, levels + 1)} | set(caps) - {0.0})
        return self._path([[min(lam, cap) for cap in caps] for lam in lambdas])

    def _path(self, candidates) -> list[tuple[int, ...]]:
        """Unit counts of per-site fractions, in order, duplicates dropped, from zero."""
        path = [self.zeros]
        for fractions in candidates:
            counts = self.rankings.counts(fractions)
            if counts != path[-1]:
                path.append(counts)
        return path

    def bisect_path(self, path, phase: str) -> None:
        """The last feasible candidate of the path, by bisection (the whole path first)."""
        if len(path) < 2:
            return
        outcome = self.measure(path[-1], phase)
        if outcome is None or self.feasible(outcome):
            return
        low, high = 0, len(path) - 1  # low feasible, high not
        while high - low > 1:
            middle = (low + high) // 2
            outcome = self.measure(path[middle], phase)
            if outcome is None:
                return
            if self.feasible(outcome):
                low = middle
            else:
                high = middle

    # -- phase 3 ----------------------------------------------------------------------------
    def uniform(self, levels: list[float], patience: int | None) -> None:
        """Uniform thresholds above the best objective found so far, ascending, until
        ``patience`` consecutive infeasible ones (None: every level). With accuracy that
        falls with the threshold this finds the best feasible uniform level of the grid."""
        failures = 0
        for level in sorted(levels):
            counts = self.rankings.counts([level] * len(self.sites))
            if self.objective(counts) <= self.objective(self.best):
                continue
            outcome = self.measure(counts, "uniform")
            if outcome is None:
                return
            failures = 0 if self.feasible(outcome) else failures + 1
            if patience is not None and failures >= patience:
                return

    # -- phase 4 ----------------------------------------------------------------------------
    def refine(self, step: float, rounds: int) -> None:
        """Coordinate ascent from the best candidate: raise one site by ``step`` at a time
        (graph order, so each run starts from the cached activations at that site), keep
        the rise when still feasible; halve the step after each round."""
        state = list(self.best)
        # fractions found infeasible from a lower state, or alone: not worth trying again
        failed = list(self.alone_infeasible)
        for _ in range(rounds):
            for k, site in enumerate(self.sites):
                if self.weights[k] <= 0:
                    continue
                target = min(1.0, state[k] / site.units + step)
                count = site.count(target)
                if count <= state[k] or count / site.units >= failed[k] - 1e-12:
                    continue
                candidate = list(state)
                candidate[k] = count
                outcome = self.measure(candidate, "refine", reuse_from=k)
                if outcome is None:
                    return
                if self.feasible(outcome):
                    state = candidate
                else:
                    failed[k] = count / site.units
            step /= 2


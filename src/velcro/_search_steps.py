"""The phases of the threshold search (see :func:`velcro.search` for the design)."""

from __future__ import annotations

import math
import time

from velcro._search_eval import CandidateEvaluator, Outcome
from velcro._search_plans import Rankings


class Searcher:
    """Holds what the phases share: memoised outcomes, the trajectory, the budget.

    Feasible means ``correct >= floor``, i.e. search accuracy >= baseline - tolerance.
    Every candidate is a tuple of unit counts per site; a candidate met twice is evaluated
    once (``memo``, which a later search on the same data may inherit).
    """

    def __init__(self, evaluator: CandidateEvaluator, rankings: Rankings, weights: list[float],
                 tolerance: float, budget: int | None, memo: dict | None, bar) -> None:
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
        self.baseline = self.measure(self.zeros, "baseline", force=True)
        self.floor = self.baseline.correct - tolerance * evaluator.images - 1e-9
        self.best = self.zeros
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
        return outcome.correct >= self.floor

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
        feasible = phase == "baseline" or self.feasible(outcome)
        self.trajectory.append({
            "phase": phase,
            "thresholds": [round(f, 6) for f in self.fractions(counts)],
            "objective": self.objective(counts),
            "saving_ratio": self.rankings.saving_ratio(counts),
            "accuracy": outcome.accuracy,
            "loss": outcome.loss,
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
        """Each site alone at ascending levels, up to its first infeasible one.

        Returns per site the feasible points ``(fraction, mean loss)``, starting at (0, base).
        """
        curves = []
        for k, site in enumerate(self.sites):
            curve = [(0.0, self.baseline.loss)]
            curves.append(curve)
            if self.weights[k] <= 0:
                continue
            previous = 0
            for level in levels:
                count = site.count(level)
                if count == previous:
                    continue
                previous = count
                counts = list(self.zeros)
                counts[k] = count
                outcome = self.measure(counts, "profile", reuse_from=k)
                if outcome is None or not self.feasible(outcome):
                    break
                curve.append((count / site.units, outcome.loss))
        return curves

    # -- phase 2 ----------------------------------------------------------------------------
    def greedy_path(self, curves) -> list[tuple[int, ...]]:
        """Candidates of growing objective: each step takes the profile step with the most
        objective gained per unit of added loss (loss-free steps first), assuming the sites'
        loss increases add up. No evaluation is spent here."""
        position = [0] * len(self.sites)
        path = [self.zeros]
        while True:
            best_key, best_move = None, None
            for k, curve in enumerate(curves):
                here_t, here_loss = curve[position[k]]
                for j in range(position[k] + 1, len(curve)):
                    gain = self.weights[k] * (curve[j][0] - here_t)
                    added = curve[j][1] - here_loss
                    if gain <= 0:
                        continue
                    key = (1, gain) if added <= 0 else (0, gain / added)
                    if best_key is None or key > best_key:
                        best_key, best_move = key, (k, j)
            if best_move is None:
                return path
            k, j = best_move
            position[k] = j
            counts = [s.count(curves[i][position[i]][0]) for i, s in enumerate(self.sites)]
            path.append(tuple(counts))

    def bisect_path(self, path) -> None:
        """The last feasible candidate of the path, by bisection (the whole path first)."""
        if len(path) < 2:
            return
        outcome = self.measure(path[-1], "path")
        if outcome is None or self.feasible(outcome):
            return
        low, high = 0, len(path) - 1  # low feasible, high not
        while high - low > 1:
            middle = (low + high) // 2
            outcome = self.measure(path[middle], "path")
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
        failed = [math.inf] * len(self.sites)  # a fraction found infeasible (from a lower state)
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

"""The ridge strength of affine plans, chosen on the search split (never below the mean).

Two ways, both measured on the search split only:

- ``ridge=None`` (the default of ``velcro.search(..., constant="affine")``): per site and per
  number of trimmed channels, the ridge of ``SITE_RIDGES`` (``inf`` included: the mean map)
  whose prediction has the least squared error on the search images, read in closed form
  from their statistics (one calibration pass over the search split, see
  ``velcro._affine.heldout_errors``). The threshold search runs with mean maps first, then
  with those predictions starting where it ended, and the result that saves more on the
  search split is kept (ties: the mean maps). With too few calibration images for the predictions to
  generalise, the sites fall back to their means, and the whole plan to mean maps if the
  predictions do not pay.
- ``ridge="grid"``: the whole threshold search once per ridge of ``ridges`` (a log grid
  starting at ``inf``), strongest first; the result that saves most is kept (ties: the
  stronger ridge). One search per ridge: about twice the cost of the default for a 4-point
  grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from velcro.calibrate import calibrate
from velcro.errors import VelcroError
from velcro.plan import DEFAULT_RIDGE, Thresholds, check_affine_options, resolve_thresholds
from velcro.search._candidates import Rankings
from velcro.trim._affine import affine_sites

RIDGES = (math.inf, 1.0, 0.1, 0.01)
SITE_RIDGES = (math.inf, 10.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.001)


def choose_ridge(run: Callable, ridge: str | None, ridges: Sequence[float], **options):
    """The best of ``run(...)`` over the candidates of ``ridge`` (see the module docstring),
    with every trial in ``settings["ridge_trials"]`` and the evaluations and time of all of
    them counted."""
    check_affine_options(options["stats"], options["granularity"], "", "affine", DEFAULT_RIDGE)
    if ridge is None:
        trials = [({"constant": "map"}, "inf"), ({"ridge": "site"}, "site")]  # site: starts
        # where the mean search ended (its channels are nearly always feasible with the
        # predictions, which only reduce the error there) and goes on from there
    elif ridge == "grid":
        if not ridges:
            raise VelcroError("give at least one ridge to try (math.inf: the mean maps)")
        trials = [({"ridge": float(r)}, _readable(r)) for r in sorted(ridges, reverse=True)]
    else:
        raise VelcroError(f"ridge {ridge!r} is unknown; give a number, None or 'grid'")
    best, rows, evaluations, seconds = None, [], 0, 0.0
    for overrides, label in trials:
        if label == "site" and best is not None:
            overrides = {**overrides, "start": best.thresholds}
        result = run(**{**options, **overrides})
        evaluations += result.evaluations
        seconds += result.wall_time_s
        rows.append({"ridge": label, "objective_value": result.objective_value,
                     "saving_ratio": result.saving_ratio,
                     "search_accuracy": result.search_accuracy,
                     "evaluations": result.evaluations})
        if best is None or result.objective_value > best.objective_value + 1e-12:
            best = result
    best.settings["ridge_trials"] = rows
    best.settings["ridge_choice"] = "site" if ridge is None else "grid"
    best.evaluations = evaluations
    best.wall_time_s = seconds
    return best


def _readable(ridge: float) -> float | str:
    return "inf" if math.isinf(ridge) else ridge


def make_rankings(model, stats, granularity: str, score, constant: str,
                  ridge: float | str | None) -> Rankings:
    """The search's rankings: affine predictions at the sites where they fold or cost little
    (``velcro.trim._affine.affine_sites``), per-site ridges for ``ridge="site"``."""
    per_site = constant == "affine" and ridge == "site"
    fixed = DEFAULT_RIDGE if per_site or ridge is None else ridge
    if isinstance(fixed, str):
        raise VelcroError(f"ridge {ridge!r} is unknown; give a number, None or 'grid'")
    return Rankings(stats, granularity, score, constant, fixed,
                    affine_sites(model) if constant == "affine" else None,
                    SITE_RIDGES if per_site else ())


def set_site_ridges(rankings: Rankings, model, batches: list) -> None:
    """Per-site ridges are chosen by the predictions' errors on the search images: their
    statistics, one calibration pass (shared out like any calibration under torchrun)."""
    if rankings.ridges:
        rankings.set_heldout(calibrate(model, [x for x, _ in batches], progress=False,
                                       covariance=True))


def ridge_settings(rankings: Rankings) -> dict:
    if rankings.constant != "affine" and rankings.score_name != "residual":
        return {}
    return {"ridge": "site" if rankings.ridges else _readable(rankings.ridge)}


def scaled_path(rankings: Rankings, start: Thresholds, steps: int = 8) -> list[tuple]:
    """Unit counts from zero through ``start`` to ``start`` scaled by up to 2x (each site's
    fraction times 1 + i / steps, at most 1): a path for ``Searcher.bisect_path``, which
    evaluates ``start`` first when the far end fails. Sites the start leaves alone stay so."""
    chosen = resolve_thresholds(rankings.names, start)
    fractions = [chosen[name] for name in rankings.names]
    path = [tuple(0 for _ in fractions)]
    for i in range(steps + 1):
        counts = rankings.counts([min(1.0, f * (1 + i / steps)) for f in fractions])
        if counts != path[-1]:
            path.append(counts)
    return path

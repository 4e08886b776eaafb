"""The ridge strength of affine plans, chosen on the search split (never below the mean).

Two ways, both measured on the search split only:

- ``ridge=None`` (the default of ``velcro.search(..., constant="affine")``): per site and per
  number of trimmed channels, the ridge of ``SITE_RIDGES`` (``inf`` included: the mean map)
  whose prediction has the least squared error on the search images, read in closed form
  from their statistics (one calibration pass over the search split, see
  ``velcro._affine.heldout_errors``); then the threshold search runs once with those
  predictions, and once with mean maps, and the result that saves more on the search split
  is kept (ties: the mean maps). With too few calibration images for the predictions to
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

from velcro.errors import VelcroError

RIDGES = (math.inf, 1.0, 0.1, 0.01)
SITE_RIDGES = (math.inf, 10.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.001)


def choose_ridge(run: Callable, ridge: str | None, ridges: Sequence[float], **options):
    """The best of ``run(...)`` over the candidates of ``ridge`` (see the module docstring),
    with every trial in ``settings["ridge_trials"]`` and the evaluations and time of all of
    them counted."""
    if ridge is None:
        trials = [({"constant": "map"}, "inf"), ({"ridge": "site"}, "site")]
    elif ridge == "grid":
        if not ridges:
            raise VelcroError("give at least one ridge to try (math.inf: the mean maps)")
        trials = [({"ridge": float(r)}, _readable(r)) for r in sorted(ridges, reverse=True)]
    else:
        raise VelcroError(f"ridge {ridge!r} is unknown; give a number, None or 'grid'")
    best, rows, evaluations, seconds = None, [], 0, 0.0
    for overrides, label in trials:
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

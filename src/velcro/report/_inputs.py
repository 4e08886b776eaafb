"""Reading the files a report is made from: sweep points and search summaries, checked.

A report shows numbers from files a person may have edited, truncated or mixed; each field
the report reads is checked here (type, range, consistency such as ``accuracy = correct /
images``), so that a bad file is one :class:`VelcroError` naming the file and the field, never
a traceback halfway through a report, and never a wrong number shown as a right one.
"""

from __future__ import annotations

from pathlib import Path

from velcro._validate import Fields, read_json, show

SWEEP_FORMAT = "velcro.sweep/1"
MAX_POINTS = 100_000
GRANULARITIES = ("element", "channel")
METHODS = ("uniform", "search")
_TOLERANCE = 1e-9


def _fraction(fields: Fields, obj: object, key: str, where: str, default: object = ...) -> float:
    if default is ...:
        return fields.number(obj, key, where, low=0.0, high=1.0)
    return fields.optional(fields.number, obj, key, where, low=0.0, high=1.0)


def _agrees(fields: Fields, field: str, stated: float, computed: float, what: str) -> None:
    if abs(stated - computed) > _TOLERANCE:
        raise fields.error(field, f"is {stated}, but {what} give {computed}")


def _point(point: object, where: str, fields: Fields) -> dict:
    """One sweep point: every column typed and in range, the ratios consistent."""
    for key in ("model", "task"):
        fields.string(point, key, where)
    fields.string(point, "granularity", where, choices=GRANULARITIES)
    fields.string(point, "method", where, choices=METHODS)
    fields.number(point, "setting", where)
    images = fields.integer(point, "images", where, low=1)
    for correct, accuracy in (("correct", "accuracy"), ("baseline_correct", "baseline_accuracy")):
        count = fields.integer(point, correct, where, low=0, high=images)
        _agrees(fields, f"{where}.{accuracy}", _fraction(fields, point, accuracy, where),
                count / images, f"{correct} / images")
    _fraction(fields, point, "saving_ratio", where)
    _fraction(fields, point, "search_accuracy", where, default=None)
    compressed = fields.integer(point, "compressed_elements", where, low=0)
    zeros = fields.integer(point, "zero_elements", where, low=0, high=compressed)
    _agrees(fields, f"{where}.zero_share", _fraction(fields, point, "zero_share", where),
            zeros / compressed if compressed else 0.0, "zero_elements / compressed_elements")
    fields.optional(fields.integer, point, "evaluations", where, low=0)
    return point  # type: ignore[return-value]


def read_sweep_file(path: str | Path) -> tuple[list[dict], dict]:
    """``(points, info)`` of a sweep's ``points.json`` (or the folder holding it).

    Raises:
        VelcroError: naming the file and the field.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "points.json"
    fields = Fields(path, "sweep", "run `velcro sweep` again (it writes points.json)")
    if not path.exists():
        raise fields.error("", "does not exist")
    document = fields.document(read_json(path, fields), (SWEEP_FORMAT,))
    rows = fields.list(document, "points", max_len=MAX_POINTS)
    points = [_point(row, f"points[{i}]", fields) for i, row in enumerate(rows)]
    return points, fields.dict(document, "info", default={})


def _accuracy_entry(fields: Fields, obj: object, key: str, where: str) -> None:
    """``{accuracy, images, correct, ci95}`` of a validation result."""
    entry = fields.optional(fields.dict, obj, key, where)
    if entry is None:
        return
    where = Fields.join(where, key)
    accuracy = _fraction(fields, entry, "accuracy", where)
    images = fields.optional(fields.integer, entry, "images", where, low=0)
    correct = fields.optional(fields.integer, entry, "correct", where, low=0,
                              high=images if images is not None else None)
    if images and correct is not None:
        _agrees(fields, f"{where}.accuracy", accuracy, correct / images, "correct / images")
    _interval(fields, entry, "ci95", where, (0.0, 1.0))


def _interval(fields: Fields, obj: object, key: str, where: str,
              bounds: tuple[float, float]) -> None:
    interval = fields.optional(fields.list, obj, key, where)
    if interval is None:
        return
    field = Fields.join(where, key)
    if len(interval) != 2:
        raise fields.error(field, f"must be [low, high], not {show(interval)}")
    low = fields.number({"low": interval[0]}, "low", field, low=bounds[0], high=bounds[1])
    high = fields.number({"high": interval[1]}, "high", field, low=low, high=bounds[1])
    del high


def _validation(fields: Fields, document: dict) -> None:
    validation = fields.optional(fields.dict, document, "validation")
    if validation is None:
        return
    fields.optional(fields.integer, validation, "images", "validation", low=0)
    for key in ("baseline", "compressed"):
        _accuracy_entry(fields, validation, key, "validation")
    paired = fields.optional(fields.dict, validation, "paired", "validation")
    if paired is not None:
        fields.number(paired, "difference", "validation.paired", low=-1.0, high=1.0)
        _interval(fields, paired, "ci95", "validation.paired", (-2.0, 2.0))
        for key in ("gained", "lost"):
            fields.optional(fields.integer, paired, key, "validation.paired", low=0)


def _cost(fields: Fields, document: dict) -> None:
    cost = fields.optional(fields.dict, document, "cost")
    if cost is None:
        return
    for side in ("original", "compressed"):
        entry = fields.dict(cost, side, "cost")
        for key in ("macs", "parameters"):
            fields.integer(entry, key, f"cost.{side}", low=0)
    latency = fields.optional(fields.dict, cost, "latency_ms", "cost")
    if latency is not None:
        for key in ("original", "compressed"):
            fields.number(latency, key, "cost.latency_ms", low=0.0)
    fields.optional(fields.string, cost, "method", "cost", max_len=10_000)


def check_search_summary(document: object, fields: Fields) -> dict:
    """The fields of a search summary (``NAME.search.json``) that a report reads."""
    if not isinstance(document, dict) or "trajectory" not in document:
        raise fields.foreign("no search trajectory")
    for key in ("model", "weights", "task", "plan", "stats", "granularity"):
        fields.optional(fields.string, document, key, max_len=4096)
    classes = fields.optional(fields.list, document, "classes")
    for i, value in enumerate(classes or []):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise fields.error(f"classes[{i}]", f"must be a class index, not {show(value)}")
    splits = fields.optional(fields.dict, document, "splits") or {}
    for name in splits:
        fields.integer(splits, name, "splits", low=0)
    fields.string(document, "objective")
    fields.number(document, "objective_value")
    fields.number(document, "tolerance", low=0.0, high=1.0)
    fields.optional(fields.integer, document, "search_images", low=0)
    fields.integer(document, "evaluations", low=0)
    fields.number(document, "wall_time_s", low=0.0)
    for key in ("baseline_accuracy", "search_accuracy"):
        _fraction(fields, document, key, "")
    _fraction(fields, document, "saving_ratio", "", default=None)
    settings = fields.dict(document, "settings", default={})
    phases = fields.optional(fields.dict, settings, "evaluations_per_phase", "settings") or {}
    for name in phases:
        fields.integer(phases, name, "settings.evaluations_per_phase", low=0)
    _fraction(fields, settings, "graph_share_run", "settings", default=None)
    for i, row in enumerate(fields.list(document, "trajectory", max_len=10_000_000)):
        where = f"trajectory[{i}]"
        fields.string(row, "phase", where)
        _fraction(fields, row, "saving_ratio", where)
        _fraction(fields, row, "accuracy", where)
        fields.get(row, "feasible", bool, where)
    _validation(fields, document)
    _cost(fields, document)
    return document


def read_search_summary(path: str | Path) -> dict:
    """A search summary from `velcro search` (``NAME.search.json``), checked for a report.

    Raises:
        VelcroError: naming the file and the field.
    """
    fields = Fields(path, "search summary", "give a NAME.search.json from `velcro search`")
    if not Path(path).exists():
        raise fields.error("", "does not exist")
    return check_search_summary(read_json(path, fields), fields)

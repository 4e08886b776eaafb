"""Reading a plan's two files (JSON + safetensors), validating every field against the other.

:meth:`velcro.Plan.load` builds the plan from what :func:`read_plan_file` returns; nothing
reaches it unchecked: field types and ranges, site names, unit indices (in range, sorted,
unique), shapes against the tensors, finite constants, and the JSON's figures (chosen units,
C) against the tensors. Affine plans (``"constant": "affine"``) may hold, per channel site,
``coefficients/<name>``: finite floats, one row per chosen channel, one column per channel,
zero in the chosen channels' columns; their ``ridge`` is a number >= 0 or ``"inf"``. (A reader
that predates affine plans refuses them: the constant kind and the extra tensors are unknown
to it.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from velcro._validate import Fields, check_finite, read_json, read_pair

FORMAT = "velcro.plan/2"
FIX = "make it again with `velcro compress` (or Plan.save)"
MAX_SITES = 100_000


def _units(tensor: torch.Tensor, count: int, fields: Fields, field: str) -> torch.Tensor:
    """Sorted, unique unit indices in [0, count)."""
    if tensor.dtype != torch.int64 or tensor.dim() != 1:
        raise fields.error(field, f"must be a 1-D int64 tensor, not {tensor.dtype} of shape "
                           f"{list(tensor.shape)}")
    if tensor.numel():
        if int(tensor.min()) < 0 or int(tensor.max()) >= count:
            raise fields.error(field, f"holds unit indices outside [0, {count}) "
                               f"(from {int(tensor.min())} to {int(tensor.max())})")
        steps = tensor[1:] - tensor[:-1]
        if bool((steps <= 0).any()):
            at = int((steps <= 0).nonzero()[0]) + 1
            raise fields.error(field, f"is not sorted without repeats (unit {int(tensor[at])} "
                               f"at position {at})")
    return tensor


def _coefficients(tensors: dict, name: str, units: torch.Tensor, channels: int,
                  fields: Fields) -> torch.Tensor | None:
    """An affine site's coefficients, or None where the site has none."""
    key = f"coefficients/{name}"
    if key not in tensors:
        return None
    coefficients = tensors[key]
    expected = (units.numel(), channels)
    if not coefficients.is_floating_point() or tuple(coefficients.shape) != expected:
        raise fields.error(f"tensors.{key}", f"must be a float tensor of shape "
                           f"{list(expected)}, not {coefficients.dtype} "
                           f"{list(coefficients.shape)}")
    check_finite(coefficients, fields, f"tensors.{key}")
    if units.numel() and bool(coefficients[:, units].ne(0).any()):
        raise fields.error(f"tensors.{key}", "predicts a chosen channel from a chosen "
                           "channel; its columns of the chosen channels must be zero")
    return coefficients.to(torch.float32)


def _ridge(document: dict, fields: Fields) -> float | None:
    value = fields.get(document, "ridge", (int, float, str), default=None)
    if value is None:
        return None
    if value == "inf":
        return math.inf
    if isinstance(value, str) or not math.isfinite(value) or value < 0:
        raise fields.error("ridge", f"is {value!r}, not a number >= 0 or \"inf\"")
    return float(value)


def _site(row: object, index: int, tensors: dict, granularity: str, fields: Fields) -> tuple:
    where = f"sites[{index}]"
    name = fields.string(row, "site", where)
    shape = fields.shape(row, "shape", where)
    if not shape:
        raise fields.error(f"{where}.shape", "is empty; a site has at least one axis")
    threshold = fields.number(row, "threshold", where, low=0.0, high=1.0)
    axis = fields.integer(row, "channel_axis", where, low=-len(shape), high=len(shape) - 1)
    elements = math.prod(shape)
    count = elements if granularity == "element" else shape[axis]
    of = fields.integer(row, "of", where, low=0)
    if of != count:
        raise fields.error(f"{where}.of", f"is {of}, but shape {list(shape)} has {count} "
                           f"{granularity} units")
    key_units, key_constant = f"units/{name}", f"constant/{name}"
    for key in (key_units, key_constant):
        if key not in tensors:
            raise fields.error("tensors", f"holds no tensor '{key}' for site {name!r}")
    units = _units(tensors[key_units], count, fields, f"tensors.{key_units}")
    chosen = fields.integer(row, "chosen", where, low=0)
    if chosen != units.numel():
        raise fields.error(f"{where}.chosen", f"is {chosen}, but the tensors hold "
                           f"{units.numel()} units")
    if granularity == "channel":
        listed = fields.list(row, "channels", where)
        if listed != units.tolist():
            raise fields.error(f"{where}.channels", "disagrees with the units in the tensors")
    constant = tensors[key_constant]
    if not constant.is_floating_point() or tuple(constant.shape) != shape:
        raise fields.error(f"tensors.{key_constant}", f"must be a float tensor of shape "
                           f"{list(shape)}, not {constant.dtype} {list(constant.shape)}")
    check_finite(constant, fields, f"tensors.{key_constant}")
    coefficients = _coefficients(tensors, name, units, shape[axis], fields)
    return name, threshold, units, constant.to(torch.float32), shape, axis, coefficients


def read_plan_file(path: str | Path, *, granularities: tuple[str, ...], scores: tuple[str, ...],
                   constants: tuple[str, ...]) -> dict:
    """The validated content of a plan file: the document's fields and one tuple per site,
    ``(name, threshold, units, constant, shape, channel_axis, coefficients or None)``.

    Raises:
        VelcroError: naming the file and the field, for any missing, mistyped, out-of-range or
            inconsistent field, a tensor file from another save, or non-finite constants.
    """
    path = Path(path)
    fields = Fields(path, "plan", FIX)
    if not path.is_file():
        raise fields.error("", "does not exist")
    document = fields.document(read_json(path, fields), (FORMAT, "velcro.plan/1"))
    if document["format"] == "velcro.plan/1":
        raise fields.error("format", "is velcro.plan/1, written by an earlier velcro without "
                           "a checksum of its tensors, so the pair cannot be verified")
    granularity = fields.string(document, "granularity", choices=granularities)
    result = {
        "granularity": granularity,
        "score": fields.string(document, "score", choices=scores),
        "constant": fields.string(document, "constant", choices=constants),
        "structure": fields.string(document, "structure"),
        "weights": fields.string(document, "weights"),
        "info": fields.dict(document, "info", default={}),
        "ridge": _ridge(document, fields),
    }
    rows = fields.list(document, "sites", max_len=MAX_SITES)
    tensors = read_pair(path, document, fields)
    sites = [_site(row, i, tensors, granularity, fields) for i, row in enumerate(rows)]
    fields.unique_names([site[0] for site in sites], "sites")
    expected = {f"{kind}/{site[0]}" for site in sites for kind in ("units", "constant")}
    affine = [site[0] for site in sites if site[6] is not None]
    if affine and (result["constant"] != "affine" or granularity != "channel"):
        raise fields.error("constant", f"is {result['constant']!r}, but site {affine[0]!r} "
                           "holds affine coefficients")
    expected |= {f"coefficients/{name}" for name in affine}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise fields.error("tensors", f"holds {extra[0]!r}, which no site of the JSON names")
    total = sum(math.prod(site[4]) for site in sites)
    chosen = 0
    for _, _, units, _, shape, axis, _ in sites:
        per_unit = 1 if granularity == "element" else math.prod(shape) // shape[axis]
        chosen += units.numel() * per_unit
    ratio = fields.number(document, "saving_ratio", low=0.0, high=1.0)
    if abs(ratio - (chosen / total if total else 0.0)) > 1e-9:
        raise fields.error("saving_ratio", f"is {ratio}, but the units chosen give "
                           f"{chosen / total if total else 0.0}")
    result["sites"] = sites
    return result


def readable_json(document: dict) -> str:
    """Indented JSON with one line per site row, so a plan reads as a table."""
    head = json.dumps({k: v for k, v in document.items() if k != "sites"}, indent=1)[:-2]
    body = ",\n  ".join(json.dumps(row) for row in document["sites"])
    return f'{head},\n "sites": [\n  {body}\n ]\n}}\n'

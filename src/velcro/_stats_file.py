"""Reading a statistics file (safetensors, JSON metadata in its header), every field checked.

:meth:`velcro.Stats.load` builds the statistics from what :func:`read_stats_file` returns:
site names unique, counts non-negative and equal across sites, ``mean``/``m2`` float tensors
of the declared shape, finite, ``m2`` (sums of squared deviations) never negative, and no
tensor the metadata does not name. Sites calibrated with ``covariance=True`` (``"covariance":
true``) also hold ``comoment/<name>``: a finite, symmetric ``channels x channels`` matrix with
a non-negative diagonal.
"""

from __future__ import annotations

from pathlib import Path

import torch

from velcro._validate import Fields, check_finite, load_safetensors, parse_json

FORMAT = "velcro.stats/1"
FIX = "make it again with `velcro calibrate`"
MAX_SITES = 100_000
MAX_COUNT = 2**53  # images: counts beyond this are not exact in float64 anyway


def _moment(tensors: dict, key: str, shape: tuple[int, ...], fields: Fields) -> torch.Tensor:
    if key not in tensors:
        raise fields.error("tensors", f"holds no tensor '{key}'")
    tensor = tensors[key]
    if not tensor.is_floating_point() or tuple(tensor.shape) != shape:
        raise fields.error(f"tensors.{key}", f"must be a float tensor of shape {list(shape)}, "
                           f"not {tensor.dtype} {list(tensor.shape)}")
    check_finite(tensor, fields, f"tensors.{key}")
    return tensor.to(torch.float64)


def _comoment(tensors: dict, name: str, channels: int, fields: Fields) -> torch.Tensor:
    """A site's channel co-moment: float, ``(channels, channels)``, finite, symmetric, with a
    non-negative diagonal (sums of squared deviations)."""
    key = f"comoment/{name}"
    comoment = _moment(tensors, key, (channels, channels), fields)
    scale = float(comoment.abs().max()) if comoment.numel() else 0.0
    if comoment.numel() and float((comoment - comoment.T).abs().max()) > 1e-9 * scale:
        raise fields.error(f"tensors.{key}", "is not symmetric; a co-moment matrix is")
    if comoment.numel() and float(comoment.diagonal().min()) < 0:
        raise fields.error(f"tensors.{key}", "has a negative diagonal: sums of squared "
                           "deviations are never negative")
    return comoment


def read_stats_file(path: str | Path) -> dict:
    """The validated content of a statistics file: its metadata's fields and one tuple per
    site, ``(name, count, mean, m2, channel_axis, comoment or None)``.

    Raises:
        VelcroError: naming the file and the field.
    """
    path = Path(path)
    fields = Fields(path, "statistics", FIX)
    if not path.is_file():
        raise fields.error("", "does not exist")
    header, tensors = load_safetensors(path, fields)
    if "velcro" not in header:
        raise fields.foreign(f"a safetensors file without '{FORMAT}' metadata")
    meta = fields.document(parse_json(header["velcro"], fields, "metadata.velcro"), (FORMAT,))
    images = fields.integer(meta, "images", low=0, high=MAX_COUNT)
    result = {
        "structure": fields.string(meta, "structure"),
        "weights": fields.string(meta, "weights"),
        "info": fields.dict(meta, "info", default={}),
    }
    sites = []
    for index, entry in enumerate(fields.list(meta, "sites", max_len=MAX_SITES)):
        where = f"sites[{index}]"
        name = fields.string(entry, "name", where)
        shape = fields.shape(entry, "shape", where)
        if not shape:
            raise fields.error(f"{where}.shape", "is empty; a site has at least one axis")
        count = fields.integer(entry, "count", where, low=0, high=MAX_COUNT)
        if count != images:
            raise fields.error(f"{where}.count", f"is {count}, but the file says it holds "
                               f"{images} images (field 'images')")
        axis = fields.integer(entry, "channel_axis", where, default=0, low=-len(shape),
                              high=len(shape) - 1)
        mean = _moment(tensors, f"mean/{name}", shape, fields)
        m2 = _moment(tensors, f"m2/{name}", shape, fields)
        if m2.numel() and float(m2.min()) < 0:
            raise fields.error(f"tensors.m2/{name}", f"holds {float(m2.min())}: a sum of "
                               "squared deviations is never negative (variances would be)")
        comoment = None
        if fields.get(entry, "covariance", bool, where, default=False):
            comoment = _comoment(tensors, name, shape[axis], fields)
        sites.append((name, count, mean, m2, axis, comoment))
    fields.unique_names([site[0] for site in sites], "sites")
    expected = {f"{kind}/{site[0]}" for site in sites for kind in ("mean", "m2")}
    expected |= {f"comoment/{site[0]}" for site in sites if site[5] is not None}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise fields.error("tensors", f"holds {extra[0]!r}, which no site of the metadata names")
    result["sites"] = sites
    return result

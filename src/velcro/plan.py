"""Thresholds -> Plan: which activation units become constants, and which constants."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from velcro._affine import (
    affine_constants,
    check_affine_options,
    residual_scores,
)
from velcro._format import percent, plural, shape_text
from velcro._plan_file import FORMAT, read_plan_file, readable_json
from velcro._validate import write_pair
from velcro.errors import VelcroError
from velcro.stats import SiteStats, Stats

GRANULARITIES = ("element", "channel")
SCORES = ("variance", "relative", "residual")
CONSTANTS = ("map", "scalar", "affine")
DEFAULT_RIDGE = 0.1
Thresholds = float | Mapping[str, float] | Sequence[float]


@dataclass
class SitePlan:
    """The plan for one site.

    Attributes:
        threshold: the requested fraction T_k of the site's units.
        units: indices of the chosen units, sorted: flat element indices (element
            granularity) or channel indices (channel granularity).
        constant: float32 tensor of the site's per-image shape; at chosen positions it holds
            the value that replaces the activation (elsewhere it is 0 and unused).
        shape: the per-image activation shape.
        channel_axis: the channel axis of that shape.
        coefficients: affine plans only: float32 ``(len(units), channels)``, row i the
            weights beta of the kept channels in the prediction of channel ``units[i]``
            (zero in the trimmed channels' columns). The output at chosen channel r is then
            ``constant_r(p) + sum_k coefficients[r, k] * a_k(p)``: ``constant`` holds the
            offset ``mu_r - sum_k beta_rk mu_k``. None (or all zero): the constant alone.

    Example:
        >>> plan.sites["layer1.0.relu:0"]
        SitePlan: 19 units of 64x8x8 chosen (T_k 0.30)
    """

    threshold: float
    units: torch.Tensor
    constant: torch.Tensor
    shape: tuple[int, ...]
    channel_axis: int = 0
    coefficients: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (f"SitePlan: {plural(int(self.units.numel()), 'unit')} of "
                f"{shape_text(self.shape)} chosen (T_k {self.threshold:.2f})")

    @property
    def channels(self) -> int:
        """Channels of the site's activation."""
        return self.shape[self.channel_axis]

    @property
    def elements(self) -> int:
        """Elements of one image's activation at this site."""
        return math.prod(self.shape)


@dataclass
class Plan:
    """Which activation outputs become constants: plain data, saved as JSON + tensors.

    Attributes:
        granularity: ``element`` (VELCRO) or ``channel`` (S-VELCRO).
        sites: per-site plans in the model's site order (every site, chosen units or not).
        structure, weights: fingerprints of the model the statistics came from.
        score, constant_kind: how channels were ranked and what constant replaces them.
        info: free-form metadata saved with the plan.
        ridge: affine plans: the ridge strength the coefficients were fitted with.

    ``print(plan)`` shows the headline figures; the per-site tensors stay in ``sites`` and
    :meth:`to_dict` gives everything as plain data.

    Example:
        >>> plan = velcro.plan(stats, 0.3, granularity="channel")
        >>> plan
        Plan: channel (S-VELCRO), C 29.74% (compression-saving ratio)
          1,171 of 3,904 channels replaced at 17 of 17 sites; score variance, constant map
        >>> round(plan.saving_ratio, 3)
        0.297
    """

    granularity: str
    sites: dict[str, SitePlan]
    structure: str
    weights: str
    score: str = "variance"
    constant_kind: str = "map"
    info: dict = field(default_factory=dict)
    ridge: float | None = None

    def __repr__(self) -> str:
        method = {"element": "element (VELCRO)", "channel": "channel (S-VELCRO)"}
        unit = "element" if self.granularity == "element" else "channel"
        chosen = sum(int(site.units.numel()) for site in self.sites.values())
        total = sum(site.elements if unit == "element" else site.channels
                    for site in self.sites.values())
        used = sum(1 for site in self.sites.values() if site.units.numel())
        return (f"Plan: {method.get(self.granularity, self.granularity)}, "
                f"C {percent(self.saving_ratio)} (compression-saving ratio)\n"
                f"  {chosen:,} of {plural(total, unit)} replaced at {used} of "
                f"{plural(len(self.sites), 'site')}; score {self.score}, "
                f"constant {self.constant_kind}")

    def mask(self, name: str) -> torch.Tensor:
        """Boolean tensor of the site's shape, True where the output is a constant.

        Example:
            >>> plan.mask("layer1.0.relu:0").float().mean()
        """
        site = self.sites[name]
        if self.granularity == "element":
            flat = torch.zeros(site.elements, dtype=torch.bool)
            flat[site.units] = True
            return flat.view(site.shape)
        chosen = torch.zeros(site.channels, dtype=torch.bool)
        chosen[site.units] = True
        view = [1] * len(site.shape)
        view[site.channel_axis] = site.channels
        return chosen.view(view).expand(site.shape)

    def chosen_elements(self, name: str) -> int:
        """Activation elements of one image replaced at site ``name``."""
        site = self.sites[name]
        if self.granularity == "element":
            return int(site.units.numel())
        return int(site.units.numel()) * site.elements // site.channels

    @property
    def saving_ratio(self) -> float:
        """The papers' C = sum_k T_k c_k h_k w_k / sum_k c_k h_k w_k, over units chosen."""
        total = sum(s.elements for s in self.sites.values())
        chosen = sum(self.chosen_elements(n) for n in self.sites)
        return chosen / total if total else 0.0

    def thresholds(self) -> dict[str, float]:
        """The fraction of each site's units actually chosen."""
        result = {}
        for name, site in self.sites.items():
            units = site.elements if self.granularity == "element" else site.channels
            result[name] = site.units.numel() / units if units else 0.0
        return result

    def summary(self) -> list[dict]:
        """One readable row per site: name, shape, threshold, chosen units."""
        return [
            {
                "site": name,
                "shape": list(site.shape),
                "threshold": site.threshold,
                "chosen": int(site.units.numel()),
                "of": site.elements if self.granularity == "element" else site.channels,
                "chosen_elements": self.chosen_elements(name),
            }
            for name, site in self.sites.items()
        ]

    def to_dict(self, tensors: bool = False) -> dict:
        """The plan as plain data (JSON-ready): what :meth:`save` writes as JSON.

        Args:
            tensors: also give every site's ``units`` and ``constant`` as (nested) lists;
                without it, channel plans list their channels and element plans counts only.

        Example:
            >>> plan.to_dict()["saving_ratio"]
            0.2974...
        """
        rows = self.summary()
        for row, site in zip(rows, self.sites.values(), strict=True):
            row["channel_axis"] = site.channel_axis
            if self.granularity == "channel":
                row["channels"] = site.units.tolist()
            if tensors:
                row["units"] = site.units.tolist()
                row["constant"] = site.constant.tolist()
                if site.coefficients is not None:
                    row["coefficients"] = site.coefficients.tolist()
        document = {
            "format": FORMAT,
            "granularity": self.granularity,
            "score": self.score,
            "constant": self.constant_kind,
            "saving_ratio": self.saving_ratio,
            "structure": self.structure,
            "weights": self.weights,
            "info": self.info,
            "sites": rows,
        }
        if self.ridge is not None:  # JSON has no infinity: the mean's ridge is the string
            document["ridge"] = str(self.ridge) if math.isinf(self.ridge) else self.ridge
        return document

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (JSON a person can read) and ``path`` + ``.safetensors`` beside it.

        Channel plans list their chosen channels in the JSON; element plans list counts only
        (the indices are in the tensor file). The JSON records the SHA-256 of the tensor
        file (``tensors_sha256``), so that a JSON and tensors of different saves never load
        as one plan; both files are written to temporary names and renamed once complete.
        Affine plans also save their coefficients (tensor file) and ridge (JSON).

        Example:
            >>> plan.save("cats.plan.json")  # + cats.plan.json.safetensors
        """
        path = Path(path)
        tensors = {}
        for name, site in self.sites.items():
            tensors[f"units/{name}"] = site.units.to(torch.int64).contiguous()
            tensors[f"constant/{name}"] = site.constant.contiguous()
            if site.coefficients is not None:
                tensors[f"coefficients/{name}"] = site.coefficients.float().contiguous()
        write_pair(path, tensors, {"format": FORMAT}, self.to_dict(), readable_json)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a plan written by :meth:`save`, validating every field (see
        :mod:`velcro._plan_file`); a tensor file from another save is refused.

        Example:
            >>> plan = velcro.Plan.load("cats.plan.json")
        """
        content = read_plan_file(path, granularities=GRANULARITIES, scores=SCORES,
                                 constants=CONSTANTS)
        sites = {name: SitePlan(threshold, units, constant, shape, axis, coefficients)
                 for name, threshold, units, constant, shape, axis, coefficients
                 in content["sites"]}
        return cls(content["granularity"], sites, content["structure"], content["weights"],
                   content["score"], content["constant"], content["info"], content["ridge"])


def resolve_thresholds(names: Sequence[str], thresholds: Thresholds) -> dict[str, float]:
    """One fraction per site from a scalar, a mapping by site name, or a sequence."""
    if isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        values = {name: float(thresholds) for name in names}
    elif isinstance(thresholds, Mapping):
        unknown = [k for k in thresholds if k not in names]
        if unknown:
            raise VelcroError(
                f"thresholds name unknown site '{unknown[0]}'; sites are: "
                + ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
            )
        values = {name: float(thresholds.get(name, 0.0)) for name in names}
    elif isinstance(thresholds, Sequence) and not isinstance(thresholds, str):
        if len(thresholds) != len(names):
            raise VelcroError(
                f"got {plural(len(thresholds), 'threshold')} for {plural(len(names), 'site')}; "
                "give one per site in site order, a single fraction, or a mapping by site name"
            )
        values = {name: float(t) for name, t in zip(names, thresholds, strict=True)}
    else:
        raise VelcroError(
            f"thresholds must be a fraction, a sequence or a mapping, not "
            f"{type(thresholds).__name__}"
        )
    for name, value in values.items():
        if not 0.0 <= value <= 1.0 or math.isnan(value):
            raise VelcroError(
                f"threshold {value} for site '{name}' is out of range; each threshold is a "
                "fraction in [0, 1]"
            )
    return values


def channel_scores(site: SiteStats, score: str = "variance",
                   ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """Per-channel locality score (lower = more constant).

    ``variance``: mean of the element variances over the channel. ``relative``: the
    scale-free sum(V) / sum(M^2) over the channel (a squared coefficient of variation).
    ``residual``: the order of a greedy selection by the variance left after the ridge
    prediction from the kept channels (needs the channel covariance; see ``velcro._affine``).
    """
    axis = site.channel_axis % site.mean.dim()
    dims = [d for d in range(site.mean.dim()) if d != axis]
    variance = site.variance
    if score == "variance":
        return variance.mean(dim=dims) if dims else variance
    if score == "residual":
        return residual_scores(site.channel_covariance, ridge)
    power = site.mean.square()
    if dims:
        variance, power = variance.sum(dim=dims), power.sum(dim=dims)
    return variance / power.clamp_min(torch.finfo(torch.float64).tiny)


def _choose(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    count = int(math.floor(fraction * scores.numel() + 0.5))
    if count == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.sort(scores, stable=True).indices
    return torch.sort(order[:count]).values


def plan(
    stats: Stats,
    thresholds: Thresholds,
    *,
    granularity: str = "element",
    score: str = "variance",
    constant: str = "map",
    ridge: float = DEFAULT_RIDGE,
) -> Plan:
    """Choose, per site, the T_k fraction of units with the lowest variance.

    Args:
        stats: calibration statistics from :func:`velcro.calibrate`.
        thresholds: one fraction for every site, a mapping site name -> fraction (others 0),
            or a sequence in site order; each in [0, 1]. T_k * units is rounded to the nearest
            whole unit.
        granularity: ``element`` (VELCRO, per activation element) or ``channel`` (S-VELCRO,
            whole filters).
        score: how units are ranked: ``variance`` (lowest variance first), ``relative``
            (variance / mean^2, scale-free) or, for channels, ``residual`` (lowest variance
            left after predicting each channel from the kept ones, greedily; needs
            statistics calibrated with ``covariance=True``).
        constant: for channels, replace by the channel's mean map (``map``, exact for any
            downstream linear layer), by one scalar per channel (``scalar``), or by the
            affine prediction from the site's kept channels (``affine``: the mean map plus
            a ridge regression on the kept channels' deviations from theirs; needs
            statistics calibrated with ``covariance=True``; see ``velcro._affine``).
        ridge: ``affine`` constants and ``residual`` scores: the ridge strength, relative
            to each kept channel's variance (``math.inf``: the mean map). Choose it on
            held-out images: :func:`velcro.search` does.

    Returns:
        A :class:`Plan`; ``plan.saving_ratio`` is the papers' C.

    Example:
        >>> p = velcro.plan(stats, {"layer4.1.relu:1": 0.5}, granularity="channel")
        >>> p.saving_ratio
        0.0108...
        >>> stats = velcro.calibrate(model, loader, covariance=True)
        >>> p = velcro.plan(stats, 0.3, granularity="channel", constant="affine", ridge=0.1)
    """
    if granularity not in GRANULARITIES:
        raise VelcroError(f"granularity '{granularity}' is unknown; use 'element' or 'channel'")
    if score not in SCORES:
        raise VelcroError(f"score '{score}' is unknown; use one of {', '.join(SCORES)}")
    if constant not in CONSTANTS:
        raise VelcroError(f"constant '{constant}' is unknown; use one of {', '.join(CONSTANTS)}")
    check_affine_options(stats, granularity, score, constant, ridge)
    if stats.count == 0:
        raise VelcroError("statistics hold no images; calibrate on at least one image")
    fractions = resolve_thresholds(stats.names, thresholds)
    sites = {}
    for name, site in stats.sites.items():
        fraction = fractions[name]
        mean = site.mean
        coefficients = None
        if granularity == "element":
            if score == "variance":
                scores = site.variance.flatten()
            else:
                tiny = torch.finfo(torch.float64).tiny
                scores = (site.variance / mean.square().clamp_min(tiny)).flatten()
            units = _choose(scores, fraction)
            values = torch.zeros(mean.numel(), dtype=torch.float64)
            values[units] = mean.flatten()[units]
            values = values.view(mean.shape)
        elif constant == "affine":
            units = _choose(channel_scores(site, score, ridge), fraction)
            values, coefficients = affine_constants(site, units, ridge)
        else:
            units = _choose(channel_scores(site, score, ridge), fraction)
            axis = site.channel_axis % mean.dim()
            source = mean
            if constant == "scalar":
                dims = [d for d in range(mean.dim()) if d != axis]
                source = mean.mean(dim=dims, keepdim=True).expand_as(mean) if dims else mean
            values = torch.zeros_like(mean)
            index = [slice(None)] * mean.dim()
            index[axis] = units
            values[tuple(index)] = source[tuple(index)]
        sites[name] = SitePlan(fraction, units, values.to(torch.float32).contiguous(),
                               tuple(mean.shape), site.channel_axis, coefficients)
    return Plan(granularity, sites, stats.structure, stats.weights, score, constant,
                dict(stats.info), ridge if constant == "affine" else None)

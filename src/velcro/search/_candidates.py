"""Candidate plans for the search: units ranked once per site, a threshold takes a prefix.

``velcro.plan`` sorts every site's scores on each call; a search builds hundreds of plans from
the same statistics, so the order and the constant each unit would get are computed once here.
With the default score and constant the plans are identical to ``velcro.plan``'s (same stable
sort, same rounding of T_k * units).

Score hooks (for baselines searched with the same procedure): a callable
``score(name, site_stats) -> Tensor`` giving one score per channel (or per element, element
granularity only); the lowest scores are replaced first.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from velcro._affine import affine_constants, heldout_errors
from velcro.errors import VelcroError
from velcro.plan import DEFAULT_RIDGE, SCORES, Plan, SitePlan, channel_scores, check_affine_options
from velcro.stats import SiteStats, Stats

ScoreFn = Callable[[str, SiteStats], torch.Tensor]
CONSTANTS = ("map", "scalar", "zero", "affine")


@dataclass
class SiteRanking:
    """One site's units in replacement order and the constant every position would take."""

    name: str
    order: torch.Tensor  # unit indices, lowest score first
    source: torch.Tensor  # float32, per-image shape
    shape: tuple[int, ...]
    channel_axis: int
    units: int
    elements: int
    stats: SiteStats | None = None  # affine sites: the statistics the predictions come from
    ridge: float = math.inf
    ridges: tuple[float, ...] = ()  # chosen per count on ``heldout`` when given
    heldout: SiteStats | None = None
    _affine: dict = field(default_factory=dict, repr=False)

    def count(self, fraction: float) -> int:
        """Units chosen for ``fraction``: rounded like ``velcro.plan``."""
        return min(self.units, int(math.floor(fraction * self.units + 0.5)))

    def affine(self, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(units, offset map, float32 coefficients) of the first ``count`` channels predicted
        from the rest, or None where the prediction is the mean (not an affine site, or the
        ridge chosen is inf)."""
        if self.stats is None or count == 0 or (math.isinf(self.ridge) and not self.ridges):
            return None
        if count not in self._affine:
            if len(self._affine) > 16:  # a search walks a few counts per site at a time
                self._affine.clear()
            units = torch.sort(self.order[:count]).values.to(torch.int64)
            ridge = self.chosen_ridge(units)
            offset, coefficients = affine_constants(self.stats, units, ridge)
            self._affine[count] = (None if coefficients is None else
                                   (units, offset.to(torch.float32), coefficients))
        return self._affine[count]

    def chosen_ridge(self, units: torch.Tensor) -> float:
        """The fixed ridge, or the one of ``ridges`` with the least error on ``heldout``
        (ties: the stronger; ``inf``, the mean map, is always a candidate)."""
        if not self.ridges:
            return self.ridge
        if self.heldout is None:
            raise VelcroError("per-site ridges need held-out statistics (Rankings.heldout)")
        candidates = sorted(set(self.ridges) | {math.inf}, reverse=True)
        errors = heldout_errors(self.stats, self.heldout, units, candidates)
        best = 0
        for index, error in enumerate(errors):
            if error < errors[best]:
                best = index
        return candidates[best]

    def mask(self, count: int, granularity: str) -> torch.Tensor:
        if granularity == "element":
            flat = torch.zeros(self.elements, dtype=torch.bool)
            flat[self.order[:count]] = True
            return flat.view(self.shape)
        chosen = torch.zeros(self.units, dtype=torch.bool)
        chosen[self.order[:count]] = True
        view = [1] * len(self.shape)
        view[self.channel_axis % len(self.shape)] = self.units
        return chosen.view(view).expand(self.shape).contiguous()


def _unit_scores(name: str, site: SiteStats, granularity: str, score: str | ScoreFn,
                 ridge: float = DEFAULT_RIDGE):
    channels = site.shape[site.channel_axis % len(site.shape)] if site.shape else 1
    elements = math.prod(site.shape)
    if callable(score):
        values = torch.as_tensor(score(name, site), dtype=torch.float64).flatten().cpu()
        if values.numel() == channels and granularity == "element" and channels != elements:
            # a per-channel score ranks elements channel by channel
            view = [1] * len(site.shape)
            view[site.channel_axis % len(site.shape)] = channels
            values = values.view(view).expand(site.shape).flatten()
        expected = elements if granularity == "element" else channels
        if values.numel() != expected:
            raise VelcroError(
                f"score hook gave {values.numel()} scores for site '{name}', which has "
                f"{channels} channels and {elements} elements; return one score per channel"
            )
        return values
    if score not in SCORES:
        raise VelcroError(f"score '{score}' is unknown; use 'variance', 'relative' or a callable")
    if granularity == "channel":
        return channel_scores(site, score, ridge)
    if score == "variance":
        return site.variance.flatten()
    tiny = torch.finfo(torch.float64).tiny
    return (site.variance / site.mean.square().clamp_min(tiny)).flatten()


def _source(site: SiteStats, granularity: str, constant: str) -> torch.Tensor:
    mean = site.mean
    if constant == "zero":
        return torch.zeros(mean.shape, dtype=torch.float32)
    if constant == "scalar" and granularity == "channel" and mean.dim() > 1:
        axis = site.channel_axis % mean.dim()
        dims = [d for d in range(mean.dim()) if d != axis]
        mean = mean.mean(dim=dims, keepdim=True).expand_as(site.mean)
    return mean.to(torch.float32).contiguous()


class Rankings:
    """Every site's replacement order, made once from the statistics.

    Args:
        stats: calibration statistics.
        granularity: ``element`` or ``channel``.
        score: ``variance``, ``relative`` or a score hook (see the module docstring).
        constant: ``map`` (the mean), ``scalar`` (per-channel scalar mean, channel
            granularity), ``zero`` (a zero-pruning baseline) or ``affine`` (the prediction
            from the kept channels, channel granularity; see :func:`velcro.plan`).
        ridge: ``affine`` constants and ``residual`` scores: the ridge strength.
        affine_sites: ``affine`` constants: the sites that get predictions (default all);
            the others get their mean maps.
        ridges: ``affine`` constants: choose the ridge per site and count among these (and
            ``inf``) by the prediction error on held-out images, whose statistics
            :meth:`set_heldout` gives (``ridge`` then only ranks ``residual`` scores).
    """

    def __init__(self, stats: Stats, granularity: str, score: str | ScoreFn = "variance",
                 constant: str = "map", ridge: float = DEFAULT_RIDGE,
                 affine_sites: Collection[str] | None = None,
                 ridges: Collection[float] = ()) -> None:
        if granularity not in ("element", "channel"):
            raise VelcroError(f"granularity '{granularity}' is unknown; use 'element' or 'channel'")
        if constant not in CONSTANTS:
            raise VelcroError(f"constant '{constant}' is unknown; use 'map', 'scalar' or 'zero'")
        if stats.count == 0:
            raise VelcroError("statistics hold no images; calibrate on at least one image")
        check_affine_options(stats, granularity, score if isinstance(score, str) else "",
                             constant, ridge)
        self.stats = stats
        self.ridge = ridge
        self.ridges = tuple(float(r) for r in ridges)
        self.granularity = granularity
        self.score_name = score if isinstance(score, str) else getattr(score, "__name__", "custom")
        self.constant = constant
        self.sites: list[SiteRanking] = []
        for name, site in stats.sites.items():
            scores = _unit_scores(name, site, granularity, score, ridge)
            order = torch.sort(scores, stable=True).indices
            shape = tuple(site.shape)
            elements = math.prod(shape)
            units = elements if granularity == "element" else int(scores.numel())
            affine = constant == "affine" and (affine_sites is None or name in affine_sites)
            self.sites.append(SiteRanking(name, order, _source(site, granularity, constant),
                                          shape, site.channel_axis, units, elements,
                                          site if affine else None, ridge, self.ridges))

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def set_heldout(self, heldout: Stats) -> None:
        """Statistics (with covariance) of held-out images, to choose per-site ridges on."""
        for ranking in self.sites:
            ranking.heldout = heldout[ranking.name]
            ranking._affine.clear()

    def counts(self, fractions) -> tuple[int, ...]:
        """Units chosen per site for per-site fractions (a sequence in site order)."""
        return tuple(s.count(float(f)) for s, f in zip(self.sites, fractions, strict=True))

    def chosen_elements(self, counts) -> list[int]:
        return [c * s.elements // s.units for s, c in zip(self.sites, counts, strict=True)]

    def saving_ratio(self, counts) -> float:
        total = sum(s.elements for s in self.sites)
        return sum(self.chosen_elements(counts)) / total if total else 0.0

    def plan(self, fractions, counts=None) -> Plan:
        """The :class:`Plan` for per-site fractions (in site order)."""
        counts = counts if counts is not None else self.counts(fractions)
        sites = {}
        for ranking, fraction, count in zip(self.sites, fractions, counts, strict=True):
            units = torch.sort(ranking.order[:count]).values.to(torch.int64)
            mask = ranking.mask(count, self.granularity)
            constant = torch.where(mask, ranking.source, torch.zeros((), dtype=torch.float32))
            affine = ranking.affine(int(count))
            coefficients = None
            if affine is not None:
                constant, coefficients = affine[1], affine[2]
            sites[ranking.name] = SitePlan(float(fraction), units, constant.contiguous(),
                                           ranking.shape, ranking.channel_axis, coefficients)
        info = dict(self.stats.info)
        if self.constant == "affine" and self.ridges:
            info["ridges"] = {
                r.name: _readable(r.chosen_ridge(torch.sort(r.order[:c]).values))
                for r, c in zip(self.sites, counts, strict=True) if r.stats is not None and c}
        return Plan(self.granularity, sites, self.stats.structure, self.stats.weights,
                    self.score_name, self.constant, info,
                    self.ridge if self.constant == "affine" and not self.ridges else None)


def _readable(ridge: float) -> float | str:
    return "inf" if math.isinf(ridge) else ridge


def filter_norm_score(model: nn.Module) -> ScoreFn:
    """A baseline score hook: the L1 norm of each site's producing filter (smallest first).

    The classic magnitude criterion of filter pruning; it ignores the task's images.

    Example:
        >>> velcro.search(model, stats, data, granularity="channel",
        ...               score=filter_norm_score(model))
    """
    from velcro.graph import find_sites, trace

    gm = trace(model)
    norms = {}
    for site in find_sites(gm):
        try:
            weight = gm.get_submodule(site.producer).weight.detach()
        except AttributeError:
            continue
        norms[site.name] = weight.abs().flatten(1).sum(1).double().cpu()

    def l1_filter_norm(name: str, site: SiteStats) -> torch.Tensor:
        if name not in norms:
            raise VelcroError(
                f"site '{name}' has a functional producer; the filter-norm baseline needs "
                "convolution or linear modules"
            )
        return norms[name]

    return l1_filter_norm


def random_score(seed: int = 0) -> ScoreFn:
    """A baseline score hook: a random channel order per site (seeded by the site name).

    Example:
        >>> velcro.search(model, stats, data, granularity="channel", score=random_score(0))
    """

    def random_order(name: str, site: SiteStats) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()) ^ int(seed))
        channels = site.shape[site.channel_axis % len(site.shape)] if site.shape else 1
        return torch.rand(channels, generator=generator, dtype=torch.float64)

    return random_order

"""Per-site streaming statistics: count, mean and population variance, in float64.

Optionally (``velcro.calibrate(..., covariance=True)``) also the channel co-moment of each
site: the ``channels x channels`` sums of products of deviations from the per-position means,
over images and positions, which the affine constants of :func:`velcro.plan` are fitted from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file

from velcro._comoments import merge_comoment, update_comoment
from velcro._format import plural, shape_text
from velcro._io import atomic_path
from velcro._moments import update_moments, update_moments_and_centre
from velcro._stats_file import FORMAT, read_stats_file
from velcro.errors import VelcroError


@dataclass
class SiteStats:
    """Running moments of one site's per-image activation tensor.

    ``mean`` and ``m2`` (sum of squared deviations) are float64 tensors with the shape of one
    image's activation (batch axis removed); ``count`` is the number of images seen.
    ``comoment``, when kept, is the float64 ``(channels, channels)`` sum over images m and
    positions p of ``(a_k(m, p) - mean_k(p)) * (a_r(m, p) - mean_r(p))``: deviations from the
    per-position means (None when not kept; an empty tensor before the first image).

    Example:
        >>> site = stats["layer1.0.relu:0"]
        >>> site
        SiteStats: 64x56x56 over 50 images, mean 0.412, mean variance 0.0837
        >>> site.variance.shape
        torch.Size([64, 56, 56])
    """

    count: int
    mean: torch.Tensor
    m2: torch.Tensor
    channel_axis: int = 0
    comoment: torch.Tensor | None = None

    def __repr__(self) -> str:
        figures = ""
        if self.count and self.mean.numel():
            figures = (f", mean {float(self.mean.mean()):.3g}, "
                       f"mean variance {float(self.variance.mean()):.3g}")
        return (f"SiteStats: {shape_text(self.shape)} over {plural(self.count, 'image')}"
                f"{figures}")

    @property
    def shape(self) -> tuple[int, ...]:
        """One image's activation shape at this site."""
        return tuple(self.mean.shape)

    def to_dict(self, tensors: bool = False) -> dict:
        """Count, shape, channel axis and summary figures; with ``tensors`` also ``mean``
        and ``variance`` as nested lists (JSON-ready).

        Example:
            >>> stats["layer1.0.relu:0"].to_dict()["count"]
            50
        """
        variance = self.variance
        summary = {"count": self.count, "shape": list(self.shape),
                   "channel_axis": self.channel_axis,
                   "mean_of_means": float(self.mean.mean()) if self.mean.numel() else 0.0,
                   "mean_of_variances": float(variance.mean()) if variance.numel() else 0.0}
        if tensors:
            summary.update({"mean": self.mean.tolist(), "variance": variance.tolist()})
        return summary

    @property
    def variance(self) -> torch.Tensor:
        """Population variance (divided by ``count``)."""
        if self.count == 0:
            return torch.zeros_like(self.m2)
        return self.m2 / self.count

    @property
    def channels(self) -> int:
        return self.shape[self.channel_axis] if self.shape else 1

    @property
    def positions(self) -> int:
        """Elements per channel (h x w after a convolution)."""
        return self.mean.numel() // max(1, self.channels)

    @property
    def channel_covariance(self) -> torch.Tensor:
        """``(channels, channels)`` covariance of deviations from the per-position means,
        averaged over images and positions (``comoment / (count * positions)``)."""
        if self.comoment is None or self.comoment.shape != (self.channels, self.channels):
            raise VelcroError(
                "these statistics hold no channel covariance; calibrate with "
                "velcro.calibrate(..., covariance=True) (`velcro calibrate --covariance`)"
            )
        return self.comoment / max(1, self.count * self.positions)

    def update(self, batch: torch.Tensor) -> None:
        """Add a batch (first axis = images): float64 Welford, image by image."""
        if self.comoment is None:
            self.count, self.mean, self.m2 = update_moments(self.count, self.mean, self.m2,
                                                            batch)
            return
        # the Welford pass also centres the batch for its co-moment
        count = self.count
        self.count, self.mean, self.m2, centre = update_moments_and_centre(
            self.count, self.mean, self.m2, batch)
        if centre is not None:
            self.comoment = update_comoment(count, centre, self.comoment, batch,
                                            self.channel_axis)

    def merge_moments(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor,
                      comoment_b: torch.Tensor | None = None) -> None:
        """Fold in the moments of another set of images (exact, Chan et al.).

        The co-moment survives only when both sides have one (or one side is empty).
        """
        n_a = self.count
        if n_b == 0:
            return
        if n_a == 0:
            self.count, self.mean, self.m2 = n_b, mean_b.clone(), m2_b.clone()
            self.comoment = None if comoment_b is None else comoment_b.clone()
            return
        if self.comoment is not None and comoment_b is not None:
            self.comoment = merge_comoment(n_a, self.mean, self.comoment, n_b, mean_b,
                                           comoment_b, self.channel_axis)
        else:
            self.comoment = None
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (n_a * n_b / n)
        self.count = n


@dataclass
class Stats:
    """Calibration statistics of every site of one model.

    Attributes:
        sites: per-site moments, in the model's site order.
        structure: fingerprint of the model's layout (state_dict keys/shapes, site names).
        weights: fingerprint of the model's weights.
        info: free-form metadata (model name, task, data source), saved with the stats.

    ``print(stats)`` shows what they cover in a few lines; the tensors stay in ``sites``.

    Example:
        >>> stats = velcro.calibrate(model, loader)
        >>> stats
        Stats: 17 sites, 2,308,096 activation elements per image, over 50 images
          model resnet18, weights resnet18-f37072fd.pth, task cats
        >>> stats.save("cats.stats.safetensors")
        >>> stats = velcro.Stats.load("cats.stats.safetensors")
        >>> stats["layer1.0.relu:0"].variance.shape
        torch.Size([64, 56, 56])
    """

    sites: dict[str, SiteStats]
    structure: str
    weights: str
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        elements = sum(site.mean.numel() for site in self.sites.values())
        lines = [f"Stats: {plural(len(self.sites), 'site')}, {elements:,} activation elements "
                 f"per image, over {plural(self.count, 'image')}"]
        described = [f"{key} {self.info[key]}" for key in ("model", "weights", "task")
                     if self.info.get(key) not in (None, "")]
        if described:
            lines.append("  " + ", ".join(described))
        return "\n".join(lines)

    @property
    def names(self) -> list[str]:
        """Site names, in the model's site order."""
        return list(self.sites)

    def to_dict(self, tensors: bool = False) -> dict:
        """Fingerprints, info and one entry per site (:meth:`SiteStats.to_dict`); JSON-ready.

        Args:
            tensors: also give every site's ``mean`` and ``variance`` as nested lists.

        Example:
            >>> json.dumps(stats.to_dict())
        """
        return {"format": FORMAT, "images": self.count, "structure": self.structure,
                "weights": self.weights, "info": self.info,
                "sites": {name: site.to_dict(tensors) for name, site in self.sites.items()}}

    @property
    def has_covariance(self) -> bool:
        """Every site holds its channel co-moment (``calibrate(..., covariance=True)``)."""
        return bool(self.sites) and all(
            s.comoment is not None and s.comoment.shape == (s.channels, s.channels)
            for s in self.sites.values())

    @property
    def count(self) -> int:
        """Number of images the statistics were computed on."""
        counts = {s.count for s in self.sites.values()}
        return counts.pop() if len(counts) == 1 else min(counts, default=0)

    def __getitem__(self, name: str) -> SiteStats:
        try:
            return self.sites[name]
        except KeyError:
            raise VelcroError(
                f"no site named '{name}' in these statistics; sites are: "
                + ", ".join(list(self.sites)[:8])
                + (" ..." if len(self.sites) > 8 else "")
            ) from None

    def __len__(self) -> int:
        return len(self.sites)

    def merge(self, other: Stats) -> Stats:
        """Statistics over the union of both image sets (exact). Neither input changes.

        Example:
            >>> whole = first_half.merge(second_half)
        """
        if self.structure != other.structure or self.names != other.names:
            raise VelcroError(
                "cannot merge statistics of different models "
                f"(structure {self.structure} vs {other.structure}); calibrate the same model"
            )
        if self.weights != other.weights:
            raise VelcroError(
                "cannot merge statistics of models with different weights "
                f"({self.weights} vs {other.weights}); calibrate the same weights"
            )
        merged = {}
        for name, a in self.sites.items():
            b = other.sites[name]
            site = SiteStats(a.count, a.mean.clone(), a.m2.clone(), a.channel_axis,
                             None if a.comoment is None else a.comoment.clone())
            site.merge_moments(b.count, b.mean, b.m2, b.comoment)
            merged[name] = site
        return Stats(merged, self.structure, self.weights, dict(self.info))

    def check_model(self, model, *, what: str = "these statistics were") -> None:
        """Raise VelcroError unless ``model`` is the model these statistics came from."""
        from velcro.graph import find_sites, trace
        from velcro.graph.capture import recorded_example
        from velcro.graph.fingerprint import structure_fingerprint, weights_fingerprint

        names = [s.name for s in find_sites(trace(model, recorded_example(model, self.info)))]
        if structure_fingerprint(model, names) != self.structure:
            raise VelcroError(
                f"{what} made for another model (structure fingerprint "
                f"{self.structure}, this model's is {structure_fingerprint(model, names)}); "
                "calibrate this model, or load the one they came from"
            )
        if weights_fingerprint(model) != self.weights:
            raise VelcroError(
                f"{what} made for the same architecture with other weights "
                f"(weights fingerprint {self.weights}, this model's is "
                f"{weights_fingerprint(model)}); calibrate with these weights"
            )

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file (tensors) with JSON metadata in its header.

        The file is written to a temporary name and renamed, so a failure never leaves a
        half-written file.
        """
        tensors: dict[str, torch.Tensor] = {}
        sites_meta = []
        for name, s in self.sites.items():
            tensors[f"mean/{name}"] = s.mean.contiguous()
            tensors[f"m2/{name}"] = s.m2.contiguous()
            row = {"name": name, "shape": list(s.shape), "count": s.count,
                   "channel_axis": s.channel_axis}
            if s.comoment is not None and s.comoment.shape == (s.channels, s.channels):
                tensors[f"comoment/{name}"] = s.comoment.contiguous()
                row["covariance"] = True
            sites_meta.append(row)
        meta = {
            "format": FORMAT,
            "structure": self.structure,
            "weights": self.weights,
            "images": self.count,
            "sites": sites_meta,
            "info": self.info,
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"velcro": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Stats:
        """Read statistics written by :meth:`save`, validating every field (see
        :mod:`velcro._stats_file`): non-finite or negative moments are refused."""
        content = read_stats_file(path)
        sites = {name: SiteStats(count, mean, m2, axis, comoment)
                 for name, count, mean, m2, axis, comoment in content["sites"]}
        return cls(sites, content["structure"], content["weights"], content["info"])

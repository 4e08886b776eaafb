"""Affine compensation: trimmed channels predicted from the kept channels of the same site.

At a site with kept channels K and trimmed channels R, the prediction at every position p is

    a_r(p) ~ mu_r(p) + sum_{k in K} beta_rk (a_k(p) - mu_k(p))
           = offset_r(p) + sum_{k in K} beta_rk a_k(p),   offset_r = mu_r - sum_k beta_rk mu_k

with per-position means mu(p) and one beta per channel pair, shared over positions (what folds
into a consumer's weights). beta is the ridge regression of R on K over the calibration
images and positions, in closed form from the channel covariance Sigma of deviations from the
per-position means (``SiteStats.channel_covariance``):

    beta^T = (Sigma_KK + ridge * diag(Sigma_KK))^-1 Sigma_KR

The ridge is relative to each kept channel's variance (scale-free; ridge regression on
standardised channels); ``ridge = inf`` gives beta = 0, the mean map of S-VELCRO.

Ranking by residual variance (``score="residual"``): a greedy forward selection of the kept
channels (pivoted Cholesky of the ridge-regularised covariance): each step keeps the channel
the already kept ones predict worst; the channels trimmed first are the ones kept last, those
the others predict best. With ``ridge = inf`` it is the plain variance ranking.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from velcro._moments import channels_first
from velcro.errors import VelcroError

if TYPE_CHECKING:
    from velcro.stats import SiteStats, Stats

# A floor on the regularised diagonal, relative to the largest channel variance: keeps the
# solve defined where a kept channel never varies (a dead ReLU) or channels are collinear.
_FLOOR = 1e-9


def _floor(variances: torch.Tensor) -> float:
    top = float(variances.max()) if variances.numel() else 0.0
    return _FLOOR * top if top > 0 else torch.finfo(torch.float64).tiny


def ridge_coefficients(covariance: torch.Tensor, dropped: torch.Tensor,
                       ridge: float) -> torch.Tensor:
    """beta, ``(len(dropped), channels)`` float64, zero in the dropped channels' columns.

    Args:
        covariance: ``(channels, channels)`` covariance of deviations (float64).
        dropped: indices of the trimmed channels R.
        ridge: ridge strength relative to each kept channel's variance (``inf``: zeros).
    """
    channels = covariance.shape[0]
    is_dropped = torch.zeros(channels, dtype=torch.bool)
    is_dropped[dropped] = True
    kept = (~is_dropped).nonzero().flatten()
    beta = torch.zeros((dropped.numel(), channels), dtype=torch.float64)
    if math.isinf(ridge) or kept.numel() == 0 or dropped.numel() == 0:
        return beta
    sigma = covariance.to(torch.float64)
    sigma_kk = sigma[kept][:, kept]
    sigma_kr = sigma[kept][:, dropped]
    variances = sigma_kk.diagonal()
    system = sigma_kk + torch.diag(ridge * variances + _floor(sigma.diagonal()))
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        solution = torch.cholesky_solve(sigma_kr, factor)
    else:  # not positive definite in floating point: the least-squares solution
        solution = torch.linalg.lstsq(system, sigma_kr).solution
    beta[:, kept] = solution.T
    return beta


def affine_offset(mean: torch.Tensor, beta: torch.Tensor, dropped: torch.Tensor,
                  channel_axis: int) -> torch.Tensor:
    """``offset_r(p) = mu_r(p) - sum_k beta_rk mu_k(p)`` in the site's per-image layout,
    float64, zero outside the dropped channels."""
    flat = channels_first(mean.unsqueeze(0).to(torch.float64), channel_axis)[0]  # (C, P)
    offsets = flat[dropped] - beta @ flat
    result = torch.zeros_like(flat)
    result[dropped] = offsets
    axis = channel_axis % mean.dim()
    moved = list(mean.shape)
    moved.insert(0, moved.pop(axis))
    return result.view(moved).movedim(0, axis)


def heldout_errors(calibration: SiteStats, heldout: SiteStats, dropped: torch.Tensor,
                   ridges: list[float]) -> list[float]:
    """Mean squared error of each ridge's prediction of the dropped channels on held-out
    images: per image and position, summed over the dropped channels.

    The predictions are fitted on ``calibration`` (coefficients and means); the error is
    read from ``heldout``'s moments in closed form: with d = a - mu_calibration, the second
    moment of d is the held-out covariance plus the mean over positions of
    ``(mu_heldout - mu_calibration)(p)`` times its transpose, and the error of beta is
    ``trace(B E[d d^T] B^T)``, ``B = [I_R, -beta]``. ``ridge = inf`` is the mean map's error.
    """
    delta = channels_first((heldout.mean - calibration.mean).unsqueeze(0).to(torch.float64),
                           calibration.channel_axis)[0]
    second = heldout.channel_covariance + delta @ delta.T / max(1, delta.shape[1])
    sigma = calibration.channel_covariance
    errors = []
    rows = torch.arange(dropped.numel())
    for ridge in ridges:
        weights = -ridge_coefficients(sigma, dropped, ridge)
        weights[rows, dropped] += 1.0
        errors.append(float(torch.einsum("rc,cd,rd->", weights, second, weights)))
    return errors


def residual_scores(covariance: torch.Tensor, ridge: float) -> torch.Tensor:
    """Per-channel scores, lowest trimmed first, ranking by residual variance (greedy).

    The kept channels are chosen greedily: each step keeps the channel with the largest
    variance left unexplained by the ridge prediction from those kept before it. Channels
    trimmed first are those kept last. Channels the kept ones predict exactly (up to
    rounding) and channels that never vary come first, by plain variance. Returns each
    channel's position in the trimming order (float64).
    """
    sigma = covariance.to(torch.float64)
    channels = sigma.shape[0]
    variances = sigma.diagonal().clone()
    if math.isinf(ridge) or channels == 0:
        return variances
    floor = _floor(variances)
    shift = ridge * variances + floor
    system = sigma + torch.diag(shift)
    left = system.diagonal().clone()  # Schur complement's diagonal
    columns = torch.zeros((channels, channels), dtype=torch.float64)
    available = torch.ones(channels, dtype=torch.bool)
    kept: list[int] = []
    tolerance = 1e-12 * float(variances.max()) if channels else 0.0
    for step in range(channels):
        unexplained = torch.where(available, left - shift, -math.inf)
        best = int(torch.argmax(unexplained))
        if float(unexplained[best]) <= tolerance:
            break
        column = system[:, best] - columns[:, :step] @ columns[best, :step]
        column = column / math.sqrt(float(left[best]))
        columns[:, step] = column
        left -= column.square()
        available[best] = False
        kept.append(best)
    rest = available.nonzero().flatten()
    rest = rest[torch.sort(variances[rest], stable=True).indices]
    order = torch.cat([rest, torch.tensor(kept[::-1], dtype=torch.int64)])
    scores = torch.empty(channels, dtype=torch.float64)
    scores[order] = torch.arange(channels, dtype=torch.float64)
    return scores


def check_affine_options(stats: Stats, granularity: str, score: str, constant: str,
                         ridge: float) -> None:
    """Raise VelcroError unless the affine options (constant, residual score, ridge) fit."""
    if constant != "affine" and score != "residual":
        return
    if granularity != "channel":
        raise VelcroError(
            f"{'affine constants' if constant == 'affine' else 'residual scores'} are for "
            "channel plans; use granularity='channel'"
        )
    if not isinstance(ridge, (int, float)) or isinstance(ridge, bool) or math.isnan(ridge) \
            or ridge < 0:
        raise VelcroError(f"ridge {ridge!r} is not a non-negative number (math.inf: the mean)")
    if not stats.has_covariance:
        raise VelcroError(
            "these statistics hold no channel covariance, which affine constants and residual "
            "scores are fitted from; calibrate with velcro.calibrate(..., covariance=True) "
            "(`velcro calibrate --covariance`)"
        )


def affine_constants(site: SiteStats, units: torch.Tensor,
                     ridge: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(offset map in the site's shape, float64; coefficients float32 or None where zero)."""
    beta = ridge_coefficients(site.channel_covariance, units, ridge)
    offset = affine_offset(site.mean, beta, units, site.channel_axis)
    if not bool(beta.ne(0).any()):
        return offset, None
    return offset, beta.to(torch.float32)

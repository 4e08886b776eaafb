"""Channel co-moments of a site (``calibrate(..., covariance=True)``): float32 products of
the deviations from each batch's own mean, summed and Chan-merged in float64."""

from __future__ import annotations

import torch

from velcro._moments import BatchCentre, channels_first

# The co-moment's products run in float32 (on the CPU, 4-8x faster than float64 for these
# thin matrices; see update_comoment for the error bound), each matrix product over the
# deviations of whole images with at most about this many (image, position) terms, and the
# products of one batch summed in float64.
_PRODUCT_DTYPE = torch.float32
_PRODUCT_TERMS = 1 << 12
# Scratch (the centred deviations, in _PRODUCT_DTYPE) of one slab of images: a batch is walked
# in slabs so that the scratch does not grow with the batch (16 MiB in float32).
_SCRATCH_ELEMENTS = 1 << 22


def _product_dtype(device: torch.device) -> torch.dtype:
    # CUDA may run float32 products in TF32 (10-bit mantissa) when the user allowed it: the
    # bound below would not hold, so products are then made in float64
    if (device.type == "cuda" and _PRODUCT_DTYPE == torch.float32
            and torch.get_float32_matmul_precision() != "highest"):
        return torch.float64
    return _PRODUCT_DTYPE


def _column_blocks(channels: int) -> list[tuple[int, int]]:
    """Blocks of channels whose products are made one block-column at a time (the
    co-moment is symmetric: only the blocks on and below the diagonal are multiplied)."""
    blocks = 1 if channels < 64 else min(8, channels // 32)  # blocks of at least 32 rows
    size = channels // blocks
    return [(b * size, channels if b == blocks - 1 else (b + 1) * size)
            for b in range(blocks)]


def _gram(x: torch.Tensor, centre: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``sum over images and positions of (x - centre)(x - centre)^T`` in float64.

    ``x`` is ``(images, channels, positions)``, ``centre`` ``(channels, positions)``. The
    deviations are written once, in ``dtype``, by groups of ``group`` images, as
    ``(groups, channels, group * positions)``: one batched matrix product per block-column
    (:func:`_column_blocks`; 0.6-0.8 of the full product's work from 64 channels) then makes
    every group's products (sums of at most about ``_PRODUCT_TERMS`` terms), which are summed
    in float64.
    """
    images, channels, positions = x.shape
    group = max(1, min(images, _PRODUCT_TERMS // max(1, positions)))
    while images % group:  # whole groups: no padding, no second product for a remainder
        group -= 1
    slab = group * max(1, _SCRATCH_ELEMENTS // max(1, group * channels * positions))
    blocks = _column_blocks(channels)
    gram = torch.zeros((channels, channels), dtype=torch.float64, device=x.device)
    for start in range(0, images, slab):
        part = x[start:start + slab]
        groups = part.shape[0] // group
        centred = torch.empty((groups, channels, group, positions), dtype=dtype,
                              device=x.device)
        torch.sub(part.reshape(groups, group, channels, positions).transpose(1, 2),
                  centre.unsqueeze(1), out=centred)
        flat = centred.view(groups, channels, group * positions)
        for lo, hi in blocks:
            gram[lo:, lo:hi] += torch.bmm(flat[:, lo:], flat[:, lo:hi].transpose(1, 2)).sum(
                0, dtype=torch.float64)
    for lo, hi in blocks[:-1]:  # the blocks above the diagonal, by symmetry
        gram[lo:hi, hi:] = gram[hi:, lo:hi].T
    return gram


def update_comoment(
    count: int, centre: BatchCentre, comoment: torch.Tensor, batch: torch.Tensor,
    channel_axis: int = 0,
) -> torch.Tensor:
    """Fold ``batch`` into the channel co-moment of deviations from the per-position means.

    The co-moment is ``S[k, r] = sum over images m and positions p of
    (a_k(m, p) - mu_k(p)) (a_r(m, p) - mu_r(p))``, with ``mu(p)`` the per-position mean over
    all images seen. Per position this is the multivariate M2 of Welford/Chan; summed over
    positions, Chan's merge of two image sets A and B stays exact and cheap:
    ``S = S_A + S_B + n_A n_B / n * sum_p delta(p) delta(p)^T``, ``delta = mu_B - mu_A``.

    ``count`` is the number of images before the batch; ``centre`` the batch's
    :class:`~velcro._moments.BatchCentre`, which the Welford pass makes from the same read of
    the batch (:func:`~velcro._moments.update_moments_and_centre`): the per-position means
    are not computed twice.

    The batch's co-moment ``S_B`` is one float32 product of its deviations from a centre
    ``c``: its own float64 mean ``mu_B`` rounded to float32. With ``y = fl32(a - c)`` and
    ``e = mu_B - c`` (exact in float64), ``S_B = sum y y^T - n_B sum_p e(p) e(p)^T``. Why
    this is accurate (u = 2^-24, float32's unit roundoff):

    - centring first removes the mean: the products are of deviations, so there is no
      cancellation of ``n mu^2``-sized terms (the failure of a float32 sum of ``a a^T``);
    - ``a - c`` is exact where ``c/2 <= a <= 2c`` (Sterbenz: near-constant channels on a
      large offset), otherwise within ``u |a - c|``;
    - each product group sums at most ``max(_PRODUCT_TERMS, positions)`` terms ``K`` in
      float32, so its error is at most about ``K u sum |y_k||y_r| <= K u sqrt(G_kk G_rr)``
      (Cauchy-Schwarz, ``G = sum y y^T``, which is ``S_B`` but for the tiny ``e`` term);
      independent roundings mostly cancel: what the tests measure is at most a few
      ``u sqrt(S_kk S_rr)``;
    - the groups, the corrections and Chan's merge are summed in float64.

    The centre and the products depend on the batch alone (its float64 mean, summed in image
    order), so the co-moment of a stream of batches does not depend on how the batches are
    grouped into processes beyond float64 rounding; cutting the *images* into other batches
    changes the float32 rounding only (about ``u`` relative).

    Returns the new ``(channels, channels)`` float64 co-moment (symmetric).
    """
    x = channels_first(batch.detach(), channel_axis)
    images, channels, _ = x.shape
    if images == 0:
        return comoment
    dtype = _product_dtype(x.device)
    if dtype == torch.float64:  # deviations in float64 too (exact for float32 activations)
        x = x.double()
    elif x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    mean_centre, offset, shift = (channels_first(t.unsqueeze(0), channel_axis)[0]
                                  for t in centre)
    batch_comoment = _gram(x, mean_centre, dtype)
    batch_comoment.addmm_(offset, offset.T, alpha=-images)
    if count and comoment.shape == (channels, channels):
        batch_comoment.addmm_(shift, shift.T, alpha=count * images / (count + images))
        batch_comoment += comoment
    return (batch_comoment + batch_comoment.T).mul_(0.5)


def merge_comoment(
    n_a: int, mean_a: torch.Tensor, comoment_a: torch.Tensor,
    n_b: int, mean_b: torch.Tensor, comoment_b: torch.Tensor, channel_axis: int = 0,
) -> torch.Tensor:
    """The co-moment of the union of two image sets (Chan's formula, summed over positions).

    ``mean_a``/``mean_b`` are the per-image-shaped means of each set (before merging).
    """
    if n_a == 0:
        return comoment_b.clone()
    if n_b == 0:
        return comoment_a.clone()
    delta = channels_first((mean_b - mean_a).unsqueeze(0), channel_axis)[0]
    merged = comoment_a + comoment_b
    return merged.addmm_(delta, delta.T, alpha=n_a * n_b / (n_a + n_b))

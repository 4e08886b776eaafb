"""The calibration hot loop: per-element Welford updates in float64.

Calibration must cost little more than plain inference, and the work is memory-bound:
tens of millions of activation elements per batch. A fused numba kernel reads each float32
activation once and keeps the float64 running mean and M2 of a block of elements in cache
while it walks the batch, image by image. Because it is sequential Welford over images, the
result does not depend on how images were grouped into batches (which keeps sharded,
distributed calibration equal to single-process calibration). Without numba (or for tensors
not on the CPU) the same moments are computed with torch in float64 and merged per batch
with Chan's formula.
"""

from __future__ import annotations

import torch

from velcro._globals import torch_threads_kept
from velcro.errors import VelcroError

try:  # numba is a declared dependency; the fallback keeps velcro usable without it
    import numba
    import numpy as np
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

_BLOCK = 1024  # elements per work unit: mean + M2 in float64 = 16 KiB, fits in L1

if numba is not None:

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _welford_blocks(x, count, mean, m2):  # pragma: no cover - compiled
        images, elements = x.shape
        blocks = (elements + _BLOCK - 1) // _BLOCK
        for block in numba.prange(blocks):
            lo = block * _BLOCK
            hi = min(lo + _BLOCK, elements)
            # Slices, not indices into the whole arrays: LLVM then vectorises the inner loop
            # (3x faster on ResNet-18's 2.3 M elements per image, same bits).
            block_mean = mean[lo:hi]
            block_m2 = m2[lo:hi]
            for i in range(images):
                inverse = 1.0 / (count + i + 1)
                row = x[i, lo:hi]
                for j in range(hi - lo):
                    value = np.float64(row[j])
                    delta = value - block_mean[j]
                    block_mean[j] += delta * inverse
                    block_m2[j] += delta * (value - block_mean[j])

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _welford_blocks_sum(x, count, mean, m2, total):  # pragma: no cover - compiled
        # _welford_blocks, also summing the batch per element in float64 (images in order:
        # the batch's own mean, the same bits whatever came before it)
        images, elements = x.shape
        blocks = (elements + _BLOCK - 1) // _BLOCK
        for block in numba.prange(blocks):
            lo = block * _BLOCK
            hi = min(lo + _BLOCK, elements)
            block_mean = mean[lo:hi]
            block_m2 = m2[lo:hi]
            block_total = total[lo:hi]
            for i in range(images):
                inverse = 1.0 / (count + i + 1)
                row = x[i, lo:hi]
                for j in range(hi - lo):
                    value = np.float64(row[j])
                    delta = value - block_mean[j]
                    block_mean[j] += delta * inverse
                    block_m2[j] += delta * (value - block_mean[j])
                    block_total[j] += value


class ShapeChanged(VelcroError):
    """A batch whose per-image shape differs from the images already counted."""

    def __init__(self, before: tuple[int, ...], after: tuple[int, ...], count: int) -> None:
        self.before, self.after, self.count = before, after, count
        super().__init__(
            f"activations of {_shape(after)} after {count} images of {_shape(before)}: "
            "statistics are per element, so every image needs one size"
        )


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def fused_available() -> bool:
    return numba is not None


def update_moments(
    count: int, mean: torch.Tensor, m2: torch.Tensor, batch: torch.Tensor
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Fold ``batch`` (images on axis 0) into running float64 moments.

    ``mean`` and ``m2`` are updated in place when they already have the batch's per-image
    shape, and returned either way. Returns ``(count, mean, m2)``.

    Raises:
        VelcroError: images already counted had another per-image shape (moments are per
            element: there is no mean over images of two sizes).
    """
    return _update(count, mean, m2, batch, False)[:3]


def update_moments_and_batch_mean(
    count: int, mean: torch.Tensor, m2: torch.Tensor, batch: torch.Tensor
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`update_moments`, also returning the batch's own per-element mean (float64,
    summed in the same pass): ``(count, mean, m2, batch_mean)``."""
    return _update(count, mean, m2, batch, True)


def _update(count: int, mean: torch.Tensor, m2: torch.Tensor, batch: torch.Tensor,
            with_batch_mean: bool) -> tuple:
    images = batch.shape[0]
    if images == 0:
        return count, mean, m2, None
    shape = batch.shape[1:]
    if mean.shape != shape:
        if count > 0:
            raise ShapeChanged(tuple(mean.shape), tuple(shape), count)
        mean = torch.zeros(shape, dtype=torch.float64, device=batch.device)
        m2 = torch.zeros(shape, dtype=torch.float64, device=batch.device)
    if numba is not None and batch.device.type == "cpu" and mean.is_contiguous():
        data = batch.detach()
        if data.dtype not in (torch.float32, torch.float64):
            data = data.float()
        data = data.reshape(images, -1)
        if not data.is_contiguous():
            data = data.contiguous()
        arrays = (data.numpy(), count, mean.view(-1).numpy(), m2.view(-1).numpy())
        total = torch.zeros(shape, dtype=torch.float64) if with_batch_mean else None
        with torch_threads_kept():  # numba's OpenMP start-up resets torch's thread count
            if total is None:
                _welford_blocks(*arrays)
            else:
                _welford_blocks_sum(*arrays, total.view(-1).numpy())
        return count + images, mean, m2, None if total is None else total.div_(images)
    data = batch.detach().to(torch.float64)
    batch_m2, batch_mean = torch.var_mean(data, dim=0, correction=0)
    batch_m2.mul_(images)
    if count == 0:
        return images, batch_mean.clone(), batch_m2, batch_mean
    total = count + images
    delta = batch_mean - mean
    mean = mean + delta * (images / total)
    m2 = m2 + batch_m2 + delta.square() * (count * images / total)
    return total, mean, m2, batch_mean


# The co-moment's products run in float32 (on the CPU, 4-8x faster than float64 for these
# thin matrices; see update_comoment for the error bound), each matrix product over the
# deviations of whole images with at most about this many (image, position) terms, and the
# products of one batch summed in float64.
_PRODUCT_DTYPE = torch.float32
_PRODUCT_TERMS = 1 << 12
# Scratch (the centred deviations, in _PRODUCT_DTYPE) of one slab of images: a batch is walked
# in slabs so that the scratch does not grow with the batch (16 MiB in float32).
_SCRATCH_ELEMENTS = 1 << 22


def channels_first(batch: torch.Tensor, channel_axis: int) -> torch.Tensor:
    """``batch`` (images first) as ``(images, channels, positions)``: a view where possible.

    ``channel_axis`` is the channel axis of one image's tensor (0, or -1 after a linear).
    """
    axis = channel_axis + 1 if channel_axis >= 0 else batch.dim() + channel_axis
    if axis != 1:
        batch = batch.movedim(axis, 1)
    return batch.reshape(batch.shape[0], batch.shape[1], -1)


def _product_dtype(device: torch.device) -> torch.dtype:
    # CUDA may run float32 products in TF32 (10-bit mantissa) when the user allowed it: the
    # bound below would not hold, so products are then made in float64
    if (device.type == "cuda" and _PRODUCT_DTYPE == torch.float32
            and torch.get_float32_matmul_precision() != "highest"):
        return torch.float64
    return _PRODUCT_DTYPE


def _gram(x: torch.Tensor, centre: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``sum over images and positions of (x - centre)(x - centre)^T`` in float64.

    ``x`` is ``(images, channels, positions)``, ``centre`` ``(channels, positions)``. The
    deviations are written once, in ``dtype``, by groups of ``group`` images, as
    ``(groups, channels, group * positions)``: one batched matrix product then makes every
    group's ``channels x channels`` products (sums of at most about ``_PRODUCT_TERMS``
    terms), which are summed in float64.
    """
    images, channels, positions = x.shape
    group = max(1, min(images, _PRODUCT_TERMS // max(1, positions)))
    while images % group:  # whole groups: no padding, no second product for a remainder
        group -= 1
    slab = group * max(1, _SCRATCH_ELEMENTS // max(1, group * channels * positions))
    gram = torch.zeros((channels, channels), dtype=torch.float64, device=x.device)
    for start in range(0, images, slab):
        part = x[start:start + slab]
        groups = part.shape[0] // group
        centred = torch.empty((groups, channels, group, positions), dtype=dtype,
                              device=x.device)
        torch.sub(part.reshape(groups, group, channels, positions).transpose(1, 2),
                  centre.unsqueeze(1), out=centred)
        flat = centred.view(groups, channels, group * positions)
        gram += torch.bmm(flat, flat.transpose(1, 2)).sum(0, dtype=torch.float64)
    return gram


def update_comoment(
    count: int, mean: torch.Tensor, batch_mean: torch.Tensor, comoment: torch.Tensor,
    batch: torch.Tensor, channel_axis: int = 0,
) -> torch.Tensor:
    """Fold ``batch`` into the channel co-moment of deviations from the per-position means.

    The co-moment is ``S[k, r] = sum over images m and positions p of
    (a_k(m, p) - mu_k(p)) (a_r(m, p) - mu_r(p))``, with ``mu(p)`` the per-position mean over
    all images seen. Per position this is the multivariate M2 of Welford/Chan; summed over
    positions, Chan's merge of two image sets A and B stays exact and cheap:
    ``S = S_A + S_B + n_A n_B / n * sum_p delta(p) delta(p)^T``, ``delta = mu_B - mu_A``.

    ``count`` and ``mean`` are the images and per-position mean before the batch,
    ``batch_mean`` the batch's own mean (per-image shaped, float64): the Welford pass gives
    it (:func:`update_moments_and_batch_mean`), so it is not recomputed here.

    The batch's co-moment ``S_B`` is one float32 product of its deviations from a centre
    ``c``: ``mu_B`` rounded to float32. With ``y = fl32(a - c)`` and ``e = mu_B - c`` (the
    rounding of the centre, exact in float64), ``S_B = sum y y^T - n_B sum_p e(p) e(p)^T``.
    Why this is accurate (u = 2^-24, float32's unit roundoff):

    - centring first removes the mean: the products are of deviations, so there is no
      cancellation of ``n mu^2``-sized terms (the failure of a float32 sum of ``a a^T``);
    - ``a - c`` is exact where ``c/2 <= a <= 2c`` (Sterbenz: near-constant channels on a
      large offset), otherwise within ``u |a - c|``;
    - each product group sums at most ``max(_PRODUCT_TERMS, positions)`` terms ``K`` in
      float32, so its error is at most about ``K u sum |y_k||y_r| <= K u sqrt(G_kk G_rr)``
      (Cauchy-Schwarz, ``G = sum y y^T``, which is ``S_B`` but for the tiny ``e`` term);
      independent roundings mostly cancel: what the tests measure is about
      ``u sqrt(S_kk S_rr)``;
    - the groups, the correction and Chan's merge are summed in float64.

    The centre and the products depend on the batch alone (its float64 mean, summed in image
    order), so the co-moment of a stream of batches does not depend on how the batches are
    grouped into processes beyond float64 rounding; cutting the *images* into other batches
    changes the float32 rounding only (about ``u`` relative).

    Returns the new ``(channels, channels)`` float64 co-moment (symmetric).
    """
    x = channels_first(batch.detach(), channel_axis)
    images, channels, positions = x.shape
    if comoment.shape != (channels, channels):
        comoment = torch.zeros((channels, channels), dtype=torch.float64, device=x.device)
    if images == 0:
        return comoment
    batch_mean = channels_first(batch_mean.unsqueeze(0), channel_axis)[0].to(torch.float64)
    dtype = _product_dtype(x.device)
    if x.dtype == torch.float64:  # centred in float64, then rounded once
        centre = batch_mean
    else:  # centred in float32 (exact from float16/bfloat16), the centre rounded to float32
        x = x.float()
        centre = batch_mean.float()
    offset = batch_mean - centre.to(torch.float64)  # the centre's rounding, exact
    comoment = comoment + _gram(x, centre, dtype).addmm_(offset, offset.T, alpha=-images)
    if count:
        before = channels_first(mean.unsqueeze(0), channel_axis)[0].to(torch.float64)
        delta = batch_mean - before  # mu_B - mu_A
        comoment.addmm_(delta, delta.T, alpha=count * images / (count + images))
    return (comoment + comoment.T) * 0.5


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

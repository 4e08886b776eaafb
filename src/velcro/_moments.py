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
    images = batch.shape[0]
    if images == 0:
        return count, mean, m2
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
        with torch_threads_kept():  # numba's OpenMP start-up resets torch's thread count
            _welford_blocks(data.numpy(), count, mean.view(-1).numpy(), m2.view(-1).numpy())
        return count + images, mean, m2
    data = batch.detach().to(torch.float64)
    batch_m2, batch_mean = torch.var_mean(data, dim=0, correction=0)
    batch_m2.mul_(images)
    if count == 0:
        return images, batch_mean, batch_m2
    total = count + images
    delta = batch_mean - mean
    mean = mean + delta * (images / total)
    m2 = m2 + batch_m2 + delta.square() * (count * images / total)
    return total, mean, m2


# Elements of one float64 chunk of centred activations (64 MiB): the co-moment update walks a
# batch in chunks of images so that its scratch memory does not grow with the batch.
_CHUNK_ELEMENTS = 1 << 23
# The products of deviations run in float32 (twice float64's speed: the product costs about a
# tenth of a ResNet's own MACs), over at most this many (image, position) terms per matrix
# product, whose results are summed in float64: the co-moment is then exact to about 1e-6
# relative, far below the sampling error of any calibration set.
_PRODUCT_DTYPE = torch.float32
_PRODUCT_TERMS = 1 << 14


def channels_first(batch: torch.Tensor, channel_axis: int) -> torch.Tensor:
    """``batch`` (images first) as ``(images, channels, positions)``: a view where possible.

    ``channel_axis`` is the channel axis of one image's tensor (0, or -1 after a linear).
    """
    axis = channel_axis + 1 if channel_axis >= 0 else batch.dim() + channel_axis
    if axis != 1:
        batch = batch.movedim(axis, 1)
    return batch.reshape(batch.shape[0], batch.shape[1], -1)


def update_comoment(
    count: int, mean: torch.Tensor, comoment: torch.Tensor, batch: torch.Tensor,
    channel_axis: int = 0,
) -> torch.Tensor:
    """Fold ``batch`` into the channel co-moment of deviations from the per-position means.

    The co-moment is ``S[k, r] = sum over images m and positions p of
    (a_k(m, p) - mu_k(p)) (a_r(m, p) - mu_r(p))``, with ``mu(p)`` the per-position mean over
    all images seen. Per position this is the multivariate M2 of Welford/Chan; summed over
    positions, Chan's merge of two image sets A and B stays exact and cheap:
    ``S = S_A + S_B + n_A n_B / n * sum_p delta(p) delta(p)^T``, ``delta = mu_B - mu_A``.

    Call it *before* ``update_moments`` folds the same batch into ``count`` and ``mean``
    (which it reads: the moments of the images before this batch). Chunks of images are
    centred on their own per-position mean in float64 and merged one by one, so the result
    does not depend on the batch size beyond the products' rounding (``_PRODUCT_DTYPE``).

    Returns the new ``(channels, channels)`` float64 co-moment.
    """
    x = channels_first(batch.detach(), channel_axis)
    images, channels, positions = x.shape
    if comoment.shape != (channels, channels):
        comoment = torch.zeros((channels, channels), dtype=torch.float64, device=x.device)
    if images == 0:
        return comoment
    running = (channels_first(mean.unsqueeze(0), channel_axis)[0].to(torch.float64)
               if count else None)
    step = max(1, min(_CHUNK_ELEMENTS // max(1, channels * positions),
                      _PRODUCT_TERMS // max(1, positions)))
    for start in range(0, images, step):
        part = x[start:start + step]
        n_b = part.shape[0]
        part_mean = part.mean(dim=0, dtype=torch.float64)
        # deviations from the chunk's own mean, subtracted in float64 (exact for the small
        # deviations of near-constant channels), then rounded once to the product's dtype
        centred = torch.empty((channels, n_b, positions), dtype=_PRODUCT_DTYPE,
                              device=x.device)
        torch.sub(part.transpose(0, 1), part_mean.unsqueeze(1), out=centred)
        flat = centred.view(channels, -1)
        product = (flat @ flat.T).to(torch.float64)
        comoment = comoment + (product + product.T) * 0.5
        if count == 0:
            running = part_mean
        else:
            total = count + n_b
            delta = part_mean - running
            comoment.addmm_(delta, delta.T, alpha=count * n_b / total)
            running = running + delta * (n_b / total)
        count += n_b
    return comoment


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

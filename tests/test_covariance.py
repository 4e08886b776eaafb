"""Channel co-moments of deviations from per-position means (calibrate(covariance=True))."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_stats import chain_activations
from zoo import build, images

import velcro
import velcro._comoments as comoments
import velcro._moments as moments
from velcro._comoments import update_comoment
from velcro._moments import batch_centre, update_moments, update_moments_and_centre
from velcro.errors import VelcroError

U = 2.0 ** -24  # float32's unit roundoff
# The products of deviations run in float32 (velcro._moments.update_comoment): each element
# S[k, r] is within K u sqrt(S_kk S_rr) in the worst case (K <= 4096 terms per float32 sum),
# and about u sqrt(S_kk S_rr) in practice (independent roundings cancel). 64 u (3.8e-6) is
# the tolerance, relative to that Cauchy-Schwarz scale of each element.
COMOMENT_RTOL = 64 * U


def comoment_error(got, want) -> float:
    """max over elements of |got - want| / sqrt(want_kk want_rr)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    diagonal = np.abs(np.diag(want))
    scale = np.sqrt(np.outer(diagonal, diagonal))
    # a channel that never varies (a dead ReLU) has an exact zero row: any error counts
    floor = max(float(diagonal.max()), np.finfo(np.float64).tiny) * 1e-30
    return float((np.abs(got - want) / np.maximum(scale, floor)).max())


def assert_comoment_close(got, want, rtol: float = COMOMENT_RTOL) -> None:
    error = comoment_error(got, want)
    assert error <= rtol, f"co-moment off by {error:.3g} of its scale (tolerance {rtol:.3g})"


def new_site(channel_axis: int = 0) -> velcro.stats.SiteStats:
    return velcro.stats.SiteStats(0, torch.zeros(0, dtype=torch.float64),
                                  torch.zeros(0, dtype=torch.float64), channel_axis,
                                  torch.zeros((0, 0), dtype=torch.float64))


def streamed(x: torch.Tensor, batch: int, channel_axis: int = 0) -> velcro.stats.SiteStats:
    """The site's statistics after ``x`` in batches of ``batch`` images."""
    site = new_site(channel_axis)
    for start in range(0, len(x), batch):
        site.update(x[start:start + batch])
    return site


def reference_comoment(acts: np.ndarray, channel_axis: int) -> np.ndarray:
    """NumPy: sum over images and positions of products of deviations from the per-position
    means, from all the activations at once."""
    acts = np.moveaxis(acts, channel_axis + 1 if channel_axis >= 0 else acts.ndim - 1, 1)
    deviations = acts - acts.mean(axis=0, keepdims=True)
    flat = np.moveaxis(deviations, 1, 0).reshape(acts.shape[1], -1)
    return flat @ flat.T


def naive_float32_comoment(x: torch.Tensor) -> np.ndarray:
    """What the centring avoids: the sum of raw products in float32, less n sum_p mu mu^T."""
    flat = x.float().transpose(0, 1).reshape(x.shape[1], -1)
    mean = x.double().mean(0).reshape(x.shape[1], -1)
    return (flat @ flat.T).double().numpy() - len(x) * (mean @ mean.T).numpy()


def large_offset(images: int = 64, seed: int = 0) -> torch.Tensor:
    """Deviations of about 0.01 (correlated across channels) on per-position means of 1e4 to
    2e4: a few float32 ulps of the activations themselves."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(images, 1, 8, 8, generator=gen)
    own = torch.randn(images, 5, 8, 8, generator=gen)
    return (0.01 * (own + common * torch.linspace(0, 2, 5).view(5, 1, 1))
            + 1e4 * (1 + torch.rand(5, 8, 8, generator=gen)))


@torch.no_grad()
def test_comoments_match_numpy_over_stored_activations():
    model, shape = build("chain")
    data = images(shape, 37, batch=8)  # an uneven last batch
    stats = velcro.calibrate(model, data, progress=False, covariance=True)
    stored = [chain_activations(model, batch) for batch in data]
    assert stats.has_covariance
    for index, name in enumerate(stats.names):
        site = stats[name]
        acts = np.concatenate([b[index].numpy().astype(np.float64) for b in stored])
        expected = reference_comoment(acts, site.channel_axis)
        assert site.comoment.dtype == torch.float64
        assert site.comoment.shape == (site.channels, site.channels)
        assert torch.equal(site.comoment, site.comoment.T)
        assert_comoment_close(site.comoment.numpy(), expected)
        covariance = expected / (37 * site.positions)
        assert_comoment_close(site.channel_covariance.numpy(), covariance)
        # the diagonal is the per-element variance summed over the channel's positions
        per_channel = site.variance.movedim(site.channel_axis, 0).reshape(site.channels, -1)
        np.testing.assert_allclose(np.diag(expected) / 37, per_channel.sum(1).numpy(),
                                   rtol=COMOMENT_RTOL)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_large_means_and_small_deviations(batch):
    x = large_offset()
    expected = reference_comoment(x.double().numpy(), 0)
    # the data defeats a float32 sum of raw products: the test could fail
    assert comoment_error(naive_float32_comoment(x), expected) > 1e3 * COMOMENT_RTOL
    assert_comoment_close(streamed(x, batch).comoment.numpy(), expected)


def test_batch_size_does_not_change_the_comoment():
    gen = torch.Generator().manual_seed(3)
    # ReLU activations: exact zeros, a channel that never fires, offsets of order the spread
    x = torch.relu(torch.randn(61, 6, 5, 7, generator=gen)
                   + torch.randn(6, 5, 7, generator=gen))
    x[:, 2] = 0
    expected = reference_comoment(x.double().numpy(), 0)
    results = {batch: streamed(x, batch).comoment.numpy() for batch in (1, 7, 61)}
    for batch, comoment in results.items():
        assert_comoment_close(comoment, expected)
        assert np.all(comoment[2] == 0), batch  # a dead channel stays exactly zero
    assert_comoment_close(results[1], results[61], 2 * COMOMENT_RTOL)
    assert_comoment_close(results[7], results[61], 2 * COMOMENT_RTOL)


def test_float64_products_make_the_algebra_exact(monkeypatch):
    """With float64 products only float64 rounding is left: the centring, its correction,
    the groups of images, the slabs and Chan's merges are exact algebra."""
    x = large_offset(23)
    expected = reference_comoment(x.double().numpy(), 0)
    monkeypatch.setattr(comoments, "_PRODUCT_DTYPE", torch.float64)
    monkeypatch.setattr(comoments, "_PRODUCT_TERMS", 64)  # one image per product
    monkeypatch.setattr(comoments, "_SCRATCH_ELEMENTS", 5 * 64 * 3)  # slabs of 3 images
    for batch in (1, 4, 23):
        assert comoment_error(streamed(x, batch).comoment.numpy(), expected) < 1e-9


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_activations_of_other_dtypes(dtype):
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(19, 4, 3, 3, generator=gen) + 3).to(dtype)
    expected = reference_comoment(x.double().numpy(), 0)
    site = streamed(x, 5)
    assert site.comoment.dtype == torch.float64
    assert_comoment_close(site.comoment.numpy(), expected)


def test_channels_last_sites_after_linear_layers():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 6, 4, generator=gen)  # (tokens, features): channel axis -1
    first, second = x[:5].double().mean(0), x[5:].double().mean(0)
    comoment = update_comoment(0, batch_centre(None, first), torch.zeros(0, 0), x[:5], -1)
    comoment = update_comoment(5, batch_centre(first, second), comoment, x[5:], -1)
    expected = reference_comoment(x.double().numpy(), -1)
    assert_comoment_close(comoment.numpy(), expected)
    assert_comoment_close(streamed(x, 2, -1).comoment.numpy(), expected)


def test_the_welford_pass_centres_the_batch(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(11, 3, 4, 5, generator=gen) * 3 + 7
    count, mean, m2 = update_moments(0, torch.zeros(0), torch.zeros(0), x[:4])
    before = mean.clone()
    count, mean, m2, centre = update_moments_and_centre(count, mean, m2, x[4:])
    assert count == 11
    torch.testing.assert_close(mean, x.double().mean(0), rtol=1e-14, atol=0)
    batch_mean = x[4:].double().mean(0)
    assert torch.equal(centre.centre, batch_mean.float())  # the float32 rounding of mu_B
    assert torch.equal(centre.offset + centre.centre.double(), batch_mean)  # e is exact
    torch.testing.assert_close(centre.shift, batch_mean - before, rtol=1e-13, atol=1e-15)
    # the torch path (no numba, or not on the CPU): the same figures
    monkeypatch.setattr(moments, "numba", None)
    *_, fallback = update_moments_and_centre(4, before.clone(), m2.clone(), x[4:])
    torch.testing.assert_close(fallback.centre, centre.centre, rtol=2 * U, atol=0)
    torch.testing.assert_close(fallback.offset + fallback.centre.double(), batch_mean,
                               rtol=1e-14, atol=0)
    torch.testing.assert_close(fallback.shift, centre.shift, rtol=0, atol=1e-13)
    expected = reference_comoment(x.double().numpy(), 0)
    assert_comoment_close(streamed(x, 3).comoment.numpy(), expected)


def test_merge_of_two_halves_equals_the_whole():
    model, shape = build("residual")
    data = images(shape, 30, batch=5)
    whole = velcro.calibrate(model, data, progress=False, covariance=True)
    first = velcro.calibrate(model, data[:2], progress=False, covariance=True)
    second = velcro.calibrate(model, data[2:], progress=False, covariance=True)
    merged = first.merge(second)
    assert merged.has_covariance and merged.count == 30
    for name in whole.names:
        # the same batches, grouped otherwise: float64 rounding only
        assert comoment_error(merged[name].comoment, whole[name].comoment) < 1e-12
    plain = velcro.calibrate(model, data[2:], progress=False)
    assert not first.merge(plain).has_covariance  # one side without: none, never a wrong one


def test_saved_and_loaded_with_the_statistics(tmp_path):
    model, shape = build("concat")
    stats = velcro.calibrate(model, images(shape, 12), progress=False, covariance=True)
    stats.save(tmp_path / "s.safetensors")
    loaded = velcro.Stats.load(tmp_path / "s.safetensors")
    assert loaded.has_covariance
    for name in stats.names:
        torch.testing.assert_close(loaded[name].comoment, stats[name].comoment, rtol=0, atol=0)
    plain = velcro.calibrate(model, images(shape, 12), progress=False)
    plain.save(tmp_path / "p.safetensors")
    assert not velcro.Stats.load(tmp_path / "p.safetensors").has_covariance
    with pytest.raises(VelcroError, match="covariance=True"):
        _ = plain[plain.names[0]].channel_covariance


def test_linear_sites_reference_by_hand():
    """MLP: the GELU site after fc1 computed by hand."""
    model, shape = build("mlp")
    data = images(shape, 20, batch=6)
    stats = velcro.calibrate(model, data, progress=False, covariance=True)
    with torch.no_grad():  # batch by batch, as calibration saw them (same float32 bits)
        acts = torch.cat([F.gelu(model.fc1(b.flatten(1))) for b in data]).double().numpy()
    centred = acts - acts.mean(0)
    expected = centred.T @ centred
    assert_comoment_close(stats["act"].comoment.numpy(), expected)


def test_halves_of_a_stream_merged_equal_the_whole_stream():
    x = large_offset(40, seed=5)
    expected = reference_comoment(x.double().numpy(), 0)
    first, second = streamed(x[:17], 4), streamed(x[17:], 6)
    first.merge_moments(second.count, second.mean, second.m2, second.comoment)
    assert first.count == 40
    assert_comoment_close(first.comoment.numpy(), expected)
    assert_comoment_close(first.comoment.numpy(), streamed(x, 40).comoment.numpy(),
                          2 * COMOMENT_RTOL)


@pytest.mark.parametrize("channels", [64, 70, 130])
def test_wide_sites_multiply_only_the_lower_blocks(channels, monkeypatch):
    # from 64 channels the products are made by block-columns, the upper blocks mirrored
    gen = torch.Generator().manual_seed(channels)
    mixing = torch.randn(channels, channels, generator=gen) / channels ** 0.5
    x = torch.relu(torch.einsum("kc,ncp->nkp", mixing, torch.randn(12, channels, 6,
                                                                     generator=gen)) + 0.5)
    expected = reference_comoment(x.double().numpy(), 0)
    site = streamed(x, 5)
    assert torch.equal(site.comoment, site.comoment.T)
    assert_comoment_close(site.comoment.numpy(), expected)
    monkeypatch.setattr(comoments, "_PRODUCT_DTYPE", torch.float64)
    assert comoment_error(streamed(x, 5).comoment.numpy(), expected) < 1e-12

"""Channel co-moments of deviations from per-position means (calibrate(covariance=True))."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_stats import chain_activations
from zoo import build, images

import velcro
from velcro._moments import update_comoment
from velcro.errors import VelcroError

# the products of deviations run in float32 (summed in float64 in blocks): about 1e-6 relative
PRODUCT_RTOL = 2e-5


def reference_comoment(acts: np.ndarray, channel_axis: int) -> np.ndarray:
    """NumPy: sum over images and positions of products of deviations from the per-position
    means, from all the activations at once."""
    acts = np.moveaxis(acts, channel_axis + 1 if channel_axis >= 0 else acts.ndim - 1, 1)
    deviations = acts - acts.mean(axis=0, keepdims=True)
    flat = np.moveaxis(deviations, 1, 0).reshape(acts.shape[1], -1)
    return flat @ flat.T


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
        np.testing.assert_allclose(site.comoment.numpy(), expected, rtol=PRODUCT_RTOL,
                                   atol=PRODUCT_RTOL * np.abs(expected).max())
        covariance = expected / (37 * site.positions)
        np.testing.assert_allclose(site.channel_covariance.numpy(), covariance,
                                   rtol=PRODUCT_RTOL, atol=PRODUCT_RTOL * np.abs(covariance).max())
        # the diagonal is the per-element variance summed over the channel's positions
        per_channel = site.variance.movedim(site.channel_axis, 0).reshape(site.channels, -1)
        np.testing.assert_allclose(np.diag(expected) / 37, per_channel.sum(1).numpy(),
                                   rtol=PRODUCT_RTOL)


def test_batching_and_chunking_do_not_change_the_comoment(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    # a large common offset per position: the centring must not lose the small deviations
    x = torch.randn(23, 5, 4, 3, generator=gen) * 0.01 + 100 * torch.rand(5, 4, 3,
                                                                           generator=gen)
    acts = x.double().numpy()
    expected = reference_comoment(acts, 0)

    def stream(batch: int) -> torch.Tensor:
        site = velcro.stats.SiteStats(0, torch.zeros(0, dtype=torch.float64),
                                      torch.zeros(0, dtype=torch.float64), 0,
                                      torch.zeros((0, 0), dtype=torch.float64))
        for start in range(0, len(x), batch):
            site.update(x[start:start + batch])
        return site.comoment

    for batch in (1, 4, 23):
        np.testing.assert_allclose(stream(batch).numpy(), expected, rtol=PRODUCT_RTOL,
                                   atol=PRODUCT_RTOL * np.abs(expected).max())
    import velcro._moments as moments
    monkeypatch.setattr(moments, "_CHUNK_ELEMENTS", 60 * 3)  # 3 images per chunk
    monkeypatch.setattr(moments, "_PRODUCT_DTYPE", torch.float64)  # exact products
    np.testing.assert_allclose(stream(23).numpy(), expected, rtol=1e-9,
                               atol=1e-12 * np.abs(expected).max())


def test_channels_last_sites_after_linear_layers():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 6, 4, generator=gen)  # (tokens, features): channel axis -1
    comoment = update_comoment(0, torch.zeros(0), torch.zeros(0, 0), x[:5], -1)
    mean = x[:5].double().mean(0)
    comoment = update_comoment(5, mean, comoment, x[5:], -1)
    np.testing.assert_allclose(comoment.numpy(), reference_comoment(x.double().numpy(), -1),
                               rtol=PRODUCT_RTOL)


def test_merge_of_two_halves_equals_the_whole():
    model, shape = build("residual")
    data = images(shape, 30, batch=5)
    whole = velcro.calibrate(model, data, progress=False, covariance=True)
    first = velcro.calibrate(model, data[:2], progress=False, covariance=True)
    second = velcro.calibrate(model, data[2:], progress=False, covariance=True)
    merged = first.merge(second)
    assert merged.has_covariance and merged.count == 30
    for name in whole.names:
        torch.testing.assert_close(merged[name].comoment, whole[name].comoment,
                                   rtol=PRODUCT_RTOL,
                                   atol=PRODUCT_RTOL * float(whole[name].comoment.abs().max()))
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
    np.testing.assert_allclose(stats["act"].comoment.numpy(), expected, rtol=PRODUCT_RTOL,
                               atol=PRODUCT_RTOL * np.abs(expected).max())


def test_small_deviations_on_a_large_offset():
    # deviations of a few float32 ulps around 1e4: centring on a float32 mean would be off
    # by about the deviations themselves; the co-moment must not be
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, 8, 8, generator=gen) * 0.01 + 1e4 * (1 + torch.rand(5, 8, 8,
                                                                                generator=gen))
    expected = reference_comoment(x.double().numpy(), 0)
    comoment = update_comoment(0, torch.zeros(0), torch.zeros(0, 0), x)
    np.testing.assert_allclose(comoment.numpy(), expected, rtol=PRODUCT_RTOL,
                               atol=PRODUCT_RTOL * np.abs(expected).max())

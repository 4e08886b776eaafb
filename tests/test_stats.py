import numpy as np
import pytest
import torch
import torch.nn.functional as F
from zoo import build, images

import velcro
from velcro.errors import VelcroError


def chain_activations(model, x):
    """The Chain model's four site outputs, computed by hand from its layers."""
    a1 = F.relu(model.bn1(model.conv1(x)))
    a2 = F.relu6(model.bn2(model.conv2(a1)))
    a3 = F.silu(model.conv3(a2))
    a4 = F.relu(model.fc1(F.adaptive_avg_pool2d(a3, 1).flatten(1)))
    return [a1, a2, a3, a4]


@torch.no_grad()
def test_moments_match_numpy_over_stored_activations():
    model, shape = build("chain")
    data = images(shape, 37, batch=8)  # an uneven last batch
    stats = velcro.calibrate(model, data, progress=False)
    stored = [chain_activations(model, batch) for batch in data]
    assert stats.count == 37
    for index, name in enumerate(stats.names):
        acts = np.concatenate([b[index].numpy().astype(np.float64) for b in stored])
        assert stats[name].shape == acts.shape[1:]
        np.testing.assert_allclose(stats[name].mean.numpy(), acts.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(stats[name].variance.numpy(), acts.var(0), rtol=1e-7,
                                   atol=1e-12)


@torch.no_grad()
def test_each_call_of_a_reused_module_has_its_own_statistics():
    model, shape = build("residual")
    data = images(shape, 16)
    stats = velcro.calibrate(model, data, progress=False)
    x = torch.cat(data)
    first = F.relu(model.stem(x))
    second = F.relu(model.bn1(model.conv1(first)))
    third = F.relu(model.bn2(model.conv2(second)) + first)
    for name, act in zip(["relu:0", "relu:1", "relu:2"], [first, second, third], strict=True):
        expected = act.double().numpy()
        np.testing.assert_allclose(stats[name].mean.numpy(), expected.mean(0), rtol=1e-9,
                                   atol=1e-12)
        np.testing.assert_allclose(stats[name].variance.numpy(), expected.var(0), rtol=1e-7,
                                   atol=1e-12)
    assert not torch.allclose(stats["relu:1"].mean, stats["relu:2"].mean)


def test_merge_of_two_halves_equals_the_whole():
    model, shape = build("depthwise")
    data = images(shape, 40, batch=5)
    whole = velcro.calibrate(model, data, progress=False)
    first = velcro.calibrate(model, data[:3], progress=False)
    second = velcro.calibrate(model, data[3:], progress=False)
    merged = first.merge(second)
    assert merged.count == whole.count == 40
    assert first.count == 15  # merge returns a new object
    for name in whole.names:
        torch.testing.assert_close(merged[name].mean, whole[name].mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(merged[name].m2, whole[name].m2, rtol=1e-10, atol=1e-12)


def test_max_images_cuts_the_last_batch():
    model, shape = build("mlp")
    stats = velcro.calibrate(model, images(shape, 40), max_images=13, progress=False)
    assert stats.count == 13


def test_accepts_image_label_batches():
    model, shape = build("mlp")
    data = [(b, torch.zeros(len(b), dtype=torch.long)) for b in images(shape, 16)]
    plain = velcro.calibrate(model, images(shape, 16), progress=False)
    labelled = velcro.calibrate(model, data, progress=False)
    torch.testing.assert_close(plain["relu"].mean, labelled["relu"].mean)


def test_calibration_leaves_the_model_unchanged():
    model, shape = build("residual")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    velcro.calibrate(model, images(shape, 8), progress=False)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_save_load_round_trip(tmp_path):
    model, shape = build("concat")
    stats = velcro.calibrate(model, images(shape, 12), progress=False)
    path = tmp_path / "s.safetensors"
    stats.save(path)
    loaded = velcro.Stats.load(path)
    assert loaded.names == stats.names and loaded.count == 12
    assert loaded.structure == stats.structure and loaded.weights == stats.weights
    for name in stats.names:
        assert torch.equal(loaded[name].mean, stats[name].mean)
        assert torch.equal(loaded[name].m2, stats[name].m2)
    loaded.check_model(model)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary left


def test_stats_of_another_model_are_refused():
    model, shape = build("chain")
    stats = velcro.calibrate(model, images(shape, 8), progress=False)
    other_weights, _ = build("chain", seed=1)
    with pytest.raises(VelcroError, match="other weights"):
        stats.check_model(other_weights)
    with pytest.raises(VelcroError, match="another model"):
        stats.check_model(build("residual")[0])


def test_load_rejects_files_that_are_not_stats(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(VelcroError, match="junk.safetensors"):
        velcro.Stats.load(junk)
    with pytest.raises(VelcroError, match="does not exist"):
        velcro.Stats.load(tmp_path / "missing.safetensors")


def test_nan_activations_are_a_clear_error():
    model, shape = build("chain")
    bad = images(shape, 8)
    bad[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(VelcroError, match="NaN or inf"):
        velcro.calibrate(model, bad, progress=False)


def test_merge_refuses_other_models():
    a = velcro.calibrate(build("chain")[0], images((3, 12, 12), 4), progress=False)
    b = velcro.calibrate(build("chain", seed=3)[0], images((3, 12, 12), 4), progress=False)
    with pytest.raises(VelcroError, match="different weights"):
        a.merge(b)


@pytest.mark.parametrize("fused", [True, False])
def test_both_moment_kernels_match_numpy(monkeypatch, fused):
    from velcro import _moments
    if not fused:
        monkeypatch.setattr(_moments, "numba", None)
    elif not _moments.fused_available():
        pytest.fail("numba is a declared dependency and must be importable")
    gen = torch.Generator().manual_seed(3)
    batches = [torch.rand(n, 3, 5, 4, generator=gen) * 100 + 1000 for n in (1, 7, 4)]
    site = velcro.stats.SiteStats(0, torch.zeros(0, dtype=torch.float64),
                                  torch.zeros(0, dtype=torch.float64))
    for batch in batches:
        site.update(batch)
    data = torch.cat(batches).double().numpy()
    assert site.count == 12
    np.testing.assert_allclose(site.mean.numpy(), data.mean(0), rtol=1e-13)
    # large mean, small spread: a naive sum-of-squares formula would lose digits here
    np.testing.assert_allclose(site.variance.numpy(), data.var(0), rtol=1e-9)

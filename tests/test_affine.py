"""Affine constants: trimmed channels predicted from the kept ones (constant="affine")."""

import json
import math

import numpy as np
import pytest
import torch
from hostile import assert_refused, edit_json, edit_tensors
from test_stats import chain_activations
from zoo import build, images

import velcro
from velcro._affine import heldout_errors, residual_scores
from velcro.errors import VelcroError
from velcro.stats import SiteStats


def deviations(acts: np.ndarray, channel_axis: int) -> np.ndarray:
    """(images * positions, channels): deviations from the per-position means."""
    axis = channel_axis + 1 if channel_axis >= 0 else acts.ndim - 1
    centred = acts - acts.mean(axis=0, keepdims=True)
    moved = np.moveaxis(centred, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def lstsq_ridge(x: np.ndarray, dropped: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge regression of the dropped columns on the kept ones by numpy.linalg.lstsq on the
    augmented system [X_K; sqrt(ridge * n * var_k) I] beta^T = [X_R; 0]: the penalty is
    ridge * n * sum_k var_k beta_rk^2, var_k the kept channel's variance about its means."""
    n, channels = x.shape
    kept = np.setdiff1d(np.arange(channels), dropped)
    design, target = x[:, kept], x[:, dropped]
    penalty = np.diag(np.sqrt(ridge * n * (design ** 2).mean(axis=0)))
    augmented = np.vstack([design, penalty])
    padded = np.vstack([target, np.zeros((len(kept), len(dropped)))])
    solution = np.linalg.lstsq(augmented, padded, rcond=None)[0]
    beta = np.zeros((len(dropped), channels))
    beta[:, kept] = solution.T
    return beta


@pytest.fixture(scope="module")
def chain_case():
    model, shape = build("chain")
    data = images(shape, 48, batch=16)
    stats = velcro.calibrate(model, data, progress=False, covariance=True)
    with torch.no_grad():
        stored = [chain_activations(model, batch) for batch in data]
    acts = [np.concatenate([b[i].numpy().astype(np.float64) for b in stored])
            for i in range(len(stats.names))]
    return model, shape, stats, acts


@pytest.mark.parametrize("ridge", [0.0, 0.05, 1.0])
def test_coefficients_match_numpy_lstsq_on_stored_activations(chain_case, ridge):
    _, _, stats, acts = chain_case
    plan = velcro.plan(stats, 0.4, granularity="channel", constant="affine", ridge=ridge)
    assert plan.ridge == ridge and plan.constant_kind == "affine"
    assert sum(s.coefficients is not None for s in plan.sites.values()) >= 3
    for name, act in zip(stats.names, acts, strict=True):
        site, site_plan = stats[name], plan.sites[name]
        x = deviations(act, site.channel_axis)
        dropped = site_plan.units.numpy()
        expected = lstsq_ridge(x, dropped, ridge)
        got = (np.zeros_like(expected) if site_plan.coefficients is None  # beta = 0 exactly
               else site_plan.coefficients.double().numpy())
        assert site_plan.coefficients is not None or not np.any(np.abs(expected) > 1e-6)
        np.testing.assert_allclose(got, expected, rtol=1e-3,
                                   atol=1e-4 * max(1e-9, np.abs(expected).max()))
        assert np.all(got[:, dropped] == 0)
        # the offsets: mean of the dropped channels minus beta times the kept channels' means
        mean = np.moveaxis(act.mean(0), site.channel_axis, -1)
        offset = np.moveaxis(site_plan.constant.double().numpy(), site.channel_axis, -1)
        np.testing.assert_allclose(offset[..., dropped], mean[..., dropped] - mean @ got.T,
                                   rtol=1e-4, atol=1e-5 * np.abs(mean).max())


def test_apply_computes_the_prediction(chain_case):
    model, shape, stats, _ = chain_case
    plan = velcro.plan(stats, 0.5, granularity="channel", constant="affine", ridge=0.1)
    x = images(shape, 5, seed=9)[0]
    with torch.no_grad():
        site = plan.sites["act1"]
        raw = chain_activations(model, x)[0].double().numpy()  # (N, C, H, W)
        beta = site.coefficients.double().numpy()
        mean = stats["act1"].mean.numpy()
        predicted = mean[None, site.units] + np.einsum("rc,nchw->nrhw", beta,
                                                       raw - mean[None])
        gm = velcro.apply(model, velcro.plan(stats, {"act1": 0.5}, granularity="channel",
                                             constant="affine", ridge=0.1))
        after = {}
        gm.velcro_constant_0.register_forward_hook(lambda m, i, o: after.update(out=o))
        gm(x)
    out = after["out"].double().numpy()
    np.testing.assert_allclose(out[:, site.units], predicted, rtol=1e-4, atol=1e-5)
    kept = np.setdiff1d(np.arange(8), site.units.numpy())
    np.testing.assert_array_equal(out[:, kept], raw[:, kept].astype(np.float32))


def test_infinite_ridge_is_the_mean_map(chain_case):
    model, shape, stats, _ = chain_case
    affine = velcro.plan(stats, 0.5, granularity="channel", constant="affine", ridge=math.inf)
    mean = velcro.plan(stats, 0.5, granularity="channel", constant="map")
    x = images(shape, 4, seed=2)[0]
    for name in stats.names:
        assert affine.sites[name].coefficients is None
        torch.testing.assert_close(affine.sites[name].constant, mean.sites[name].constant)
    with torch.no_grad():
        torch.testing.assert_close(velcro.apply(model, affine)(x), velcro.apply(model, mean)(x))


def test_affine_beats_the_mean_on_the_calibration_images():
    """On correlated channels, the prediction's residual is below the mean map's."""
    model, shape = build("depthwise")
    data = images(shape, 64, batch=16)
    stats = velcro.calibrate(model, data, progress=False, covariance=True)
    for name in stats.names:
        site = stats[name]
        affine = velcro.plan(stats, {name: 0.5}, granularity="channel", constant="affine",
                             ridge=0.0).sites[name]
        if affine.coefficients is None:
            continue
        sigma = site.channel_covariance
        beta = affine.coefficients.double()
        units = affine.units
        residual = torch.diagonal(sigma[units][:, units] - 2 * beta @ sigma[:, units]
                                  + beta @ sigma @ beta.T)
        assert float(residual.sum()) <= float(torch.diagonal(sigma)[units].sum()) + 1e-12


def greedy_reference(sigma: np.ndarray, ridge: float) -> list[int]:
    """Forward selection by brute force: keep, each step, the channel whose ridge residual
    variance given the kept ones is largest; return the trimming order (kept last first)."""
    channels = sigma.shape[0]
    kept: list[int] = []
    while len(kept) < channels:
        best, best_value = None, -np.inf
        for j in range(channels):
            if j in kept:
                continue
            if kept:
                k = np.array(kept)
                system = sigma[np.ix_(k, k)] + np.diag(ridge * np.diag(sigma)[k])
                beta = np.linalg.solve(system, sigma[k, j])
                value = sigma[j, j] - sigma[j, k] @ beta
            else:
                value = sigma[j, j]
            if value > best_value + 1e-12:
                best, best_value = j, value
        kept.append(best)
    return kept[::-1]


def test_residual_ranking_is_the_greedy_selection():
    gen = np.random.default_rng(0)
    factors = gen.normal(size=(500, 3))
    loadings = gen.normal(size=(3, 7))
    x = factors @ loadings + 0.3 * gen.normal(size=(500, 7))
    x[:, 5] = 2.0 * x[:, 1] + 0.01 * gen.normal(size=500)  # a large but predictable copy
    sigma = np.cov(x.T, bias=True)
    orders = {}
    for ridge in (0.0, 0.2):
        scores = residual_scores(torch.from_numpy(sigma), ridge)
        orders[ridge] = torch.sort(scores, stable=True).indices.tolist()
        assert orders[ridge] == greedy_reference(sigma, ridge)
    assert orders[0.0][0] in (1, 5)  # one of the pair goes first, though both vary a lot
    assert np.argsort(np.diag(sigma))[0] not in (1, 5)
    variance_order = torch.sort(residual_scores(torch.from_numpy(sigma), math.inf)).indices
    assert variance_order.tolist() == np.argsort(np.diag(sigma), kind="stable").tolist()


def test_plans_save_and_load_with_their_coefficients(chain_case, tmp_path):
    model, shape, stats, _ = chain_case
    plan = velcro.plan(stats, 0.4, granularity="channel", constant="affine", ridge=0.2,
                       score="residual")
    plan.save(tmp_path / "p.json")
    document = json.loads((tmp_path / "p.json").read_text())
    assert document["format"] == "velcro.plan/2" and document["ridge"] == 0.2
    loaded = velcro.Plan.load(tmp_path / "p.json")
    assert loaded.ridge == 0.2 and loaded.score == "residual"
    for name in stats.names:
        torch.testing.assert_close(loaded.sites[name].coefficients,
                                   plan.sites[name].coefficients, rtol=0, atol=0)
    x = images(shape, 4, seed=5)[0]
    with torch.no_grad():
        torch.testing.assert_close(velcro.apply(model, loaded)(x), velcro.apply(model, plan)(x))
    velcro.plan(stats, 0.4, granularity="channel").save(tmp_path / "m.json")
    assert "ridge" not in json.loads((tmp_path / "m.json").read_text())
    assert all(s.coefficients is None for s in velcro.Plan.load(tmp_path / "m.json").sites.values())
    inf = velcro.plan(stats, 0.4, granularity="channel", constant="affine", ridge=math.inf)
    inf.save(tmp_path / "i.json")
    assert velcro.Plan.load(tmp_path / "i.json").ridge == math.inf


def test_corrupt_coefficients_and_fields_are_refused_naming_them(chain_case, tmp_path):
    _, _, stats, _ = chain_case
    path = tmp_path / "p.json"
    name = stats.names[0]
    key = f"coefficients/{name}"

    def own_column(tensors):
        units = velcro.Plan.load(path).sites[name].units
        tensors[key][0, units[0]] = 1.0

    edits = {
        "wrong shape": (lambda t: t.__setitem__(key, t[key][:, :-1].contiguous()), key),
        "NaN": (lambda t: t[key].__setitem__((0, 0), float("nan")), key),
        "a chosen channel predicts itself": (own_column, key),
        "integers": (lambda t: t.__setitem__(key, t[key].long()), key),
    }
    for change, field in edits.values():
        velcro.plan(stats, 0.4, granularity="channel", constant="affine").save(path)
        edit_tensors(path, change)
        assert_refused(lambda: velcro.Plan.load(path), path, field)
    for change, field in ((lambda d: d.__setitem__("ridge", -1), "ridge"),
                          (lambda d: d.__setitem__("ridge", "1e999"), "ridge"),
                          (lambda d: d.__setitem__("constant", "map"), "constant")):
        velcro.plan(stats, 0.4, granularity="channel", constant="affine").save(path)
        edit_json(path, change)
        assert_refused(lambda: velcro.Plan.load(path), path, field)
    # coefficients in a plan that says mean maps: refused, never silently ignored
    velcro.plan(stats, 0.4, granularity="channel").save(path)
    extra = velcro.plan(stats, 0.4, granularity="channel", constant="affine")
    edit_tensors(path, lambda t: t.__setitem__(key, extra.sites[name].coefficients))
    assert_refused(lambda: velcro.Plan.load(path), path, "constant")


def test_statistics_files_check_their_comoments(chain_case, tmp_path):
    _, _, stats, _ = chain_case
    path = tmp_path / "s.safetensors"
    name = stats.names[0]
    key = f"comoment/{name}"
    stats.save(path)
    loaded = velcro.Stats.load(path)
    torch.testing.assert_close(loaded[name].comoment, stats[name].comoment, rtol=0, atol=0)
    for change in (lambda t: t[key].__setitem__((0, 1), t[key][0, 1] + 1.0),  # asymmetric
                   lambda t: t[key].__setitem__((0, 0), -1.0),
                   lambda t: t.__setitem__(key, t[key][:-1].contiguous()),
                   lambda t: t[key].__setitem__((1, 1), float("inf"))):
        stats.save(path)
        rewrite_safetensors(path, change)
        assert_refused(lambda: velcro.Stats.load(path), path, key)


def rewrite_safetensors(path, change):
    """Edit the tensors of a safetensors file, keeping its metadata."""
    from safetensors.torch import load, save

    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + size]).get("__metadata__")
    tensors = load(data)
    change(tensors)
    path.write_bytes(save(tensors, metadata=metadata))


def test_affine_options_are_checked(chain_case):
    model, shape, stats, _ = chain_case
    plain = velcro.calibrate(model, images(shape, 8), progress=False)
    with pytest.raises(VelcroError, match="covariance=True"):
        velcro.plan(plain, 0.3, granularity="channel", constant="affine")
    with pytest.raises(VelcroError, match="covariance=True"):
        velcro.plan(plain, 0.3, granularity="channel", score="residual")
    with pytest.raises(VelcroError, match="channel plans"):
        velcro.plan(stats, 0.3, constant="affine")
    for ridge in (-1.0, float("nan"), "0.1"):
        with pytest.raises(VelcroError, match="ridge"):
            velcro.plan(stats, 0.3, granularity="channel", constant="affine", ridge=ridge)


def site_stats(x: np.ndarray) -> SiteStats:
    """Statistics of activations ``x`` (images, channels, positions) with covariance."""
    site = SiteStats(0, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64),
                     0, torch.zeros((0, 0), dtype=torch.float64))
    site.update(torch.from_numpy(x))
    return site


def test_heldout_errors_match_numpy_predictions():
    gen = np.random.default_rng(3)
    mix = gen.normal(size=(5, 5))
    calibration = np.einsum("cd,ndp->ncp", mix, gen.normal(size=(30, 5, 6))) + 1.0
    heldout = np.einsum("cd,ndp->ncp", mix, gen.normal(size=(20, 5, 6))) + 1.3
    cal, held = site_stats(calibration), site_stats(heldout)
    dropped = torch.tensor([1, 3])
    ridges = [math.inf, 0.5, 0.0]
    errors = heldout_errors(cal, held, dropped, ridges)
    mean = calibration.mean(axis=0)  # (channels, positions)
    for ridge, error in zip(ridges, errors, strict=True):
        beta = np.zeros((2, 5)) if math.isinf(ridge) else lstsq_ridge(
            deviations(calibration, 0), dropped.numpy(), ridge)
        predicted = mean[None, [1, 3]] + np.einsum("rc,ncp->nrp", beta, heldout - mean[None])
        expected = ((heldout[:, [1, 3]] - predicted) ** 2).sum(axis=1).mean()
        assert error == pytest.approx(expected, rel=1e-4)
    assert errors[2] < errors[0]  # correlated channels: the prediction pays on new images


def test_per_site_ridges_fall_back_to_the_mean_where_predictions_do_not_generalise():
    """Four calibration images whose channels happen to be correlated, held-out images where
    they are not: the held-out error chooses the mean (ridge inf) there, and a finite ridge
    where the correlation is real."""
    from velcro.search._candidates import SiteRanking

    gen = np.random.default_rng(0)
    common = gen.normal(size=(4, 1, 9))
    spurious = common + 0.05 * gen.normal(size=(4, 4, 9))
    independent = gen.normal(size=(40, 4, 9))
    real = gen.normal(size=(40, 1, 9)) + 0.05 * gen.normal(size=(40, 4, 9))
    for calibration, heldout, mean_wins in ((spurious, independent, True),
                                            (real[:20], real[20:], False)):
        ranking = SiteRanking("s", torch.arange(4), torch.zeros(4, 9), (4, 9), 0, 4, 36,
                              site_stats(calibration), 0.1, (1.0, 0.1, 0.0),
                              site_stats(heldout))
        chosen = ranking.chosen_ridge(torch.tensor([0, 1]))
        assert math.isinf(chosen) == mean_wins
        assert (ranking.affine(2) is None) == mean_wins


def test_the_skipping_kernels_refuse_affine_plans(chain_case):
    model, _, stats, _ = chain_case
    plan = velcro.plan(stats, 0.5, granularity="channel", constant="affine")
    with pytest.raises(VelcroError, match="affine plan"):
        velcro.kernels.conv_sites(model, plan)
    assert velcro.kernels.conv_sites(model, velcro.plan(stats, 0.5, granularity="channel"))

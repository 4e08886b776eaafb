"""Fidelity criteria, the paired confidence guard and the nested check of the search."""

import warnings

import numpy as np
import pytest
import torch
from scipy.stats import beta
from tinytask import one_thread, trained_task

import velcro
from velcro.errors import VelcroError, VelcroWarning
from velcro.search import search
from velcro.search._check import backoff_path, fixed_sequence, split_check
from velcro.search._criteria import (
    Guard,
    Tally,
    clopper_pearson_upper,
    compare_outputs,
    newcombe_paired_upper,
)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    with one_thread():
        yield


def hand_built(changed: int, images: int = 500, classes: int = 5):
    """Logits of an 'original' and a 'compressed' model: the compressed one moves the top-1
    of the first ``changed`` images to the next class, and nothing else."""
    generator = torch.Generator().manual_seed(0)
    top = torch.randint(0, classes, (images,), generator=generator)
    original = torch.randn(images, classes, generator=generator)
    original[torch.arange(images), top] += 5.0
    candidate = original.clone()
    moved = (top[:changed] + 1) % classes
    candidate[torch.arange(changed), moved] += 10.0
    return original, candidate, top


def numpy_fidelity(original: np.ndarray, candidate: np.ndarray):
    """Agreement and per-image KL(softmax(original) || softmax(candidate)), in NumPy."""
    def log_softmax(x):
        shifted = x - x.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

    log_p, log_q = log_softmax(original), log_softmax(candidate)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=1)
    return (original.argmax(1) == candidate.argmax(1)).mean(), kl


def test_fidelity_criteria_equal_a_numpy_computation():
    generator = torch.Generator().manual_seed(3)
    original = torch.randn(300, 7, generator=generator) * 3
    candidate = original + torch.randn(300, 7, generator=generator)
    labels = torch.randint(0, 7, (300,), generator=generator)
    tally = compare_outputs(original, candidate, labels)
    agreement, kl = numpy_fidelity(original.double().numpy(), candidate.double().numpy())
    assert 1 - tally.changed / tally.images == pytest.approx(agreement)
    assert tally.kl_sum == pytest.approx(kl.sum(), rel=1e-9)
    assert tally.kl_square_sum == pytest.approx((kl ** 2).sum(), rel=1e-9)
    right_before = original.argmax(1).numpy() == labels.numpy()
    right_after = candidate.argmax(1).numpy() == labels.numpy()
    assert (tally.baseline_correct, tally.correct) == (right_before.sum(), right_after.sum())
    assert tally.lost == (right_before & ~right_after).sum()
    assert tally.gained == (~right_before & right_after).sum()
    assert Guard("kl", 0.5).loss(tally) == pytest.approx(kl.mean())
    assert Guard("agreement", 0.5).loss(tally) == pytest.approx(1 - agreement)
    # restricted to task classes: the argmax and softmax over those columns only
    classes = torch.tensor([1, 4, 6])
    restricted = compare_outputs(original, candidate, labels, classes)
    agreement, kl = numpy_fidelity(original[:, classes].double().numpy(),
                                   candidate[:, classes].double().numpy())
    assert restricted.kl_sum == pytest.approx(kl.sum(), rel=1e-9)
    assert 1 - restricted.changed / 300 == pytest.approx(agreement)


def test_guard_rejects_a_point_estimate_that_passes_when_its_bound_does_not():
    original, candidate, _ = hand_built(changed=6)
    tally = compare_outputs(original, candidate)
    assert tally.changed == 6
    # 6 of 500 predictions changed: 1.2% <= 2%, but the exact 90% upper bound is 2.1%
    assert Guard("agreement", 0.02, None).passes(tally)
    guarded = Guard("agreement", 0.02, 0.9)
    assert guarded.bound(tally) == pytest.approx(beta.ppf(0.9, 7, 494))
    assert not guarded.passes(tally)
    # one change fewer, and the bound is within the tolerance
    assert guarded.passes(compare_outputs(*hand_built(changed=4)[:2]))

    # accuracy, paired: 8 images lost and 4 gained of 300 -> point loss 1.33% <= 2%
    labels = torch.full((300,), 0)
    before = torch.zeros(300, 3)
    before[:240, 0] = 1.0  # 240 right
    before[240:, 1] = 1.0
    after = before.clone()
    after[:8] = torch.tensor([0.0, 1.0, 0.0])  # lost
    after[240:244] = torch.tensor([1.0, 0.0, 0.0])  # gained
    tally = compare_outputs(before, after, labels)
    assert (tally.lost, tally.gained, tally.baseline_correct) == (8, 4, 240)
    assert Guard("accuracy", 0.02, None).passes(tally)
    assert not Guard("accuracy", 0.02, 0.9).passes(tally)
    assert Guard("accuracy", 0.03, 0.9).passes(tally)


def test_exact_bound_matches_the_beta_quantile():
    for successes, total, confidence in [(0, 100, 0.95), (1, 10, 0.9), (37, 450, 0.8),
                                         (449, 450, 0.9), (3, 5000, 0.99)]:
        assert clopper_pearson_upper(successes, total, confidence) == pytest.approx(
            beta.ppf(confidence, successes + 1, total - successes), rel=1e-9)


@pytest.mark.parametrize("probabilities, images", [
    ((0.70, 0.03, 0.03, 0.24), 400),  # as many lost as gained
    ((0.70, 0.05, 0.01, 0.24), 400),  # a real loss
    ((0.55, 0.10, 0.08, 0.27), 150),
])
def test_paired_accuracy_bound_covers_the_true_loss_at_about_its_confidence(probabilities,
                                                                           images):
    """Monte Carlo: the one-sided 90% bound lies above the true loss in about 90% of draws."""
    rng = np.random.default_rng(7)
    true_loss = probabilities[1] - probabilities[2]
    tables = rng.multinomial(images, probabilities, size=1500)
    covered = np.mean([newcombe_paired_upper(*map(int, t), 0.9) >= true_loss for t in tables])
    assert 0.87 <= covered <= 0.95


def test_backoff_picks_the_largest_passing_point_of_a_recorded_trajectory():
    # a recorded trajectory: (counts, objective, feasible on the search images)
    trajectory = [((0, 0), 0.0, True), ((1, 0), 0.05, True), ((2, 0), 0.11, True),
                  ((0, 5), 0.15, True),  # a profile point outside the searched plan
                  ((2, 1), 0.18, False), ((2, 2), 0.24, True), ((3, 2), 0.29, True),
                  ((4, 2), 0.35, False), ((4, 3), 0.41, True), ((5, 3), 0.47, True),
                  ((6, 3), 0.52, True), ((6, 4), 0.60, False)]
    feasible = [(c, o) for c, o, ok in trajectory if ok and o > 0]
    searched = (6, 3)
    path = backoff_path(feasible, searched, 4)
    # targets 0.13, 0.26, 0.39, 0.52: the largest feasible objective at or below each, among
    # the candidates inside the searched plan ((0, 5) is not: its second site exceeds 3)
    assert path == [(2, 0), (2, 2), (3, 2), (6, 3)]
    objective = {c: o for c, o, _ in trajectory}
    # the check fails above 0.3: the searched plan (0.52) backs off to (3, 2) at 0.29
    chosen, tested = fixed_sequence(path, lambda counts: objective[counts] <= 0.3)
    assert path[chosen] == (3, 2)
    assert tested == [True, True, True, False]
    # everything passes: the searched plan is kept; the first fails: nothing is kept
    assert fixed_sequence(path, lambda counts: True)[0] == len(path) - 1
    assert fixed_sequence(path, lambda counts: False) == (None, [False])
    # a point that passes after a failure is not taken (fixed sequence: stop at the first)
    assert fixed_sequence(path, lambda counts: counts != (2, 2))[0] == 0
    assert backoff_path([], searched, 4) == []


def test_check_split_is_stratified_disjoint_and_complete():
    images = torch.arange(40.0).view(40, 1, 1, 1)
    labels = torch.tensor([0] * 30 + [1] * 10)
    batches = [(images[i : i + 8], labels[i : i + 8]) for i in range(0, 40, 8)]
    search_part, check_part, indices = split_check(batches, 0.25, seed=1)
    seen = torch.cat([x for x, _ in search_part + check_part]).flatten().tolist()
    assert sorted(seen) == list(range(40))
    check_ids = torch.cat([x for x, _ in check_part]).flatten().long().tolist()
    assert check_ids == indices and len(indices) == 10
    assert sum(labels[i] == 1 for i in indices) in (2, 3)  # a quarter of each class
    assert all(x.shape[0] <= 8 for x, _ in search_part)


@pytest.fixture(scope="module")
def task():
    task = trained_task()
    task["stats"] = velcro.calibrate(task["model"], task["calibration"], progress=False)
    return task


def test_guarded_search_keeps_only_candidates_whose_bound_passes(task):
    model, stats, data = task["model"], task["stats"], task["search"]
    tolerance = 0.04
    guarded = search(model, stats, data, criterion="agreement", tolerance=tolerance,
                     confidence=0.9, check_fraction=0.0, progress=False)
    rows = [r for r in guarded.trajectory if r["phase"] != "baseline"]
    for row in rows:
        assert row["feasible"] == (row["bound"] <= tolerance + 1e-12)
        assert row["bound"] >= row["criterion_loss"]
    # some candidate passed on its point estimate and was refused on its bound
    assert any(r["criterion_loss"] <= tolerance < r["bound"] for r in rows)
    # the plan's agreement, recomputed through the reference semantics
    images = torch.cat([x for x, _ in data])
    with torch.no_grad():
        before = model(images).argmax(1)
        after = velcro.apply(model, guarded.plan)(images).argmax(1)
    changed = int((before != after).sum())
    assert guarded.search_agreement == pytest.approx(1 - changed / len(images))
    assert clopper_pearson_upper(changed, len(images), 0.9) <= tolerance
    unguarded = search(model, stats, data, criterion="agreement", tolerance=tolerance,
                       confidence=None, check_fraction=0.0, progress=False)
    assert unguarded.saving_ratio >= guarded.saving_ratio


def test_nested_check_chooses_the_last_passing_point_on_the_held_back_images(task):
    model, stats, data = task["model"], task["stats"], task["search"]
    result = search(model, stats, data, granularity="channel", criterion="agreement",
                    tolerance=0.03, confidence=0.9, check_fraction=0.3, progress=False)
    check = result.check
    images = torch.cat([x for x, _ in data])
    held = images[check["indices"]]
    assert result.search_images + check["images"] == len(images) == 300
    assert check["images"] == len(held) == 90
    guard = Guard("agreement", 0.03, 0.9)
    with torch.no_grad():
        reference = model(held)
    passed = []
    for point in result.path[: len(check["path"])]:
        with torch.no_grad():
            outputs = velcro.apply(model, point["plan"])(held)
        tally = compare_outputs(reference, outputs)
        passed.append(guard.passes(tally))
    assert passed == [row["passed"] for row in check["path"]]
    # here the searched plan fails on the check images and the result backs off to the last
    # point that passed before the first failure
    assert passed[0] and not passed[-1] and all(passed[:-1])
    assert check["backed_off"] and result.path[len(passed) - 2]["chosen"]
    assert result.saving_ratio == pytest.approx(result.path[len(passed) - 2]["plan"].saving_ratio)
    assert 0 < result.saving_ratio < result.settings["searched_saving_ratio"]
    # the search never saw the check images: its figures are on the other 210
    assert result.trajectory[0]["agreement"] == 1.0


def test_fidelity_criteria_need_no_labels(task):
    model, stats = task["model"], task["stats"]
    unlabelled = [x for x, _ in task["search"]]
    result = search(model, stats, unlabelled, criterion="kl", tolerance=0.05, confidence=0.9,
                    progress=False)
    assert result.search_accuracy is None and result.baseline_accuracy is None
    assert result.search_kl <= 0.05
    with pytest.raises(VelcroError, match="criterion 'accuracy' needs labelled"):
        search(model, stats, unlabelled, criterion="accuracy", tolerance=0.02,
               progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"criterion": "f1"}, "criterion 'f1' is unknown"),
    ({"confidence": 1.0}, "confidence 1.0 is out of range"),
    ({"confidence": 0.2}, "confidence 0.2 is out of range"),
    ({"tolerance": 0.0}, "tolerance 0 with a confidence bound accepts no plan"),
    ({"tolerance": 1.5}, "tolerance 1.5 is out of range for criterion 'accuracy'"),
    ({"check_fraction": 1.0}, "check_fraction 1.0 is out of range"),
    ({"check_fraction": -0.1}, "check_fraction -0.1 is out of range"),
])
def test_bad_guard_settings_are_one_line_errors(task, kwargs, message):
    with pytest.raises(VelcroError, match=message):
        search(task["model"], task["stats"], task["search"], progress=False, **kwargs)


def test_tally_of_no_images_never_passes():
    assert not Guard("agreement", 0.5, 0.9).passes(Tally(images=0))


def test_accuracy_criterion_on_a_single_class_warns(task):
    images = torch.cat([x for x, _ in task["search"]])[:60]
    one_class = [(images, torch.zeros(60, dtype=torch.long))]
    with pytest.warns(UserWarning, match="single class"):
        search(task["model"], task["stats"], one_class, criterion="accuracy", tolerance=0.05,
               confidence=None, check_fraction=0.0, budget=2, progress=False)


def test_guard_resolution_says_when_two_swapped_predictions_already_fail():
    """50 images at 2 points and 80%: a plan that loses one image and gains another (no net
    loss) fails, so only unchanged predictions pass; 150 images resolve it. Checked against
    the guard's own verdict on that tally and on the next larger change."""
    guard = Guard("accuracy", 0.02, 0.8)

    def swap(images, lost=1, gained=1):
        return Tally(images, changed=lost + gained, baseline_correct=images - gained,
                     correct=images - lost, lost=lost, gained=gained)

    assert not guard.resolves(50) and not guard.passes(swap(50))
    assert guard.resolves(150) and guard.passes(swap(150))
    verdicts = [guard.resolves(n) for n in range(2, 400)]
    first = verdicts.index(True)
    assert all(verdicts[first:]), "resolution is monotone in the image count"
    assert Guard("accuracy", 0.02, None).resolves(2)  # point estimates: no net loss passes
    assert not Guard("agreement", 0.02, None).resolves(40)  # 1 of 40 changed is 2.5%
    assert Guard("agreement", 0.02, None).resolves(50)
    assert Guard("kl", 0.01, 0.9).resolves(2)


def test_search_warns_when_its_check_images_cannot_resolve_the_tolerance(task):
    batches = task["search"]
    with pytest.warns(VelcroWarning, match="check images cannot resolve"):
        search(task["model"], task["stats"], batches, criterion="accuracy", tolerance=0.02,
               confidence=0.8, check_fraction=0.1, budget=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", VelcroWarning)
        search(task["model"], task["stats"], batches, criterion="accuracy", tolerance=0.02,
               confidence=None, check_fraction=0.1, budget=2, progress=False)

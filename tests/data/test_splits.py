import json
from collections import Counter

import pytest

from velcro.data import Split, split
from velcro.errors import VelcroError


def items_of(sizes):
    """(path, label) pairs: ``sizes[label]`` images per label."""
    return [(f"{label}/{i:03d}.png", label) for label, n in enumerate(sizes) for i in range(n)]


def test_sets_are_disjoint_cover_everything_and_have_the_asked_sizes():
    items = items_of([50, 50, 50, 50, 50])
    parts = split(items, {"calibration": 0.02, "search": 0.1, "validation": None}, seed=3,
                  labels=[label for _, label in items])
    assert list(parts) == ["calibration", "search", "validation"]
    assert [len(p) for p in parts.values()] == [5, 25, 220]  # round(0.02*250), round(0.1*250)
    flat = [x for p in parts.values() for x in p]
    assert sorted(flat) == sorted(items) and len(set(flat)) == len(items)


def test_default_is_two_percent_calibration_and_the_rest_validation():
    items = list(range(1000))
    parts = split(items)
    assert list(parts) == ["calibration", "validation"]
    assert len(parts["calibration"]) == 20 and len(parts["validation"]) == 980
    assert not set(parts["calibration"]) & set(parts["validation"])


def test_same_seed_same_split_other_seed_other_split():
    items = items_of([30, 30, 30])
    labels = [label for _, label in items]
    fractions = {"calibration": 0.1, "validation": None}
    first = split(items, fractions, seed=7, labels=labels)
    assert split(list(items), dict(fractions), seed=7, labels=list(labels)) == first
    assert split(items, fractions, seed=8, labels=labels)["calibration"] != first["calibration"]


@pytest.mark.parametrize("seed", range(5))
def test_stratified_sets_hold_each_label_in_its_share(seed):
    sizes = [50, 20, 130, 7]
    items = items_of(sizes)
    total = len(items)
    parts = split(items, {"calibration": 0.1, "search": 0.3, "validation": None}, seed=seed,
                  labels=[label for _, label in items])
    for name, fraction in (("calibration", 0.1), ("search", 0.3)):
        got = Counter(label for _, label in parts[name])
        share = len(parts[name]) / total
        assert len(parts[name]) == round(fraction * total)
        for label, n in enumerate(sizes):
            # systematic sampling: within one image of the exact share, per set boundary
            assert abs(got[label] - share * n) <= 2, (name, label, got[label], share * n)


def test_a_nonzero_fraction_gets_at_least_one_image_and_zero_gets_none():
    parts = split(list(range(10)), {"calibration": 0.01, "search": 0.0, "validation": None})
    assert len(parts["calibration"]) == 1 and parts["search"] == []
    assert len(parts["validation"]) == 9


@pytest.mark.parametrize("fractions, match", [
    ({"calibration": 1.5, "validation": None}, "out of range"),
    ({"calibration": 0.6, "search": 0.5, "validation": None}, "leave nothing"),
    ({"calibration": 0.2, "validation": 0.5}, "sum to 0.7"),
    ({"calibration": None, "validation": None}, "only one set"),
    ({"calibration": 0.5}, "at least two"),
])
def test_bad_fractions_are_clear_errors(fractions, match):
    with pytest.raises(VelcroError, match=match):
        split(list(range(100)), fractions)


def test_too_few_images_is_a_clear_error():
    with pytest.raises(VelcroError, match="a set would be empty"):
        split([1], {"calibration": 0.02, "validation": None})
    with pytest.raises(VelcroError, match="2 labels for 3 items"):
        split([1, 2, 3], labels=[0, 1])


def test_split_saves_and_loads_with_its_file_lists(tmp_path):
    items = items_of([10, 10])
    parts = split(items, {"calibration": 0.2, "validation": None}, seed=1,
                  labels=[label for _, label in items])
    saved = Split(parts, "/data/cats", 1, {"calibration": 0.2, "validation": None},
                  {"task": "custom", "classes": [0, 1]})
    path = tmp_path / "s.split.json"
    saved.save(path)
    document = json.loads(path.read_text())  # plain JSON a person can read
    assert document["counts"] == {"calibration": 4, "validation": 16}
    assert document["sets"]["calibration"] == [list(x) for x in parts["calibration"]]
    loaded = Split.load(path)
    assert loaded.sets == parts and loaded.seed == 1 and loaded.root == "/data/cats"
    assert loaded.info["classes"] == [0, 1] and loaded.fractions["validation"] is None
    with pytest.raises(VelcroError, match="no set 'search'"):
        loaded["search"]


def test_loading_something_else_is_a_clear_error(tmp_path):
    with pytest.raises(VelcroError, match="does not exist"):
        Split.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other"}')
    with pytest.raises(VelcroError, match="not a velcro split"):
        Split.load(bad)


@pytest.mark.parametrize("seed", range(20))
def test_two_percent_of_the_imagenet_cats_is_one_image_per_class(seed):
    items = [(f"{label}/{i}.JPEG", label) for label in range(281, 286) for i in range(50)]
    parts = split(items, seed=seed, labels=[label for _, label in items])
    assert sorted(label for _, label in parts["calibration"]) == [281, 282, 283, 284, 285]

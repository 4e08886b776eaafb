"""Corrupted or edited split files: refused, naming the file and the field.

A split decides which images calibrate and which validate; overlapping sets would validate
on calibration images and report an accuracy nobody should trust.
"""

import json

import pytest
from hostile import assert_refused, edit_json, nested

from velcro.data import Split


@pytest.fixture
def saved(tmp_path):
    sets = {"calibration": [("cats/001.png", 0), ("dogs/004.png", 1)],
            "search": [("cats/002.png", 0)],
            "validation": [("cats/003.png", 0), ("dogs/005.png", 1), ("dogs/006.png", 1)]}
    path = tmp_path / "cats.split.json"
    Split(sets, "/data/pets", 3, {"calibration": 0.3, "search": 0.15, "validation": None},
          {"task": "cats"}).save(path)
    return path


def in_set(name, index, value):
    return lambda d: d["sets"][name].__setitem__(index, value)


EDITS = {
    "an image in two sets": (in_set("validation", 1, ["dogs/004.png", 1]),
                             "sets.validation[1]", "'calibration'"),
    "an image twice in one set": (in_set("validation", 2, ["cats/003.png", 0]),
                                  "sets.validation[2]"),
    "an absolute path": (in_set("search", 0, ["/etc/passwd", 0]), "sets.search[0]"),
    "a path leaving the root": (in_set("search", 0, ["../../secret.png", 0]), "sets.search[0]"),
    "a negative label": (in_set("calibration", 0, ["cats/001.png", -1]), "sets.calibration[0]"),
    "a label that is true": (in_set("calibration", 0, ["cats/001.png", True]),
                             "sets.calibration[0]"),
    "a label that is a string": (in_set("calibration", 0, ["cats/001.png", "0"]),
                                 "sets.calibration[0]"),
    "an entry that is not a pair": (in_set("validation", 0, ["cats/003.png"]),
                                    "sets.validation[0]"),
    "a set that is not a list": (lambda d: d["sets"].__setitem__("search", "all"),
                                 "sets.search"),
    "counts that disagree": (lambda d: d["counts"].__setitem__("validation", 30),
                             "counts.validation"),
    "a fraction above 1": (lambda d: d["fractions"].__setitem__("search", 4), "fractions.search"),
    "a negative seed": (lambda d: d.__setitem__("seed", -1), "seed"),
    "sets missing": (lambda d: d.pop("sets"), "sets"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_an_edited_split_is_refused_naming_the_field(saved, case):
    change, *fields = EDITS[case]
    edit_json(saved, change)
    assert_refused(lambda: Split.load(saved), saved, *fields)


@pytest.mark.parametrize("text, words", [
    (nested(100_000), "nested"),
    ('{"format": "velcro.split/1", "sets": {}, "seed": NaN}', "valid JSON"),
    ('{"format": "velcro.split/1", "sets": {}, "seed": ' + "1" * 100 + "}", "valid JSON"),
    ('{"format": "velcro.split/1", "sets": {"a": []}, "sets": {"b": []}}', "twice"),
])
def test_malformed_json_is_refused_not_a_traceback(tmp_path, text, words):
    path = tmp_path / "bad.split.json"
    path.write_text(text)
    assert_refused(lambda: Split.load(path), path, words)


def test_a_valid_split_loads_exactly(saved):
    loaded = Split.load(saved)
    assert loaded.sets["calibration"] == [("cats/001.png", 0), ("dogs/004.png", 1)]
    assert loaded.counts() == {"calibration": 2, "search": 1, "validation": 3}
    assert loaded.seed == 3 and loaded.fractions["validation"] is None
    assert json.loads(saved.read_text())["root"] == loaded.root == "/data/pets"

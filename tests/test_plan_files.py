"""Corrupted, edited, mixed and interrupted plan files: refused, never loaded as a plan.

Each case checks a VelcroError (one line naming the file and the field) and that the
folder is left exactly as it was.
"""

import os
import shutil

import pytest
import torch
from hostile import assert_refused, edit_json, edit_tensors, nested, snapshot

import velcro
from velcro.stats import SiteStats, Stats


def small_stats(seed=0):
    gen = torch.Generator().manual_seed(seed)
    sites = {}
    for name, shape in {"a": (4, 3, 3), "b": (6, 2, 2), "c": (10,)}.items():
        mean = torch.randn(shape, generator=gen, dtype=torch.float64)
        m2 = torch.rand(shape, generator=gen, dtype=torch.float64) * 5
        sites[name] = SiteStats(5, mean, m2, 0)
    return Stats(sites, structure="s", weights="w")


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "cats.plan.json"
    velcro.plan(small_stats(), 0.5, granularity="channel").save(path)
    return path


def first_site(key, value):
    return lambda d: d["sites"][0].__setitem__(key, value)


JSON_EDITS = {
    "unknown granularity": (lambda d: d.__setitem__("granularity", "block"), "granularity"),
    "unknown score": (lambda d: d.__setitem__("score", 3), "score"),
    "unknown constant kind": (lambda d: d.__setitem__("constant", "mean"), "constant"),
    "threshold a string": (first_site("threshold", "0.5"), "sites[0].threshold"),
    "threshold above 1": (first_site("threshold", 1.5), "sites[0].threshold"),
    "shape disagrees with the tensors": (first_site("shape", [4, 3]), "tensors.constant/a"),
    "chosen count edited": (first_site("chosen", 3), "sites[0].chosen"),
    "channels edited": (first_site("channels", [0, 0]), "sites[0].channels"),
    "channel axis out of range": (first_site("channel_axis", 7), "sites[0].channel_axis"),
    "sites missing": (lambda d: d.pop("sites"), "sites"),
    "a site listed twice": (lambda d: d["sites"].__setitem__(1, dict(d["sites"][0])), "sites"),
    "C edited (90% beside T = 0.5)": (lambda d: d.__setitem__("saving_ratio", 0.9),
                                      "saving_ratio"),
    "tensors outside the folder": (lambda d: d.__setitem__("tensors", "../x.safetensors"),
                                   "tensors"),
    "structure not a string": (lambda d: d.__setitem__("structure", 5), "structure"),
    "checksum edited": (lambda d: d.__setitem__("tensors_sha256", "0" * 64), "tensors_sha256"),
    "checksum missing": (lambda d: d.pop("tensors_sha256"), "tensors_sha256"),
    "previous format without checksum": (lambda d: d.__setitem__("format", "velcro.plan/1"),
                                         "format"),
}


@pytest.mark.parametrize("case", sorted(JSON_EDITS))
def test_an_edited_json_is_refused_naming_the_field(saved, case):
    change, field = JSON_EDITS[case]
    edit_json(saved, change)
    assert_refused(lambda: velcro.Plan.load(saved), saved, field)


def nan_constant(tensors):
    tensors["constant/a"][0, 0, 0] = float("nan")


def inf_constant(tensors):
    tensors["constant/b"][1, 0, 0] = float("inf")


TENSOR_EDITS = {
    "unit index out of range": (lambda t: t.__setitem__("units/a", torch.tensor([0, 9])),
                                "tensors.units/a"),
    "duplicate unit index": (lambda t: t.__setitem__("units/a", torch.tensor([1, 1])),
                             "tensors.units/a"),
    "negative unit index": (lambda t: t.__setitem__("units/a", torch.tensor([-1, 2])),
                            "tensors.units/a"),
    "units not integers": (lambda t: t.__setitem__("units/a", torch.tensor([0.0, 1.0])),
                           "tensors.units/a"),
    "NaN constant": (nan_constant, "tensors.constant/a"),
    "infinite constant": (inf_constant, "tensors.constant/b"),
    "a tensor no site names": (lambda t: t.__setitem__("units/zzz", torch.tensor([0])),
                               "tensors"),
    "a site's tensor missing": (lambda t: t.pop("constant/c"), "tensors"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_EDITS))
def test_edited_tensors_are_refused_naming_the_tensor(saved, case):
    change, field = TENSOR_EDITS[case]
    edit_tensors(saved, change)
    assert_refused(lambda: velcro.Plan.load(saved), saved, field)


@pytest.mark.parametrize("text, words", [
    (nested(100_000), "nested"),
    ('{"format": "velcro.plan/2", "saving_ratio": NaN}', "valid JSON"),
    ('{"format": "velcro.plan/2", "saving_ratio": 1e999}', "valid JSON"),
    ('{"format": "velcro.plan/2", "format": "velcro.plan/2"}', "twice"),
    ('{"format": "velcro.plan/2", "saving_ratio": ' + "9" * 5000 + "}", "valid JSON"),
])
def test_malformed_json_is_refused_not_a_traceback(tmp_path, text, words):
    path = tmp_path / "bad.plan.json"
    path.write_text(text)
    assert_refused(lambda: velcro.Plan.load(path), path, words)


def test_a_json_and_tensors_from_different_saves_never_load_as_one_plan(tmp_path):
    """Old JSON beside new tensors (the issue's 'C = 90% beside threshold 0.100')."""
    first, second = tmp_path / "one" / "p.json", tmp_path / "two" / "p.json"
    first.parent.mkdir()
    second.parent.mkdir()
    velcro.plan(small_stats(), 0.1, granularity="channel").save(first)
    velcro.plan(small_stats(1), 0.9, granularity="channel").save(second)
    shutil.copy(second.with_name("p.json.safetensors"), first.with_name("p.json.safetensors"))
    assert_refused(lambda: velcro.Plan.load(first), first, "tensors_sha256", "different saves")


class Killed(BaseException):
    """Stands for the process dying (SIGKILL) at a chosen point of a save."""


@pytest.mark.parametrize("die_at", [1, 2])
def test_a_save_killed_between_the_two_writes_never_leaves_a_mixed_pair(tmp_path, monkeypatch,
                                                                       die_at):
    path = tmp_path / "p.json"
    old = velcro.plan(small_stats(), 0.1, granularity="channel")
    old.save(path)
    new = velcro.plan(small_stats(1), 0.9, granularity="channel")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == die_at:
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        new.save(path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.json.safetensors"]
    if die_at == 1:  # nothing renamed yet: the old pair, whole
        loaded = velcro.Plan.load(path)
        assert loaded.saving_ratio == pytest.approx(old.saving_ratio)
        assert torch.equal(loaded.sites["a"].units, old.sites["a"].units)
    else:  # one file renamed: refused, never the old JSON's figures with the new tensors
        assert_refused(lambda: velcro.Plan.load(path), path, "tensors_sha256")


def test_element_plans_check_their_unit_indices_too(tmp_path):
    path = tmp_path / "e.json"
    velcro.plan(small_stats(), 0.5, granularity="element").save(path)
    before = snapshot(tmp_path)
    assert velcro.Plan.load(path).sites["a"].units.numel() == 18
    assert snapshot(tmp_path) == before
    edit_tensors(path, lambda t: t.__setitem__("units/a", t["units/a"] + 30))  # 36 elements
    assert_refused(lambda: velcro.Plan.load(path), path, "tensors.units/a", "outside [0, 36)")


def test_a_fifo_in_place_of_the_tensors_is_refused_without_hanging(saved):
    import threading

    tensors = saved.with_name(saved.name + ".safetensors")
    tensors.unlink()
    os.mkfifo(tensors)
    outcome = {}

    def load():
        try:
            velcro.Plan.load(saved)
        except Exception as exc:  # noqa: BLE001 - the type is what the test checks
            outcome["error"] = exc

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(timeout=30)
    if reader.is_alive():  # blocked reading the FIFO: release it, then fail
        with open(tensors, "wb"):
            pass
        reader.join(timeout=30)
        pytest.fail("loading hung on a FIFO")
    assert isinstance(outcome.get("error"), velcro.VelcroError), outcome
    assert str(saved) in str(outcome["error"]) and "'tensors'" in str(outcome["error"])

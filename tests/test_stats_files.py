"""Corrupted or edited statistics files: refused, naming the file and the field.

A statistics file is one safetensors file whose header holds JSON metadata; each case edits
the metadata or the tensors and checks a one-line VelcroError and an untouched folder.
"""

import json

import pytest
import torch
from hostile import assert_refused, nested
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import velcro
from velcro.stats import SiteStats, Stats


@pytest.fixture
def saved(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sites = {name: SiteStats(7, torch.randn(shape, generator=gen, dtype=torch.float64),
                             torch.rand(shape, generator=gen, dtype=torch.float64), 0)
             for name, shape in {"conv": (4, 3, 3), "fc": (10,)}.items()}
    path = tmp_path / "cats.stats.safetensors"
    Stats(sites, "s", "w", {"task": "cats"}).save(path)
    return path


def rewrite(path, change_meta=None, change_tensors=None, raw_meta=None):
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    meta = json.loads(header["velcro"])
    tensors = load_file(str(path))
    if change_meta:
        change_meta(meta)
    if change_tensors:
        change_tensors(tensors)
    text = raw_meta if raw_meta is not None else json.dumps(meta)
    save_file(tensors, str(path), metadata={"velcro": text})


def site(index, key, value):
    return lambda meta: meta["sites"][index].__setitem__(key, value)


def set_value(key, index, value):
    def change(tensors):
        tensors[key].view(-1)[index] = value
    return change


META_EDITS = {
    "negative count": (site(0, "count", -3), "sites[0].count"),
    "counts that disagree": (site(1, "count", 6), "sites[1].count"),
    "count not an integer": (site(0, "count", 7.5), "sites[0].count"),
    "images missing": (lambda m: m.pop("images"), "images"),
    "shape disagrees with the tensors": (site(0, "shape", [4, 9]), "tensors.mean/conv"),
    "channel axis out of range": (site(1, "channel_axis", 3), "sites[1].channel_axis"),
    "a site listed twice": (lambda m: m["sites"].append(dict(m["sites"][0])), "sites"),
    "site name not a string": (site(0, "name", ["conv"]), "sites[0].name"),
    "unknown format": (lambda m: m.__setitem__("format", "velcro.stats/9"), "velcro.stats/9"),
    "weights not a string": (lambda m: m.__setitem__("weights", None), "weights"),
}


@pytest.mark.parametrize("case", sorted(META_EDITS))
def test_edited_metadata_is_refused_naming_the_field(saved, case):
    change, field = META_EDITS[case]
    rewrite(saved, change_meta=change)
    assert_refused(lambda: velcro.Stats.load(saved), saved, field)


TENSOR_EDITS = {
    "NaN mean": (set_value("mean/conv", 5, float("nan")), "tensors.mean/conv"),
    "infinite mean": (set_value("mean/fc", 0, float("-inf")), "tensors.mean/fc"),
    "NaN m2 (a NaN variance)": (set_value("m2/fc", 3, float("nan")), "tensors.m2/fc"),
    "negative m2 (a negative variance)": (set_value("m2/conv", 2, -1.0), "tensors.m2/conv"),
    "a tensor no site names": (lambda t: t.__setitem__("mean/ghost", torch.zeros(2)),
                               "tensors"),
    "a site's tensor missing": (lambda t: t.pop("m2/fc"), "m2/fc"),
    "integer moments": (lambda t: t.__setitem__("mean/fc", torch.zeros(10, dtype=torch.int64)),
                        "tensors.mean/fc"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_EDITS))
def test_edited_moments_are_refused_naming_the_tensor(saved, case):
    change, field = TENSOR_EDITS[case]
    rewrite(saved, change_tensors=change)
    assert_refused(lambda: velcro.Stats.load(saved), saved, field)


@pytest.mark.parametrize("raw, words", [
    (nested(50_000), "nested"),
    ('{"format": "velcro.stats/1", "images": NaN}', "valid JSON"),
    ("not json at all", "valid JSON"),
    ("[1, 2, 3]", "not an object"),
])
def test_malformed_metadata_is_refused_not_a_traceback(saved, raw, words):
    rewrite(saved, raw_meta=raw)
    assert_refused(lambda: velcro.Stats.load(saved), saved, words)


def test_a_valid_file_still_loads_exactly(saved):
    stats = velcro.Stats.load(saved)
    assert stats.count == 7 and stats.info == {"task": "cats"}
    tensors = load_file(str(saved))
    assert torch.equal(stats["conv"].mean, tensors["mean/conv"])
    assert torch.equal(stats["fc"].m2, tensors["m2/fc"])

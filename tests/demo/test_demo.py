"""The digits demo end to end, with a tiny training recipe and a short search."""

from __future__ import annotations

import json

import pytest
import torch

import velcro.demo
from velcro import VelcroError, cli
from velcro.data import digits
from velcro.demo import run_demo
from velcro.demo._digits_model import Recipe, cache_dir
from velcro.search import UNGUARDED, SearchSchedule

# Two epochs on 384 images at 16x16 (a quarter of the demo's compute per image): a weak model,
# but a real one; the demo's claims (trim == apply, C > 0, the cache) hold for any model.
TINY = Recipe(size=16, epochs=2, train_images=384, batch_size=64)
SHORT = SearchSchedule(levels=2, uniform_levels=(0.25, 0.5, 0.75), uniform_patience=1,
                       refine_rounds=0)


def tiny_demo(*args, **kwargs):
    kwargs.setdefault("recipe", TINY)
    kwargs.setdefault("schedule", SHORT)
    kwargs.setdefault("budget", 30)
    kwargs.setdefault("latency_repeats", 3)
    kwargs.setdefault("progress", False)
    # the tiny model is weak: the default guard may rightly keep no plan on its few search
    # images; the mechanics tested here (trim == apply, the cache) need one
    kwargs.setdefault("search_options", UNGUARDED)
    return run_demo(*args, **kwargs)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def first(cache, tmp_path_factory):
    return tiny_demo((3, 8), seed=0, cache_dir=cache, out_dir=tmp_path_factory.mktemp("out"))


def test_trimmed_model_matches_the_searched_plan_on_held_out_digits(first):
    assert not first.from_cache and first.weights_path.is_file()
    trimmed, channel = first.reports["trimmed"], first.reports["channel"]
    assert trimmed.images == first.images["test"] > 0
    assert torch.equal(trimmed.hits, channel.hits)  # image by image, not just the count
    assert trimmed.accuracy == channel.accuracy
    plan = first.plans["channel"]
    chosen = sum(int(plan.mask(name).sum()) for name in plan.sites)
    total = sum(int(plan.mask(name).numel()) for name in plan.sites)
    assert chosen / total == pytest.approx(first.rows[3]["saving_ratio"])
    assert first.rows[3]["saving_ratio"] > 0
    assert first.rows[3]["macs_saved"] > 0 and first.rows[3]["parameters_saved"] > 0
    assert first.plans["element"].saving_ratio > 0


def test_splits_are_the_task_images_and_disjoint(first):
    split = digits.load(seed=0)
    task_train = digits.select(split.train, (3, 8))
    test = digits.select(split.test, (3, 8))
    assert first.images["calibration"] + first.images["search"] == len(task_train)
    assert first.images["test"] == len(test)
    assert set(first.reports["original"].labels.tolist()) == {3, 8}
    # the search never saw the held-out images: it reports its own image count
    assert first.searches["channel"].search_images == first.images["search"]


def test_outputs_agree_with_the_result(first):
    folder = first.files[0].parent
    document = json.loads((folder / "results.json").read_text())
    assert document["task"] == [3, 8] and document["from_cache"] is False
    for row, name in zip(document["rows"], ("original", "element", "channel", "trimmed"),
                         strict=True):
        assert row["correct"] == first.reports[name].correct
    reloaded = velcro.Plan.load(folder / "channel.plan.json")
    assert torch.equal(reloaded.sites[next(iter(reloaded.sites))].units,
                       first.plans["channel"].sites[next(iter(reloaded.sites))].units)
    assert "trimmed" in (folder / "table.txt").read_text()


def test_second_run_loads_the_cached_weights(first, cache, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the second run trained again")

    monkeypatch.setattr("velcro.demo._digits_model.train", no_training)
    again = tiny_demo((3, 8), seed=0, cache_dir=cache, out_dir=None, budget=4,
                      latency_repeats=1)
    assert again.from_cache and again.weights_path == first.weights_path
    assert again.model_accuracy == pytest.approx(first.model_accuracy, abs=1e-6)
    assert torch.equal(again.reports["original"].hits, first.reports["original"].hits)


def test_cli_passes_its_options_and_prints_json(first, tmp_path, monkeypatch, capsys):
    calls = []

    def recorded(*args, **kwargs):
        calls.append((args, kwargs))
        return first

    monkeypatch.setattr(velcro.demo, "run_demo", recorded)
    code = cli.main(["demo", "--task", "9,4", "--seed", "2", "--cache-dir", str(tmp_path),
                     "--out", str(tmp_path / "out"), "--budget", "20", "--retrain", "--json",
                     "-q"])
    assert code == 0
    (task,), options = calls[0]
    assert task == "9,4"
    assert options == {"seed": 2, "budget": 20, "cache_dir": str(tmp_path),
                       "use_cache": False, "out_dir": str(tmp_path / "out"), "progress": False}
    document = json.loads(capsys.readouterr().out)
    assert document == json.loads(json.dumps(first.to_dict()))
    assert cli.main(["demo", "-q"]) == 0
    assert calls[1][1]["use_cache"] is True and calls[1][1]["budget"] is None
    assert "channel plan, trimmed" in capsys.readouterr().out


@pytest.mark.parametrize("task", ["0,1,2,3,4,5,6,7,8,9", "3,x"])
def test_cli_rejects_bad_tasks_in_one_line(task, capsys):
    assert cli.main(["demo", "--task", task, "-q"]) == 2
    error = capsys.readouterr().err.strip()
    assert "task" in error and "\n" not in error


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("VELCRO_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    assert cache_dir(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv("VELCRO_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "velcro"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "velcro"


def test_recipe_key_changes_with_the_recipe():
    assert Recipe().key() != Recipe(epochs=7).key()
    assert Recipe().key() == Recipe().key()
    with pytest.raises(VelcroError, match="budget"):
        run_demo(budget=0, out_dir=None, progress=False)


def test_table_says_what_each_figure_is(first):
    text = first.table()
    lines = text.splitlines()
    element = next(line for line in lines if line.startswith("element plan"))
    costs = first.costs["element"]
    skipped = 1 - costs["compressed"]["macs"] / costs["original"]["macs"]
    assert f"{100 * skipped:.1f}%*" in element  # marked: saved by skipping hardware only
    assert any(line.startswith("* MACs that hardware skipping single outputs would save")
               for line in lines)
    batch = min(32, first.images["test"])
    assert (f"latency: ms per batch of {batch} images, median [interquartile range] of 3 "
            "interleaved runs.") in lines
    trimmed = next(line for line in lines if line.startswith("channel plan, trimmed"))
    spread = first.rows[3]["latency"]
    assert f"{spread['median']:.2f} [{spread['q1']:.2f}-{spread['q3']:.2f}]" in trimmed
    # the search's objective beside the MACs the trimmed model saves, counted here
    model = velcro.demo._digits_model.create("resnet18", num_classes=10)
    velcro.models.load_weights(model, first.weights_path)
    example = torch.zeros(1, 3, 16, 16)
    small = velcro.trim(model.eval(), first.plans["channel"])
    saved = 1 - velcro.cost(small, example).macs / velcro.cost(model, example).macs
    channel = first.searches["channel"]
    assert (f"channel search objective: MACs in replaced producers "
            f"{100 * channel.objective_value:.2f}%; MACs the trimmed model saves (counted on "
            f"it): {100 * saved:.2f}%.") in lines
    assert f"the task's {sum(first.images.values())} images:" in text
    summary = repr(first)
    assert len(summary) < 300 and len(summary.splitlines()) == 2
    assert f"{100 * first.reports['original'].accuracy:.2f}%" in summary

"""Every figure in a report says what it is: who saves the MACs, what the search maximised,
the latency's batch and spread, a drop as a drop, and the model the statistics record."""

import re

import pytest
from test_report import parse, pct, row
from tinytask import one_thread, trained_task

import velcro
from velcro.cost import cost
from velcro.report import measure_costs, write_report
from velcro.report._tables import sweep_tables
from velcro.report.sweep import Sweep
from velcro.search import search

MINUS = "\u2212"


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def fitted():
    task = trained_task()
    stats = velcro.calibrate(task["model"], task["calibration"], progress=False)
    stats.info.update({"model": "chain-from-stats", "weights": "chain.safetensors",
                       "task": "five blobs", "classes": [0, 1, 2, 3, 4]})
    return task, stats


def cards(page_path):
    text = page_path.read_text(encoding="utf-8")
    found = re.findall(r'<div class="label">([^<]*)</div><div class="value([^"]*)">([^<]*)<',
                       text)
    return {label: (value, tone.strip()) for label, tone, value in found}


def test_element_plan_macs_are_labelled_as_skipping_hardware(fitted, tmp_path):
    task, stats = fitted
    model = task["model"]
    plan = velcro.plan(stats, 0.4, granularity="element")
    example = task["validation"][0][0][:2]
    costs = measure_costs(model, plan, example, latency=False)
    assert costs["saved_by"] == "skipping hardware"
    paths = write_report({"plan": plan, "stats": stats, "cost": costs}, tmp_path / "e.html")
    page = parse(paths["html"])
    header = [t[0] for t in page.tables if t and t[0][0] == ""][-1]
    assert header[2] == "with skipping hardware"
    shown = cards(paths["html"])
    assert "MACs saved (skipping hardware)" in shown and "MACs saved" not in shown
    saved = 1 - costs["compressed"]["macs"] / costs["original"]["macs"]
    assert shown["MACs saved (skipping hardware)"][0] == pct(saved) and saved > 0
    # the dense model computes every output: the page says it saves nothing as it runs
    dense = cost(velcro.apply(model, plan), example[:1])
    assert dense.macs == costs["original"]["macs"]
    assert "saves none" in paths["html"].read_text(encoding="utf-8")


def test_search_objective_is_named_beside_the_trimmed_models_macs_saved(fitted, tmp_path):
    task, stats = fitted
    model = task["model"]
    result = search(model, stats, task["search"], granularity="channel", objective="macs",
                    tolerance=0.03, progress=False)
    example = task["validation"][0][0][:4]
    costs = measure_costs(model, result.plan, example, repeats=3)
    paths = write_report({"plan": result.plan, "search": result, "cost": costs},
                         tmp_path / "c.html")
    page = parse(paths["html"])
    objective = row(page, "objective (maximised on the search split): "
                          "MACs in replaced producers")
    assert objective[1] == pct(result.objective_value)
    # the trimmed model's MACs saved, counted here on the trimmed model itself
    small = velcro.trim(model, result.plan)
    saved = 1 - cost(small, example[:1]).macs / cost(model, example[:1]).macs
    assert row(page, "MACs saved by the trimmed model (velcro.cost)")[1] == pct(saved)
    assert cards(paths["html"])["MACs saved (trimmed model)"][0] == pct(saved)
    latency = row(page, "latency per batch of 4 images (median [IQR] over 3 runs)")
    assert re.fullmatch(r"\d+\.\d\d ms \[\d+\.\d\d–\d+\.\d\d\]", latency[1])
    assert cards(paths["html"])["speed-up, batch of 4 (measured)"]


@pytest.mark.parametrize("after_correct, tone, sign", [(90, "down", MINUS), (110, "up", "+")])
def test_an_accuracy_drop_reads_as_a_drop(fitted, tmp_path, after_correct, tone, sign):
    _, stats = fitted
    plan = velcro.plan(stats, 0.2, granularity="channel")
    paths = write_report({"plan": plan,
                          "baseline": {"accuracy": 100 / 200, "images": 200},
                          "compressed": {"accuracy": after_correct / 200, "images": 200}},
                         tmp_path / f"{tone}.html")
    change = 100 * (after_correct - 100) / 200
    expected = f"{sign}{abs(change):.2f} pp"
    value, card_tone = cards(paths["html"])["top-1 change (validation)"]
    assert (value, card_tone) == (expected, tone)
    text = paths["html"].read_text(encoding="utf-8")
    assert re.search(rf'<p class="note {tone}">[^<]*{re.escape(expected)}, a '
                     rf'{"drop" if tone == "down" else "gain"}', text)
    assert f".{tone}::before" in text  # ▼ / ▲ drawn by the style sheet
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert f"**top-1 change (validation)**: {expected}" in markdown
    assert "-5.00" not in markdown  # never a hyphen for a minus


def test_a_plan_with_its_stats_reports_the_recorded_model_weights_and_task(fitted, tmp_path):
    _, stats = fitted
    plan = velcro.plan(stats, 0.3, granularity="element")
    stats_path, plan_path = tmp_path / "s.safetensors", tmp_path / "p.json"
    stats.save(stats_path)
    plan.save(plan_path)
    paths = write_report({"plan": str(plan_path), "stats": str(stats_path)},
                         tmp_path / "r.html")
    page = parse(paths["html"])
    assert row(page, "model")[1] == "chain-from-stats"
    assert row(page, "weights")[1] == "chain.safetensors"
    assert row(page, "task")[1] == "five blobs"
    assert row(page, "task classes")[1] == "0, 1, 2, 3, 4 (5)"
    assert "chain-from-stats" in paths["html"].read_text(encoding="utf-8").split("</h1>")[0]
    # what the run says wins over what the statistics record
    paths = write_report({"plan": plan, "stats": stats, "model": "given"}, tmp_path / "g.html")
    assert row(parse(paths["html"]), "model")[1] == "given"


def _point(setting, saving_ratio, correct, baseline_correct=180, **extra):
    return {"model": "m", "task": "t", "granularity": "channel", "method": "uniform",
            "setting": setting, "saving_ratio": saving_ratio, "accuracy": correct / 200,
            "correct": correct, "images": 200, "baseline_accuracy": baseline_correct / 200,
            "baseline_correct": baseline_correct, "compressed_elements": 10,
            "zero_elements": 0, "zero_share": 0.0, **extra}


def test_a_loss_is_never_listed_as_a_gain():
    losing = Sweep([_point(0.2, 0.2, 178), _point(0.5, 0.5, 150)])
    (gain,) = losing.tables()["accuracy_gain"]
    assert gain["gain"] is None and gain["best_change"] == pytest.approx(-0.01)
    table = sweep_tables(losing.tables())[2]
    assert table.rows[0][4:] == ["none", "–"]
    assert "gain" not in table.rows[0][4]
    # the maximum-C table shows the validation change with its sign
    (maximum,) = losing.tables()["max_saving_ratio"]
    assert maximum["max_saving_ratio"] == 0.0
    winning = Sweep([_point(0.2, 0.2, 184), _point(0.5, 0.5, 150)])
    assert winning.tables()["accuracy_gain"][0]["gain"] == pytest.approx(0.02)
    assert sweep_tables(winning.tables())[2].rows[0][4] == "+2.00 pp"


def test_the_maximum_c_is_chosen_on_the_search_images_and_reported_held_out():
    # on the search split the 0.5 point loses, on validation it does not: choose 0.2
    points = [_point(0.2, 0.2, 170, search_correct=90, search_baseline_correct=90,
                     search_images=100),
              _point(0.5, 0.5, 185, search_correct=80, search_baseline_correct=90,
                     search_images=100)]
    (row_,) = Sweep(points).tables()["max_saving_ratio"]
    assert (row_["chosen_on"], row_["max_saving_ratio"]) == ("search", 0.2)
    assert row_["accuracy"] == 170 / 200 and row_["change"] == pytest.approx(-0.05)
    table = sweep_tables(Sweep(points).tables())[0]
    assert "held out" in table.title and "search split" in table.title
    assert table.rows[0][5] == "search split"
    assert table.rows[0][8] == f"{MINUS}5.00 pp" and table.rows[0][8].tone == "down"
    html = table.html()
    assert '<td class="num down">' in html
    # the same points without their search figures: chosen on validation, said plainly
    bare = [{k: v for k, v in p.items() if not k.startswith("search")} for p in points]
    (row_,) = Sweep(bare).tables()["max_saving_ratio"]
    assert (row_["chosen_on"], row_["max_saving_ratio"]) == ("validation", 0.5)
    assert "same images" in sweep_tables(Sweep(bare).tables())[0].title


def test_cells_without_a_change_carry_no_tone():
    table = sweep_tables(Sweep([_point(0.2, 0.2, 180)]).tables())[0]
    assert table.rows[0][8] == "0.00 pp" and table.rows[0][8].tone == ""


def test_reports_given_as_results_are_compared_image_by_image(fitted, tmp_path):
    task, stats = fitted
    model = task["model"]
    plan = velcro.plan(stats, 0.6, granularity="channel")
    before = velcro.evaluate(model, task["validation"], progress=False)
    after = velcro.evaluate(velcro.apply(model, plan), task["validation"], progress=False)
    gained = int((after.hits & ~before.hits).sum())
    lost = int((before.hits & ~after.hits).sum())
    paths = write_report({"plan": plan, "baseline": before, "compressed": after},
                         tmp_path / "p.html")
    markdown = paths["markdown"].read_text(encoding="utf-8")
    image = "image" if gained == 1 else "images"
    assert f"{gained} {image} right only after compression" in markdown
    image = "image" if lost == 1 else "images"
    assert f"{lost} {image} right only before" in markdown
    assert "95% CI [" in markdown

"""Edited sweep points and search summaries: refused naming the file and the field.

A report shows numbers from these files; a wrong type is a traceback halfway through a
report, and an inconsistent number (an accuracy that is not correct / images) is a wrong
figure shown as a right one. Both are refused where the file is read.
"""

import json

import pytest
from hostile import assert_refused, nested
from hostile import search_summary as summary
from hostile import sweep_point as point

from velcro.cli import main
from velcro.report.sweep import COLUMNS, Sweep


@pytest.fixture
def points_file(tmp_path):
    folder = tmp_path / "sweep"
    folder.mkdir()
    path = folder / "points.json"
    path.write_text(json.dumps({"format": "velcro.sweep/1", "info": {}, "columns": list(COLUMNS),
                                "points": [point(), point(method="search", setting=0.01,
                                                          search_accuracy=0.8, evaluations=7)]}))
    return path


def test_a_valid_points_file_loads(points_file):
    loaded = Sweep.load(points_file.parent)
    assert loaded.points[1]["evaluations"] == 7
    assert loaded.tables()["max_saving_ratio"][0]["max_saving_ratio"] == 0.0


SWEEP_EDITS = {
    "no images (a division by zero in the tables)": (dict(images=0, correct=0), "images"),
    "accuracy that is not correct / images": (dict(accuracy=0.9), "points[0].accuracy"),
    "more correct than images": (dict(correct=5, accuracy=1.25), "points[0].correct"),
    "unknown granularity": (dict(granularity="block"), "points[0].granularity"),
    "unknown method": (dict(method="magic"), "points[0].method"),
    "C above 1": (dict(saving_ratio=3.0), "points[0].saving_ratio"),
    "more zeros than compressed elements": (dict(zero_elements=11), "points[0].zero_elements"),
    "zero share that is not zeros / compressed": (dict(zero_share=0.9), "points[0].zero_share"),
    "model not a string": (dict(model=["chain"]), "points[0].model"),
    "negative evaluations": (dict(evaluations=-1), "points[0].evaluations"),
}


@pytest.mark.parametrize("case", sorted(SWEEP_EDITS))
def test_an_edited_sweep_point_is_refused_naming_the_field(points_file, case):
    changes, field = SWEEP_EDITS[case]
    document = json.loads(points_file.read_text())
    document["points"][0].update(changes)
    points_file.write_text(json.dumps(document))
    assert_refused(lambda: Sweep.load(points_file.parent), points_file, field)


@pytest.mark.parametrize("text, words", [
    (nested(100_000), "nested"),
    ('{"format": "velcro.sweep/1", "points": [{"accuracy": NaN}]}', "valid JSON"),
    ('{"format": "velcro.sweep/1", "points": {"a": 1}}', "points"),
    ('{"format": "velcro.sweep/1", "points": [{"model": "x"}]}', "points[0]"),
])
def test_a_malformed_points_file_is_refused(points_file, text, words):
    points_file.write_text(text)
    assert_refused(lambda: Sweep.load(points_file), points_file, words)


SUMMARY_EDITS = {
    "a candidate's accuracy a string": ({"trajectory.1.accuracy": "high"},
                                        "trajectory[1].accuracy"),
    "feasible not a boolean": ({"trajectory.0.feasible": "yes"}, "trajectory[0].feasible"),
    "negative evaluations": ({"evaluations": -1}, "evaluations"),
    "tolerance above 1": ({"tolerance": 5}, "tolerance"),
    "validation accuracy that is not correct / images": (
        {"validation.baseline.accuracy": 0.9}, "validation.baseline.accuracy"),
    "more correct than images": ({"validation.compressed.correct": 9},
                                 "validation.compressed.correct"),
    "MACs not a number": ({"cost": {"original": {"macs": "many", "parameters": 1},
                                    "compressed": {"macs": 1, "parameters": 1}}},
                          "cost.original.macs"),
    "split sizes not counts": ({"splits.search": -4}, "splits.search"),
    "settings not an object": ({"settings": [1, 2]}, "settings"),
}


@pytest.mark.parametrize("case", sorted(SUMMARY_EDITS))
def test_report_refuses_an_edited_search_summary_naming_the_field(tmp_path, capsys, case):
    changes, field = SUMMARY_EDITS[case]
    run = tmp_path / "cats.search.json"
    run.write_text(json.dumps(summary(**changes)))
    out = tmp_path / "cats.html"
    assert_refused(lambda: _report(run, out), run, field)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run) in err and field in err
    assert not out.exists()


def _report(run, out):
    """`velcro report --run RUN -o OUT` as the API sees it (the error it exits 2 with)."""
    from velcro.report._inputs import read_search_summary

    code = main(["report", "--run", str(run), "-o", str(out)])
    assert code == 2
    read_search_summary(run)  # the same refusal, as a VelcroError


def test_report_refuses_a_deeply_nested_summary(tmp_path, capsys):
    run = tmp_path / "deep.search.json"
    run.write_text(nested(100_000))
    assert main(["report", "--run", str(run), "-o", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run) in err and "nested" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep.search.json"]


def test_a_valid_summary_is_read_as_written(tmp_path):
    from velcro.report._inputs import read_search_summary

    run = tmp_path / "cats.search.json"
    run.write_text(json.dumps(summary()))
    assert read_search_summary(run) == summary()

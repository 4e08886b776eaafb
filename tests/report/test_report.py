import base64
import io
import json
import re
from html.parser import HTMLParser

import pytest
import torch
from cli_workspace import DATA_OPTIONS, build
from PIL import Image
from tinytask import one_thread, trained_task

import velcro
from velcro.cli import main
from velcro.cost import cost
from velcro.report import measure_costs, write_report
from velcro.report.sweep import sweep
from velcro.search import search, validate


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    with one_thread():
        yield


class Page(HTMLParser):
    """Every <img> source, every table as rows of cell texts, and any external reference."""

    def __init__(self) -> None:
        super().__init__()
        self.images, self.tables, self.external = [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("src", "href"):
            if tag in ("script", "link", "iframe", "img", "a") and attrs.get(key, "") and \
                    not attrs[key].startswith("data:"):
                self.external.append(attrs[key])
        if tag in ("script", "link", "iframe"):
            self.external.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(path):
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def row(page, first_cell):
    found = [r for table in page.tables for r in table if r and r[0] == first_cell]
    assert found, f"no table row starts with {first_cell!r}"
    return found[0]


def pct(value):
    return f"{100 * value:.2f}%"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    task = trained_task()
    model = task["model"]
    stats = velcro.calibrate(model, task["calibration"], progress=False)
    result = search(model, stats, task["search"], granularity="channel", criterion="agreement",
                    tolerance=0.2, confidence=0.8, check_fraction=0.25, progress=False)
    validate(result, model, task["validation"], search_ids=task["search_ids"],
             validation_ids=task["validation_ids"], progress=False)
    example = task["validation"][0][0][:16]
    costs = measure_costs(model, result.plan, example, repeats=3)
    curves = sweep(model, stats, task["validation"], search_data=task["search"],
                   model_name="chain", task="generated", thresholds=(0.0, 0.3, 0.6),
                   tolerances=(0.02,), progress=False)
    out = tmp_path_factory.mktemp("report") / "run.html"
    paths = write_report({"model": "chain", "task": "generated", "classes": [0, 1, 2, 3, 4],
                          "splits": {"calibration": 200, "search": 300, "validation": 400},
                          "plan": result.plan, "stats": stats, "search": result,
                          "cost": costs, "sweep": curves}, out)
    return {"task": task, "model": model, "stats": stats, "result": result, "paths": paths,
            "example": example, "costs": costs}


def test_the_page_is_self_contained_and_every_image_is_a_real_png(run):
    page = parse(run["paths"]["html"])
    assert page.external == []
    # plan, variance distribution, search, curves, and the trade-off when a plan was kept
    assert run["result"].validation["tradeoff"]
    assert len(page.images) == 5
    for source in page.images:
        assert source.startswith("data:image/png;base64,")
        width, height = png_size(base64.b64decode(source.split(",", 1)[1], validate=True))
        assert width >= 300 and height >= 200


def test_the_tables_hold_the_runs_figures(run):
    page = parse(run["paths"]["html"])
    model, result, task = run["model"], run["result"], run["task"]
    plan = result.plan
    assert row(page, "compression-saving ratio C")[1] == pct(plan.saving_ratio)
    # accuracies recomputed here, through the reference semantics
    before = velcro.evaluate(model, task["validation"], progress=False)
    after = velcro.evaluate(velcro.apply(model, plan), task["validation"], progress=False)
    uncompressed = row(page, "uncompressed, validation")
    compressed = row(page, "compressed, validation")
    assert uncompressed[1:] == [pct(before.accuracy),
                                f"[{pct(before.ci95[0])}, {pct(before.ci95[1])}]", "400"]
    assert compressed[1:] == [pct(after.accuracy),
                              f"[{pct(after.ci95[0])}, {pct(after.ci95[1])}]", "400"]
    # the search's own figure is on the search images it ran on: the check images held out
    images = torch.cat([x for x, _ in task["search"]])
    labels = torch.cat([y for _, y in task["search"]])
    kept = torch.ones(len(images), dtype=torch.bool)
    kept[result.check["indices"]] = False
    searched = velcro.evaluate(velcro.apply(model, plan), [(images[kept], labels[kept])],
                               progress=False)
    assert row(page, "compressed, search split")[1:] == [
        pct(searched.accuracy), f"[{pct(searched.ci95[0])}, {pct(searched.ci95[1])}]",
        str(result.search_images)]
    # MACs and parameters: the model's and the trimmed model's, counted here
    small = velcro.trim(model, plan)
    original, trimmed = cost(model, run["example"][:1]), cost(small, run["example"][:1])
    assert row(page, "MACs per image")[1:3] == [f"{original.macs:,}", f"{trimmed.macs:,}"]
    assert row(page, "parameters")[1:3] == [f"{original.parameters:,}",
                                            f"{trimmed.parameters:,}"]
    latency = row(page, "latency per batch of 16 images (median [IQR] over 3 runs)")
    spread = run["costs"]["latency_ms"]["spread"]["compressed"]
    assert latency[2] == (f"{spread['median']:.2f} ms [{spread['q1']:.2f}–"
                          f"{spread['q3']:.2f}]")
    # the plan per site
    for name, fraction in plan.thresholds().items():
        site_row = row(page, name)
        assert site_row[2] == pct(fraction)
        assert site_row[3] == f"{plan.sites[name].units.numel()} / {plan.sites[name].channels}"
    assert row(page, "evaluations")[1] == str(result.evaluations)
    # the trade-off: each plan of the back-off path on the validation images, recomputed here
    for point, path in zip(result.validation["tradeoff"], result.path, strict=True):
        report = velcro.evaluate(velcro.apply(model, path["plan"]), task["validation"],
                                 progress=False)
        assert point["difference"] == pytest.approx((report.correct - before.correct) / 400)
        assert point["saving_ratio"] == path["plan"].saving_ratio
    chosen = [p for p in result.validation["tradeoff"] if p["chosen"]]
    assert len(chosen) == 1 and chosen[0]["saving_ratio"] == plan.saving_ratio
    trade_rows = [r for t in page.tables for r in t if r[-1] == "yes" and "pp [" in r[1]]
    assert trade_rows and trade_rows[0][0] == pct(plan.saving_ratio)
    # the sweep's table of maximum C at no loss
    assert any(r[:4] == ["chain", "generated", "channel", "uniform"]
               for t in page.tables for r in t)


def test_the_markdown_twin_has_the_same_tables_and_its_images_exist(run):
    markdown = run["paths"]["markdown"].read_text(encoding="utf-8")
    plan = run["result"].plan
    assert f"| compression-saving ratio C | {pct(plan.saving_ratio)} |" in markdown
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(links) == 5
    for link in links:
        data = (run["paths"]["markdown"].parent / link).read_bytes()
        assert min(png_size(data)) >= 200


def test_search_and_report_commands_write_the_report(tmp_path, monkeypatch, capsys):
    ws = build(tmp_path / "ws")
    monkeypatch.syspath_prepend(str(ws.module_dir))
    model = ["--model", "clitiny:factory", "--weights", str(ws.weights)]
    stats = tmp_path / "t.stats.safetensors"
    assert main(["calibrate", str(ws.data), *model, "--classes", "0,1,2",
                 "--calibration-fraction", "0.25", "--search-fraction", "0.3", "-o", str(stats),
                 *DATA_OPTIONS]) == 0
    capsys.readouterr()
    assert main(["search", "--stats", str(stats), *model, "--granularity", "channel",
                 "--tolerance", "0.3", "--confidence", "0.8", "--check-fraction", "0.4",
                 "-o", str(tmp_path / "t.plan.json"), "--json", *DATA_OPTIONS]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["validation"]["images"] == summary["splits"]["validation"]
    saved = json.loads((tmp_path / "t.search.json").read_text())
    assert saved["saving_ratio"] == pytest.approx(
        velcro.Plan.load(tmp_path / "t.plan.json").saving_ratio)
    page = parse(tmp_path / "t.report.html")
    tradeoff = saved["validation"]["tradeoff"]
    assert len(page.images) == 3 + bool(tradeoff) and page.external == []
    assert row(page, "compression-saving ratio C")[1] == pct(saved["saving_ratio"])
    # the report re-rendered from the saved summary alone
    assert main(["report", "--run", str(tmp_path / "t.search.json"),
                 "-o", str(tmp_path / "again.html")]) == 0
    again = parse(tmp_path / "again.html")
    assert again.tables == page.tables
    assert (tmp_path / "again.md").is_file()
    assert main(["report", "-o", str(tmp_path / "x.html")]) == 2
    assert "nothing to report" in capsys.readouterr().err

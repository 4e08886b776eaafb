"""Mixed image sizes: statistics are per element, so calibration refuses images of two sizes
(naming the site, both shapes and the fix) instead of returning moments that restarted at
each size change while the image count did not; evaluation and search of a plan refuse
images of another size than the plan's with one line instead of a traceback."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from cli_workspace import DATA_OPTIONS, build, make_images
from PIL import Image
from zoo import build as build_model

import velcro
from velcro import _moments
from velcro.data import Split
from velcro.errors import VelcroError

TINY = ["--model", "clitiny:factory"]
NATIVE = ["--resize", "0", "--crop", "0", "--batch-size", "1"]  # images at their own size


def batches_of(shape_a, shape_b, count=3):
    generator = torch.Generator().manual_seed(0)
    return ([torch.randn(2, *shape_a, generator=generator) for _ in range(count)]
            + [torch.randn(2, *shape_b, generator=generator) for _ in range(count)])


@pytest.mark.parametrize("kernel", ["numba", "torch"])
def test_calibrate_refuses_two_image_sizes(monkeypatch, kernel):
    if kernel == "torch":  # the fallback used without numba or off the CPU
        monkeypatch.setattr(_moments, "numba", None)
    model, shape = build_model("chain")
    other = (shape[0], shape[1] + 4, shape[2] + 2)
    with pytest.raises(VelcroError) as info:
        velcro.calibrate(model, batches_of(shape, other), progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert "site 'act1" in message  # the first site whose shape changed
    assert "x".join(map(str, shape)) in message and "x".join(map(str, other)) in message
    assert "--crop" in message and "one size" in message


def test_update_moments_refuses_a_new_shape_after_images_were_counted():
    mean = torch.zeros(4, dtype=torch.float64)
    count, mean, m2 = _moments.update_moments(0, mean, torch.zeros(4, dtype=torch.float64),
                                              torch.ones(3, 4))
    with pytest.raises(VelcroError, match=r"activations of 5 after 3 images of 4"):
        _moments.update_moments(count, mean, m2, torch.ones(2, 5))


# ---- the command line --------------------------------------------------------------------

@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build(tmp_path_factory.mktemp("shapes"))


def mixed_folder(root: Path) -> Path:
    """The workspace's images, every third one turned on its side (24x20 -> 20x24)."""
    data = root / "mixed"
    make_images(data)
    for path in sorted(data.rglob("*.png"))[1::3]:
        with Image.open(path) as image:
            image.transpose(Image.Transpose.ROTATE_90).save(path)
    return data


def state(folder: Path) -> dict[str, tuple]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(code, stdout, stderr, *names):
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert "Traceback" not in stderr and stdout == ""
    assert len(lines) == 1, stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def test_the_command_line_refuses_to_calibrate_on_two_sizes(ws, cli, tmp_path):
    data = mixed_folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    before = state(tmp_path)
    one_line_error(*cli("calibrate", data, *TINY, "--weights", ws.weights, "-o",
                        out / "s.safetensors", "--calibration-fraction", "0.5",
                        *DATA_OPTIONS, *NATIVE), "--crop", "3x20x24", "3x24x20")
    assert state(tmp_path) == before


@pytest.fixture(scope="module")
def plan(ws, tmp_path_factory):
    """A plan made on the workspace's images at their own size (3x20x24)."""
    from velcro.cli import main

    folder = tmp_path_factory.mktemp("plan")
    stats = folder / "s.safetensors"
    assert main(["calibrate", str(ws.data), "--model", f"{ws.module_dir}/clitiny.py:factory",
                 "--weights", str(ws.weights), "-o", str(stats), "--search-fraction", "0.3",
                 "--calibration-fraction", "0.3", *DATA_OPTIONS, *NATIVE]) == 0
    path = folder / "p.json"
    assert main(["compress", "--stats", str(stats), "--thresholds", "0.3", "-o", str(path),
                 "--no-report"]) == 0
    return {"stats": stats, "plan": path}


@pytest.mark.parametrize("first", ["same", "other"])
def test_evaluate_refuses_images_of_another_size_than_the_plan(ws, cli, tmp_path, plan, first):
    data = mixed_folder(tmp_path)
    if first == "other":  # the very first image is already the odd one
        for path in sorted(data.rglob("*.png"))[:1]:
            with Image.open(path) as image:
                image.transpose(Image.Transpose.ROTATE_90).save(path)
    before = state(tmp_path)
    one_line_error(*cli("evaluate", data, *TINY, "--weights", ws.weights, "--plan",
                        plan["plan"], "-o", tmp_path / "e.json", *DATA_OPTIONS, *NATIVE),
                   "--crop", "3x24x20")
    assert state(tmp_path) == before


def test_search_refuses_images_of_another_size_than_the_statistics(ws, cli, tmp_path, plan):
    data = mixed_folder(tmp_path)
    split = Split.load(Path(str(plan["stats"]).removesuffix(".safetensors")
                                        + ".split.json"))
    first_search_image = data / split["search"][0][0]
    with Image.open(first_search_image) as image:  # make sure the odd size comes first
        if image.size == (24, 20):
            image.transpose(Image.Transpose.ROTATE_90).save(first_search_image)
    before = state(tmp_path)
    one_line_error(*cli("search", data, "--stats", plan["stats"], *TINY, "--weights",
                        ws.weights, "-o", tmp_path / "q.json", *DATA_OPTIONS, *NATIVE),
                   "--crop", "3x24x20")
    assert state(tmp_path) == before


def test_evaluate_refuses_images_of_another_size_than_a_trimmed_model(ws, cli, tmp_path, plan):
    trimmed = tmp_path / "t.json"
    made = cli("compress", "--stats", plan["stats"], "--thresholds", "0.3", "--granularity",
               "channel", *TINY, "--weights", ws.weights, "--trim", trimmed, "-o",
               tmp_path / "c.json", "--no-report")
    assert made[0] == 0, made[2]
    data = tmp_path / "turned"
    make_images(data)
    for path in sorted(data.rglob("*.png")):
        with Image.open(path) as image:
            image.transpose(Image.Transpose.ROTATE_90).save(path)
    before = state(tmp_path)
    one_line_error(*cli("evaluate", data, "--model", trimmed, "-o", tmp_path / "e.json",
                        *DATA_OPTIONS, *NATIVE), "--model", "3x24x20", "3x20x24")
    assert state(tmp_path) == before

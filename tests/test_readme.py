"""The README's Python blocks run as written, in order, in one namespace, on files the test
lays out the way the README assumes: ImageNet-style wnid folders under ``val/``, the class
list ``LOC_synset_mapping.txt`` and torchvision-style weights ``resnet18.pth`` (random).
Also: the command-option table of the README is the parser's truth."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import velcro
from velcro.cli import build_parser
from velcro.data import get_task

README = Path(__file__).resolve().parents[1] / "README.md"
CAT_WNIDS = ["n02123045", "n02123159", "n02123394", "n02123597", "n02124075"]
IMAGES_PER_CLASS = 5


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def lay_out_files(folder: Path) -> None:
    """What the README's first block reads, generated: five cat classes and one other."""
    wnids = [f"n{9_000_000 + i:08d}" for i in range(1000)]
    for index, wnid in zip(get_task("cats").classes, CAT_WNIDS, strict=True):
        wnids[index] = wnid
    (folder / "LOC_synset_mapping.txt").write_text(
        "".join(f"{wnid} class {i}\n" for i, wnid in enumerate(wnids)))
    rng = np.random.default_rng(0)
    for wnid in [*CAT_WNIDS, wnids[7]]:  # a class folder outside the task is left alone
        (folder / "val" / wnid).mkdir(parents=True)
        for i in range(IMAGES_PER_CLASS):
            pixels = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "val" / wnid / f"{i}.JPEG", quality=90)
    torch.manual_seed(0)
    torch.save(velcro.models.resnet18().state_dict(), folder / "resnet18.pth")


def test_the_readme_python_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 3
    assert "ImageLoader" in blocks[0] and "calibration_loader =" in blocks[0]
    lay_out_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for number, block in enumerate(blocks):
            exec(compile(block, f"README.md python block {number + 1}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out

    # what the blocks computed is what it claims to be
    stats, plan = namespace["stats"], namespace["plan"]
    calibration = round(0.02 * 5 * IMAGES_PER_CLASS) or 1
    assert stats.count == calibration
    assert plan.granularity == "channel"
    for site in plan.sites.values():  # 30% of each site's filters, rounded
        assert len(site.units) == int(0.3 * site.channels + 0.5)
    assert f"C {100 * plan.saving_ratio:.2f}%" in printed
    after = namespace["after"]
    assert after.images == 5 * IMAGES_PER_CLASS - calibration
    assert f"on {after.images} images" in printed
    assert set(after.labels.tolist()) <= set(get_task("cats").classes)
    small, compressed = namespace["small"], namespace["compressed"]
    assert (tmp_path / "cats.trimmed.json").is_file()
    assert (tmp_path / "cats.trimmed.json.safetensors").is_file()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(small(x), compressed(x), rtol=1e-4, atol=1e-4)
        # the affine block: its trimmed model computes what its plan's reference does
        result = namespace["result"]
        assert namespace["affine_stats"].has_covariance
        reference = velcro.apply(velcro.models.create("resnet18", weights=str(
            tmp_path / "resnet18.pth")), result.plan)(x)
        torch.testing.assert_close(namespace["affine_small"](x), reference, rtol=1e-4,
                                   atol=1e-4)


def options_table(text: str) -> tuple[list[str], dict[str, list[bool]]]:
    lines = [line for line in text.splitlines() if line.startswith("| command |")]
    assert len(lines) == 1, "the README has one command-option table"
    start = text.splitlines().index(lines[0])
    header = [cell.strip().strip("`") for cell in lines[0].strip("|").split("|")][1:]
    rows = {}
    for line in text.splitlines()[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = [cell == "✓" for cell in cells[1:]]
    return header, rows


def test_the_readme_option_table_is_what_each_command_takes():
    header, rows = options_table(README.read_text(encoding="utf-8"))
    parser = build_parser()
    commands = next(a for a in parser._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    assert set(rows) == set(commands)
    for name, marks in rows.items():
        taken = commands[name]._option_string_actions
        for option, marked in zip(header, marks, strict=True):
            assert (option in taken) == marked, f"README: {name} {option}"


def test_version_has_one_source(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"velcro {velcro.__version__}"
    assert version("velcro") == velcro.__version__

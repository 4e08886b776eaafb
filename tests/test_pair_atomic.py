"""A plan or a trimmed model is two files (JSON + tensors); saving over an old pair from the
API replaces both or neither, even when the second rename fails (the first is undone)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

import velcro
from velcro import _io
from velcro.errors import VelcroError


def made_plan(threshold: float):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    images = torch.randn(8, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    stats = velcro.calibrate(model, [images], progress=False)
    return model, velcro.plan(stats, threshold, granularity="channel")


def snapshot(*paths):
    return {str(p): (p.read_bytes(), os.stat(p).st_ino) for p in paths}


def failing_second_rename(monkeypatch):
    """os.replace fails on its second call, as a full or read-only disk, or a kill, would."""
    real, calls = os.replace, []

    def replace(source, target, *args, **kwargs):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(_io.os, "replace", replace)
    return calls


@pytest.mark.parametrize("what", ["plan", "trimmed"])
def test_a_failed_second_rename_leaves_the_old_pair(tmp_path, monkeypatch, what):
    model, old = made_plan(0.25)
    _, new = made_plan(0.75)
    path = tmp_path / f"x.{what}.json"

    def save(plan):
        if what == "plan":
            plan.save(path)
        else:
            velcro.save_trimmed(velcro.trim(model, plan), path)

    save(old)
    twin = tmp_path / f"{path.name}.safetensors"
    before = snapshot(path, twin)
    calls = failing_second_rename(monkeypatch)
    with pytest.raises(VelcroError, match="Input/output error"):
        save(new)
    assert len(calls) >= 2
    monkeypatch.undo()
    assert snapshot(path, twin) == before  # the same bytes in the same files
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, twin.name])
    if what == "plan":
        assert velcro.Plan.load(path).saving_ratio == pytest.approx(old.saving_ratio)
    else:
        velcro.load_trimmed(path)  # loads: JSON and tensors of one save


def test_a_failed_rename_of_new_files_leaves_nothing(tmp_path, monkeypatch):
    _, plan = made_plan(0.5)
    failing_second_rename(monkeypatch)
    with pytest.raises(VelcroError):
        plan.save(tmp_path / "new.plan.json")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []

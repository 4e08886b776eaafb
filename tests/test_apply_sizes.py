"""Images of another size than the plan's calibration images: one VelcroError naming both sizes
and the fix, from the applied model and from the search's evaluator (not torch's broadcast
RuntimeError from deep inside the graph)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import velcro
from velcro.errors import VelcroError


def model_and_stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    images = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    stats = velcro.calibrate(model, [images[:6], images[6:]], progress=False)
    return model, stats


def batches(size: int):
    generator = torch.Generator().manual_seed(2)
    return [(torch.randn(4, 3, size, size, generator=generator),
             torch.tensor([0, 1, 2, 0])) for _ in range(2)]


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_evaluating_an_applied_plan_on_other_sizes_names_them(granularity):
    model, stats = model_and_stats()
    plan = velcro.plan(stats, 0.5, granularity=granularity)
    compressed = velcro.apply(model, plan)
    velcro.evaluate(compressed, batches(16), progress=False)  # the calibration size works
    with pytest.raises(VelcroError) as info:
        velcro.evaluate(compressed, batches(32), progress=False)
    message = str(info.value)
    assert "6x32x32" in message and "6x16x16" in message and "site '" in message
    assert "preprocess" in message and "loader_for" in message
    assert len(message.splitlines()) == 1


def test_the_search_on_other_sizes_names_them():
    model, stats = model_and_stats()
    with pytest.raises(VelcroError) as info:
        velcro.search(model, stats, batches(32), budget=3, progress=False)
    message = str(info.value)
    assert "6x32x32" in message and "6x16x16" in message

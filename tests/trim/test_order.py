"""Residual sums of a trimmed model: one channel order per residual stream
(``velcro.trim._order``) makes the identity shortcuts move their channels in runs (slice
additions, not gathers), exported they hold no ``Gather``/``Pad``/``Slice`` (a 1x1 ``Conv``
places the shortcut's channels), and the trimmed model still computes what ``velcro.apply``
computes (onnxruntime agrees too)."""

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn as nn
from zoo import images, randomize_batchnorm

import velcro
from velcro.errors import VelcroWarning
from velcro.plan import Plan, SitePlan
from velcro.trim import _build
from velcro.trim._modules import ChannelSelect, ChannelSum
from velcro.trim._place import run_of

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


class Stream(nn.Module):
    """A stem and two identity-shortcut blocks over one 8-channel residual stream."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_act = nn.ReLU()
        self.inner = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1) for _ in range(2)])
        self.inner_act = nn.ModuleList([nn.ReLU() for _ in range(2)])
        self.outer = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1) for _ in range(2)])
        self.outer_act = nn.ModuleList([nn.ReLU() for _ in range(2)])
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem_act(self.stem(x))
        for i in range(2):
            x = self.outer_act[i](self.outer[i](self.inner_act[i](self.inner[i](x))) + x)
        return self.head(x.mean((2, 3)))


def channel_plan(model, shape, chosen, seed=0):
    """A channel plan making ``chosen[site]`` constant (their calibrated means)."""
    stats = velcro.calibrate(model, images(shape, 8, seed=seed), progress=False)
    assert set(chosen) <= set(stats.sites), sorted(stats.sites)
    sites = {}
    for name, site in stats.sites.items():
        units = torch.tensor(sorted(chosen.get(name, [])), dtype=torch.int64)
        constant = site.mean.float().clone()
        sites[name] = SitePlan(units.numel() / site.mean.shape[0], units, constant,
                               tuple(site.mean.shape), site.channel_axis)
    return Plan("channel", sites, stats.structure, stats.weights)


def trimmed(model, plan, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VelcroWarning)
        return velcro.trim(model, plan, channel_multiple=kwargs.pop("channel_multiple", 1),
                           **kwargs)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def onnx_ops(small, path, x):
    """Operator counts of the exported model; onnxruntime agrees with PyTorch on ``x``."""
    path = velcro.export_onnx(small, path, x[:1])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = small(x).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def scattered_placements(small):
    """Channel placements of the trimmed graph that are not one run (gathers)."""
    count = 0
    for module in small.modules():
        if isinstance(module, ChannelSum):
            for i in range(len(module.signs) - 1):
                count += run_of(getattr(module, f"source_{i}")) is None
                count += run_of(getattr(module, f"target_{i}")) is None
        elif isinstance(module, ChannelSelect):
            count += module.run is None
    return count


@pytest.fixture
def unordered(monkeypatch):
    """Trimming as before streams were ordered (the channels of each tensor by id)."""
    monkeypatch.setattr(_build, "stream_orders", lambda gm, analysis: {})


PLACEMENT_OPS = ("Gather", "GatherElements", "Pad", "Slice", "ScatterND", "ScatterElements")

# the shortcut sums share channels {0, 3, 6, 7} (stem vs block 0) and {0, 3, 4, 7}: both
# scattered among the channels each side stores when those are laid out by id
STREAM_PLAN = {"stem_act": [1, 4], "outer_act.0": [2, 5], "outer_act.1": [1, 6],
               "inner_act.0": [3], "inner_act.1": [0, 7]}


@pytest.mark.parametrize("multiple", [1, 8])
def test_stream_shortcuts_move_runs_and_trim_equals_apply(tmp_path, multiple):
    torch.manual_seed(0)
    model = Stream().eval()
    plan = channel_plan(model, (3, 8, 8), STREAM_PLAN)
    small = trimmed(model, plan, channel_multiple=multiple)
    x = images((3, 8, 8), 6, seed=3)[0]
    with torch.no_grad():
        assert rel(small(x), velcro.apply(model, plan)(x)) <= 1e-5
    assert scattered_placements(small) == 0
    ops = onnx_ops(small, tmp_path / "small.onnx", x)
    assert not any(ops[op] for op in PLACEMENT_OPS), ops
    # the two shortcuts: one 1x1 convolution each beside the model's 5 convolutions
    assert ops["Conv"] == 5 + 2, ops


def test_without_the_stream_order_the_same_plan_gathers(unordered):
    """What the ordering removes: the same trim with channels laid out by id gathers (an
    ``index_select`` and an ``index_add_`` when run eagerly)."""
    torch.manual_seed(0)
    model = Stream().eval()
    plan = channel_plan(model, (3, 8, 8), STREAM_PLAN)
    small = trimmed(model, plan)
    x = images((3, 8, 8), 6, seed=3)[0]
    with torch.no_grad():
        assert rel(small(x), velcro.apply(model, plan)(x)) <= 1e-5
    assert scattered_placements(small) > 0


def cifar_resnet20(weights):
    if weights == "random":
        torch.manual_seed(0)
        return randomize_batchnorm(velcro.models.create("cifar_resnet20")).eval()
    path = DATA / "cifar10" / "resnet20.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the CIFAR-10 weights of ../shared/data)")
    return velcro.models.create("cifar_resnet20", weights=path).eval()


@pytest.mark.parametrize("weights", ["random", "cifar10"])
def test_cifar_resnet20_shortcuts_export_without_placements(tmp_path, weights, monkeypatch):
    """Three stages of 3 identity shortcuts (and option-A channel pads) in one stream: the
    export adds no placement operator to the original's; an order making every placement a
    run need not exist, and the one chosen gathers less than laying channels out by id."""
    model = cifar_resnet20(weights)
    stats = velcro.calibrate(model, images((3, 32, 32), 8), progress=False)
    plan = velcro.plan(stats, 0.3, granularity="channel")
    x = images((3, 32, 32), 4, seed=5)[0]
    small = trimmed(model, plan, channel_multiple=8)
    with torch.no_grad():
        assert rel(small(x), velcro.apply(model, plan)(x)) <= 1e-5
    path = velcro.export_onnx(model, tmp_path / "original.onnx", x[:1])
    original = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    added = onnx_ops(small, tmp_path / "small.onnx", x) - original
    assert not any(added[op] for op in PLACEMENT_OPS), added
    assert set(added) <= {"Add", "Conv"}, added  # bias maps; placements
    assert added["Conv"] <= 9  # at most one per residual sum
    monkeypatch.setattr(_build, "stream_orders", lambda gm, analysis: {})
    by_id = trimmed(model, plan, channel_multiple=8)
    assert scattered_placements(small) < scattered_placements(by_id)

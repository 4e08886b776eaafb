"""Trimming the patterns of models nobody here wrote (issue 17), each on a small hand-built
module (tests/patterns.py): the trimmed model computes what ``velcro.apply`` computes (the
reference semantics), an empty plan gives back the original model, and the producers lose
the filters the plan makes constant."""

import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from patterns import (
    PATTERNS,
    BatchNormAct,
    ConvSame,
    ScaledConv,
    ScaledStdConv,
    ShiftedReLU,
    build_pattern,
)
from zoo import TOPOLOGIES, build, images

import velcro
from velcro.errors import VelcroWarning


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def quiet_trim(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VelcroWarning)
        return velcro.trim(*args, **kwargs)


def calibrated(name):
    model, shape = build_pattern(name)
    stats = velcro.calibrate(model, images(shape, 16), progress=False)
    return model, shape, stats


def module_types(small):
    return {type(m).__name__ for m in small.modules()}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_empty_plan_gives_back_the_model(name):
    model, shape, stats = calibrated(name)
    small = quiet_trim(model, velcro.plan(stats, 0.0, granularity="channel"))
    x = images(shape, 3, seed=4)[0]
    with torch.no_grad():
        assert rel(small(x), model(x)) < 1e-5


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_empty_plan_gives_back_every_zoo_model(name):
    model, shape = build(name)
    stats = velcro.calibrate(model, images(shape, 8), progress=False)
    for multiple in (1, 8):  # rounding up adds zero filters only
        small = quiet_trim(model, velcro.plan(stats, 0.0, granularity="channel"),
                           channel_multiple=multiple)
        x = images(shape, 3, seed=4)[0]
        with torch.no_grad():
            assert rel(small(x), model(x)) < 1e-5


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("threshold", [0.3, 0.6])
def test_trim_computes_what_apply_computes(name, threshold):
    model, shape, stats = calibrated(name)
    plan = velcro.plan(stats, threshold, granularity="channel")
    small = quiet_trim(model, plan, channel_multiple=1)
    x = images(shape, 3, seed=4)[0]
    with torch.no_grad():
        applied, got = velcro.apply(model, plan)(x), small(x)
        assert rel(got, applied) < 1e-4
        assert rel(model(x), applied) > 1e-4  # the plan changes the output: a real check
    assert velcro.cost(small, x[:1]).macs < velcro.cost(model, x[:1]).macs


def planned_filters_removed(name, threshold=0.5):
    """{site: (planned, removed)} from the trim report, and the trimmed model."""
    model, _, stats = calibrated(name)
    small = quiet_trim(model, velcro.plan(stats, threshold, granularity="channel"),
                       channel_multiple=1)
    return small, {site: (entry["planned"], entry["removed"], entry["reason"])
                   for site, entry in small.velcro_trim_report.items()}


def test_fused_batchnorm_activation_tf_padding_and_std_conv_are_trimmed():
    small, report = planned_filters_removed("timm_blocks")
    assert report and all(removed == planned for planned, removed, _ in report.values())
    assert "Materialize" not in module_types(small)
    # the functional layers became ordinary modules, the batch-norms folded into them
    assert "BatchNorm2d" not in module_types(small)
    assert not any(isinstance(m, (BatchNormAct, ConvSame, ScaledStdConv))
                   for m in small.modules())
    model, _ = build_pattern("timm_blocks")
    assert small.stem.out_channels < model.stem.out_channels
    assert small.std.out_channels < model.std.out_channels


def test_grouped_convolution_is_trimmed_by_group():
    small, report = planned_filters_removed("grouped")
    assert all(removed == planned for planned, removed, _ in report.values())
    model, _ = build_pattern("grouped")
    assert small.conv1.out_channels < model.conv1.out_channels
    assert small.conv2.out_channels < model.conv2.out_channels
    # each kept group reads as many inputs as it has filters' worth of columns
    assert small.conv2.in_channels == small.conv2.weight.shape[1] * small.conv2.groups
    assert "ChannelSelect" not in module_types(small)  # conv1 computes the group order


def test_pre_activation_sites_and_why_their_producers_stay():
    gm = velcro.trace(build_pattern("pre_activation")[0])
    assert [s.producer for s in velcro.find_sites(gm)] == ["stem", "conv1"]
    _, report = planned_filters_removed("pre_activation")
    planned, removed, reason = report["relu:0"]  # after the group-norm: it reads them all
    assert removed == 0 and "GroupNorm" in reason and "mixes" in reason
    planned, removed, reason = report["relu:1"]  # after a batch-norm: trimmed
    assert removed == planned and reason is None


def test_shape_reads_and_asserts_demand_no_channel():
    small, report = planned_filters_removed("shape_reads")
    assert all(removed == planned for planned, removed, _ in report.values())
    assert "Materialize" not in module_types(small)


def test_channel_pads_are_placements_and_spatial_pads_channelwise():
    small, report = planned_filters_removed("pad_shortcut")
    assert all(removed == planned for planned, removed, _ in report.values())
    assert "Materialize" not in module_types(small)
    model, _ = build_pattern("pad_shortcut")
    assert small.conv3.in_channels < model.conv3.in_channels


def test_a_depthwise_producer_computes_only_the_filters_something_reads():
    small, report = planned_filters_removed("ghost")
    model, _ = build_pattern("ghost")
    assert all(removed == planned for planned, removed, _ in report.values())
    assert small.cheap.out_channels < model.cheap.out_channels


def test_linear_batchnorm_through_reshapes_is_folded():
    small, report = planned_filters_removed("linear_norm")
    assert all(removed == planned for planned, removed, _ in report.values())
    assert "BatchNorm1d" not in module_types(small)


def test_a_parameter_read_beside_its_trimmed_module_stays_the_original():
    model, shape, stats = calibrated("shared_weight")
    plan = velcro.plan(stats, 0.5, granularity="channel")
    small = quiet_trim(model, plan, channel_multiple=1)
    assert small.conv.out_channels < 8  # trimmed, while the model reads conv.weight whole
    x = images(shape, 2, seed=1)[0]
    with torch.no_grad():
        assert rel(small(x), velcro.apply(model, plan)(x)) < 1e-5


class KeepLeaves(fx.Tracer):
    """A tracer that keeps module subclasses whole, as timm's own tracer does."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, (ScaledConv, BatchNormAct, ShiftedReLU, ConvSame)) or (
            super().is_leaf_module(m, qualname))


def test_module_subclasses_are_never_taken_for_their_base_class():
    model, shape, stats = calibrated("subclasses")
    x = images(shape, 2, seed=1)[0]
    pretraced = fx.GraphModule(model, KeepLeaves().trace(model))
    for given in (model, pretraced):
        stats = velcro.calibrate(given, images(shape, 16), progress=False)
        small = quiet_trim(given, velcro.plan(stats, 0.0, granularity="channel"))
        with torch.no_grad():
            assert rel(small(x), model(x)) < 1e-5
        plan = velcro.plan(stats, 0.5, granularity="channel")
        with torch.no_grad():
            assert rel(quiet_trim(given, plan)(x), velcro.apply(given, plan)(x)) < 1e-4
    # the pre-traced leaves were traced into: their inner activation is a site
    assert "bnact.act" in {s.name for s in velcro.find_sites(velcro.trace(pretraced))}


class Untraceable(nn.Conv2d):
    """A subclass no tracer follows (control flow on values): kept whole."""

    def forward(self, x):
        out = super().forward(x)
        if out.mean() > 100:  # never true here; torch.fx cannot know
            return out * 0
        return out * 2.0


def test_a_subclass_nothing_can_trace_is_kept_whole():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.odd = Untraceable(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.odd(torch.relu(self.conv1(x)))).mean((2, 3)))

    class Leaves(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, Untraceable) or super().is_leaf_module(m, qualname)

    torch.manual_seed(0)
    model = Net().eval()
    gm = fx.GraphModule(model, Leaves().trace(model))
    stats = velcro.calibrate(gm, images((3, 6, 6), 16), progress=False)
    x = images((3, 6, 6), 2, seed=3)[0]
    with torch.no_grad():
        small = quiet_trim(gm, velcro.plan(stats, 0.0, granularity="channel"))
        assert rel(small(x), model(x)) < 1e-5
        plan = velcro.plan(stats, 0.5, granularity="channel")
        assert rel(quiet_trim(gm, plan)(x), velcro.apply(gm, plan)(x)) < 1e-4
    assert isinstance(small.odd, Untraceable)  # computed as it was


def test_the_report_says_why_a_producer_keeps_filters_and_warns_once():
    class Reader(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            a = self.conv1(x)
            b = torch.relu(a)  # a site: its producer conv1 is also read by the cumsum
            c = torch.relu(self.conv2(b))
            return self.fc((c + a.cumsum(1)).mean((2, 3)))

    torch.manual_seed(0)
    model = Reader().eval()
    stats = velcro.calibrate(model, images((3, 6, 6), 16), progress=False)
    plan = velcro.plan(stats, 0.5, granularity="channel")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = velcro.trim(model, plan)
    messages = [str(w.message) for w in caught if issubclass(w.category, VelcroWarning)]
    assert len(messages) == 1 and "1 of 2 planned sites" in messages[0]
    entry = small.velcro_trim_report["relu:0"]
    assert entry["removed"] == 0 and "cumsum" in entry["reason"]
    assert small.velcro_trim_report["relu:1"]["reason"] is None
    assert "0x" not in messages[0]  # no memory address


def test_float64_default_dtype_trims_and_loads_float32_models(tmp_path):
    model, shape, stats = calibrated("grouped")
    plan = velcro.plan(stats, 0.4, granularity="channel")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        small = quiet_trim(model, plan)
        velcro.save_trimmed(small, tmp_path / "small.json")
        loaded = velcro.load_trimmed(tmp_path / "small.json")
        x = images(shape, 2, seed=2)[0].float()
        with torch.no_grad():
            assert loaded(x).dtype == torch.float32
            torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
            assert rel(small(x), velcro.apply(model, plan)(x)) < 1e-4
    finally:
        torch.set_default_dtype(previous)


def test_every_pattern_survives_save_and_load(tmp_path):
    """The operations these patterns leave in a trimmed graph (TF pads, asserts on shapes,
    shape getattr, narrow, interpolate, the capture check, channel placements) load back and
    compute bit for bit what was saved; a captured graph still refuses another size."""
    ops, modules = set(), set()
    for name in sorted(PATTERNS):
        model, shape, stats = calibrated(name)
        small = quiet_trim(model, velcro.plan(stats, 0.5, granularity="channel"),
                           channel_multiple=1)
        velcro.save_trimmed(small, tmp_path / f"{name}.json")
        loaded = velcro.load_trimmed(tmp_path / f"{name}.json")
        x = images(shape, 2, seed=5)[0]
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
        ops |= {getattr(n.target, "__name__", n.target) for n in loaded.graph.nodes
                if n.op in ("call_function", "call_method")}
        modules |= module_types(loaded)
        if name == "shape_reads":
            with pytest.raises(velcro.VelcroError, match="captured at input size"):
                loaded(images((3, 9, 9), 1)[0])
    assert ops >= {"pad", "_assert", "eq", "getattr", "narrow", "interpolate", "getitem"}
    assert modules >= {"CaptureCheck", "ZeroPad2d", "GroupNorm", "LeakyReLU", "ChannelSelect",
                       "ChannelSum", "Conv2dWithMap", "LinearWithMap"}

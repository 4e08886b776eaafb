"""``trim``'s ``channel_multiple``: "auto" rounds a trimmed convolution up to 8 filters only
where its timer says the rounded width is faster by the margin, the widths it chose are
recorded and rebuild the same architecture, and bad width dicts are refused.

The timers here are fakes (deterministic; no timing is asserted); one test runs the real one.
"""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo import build, images

import velcro
from velcro.errors import VelcroError, VelcroWarning
from velcro.trim import _widths


class Narrow(nn.Module):
    """Convolutions of 20 filters (30% constant: conv1 keeps 14, conv2 the 10 that the
    depthwise convolution's site reads; rounding to 16 is possible), a depthwise and a
    grouped convolution (never rounded); conv3 feeds the grouped convolution, which reads
    whole groups, so it keeps its 20."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 20, 3, padding=1)
        self.conv2 = nn.Conv2d(20, 20, 3, padding=1)
        self.depthwise = nn.Conv2d(20, 20, 3, padding=1, groups=20)
        self.conv3 = nn.Conv2d(20, 20, 1)
        self.grouped = nn.Conv2d(20, 20, 3, padding=1, groups=4)
        self.fc = nn.Linear(20, 4)

    def forward(self, x):
        a = F.relu(self.conv1(x))
        b = F.relu(self.conv2(a))
        c = F.relu(self.conv3(F.relu(self.depthwise(b))))
        d = F.relu(self.grouped(c))
        return self.fc(d.mean((2, 3)))


@pytest.fixture(scope="module")
def narrow():
    torch.manual_seed(0)
    model = Narrow().eval()
    stats = velcro.calibrate(model, images((3, 8, 8), 16), progress=False)
    plan = velcro.plan(stats, 0.3, granularity="channel")
    return model, plan, images((3, 8, 8), 4, seed=5)[0]


class FakeTimer:
    """Says the rounded width takes ``rounded_share`` of the exact one's time where
    ``faster(signature, widths)``, and the same time elsewhere; records its calls."""

    def __init__(self, faster=lambda signature, widths: True, rounded_share=0.5):
        self.faster, self.rounded_share, self.calls = faster, rounded_share, []

    def __call__(self, signature, widths):
        self.calls.append((signature, widths))
        return [1.0, self.rounded_share if self.faster(signature, widths) else 1.0]


@pytest.fixture
def timer(monkeypatch):
    def use(fake):
        monkeypatch.setattr(_widths, "measure", fake)
        monkeypatch.setattr(_widths, "_measured", {})
        return fake
    return use


def out_channels(small):
    return {name: small.get_submodule(name).out_channels for name in small.velcro_channel_widths}


def assert_trim_equals_apply(model, plan, small, x):
    with torch.no_grad():
        expected, got = velcro.apply(model, plan)(x), small(x)
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_auto_rounds_exactly_where_the_timer_says_rounded_is_faster(narrow, timer):
    model, plan, x = narrow
    exact = velcro.trim(model, plan, channel_multiple=1).velcro_channel_widths
    assert exact == {"conv1": 14, "conv2": 10}
    fake = timer(FakeTimer(lambda signature, widths: signature.in_channels == 3))
    small = velcro.trim(model, plan)  # the default is "auto"
    assert small.velcro_channel_widths == {"conv1": 16, "conv2": 10}
    assert out_channels(small) == small.velcro_channel_widths
    assert_trim_equals_apply(model, plan, small, x)
    # each convolution timed as it will run: conv2 reads conv1's 16 (padded) channels; the
    # depthwise and grouped convolutions are not rounded, so never timed
    seen = {(s.in_channels, s.input_size, s.kernel_size, s.batch, w) for s, w in fake.calls}
    assert seen == {(3, (8, 8), (3, 3), 1, (14, 16)), (16, (8, 8), (3, 3), 1, (10, 16))}
    assert all(s.device == "cpu" and s.dtype == torch.float32 for s, _ in fake.calls)
    # the opposite verdicts: rounded everywhere but conv1
    timer(FakeTimer(lambda signature, widths: signature.in_channels != 3))
    assert velcro.trim(model, plan).velcro_channel_widths == {"conv1": 14, "conv2": 16}


@pytest.mark.parametrize(("rounded_share", "width"),
                         [(0.96, (14, 10)), (0.95, (16, 16)), (0.6, (16, 16)),
                          (1.0, (14, 10)), (1.3, (14, 10))])
def test_the_rounded_width_must_win_by_the_margin(narrow, timer, rounded_share, width):
    model, plan, _ = narrow
    timer(FakeTimer(rounded_share=rounded_share))
    assert tuple(velcro.trim(model, plan).velcro_channel_widths.values()) == width


def test_measurements_are_cached_per_signature_and_the_batch_is_the_users(narrow, timer):
    model, plan, _ = narrow
    fake = timer(FakeTimer())
    velcro.trim(model, plan)
    assert len(fake.calls) == 2
    velcro.trim(model, plan)  # same convolutions: nothing timed again
    assert len(fake.calls) == 2
    velcro.trim(model, plan, auto_batch=4)  # another batch is another measurement
    assert len(fake.calls) == 4 and {s.batch for s, _ in fake.calls[2:]} == {4}
    for bad in (0, -1, 1.5, True, "8"):
        with pytest.raises(VelcroError, match="auto_batch"):
            velcro.trim(model, plan, auto_batch=bad)


def test_integer_multiples_keep_their_meaning_and_are_never_timed(narrow, timer):
    model, plan, x = narrow
    fake = timer(FakeTimer())
    for multiple, width in ((1, (14, 10)), (8, (16, 16)), (3, (15, 12)), (32, (20, 20))):
        small = velcro.trim(model, plan, channel_multiple=multiple)  # never above 20
        assert tuple(small.velcro_channel_widths.values()) == width
        assert out_channels(small) == small.velcro_channel_widths
        assert_trim_equals_apply(model, plan, small, x)
    assert fake.calls == []


@pytest.mark.parametrize("name", ["chain", "residual", "concat", "depthwise"])
def test_auto_with_mixed_verdicts_computes_what_apply_computes(name, timer):
    """Residual sums, concatenations and depthwise blocks fed by some rounded and some exact
    producers: odd counts rounded, even ones not."""
    model, shape = build(name)
    stats = velcro.calibrate(model, images(shape, 16), progress=False)
    x = images(shape, 4, seed=7)[0]
    timer(FakeTimer(lambda signature, widths: widths[0] % 2 == 1))
    verdicts = set()
    for threshold in (0.2, 0.45):
        plan = velcro.plan(stats, threshold, granularity="channel")
        small = velcro.trim(model, plan)
        assert_trim_equals_apply(model, plan, small, x)
        exact = velcro.trim(model, plan, channel_multiple=1).velcro_channel_widths
        for conv, width in small.velcro_channel_widths.items():
            count = exact[conv]
            rounded = min(-(-count // 8) * 8, model.get_submodule(conv).out_channels)
            assert width == (rounded if count % 2 else count), conv
            verdicts.add((width > count, count % 8 == 0))
    assert (True, False) in verdicts  # some rounded, ...
    assert (False, False) in verdicts  # ...some left unaligned


def test_widths_survive_save_and_load(narrow, timer, tmp_path):
    model, plan, x = narrow
    timer(FakeTimer(lambda signature, widths: signature.in_channels == 3))
    small = velcro.trim(model, plan)
    velcro.save_trimmed(small, tmp_path / "small.json")
    loaded = velcro.load_trimmed(tmp_path / "small.json")
    assert loaded.velcro_channel_widths == small.velcro_channel_widths == {
        "conv1": 16, "conv2": 10}
    assert json.loads((tmp_path / "small.json").read_text())["channel_widths"] == {
        "conv1": 16, "conv2": 10}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))


def test_the_recipe_rebuilds_the_same_architecture_from_the_widths(narrow, timer):
    model, plan, x = narrow
    timer(FakeTimer(lambda signature, widths: signature.in_channels == 3))
    small = velcro.trim(model, plan)
    with torch.no_grad():  # "fine-tuning": the trimmed weights change
        for parameter in small.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    state = small.state_dict()
    widths = json.loads(json.dumps(small.velcro_channel_widths))  # as kept in a file
    # the timer now says the opposite: without the widths, another architecture...
    timer(FakeTimer(lambda signature, widths: signature.in_channels != 3))
    with pytest.raises(RuntimeError, match="size mismatch"):
        velcro.trim(model, plan).load_state_dict(state)
    # ...with them, the same one, and the fine-tuned weights load into it
    rebuilt = velcro.trim(model, plan, channel_multiple=widths)
    assert rebuilt.velcro_channel_widths == widths
    rebuilt.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), small(x))


@pytest.mark.parametrize(("widths", "named"), [
    ({"conv1": 16}, "conv2"),  # a trimmed convolution missing
    ({"conv1": 16, "conv2": 10, "conv3": 20}, "conv3"),  # it keeps all its filters
    ({"conv1": 16, "conv2": 10, "fc": 4}, "fc"),  # not a trimmed convolution
    ({"conv1": 16, "conv2": 10, "grouped": 20}, "grouped"),
    ({"conv1": 16, "conv2": 10, "nothing": 8}, "nothing"),
    ({"conv1": 13, "conv2": 10}, "conv1"),  # below the 14 it keeps
    ({"conv1": 21, "conv2": 10}, "conv1"),  # above its 20 filters
    ({"conv1": 16.0, "conv2": 10}, "conv1"),
    ({"conv1": True, "conv2": 10}, "conv1"),
    ({"conv1": 0, "conv2": 10}, "conv1"),
    ({"conv1": "16", "conv2": 10}, "conv1"),
    ({3: 16}, "3"),
])
def test_widths_that_do_not_fit_the_plan_are_refused_naming_the_entry(narrow, widths, named):
    model, plan, _ = narrow
    with pytest.raises(VelcroError, match=f"'{named}'") as error:
        velcro.trim(model, plan, channel_multiple=widths)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("bad", [0, -8, 2.0, True, "Auto", "8", None, [8]])
def test_other_channel_multiples_are_refused(narrow, bad):
    model, plan, _ = narrow
    with pytest.raises(VelcroError, match="channel_multiple must be"):
        velcro.trim(model, plan, channel_multiple=bad)


@pytest.mark.parametrize(("value", "problem"), [
    ({"conv1": 15, "conv2": 10}, "channel_widths.conv1"),  # not its filters
    ({"conv1": 16, "conv2": 10, "fc": 4}, "channel_widths.fc"),  # not a convolution
    ({"conv1": 16, "nowhere.conv": 14}, "channel_widths.nowhere.conv"),
    ({"conv1": 16.0}, "channel_widths.conv1"),
    ([16], "channel_widths"),
])
def test_a_file_whose_widths_disagree_with_its_graph_is_refused(narrow, timer, tmp_path,
                                                                 value, problem):
    model, plan, _ = narrow
    timer(FakeTimer(lambda signature, widths: signature.in_channels == 3))
    path = tmp_path / "small.json"
    velcro.save_trimmed(velcro.trim(model, plan), path)
    document = json.loads(path.read_text())
    document["channel_widths"] = value
    path.write_text(json.dumps(document))
    with pytest.raises(VelcroError, match=problem.replace(".", r"\.")):
        velcro.load_trimmed(path)
    del document["channel_widths"]  # a file saved before widths were recorded
    path.write_text(json.dumps(document))
    assert velcro.load_trimmed(path).velcro_channel_widths == {}


def test_the_real_timer_runs_and_auto_with_it_stays_exact(narrow, monkeypatch):
    """No timing is asserted: only that the timer gives finite positive medians and that
    whatever it decides, trim computes what apply computes with a width it may choose."""
    model, plan, x = narrow
    monkeypatch.setattr(_widths, "measure", _widths.time_convolutions)
    monkeypatch.setattr(_widths, "_measured", {})
    monkeypatch.setattr(_widths, "BUDGET_S", 0.02)
    signature = _widths.ConvSignature("cpu", torch.float32, 2, 5, (6, 6), (3, 3), (1, 1),
                                      (1, 1), (1, 1), "zeros")
    medians = _widths.time_convolutions(signature, (5, 8))
    assert len(medians) == 2 and all(math.isfinite(m) and m > 0 for m in medians)
    small = velcro.trim(model, plan)
    assert small.velcro_channel_widths["conv1"] in (14, 16)
    assert small.velcro_channel_widths["conv2"] in (10, 16)
    assert len(_widths._measured) == 2
    assert_trim_equals_apply(model, plan, small, x)


def test_a_convolution_that_cannot_be_timed_keeps_its_exact_count(narrow, timer):
    model, plan, x = narrow

    def out_of_memory(signature, widths):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

    timer(out_of_memory)
    with pytest.warns(VelcroWarning, match="could not time .* out of memory"):
        small = velcro.trim(model, plan)
    assert small.velcro_channel_widths == {"conv1": 14, "conv2": 10}
    assert_trim_equals_apply(model, plan, small, x)


def test_numpy_integers_count_as_integers(narrow):
    np = pytest.importorskip("numpy")
    model, plan, _ = narrow
    assert velcro.trim(model, plan, channel_multiple=np.int64(8)).velcro_channel_widths == {
        "conv1": 16, "conv2": 16}
    widths = {"conv1": np.int32(16), "conv2": np.int64(10)}
    rebuilt = velcro.trim(model, plan, channel_multiple=widths).velcro_channel_widths
    assert rebuilt == {"conv1": 16, "conv2": 10}
    assert all(type(w) is int for w in rebuilt.values())  # plain JSON

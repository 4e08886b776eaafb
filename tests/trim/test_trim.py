import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from zoo import TOPOLOGIES, build, images, randomize_batchnorm

import velcro
from velcro.errors import VelcroError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine, spinning OpenMP threads of parallel
    test runs slow each other down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_thresholds(names, seed, high=0.8):
    gen = torch.Generator().manual_seed(seed)
    return {name: float(torch.rand(1, generator=gen)) * high for name in names}


def assert_same_outputs(reference, trimmed, x):
    with torch.no_grad():
        expected, got = reference(x), trimmed(x)
    scale = expected.abs().max().clamp_min(1e-6)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max() / scale) <= 1e-4


def assert_smaller(model, small, x):
    before, after = velcro.cost(model, x), velcro.cost(small, x)
    assert after.macs < before.macs
    assert after.parameters < before.parameters
    assert after.activations < before.activations


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
@pytest.mark.parametrize("constant", ["map", "scalar"])
def test_trimmed_zoo_models_compute_what_apply_computes(name, constant):
    model, shape = build(name)
    stats = velcro.calibrate(model, images(shape, 16), progress=False)
    x = images(shape, 8, seed=11)[0]
    for seed in range(3):
        plan = velcro.plan(stats, random_thresholds(stats.names, seed), granularity="channel",
                           constant=constant)
        small = velcro.trim(model, plan, channel_multiple=1)
        assert_same_outputs(velcro.apply(model, plan), small, x)
        assert_smaller(model, small, x)
        # filter counts padded to a multiple (zero filters) compute the same function
        assert_same_outputs(small, velcro.trim(model, plan, channel_multiple=3), x)
    with torch.no_grad():  # the plan does change the outputs: the comparison means something
        assert not torch.allclose(model(x), small(x), atol=1e-4)


@pytest.mark.parametrize("name", ["chain", "residual", "concat", "depthwise"])
def test_whole_sites_constant_and_everything_constant(name):
    model, shape = build(name)
    stats = velcro.calibrate(model, images(shape, 8), progress=False)
    x = images(shape, 4, seed=2)[0]
    one_site = {stats.names[1]: 1.0, stats.names[-1]: 0.5}
    for thresholds in (one_site, 1.0):
        plan = velcro.plan(stats, thresholds, granularity="channel")
        for multiple in (1, 8):
            trimmed = velcro.trim(model, plan, channel_multiple=multiple)
            assert_same_outputs(velcro.apply(model, plan), trimmed, x)
    everything = velcro.trim(model, velcro.plan(stats, 1.0, granularity="channel"))
    with torch.no_grad():  # every image gets the same output
        out = everything(x)
    torch.testing.assert_close(out, out[:1].expand_as(out))


class Unusual(nn.Module):
    """Operations trimming does not understand, fed by sites with constant channels."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        a = F.relu(self.conv1(x))
        b = F.relu(self.conv2(a))  # grouped (not depthwise) conv reads a
        c = torch.sigmoid(self.conv3(b)) * b  # product of two tensors
        d = c.transpose(2, 3) - 0.5 * a.transpose(2, 3)  # transposes, scalar arithmetic
        e = d.mean((2, 3))
        return self.fc(F.relu(e + 1.0))


def test_operations_trimming_does_not_understand_get_the_full_tensor():
    model = Unusual().eval()
    data = images((3, 6, 6), 16)
    stats = velcro.calibrate(model, data, progress=False)
    x = images((3, 6, 6), 4, seed=3)[0]
    for seed in range(3):
        plan = velcro.plan(stats, random_thresholds(stats.names, seed, high=1.0),
                           granularity="channel")
        trimmed = velcro.trim(model, plan, channel_multiple=1 + seed)
        assert_same_outputs(velcro.apply(model, plan), trimmed, x)


def big_model(name):
    """A built-in model with weights that keep activations near unit scale.

    (With torchvision's init and random batch-norm statistics, activations shrink to
    denormal floats, which CPUs compute a hundred times slower.)
    """
    kwargs = {"aux_logits": False} if name == "googlenet" else {}
    torch.manual_seed(0)
    model = randomize_batchnorm(velcro.models.create(name, num_classes=10, **kwargs))
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model.eval()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "googlenet"])
def test_builtin_models_trim_to_what_apply_computes(name):
    model = big_model(name)
    shape = (3, 48, 48)
    stats = velcro.calibrate(model, images(shape, 6), progress=False)
    x = images(shape, 2, seed=4)[0]
    before = velcro.cost(model, x[:1])
    plans = [
        velcro.plan(stats, random_thresholds(stats.names, 7), granularity="channel",
                    constant="map"),
        velcro.plan(stats, 0.3, granularity="channel", constant="scalar", score="relative"),
    ]
    for plan in plans:
        small = velcro.trim(model, plan)
        assert_same_outputs(velcro.apply(model, plan), small, x)
        after = velcro.cost(small, x[:1])
        assert after.macs < before.macs and after.parameters < before.parameters


def test_state_dict_reloads_into_the_rebuilt_recipe(tmp_path):
    model, shape = build("residual")
    stats = velcro.calibrate(model, images(shape, 16), progress=False)
    plan = velcro.plan(stats, 0.4, granularity="channel")
    small = velcro.trim(model, plan)
    plan.save(tmp_path / "plan.json")
    save_file(small.state_dict(), str(tmp_path / "small.safetensors"))

    rebuilt = velcro.trim(build("residual")[0], velcro.Plan.load(tmp_path / "plan.json"))
    rebuilt.load_state_dict(load_file(str(tmp_path / "small.safetensors")))
    x = images(shape, 4, seed=8)[0]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), small(x), rtol=0, atol=0)


def test_input_shape_is_inferred_or_given():
    model, shape = build("concat")
    stats = velcro.calibrate(model, images(shape, 8), progress=False)
    plan = velcro.plan(stats, 0.5, granularity="channel")
    assert velcro.trim(model, plan).velcro_input_shape == shape
    with pytest.raises(VelcroError, match="computes"):
        velcro.trim(model, plan, input_shape=(3, 12, 12))


def test_element_plans_and_plans_of_other_models_are_refused():
    model, shape = build("chain")
    stats = velcro.calibrate(model, images(shape, 4), progress=False)
    with pytest.raises(VelcroError, match="needs a channel plan"):
        velcro.trim(model, velcro.plan(stats, 0.3))
    with pytest.raises(VelcroError, match="another model"):
        velcro.trim(build("residual")[0], velcro.plan(stats, 0.3, granularity="channel"))


def test_the_original_model_is_untouched():
    model, shape = build("depthwise")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = velcro.calibrate(model, images(shape, 8), progress=False)
    velcro.trim(model, velcro.plan(stats, 0.5, granularity="channel"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert not model.training


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_save_and_load_without_pickle_or_the_original(tmp_path, name):
    model, shape = build(name)
    stats = velcro.calibrate(model, images(shape, 16), progress=False)
    plan = velcro.plan(stats, 0.4, granularity="channel")
    small = velcro.trim(model, plan, channel_multiple=1)
    velcro.save_trimmed(small, tmp_path / "small.json")
    loaded = velcro.load_trimmed(tmp_path / "small.json")
    x = images(shape, 4, seed=6)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
    assert loaded.velcro_sites == small.velcro_sites
    assert sum(p.numel() for p in loaded.parameters()) == sum(
        p.numel() for p in small.parameters())


def test_saved_channel_placement_and_resnet18_reload(tmp_path):
    model = Unusual().eval()
    stats = velcro.calibrate(model, images((3, 6, 6), 16), progress=False)
    plan = velcro.plan(stats, [0.5, 0.25], granularity="channel")
    resnet = big_model("resnet18")
    resnet_stats = velcro.calibrate(resnet, images((3, 32, 32), 4), progress=False)
    for small in (velcro.trim(model, plan, channel_multiple=1),
                  velcro.trim(resnet, velcro.plan(resnet_stats, 0.3, granularity="channel"))):
        velcro.save_trimmed(small, tmp_path / "small.json")
        loaded = velcro.load_trimmed(tmp_path / "small.json")
        shape = small.velcro_input_shape
        x = images(shape, 3, seed=6)[0]
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


class Custom(nn.Module):
    """Adds noise: random sampling is outside what a saved model may do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = F.relu(self.conv(x))
        return (y + torch.rand_like(y)).sum((2, 3))


def test_saving_refuses_what_it_cannot_describe_and_loading_refuses_strangers(tmp_path):
    model = Custom().eval()
    stats = velcro.calibrate(model, images((3, 6, 6), 8), progress=False)
    small = velcro.trim(model, velcro.plan(stats, 0.5, granularity="channel"))
    with pytest.raises(VelcroError, match="cannot save node .rand_like"):
        velcro.save_trimmed(small, tmp_path / "custom.json")
    assert not (tmp_path / "custom.json").exists()
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(VelcroError, match="not a velcro trimmed model"):
        velcro.load_trimmed(tmp_path / "other.json")
    chain, shape = build("chain")
    stats = velcro.calibrate(chain, images(shape, 8), progress=False)
    velcro.save_trimmed(velcro.trim(chain, velcro.plan(stats, 0.5, granularity="channel")),
                        tmp_path / "chain.json")
    text = (tmp_path / "chain.json").read_text()
    assert '"torch.nn.functional.relu"' in text
    (tmp_path / "chain.json").write_text(text.replace('"torch.nn.functional.relu"',
                                                      '"os.system"'))
    with pytest.raises(VelcroError, match="'os.system', not a function velcro allows"):
        velcro.load_trimmed(tmp_path / "chain.json")


class WidthwiseLinear(nn.Module):
    """A linear layer over a feature map's width, after a site on its channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.across = nn.Linear(5, 5)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.across(F.relu(self.conv(x)))))


def test_a_layer_contracting_another_axis_gets_the_full_tensor():
    model = WidthwiseLinear().eval()
    stats = velcro.calibrate(model, images((3, 5, 5), 16), progress=False)
    x = images((3, 5, 5), 4, seed=2)[0]
    for thresholds in (0.5, [0.5, 0.4]):
        plan = velcro.plan(stats, thresholds, granularity="channel")
        trimmed = velcro.trim(model, plan, channel_multiple=1)
        assert_same_outputs(velcro.apply(model, plan), trimmed, x)


class PoolAcrossFeatures(nn.Module):
    """Tokens through a linear layer, then pooling over its features (its channel axis)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x: (batch, tokens, 6)
        return self.head(F.max_pool1d(F.relu(self.fc(x)), 2))


def test_spatial_operations_over_the_channel_axis_get_the_full_tensor():
    model = PoolAcrossFeatures().eval()
    stats = velcro.calibrate(model, images((4, 6), 16), progress=False)
    x = images((4, 6), 4, seed=2)[0]
    plan = velcro.plan(stats, 0.5, granularity="channel")
    assert plan.sites["relu"].channel_axis == -1
    trimmed = velcro.trim(model, plan, input_shape=(4, 6), channel_multiple=1)
    assert_same_outputs(velcro.apply(model, plan), trimmed, x)

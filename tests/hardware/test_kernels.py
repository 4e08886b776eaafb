import pytest
import torch
import torch.nn as nn
from zoo import build, images, randomize_batchnorm

import velcro
from velcro.errors import VelcroError
from velcro.hardware.kernels import SkippingConv, conv_sites, layer_io
from velcro.plan import Plan, SitePlan

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def random_plan(model, batches, fraction, seed=0):
    """An element plan choosing a random `fraction` of every site, with random constants."""
    stats = velcro.calibrate(model, batches, progress=False)
    gen = torch.Generator().manual_seed(seed)
    sites = {}
    for name, site in stats.sites.items():
        shape = tuple(site.mean.shape)
        count = int(round(fraction * site.mean.numel()))
        units = torch.sort(torch.randperm(site.mean.numel(), generator=gen)[:count]).values
        values = torch.zeros(site.mean.numel())
        values[units] = torch.randn(count, generator=gen) * 2
        sites[name] = SitePlan(fraction, units, values.view(shape), shape, site.channel_axis)
    return Plan("element", sites, stats.structure, stats.weights)


LAYERS = {
    "plain": (dict(in_channels=6, out_channels=9, kernel_size=3, padding=1), nn.ReLU(), False),
    "bn-stride": (dict(in_channels=6, out_channels=10, kernel_size=3, stride=2, padding=1,
                       bias=False), nn.ReLU(), True),
    "groups-dilation": (dict(in_channels=8, out_channels=12, kernel_size=3, padding=2,
                             dilation=2, groups=4), nn.ReLU6(), True),
    "depthwise": (dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8),
                  nn.ReLU6(), True),
    "same-5x3": (dict(in_channels=5, out_channels=7, kernel_size=(5, 3), padding="same"),
                 nn.SiLU(), False),
    "valid-1x1": (dict(in_channels=6, out_channels=11, kernel_size=1, stride=(2, 1)),
                  nn.GELU(), True),
    "hardswish": (dict(in_channels=4, out_channels=9, kernel_size=2), nn.Hardswish(), True),
    "gelu-tanh": (dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
                  nn.GELU(approximate="tanh"), False),
    # 13 input channels: the padding pass's 8-channel blocks and its 5 leftover channels
    "13-channels": (dict(in_channels=13, out_channels=6, kernel_size=3, padding=1), nn.ReLU(),
                    False),
}


def layer_model(name):
    params, act, with_bn = LAYERS[name]
    torch.manual_seed(sorted(LAYERS).index(name))
    conv = nn.Conv2d(**params)
    parts = [conv] + ([nn.BatchNorm2d(conv.out_channels)] if with_bn else []) + [act]
    return randomize_batchnorm(nn.Sequential(*parts)).eval()


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("fraction", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_kernel_equals_apply_for_one_layer(name, fraction, backend):
    model = layer_model(name)
    x = torch.randn(3, model[0].in_channels, 11, 9, generator=torch.Generator().manual_seed(1))
    plan = random_plan(model, [x], fraction, seed=len(name))
    kernels = conv_sites(model, plan, backend=backend)
    assert list(kernels) == list(plan.sites)
    site = next(iter(kernels.values()))
    with torch.no_grad():
        expected = velcro.apply(model, plan)(x)
    torch.testing.assert_close(site.kernel(x), expected, **TOLERANCE)
    live = int((~plan.mask(next(iter(plan.sites)))).sum())
    assert site.kernel.live_outputs == live


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.93, 1.0])
def test_the_work_list_holds_exactly_the_live_outputs(fraction):
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(13, 7, 70, generator=gen) < fraction
    kernel = SkippingConv(nn.Conv2d(2, 13, 3, padding=1), mask, torch.zeros(mask.shape))
    # Rebuild the (image, channel, position) set from the kernel's CSR for a batch of 3.
    images = 3
    pointers, lane_images, lane_positions, tiles = kernel.work_list(images)
    seen = torch.zeros(images, *mask.shape, dtype=torch.int64).flatten(2)
    channels = mask.shape[0]
    for group in range(tiles * channels):
        channel = group % channels
        lanes = slice(int(pointers[group]), int(pointers[group + 1]))
        seen[lane_images[lanes].long(), channel, lane_positions[lanes].long()] += 1
    assert torch.equal(seen.view(images, *mask.shape), (~mask).long().expand(images, -1, -1, -1))
    assert kernel.saving_ratio == pytest.approx(mask.float().mean().item())


def test_compressed_outputs_are_the_constants_even_where_inputs_are_not_finite():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    mask = torch.zeros(4, 5, 5, dtype=torch.bool)
    mask[:, 1:4, 1:4] = True  # every output whose 3x3 window sees the centre pixel
    constant = torch.arange(100, dtype=torch.float32).view(4, 5, 5)
    x = torch.randn(2, 3, 5, 5)
    x[:, :, 2, 2] = float("nan")
    for backend in ("numba", "torch"):
        out = SkippingConv(conv, mask, constant, backend=backend)(x)
        assert torch.equal(out[:, mask], constant[mask].expand(2, -1))
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["chain", "residual", "concat", "depthwise"])
def test_every_conv_site_of_a_model_equals_apply(name):
    model, shape = build(name)
    plan = random_plan(model, images(shape, 8), 0.5, seed=2)
    kernels = conv_sites(model, plan)
    expected_sites = {
        "chain": {"act1", "act2", "act3"},  # "relu" follows a linear layer
        "residual": {"relu:0", "relu:1", "relu:2", "relu:3"},
        "concat": {f"relu:{i}" for i in range(7)},
        "depthwise": {"stem.2", "expand.2", "dw.2", "last.2"},
    }[name]
    assert set(kernels) == expected_sites
    recorded = layer_io(model, plan, images(shape, 4, seed=7)[0])
    for site, entry in kernels.items():
        io = recorded[site]
        torch.testing.assert_close(entry.kernel(io.input, io.residual), io.output, **TOLERANCE)
    if name == "residual":
        assert kernels["relu:2"].layer.residual is not None
        assert kernels["relu:1"].layer.residual is None


def test_resnet18_with_random_weights_at_32x32():
    model = velcro.models.resnet18(num_classes=10).eval()
    randomize_batchnorm(model, seed=4)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, 32, 32, generator=gen) for _ in range(2)]
    plan = random_plan(model, batches, 0.3, seed=5)
    kernels = conv_sites(model, plan)
    assert len(kernels) == 17 == len(plan.sites)
    recorded = layer_io(model, plan, batches[0])
    for site, entry in kernels.items():
        io = recorded[site]
        torch.testing.assert_close(entry.kernel(io.input, io.residual), io.output, **TOLERANCE)


def test_float64_inputs_take_the_torch_path_and_match_apply():
    model = layer_model("bn-stride").double()
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    plan = random_plan(model, [x], 0.4)
    site = next(iter(conv_sites(model, plan).values()))
    with torch.no_grad():
        expected = velcro.apply(model, plan)(x)
    out = site.kernel(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(VelcroError, match="float32"):
        SkippingConv(model[0], plan.mask("2"), plan.sites["2"].constant, backend="numba")(x)


def test_bad_inputs_raise_one_line_errors():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    mask = torch.zeros(4, 6, 6, dtype=torch.bool)
    with pytest.raises(VelcroError, match="output channels"):
        SkippingConv(conv, torch.zeros(5, 6, 6, dtype=torch.bool), torch.zeros(5, 6, 6))
    with pytest.raises(VelcroError, match="constant of shape"):
        SkippingConv(conv, mask, torch.zeros(4, 6, 5))
    with pytest.raises(VelcroError, match="activation 'tanh'"):
        SkippingConv(conv, mask, torch.zeros(4, 6, 6), activation="tanh")
    kernel = SkippingConv(conv, mask, torch.zeros(4, 6, 6))
    with pytest.raises(VelcroError, match="does not fit"):
        kernel(torch.randn(1, 3, 7, 6))
    with pytest.raises(VelcroError, match="residual"):
        kernel(torch.randn(1, 3, 6, 6), torch.zeros(1, 4, 6, 5))


def test_with_mask_reuses_the_layer_and_skip_conv2d_is_one_call():
    model = layer_model("bn-stride")
    x = torch.randn(2, 6, 9, 9)
    plan = random_plan(model, [x], 0.6, seed=3)
    kernel = conv_sites(model, plan)["2"].kernel
    everything = kernel.with_mask(torch.zeros_like(kernel.mask))
    assert everything.saving_ratio == 0.0 and kernel.saving_ratio == pytest.approx(0.6, abs=0.01)
    with torch.no_grad():
        torch.testing.assert_close(everything(x), model(x), **TOLERANCE)
        expected = velcro.apply(model, plan)(x)
    once = velcro.hardware.kernels.skip_conv2d(x, model[0], plan.mask("2"),
                                               plan.sites["2"].constant, bn=model[1])
    torch.testing.assert_close(once, expected, **TOLERANCE)

"""The static forms of the trimming helpers (what exporters see) against plain references."""

import random

import numpy as np
import pytest
import torch
from zoo import Misaligned, images

import velcro
from velcro.trim._modules import ChannelSelect, ChannelSum, Materialize
from velcro.trim._place import conv_placeable, is_identity_placement, place, place_by_conv


def reference_place(x: np.ndarray, where: list[int]) -> np.ndarray:
    """Channel o of the result is x's channel where[o], zeros where it is -1 (a loop)."""
    out = np.zeros((x.shape[0], len(where), *x.shape[2:]), dtype=x.dtype)
    for o, source in enumerate(where):
        if source >= 0:
            out[:, o] = x[:, source]
    return out


WHERES = {  # (x's channels, where): one of each static form, and its corner cases
    "identity": (5, [0, 1, 2, 3, 4]),
    "pad after": (3, [0, 1, 2, -1, -1]),
    "pad before": (3, [-1, -1, 0, 1, 2]),
    "crop both ends": (6, [1, 2, 3]),
    "crop and pad": (6, [-1, 3, 4, 5]),
    "slice then pad": (6, [-1, 2, 3, -1]),
    "gather": (4, [3, 0, 2, 2]),
    "gather then pad": (5, [-1, 4, 0, -1]),
    "zero channel then gather": (4, [2, -1, 0, -1, 3]),
}


@pytest.mark.parametrize("form", sorted(WHERES))
def test_each_static_form_places_the_channels(form):
    count, where = WHERES[form]
    x = torch.randn(2, count, 3, 2)
    got = place(x, 1, where)
    np.testing.assert_array_equal(got.numpy(), reference_place(x.numpy(), where))


@pytest.mark.parametrize("form", sorted(WHERES))
@pytest.mark.parametrize("spatial", [(5,), (3, 2), (2, 2, 3)])
def test_the_convolution_form_places_the_channels_exactly(form, spatial):
    """The form residual sums export as (one 1x1 ``Conv``): bit for bit the placement."""
    count, where = WHERES[form]
    x = torch.randn(2, count, *spatial)
    assert conv_placeable(x, 1) and not conv_placeable(x, -1)
    got = place_by_conv(x, 1, where)
    np.testing.assert_array_equal(got.numpy(), reference_place(x.numpy(), where))
    assert is_identity_placement(where, count) == (form == "identity")


def test_random_placements_on_other_axes():
    rng = random.Random(0)
    for _ in range(200):
        count, size = rng.randint(1, 7), rng.randint(1, 7)
        where = [rng.choice([-1, *range(count)]) for _ in range(size)]
        x = torch.randn(2, 3, count)  # channels last, as a linear layer's features
        got = place(x, 2, where).movedim(2, 1).numpy()
        np.testing.assert_array_equal(got, reference_place(x.movedim(2, 1).numpy(), where))


def test_channel_sum_static_form_equals_its_eager_form():
    rng = random.Random(1)
    for _ in range(50):
        size = rng.randint(2, 9)
        count = rng.randint(1, 9)
        targets = sorted(rng.sample(range(size), rng.randint(1, min(size, count))))
        sources = rng.sample(range(count), len(targets))
        sign = rng.choice([1, -1])
        module = ChannelSum([1, sign], [torch.tensor(sources)], [torch.tensor(targets)], 1,
                            inplace=False)
        base, x = torch.randn(3, size, 2, 2), torch.randn(3, count, 2, 2)
        expected = base.clone()
        for t, s in zip(targets, sources, strict=True):
            expected[:, t] += sign * x[:, s]
        torch.testing.assert_close(module(base, x), expected)  # eager: in-place slices
        torch.testing.assert_close(module._static(base, (x,)), expected)


def test_materialize_places_computed_channels_among_the_constants():
    constant = torch.randn(1, 3, 2, 2)
    # x holds channels 4, 0 and a padding position; channels 1, 2, 3 are constant
    order = torch.tensor([1, 3, 4, 5, 0])  # position of each channel in cat([x, constant])
    module = Materialize(constant, order, 1, computed=True)
    x = torch.randn(2, 3, 2, 2)
    expected = torch.cat([x, constant.expand(2, -1, -1, -1)], 1).index_select(1, order)
    torch.testing.assert_close(module(x), expected, rtol=0, atol=0)
    selected = ChannelSelect(torch.tensor([2, 3, 4]), 1)
    assert selected.run == (2, 3)
    y = torch.randn(2, 6, 1, 1)
    out = selected(y)
    torch.testing.assert_close(out, y[:, 2:5])
    assert out.data_ptr() != y.data_ptr()  # a copy: a sum may add into it


def test_a_loaded_trimmed_model_finds_its_static_forms_again(tmp_path):
    model = Misaligned().eval()
    shape = (3, 6, 6)
    stats = velcro.calibrate(model, images(shape, 16), progress=False)
    plan = velcro.plan(stats, [0.5, 0.25, 0.5], granularity="channel")
    small = velcro.trim(model, plan, channel_multiple=1)
    velcro.save_trimmed(small, tmp_path / "small.json")
    loaded = velcro.load_trimmed(tmp_path / "small.json")
    x = images(shape, 3, seed=5)[0]
    helpers = [m for m in loaded.modules() if isinstance(m, (ChannelSum, Materialize))]
    assert {type(m) for m in helpers} == {ChannelSum, Materialize}
    for module in helpers:  # what the loader built on the meta device is found again
        if isinstance(module, Materialize):
            assert module.where is not None and module.filled is not None
            assert not module.filled.is_meta
        else:
            assert all(pairs is not None for pairs in module.pairs)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))
        for module in loaded.modules():
            if isinstance(module, ChannelSum):
                seen = {}

                def before(m, args, seen=seen):  # copied first: the sum may add in place
                    seen["in"] = [a.clone() for a in args]

                def after(m, args, out, seen=seen):
                    seen["out"] = out.clone()

                hooks = [module.register_forward_pre_hook(before),
                         module.register_forward_hook(after)]
                loaded(x)
                for hook in hooks:
                    hook.remove()
                base, *others = seen["in"]
                torch.testing.assert_close(module._static(base, tuple(others)), seen["out"])

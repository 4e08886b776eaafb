"""trim on affine plans: the predictions folded into consumers equal velcro.apply's."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_trim import assert_same_outputs, big_model, random_thresholds
from zoo import TOPOLOGIES, build

import velcro


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def correlated_images(shape, count, seed=0, batch=8):
    """Images whose channels share one pattern: the sites' channels are then correlated,
    the fitted coefficients large, and a wrong fold visible."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(count, 1, *shape[1:], generator=gen)
    data = common.expand(count, *shape) + 0.3 * torch.randn(count, *shape, generator=gen)
    return [data[i : i + batch] for i in range(0, count, batch)]


def affine_plan(stats, thresholds, ridge=0.05, score="variance"):
    plan = velcro.plan(stats, thresholds, granularity="channel", constant="affine",
                       ridge=ridge, score=score)
    assert any(s.coefficients is not None for s in plan.sites.values())
    return plan


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_trimmed_zoo_models_compute_what_apply_computes(name):
    model, shape = build(name)
    stats = velcro.calibrate(model, correlated_images(shape, 24), progress=False,
                             covariance=True)
    x = correlated_images(shape, 8, seed=11)[0]
    for seed in range(3):
        thresholds = random_thresholds(stats.names, seed, high=1.0 if seed == 2 else 0.8)
        plan = affine_plan(stats, thresholds, score="residual" if seed else "variance")
        reference = velcro.apply(model, plan)
        for multiple in (1, 8):
            assert_same_outputs(reference, velcro.trim(model, plan, channel_multiple=multiple),
                                x)
        mean = velcro.apply(model, velcro.plan(stats, thresholds, granularity="channel",
                                               score=plan.score, ridge=0.05))
        with torch.no_grad():  # the prediction changes the outputs 10x beyond the tolerance
            expected = reference(x)
            assert float((expected - mean(x)).abs().max()) > 1e-3 * float(expected.abs().max())


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "googlenet"])
def test_builtin_models_trim_to_what_apply_computes(name):
    model = big_model(name)
    shape = (3, 48, 48)
    stats = velcro.calibrate(model, correlated_images(shape, 6, batch=3), progress=False,
                             covariance=True)
    x = correlated_images(shape, 2, seed=4)[0]
    plan = affine_plan(stats, random_thresholds(stats.names, 7), ridge=0.1)
    small = velcro.trim(model, plan)
    reference = velcro.apply(model, plan)
    assert_same_outputs(reference, small, x)
    mean = velcro.apply(model, velcro.plan(stats, random_thresholds(stats.names, 7),
                                           granularity="channel"))
    with torch.no_grad():
        expected = reference(x)
        assert float((expected - mean(x)).abs().max()) > 1e-3 * float(expected.abs().max())
    assert velcro.cost(small, x[:1]).macs < velcro.cost(model, x[:1]).macs


class Borders(nn.Module):
    """A site read by convolutions whose zero padding cuts the kernel at the borders (3x3
    padding 1, 5x5 padding 2, stride 2), a linear consumer over flattened maps, and one
    read by a sum, a max-pool and a concatenation (explicit predictions)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.a = nn.Conv2d(6, 5, 3, padding=1)
        self.b = nn.Conv2d(6, 4, 5, padding=2, stride=2)
        self.c = nn.Conv2d(6, 6, 1)
        self.head = nn.Conv2d(15, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 7 * 7, 3)

    def forward(self, x):
        s = F.relu(self.stem(x))
        y = F.relu(self.a(s)) + 0.0 * F.relu(self.c(s))[:, :5]
        z = torch.cat([y, F.max_pool2d(s, 3, 1, 1)[:, :4], s + self.c(s)], 1)
        z = F.relu(self.head(z))
        return self.fc(z.flatten(1)) + self.b(s).mean((2, 3))[:, :3]


def test_borders_and_every_kind_of_consumer():
    torch.manual_seed(0)
    model = Borders().eval()
    shape = (3, 7, 7)
    # channels correlated: a low-rank input makes the prediction matter
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 1, 7, 7, generator=gen).expand(8, 3, 7, 7)
            + 0.1 * torch.randn(8, 3, 7, 7, generator=gen) for _ in range(4)]
    stats = velcro.calibrate(model, data, progress=False, covariance=True)
    x = torch.randn(5, *shape, generator=gen)
    for thresholds in ({"relu:0": 0.5}, {"relu:0": 0.84, "relu:3": 0.5}, 0.5):
        plan = affine_plan(stats, thresholds, ridge=0.0)
        reference = velcro.apply(model, plan)
        for multiple in (1, 4):
            small = velcro.trim(model, plan, channel_multiple=multiple)
            assert_same_outputs(reference, small, x)
    with torch.no_grad():
        assert not torch.allclose(reference(x), velcro.apply(model, velcro.plan(
            stats, 0.5, granularity="channel"))(x), atol=1e-4)


def test_saved_trimmed_affine_models_reload(tmp_path):
    model, shape = build("residual")
    stats = velcro.calibrate(model, correlated_images(shape, 16), progress=False,
                             covariance=True)
    small = velcro.trim(model, affine_plan(stats, 0.5))
    velcro.save_trimmed(small, tmp_path / "small.json")
    loaded = velcro.load_trimmed(tmp_path / "small.json")
    x = correlated_images(shape, 4, seed=8)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["residual", "mlp"])
def test_affine_models_export_to_onnx(tmp_path, name):
    import onnxruntime

    model, shape = build(name)
    stats = velcro.calibrate(model, correlated_images(shape, 16), progress=False,
                             covariance=True)
    plan = affine_plan(stats, 0.5)
    x = correlated_images(shape, 4, seed=3)[0]
    for kind, module in (("apply", velcro.apply(model, plan)), ("trim", velcro.trim(model, plan))):
        path = velcro.export_onnx(module, tmp_path / f"{kind}.onnx", x[:1])
        session = onnxruntime.InferenceSession(str(path))
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            expected = module(x)
        assert float(abs(got - expected.numpy()).max()) <= 1e-4 * float(expected.abs().max())

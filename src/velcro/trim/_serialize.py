"""Saving a trimmed model without pickle: a JSON description of its graph + safetensors.

Only what can be rebuilt without running code from the file is described: modules from the
allow-list of :mod:`velcro.trim._allowlist` (rebuilt from their constructor arguments, and
checked here to rebuild identically), functions and methods from its allow-lists (named,
never imported by name from the file), and literal arguments. The JSON records the SHA-256 of
the tensor file, so that a JSON and tensors from different saves never load as one model.
Loading (:mod:`velcro.trim._deserialize`) validates every string and value before torch.fx
turns the graph into code, unlike ``torch.load`` of a pickled module or
``torch.export.load``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from velcro._validate import Fields, write_pair
from velcro.errors import VelcroError
from velcro.trim import _allowlist, _deserialize
from velcro.trim._deserialize import FORMAT

_REBUILD = "save the plan and rebuild with velcro.trim instead"


def encode(value: object, where: str) -> object:
    """The JSON form of a literal argument (see ``_deserialize.decode``)."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple):
        return {"tuple": [encode(v, where) for v in value]}
    if isinstance(value, list):
        return [encode(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: encode(v, where) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [encode(v, where) for v in (value.start, value.stop, value.step)]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if value is Ellipsis:
        return {"ellipsis": True}
    raise VelcroError(f"cannot save node '{where}': argument {_described(value)} has no safe "
                      f"description; {_REBUILD}")


def _described(value: object) -> str:
    """What a value is, in words a user can search for: a function by its qualified name
    (not ``repr``, which shows a memory address), anything else by a short repr."""
    if callable(value):
        module = getattr(value, "__module__", None) or ""
        name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
        if module.startswith("torch._C"):  # torch.zeros is torch._C._VariableFunctions
            module = "torch"
        if name:
            return f"{module}.{name}" if module else name
        return type(value).__name__
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _module_spec(name: str, module: nn.Module) -> dict:
    cls = type(module)
    if _allowlist.HELPERS.get(cls.__name__) is cls:
        return {"type": cls.__name__, "config": module.config()}
    if _allowlist.MODULES.get(cls.__name__) is not cls:
        raise VelcroError(f"cannot save module '{name}' ({cls.__name__}): only standard "
                          f"torch.nn layers and velcro's own modules have a safe description; "
                          f"{_REBUILD}")
    config = {}
    for param in _deserialize._constructor_parameters(cls).values():
        if param.name == "bias":
            config["bias"] = getattr(module, "bias", None) is not None
        elif hasattr(module, param.name):
            config[param.name] = encode(getattr(module, param.name), name)
    spec = {"type": cls.__name__, "config": config}
    if isinstance(getattr(module, "bias_map", None), torch.Tensor):
        spec["bias_map"] = list(module.bias_map.shape)
    return spec


def _plain_state(module: nn.Module) -> dict:
    """The public plain attributes a module's behaviour depends on."""
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and not isinstance(v, torch.Tensor)}


def _check_rebuilds(name: str, module: nn.Module, spec: dict, fields: Fields) -> None:
    """Refuse to save a module that its description would not rebuild identically."""
    cls = type(module).__name__
    try:
        rebuilt = _deserialize.build_module(name, json.loads(json.dumps(spec)), fields, name)
    except VelcroError as exc:
        raise VelcroError(f"cannot save module '{name}' ({cls}): it does not rebuild from its "
                          f"constructor arguments ({exc}); {_REBUILD}") from None
    mine = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    mine_plain, theirs_plain = _plain_state(module), _plain_state(rebuilt)
    differences = [] if cls in _allowlist.HELPERS else [  # helpers: state from their tensors
        k for k in mine_plain | theirs_plain if mine_plain.get(k) != theirs_plain.get(k)]
    if mine != theirs or differences or list(module.children()):
        what = f"attribute '{differences[0]}'" if differences else "its tensors or submodules"
        raise VelcroError(f"cannot save module '{name}' ({cls}): rebuilt from its constructor "
                          f"arguments it would differ ({what}); {_REBUILD}")


def _function_name(node: fx.Node) -> str:
    name = _allowlist.FUNCTION_NAMES.get(id(node.target))
    if name is None:
        raise VelcroError(f"cannot save node '{node.name}': function "
                          f"{_described(node.target)} has no safe description; {_REBUILD}")
    if node.target is getattr and (len(node.args) != 2
                                   or node.args[1] not in _allowlist.ATTRIBUTES):
        raise VelcroError(f"cannot save node '{node.name}': it reads attribute "
                          f"{node.args[1:]!r}, not one of {sorted(_allowlist.ATTRIBUTES)}; "
                          f"{_REBUILD}")
    return name


def _attribute(module: fx.GraphModule, node: fx.Node) -> dict:
    value: object = module
    for part in node.target.split("."):
        value = getattr(value, part)
    if not isinstance(value, torch.Tensor):
        raise VelcroError(f"cannot save node '{node.name}': attribute '{node.target}' is "
                          f"{type(value).__name__}, not a tensor; {_REBUILD}")
    return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}


def _describe(module: fx.GraphModule, fields: Fields) -> tuple[dict, dict, list]:
    called = {n.target for n in module.graph.nodes if n.op == "call_module"}
    modules, attributes, nodes = {}, {}, []
    for node in module.graph.nodes:
        entry: dict = {"name": node.name, "op": node.op, "target": node.target}
        if node.op == "call_module" and node.target not in modules:
            submodule = module.get_submodule(node.target)
            modules[node.target] = _module_spec(node.target, submodule)
            _check_rebuilds(node.target, submodule, modules[node.target], fields)
        elif node.op == "call_function":
            entry["target"] = _function_name(node)
        elif node.op == "call_method" and node.target not in _allowlist.METHODS:
            raise VelcroError(f"cannot save node '{node.name}': method '{node.target}' has no "
                              f"safe description; {_REBUILD}")
        elif node.op == "get_attr" and not any(node.target.startswith(f"{m}.") for m in called):
            attributes[node.target] = _attribute(module, node)
        entry["args"] = encode(node.args, node.name)
        entry["kwargs"] = encode(dict(node.kwargs), node.name)
        nodes.append(entry)
    return modules, attributes, nodes


def save(module: fx.GraphModule, path: str | os.PathLike) -> Path:
    """Write ``path`` (JSON) and ``path.safetensors``; see :func:`velcro.save_trimmed`."""
    if not isinstance(module, fx.GraphModule):
        raise VelcroError("save_trimmed takes the model velcro.trim returned (a GraphModule)")
    path = Path(path)
    fields = Fields(path, "trimmed model", _REBUILD)
    modules, attributes, nodes = _describe(module, fields)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    document = {
        "format": FORMAT, "class_name": type(module).__name__.removesuffix("_trimmed"),
        "modules": modules, "attributes": attributes, "nodes": nodes,
        "sites": getattr(module, "velcro_sites", {}),
        "input_shape": list(getattr(module, "velcro_input_shape", ()) or ()),
        "channel_widths": dict(getattr(module, "velcro_channel_widths", {}) or {}),
    }
    write_pair(path, tensors, {"format": FORMAT}, document,
               lambda doc: json.dumps(doc, indent=1) + "\n")
    return path


def load(path: str | os.PathLike) -> fx.GraphModule:
    """Rebuild a model written by :func:`save`; see :func:`velcro.load_trimmed`."""
    module, sites, input_shape, widths = _deserialize.load(path)
    preserve(module, "velcro_sites", sites)
    preserve(module, "velcro_input_shape", input_shape)
    preserve(module, "velcro_channel_widths", widths)
    return module


def preserve(module: fx.GraphModule, name: str, value: object) -> None:
    """Set an attribute that survives ``copy.deepcopy`` (which rebuilds a GraphModule)."""
    setattr(module, name, value)
    module.meta.setdefault("_user_preserved_attributes", {})[name] = value

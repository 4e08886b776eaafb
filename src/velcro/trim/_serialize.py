"""Saving a trimmed model without pickle: a JSON description of its graph + safetensors.

Only what ``velcro.trim`` produces can be described: modules from an allow-list (rebuilt
from their constructor arguments), functions and methods from an allow-list (named, never
imported by name from the file), and literal arguments. Loading therefore runs no code
from the file, unlike ``torch.load`` of a pickled module or ``torch.export.load``.
"""

from __future__ import annotations

import inspect
import json
import math
import operator
import os
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from velcro._io import atomic_path, write_text_atomic
from velcro.errors import VelcroError
from velcro.trim import _modules, _ops

FORMAT = "velcro.trimmed/1"

MODULES: dict[str, type] = {
    cls.__name__: cls for cls in (
        nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Flatten, *_ops.BATCHNORM_MODULES,
        *_ops.CHANNELWISE_MODULES, *_modules.WITH_MAP.values(),
    )
}
HELPERS = {cls.__name__: cls for cls in (_modules.ChannelSelect, _modules.ChannelSum,
                                         _modules.Materialize)}


def _named_functions() -> dict[str, object]:
    names: dict[str, object] = {}
    for fn in _ops.CHANNELWISE_FUNCTIONS:
        module = "torch.nn.functional" if getattr(F, fn.__name__, None) is fn else "torch"
        names[f"{module}.{fn.__name__}"] = fn
    for name in ("add", "sub", "mul", "truediv", "iadd", "isub", "imul", "itruediv",
                 "getitem", "neg"):
        names[f"operator.{name}"] = getattr(operator, name)
    for name in ("cat", "concat", "flatten", "add", "sub", "mul", "div", "reshape", "mean",
                 "sigmoid", "tanh", "relu", "transpose", "permute", "unsqueeze", "squeeze"):
        names[f"torch.{name}"] = getattr(torch, name)
    names["torch.Tensor.add_"] = torch.Tensor.add_
    names["builtins.getattr"] = getattr
    return names


FUNCTIONS = _named_functions()
FUNCTION_NAMES = {id(fn): name for name, fn in FUNCTIONS.items()}
METHODS = {"size", "view", "reshape", "flatten", "contiguous", "clone", "relu", "relu_",
           "sigmoid", "tanh", "mean", "amax", "sum", "add", "add_", "sub", "sub_", "mul",
           "mul_", "div", "div_", "transpose", "permute", "unsqueeze", "squeeze", "expand"}
ATTRIBUTES = {"shape"}  # getattr(x, "shape")


def _encode(value: object, where: str) -> object:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, dict):
        return {"dict": {str(k): _encode(v, where) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [_encode(v, where) for v in (value.start, value.stop, value.step)]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if value is Ellipsis:
        return {"ellipsis": True}
    raise VelcroError(f"cannot save node '{where}': argument {value!r} has no safe description; "
                      "save the plan and rebuild with velcro.trim instead")


def _decode(value: object, nodes: dict[str, fx.Node]) -> object:
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    (key, inner), = value.items()
    if key == "node":
        return nodes[inner]
    if key == "tuple":
        return tuple(_decode(v, nodes) for v in inner)
    if key == "dict":
        return {k: _decode(v, nodes) for k, v in inner.items()}
    if key == "slice":
        return slice(*(_decode(v, nodes) for v in inner))
    if key == "float":
        return float(inner)
    if key == "dtype":
        dtype = getattr(torch, inner, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(inner)
        return dtype
    if key == "ellipsis":
        return Ellipsis
    raise ValueError(key)


def _module_spec(name: str, module: nn.Module) -> dict:
    cls = type(module)
    if cls.__name__ in HELPERS and HELPERS[cls.__name__] is cls:
        return {"type": cls.__name__, "config": module.config()}
    if MODULES.get(cls.__name__) is not cls:
        raise VelcroError(f"cannot save module '{name}' ({cls.__name__}): only the modules "
                          "velcro.trim produces have a safe description")
    config = {}
    for param in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.name in (
                "device", "dtype"):
            continue
        if param.name == "bias":
            config["bias"] = getattr(module, "bias", None) is not None
        elif hasattr(module, param.name):
            config[param.name] = _encode(getattr(module, param.name), name)
    spec = {"type": cls.__name__, "config": config}
    if isinstance(getattr(module, "bias_map", None), torch.Tensor):
        spec["bias_map"] = list(module.bias_map.shape)
    return spec


def save(module: fx.GraphModule, path: str | os.PathLike) -> Path:
    """Write ``path`` (JSON) and ``path.safetensors``; see :func:`velcro.save_trimmed`."""
    if not isinstance(module, fx.GraphModule):
        raise VelcroError("save_trimmed takes the model velcro.trim returned (a GraphModule)")
    path = Path(path)
    modules, nodes, attributes = {}, [], {}
    for node in module.graph.nodes:
        entry: dict = {"name": node.name, "op": node.op}
        if node.op == "call_module":
            if node.target not in modules:
                modules[node.target] = _module_spec(node.target, module.get_submodule(node.target))
            entry["target"] = node.target
        elif node.op == "call_function":
            name = FUNCTION_NAMES.get(id(node.target))
            if name is None:
                raise VelcroError(f"cannot save node '{node.name}': function {node.target!r} "
                                  "has no safe description; save the plan and rebuild instead")
            entry["target"] = name
        elif node.op == "call_method":
            if node.target not in METHODS:
                raise VelcroError(f"cannot save node '{node.name}': method '{node.target}' "
                                  "has no safe description; save the plan and rebuild instead")
            entry["target"] = node.target
        elif node.op == "get_attr":
            tensor = module
            for part in node.target.split("."):
                tensor = getattr(tensor, part)
            attributes[node.target] = {"shape": list(tensor.shape),
                                       "dtype": str(tensor.dtype).removeprefix("torch.")}
            entry["target"] = node.target
        else:
            entry["target"] = node.target
        entry["args"] = _encode(node.args, node.name)
        entry["kwargs"] = _encode(dict(node.kwargs), node.name)
        nodes.append(entry)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    document = {
        "format": FORMAT, "class_name": type(module).__name__.removesuffix("_trimmed"),
        "tensors": path.name + ".safetensors", "modules": modules, "attributes": attributes,
        "nodes": nodes, "sites": getattr(module, "velcro_sites", {}),
        "input_shape": list(getattr(module, "velcro_input_shape", ()) or ()),
    }
    with atomic_path(path.with_name(path.name + ".safetensors")) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    write_text_atomic(path, json.dumps(document, indent=1) + "\n")
    return path


def _build_module(name: str, spec: dict) -> nn.Module:
    kind = spec["type"]
    if kind in HELPERS:
        return HELPERS[kind].from_config(spec["config"])
    if kind not in MODULES:
        raise ValueError(f"module '{name}' has unknown type {kind}")
    config = {k: _decode(v, {}) for k, v in spec["config"].items()}
    module = MODULES[kind](**config)
    if "bias_map" in spec:
        module.register_buffer("bias_map", torch.zeros(spec["bias_map"]))
    return module


def load(path: str | os.PathLike) -> fx.GraphModule:
    """Rebuild a model written by :func:`save`; see :func:`velcro.load_trimmed`."""
    path = Path(path)
    if not path.is_file():
        raise VelcroError(f"trimmed model file '{path}' does not exist")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != FORMAT:
            raise ValueError("format")
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise VelcroError(f"'{path}' is not a velcro trimmed model (JSON with format "
                          f"'{FORMAT}'); write one with velcro.save_trimmed") from None
    tensor_path = path.parent / Path(document.get("tensors", path.name + ".safetensors")).name
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError):
        raise VelcroError(f"weights '{tensor_path}' are missing or unreadable; keep the "
                          ".safetensors file beside the model's JSON") from None
    try:
        root: dict[str, object] = {name: _build_module(name, spec)
                                   for name, spec in document["modules"].items()}
        for name, spec in document["attributes"].items():
            root[name] = torch.zeros(spec["shape"], dtype=_decode({"dtype": spec["dtype"]}, {}))
        graph = fx.Graph()
        nodes: dict[str, fx.Node] = {}
        for entry in document["nodes"]:
            op, target = entry["op"], entry["target"]
            if op == "call_function":
                target = FUNCTIONS[target]
                if target is getattr and entry["args"]["tuple"][1] not in ATTRIBUTES:
                    raise ValueError(f"attribute {entry['args']['tuple'][1]!r}")
            elif op == "call_method" and target not in METHODS:
                raise ValueError(target)
            elif op not in ("placeholder", "output", "call_module", "get_attr", "call_method"):
                raise ValueError(op)
            args = _decode(entry["args"], nodes)
            kwargs = _decode(entry["kwargs"], nodes)
            if op == "output":
                graph.output(args[0])
                continue
            nodes[entry["name"]] = graph.create_node(op, target, tuple(args), kwargs,
                                                     entry["name"])
        graph.lint()
        module = fx.GraphModule(root, graph, document.get("class_name", "Trimmed"))
        module.load_state_dict(tensors, strict=True)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VelcroError(f"'{path}' does not describe a model velcro can rebuild ({first}); "
                          "write it again with velcro.save_trimmed") from None
    preserve(module, "velcro_sites", dict(document.get("sites", {})))
    preserve(module, "velcro_input_shape", tuple(document.get("input_shape", ())))
    return module.eval()


def preserve(module: fx.GraphModule, name: str, value: object) -> None:
    """Set an attribute that survives ``copy.deepcopy`` (which rebuilds a GraphModule)."""
    setattr(module, name, value)
    module.meta.setdefault("_user_preserved_attributes", {})[name] = value

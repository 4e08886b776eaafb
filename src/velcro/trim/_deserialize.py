"""Loading a trimmed model (JSON + safetensors) without running any code from the files.

torch.fx turns a graph into Python source and runs it; whatever a file puts in a node's
name, target, keyword or module path ends up in that source. So every string that reaches
code generation is checked first: node names, placeholders and keywords are plain
identifiers, module and attribute paths are dotted plain names (no dunders, nothing an
``nn.Module`` already defines), functions and methods are resolved through the allow-lists
of :mod:`velcro.trim._allowlist` (never imported by name), and argument values are JSON
scalars or the few tagged values velcro writes (node references, tuples, slices, dtypes).

Memory is bounded by the tensor file: modules are built on the ``meta`` device from their
recorded constructor arguments, their declared state is matched key by key, shape by shape
against the safetensors file (whose SHA-256 the JSON records), and only then assigned the
file's tensors. A tensor no module or attribute of the graph uses is refused.
"""

from __future__ import annotations

import inspect
import keyword
import re
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from velcro._validate import MAX_DIMS, MAX_NAME, Fields, check_finite, read_json, read_pair, show
from velcro.trim import _allowlist, _modules

FORMAT = "velcro.trimmed/2"
OLD_FORMAT = "velcro.trimmed/1"
FIX = "write it again with velcro.save_trimmed (or rebuild the model with velcro.trim)"
MAX_NODES = 1_000_000
MAX_ITEMS = 100_000  # entries of one list or tuple argument
OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PART = re.compile(r"[A-Za-z0-9_]+\Z")
# Names an nn.Module / GraphModule already has: a submodule so named would shadow them.
RESERVED = frozenset(dir(fx.GraphModule(nn.Module(), fx.Graph()))) | {"self"}
_SKIPPED_PARAMETERS = ("device", "dtype")
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|meta)(:[0-9]{1,3})?")


def identifier(value: object, fields: Fields, field: str) -> str:
    """A plain Python identifier: no keyword, no dunder, not ``self``."""
    if (not isinstance(value, str) or len(value) > MAX_NAME or not _IDENTIFIER.match(value)
            or keyword.iskeyword(value) or value.startswith("__") or value == "self"):
        raise fields.error(field, f"must be a plain identifier, not {show(value)}")
    return value


def dotted(value: object, fields: Fields, field: str) -> str:
    """A module or attribute path: dot-separated plain names (digits allowed, as in
    ``layer1.0.conv``), none a dunder or a name an ``nn.Module`` already has."""
    if not isinstance(value, str) or len(value) > 4 * MAX_NAME:
        raise fields.error(field, f"must be a dotted name, not {show(value)}")
    for part in value.split("."):
        if not _PART.match(part) or part.startswith("__") or part in RESERVED:
            raise fields.error(field, f"must be a dotted name of plain parts, not {show(value)}")
    return value


def decode(value: object, fields: Fields, field: str,
           nodes: dict[str, fx.Node] | None = None) -> object:
    """A literal argument from its JSON form (see ``_serialize.encode``)."""
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise fields.error(field, f"is {show(value)}, outside the 64-bit integers")
        return value
    if isinstance(value, str):
        if len(value) > 4 * MAX_NAME:
            raise fields.error(field, f"is a string of {len(value)} characters")
        return value
    if isinstance(value, list):
        if len(value) > MAX_ITEMS:
            raise fields.error(field, f"lists {len(value)} values, more than {MAX_ITEMS}")
        return [decode(v, fields, f"{field}[{i}]", nodes) for i, v in enumerate(value)]
    if not isinstance(value, dict) or len(value) != 1:
        raise fields.error(field, f"must be a literal or one tagged value, not {show(value)}")
    (tag, inner), = value.items()
    where = f"{field}.{tag}"
    if tag == "node":
        if nodes is None or not isinstance(inner, str) or inner not in nodes:
            raise fields.error(where, f"names {show(inner)}, not a node defined before it")
        return nodes[inner]
    if tag in ("tuple", "slice"):
        items = decode(inner, fields, where, nodes)
        if not isinstance(items, list) or tag == "slice" and len(items) != 3:
            raise fields.error(where, f"must list {'3 ' if tag == 'slice' else ''}values")
        return tuple(items) if tag == "tuple" else slice(*items)
    if tag == "dict" and isinstance(inner, dict):
        for key in inner:
            if len(key) > MAX_NAME:
                raise fields.error(where, f"has a key of {len(key)} characters")
        return {k: decode(v, fields, f"{where}.{k}", nodes) for k, v in inner.items()}
    if tag == "float" and inner in ("inf", "-inf", "nan"):
        return float(inner)
    if tag == "dtype" and inner in _allowlist.DTYPES:
        return getattr(torch, inner)
    if tag == "device" and isinstance(inner, str) and _DEVICE.fullmatch(inner):
        return torch.device(inner)
    if tag == "ellipsis" and inner is True:
        return Ellipsis
    raise fields.error(field, f"is {show(value)}, not a value velcro writes")


def _constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name: p for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.name not in _SKIPPED_PARAMETERS}


def _helper_config(kind: str, config: dict, fields: Fields, where: str) -> None:
    """The trimming modules' configurations: exact keys, bounded integers."""
    keys = {"ChannelSelect": {"channels", "dim"},
            "ChannelSum": {"signs", "dim", "inplace", "sizes"},
            "Materialize": {"constant", "channels", "dim", "computed"},
            "CaptureCheck": {"shape"}}[kind]
    if set(config) != keys:
        raise fields.error(where, f"must have the keys {', '.join(sorted(keys))}")
    if kind == "CaptureCheck":
        fields.shape(config, "shape", where)
        return
    fields.integer(config, "dim", where, low=-MAX_DIMS, high=MAX_DIMS)
    if "channels" in config:
        fields.integer(config, "channels", where, low=0, high=2**40)
    for flag in ({"inplace", "computed"} & keys):
        fields.get(config, flag, bool, where)
    if kind == "Materialize":
        fields.shape(config, "constant", where)
    if kind == "ChannelSum":
        signs = fields.list(config, "signs", where, max_len=MAX_ITEMS)
        sizes = fields.list(config, "sizes", where, max_len=MAX_ITEMS)
        if not signs or any(s not in (1, -1) or isinstance(s, bool) for s in signs):
            raise fields.error(f"{where}.signs", f"must list +1 or -1, not {show(signs)}")
        if len(sizes) != len(signs) - 1:
            raise fields.error(f"{where}.sizes", "must have one entry per input after the first")
        for i, pair in enumerate(sizes):
            fields.shape({"size": pair}, "size", f"{where}.sizes[{i}]")
            if len(pair) != 2:
                raise fields.error(f"{where}.sizes[{i}]", "must be [source, target] sizes")


def build_module(name: str, spec: object, fields: Fields, where: str) -> nn.Module:
    """A module from its spec, on the meta device (its tensors come from the file)."""
    kind = fields.string(spec, "type", where)
    config = fields.dict(spec, "config", where)
    extra = set(spec) - {"type", "config", "bias_map"}  # type: ignore[arg-type]
    if extra:
        raise fields.error(f"{where}.{sorted(extra)[0]}", "is not a field of a module")
    with torch.device("meta"):
        if kind in _allowlist.HELPERS:
            _helper_config(kind, config, fields, f"{where}.config")
            module = _allowlist.HELPERS[kind].from_config(config)
        elif kind in _allowlist.MODULES:
            cls = _allowlist.MODULES[kind]
            allowed = _constructor_parameters(cls)
            arguments = {}
            for key, value in config.items():
                if key not in allowed:
                    raise fields.error(f"{where}.config.{key}", f"is not an argument of {kind}")
                arguments[key] = decode(value, fields, f"{where}.config.{key}")
            try:
                module = cls(**arguments)
            except (TypeError, ValueError, RuntimeError, AssertionError, OverflowError,
                    KeyError, IndexError, NotImplementedError, ZeroDivisionError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise fields.error(f"{where}.config", f"does not build a {kind} "
                                   f"({show(first)})") from None
        else:
            raise fields.error(f"{where}.type", f"is {show(kind)}, not a module velcro can "
                               "rebuild safely")
        if "bias_map" in spec:  # type: ignore[operator]
            if type(module) not in _modules.WITH_MAP.values():
                raise fields.error(f"{where}.bias_map", f"is not a field of a {kind}")
            module.register_buffer("bias_map", torch.empty(fields.shape(spec, "bias_map", where)))
    return module


def _modules_and_attributes(document: dict, fields: Fields) -> tuple[dict, dict]:
    specs = fields.dict(document, "modules")
    declared = fields.dict(document, "attributes", default={})
    paths = [dotted(name, fields, f"modules.{name}") for name in specs]
    paths += [dotted(name, fields, f"attributes.{name}") for name in declared]
    prefixes = {p.rsplit(".", i)[0] for p in paths for i in range(1, p.count(".") + 1)}
    nested = sorted(set(paths) & prefixes)
    if nested:
        raise fields.error("modules", f"declares {nested[0]!r} both as a name and as a "
                           "folder of other names")
    modules = {name: build_module(name, spec, fields, f"modules.{name}")
               for name, spec in specs.items()}
    attributes = {}
    for name in declared:
        dtype = fields.string(declared[name], "dtype", f"attributes.{name}")
        if dtype not in _allowlist.DTYPES:
            raise fields.error(f"attributes.{name}.dtype", f"is {show(dtype)}, not a dtype")
        shape = fields.shape(declared[name], "shape", f"attributes.{name}")
        attributes[name] = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
    return modules, attributes


def _state(modules: dict[str, nn.Module], target: str) -> torch.Tensor | None:
    """A parameter or buffer of a declared module, named ``module.path.name``."""
    owner, _, rest = target.rpartition(".")
    while owner:
        if owner in modules:
            state = dict(modules[owner].named_parameters()) | dict(modules[owner].named_buffers())
            return state.get(rest)
        owner, _, head = owner.rpartition(".")
        rest = f"{head}.{rest}"
    return None


def _target(entry: dict, op: str, modules: dict, root: dict, fields: Fields,
            where: str) -> object:
    field = f"{where}.target"
    target = entry.get("target")
    if op == "placeholder":
        return identifier(target, fields, field)
    if op == "output":
        if target != "output":
            raise fields.error(field, f"is {show(target)}, not 'output'")
        return target
    if op == "call_function":
        if not isinstance(target, str) or target not in _allowlist.FUNCTIONS:
            raise fields.error(field, f"is {show(target)}, not a function velcro allows "
                               "(see velcro.trim._allowlist)")
        return _allowlist.FUNCTIONS[target]
    if op == "call_method":
        if not isinstance(target, str) or target not in _allowlist.METHODS:
            raise fields.error(field, f"is {show(target)}, not a tensor method velcro allows")
        return target
    dotted(target, fields, field)
    if op == "call_module" and target not in modules:
        raise fields.error(field, f"names module {target!r}, which 'modules' does not declare")
    if op == "get_attr" and target not in root:
        state = _state(modules, target)
        if state is None:
            raise fields.error(field, f"names {target!r}, neither a declared attribute nor "
                               "a parameter or buffer of a declared module")
        root[target] = state
    return target


def _arguments(entry: dict, op: str, target: object, nodes: dict, fields: Fields,
               where: str) -> tuple[tuple, dict]:
    args = decode(fields.get(entry, "args", dict, where), fields, f"{where}.args", nodes)
    kwargs = decode(fields.get(entry, "kwargs", dict, where), fields, f"{where}.kwargs", nodes)
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise fields.error(where, "must have args {'tuple': [...]} and kwargs {'dict': {...}}")
    for key in kwargs:
        identifier(key, fields, f"{where}.kwargs.{key}")
    if op == "placeholder" and (args or kwargs):
        raise fields.error(f"{where}.args", "must be empty for an input (no default values)")
    if op == "output" and (len(args) != 1 or kwargs):
        raise fields.error(f"{where}.args", "must hold the one output value")
    if op == "call_method" and not args:
        raise fields.error(f"{where}.args", "must start with the object the method is called on")
    if target is getattr and (len(args) != 2 or kwargs or not isinstance(args[0], fx.Node)
                              or args[1] not in _allowlist.ATTRIBUTES):
        raise fields.error(f"{where}.args", f"reads attribute {show(args[1:])}; only "
                           f"{', '.join(sorted(_allowlist.ATTRIBUTES))} of a node are allowed")
    return args, kwargs


def build_graph(document: dict, modules: dict, root: dict, fields: Fields) -> fx.Graph:
    """The graph of the document's nodes, every string checked before fx sees it."""
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    entries = fields.list(document, "nodes", max_len=MAX_NODES)
    used: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"nodes[{index}]"
        name = identifier(fields.get(entry, "name", str, where), fields, f"{where}.name")
        if name in nodes:
            raise fields.error(f"{where}.name", f"repeats node name {name!r}")
        op = fields.string(entry, "op", where, choices=OPS)
        if (op == "output") != (index == len(entries) - 1):
            raise fields.error(f"{where}.op", "is 'output' where it is not the last node, or "
                               "the last node is not the output")
        target = _target(entry, op, modules, root, fields, where)
        args, kwargs = _arguments(entry, op, target, nodes, fields, where)
        if op == "output":
            graph.output(args[0])
            break
        if op in ("call_module", "get_attr"):
            used.add(target)  # type: ignore[arg-type]
        nodes[name] = graph.create_node(op, target, args, kwargs, name)
    else:
        raise fields.error("nodes", "has no output node")
    unused = sorted(set(root) - used)
    if unused:
        kind = "modules" if unused[0] in modules else "attributes"
        raise fields.error(f"{kind}.{unused[0]}", "is declared, but no node uses it")
    return graph


def _check_state(gm: fx.GraphModule, tensors: dict[str, torch.Tensor], fields: Fields) -> None:
    """The file's tensors are exactly the graph's state, shape by shape, all finite."""
    expected = gm.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise fields.error("tensors", f"holds no tensor {missing[0]!r}, which the model needs")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise fields.error("tensors", f"holds {extra[0]!r}, which no module or attribute of "
                           "the graph uses")
    for key, declared in expected.items():
        found = tensors[key]
        same_kind = (found.is_floating_point() == declared.is_floating_point()
                     and (found.is_floating_point() or found.dtype == declared.dtype))
        if tuple(found.shape) != tuple(declared.shape) or not same_kind:
            raise fields.error(f"tensors.{key}", f"is {found.dtype} {list(found.shape)}; the "
                               f"model declares {declared.dtype} {list(declared.shape)}")
        check_finite(found, fields, f"tensors.{key}")


def _sites(document: dict, graph: fx.Graph, fields: Fields) -> dict[str, str | None]:
    sites = fields.dict(document, "sites", default={})
    names = {node.name for node in graph.nodes}
    for site, node in sites.items():
        if len(site) > MAX_NAME or node is not None and (not isinstance(node, str)
                                                          or node not in names):
            raise fields.error(f"sites.{site}", f"names node {show(node)}, not in the graph")
    return dict(sites)


def _channel_widths(document: dict, gm: fx.GraphModule, fields: Fields) -> dict[str, int]:
    """``velcro_channel_widths``: each names a convolution of the graph with that many filters
    (absent in files saved before it was recorded)."""
    widths = fields.dict(document, "channel_widths", default={})
    for name, width in widths.items():
        where = fields.join("channel_widths", name)
        try:
            module = gm.get_submodule(name) if len(name) <= MAX_NAME else None
        except AttributeError:
            module = None
        if not isinstance(module, nn.modules.conv._ConvNd):
            raise fields.error(where, "names no convolution of the graph")
        if type(width) is not int or width != module.out_channels:
            raise fields.error(where, f"is {show(width)}; the convolution has "
                               f"{module.out_channels} filters")
    return dict(widths)


def load(path: str | Path) -> tuple[fx.GraphModule, dict, tuple[int, ...], dict[str, int]]:
    """``(model, sites, input_shape, channel_widths)`` from a file ``_serialize.save`` wrote."""
    path = Path(path)
    fields = Fields(path, "trimmed model", FIX)
    if not path.is_file():
        raise fields.error("", "does not exist")
    document = fields.document(read_json(path, fields), (FORMAT, OLD_FORMAT))
    if document["format"] == OLD_FORMAT:
        raise fields.error("format", f"is {OLD_FORMAT}, written by an earlier velcro without a "
                           "checksum of its tensors, so the pair cannot be verified")
    class_name = identifier(fields.string(document, "class_name", default="Trimmed"), fields,
                            "class_name")
    tensors = read_pair(path, document, fields)
    modules, root = _modules_and_attributes(document, fields)
    root.update(modules)
    graph = build_graph(document, modules, root, fields)
    try:
        graph.lint()
        gm = fx.GraphModule(root, graph, class_name)
    except (RuntimeError, ValueError, TypeError, AttributeError, KeyError, SyntaxError) as exc:
        raise fields.error("nodes", f"do not form a graph fx accepts ({show(str(exc))})") from None
    _check_state(gm, tensors, fields)
    try:
        gm.load_state_dict(tensors, strict=True, assign=True)
    except (RuntimeError, ValueError) as exc:
        raise fields.error("tensors", f"do not load into the model ({show(str(exc))})") from None
    for name, value in [*gm.named_parameters(), *gm.named_buffers()]:
        if value.is_meta:
            raise fields.error("modules", f"leave {name!r} without a value in the file")
    shape = fields.shape(document, "input_shape") if "input_shape" in document else ()
    return (gm.eval(), _sites(document, graph, fields), shape,
            _channel_widths(document, gm, fields))

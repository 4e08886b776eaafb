"""What a model costs to run: MACs, parameters and activation elements, from its traced graph.

What counts (per image, i.e. the batch axis of ``example_input`` divided out):

- ``macs``: multiply-accumulates of convolutions and linear layers (modules and their
  functional forms, ``matmul``/``bmm``), the quantity the published counts use (ResNet-18
  1.81 G, MobileNet-V2 0.30 G, GoogLeNet 1.50 G at 224x224). A convolution output element
  costs ``in_channels / groups * kernel elements`` MACs; its bias is not a MAC.
- ``elementwise``: output elements of every other computing node (batch-norm, activations,
  pooling, additions, concatenations, the bias *maps* and constant placements a trimmed model
  adds). These are additions and copies, not MACs, and are reported apart so that a trimmed
  model's extra bookkeeping is visible rather than hidden in the MAC count.
- ``parameters``: elements of the parameters the graph uses (an unused auxiliary head is not
  counted); ``buffer_elements``: elements of the buffers it uses (batch-norm statistics,
  the constant maps of a trimmed or applied model).
- ``activations``: output elements of the activation sites (:func:`velcro.find_sites`);
  for a model from :func:`velcro.trim`, the elements its sites still compute.
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from velcro._format import plural, scaled, shape_text
from velcro.errors import VelcroError
from velcro.graph import find_sites, trace

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d)
_MATMUL_FUNCTIONS = (torch.matmul, torch.bmm, torch.mm, operator.matmul)
# Nodes that move or view data without computing: not counted as elementwise work.
_VIEW_FUNCTIONS = (torch.flatten, torch.reshape, operator.getitem, getattr)
_VIEW_METHODS = ("view", "reshape", "flatten", "size", "dim", "contiguous", "permute",
                 "transpose", "unsqueeze", "squeeze", "expand", "__getitem__")
_FREE_MODULES = (nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout2d, nn.Dropout1d)


@dataclass
class LayerCost:
    """The cost of one node of the traced graph (per image).

    Attributes:
        name: the module's qualified name, or the node's name for functions.
        kind: the module class or function name (``Conv2d``, ``add``).
        output_shape: the node's output shape for one image.
        macs: multiply-accumulates.
        parameters: parameter elements the node owns.
        elementwise: output elements of non-MAC computation.
    """

    name: str
    kind: str
    output_shape: tuple[int, ...]
    macs: int = 0
    parameters: int = 0
    elementwise: int = 0


@dataclass
class Cost:
    """MACs, parameters and activation elements of a model, per image.

    Attributes:
        macs: convolution and linear multiply-accumulates.
        parameters: parameter elements the traced graph uses.
        buffer_elements: buffer elements the traced graph uses.
        elementwise: output elements of all other computing nodes (adds, not MACs).
        activations: output elements of the activation sites, in total.
        sites: per-site output elements, by site name.
        layers: per-node breakdown, in graph order (nodes that cost nothing are left out).
        input_shape: the per-image input shape the counts are for.

    ``print(cost)`` shows the totals in a few lines; the per-layer rows stay in ``layers``
    (:meth:`table` renders them) and in :meth:`to_dict`.

    Example:
        >>> base = velcro.cost(model, torch.zeros(1, 3, 224, 224))
        >>> base
        Cost per image of 3x224x224: 1.81 G MACs, 11.69 M parameters
          2.31 M activation elements at 17 sites, 5.75 M elementwise outputs, 68 layers
        >>> round(base.macs / 1e9, 2)
        1.81
        >>> base.reduction(velcro.cost(small, torch.zeros(1, 3, 224, 224)))["macs"]
        0.41...
    """

    macs: int
    parameters: int
    buffer_elements: int
    elementwise: int
    activations: int
    sites: dict[str, int] = field(default_factory=dict)
    layers: list[LayerCost] = field(default_factory=list)
    input_shape: tuple[int, ...] = ()

    def __repr__(self) -> str:
        return (f"Cost per image of {shape_text(self.input_shape)}: {scaled(self.macs)} MACs, "
                f"{scaled(self.parameters)} parameters\n"
                f"  {scaled(self.activations)} activation elements at "
                f"{plural(len(self.sites), 'site')}, {scaled(self.elementwise)} elementwise "
                f"outputs, {plural(len(self.layers), 'layer')}")

    def reduction(self, other: Cost) -> dict[str, float]:
        """The fraction of this model's cost that ``other`` saves, per quantity.

        Returns a dict with ``macs``, ``parameters``, ``activations`` and ``elementwise``
        (each ``1 - other / self``; negative when ``other`` costs more) and
        ``mac_speedup`` (``self.macs / other.macs``, the MAC-theoretical speedup).

        Example:
            >>> cost(model, x).reduction(cost(velcro.trim(model, plan), x))["mac_speedup"]
            1.7...
        """
        def saved(mine: int, theirs: int) -> float:
            return 1.0 - theirs / mine if mine else 0.0

        return {
            "macs": saved(self.macs, other.macs),
            "parameters": saved(self.parameters, other.parameters),
            "activations": saved(self.activations, other.activations),
            "elementwise": saved(self.elementwise, other.elementwise),
            "mac_speedup": self.macs / other.macs if other.macs else math.inf,
        }

    def to_dict(self) -> dict:
        """Every figure as plain data (JSON-serialisable), the per-layer rows included.

        Example:
            >>> text = json.dumps(velcro.cost(model, torch.zeros(1, 3, 224, 224)).to_dict())
        """
        return asdict(self)

    def table(self) -> str:
        """The per-layer breakdown as a Markdown table (layers with MACs only).

        Example:
            >>> print(velcro.cost(model, torch.zeros(1, 3, 224, 224)).table())
        """
        lines = ["| layer | kind | output | MACs | parameters |", "|---|---|---|---:|---:|"]
        for row in self.layers:
            if row.macs:
                shape = "x".join(str(s) for s in row.output_shape)
                lines.append(f"| {row.name} | {row.kind} | {shape} | {row.macs:,} | "
                             f"{row.parameters:,} |")
        lines.append(f"| total | | | {self.macs:,} | {self.parameters:,} |")
        return "\n".join(lines)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _kind(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _conv_macs(out_elements: int, weight_shape: tuple[int, ...]) -> int:
    # weight: (out, in / groups, *kernel): each output element reads in/groups * kernel inputs.
    return out_elements * _numel(weight_shape[1:])


def _is_view(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _FREE_MODULES)
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS or node.target is F.dropout
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return True


def _node_macs(gm: fx.GraphModule, node: fx.Node, batch: int) -> int:
    out_shape = _tensor_shape(node)
    if out_shape is None:
        return 0
    out_elements = _numel(out_shape) // batch
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, _CONV_MODULES):
            return _conv_macs(out_elements, tuple(module.weight.shape))
        if isinstance(module, nn.Linear):
            return out_elements * module.in_features
        return 0
    if node.op != "call_function":
        return 0
    if node.target in _CONV_FUNCTIONS:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        shape = _tensor_shape(weight) if isinstance(weight, fx.Node) else None
        return _conv_macs(out_elements, shape) if shape else 0
    if node.target is F.linear:
        data = _tensor_shape(node.args[0])
        return out_elements * data[-1] if data else 0
    if node.target in _MATMUL_FUNCTIONS:
        left = _tensor_shape(node.args[0])
        return out_elements * left[-1] if left else 0
    return 0


def _owned_parameters(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int]:
    """(parameter elements, buffer elements) that a node reads directly."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return (sum(p.numel() for p in module.parameters()),
                sum(b.numel() for b in module.buffers()))
    if node.op == "get_attr":
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        if isinstance(value, nn.Parameter):
            return value.numel(), 0
        if isinstance(value, torch.Tensor):
            return 0, value.numel()
    return 0, 0


@torch.no_grad()
def cost(model: nn.Module, example_input: torch.Tensor) -> Cost:
    """Count the MACs, parameters and activation elements of ``model`` on one input shape.

    The model is traced with torch.fx and ``example_input`` is run through it once to learn
    every node's shape (``torch.fx.passes.shape_prop.ShapeProp``); the counts are divided by
    the batch size, so they are per image. See the module docstring for what counts.

    Args:
        model: any torch.fx-traceable module: an original model, ``velcro.apply``'s or
            ``velcro.trim``'s result.
        example_input: a batch of inputs of the size to count for (batch axis first).

    Returns:
        A :class:`Cost` with totals and a per-layer breakdown.

    Raises:
        VelcroError: the model cannot be traced or does not accept ``example_input``.

    Example:
        >>> c = velcro.cost(velcro.models.resnet18(), torch.zeros(1, 3, 224, 224))
        >>> f"{c.macs / 1e9:.2f} GMACs, {c.parameters / 1e6:.1f} M parameters"
        '1.81 GMACs, 11.7 M parameters'
    """
    if not isinstance(example_input, torch.Tensor) or example_input.dim() == 0:
        raise VelcroError("example_input must be a batch tensor (batch axis first), "
                          "e.g. torch.zeros(1, 3, 224, 224)")
    gm = trace(model)
    device = next((p.device for p in gm.parameters()), example_input.device)
    try:
        ShapeProp(gm).propagate(example_input.to(device))
    except Exception as exc:  # any failure of the user's forward on this input
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VelcroError(
            f"{type(model).__name__} does not run on an input of shape "
            f"{tuple(example_input.shape)}: {first}; give an example input the model accepts"
        ) from None
    batch = int(example_input.shape[0])
    layers: list[LayerCost] = []
    seen_modules: set[str] = set()
    seen_attrs: set[str] = set()
    parameters = buffers = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_module" and node.target in seen_modules:
            owned = (0, 0)  # a module called twice owns its parameters once
        elif node.op == "get_attr" and node.target in seen_attrs:
            owned = (0, 0)
        else:
            owned = _owned_parameters(gm, node)
        (seen_modules if node.op == "call_module" else seen_attrs).add(node.target)
        parameters += owned[0]
        buffers += owned[1]
        if node.op == "get_attr":
            continue
        shape = _tensor_shape(node)
        if shape is None:
            continue
        per_image = tuple(shape[1:]) if shape and shape[0] == batch else tuple(shape)
        macs = _node_macs(gm, node, batch)
        elementwise = 0 if macs or _is_view(gm, node) else _numel(shape) // batch
        if macs and node.op == "call_module" and isinstance(
                getattr(gm.get_submodule(node.target), "bias_map", None), torch.Tensor):
            elementwise = _numel(shape) // batch  # a trimmed conv's bias map: one add each
        if macs or elementwise or owned[0]:
            name = node.target if node.op == "call_module" else node.name
            layers.append(LayerCost(str(name), _kind(gm, node), per_image, macs, owned[0],
                                    elementwise))
    site_elements = _site_elements(gm, batch)
    return Cost(
        macs=sum(row.macs for row in layers),
        parameters=parameters,
        buffer_elements=buffers,
        elementwise=sum(row.elementwise for row in layers),
        activations=sum(site_elements.values()),
        sites=site_elements,
        layers=layers,
        input_shape=tuple(example_input.shape[1:]),
    )


def _site_elements(gm: fx.GraphModule, batch: int) -> dict[str, int]:
    """Per-site output elements; a trimmed model names its sites in ``velcro_sites``."""
    by_name = {node.name: node for node in gm.graph.nodes}
    named = getattr(gm, "velcro_sites", None)
    if isinstance(named, dict):
        pairs = [(site, by_name.get(node)) for site, node in named.items()]
    else:
        pairs = [(site.name, by_name[site.node]) for site in find_sites(gm)]
    result = {}
    for site, node in pairs:
        shape = _tensor_shape(node) if node is not None else None
        result[site] = _numel(shape) // batch if shape else 0
    return result

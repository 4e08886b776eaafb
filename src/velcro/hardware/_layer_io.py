"""What each site's layer sees inside ``velcro.apply(model, plan)``: the skipping kernels'
reference inputs and outputs (re-exported by :mod:`velcro.hardware.kernels`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from velcro.apply import apply
from velcro.graph.layers import site_layers
from velcro.plan import Plan


@dataclass
class LayerIO:
    """What one site's layer sees and yields inside ``velcro.apply(model, plan)``.

    Example:
        >>> seen = layer_io(model, plan, images)["layer1.0.relu:0"]
        >>> seen.input.shape, seen.output.shape
    """

    input: torch.Tensor
    residual: torch.Tensor | None
    output: torch.Tensor

    def __repr__(self) -> str:  # shapes, not thousands of values
        shapes = (f"{k} {'x'.join(map(str, v.shape)) if v is not None else None}"
                  for k, v in vars(self).items())
        return f"LayerIO({', '.join(shapes)})"


class _Capture(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        if node.name in self.wanted:  # clone: later in-place ops must not change it
            self.values[node.name] = value.detach().clone()
        return value


def layer_io(model: nn.Module, plan: Plan, images: torch.Tensor,
             sites: Iterable[str] | None = None) -> dict[str, LayerIO]:
    """Each conv site's input, residual and reference output inside ``apply(model, plan)``.

    Args:
        model: the model the plan was made for.
        plan: the plan; the reference output is the site's output after constant replacement.
        images: one input batch.
        sites: the site names to capture (default: every site :func:`conv_sites` can run).

    Example:
        >>> io = layer_io(model, plan, images)["layer1.0.relu:0"]
        >>> torch.testing.assert_close(kernels["layer1.0.relu:0"].kernel(io.input), io.output)
    """
    applied = apply(model, plan, check=False)
    layers = site_layers(applied)
    names = list(sites) if sites is not None else list(layers)
    by_name = {node.name: node for node in applied.graph.nodes}
    plan_nodes = {}
    for name in names:
        layer = layers[name]
        act = by_name[layer.activation]
        replaced = [u for u in act.users if u.op == "call_module"
                    and u.target.startswith("velcro_constant")]
        producer = by_name[layer.producer]
        plan_nodes[name] = (producer.args[0].name, layer.residual,
                            replaced[0].name if replaced else act.name)
    wanted = {n for triple in plan_nodes.values() for n in triple if n is not None}
    capture = _Capture(applied, wanted)
    with torch.no_grad():
        capture.run(images)
    values = capture.values
    return {name: LayerIO(values[x], values[r] if r else None, values[y])
            for name, (x, r, y) in plan_nodes.items()}

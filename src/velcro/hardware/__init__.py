"""A cycle- and energy-level model of the papers' accelerator module.

The VELCRO paper runs 16 modules on a Xilinx Alveo U280, each a 2-D convolution over a 64x64
input feature map with a 3x3 filter, ReLU, and control logic that skips compressed output
elements and emits their averages instead. It reports throughput growing as 1/(1-C) and
energy falling linearly with C. This model makes those statements computable for any plan.

Assumptions (each a field of :class:`HardwareConfig`):

- **Datapath.** A module performs ``macs_per_cycle`` multiply-accumulates per cycle (default
  ``filter_size**2``: one 3x3 window per cycle). An output element needing ``K`` MACs
  (``K = in_channels / groups * kernel elements``) occupies it ``ceil(K / macs_per_cycle)``
  cycles; bias, batch-norm (folded) and activation are fused into the last cycle.
- **Proportional to computed outputs:** datapath cycles; per output, K MACs and K input
  reads from the on-chip line buffers (weights sit in registers), and one output write.
- **Per skipped output:** ``skip_cycles`` datapath cycles (default 0: the control logic emits
  the stored average through its own write port while the datapath moves on), one read of
  the stored constant, one output write and ``skip_energy_pj`` of control logic (element
  plans; channel plans pay the control energy once per skipped channel).
- **Constant per layer:** one mask-bit read per output element for element plans (every
  output is checked, computed or not), ``layer_overhead_cycles`` (pipeline fill, weight
  load), and ``load_energy_pj`` per input and weight word brought on chip (default 0: the
  paper's module reads its feature map from on-chip memory; channel plans load only the
  weights of live filters).
- **Static power** ``static_power_w`` is paid for the layer's duration.
- **Schedule.** ``balanced``: the modules share a layer's work evenly (a work queue of
  output elements), so cycles are work / modules. ``channels``: output channel ``c`` runs
  on module ``c % modules`` and the layer lasts as long as its busiest module, which is where
  random element masks lose against the law (uneven live counts per module).

With the defaults (balanced, no skip cycles, no per-layer overhead) a layer's cycles are
``(1 - C) * outputs * ceil(K / macs_per_cycle) / modules``: throughput is exactly
``1 / (1 - C)`` times the uncompressed one, and energy is ``E0 - C * outputs * (e_computed -
e_skipped)``, linear in C. Energies default to 45 nm figures (Horowitz, ISSCC 2014: fp32
multiply 3.7 pJ + add 0.9 pJ, 32-bit read of an 8 KiB SRAM 5 pJ); only ratios are meant to
be read from them.

Example:
    >>> layers = layer_shapes(model, (3, 224, 224))
    >>> base, small = estimate(layers), estimate(layers, plan)
    >>> small.images_per_second / base.images_per_second
    1.38...
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from velcro.errors import VelcroError
from velcro.graph import find_sites, trace
from velcro.graph.layers import producer_nodes, weight_shape
from velcro.plan import Plan

__all__ = ["SCHEDULES", "HardwareConfig", "LayerCost", "LayerShape", "ModelCost", "conv_layer",
           "estimate", "layer_shapes"]

SCHEDULES = ("balanced", "channels")


@dataclass(frozen=True)
class HardwareConfig:
    """The accelerator: ``modules`` copies of a conv + ReLU engine with skip logic.

    Attributes:
        input_size: side of the feature map a module's line buffers hold (64); larger maps
            are processed in ``ceil(H / input_size) * ceil(W / input_size)`` tiles, each
            paying ``layer_overhead_cycles``.
        filter_size: the module's native filter side (3).
        modules: parallel modules (16).
        macs_per_cycle: MACs per module per cycle; ``None`` means ``filter_size ** 2``.
        clock_mhz: module clock (300 MHz, a typical U280 kernel clock).
        mac_energy_pj, read_energy_pj, write_energy_pj: one fp32 MAC, one 32-bit on-chip
            read, one 32-bit output write.
        skip_energy_pj: control logic for one skipped element (or channel, channel plans).
        mask_read_energy_pj: reading one mask bit (element plans, every output).
        load_energy_pj: bringing one input or weight word on chip, per layer.
        skip_cycles: datapath cycles a skipped element costs.
        layer_overhead_cycles: fixed cycles per layer tile (pipeline fill, weight load).
        static_power_w: static power, paid for the layer's duration.
        schedule: ``balanced`` or ``channels`` (see the module docstring).

    Example:
        >>> config = HardwareConfig(modules=32, schedule="channels")
        >>> estimate(layer_shapes(model, (3, 224, 224)), plan, config).images_per_second
    """

    input_size: int = 64
    filter_size: int = 3
    modules: int = 16
    macs_per_cycle: int | None = None
    clock_mhz: float = 300.0
    mac_energy_pj: float = 4.6
    read_energy_pj: float = 5.0
    write_energy_pj: float = 5.0
    skip_energy_pj: float = 1.0
    mask_read_energy_pj: float = 5.0 / 32
    load_energy_pj: float = 0.0
    skip_cycles: float = 0.0
    layer_overhead_cycles: float = 0.0
    static_power_w: float = 0.0
    schedule: str = "balanced"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise VelcroError(f"schedule '{self.schedule}' is unknown; use 'balanced' or "
                              "'channels'")
        for name in ("input_size", "filter_size", "modules"):
            if getattr(self, name) < 1:
                raise VelcroError(f"hardware {name} must be at least 1, not "
                                  f"{getattr(self, name)}")
        if self.macs_per_cycle is not None and self.macs_per_cycle < 1:
            raise VelcroError(f"macs_per_cycle must be at least 1, not {self.macs_per_cycle}")

    @property
    def datapath_macs(self) -> int:
        """MACs one module performs per cycle."""
        return self.macs_per_cycle or self.filter_size ** 2


@dataclass(frozen=True)
class LayerShape:
    """What the model needs to know of one site's layer (per image).

    Attributes:
        name: the site name.
        output_shape: the activation's shape, e.g. (C, H, W) or (features,).
        macs_per_output: MACs per output element (in_channels / groups * kernel elements).
        input_elements: elements of the layer's input.
        weight_elements: elements of the layer's weight.
        channel_axis: the channel axis of ``output_shape``.

    Example:
        >>> shape = layer_shapes(velcro.models.resnet18(), (3, 224, 224))["layer1.0.relu:0"]
        >>> shape.output_shape, shape.macs_per_output
        ((64, 56, 56), 576)
    """

    name: str
    output_shape: tuple[int, ...]
    macs_per_output: int
    input_elements: int = 0
    weight_elements: int = 0
    channel_axis: int = 0

    @property
    def outputs(self) -> int:
        """Output elements of the layer per image."""
        return math.prod(self.output_shape)


def conv_layer(name: str, in_channels: int, out_channels: int, size: int, kernel_size: int,
               *, groups: int = 1) -> LayerShape:
    """A same-padded, stride-1 square convolution layer of ``size`` x ``size`` maps.

    Example:
        >>> conv_layer("module", 1, 1, 64, 3).macs_per_output   # the paper's module
        9
    """
    per_output = in_channels // groups * kernel_size ** 2
    return LayerShape(name, (out_channels, size, size), per_output,
                      in_channels * size * size, out_channels * per_output)


def layer_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, LayerShape]:
    """The :class:`LayerShape` of every site of ``model`` for one image of ``input_shape``.

    Args:
        model: any model :func:`velcro.trace` accepts.
        input_shape: one image's shape, e.g. (3, 224, 224).

    Example:
        >>> layer_shapes(velcro.models.resnet18(), (3, 224, 224))["relu"].output_shape
        (64, 112, 112)
    """
    gm = trace(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(1, *input_shape, device=device))
    producers = producer_nodes(gm)
    by_name = {node.name: node for node in gm.graph.nodes}
    shapes = {}
    for site in find_sites(gm):
        producer = producers.get(site.name)
        if producer is None:
            continue
        weight = weight_shape(gm, producer)
        out_shape = tuple(by_name[site.node].meta["tensor_meta"].shape[1:])
        source = producer.args[0].meta.get("tensor_meta") if producer.args else None
        in_elements = math.prod(source.shape[1:]) if source is not None else 0
        shapes[site.name] = LayerShape(site.name, out_shape, math.prod(weight[1:]),
                                       in_elements, math.prod(weight), site.channel_axis)
    return shapes


@dataclass
class LayerCost:
    """One layer on the accelerator, per image.

    Attributes:
        name: the site name.
        outputs, computed: output elements in all and those the datapath computes.
        macs: MACs performed.
        cycles: layer duration in cycles (all modules working in parallel).
        energy_pj: total energy; ``energy_parts`` breaks it down (compute, skip, mask,
            load, static).

    Example:
        >>> layer = estimate(layer_shapes(model, (3, 224, 224)), plan).layers[0]
        >>> layer.name, layer.computed / layer.outputs
    """

    name: str
    outputs: int
    computed: int
    macs: int
    cycles: float
    energy_pj: float
    energy_parts: dict[str, float] = field(default_factory=dict)

    @property
    def saving_ratio(self) -> float:
        """Share of the layer's outputs not computed."""
        return 1.0 - self.computed / self.outputs if self.outputs else 0.0


@dataclass
class ModelCost:
    """A model (or one layer) on the accelerator: layers run one after another.

    Example:
        >>> cost = estimate({"m": conv_layer("m", 1, 1, 64, 3)})
        >>> cost.cycles   # 4096 outputs, one cycle each, 16 modules
        256.0
    """

    layers: list[LayerCost]
    config: HardwareConfig

    @property
    def cycles(self) -> float:
        """Cycles of one image through every layer."""
        return sum(layer.cycles for layer in self.layers)

    @property
    def seconds(self) -> float:
        """Seconds per image at the configured clock."""
        return self.cycles / (self.config.clock_mhz * 1e6)

    @property
    def images_per_second(self) -> float:
        """Throughput: images per second."""
        return 1.0 / self.seconds if self.seconds else math.inf

    @property
    def energy_uj(self) -> float:
        """Energy per image in microjoules."""
        return sum(layer.energy_pj for layer in self.layers) * 1e-6

    @property
    def saving_ratio(self) -> float:
        """Outputs not computed, over all layers (the papers' C)."""
        outputs = sum(layer.outputs for layer in self.layers)
        computed = sum(layer.computed for layer in self.layers)
        return 1.0 - computed / outputs if outputs else 0.0

    def relative_to(self, baseline: ModelCost) -> dict[str, float]:
        """``throughput`` (speed-up) and ``energy`` (ratio) against ``baseline``."""
        return {"throughput": baseline.cycles / self.cycles if self.cycles else math.inf,
                "energy": self.energy_uj / baseline.energy_uj if baseline.energy_uj else 0.0}

    def to_dict(self) -> dict:
        """Plain data: totals, the config and the per-layer rows."""
        return {"cycles": self.cycles, "seconds": self.seconds,
                "images_per_second": self.images_per_second, "energy_uj": self.energy_uj,
                "saving_ratio": self.saving_ratio, "config": asdict(self.config),
                "layers": [asdict(layer) for layer in self.layers]}


def _layer_cost(shape: LayerShape, mask: torch.Tensor | None, granularity: str,
                config: HardwareConfig) -> LayerCost:
    outputs = shape.outputs
    axis = shape.channel_axis % len(shape.output_shape)
    channels = shape.output_shape[axis]
    if mask is None:
        skipped_per_channel = torch.zeros(channels, dtype=torch.int64)
    else:
        if tuple(mask.shape) != shape.output_shape:
            raise VelcroError(f"the mask of site '{shape.name}' has shape {tuple(mask.shape)}, "
                              f"the layer's output {shape.output_shape}; make the plan for "
                              "this model and input size")
        dims = [d for d in range(mask.dim()) if d != axis]
        skipped_per_channel = mask.to(torch.int64).sum(dim=dims) if dims else mask.long()
    per_channel = outputs // channels
    skipped = int(skipped_per_channel.sum())
    computed = outputs - skipped
    cycles_per_output = math.ceil(shape.macs_per_output / config.datapath_macs)
    skipped_float = skipped_per_channel.to(torch.float64)  # float32 would round the cycles
    work = (per_channel - skipped_float) * cycles_per_output + skipped_float * config.skip_cycles
    if config.schedule == "balanced":
        busy = float(work.sum()) / config.modules
    else:
        per_module = torch.zeros(config.modules, dtype=torch.float64)
        per_module.index_add_(0, torch.arange(channels) % config.modules, work)
        busy = float(per_module.max())
    spatial = shape.output_shape[1:] if axis == 0 else shape.output_shape[:-1]
    tiles = math.prod(math.ceil(side / config.input_size) for side in spatial) if spatial else 1
    cycles = busy + tiles * config.layer_overhead_cycles

    k = shape.macs_per_output
    skipped_channels = int((skipped_per_channel == per_channel).sum()) if per_channel else 0
    if granularity == "channel":
        control = skipped_channels * config.skip_energy_pj
        mask_reads = 0.0
        live_weights = shape.weight_elements * (channels - skipped_channels) // channels
    else:
        control = skipped * config.skip_energy_pj
        mask_reads = (outputs * config.mask_read_energy_pj) if mask is not None else 0.0
        live_weights = shape.weight_elements
    seconds = cycles / (config.clock_mhz * 1e6)
    parts = {
        "compute": computed * (k * (config.mac_energy_pj + config.read_energy_pj)
                               + config.write_energy_pj),
        "skip": skipped * (config.read_energy_pj + config.write_energy_pj) + control,
        "mask": mask_reads,
        "load": (shape.input_elements + live_weights) * config.load_energy_pj,
        "static": config.static_power_w * seconds * 1e12,
    }
    return LayerCost(shape.name, outputs, computed, computed * k, cycles, sum(parts.values()),
                     parts)


def estimate(layers: Mapping[str, LayerShape], plan: Plan | Mapping[str, torch.Tensor] | None
             = None, config: HardwareConfig | None = None, **overrides) -> ModelCost:
    """Cycles, throughput and energy of ``layers`` on the accelerator under ``plan``.

    Args:
        layers: site name -> :class:`LayerShape` (from :func:`layer_shapes` or
            :func:`conv_layer`).
        plan: a :class:`Plan` (element or channel), a mapping site name -> bool mask (True =
            compressed, element semantics), or None for the uncompressed model. Sites of the
            plan that ``layers`` lacks are ignored; layers the plan lacks are uncompressed.
        config: the accelerator (default :class:`HardwareConfig`).
        **overrides: fields of ``config`` to replace, e.g. ``modules=8``.

    Returns:
        A :class:`ModelCost`; ``relative_to`` compares two of them.

    Example:
        >>> layer = {"m": conv_layer("m", 64, 64, 64, 3)}
        >>> mask = {"m": torch.rand(64, 64, 64) < 0.5}
        >>> estimate(layer, mask).relative_to(estimate(layer))["throughput"]
        2.0...
    """
    config = replace(config or HardwareConfig(), **overrides)
    granularity = plan.granularity if isinstance(plan, Plan) else "element"
    costs = []
    for name, shape in layers.items():
        mask = None
        if isinstance(plan, Plan):
            if name in plan.sites and plan.sites[name].units.numel():
                mask = plan.mask(name)
        elif plan is not None and name in plan:
            mask = plan[name].to(torch.bool)
        costs.append(_layer_cost(shape, mask, granularity, config))
    return ModelCost(costs, config)

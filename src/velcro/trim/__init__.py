"""Structured trimming: a channel Plan turned into a smaller model with the same outputs.

One general pass over the traced graph, no per-architecture cases (see ``_analysis`` for the
analysis and ``_build`` for the code it generates):

1. batch-norms are folded into the convolutions that feed them;
2. constant propagation over channels: the plan's channels at each site are constants, and
   so is any channel computed from constants by a channelwise operation (batch-norm,
   activation, pooling, a depthwise convolution), an addition of two constants, a
   concatenation or a flatten;
3. liveness: a filter is computed only if something downstream reads it as a computed value;
4. code generation: each convolution/linear keeps its live filters and the weight columns of
   its computed inputs; the constant inputs are folded into its bias (a bias map where
   zero padding or a spatially varying constant makes the contribution position-dependent;
   a plain bias where it is uniform). Residual additions add the channels both sides
   compute, and fold the other side's constants into the producer's bias; every tensor of a
   residual stream stores its channels in one shared order (``_order``), chosen so that
   the channels a sum takes from its shortcut are one slice where an order allows it.
   Concatenations keep what their branches compute. Anything trimming does not understand
   receives the full tensor with the constants put back, so it computes exactly what it did
   (only its own savings are lost).

Affine plans (``constant="affine"``) are first folded into the graph by ``_affine``: the
predictions go into the weights of the consumers linear in the site, and are computed
explicitly (a 1x1 convolution over the kept channels) before any other consumer.

The result equals ``velcro.apply(model, plan)`` up to float rounding.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from velcro._globals import rng_kept
from velcro.apply import check_plan_fits
from velcro.errors import VelcroError, VelcroWarning
from velcro.graph import find_sites, trace
from velcro.graph.capture import recorded_example
from velcro.plan import Plan
from velcro.trim import _analysis, _normalize, _report, _serialize
from velcro.trim._affine import fold_affine
from velcro.trim._build import Builder
from velcro.trim._widths import WidthChooser, check_policy

__all__ = ["load_trimmed", "save_trimmed", "trim"]


@rng_kept
def trim(
    model: nn.Module,
    plan: Plan,
    *,
    input_shape: tuple[int, ...] | None = None,
    channel_multiple: int | str | Mapping[str, int] = "auto",
    auto_batch: int = 1,
    check: bool = True,
) -> fx.GraphModule:
    """A smaller model computing what ``velcro.apply(model, plan)`` computes.

    The plan's constant channels are never computed: their filters are removed (with their
    batch-norm entries, folded into the convolution), their effect on later layers is
    precomputed into biases, and the filters whose outputs nobody reads any more go too.

    The trimmed model is specific to the input size the plan's statistics were collected at
    (its constants are per-position maps). It is an ``fx.GraphModule`` of ordinary modules
    (``nn.Conv2d``, ``nn.Linear``, ``nn.BatchNorm2d``, activations) and four small ones
    (a convolution plus a bias map, a channel selection, a channel-aligned sum, and a
    placement of constants used only before operations trimming does not understand);
    ``velcro_sites`` maps each site name to the node computing what is left of it, and
    ``velcro_channel_widths`` each trimmed convolution's name to its filter count.

    **Speed.** The MACs saved are real (``velcro.cost(small, x)``), and at batch 32 the
    measured CPU speedup comes close to the MAC ratio. At batch 1 in eager mode it falls
    short for deep trims: oneDNN reorders every NCHW convolution's input and output (work
    that shrinks with channels, not channels squared), narrow convolutions run at a lower
    fraction of peak, and pooling, activations and additions shrink only linearly. Running
    the trimmed model (and the original, for a fair comparison) in channels_last, with
    ``small.to(memory_format=torch.channels_last)`` and channels_last inputs, or exporting it
    to onnxruntime recovers most of the difference (``benchmarks/bench_trim.py``).

    **Saving and loading.** Never pickle it (``torch.save(small)`` and ``torch.export.save``
    run code from the file on load). Two safe ways:

    - :func:`save_trimmed` / :func:`load_trimmed`: a JSON description of the trimmed graph
      (allow-listed modules and functions, literal arguments) plus its weights in
      safetensors; loading needs neither the original model nor the plan and runs no code
      from the file:

      >>> velcro.save_trimmed(small, "cats.trimmed.json")
      >>> small = velcro.load_trimmed("cats.trimmed.json")

    - the recipe: the plan plus the original weights rebuild the same architecture
      (the layout depends on the plan and, where a folded contribution happens to be
      uniform, on the weights: rebuild from the same weights), into which the trimmed
      ``state_dict`` loads, e.g. after fine-tuning. With ``channel_multiple="auto"`` the
      widths depend on timings too: keep ``small.velcro_channel_widths`` (plain JSON) and
      pass it back, so that the rebuild has the same widths:

      >>> save_file(small.state_dict(), "cats.trimmed.safetensors")
      >>> Path("cats.widths.json").write_text(json.dumps(small.velcro_channel_widths))
      >>> widths = json.loads(Path("cats.widths.json").read_text())
      >>> small = velcro.trim(model, velcro.Plan.load("cats.plan.json"),
      ...                     channel_multiple=widths)
      >>> small.load_state_dict(load_file("cats.trimmed.safetensors"))

    For deployment without Python, export it: :func:`velcro.export_onnx`.

    Args:
        model: the model the plan was made for (it is not modified).
        plan: a channel-granularity :class:`Plan`.
        input_shape: one input's shape (no batch axis), e.g. ``(3, 224, 224)``. Inferred from
            the plan's site shapes when not given.
        channel_multiple: the filter count of each trimmed convolution (``groups == 1``;
            the extra filters are zero, and :func:`velcro.cost` counts them). ``"auto"``
            (default): where the live count k is not a multiple of 8, time the convolution
            as it will run (its input channels and size, the model's device and dtype,
            batch ``auto_batch``, torch's current thread count) with k and with k rounded
            up to 8, interleaved, and round only where the median is at least 5% faster
            (kernels often run multiples of 8 faster, but on narrow layers the extra MACs
            can cost more than they save). Timings are cached per process; each costs up
            to about 0.3 s (ResNet-18 at 224x224: 0.4 s in all on one CPU thread). An
            integer m: round up to a multiple of m (never above the original count); 1
            keeps exactly the live filters. A dict (a trimmed model's
            ``velcro_channel_widths``): exactly these widths, each from k to the original
            count, for every trimmed convolution.
        auto_batch: the batch size ``"auto"`` times at (the one you will run).
        check: verify that the plan was made from statistics of this model (fingerprints).

    Returns:
        An ``fx.GraphModule`` in eval mode, on the model's device.

    Raises:
        VelcroError: an element-granularity plan, a plan for another model, an input size
            that cannot be inferred, or a widths dict that does not fit this plan.

    Example:
        >>> plan = velcro.plan(stats, 0.3, granularity="channel")
        >>> small = velcro.trim(model, plan)
        >>> torch.allclose(small(x), velcro.apply(model, plan)(x), rtol=1e-4, atol=1e-5)
        True
    """
    if plan.granularity != "channel":
        raise VelcroError(
            f"trimming needs a channel plan, got a '{plan.granularity}' plan; make one with "
            "velcro.plan(stats, thresholds, granularity='channel')"
        )
    policy = check_policy(channel_multiple)
    if isinstance(auto_batch, bool) or not isinstance(auto_batch, int) or auto_batch < 1:
        raise VelcroError(f"auto_batch must be a positive integer, got {auto_batch!r}")
    if check:
        check_plan_fits(model, plan)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    shape = _input_shape(model, plan, input_shape)
    example = recorded_example(model, {"input_shape": list(shape)}) if shape else None
    gm = trace(model, example).cpu()
    sites = find_sites(gm)
    by_name = {site.name: site for site in sites}
    unknown = [name for name in plan.sites if name not in by_name]
    if unknown:
        raise VelcroError(
            f"plan names site '{unknown[0]}' that this model does not have; make the plan "
            "from statistics of this model"
        )
    inferred = shape is None
    if inferred:
        shape = _infer_input_shape(gm, plan, sites)
    dtype = next((t.dtype for t in gm.parameters() if t.is_floating_point()),
                 torch.get_default_dtype())
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(1, *shape, generator=generator, dtype=dtype)
    try:
        _normalize.functional_to_modules(gm, _analysis.record(gm, example))
        _normalize.fold_linear_batchnorm(gm)
        _analysis.fold_batchnorm(gm)
        nodes = {node.name: node for node in gm.graph.nodes}
        fold_affine(gm, {name: nodes[by_name[name].node] for name in plan.sites}, plan)
        values = _analysis.record(gm, example)
    except VelcroError:
        raise
    except Exception as exc:  # the user's forward rejected the shape
        if inferred:
            raise VelcroError(_NO_SHAPE) from None
        raise VelcroError(
            f"{type(model).__name__} does not run on one input of "
            f"{'x'.join(map(str, shape))}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
            "give input_shape=(channels, height, width) of the calibration images"
        ) from None
    nodes = {node.name: node for node in gm.graph.nodes}
    site_plans = {}
    for name, site_plan in plan.sites.items():
        node = nodes[by_name[name].node]
        site_plans[node] = (site_plan.units.to(torch.int64), site_plan.constant.to(dtype),
                            site_plan.channel_axis)
    analysis = _analysis.analyse(gm, values, site_plans)
    widths = WidthChooser(policy, device, auto_batch)
    builder = Builder(gm, analysis, widths)
    small = builder.build(type(model).__name__)
    widths.check_all_used()
    _serialize.preserve(small, "velcro_channel_widths", dict(widths.chosen))
    _serialize.preserve(small, "velcro_sites", {
        site.name: (builder.sites[nodes[site.node]].name
                    if builder.sites.get(nodes[site.node]) is not None else None)
        for site in sites if nodes[site.node] in builder.sites
    })
    _serialize.preserve(small, "velcro_input_shape", shape)
    report = {site.name: _report.site_report(gm, analysis, site, nodes[site.node],
                                             plan.sites[site.name].units)
              for site in sites if site.name in plan.sites
              and plan.sites[site.name].units.numel()}
    _serialize.preserve(small, "velcro_trim_report", report)
    line = _report.summary(report)
    if line is not None:
        warnings.warn(line, VelcroWarning, stacklevel=2)
    return small.eval().to(device)


def _input_shape(model: nn.Module, plan: Plan,
                 given: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The given input shape, else the one the plan's statistics recorded (None: neither)."""
    recorded = recorded_example(model, plan.info)
    recorded_shape = tuple(recorded.shape[1:]) if recorded is not None else None
    if given is None:
        return recorded_shape
    if not isinstance(given, (tuple, list)) or not given or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in given):
        raise VelcroError(f"input_shape must be one input's shape, e.g. (3, 224, 224), "
                          f"got {given!r}")
    if recorded_shape is not None and tuple(given) != recorded_shape:
        raise VelcroError(
            f"input_shape {'x'.join(map(str, given))} is not the calibration input size "
            f"{'x'.join(map(str, recorded_shape))} the plan was made at; its constants are "
            "per position there: leave input_shape out, or calibrate at this size"
        )
    return tuple(given)


def save_trimmed(model: fx.GraphModule, path: str | os.PathLike) -> Path:
    """Save a model from :func:`trim` without pickle: ``path`` (JSON) + ``path.safetensors``.

    The JSON lists the graph's nodes (modules by constructor arguments, functions and
    methods by allow-listed names, literal arguments); the weights go to safetensors. Both
    files are written atomically.

    Args:
        model: the ``fx.GraphModule`` that :func:`trim` returned (possibly fine-tuned).
        path: the JSON file to write; the weights go to ``path`` + ``.safetensors``.

    Returns:
        ``path``.

    Raises:
        VelcroError: the graph holds an operation with no safe description (an operation
            of the original model trimming left as it was, outside the allow-list); save the
            plan and rebuild with :func:`trim` instead.

    Example:
        >>> velcro.save_trimmed(velcro.trim(model, plan), "cats.trimmed.json")
    """
    return _serialize.save(model, path)


@rng_kept
def load_trimmed(path: str | os.PathLike) -> fx.GraphModule:
    """Rebuild a model saved by :func:`save_trimmed`, running no code from the files.

    Args:
        path: the JSON file :func:`save_trimmed` wrote (its ``.safetensors`` beside it).

    Returns:
        The trimmed ``fx.GraphModule`` in eval mode, on the CPU.

    Raises:
        VelcroError: a missing, unreadable or foreign file.

    Example:
        >>> small = velcro.load_trimmed("cats.trimmed.json")
        >>> small(images).argmax(1)
    """
    return _serialize.load(path)


def _first_layer_input(gm: fx.GraphModule) -> tuple[int, int] | None:
    """(channels, spatial dims) the first conv/linear reached from the input expects."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    frontier, seen = [placeholders[0]], set()
    while frontier:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                return module.in_channels, module.weight.dim() - 2
            if isinstance(module, nn.Linear):
                return module.in_features, 0
        frontier.extend(node.users)
    return None


def _prefix_shape(gm: fx.GraphModule, stop: str, example: torch.Tensor) -> tuple[int, ...] | None:
    """The shape of node ``stop`` on ``example``, running only the graph up to it."""
    interpreter = fx.Interpreter(gm)
    env: dict[fx.Node, object] = {}
    interpreter.env = env
    args = iter([example])
    try:
        with torch.no_grad():
            for node in gm.graph.nodes:
                if node.op == "placeholder":
                    env[node] = next(args)
                    continue
                env[node] = interpreter.run_node(node)
                if node.name == stop:
                    value = env[node]
                    return tuple(value.shape[1:]) if isinstance(value, torch.Tensor) else None
    except Exception:  # too small an input for some layer: not this size
        return None
    return None


_NO_SHAPE = (
    "cannot tell the input size: the plan records none (its statistics predate velcro "
    "recording it) and the plan's site shapes do not determine it; pass input_shape=(channels, "
    "height, width) of the calibration images to velcro.trim, or calibrate again"
)


def _infer_input_shape(gm: fx.GraphModule, plan: Plan, sites: list) -> tuple[int, ...]:
    """The input shape that reproduces the plan's first site shape (then checked in full)."""
    first = _first_layer_input(gm)
    spatial_site = next((s for s in sites if s.name in plan.sites
                         and plan.sites[s.name].channel_axis == 0
                         and len(plan.sites[s.name].shape) > 1), None)
    failure = VelcroError(_NO_SHAPE)
    if first is None:
        raise failure
    channels, dims = first
    if dims == 0 or spatial_site is None:
        return (channels,)
    target = plan.sites[spatial_site.name].shape
    # input = stride * site size + offset (unpadded kernels), exact multiples first
    offsets = sorted(range(-16, 17), key=lambda o: (abs(o), -o))
    for offset in offsets:
        for factor in (1, 2, 4, 8, 16, 32, 64):
            size = tuple(t * factor + offset for t in target[1:])
            if min(size) < 1 or len(size) != dims:
                continue
            got = _prefix_shape(gm, spatial_site.node, torch.zeros(1, channels, *size))
            if got == tuple(target):
                return (channels, *size)
    raise failure


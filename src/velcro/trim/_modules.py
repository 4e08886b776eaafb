"""The few modules a trimmed model adds to plain convolutions, linears and batch-norms.

Each does one dense operation over the channels that are still computed, so that a trimmed
model stays a sequence of ordinary PyTorch (and ONNX) operations.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from velcro.trim._place import (
    conv_placeable,
    exporting,
    is_identity_placement,
    place,
    place_by_conv,
    run_of,
)

# A contribution whose spread over positions is below this (relative) is a plain bias.
UNIFORM_TOLERANCE = 1e-6


class _BiasMapMixin:
    """Adds a precomputed per-image map (the folded contribution of constant input channels).

    A constant input channel's contribution to a convolution is position-dependent where
    zero padding cuts the kernel, or where the constant itself is a map; ``bias_map`` holds
    that contribution minus the part already in the plain ``bias``.
    """

    bias_map: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)  # type: ignore[misc]
        return out.add_(self.bias_map)  # into the fresh output: no allocation

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bias_map={tuple(self.bias_map.shape)}"  # type: ignore[misc]


class Conv1dWithMap(_BiasMapMixin, nn.Conv1d):
    """``nn.Conv1d`` plus a bias map."""


class Conv2dWithMap(_BiasMapMixin, nn.Conv2d):
    """``nn.Conv2d`` plus a bias map."""


class Conv3dWithMap(_BiasMapMixin, nn.Conv3d):
    """``nn.Conv3d`` plus a bias map."""


class LinearWithMap(_BiasMapMixin, nn.Linear):
    """``nn.Linear`` on inputs with extra axes (tokens), plus a bias map over them."""


WITH_MAP = {nn.Conv1d: Conv1dWithMap, nn.Conv2d: Conv2dWithMap, nn.Conv3d: Conv3dWithMap,
            nn.Linear: LinearWithMap}


class ChannelSelect(nn.Module):
    """Keeps the channels at ``index`` (positions along ``dim``), in that order (a copy).

    A contiguous run is a slice (``Slice`` in ONNX), anything else a gather with constant
    indices (``Gather``).
    """

    def __init__(self, index: torch.Tensor, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("index", index.to(torch.int64).clone())
        self._find_run()
        self.register_load_state_dict_post_hook(_refind)

    def _find_run(self) -> None:
        self.run = run_of(self.index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.run is not None:  # a copy: a sum may add into it in place
            return x.narrow(self.dim, *self.run).clone()
        return x.index_select(self.dim, self.index)

    def config(self) -> dict:
        return {"channels": self.index.numel(), "dim": self.dim}

    @classmethod
    def from_config(cls, config: dict) -> ChannelSelect:
        return cls(torch.zeros(int(config["channels"]), dtype=torch.int64), int(config["dim"]))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, channels={self.index.numel()}"


def _refind(module: nn.Module, incompatible_keys: object) -> None:
    module._find_run()


class ChannelSum(nn.Module):
    """The sum (or difference) of tensors holding different subsets of the channels.

    ``out = base + sum_i sign_i * place(x_i)`` where ``base`` (the first input) holds every
    output channel in order, and input i adds its channels at positions ``src_i`` to output
    positions ``dst_i``. Run eagerly, contiguous positions become in-place slice additions
    (the common case, the channels two branches share laid out first, costs one); exported,
    each placement is static: nothing where it moves nothing, else a 1x1 convolution with a
    0/1 weight on channels-first maps (:func:`velcro.trim._place.place_by_conv`: a ``Conv``,
    which onnxruntime keeps in its blocked layout and fuses with the ``Add``, where a
    ``Slice``, ``Pad`` or ``Gather`` would reorder the tensor out of it and back; it costs
    ``base channels x x_i channels`` MACs per position), and on features a pad or a gather
    with constant indices (:func:`velcro.trim._place.place`), then an ``Add``.

    Args:
        signs: +1 or -1 per input; the first input's sign is +1.
        sources, targets: per further input, positions in that input and in the output.
        dim: the channel axis.
        inplace: the first input is a fresh tensor nobody else reads: add into it.
    """

    def __init__(self, signs: list[int], sources: list[torch.Tensor],
                 targets: list[torch.Tensor], dim: int, inplace: bool) -> None:
        super().__init__()
        self.dim = dim
        self.inplace = inplace
        self.signs = [int(sign) for sign in signs]
        for i, (source, target) in enumerate(zip(sources, targets, strict=True)):
            self.register_buffer(f"source_{i}", source.to(torch.int64).clone())
            self.register_buffer(f"target_{i}", target.to(torch.int64).clone())
        self._find_run()
        self.register_load_state_dict_post_hook(_refind)

    def _find_run(self) -> None:
        """Contiguous positions become slices (recomputed when indices are loaded)."""
        count = len(self.signs) - 1
        sources = [getattr(self, f"source_{i}") for i in range(count)]
        targets = [getattr(self, f"target_{i}") for i in range(count)]
        self.source_slices = [run_of(index) for index in sources]
        self.target_slices = [run_of(index) for index in targets]
        self.pairs = [None if s.is_meta else list(zip(t.tolist(), s.tolist(), strict=True))
                      for s, t in zip(sources, targets, strict=True)]

    def config(self) -> dict:
        count = len(self.signs) - 1
        return {"signs": self.signs, "dim": self.dim, "inplace": self.inplace,
                "sizes": [[getattr(self, f"source_{i}").numel(),
                           getattr(self, f"target_{i}").numel()] for i in range(count)]}

    @classmethod
    def from_config(cls, config: dict) -> ChannelSum:
        sizes = [(int(a), int(b)) for a, b in config["sizes"]]
        return cls([int(s) for s in config["signs"]],
                   [torch.zeros(a, dtype=torch.int64) for a, _ in sizes],
                   [torch.zeros(b, dtype=torch.int64) for _, b in sizes],
                   int(config["dim"]), bool(config["inplace"]))

    def forward(self, base: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        if exporting():
            return self._static(base, others)
        out = base
        fresh = self.inplace
        for i, x in enumerate(others):
            source = self.source_slices[i]
            if source is not None and source == (0, x.shape[self.dim]):
                piece = x
            elif source is not None:
                piece = x.narrow(self.dim, source[0], source[1])
            else:
                piece = x.index_select(self.dim, getattr(self, f"source_{i}"))
            if self.signs[i + 1] < 0:
                piece = -piece
            target = self.target_slices[i]
            if target is not None and target == (0, out.shape[self.dim]):
                out = out.add_(piece) if fresh else out + piece
                fresh = True
                continue
            if not fresh:
                out = out.clone()
                fresh = True
            if target is not None:
                out.narrow(self.dim, target[0], target[1]).add_(piece)
            else:
                out.index_add_(self.dim, getattr(self, f"target_{i}"), piece)
        return out

    def _static(self, base: torch.Tensor, others: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Out of place, every placement with constant positions (what exporters see)."""
        out = base
        for i, x in enumerate(others):
            where = [-1] * base.shape[self.dim]
            for target, source in self.pairs[i]:
                where[target] = source
            if is_identity_placement(where, x.shape[self.dim]):
                piece = x
            elif conv_placeable(x, self.dim):  # one Conv: stays in a blocked layout
                piece = place_by_conv(x, self.dim, where)
            else:
                piece = place(x, self.dim, where)
            out = out + piece if self.signs[i + 1] > 0 else out - piece
        return out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, inputs={len(self.signs)}, inplace={self.inplace}"


class Materialize(nn.Module):
    """The full tensor: the computed channels in their places, the constants in theirs.

    Used only where something needs every channel (the model's output, an operation trimming
    does not understand). ``constant`` holds the missing channels (one image, in channel
    order); ``order`` maps each channel to its position in ``cat([x, constant])``. It is
    computed with static operations: the computed channels placed by a pad or a gather with
    constant indices (:func:`velcro.trim._place.place`), plus one constant tensor holding
    the constants in their places and zeros elsewhere (``filled``, derived from the two
    buffers, not saved).
    """

    def __init__(self, constant: torch.Tensor, order: torch.Tensor, dim: int,
                 computed: bool) -> None:
        super().__init__()
        self.dim = dim
        self.computed = computed
        self.register_buffer("constant", constant.clone())
        self.register_buffer("order", order.to(torch.int64).clone())
        self._find_run()
        self.register_load_state_dict_post_hook(_refind)

    def _find_run(self) -> None:
        """``where`` (each channel's position in x, or -1) and ``filled``, from the buffers."""
        self.where: list[int] | None = None
        self.register_buffer("filled", None, persistent=False)
        if self.order.is_meta or self.constant.is_meta or not self.computed:
            return
        missing = self.constant.shape[self.dim]
        order = self.order.tolist()
        count = max(order) + 1 - missing if missing else max(order, default=-1) + 1
        self.where = [p if p < count else -1 for p in order]
        if missing and bool(self.constant.ne(0).any()):
            shape = list(self.constant.shape)
            shape[self.dim] = count
            both = torch.cat([self.constant.new_zeros(shape), self.constant], self.dim)
            self.filled = both.index_select(self.dim, self.order).contiguous()

    def config(self) -> dict:
        return {"constant": list(self.constant.shape), "channels": self.order.numel(),
                "dim": self.dim, "computed": self.computed}

    @classmethod
    def from_config(cls, config: dict) -> Materialize:
        return cls(torch.zeros([int(d) for d in config["constant"]]),
                   torch.zeros(int(config["channels"]), dtype=torch.int64),
                   int(config["dim"]), bool(config["computed"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.computed:  # x only gives the batch size
            constant = self.constant.to(x.dtype)
            return constant.expand(x.shape[0], *constant.shape[1:]).contiguous()
        placed = place(x, self.dim, self.where)
        return placed if self.filled is None else placed + self.filled.to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, constant_channels={self.constant.shape[self.dim]}"


def split_uniform(contribution: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-channel bias, remaining map or an empty tensor when every channel is uniform)."""
    if contribution.dim() == 2:  # (1, features): a plain bias
        return contribution[0], torch.empty(0)
    moved = contribution[0].movedim(axis - 1, 0).flatten(1)
    centre = moved.mean(dim=1)
    spread = (moved - centre[:, None]).abs().amax(dim=1)
    scale = moved.abs().amax(dim=1).clamp_min(1.0)
    if bool((spread <= UNIFORM_TOLERANCE * scale).all()):
        return centre, torch.empty(0)
    view = [1] * (contribution.dim() - 1)
    view[axis - 1] = -1
    return centre, contribution[0] - centre.view(view)


def rebuild(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor,
             bias_map: torch.Tensor) -> nn.Module:
    """A conv/linear like ``module`` with these weights (and a bias map when non-empty)."""
    base = nn.Linear if isinstance(module, nn.Linear) else next(
        c for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(module, c))
    cls = WITH_MAP[base] if bias_map.numel() else base
    like = {"dtype": weight.dtype, "device": weight.device}  # not the default dtype
    if base is nn.Linear:
        new = cls(weight.shape[1], weight.shape[0], bias=True, **like)
    else:
        new = cls(weight.shape[1] * module.groups, weight.shape[0], module.kernel_size,
                  stride=module.stride, padding=module.padding, dilation=module.dilation,
                  groups=module.groups, bias=True, padding_mode=module.padding_mode, **like)
    dtype = weight.dtype
    with torch.no_grad():
        new.weight.copy_(weight)
        new.bias.copy_(bias.to(dtype))
    if bias_map.numel():
        new.register_buffer("bias_map", bias_map.to(dtype).contiguous())
    return new.to(weight.device)


def slice_batchnorm(module: nn.Module, layout: torch.Tensor) -> nn.Module:
    """The batch-norm of the channels in ``layout`` (padding positions reuse channel 0)."""
    index = layout.clamp_min(0)
    new = copy.deepcopy(module)
    new.num_features = layout.numel()
    for name in ("weight", "bias"):
        param = getattr(module, name)
        if param is not None:
            setattr(new, name, nn.Parameter(param.detach().index_select(0, index).clone()))
    for name in ("running_mean", "running_var"):
        buffer = getattr(module, name)
        if buffer is not None:
            setattr(new, name, buffer.index_select(0, index).clone())
    return new


def slice_depthwise(module: nn.Module, in_layout: torch.Tensor,
                    out_layout: torch.Tensor) -> nn.Module:
    """The depthwise convolution of the channels in ``in_layout`` (padding: zero filters)."""
    weight = module.weight.detach().index_select(0, out_layout.clamp_min(0)).clone()
    weight[out_layout < 0] = 0.0
    bias = (module.bias.detach().double().index_select(0, out_layout.clamp_min(0))
            if module.bias is not None else torch.zeros(out_layout.numel(), dtype=torch.float64))
    bias[out_layout < 0] = 0.0
    shell = copy.copy(module)
    shell.groups = in_layout.numel()
    return rebuild(shell, weight, bias, torch.empty(0))

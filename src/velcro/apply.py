"""Constant replacement: the reference semantics of a Plan."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from velcro.errors import VelcroError
from velcro.graph import find_sites, insert_after_sites, trace
from velcro.graph.capture import recorded_example
from velcro.plan import Plan
from velcro.stats import Stats


class ConstantReplace(nn.Module):
    """Replaces the masked positions of its input by constants; the rest pass unchanged.

    Args:
        mask: bool tensor of one image's activation shape, True where the output is constant.
        constant: tensor of that shape holding the constants at masked positions.
    """

    def __init__(self, mask: torch.Tensor, constant: torch.Tensor, site: str = "") -> None:
        super().__init__()
        self.register_buffer("mask", mask.clone())
        self.register_buffer("constant", constant.clone())
        self.site = site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_activation_shape(x, self.mask.shape, self.site)
        return torch.where(self.mask, self.constant.to(x.dtype), x)

    def extra_repr(self) -> str:
        return f"constant={int(self.mask.sum())}/{self.mask.numel()}"


def check_activation_shape(x: torch.Tensor, shape: torch.Size | tuple[int, ...],
                           site: str = "") -> None:
    """Raise VelcroError unless the batch ``x`` has one image's activation ``shape`` per
    image: a plan's constants are per element of the calibration images' activations, and
    images of another size (another crop, another preprocessing) do not fit them."""
    if tuple(x.shape[1:]) == tuple(shape):
        return
    def text(dims) -> str:
        return "x".join(map(str, dims))

    where = f" at site '{site}'" if site else ""
    raise VelcroError(
        f"the images give activations of {text(x.shape[1:])}{where}, but the plan's constants "
        f"are {text(shape)}: the plan was made on images of another size; preprocess these "
        "images as for calibration (velcro.data.loader_for(stats, ...) reuses what the "
        "statistics record; on the command line, leave --resize/--crop out)")


class AffineReplace(nn.Module):
    """Replaces channels ``units`` by their affine prediction from the other channels.

    ``out[:, r] = offset_r + sum_k coefficients[r, k] * x[:, k]`` at every position for the
    chosen channels r (coefficients are zero on the chosen channels' own columns); the
    other channels pass unchanged. The reference semantics of an affine channel plan.

    Args:
        units: the chosen channels.
        offset: tensor of one image's activation shape; the chosen channels' offsets.
        coefficients: ``(len(units), channels)``.
        channel_axis: the channel axis of one image's tensor (0, or -1 after a linear).
        site: the site's name, for messages.
    """

    def __init__(self, units: torch.Tensor, offset: torch.Tensor, coefficients: torch.Tensor,
                 channel_axis: int, site: str = "") -> None:
        super().__init__()
        axis = channel_axis % offset.dim()
        self.axis = axis + 1  # in the batched tensor
        self.shape = tuple(offset.shape)  # one image's activation shape, checked per batch
        self.site = site
        self.register_buffer("units", units.to(torch.int64).clone())
        self.register_buffer("offset", offset.index_select(axis, self.units).clone())
        self.register_buffer("coefficients", coefficients.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_activation_shape(x, self.shape, self.site)
        coefficients = self.coefficients.to(x.dtype)
        if self.axis == x.dim() - 1:  # channels last (after a linear layer)
            mixed = x @ coefficients.T
        else:  # channels ahead of the positions (after a convolution)
            mixed = torch.einsum("rc,nc...->nr...", coefficients, x)
        return x.index_copy(self.axis, self.units, mixed + self.offset.to(x.dtype))

    def extra_repr(self) -> str:
        return f"predicted={self.units.numel()}/{self.coefficients.shape[1]}"


def replacement(plan: Plan, name: str) -> nn.Module:
    """The module that puts site ``name``'s plan in place (constants or predictions)."""
    site_plan = plan.sites[name]
    if site_plan.coefficients is not None:
        return AffineReplace(site_plan.units, site_plan.constant, site_plan.coefficients,
                             site_plan.channel_axis, name)
    return ConstantReplace(plan.mask(name), site_plan.constant, name)


def check_plan_fits(model: nn.Module, plan: Plan) -> None:
    """Raise VelcroError unless ``plan`` was made from statistics of ``model``."""
    Stats({}, plan.structure, plan.weights, plan.info).check_model(model,
                                                                   what="this plan was")


def apply(model: nn.Module, plan: Plan, *, check: bool = True) -> fx.GraphModule:
    """A new module whose planned activation outputs are the plan's constants.

    Every other output is computed as before; an affine plan's channels are computed from
    the site's kept channels (:class:`AffineReplace`). The original ``model`` is not
    modified. This is the reference semantics for both granularities; :func:`velcro.trim`
    computes the same function with the constant filters removed.

    Args:
        model: the model the plan's statistics came from.
        plan: a :class:`Plan` from :func:`velcro.plan` or :func:`velcro.search`.
        check: verify that the plan was made for this model (fingerprints).

    Example:
        >>> compressed = velcro.apply(model, velcro.plan(stats, 0.25))
        >>> compressed(images).argmax(1)
    """
    if check:
        check_plan_fits(model, plan)
    gm = trace(model, recorded_example(model, plan.info))
    sites = find_sites(gm)
    missing = [name for name in plan.sites if name not in {s.name for s in sites}]
    if missing:
        raise VelcroError(
            f"plan names site '{missing[0]}' that this model does not have; "
            "make the plan from statistics of this model"
        )
    replacers = {}
    for site in sites:
        site_plan = plan.sites.get(site.name)
        if site_plan is None or site_plan.units.numel() == 0:
            continue
        replacers[site.name] = replacement(plan, site.name)
    insert_after_sites(gm, sites, replacers, prefix="velcro_constant")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return gm.to(device)

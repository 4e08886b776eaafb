"""Do the task's images fit the statistics or plan? Checked on one image before the work.

Statistics and plans hold one tensor per site of the calibration images' activation shape.
Images of another size would fail deep inside a compressed model (a traceback) after the
uncompressed model was evaluated for minutes. One image through the traced model gives every
site's shape; any difference is one line naming the site, both shapes and the fix. Later
images are held to the first one's size by the loader (``ImageLoader(same_size=True)``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from velcro.data import ImageFolder, UnreadableImage
from velcro.errors import VelcroError

_TRIES = 16  # unreadable images to pass over before leaving the check to the loader


def _text(shape) -> str:
    return "x".join(map(str, shape))


def _first_image(folder: ImageFolder) -> torch.Tensor | None:
    for index in range(min(len(folder), _TRIES)):
        try:
            return folder[index][0]
        except UnreadableImage:
            continue
    return None


def check_sites_fit(model: nn.Module, expected: Mapping[str, tuple[int, ...]],
                    folder: ImageFolder, option: str, path: object) -> None:
    """Raise VelcroError unless the folder's first image gives each site of ``expected`` its
    shape there (the sites of ``option`` ``path``, a statistics or plan file)."""
    from torch.fx.passes.shape_prop import ShapeProp

    from velcro.graph import find_sites, site_nodes, trace

    image = _first_image(folder)
    if image is None:
        return  # nothing readable: the loader says so, naming the files
    gm = trace(model)
    sites = [site for site in find_sites(gm) if site.name in expected]
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(image[None].to(device))
    except Exception:  # noqa: BLE001 - the model itself rejects the image: evaluation says how
        return
    nodes = site_nodes(gm, sites)
    for site in sites:
        meta = nodes[site.name].meta.get("tensor_meta")
        if meta is None:
            continue
        actual, wanted = tuple(meta.shape[1:]), tuple(expected[site.name])
        if actual != wanted:
            raise VelcroError(
                f"images of {_text(image.shape)} give site '{site.name}' activations of "
                f"{_text(actual)}, but {option} '{path}' holds {_text(wanted)} (made on images "
                "of another size); set --crop (and --resize) as for calibration"
            )


def check_input_fits(model: nn.Module, folder: ImageFolder, option: str, path: object) -> None:
    """Raise VelcroError unless the folder's first image has the input shape a trimmed model
    was built for (its constants are folded into maps of that shape)."""
    wanted = getattr(model, "velcro_input_shape", None)
    image = _first_image(folder) if wanted else None
    if image is not None and tuple(image.shape) != tuple(wanted):
        raise VelcroError(
            f"{option} '{path}' was trimmed for images of {_text(wanted)}, but these are "
            f"{_text(image.shape)}; set --crop (and --resize) as for calibration"
        )

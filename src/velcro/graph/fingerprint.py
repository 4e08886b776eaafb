"""Fingerprints that tie statistics and plans to the model they were made from."""

from __future__ import annotations

import hashlib

import torch.nn as nn


def structure_fingerprint(model: nn.Module, site_names: list[str]) -> str:
    """Hash of the state_dict layout (keys, shapes, dtypes) and the site names."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    digest.update("|".join(site_names).encode())
    return digest.hexdigest()[:16]


def weights_fingerprint(model: nn.Module) -> str:
    """Hash of every state_dict tensor's bytes."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        data = tensor.detach().cpu().contiguous()
        if data.dtype.is_floating_point or data.dtype.is_complex:
            digest.update(data.view(-1).view(dtype=_same_size_int(data.element_size())).numpy())
        else:
            digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:16]


def _same_size_int(size: int):
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]

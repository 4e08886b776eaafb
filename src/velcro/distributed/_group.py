"""The process group velcro works in: found, or started from torchrun's environment."""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist

from velcro.errors import VelcroError

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def process_group(group: dist.ProcessGroup | None = None) -> dist.ProcessGroup | None:
    """The process group to work in, or None for a single process.

    An explicit ``group`` is returned as is. Otherwise the default group is used when one is
    initialised with more than one process, and started here (``env://``, as ``torchrun``
    sets it up) when the environment names a world of more than one process.

    Args:
        group: a group from ``torch.distributed.new_group``, or None for the default.

    Example:
        >>> process_group()            # plain `python script.py`
        None
    """
    if group is not None:
        if not isinstance(group, dist.ProcessGroup):
            raise VelcroError(
                f"group must be a torch.distributed ProcessGroup, got {type(group).__name__}; "
                "pass one made by torch.distributed.new_group, or leave it out"
            )
        if dist.get_rank(group) < 0:
            raise VelcroError(
                "this process is not a member of the group it was given; pass a group that "
                "contains every calling process"
            )
        return group
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if not _launched_with_peers():
            return None
        _start_default_group()
    world = dist.group.WORLD
    return world if dist.get_world_size(world) > 1 else None


def _launched_with_peers() -> bool:
    if not all(name in os.environ for name in _TORCHRUN_VARIABLES):
        return False
    try:
        return int(os.environ["WORLD_SIZE"]) > 1
    except ValueError:
        raise VelcroError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun"
        ) from None


def _start_default_group() -> None:
    if torch.cuda.is_available() and dist.is_nccl_available():
        # One process per GPU; CPU tensors (a CPU model, object collectives) still go by gloo.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    atexit.register(_stop_default_group)


def _stop_default_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (0 when not distributed, or torchrun's RANK before
    the group is started).

    Example:
        >>> rank()  # outside torchrun
        0
    """
    if group is not None:
        return dist.get_rank(group)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of processes in ``group`` (1 when not distributed).

    Example:
        >>> world_size()  # outside torchrun
        1
    """
    if group is not None:
        return dist.get_world_size(group)
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main(group: dist.ProcessGroup | None = None) -> bool:
    """True on the process that writes files and shows progress: rank 0, or a lone process.

    Example:
        >>> if velcro.distributed.is_main():
        ...     stats.save("cats.stats.safetensors")
    """
    return rank(group) == 0

"""Capture: a model as a torch.fx graph, the one representation sites, apply and trim share."""

from __future__ import annotations

import copy

import torch.fx as fx
import torch.nn as nn

from velcro.errors import VelcroError


class _Tracer(fx.Tracer):
    """A tracer that remembers which module it is in, to name the culprit on failure."""

    def __init__(self) -> None:
        super().__init__()
        self.current: list[str] = []
        self.failed_in: str | None = None

    def call_module(self, m, forward, args, kwargs):
        self.current.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.current[-1]
            raise
        finally:
            self.current.pop()


def trace(model: nn.Module, *, copy_model: bool = True) -> fx.GraphModule:
    """Trace ``model`` with torch.fx in eval mode.

    Args:
        model: any PyTorch module whose forward torch.fx can trace.
        copy_model: trace a deep copy, so that rewriting the graph never touches ``model``.

    Returns:
        A ``GraphModule`` computing the same function, in eval mode.

    Raises:
        VelcroError: the model cannot be traced; the message names the module being traced.

    Example:
        >>> gm = trace(velcro.models.resnet18())
    """
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model) if copy_model else model
        return gm.eval()
    root = copy.deepcopy(model) if copy_model else model
    was_training = root.training
    root.eval()
    tracer = _Tracer()
    try:
        graph = tracer.trace(root)
    except Exception as exc:  # torch.fx raises many types; all mean "not traceable"
        where = tracer.failed_in or ""
        owner = root.get_submodule(where) if where else root
        nodes = list(tracer.graph.nodes) if getattr(tracer, "graph", None) else []
        after = f", after node '{nodes[-1].name}'" if nodes else ""
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VelcroError(
            f"cannot trace {type(model).__name__} with torch.fx: in the forward of module "
            f"'{where or '<root>'}' ({type(owner).__name__}){after}: {first_line}; "
            "make that forward free of control flow on tensor values (torch.fx cannot trace "
            "`if`/loops over them) and of non-torch calls on tensors"
        ) from None
    finally:
        if not copy_model:
            root.train(was_training)
    gm = fx.GraphModule(root, graph, type(root).__name__)
    return gm.eval()

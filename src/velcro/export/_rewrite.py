"""A rewrite of exported ONNX graphs: constants added last.

A trimmed convolution adds its bias map right after the convolution, and a residual sum
then adds the other branch: ``(conv + map) + other``. Reassociated as ``(conv + other) +
map``, with every constant of such a chain of additions summed into one initializer,

- the graph has one ``Add`` fewer per constant beyond the first (a downsampling block's two
  bias maps become one);
- onnxruntime fuses the residual addition into the convolution again (its NCHWc
  convolution takes a same-shaped tensor to add; a bias map broadcast over the batch is not
  one), as it does for the original model.

The sums are reassociated, so outputs change by float rounding only.
"""

from __future__ import annotations

import numpy as np


def constants_last(model) -> int:
    """Rewrite ``model`` (an ``onnx_ir.Model``) in place; returns the number of chains
    rewritten. A chain is a tree of ``Add`` nodes whose inner results have no other reader."""
    graph = model.graph
    rewritten = 0
    for root in list(graph):
        if root.op_type != "Add" or root.domain not in ("", "ai.onnx") or _is_inner(root):
            continue
        adds, leaves = _tree(root)
        constants = [v for v in leaves if _constant(v) is not None]
        data = [v for v in leaves if _constant(v) is None]
        if not constants or not data or (len(constants) == 1 and leaves[-1] is constants[0]):
            continue  # nothing to gain: no constant, or one already added last
        dtype = _constant(constants[0]).dtype
        if any(_constant(v).dtype != dtype for v in constants):
            continue
        total = sum(_constant(v).astype(np.float64) for v in constants).astype(dtype)
        _rewire(graph, root, adds, data, constants, total)
        rewritten += 1
    if rewritten:
        graph.sort()
    return rewritten


def _is_inner(node) -> bool:
    """The node's one result is read by exactly one ``Add`` (and is no graph output)."""
    value = node.outputs[0]
    uses = list(value.uses())
    return (len(uses) == 1 and uses[0][0].op_type == "Add" and uses[0][0].domain == node.domain
            and not value.is_graph_output())


def _tree(root) -> tuple[list, list]:
    """(the Add nodes of the chain, inner first; its operands in order)."""
    adds, leaves = [], []

    def visit(node) -> None:
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and producer.op_type == "Add" and _is_inner(producer):
                visit(producer)
            else:
                leaves.append(value)
        adds.append(node)

    visit(root)
    return adds, leaves


def _constant(value) -> np.ndarray | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    array = value.const_value.numpy()
    return array if array.dtype.kind == "f" else None


def _rewire(graph, root, adds: list, data: list, constants: list,
            total: np.ndarray) -> None:
    """The data operands summed by the first Adds, the constant added by the root."""
    import onnx_ir as ir

    inner = adds[:-1]
    keep, spare = inner[:len(data) - 1], inner[len(data) - 1:]
    running = data[0]
    for node, operand in zip(keep, data[1:], strict=True):
        node.replace_input_with(0, running)
        node.replace_input_with(1, operand)
        node.outputs[0].shape = None  # broadcasting may differ from before: re-inferred
        running = node.outputs[0]
    constant = ir.Value(name=f"{root.outputs[0].name}_constants", const_value=ir.tensor(total),
                        shape=ir.Shape(total.shape),
                        type=ir.TensorType(ir.DataType.from_numpy(total.dtype)))
    graph.register_initializer(constant)
    root.replace_input_with(0, running)
    root.replace_input_with(1, constant)
    if spare:
        graph.remove(spare, safe=True)
    for value in constants:  # an initializer read by nothing else any more goes
        if value.is_initializer() and not list(value.uses()):
            graph.initializers.pop(value.name)

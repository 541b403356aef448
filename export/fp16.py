"""float16 variant of an exported fp32 graph, with the numerically fragile parts kept in float32.

``onnxruntime.transformers.float16.convert_float_to_float16`` casts weights and activations to float16
(inputs and outputs stay float32, so the runtime's contract does not change) except for:

* softmax and the reductions that compute normalization statistics (ReduceMean/ReduceL2, Sqrt,
  Reciprocal, Div, Pow): float16 loses the small differences they depend on (onnxruntime's
  stable-diffusion notes keep attention in fp32 for the same reason);
* the sinusoidal time embedding (every node under ``time_mlp``): ``t * freq`` reaches ~1000 rad, where
  float16 is spaced 0.5 apart, so sin/cos of it would be noise.
"""

from __future__ import annotations

import logging
from pathlib import Path

FP16_OP_BLOCK_LIST = [
    "Softmax",
    "ReduceMean",
    "ReduceL2",
    "ReduceSumSquare",
    "Sqrt",
    "Reciprocal",
    "Div",
    "Pow",
    "InstanceNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "Sin",
    "Cos",
    "Exp",
    "Range",
]
FP32_NODE_SCOPES = ("time_mlp",)


def convert_fp16(src: str | Path, dst: str | Path) -> dict:
    """Write the float16 version of ``src`` to ``dst``; return what was kept in float32.

    Returns:
        ``{"op_block_list": [...], "fp32_nodes": n, "fp16_io": False}`` for the manifest.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    keep = [n.name for n in model.graph.node if any(scope in n.name for scope in FP32_NODE_SCOPES)]
    quiet = logging.getLogger("onnxruntime.transformers.float16")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # its INFO lines dump whole node lists
    try:
        model16 = convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=list(DEFAULT_OP_BLOCK_LIST) + FP16_OP_BLOCK_LIST,
            node_block_list=keep,
        )
    finally:
        quiet.setLevel(level)
    _drop_duplicate_producers(model16.graph)  # some converter versions emit one Cast per consumer, same name
    _topological_sort(model16.graph)  # the converter appends its input casts at the end
    onnx.checker.check_model(model16)  # a graph every onnxruntime in the supported range loads
    onnx.save(model16, str(dst))
    return {"op_block_list": FP16_OP_BLOCK_LIST, "fp32_node_scopes": list(FP32_NODE_SCOPES), "io_dtype": "float32"}


def _drop_duplicate_producers(graph) -> int:
    """Remove nodes that recompute a value another node already produces under the same name (same op, inputs
    and attributes); return how many went.

    onnxruntime 1.30's ``convert_float_to_float16`` inserts one ``Cast`` per blocked consumer of a value,
    all named ``<value>_cast_to_fp32``: identical nodes whose shared output name fails onnx.checker
    (issue 20). Keeping the first is exact: the copies compute the same thing.

    Raises:
        ValueError: two different nodes write the same name (a real conflict, not a duplicate).
    """
    first: dict[str, object] = {}
    keep, dropped = [], 0
    for node in graph.node:
        produced = [name for name in node.output if name]
        clash = [first[name] for name in produced if name in first]
        if not clash:
            for name in produced:
                first[name] = node
            keep.append(node)
            continue
        other = clash[0]
        same = (node.op_type == other.op_type and list(node.input) == list(other.input)
                and list(node.output) == list(other.output) and node.domain == other.domain
                and [a.SerializeToString() for a in node.attribute] == [a.SerializeToString() for a in other.attribute])
        if not same:
            raise ValueError(f"nodes {other.name!r} and {node.name!r} both write {produced[0]!r} and differ")
        dropped += 1
    if dropped:
        copies = [type(n)() for n in keep]
        for copy, node in zip(copies, keep):
            copy.CopyFrom(node)
        del graph.node[:]
        graph.node.extend(copies)
    return dropped


def _topological_sort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (Kahn's algorithm,
    stable: the original order among ready nodes); ``onnx.checker`` and TensorRT require it."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a dangling input at node {rest[0].name!r}")
        pending = rest
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)

"""The fp16 ONNX variant: fp16 weights and activations, overflow-prone ops kept in fp32.

TensorRT 11 builds only strongly typed networks, so the precision of an "fp16 engine" comes from
the ONNX tensor types. Norms, softmax and the reduce/pow/sqrt/div chains of decomposed norms (and
ConvNeXtV2's GRN) are where fp16 overflows (TensorRT #2709, #2564, #3101, #4493), so they stay in
fp32 with casts around them; the graph input and output stay float32 so Triton and clients see
the same signature as the fp32 model.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path

from mpdeploy.errors import UserError
from mpdeploy.export.onnx import save_checked

log = logging.getLogger(__name__)

# Ops that run in fp32 inside the fp16 graph. Each one either accumulates squares or sums over a
# whole axis (norms, GRN, pooling means), exponentiates (softmax, Exp) or divides by a quantity
# that can underflow in fp16 (Div, Reciprocal, Sqrt of a variance).
FP32_OPS: tuple[str, ...] = (
    "LayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "RMSNormalization",
    "Softmax",
    "LogSoftmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceL1",
    "ReduceLogSumExp",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Div",
    "Exp",
    "Log",
)
# Gelu/Erf/Tanh are bounded and run in fp16: on test_vit, test_convnext and the demo model keeping
# them fp32 changed the worst logit error by less than the fp16 roundoff (see tests/test_fp16.py).


def convert_fp16(onnx_path: str | Path, out_path: str | Path) -> Path:
    """Write the mixed-precision fp16 twin of `onnx_path` to `out_path` atomically; return it."""
    import onnx

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise UserError(f"cannot convert to fp16: {onnx_path} does not exist")
    model = onnx.load(str(onnx_path), load_external_data=True)
    converted = convert_model_fp16(model)
    save_checked(converted, out_path, what="fp16 ONNX")
    return out_path


def convert_model_fp16(model, fp32_ops: tuple[str, ...] = FP32_OPS):
    """The in-memory conversion: ModelProto → ModelProto (fp32 io, `fp32_ops` kept in fp32)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    decisions = decision_nodes(model.graph)
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=list(fp32_ops),
        node_block_list=decisions,
        # Weights are clamped to the finite fp16 range and tiny ones to the smallest subnormal.
        min_positive_val=5.96e-08,
        max_finite_val=65504.0,
    )
    _skip_round_trips(converted.graph, set(decisions))
    # The converter appends its boundary casts after the nodes that read them; ONNX (and the
    # TensorRT parser) require topological order.
    _toposort(converted.graph)
    return converted


def _skip_round_trips(graph, producers: set[str]) -> None:
    """Between two fp32 nodes of `producers` the converter still casts to fp16 and back; read the
    fp32 tensor directly instead, so the decision subgraph is fp32 end to end."""
    from onnx import TensorProto

    made_by = {out: node for node in graph.node for out in node.output}
    graph_outputs = {out.name for out in graph.output}

    def cast_to(node, elem: int) -> bool:
        return node.op_type == "Cast" and any(
            a.name == "to" and a.i == elem for a in node.attribute
        )

    drop = set()
    for up in graph.node:
        down = made_by.get(up.input[0]) if up.input else None
        if (
            not cast_to(up, TensorProto.FLOAT)
            or down is None
            or not cast_to(down, TensorProto.FLOAT16)
        ):
            continue
        origin = made_by.get(down.input[0])
        if origin is None or origin.name not in producers or up.output[0] in graph_outputs:
            continue
        for node in graph.node:
            node.input[:] = [down.input[0] if i == up.output[0] else i for i in node.input]
        drop.add(id(up))
    kept = [node for node in graph.node if id(node) not in drop]
    read = {i for node in kept for i in node.input} | graph_outputs
    kept = [n for n in kept if not (cast_to(n, TensorProto.FLOAT16) and n.output[0] not in read)]
    del graph.node[:]
    graph.node.extend(kept)


# Ops whose outputs are discrete choices (token merging's matching: which token joins which).
DECISION_OPS = ("ArgMax", "ArgMin", "TopK")


def decision_nodes(graph) -> list[str]:
    """Names of the nodes that only feed discrete choices, the choices included (named if unnamed).

    Walking back from every ArgMax/ArgMin/TopK, a producer joins while all its outputs are read by
    nodes already in the set (Shape reads only the shape): for token merging that is the keys'
    mean over heads, their normalisation and the similarity product, not the attention. They run
    in fp32, so fp16 rounding of the similarities cannot flip a merge on its own.
    """
    for index, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
    chosen = {node.name for node in graph.node if node.op_type in DECISION_OPS}
    if not chosen:
        return []
    readers: dict[str, list] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    graph_outputs = {out.name for out in graph.output}

    def feeds_only_choices(node) -> bool:
        return all(
            out not in graph_outputs
            and all(r.name in chosen or r.op_type == "Shape" for r in readers[out])
            for out in node.output
        )

    grown = True
    while grown:
        grown = False
        for node in graph.node:
            if (
                node.name not in chosen
                and node.op_type != "Constant"
                and any(readers[out] for out in node.output)
                and feeds_only_choices(node)
            ):
                chosen.add(node.name)
                grown = True
    return sorted(chosen)


def precision_summary(model) -> dict[str, dict[str, int]]:
    """How many nodes of each op type compute in fp16 vs fp32 (by their first float input)."""
    from onnx import TensorProto

    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
    types.update({i.name: i.type.tensor_type.elem_type for i in model.graph.input})
    types.update({t.name: t.data_type for t in model.graph.initializer})
    summary: dict[str, collections.Counter] = {
        "fp16": collections.Counter(),
        "fp32": collections.Counter(),
    }
    for node in model.graph.node:
        if node.op_type == "Cast":
            continue
        elem = next((types[i] for i in node.input if types.get(i) in (1, 10)), None)
        if elem == TensorProto.FLOAT16:
            summary["fp16"][node.op_type] += 1
        elif elem == TensorProto.FLOAT:
            summary["fp32"][node.op_type] += 1
    return {k: dict(sorted(v.items())) for k, v in summary.items()}


def _toposort(graph) -> None:
    """Reorder `graph.node` in place so every node comes after the producers of its inputs."""
    produced_by = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    nodes = list(graph.node)
    state = [0] * len(nodes)  # 0 new, 1 on the stack, 2 placed
    order: list[int] = []
    for root in range(len(nodes)):
        if state[root]:
            continue
        stack = [(root, iter(nodes[root].input))]
        while stack:
            index, pending = stack[-1]
            state[index] = 1
            for name in pending:
                producer = produced_by.get(name)
                if producer is not None and state[producer] == 0:
                    stack.append((producer, iter(nodes[producer].input)))
                    break
            else:
                stack.pop()
                state[index] = 2
                order.append(index)
    if order != list(range(len(nodes))):
        del graph.node[:]
        graph.node.extend(nodes[i] for i in order)

"""PyTorch on a CUDA GPU, for benchmarking: half-precision models, CUDA graphs, CUDA-event timing,
and 2:4 semi-structured Linear weights (`torch.sparse.to_sparse_semi_structured`).

This is the runtime the MP paper measured its speedups on; the fair baseline it lacks is the same
model dense in the same dtype, which `scripts/bench_gpu.py` times alongside. `TorchCudaRunner`
is a Polygraphy runner, so the benchmark protocol of `mpdeploy.verify.bench` applies unchanged.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from mpdeploy import hardware
from mpdeploy.errors import MissingDependencyError, UserError
from mpdeploy.export.onnx import INPUT_NAME, OUTPUT_NAME

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cuda_unavailable_reason() -> str | None:
    """None when PyTorch can run on a CUDA GPU here, else one line saying why not."""
    return hardware.torch_cuda_unavailable_reason()


def require_cuda() -> None:
    reason = cuda_unavailable_reason()
    if reason:
        raise MissingDependencyError(f"GPU benchmarking needs CUDA: {reason}")


def semi_structured_backend(force_cutlass: bool = False):
    """The SparseSemiStructuredTensor subclass `to_sparse_semi_structured` will use."""
    from torch.sparse import (
        SparseSemiStructuredTensor,
        SparseSemiStructuredTensorCUSPARSELT,
        SparseSemiStructuredTensorCUTLASS,
    )

    if force_cutlass or SparseSemiStructuredTensor._FORCE_CUTLASS:
        return SparseSemiStructuredTensorCUTLASS
    return SparseSemiStructuredTensorCUSPARSELT


def semi_structured_eligible(
    linear: torch.nn.Linear, dtype: torch.dtype, force_cutlass: bool = False
) -> bool:
    """Whether this Linear's weight (out × in) meets the 2:4 kernels' shape constraints."""
    constraints = semi_structured_backend(force_cutlass)._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    if constraints is None:
        return False
    rows, cols = linear.out_features, linear.in_features
    return (
        rows >= constraints.sparse_min_rows
        and rows % constraints.sparse_min_rows == 0
        and cols >= constraints.sparse_min_cols
        and cols % constraints.sparse_min_cols == 0
    )


def mask_2of4(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive input weights (TensorRT's and cuSPARSELt's
    layout for a Linear: groups along in_features). For speed-only runs on untrained weights."""
    out_features, in_features = weight.shape
    if in_features % 4:
        raise UserError(f"2:4 needs in_features divisible by 4 (got {in_features})")
    groups = weight.reshape(out_features, in_features // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(out_features, in_features)


def is_2of4(weight: torch.Tensor) -> bool:
    groups = weight.reshape(weight.shape[0], -1, 4)
    return bool(((groups != 0).sum(-1) <= 2).all())


def prepare_model(
    model: torch.nn.Module,
    dtype: str = "bf16",
    *,
    semi_structured: bool = False,
    apply_mask: bool = False,
    force_cutlass: bool = False,
    device: str = "cuda",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A copy of `model` on `device` in `dtype`; with `semi_structured`, eligible Linear weights
    (already 2:4, or masked first with `apply_mask`) become SparseSemiStructuredTensors."""
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype})")
    torch_dtype = DTYPES[dtype]
    prepared = copy.deepcopy(model).eval().to(device=device, dtype=torch_dtype)
    info: dict[str, Any] = {"dtype": dtype, "semi_structured_layers": [], "skipped_layers": []}
    if not semi_structured:
        return prepared, info
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass or previous
    try:
        for name, module in prepared.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            weight = module.weight.detach()
            if apply_mask:
                weight = mask_2of4(weight)
            if not semi_structured_eligible(module, torch_dtype, force_cutlass) or not is_2of4(
                weight
            ):
                info["skipped_layers"].append(name)
                continue
            module.weight = torch.nn.Parameter(
                to_sparse_semi_structured(weight), requires_grad=False
            )
            info["semi_structured_layers"].append(name)
        info["semi_structured_backend"] = semi_structured_backend(force_cutlass).BACKEND
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous
    return prepared, info


class TorchCudaRunner(BaseRunner):
    """Runs a prepared model on the GPU; times each call with CUDA events around a CUDA-graph
    replay (eager when capture fails, recorded in `graph_error`). Inputs are copied into a static
    device buffer before the timed region; outputs stay on the device unless asked for."""

    def __init__(
        self,
        model: torch.nn.Module,
        input_shape,
        name: str = "torch-cuda",
        dtype: str = "bf16",
        cuda_graph: bool = True,
    ):
        super().__init__(name=name, prefix="torch-cuda-runner")
        require_cuda()
        self.model = model
        self.input_shape = tuple(input_shape)
        self.dtype = DTYPES[dtype]
        self.cuda_graph = cuda_graph
        self.graph_error: str | None = None
        self._graphs: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}

    def activate_impl(self):
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        meta.add(INPUT_NAME, dtype=np.float32, shape=(-1, *self.input_shape))
        return meta

    def infer_impl(self, feed_dict, copy_outputs_to_host: bool = True):
        x = feed_dict[INPUT_NAME]
        x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        batch = int(x.shape[0])
        run = self._graph_for(batch) if self.cuda_graph and self.graph_error is None else None
        if run is not None:
            graph, static_in, static_out = run
            static_in.copy_(x, non_blocking=True)
            self._start.record()
            graph.replay()
            self._end.record()
            out = static_out
        else:
            x = x.to("cuda", self.dtype, non_blocking=True)
            self._start.record()
            with torch.inference_mode():
                out = self.model(x)
            self._end.record()
        self._end.synchronize()
        self.inference_time = self._start.elapsed_time(self._end) / 1e3
        if copy_outputs_to_host:
            return OrderedDict([(OUTPUT_NAME, out.float().cpu().numpy())])
        return OrderedDict([(OUTPUT_NAME, out)])

    def _graph_for(self, batch: int):
        if batch in self._graphs:
            return self._graphs[batch]
        static_in = torch.zeros((batch, *self.input_shape), device="cuda", dtype=self.dtype)
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(3):  # warm-up on a side stream, as CUDA-graph capture requires
                    self.model(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                static_out = self.model(static_in)
        except Exception as exc:  # e.g. a kernel that allocates or syncs during capture
            self.graph_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            torch.cuda.synchronize()
            return None
        self._graphs[batch] = (graph, static_in, static_out)
        return self._graphs[batch]

    def deactivate_impl(self):
        self._graphs.clear()
        torch.cuda.synchronize()

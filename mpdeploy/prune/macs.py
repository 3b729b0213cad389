"""Multiply–accumulate accounting: measured (torch FLOP counter) and analytic (ViT + ToMe), §6."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from mpdeploy.errors import UserError


@dataclass(frozen=True)
class LayerMacs:
    name: str
    kind: str  # "linear" | "conv"
    macs: int


@dataclass(frozen=True)
class MacCount:
    """MACs of one forward pass at `input_shape` (batch included); 1 MAC = 2 FLOPs.

    by_kind splits total_macs into linear, conv, attention (fused scaled-dot-product attention)
    and matmul (matrix products outside Linear/Conv modules, e.g. unfused QKᵀ and AV).
    """

    total_macs: int
    input_shape: tuple[int, ...]
    by_kind: dict[str, int]
    layers: tuple[LayerMacs, ...]

    def macs_of(self, names: Iterable[str]) -> int:
        """MACs of the named Linear/Conv modules, e.g. the layers eligible for k:n sparsity."""
        wanted = set(names)
        missing = wanted - {layer.name for layer in self.layers}
        if missing:
            raise UserError(f"no MAC record for layers {sorted(missing)[:5]}")
        return sum(layer.macs for layer in self.layers if layer.name in wanted)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's registry knows the CUDA attention kernels but not the CPU flash kernel that
# F.scaled_dot_product_attention dispatches to here; without this, attention counts as zero.
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
_ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "flex_attention")


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    return None


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> MacCount:
    """Count MACs with a real forward pass under `FlopCounterMode`, split per Linear/Conv module."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    per_layer: dict[str, list[Any]] = {}
    handles = []

    def track(name: str, kind: str):
        # FLOPs accumulate synchronously, so the counter's delta across the call is the layer's.
        def pre(_module, _inputs):
            per_layer.setdefault(name, [kind, 0, 0])[2] = counter.get_total_flops()

        def post(_module, _inputs, _output):
            record = per_layer[name]
            record[1] += counter.get_total_flops() - record[2]

        return pre, post

    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is not None:
            pre, post = track(name, kind)
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        device = next(model.parameters()).device
        with counter, torch.no_grad():
            model(torch.zeros(tuple(input_shape), device=device))
    finally:
        for handle in handles:
            handle.remove()
    layers = tuple(
        LayerMacs(name, kind, flops // 2) for name, (kind, flops, _) in per_layer.items()
    )
    op_flops = counter.get_flop_counts().get("Global", {})
    attention = sum(f for op, f in op_flops.items() if any(a in str(op) for a in _ATTENTION_OPS))
    total = counter.get_total_flops() // 2
    by_kind = {kind: sum(x.macs for x in layers if x.kind == kind) for kind in ("linear", "conv")}
    by_kind["attention"] = attention // 2
    by_kind["matmul"] = total - sum(by_kind.values())
    return MacCount(total, tuple(input_shape), by_kind, layers)


def sparse_execution_macs(dense_macs: float, eligible_macs: float, k: int, n: int) -> float:
    """MACs executed when the eligible layers keep k of every n weights: dense − (1 − k/n)·eligible."""
    if not 0 < k <= n:
        raise UserError(f"a k:n pattern needs 0 < k <= n, got {k}:{n}")
    if not 0 <= eligible_macs <= dense_macs:
        raise UserError(f"eligible MACs {eligible_macs} must lie within [0, dense {dense_macs}]")
    return dense_macs - (1.0 - k / n) * eligible_macs


def mac_reduction(dense_macs: float, sparse_macs: float) -> float:
    """1 − sparse/dense ("MAC red.")."""
    return 1.0 - sparse_macs / dense_macs


def theoretical_speedup(reduction: float) -> float:
    """1/(1 − reduction) ("Th. spd."): the speed-up if time were proportional to MACs."""
    return 1.0 / (1.0 - reduction)


@dataclass(frozen=True)
class ViTMacs:
    """Analytic ViT MACs. Block Linears scale with keep_fraction; attention, patch-embed, head don't."""

    total: float
    block_linear: float
    attention: float
    patch_embed: float
    head: float
    tokens_per_block: tuple[int, ...]
    matching: float = 0.0  # token merging's similarity and merge products (merge_after_attention)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def vit_tome_macs(
    depth: int,
    dim: int,
    tokens: int,
    r: int = 0,
    mlp_ratio: float = 4.0,
    *,
    prefix_tokens: int = 1,
    in_chans: int = 3,
    patch_size: int = 16,
    num_classes: int = 1000,
    keep_fraction: float = 1.0,
    merges: Sequence[int] | None = None,
    merge_after_attention: bool = False,
    head_dim: int = 64,
) -> ViTMacs:
    """The MP paper's token-count model (docs/tome.md) of a ViT merging r tokens per block.

    Block l runs on N_l = tokens − r·l tokens for the whole block (Linears (4 + 2·mlp_ratio)·N·d²,
    i.e. 12·N·d² at ratio 4; QKᵀ and AV 2·N²·d). Patch embedding and head stay dense.

    `merges` gives r_l per block (default r everywhere). With `merge_after_attention` the count
    is that of the graph `mpdeploy.families.tome` runs, where block l merges between attention and
    MLP: qkv, proj and attention on N_l tokens, the MLP on N_l − r_l, plus the matching product
    |A|·|B|·head_dim and the one-hot merge products r_l·|B|·(dim + 1), |A| and |B| being the
    alternate halves of the N_l − prefix patch tokens. (The paper's 59.81 % uses the first model.)
    """
    merges = list(merges) if merges is not None else [r] * depth
    if len(merges) != depth or min(merges, default=0) < 0:
        raise UserError(f"need {depth} non-negative per-block merge counts (got {merges})")
    counts = tuple(tokens - sum(merges[:layer]) for layer in range(depth))
    if min(counts) - (merges[-1] if merge_after_attention else 0) <= prefix_tokens:
        raise UserError(
            f"ToMe r={r} leaves no patch tokens after {depth} blocks of {tokens} tokens"
        )
    attn_linear, mlp_linear = 4.0 * dim * dim, 2.0 * mlp_ratio * dim * dim
    block_linear = attention = matching = 0.0
    for n, merged in zip(counts, merges, strict=True):
        after = n - merged if merge_after_attention else n
        block_linear += attn_linear * n + mlp_linear * after
        attention += 2.0 * n * n * dim
        if merge_after_attention and merged:
            patches = n - prefix_tokens
            set_a, set_b = (patches + 1) // 2, patches // 2
            matching += set_a * set_b * head_dim + merged * set_b * (dim + 1)
    patch_embed = float(dim * (tokens - prefix_tokens) * in_chans * patch_size * patch_size)
    head = float(dim * num_classes)
    total = keep_fraction * block_linear + attention + matching + patch_embed + head
    return ViTMacs(
        total, keep_fraction * block_linear, attention, patch_embed, head, counts, matching
    )


def images_within(budget: float | None, macs_per_image: float, have: int, floor: int) -> int:
    """How many of `have` calibration images a pass reads under a MAC `budget`: as many as fit
    (⌊budget / macs_per_image⌋), at least `floor`, at most `have`; every image when the budget is
    None. Shared by the prune stage's and the N:M stage's budgets (docs/pruning.md)."""
    if budget is None:
        return have
    return min(have, max(floor, int(budget // max(macs_per_image, 1.0))))

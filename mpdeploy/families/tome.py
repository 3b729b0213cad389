"""Token merging (ToMe, Bolya et al., ICLR 2023) for timm ViTs, built from ops every backend runs.

In each block, after attention and before the MLP, the patch tokens are split alternately into
sets A and B; every A token finds its most similar B token (cosine similarity of the attention
keys, averaged over heads), and the `r` most similar pairs are merged by a size-weighted mean.
Token sizes are carried from block to block and, with proportional attention, log(size) is added
to the attention logits. Prefix tokens (class, distillation, register) are never merged.

The merge is written for export: a one-hot merge matrix M (Equal + Cast) and matrix products
(merged = Mᵀ·(x·size), sizes = Mᵀ·size, then divide), TopK for the ranking, GatherElements for
the kept tokens. The ONNX graph has no ScatterElements/ScatterND (the reference code's
`scatter_reduce` has no ONNX form and no TensorRT core layer). Token counts per block are fixed by
`r` and the input size, so every shape but the batch is static.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mpdeploy._compat import ensure_torchvision_importable
from mpdeploy.errors import UserError

ensure_torchvision_importable()

from timm.layers import Attention  # noqa: E402
from timm.models.vision_transformer import Block, VisionTransformer  # noqa: E402

SCHEDULES = ("constant", "decreasing")
_EPS = 1e-6  # keys of norm 0 (e.g. all-zero inputs) must not turn the similarity into NaN


@dataclasses.dataclass(frozen=True)
class ToMeSettings:
    """What `--tome r --tome-schedule S --tome-proportional on|off` asks for (saved in model.json)."""

    r: int
    schedule: str = "constant"
    proportional: bool = True

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise UserError(f"--tome must be a whole number of tokens ≥ 0 (got {self.r})")
        if self.schedule not in SCHEDULES:
            raise UserError(
                f"unknown --tome-schedule '{self.schedule}': choose one of {', '.join(SCHEDULES)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> ToMeSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(payload, dict) or set(payload) - known or "r" not in payload:
            raise UserError(f"not a token-merging record: {payload!r}"[:200])
        return cls(**payload)


def requested_merges(settings: ToMeSettings, depth: int) -> list[int]:
    """Merges asked for in each block: r everywhere, or falling linearly from 2r to 0."""
    if settings.schedule == "constant" or depth == 1:
        return [settings.r] * depth
    return [round(2 * settings.r * (1 - block / (depth - 1))) for block in range(depth)]


def token_plan(num_patches: int, prefix: int, merges: list[int]) -> tuple[list[int], list[int]]:
    """(tokens entering each block incl. prefix, merges each block really does).

    A block merges at most half its patch tokens (set A can only find partners in set B), as in
    the paper; the schedule is otherwise followed exactly.
    """
    tokens, done, patches = [], [], num_patches
    for r in merges:
        tokens.append(prefix + patches)
        merged = min(r, patches // 2)
        done.append(merged)
        patches -= merged
    return tokens, done


@dataclasses.dataclass(frozen=True)
class TokenMergingRecord:
    """Settings plus the token counts they give this model: manifest, plan.json, Triton provenance."""

    r: int
    schedule: str
    proportional: bool
    prefix_tokens: int
    patch_tokens: int
    merges_per_block: list[int]
    tokens_per_block: list[int]  # tokens entering each block (attention runs on these)
    tokens_after_last_block: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def describe(model: nn.Module, settings: ToMeSettings) -> TokenMergingRecord:
    """Check that `settings` fit `model` (one UserError otherwise) and give the token counts."""
    _require_supported(model)
    depth, patches, prefix = len(model.blocks), _num_patches(model), model.num_prefix_tokens
    requested = requested_merges(settings, depth)
    if patches - sum(requested) < 1:
        raise UserError(
            f"--tome {settings.r} ({settings.schedule}) merges {sum(requested)} tokens but "
            f"{type(model).__name__} has only {patches} patch tokens over {depth} blocks: "
            f"at least one must remain (largest r: {largest_r(model, settings.schedule)})"
        )
    tokens, merges = token_plan(patches, prefix, requested)
    return TokenMergingRecord(
        r=settings.r,
        schedule=settings.schedule,
        proportional=settings.proportional,
        prefix_tokens=prefix,
        patch_tokens=patches,
        merges_per_block=merges,
        tokens_per_block=tokens,
        tokens_after_last_block=tokens[-1] - merges[-1],
    )


def largest_r(model: nn.Module, schedule: str = "constant") -> int:
    """The largest r whose schedule leaves at least one patch token after the last block."""
    depth, patches = len(model.blocks), _num_patches(model)
    r = 0
    while patches - sum(requested_merges(ToMeSettings(r + 1, schedule), depth)) >= 1:
        r += 1
    return r


def apply_tome(model: nn.Module, settings: ToMeSettings) -> TokenMergingRecord:
    """Turn token merging on in `model` (in place): blocks merge, sizes flow between them.

    The model keeps its parameters and state-dict keys; only the block classes change, so
    structured pruning, N:M masks and recovery see the same Linear modules they see without ToMe.
    """
    record = describe(model, settings)
    model.blocks.__class__ = ToMeBlocks
    for block, merges in zip(model.blocks, record.merges_per_block, strict=True):
        block.__class__ = ToMeBlock
        block.tome_r = merges
        block.tome_prefix = record.prefix_tokens
        block.tome_proportional = settings.proportional
    model.tome = record
    return record


def tome_record(model: nn.Module) -> TokenMergingRecord | None:
    """The token merging `apply_tome` put into `model`, or None."""
    return getattr(model, "tome", None)


def _require_supported(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise UserError(
            f"--tome (token merging) applies to ViTs only; {type(model).__name__} is not a timm "
            "VisionTransformer"
        )
    if model.global_pool != "token":
        raise UserError(
            f"--tome supports class-token pooling only (this ViT pools '{model.global_pool}', "
            "and an unweighted mean of merged tokens would change the model)"
        )
    if type(model.blocks) not in (nn.Sequential, ToMeBlocks):
        raise UserError("--tome supports ViTs whose blocks are an nn.Sequential")
    for i, block in enumerate(model.blocks):
        if type(block) not in (Block, ToMeBlock) or type(block.attn) is not Attention:
            raise UserError(
                f"--tome supports timm's pre-norm Block with Attention (blocks.{i} is "
                f"{type(block).__name__} with {type(block.attn).__name__})"
            )


def _num_patches(model: nn.Module) -> int:
    return int(model.patch_embed.num_patches)


# --- merge decisions in an exported graph (verification only) --------------------------------


def decision_tensors(proto) -> list[tuple[str, str]]:
    """(ranking, partner) tensor names per merging block of an exported ToMe graph, in order:
    the TopK indices that rank set A and the ArgMax that picks each A token's B partner."""
    produced = {out: node for node in proto.graph.node for out in node.output}
    pairs = []
    for node in proto.graph.node:
        if node.op_type != "TopK":
            continue
        ranked = produced.get(node.input[0])  # the row maxima of the similarity (ReduceMax)
        partner = next(
            (
                other.output[0]
                for other in proto.graph.node
                if other.op_type == "ArgMax"
                and ranked is not None
                and other.input[0] == ranked.input[0]
            ),
            None,
        )
        if partner is not None:
            pairs.append((node.output[1], partner))
    return pairs


def expose_decisions(proto):
    """A copy of `proto` whose outputs also carry every block's merge decision tensors."""
    import onnx

    proto = copy.deepcopy(proto)
    for ranking, partner in decision_tensors(proto):
        for name in (ranking, partner):
            proto.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None)
            )
    return proto


def onnx_merge_decisions(onnx_path, feeds: list[dict], merges: list[int]) -> list[tuple]:
    """Per input, the (A token, B token) pairs each block merged, as ONNX Runtime (CPU) runs
    `onnx_path` with its decision tensors exposed (a verification-only copy of the graph)."""
    import onnx
    import onnxruntime as ort

    proto = expose_decisions(onnx.load(str(onnx_path), load_external_data=True))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    blocks = [r for r in merges if r > 0]
    decisions: list[tuple] = []
    for feed in feeds:
        outs = session.run(None, feed)[1:]
        for i in range(outs[0].shape[0]):
            decisions.append(
                tuple(
                    frozenset((int(a), int(outs[2 * b + 1][i, a])) for a in outs[2 * b][i, :r])
                    for b, r in enumerate(blocks)
                )
            )
    return decisions


def torch_merge_decisions(model: nn.Module, images: torch.Tensor, batch_size: int) -> list[tuple]:
    """Per input, the (A token, B token) pairs each block of `model` merged."""
    blocks = [block for block in model.blocks if block.tome_r > 0]
    decisions: list[tuple] = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            for block in blocks:
                block.tome_trace = []
            try:
                model(images[start : start + batch_size])
                traced = [block.tome_trace[0] for block in blocks]
            finally:
                for block in blocks:
                    block.tome_trace = None
            for i in range(traced[0].shape[0]):
                decisions.append(
                    tuple(frozenset(map(tuple, pairs[i].tolist())) for pairs in traced)
                )
    return decisions


def decision_flips(first: list[tuple], second: list[tuple]) -> np.ndarray:
    """Per input, whether any block merged different pairs in the two runs."""
    return np.array([a != b for a, b in zip(first, second, strict=True)], dtype=bool)


# --- the merge ------------------------------------------------------------------------------


def bipartite_merge(
    x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, prefix: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge the r most similar (A, B) pairs of the patch tokens of x (B, N, C).

    `size` (B, N, 1) counts the original patches in each token; `metric` (B, N, D) are the keys
    averaged over heads. Returns (x, size, pairs) with N − r tokens: prefix, the kept A tokens,
    then the B tokens (each now the size-weighted mean of itself and the A tokens merged into it);
    `pairs` (B, r, 2) holds the matching decision: (index in A, index in B) of each merge.
    """
    channels = x.shape[-1]
    metric = metric[:, prefix:].float()  # matching runs in fp32 whatever the model's precision
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    scores = metric[:, 0::2] @ metric[:, 1::2].transpose(1, 2)  # (B, |A|, |B|) cosine similarity
    best, best_dst = scores.max(dim=-1)
    order = torch.topk(best, k=best.shape[1], dim=-1).indices  # A tokens, most similar first
    src, kept = order[:, :r], order[:, r:]
    dst = best_dst.gather(1, src)

    tokens, sizes = x[:, prefix:], size[:, prefix:]
    a, b = tokens[:, 0::2], tokens[:, 1::2]
    size_a, size_b = sizes[:, 0::2], sizes[:, 1::2]
    # M[i, j] = 1 where merged A token i joins B token j: Equal + Cast, then matrix products.
    targets = torch.arange(b.shape[1], device=x.device)
    merge_t = (dst.unsqueeze(1) == targets.view(1, -1, 1)).to(x.dtype)  # Mᵀ: (B, |B|, r)
    src_size = size_a.gather(1, src.unsqueeze(-1))
    src_x = a.gather(1, src.unsqueeze(-1).expand(-1, -1, channels))
    new_size_b = size_b + merge_t @ src_size
    new_b = (b * size_b + merge_t @ (src_x * src_size)) / new_size_b
    kept_x = a.gather(1, kept.unsqueeze(-1).expand(-1, -1, channels))
    kept_size = size_a.gather(1, kept.unsqueeze(-1))
    x = torch.cat([x[:, :prefix], kept_x, new_b], dim=1)
    size = torch.cat([size[:, :prefix], kept_size, new_size_b], dim=1)
    return x, size, torch.stack([src, dst], dim=-1)


def attention_with_keys(
    attn: Attention, x: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm Attention's forward (fused or explicit softmax) with an additive logit bias; also
    returns the keys averaged over heads. Reads num_heads at call time (pruned heads work)."""
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        dropout = attn.attn_drop.p if attn.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, attn.attn_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), k.mean(dim=1)


class ToMeBlock(Block):
    """A timm Block that merges `tome_r` tokens between attention and MLP (set by apply_tome)."""

    tome_r: int = 0
    tome_prefix: int = 1
    tome_proportional: bool = True
    tome_trace: list | None = None  # verification only: collects each forward's merged pairs

    def forward(
        self, x: torch.Tensor, size: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if size is None and self.tome_r == 0:
            return super().forward(x), None  # all sizes 1: exactly timm's block
        bias = None
        if size is not None and self.tome_proportional:
            bias = size.log().transpose(1, 2).unsqueeze(1).to(x.dtype)  # (B, 1, 1, N)
        attended, metric = attention_with_keys(self.attn, self.norm1(x), bias)
        x = x + self.drop_path1(self.ls1(attended))
        if self.tome_r > 0:
            if size is None:
                size = torch.ones_like(x[..., :1])
            x, size, pairs = bipartite_merge(x, size, metric, self.tome_r, self.tome_prefix)
            if self.tome_trace is not None:
                self.tome_trace.append(pairs)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, size


class ToMeBlocks(nn.Sequential):
    """model.blocks with token sizes passed from each block to the next."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = None
        for block in self:
            x, size = block(x, size)
        return x


__all__ = [
    "SCHEDULES",
    "ToMeBlock",
    "ToMeBlocks",
    "ToMeSettings",
    "TokenMergingRecord",
    "apply_tome",
    "attention_with_keys",
    "bipartite_merge",
    "decision_flips",
    "decision_tensors",
    "describe",
    "expose_decisions",
    "onnx_merge_decisions",
    "torch_merge_decisions",
    "largest_r",
    "requested_merges",
    "token_plan",
    "tome_record",
]

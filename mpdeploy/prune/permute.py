"""Input-channel permutations for k:n, folded into the weights (docs/sparsity.md; Pool & Yu 2021).

A channel group (`prune/groups.py`) names the tensors that write a set of channels (producer rows,
biases, BatchNorm, GRN) and the weight that reads them (consumer columns). Reordering all of them
with one permutation leaves the network's function unchanged, so the exported graph needs no extra
op, while the consumer's k:n groups — consecutive runs of n input channels — get new members.

Importance of channel j: ‖W_consumer[:, j]‖² · E[h_j²] (the paper's 2:4-code definition; for a conv
consumer the norm runs over output channels and kernel pixels). Channels are sorted by importance
and dealt round-robin: slot s of group g gets rank s·G + g, so each group holds one channel from
each importance quantile.

Attention heads: only a permutation inside each head is exact, and only the value path needs it —
v's rows (and the sigmoid gate's, if any) and proj's columns; q and k are left alone, so q/k norms
and the scores are untouched. Anything else has no exact fold here and is left unpermuted.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mpdeploy.families.groups import ChannelGroup, ParamSlice

PERMUTABLE_KINDS = ("mlp_hidden", "conv_inner", "attn_heads")


@dataclasses.dataclass(frozen=True)
class PermutationRecord:
    group: str
    kind: str
    consumer: str
    permuted: bool
    reason: str  # how it was folded, or why not
    moved_channels: int = 0


def round_robin(importance: torch.Tensor, n: int, block: int | None = None) -> torch.Tensor:
    """perm[new] = old: inside each block of `block` channels, deal the sorted channels into n slots."""
    width = importance.shape[0]
    block = block or width
    perm = torch.empty(width, dtype=torch.long)
    for start in range(0, width, block):
        order = importance[start : start + block].argsort(descending=True, stable=True) + start
        groups = block // n
        # slot s of group g ← rank s·G + g: row-major (G, n) of the (n, G) rank table
        perm[start : start + block] = order.reshape(n, groups).T.reshape(-1)
    return perm


def channel_importance(model: nn.Module, group: ChannelGroup, energy: torch.Tensor) -> torch.Tensor:
    """‖W[:, j]‖² · E[h_j²] summed over the group's consumer slices."""
    score = torch.zeros(group.width, dtype=torch.float64)
    for piece in group.consumers:
        weight = _tensor(model, piece.name).detach().double()
        cols = weight.narrow(piece.dim, piece.offset, group.width).transpose(0, piece.dim)
        score += cols.reshape(group.width, -1).pow(2).sum(dim=1)
    return score * energy.double()


def value_producers(group: ChannelGroup) -> tuple[ParamSlice, ...]:
    """The producer slices of an attention group that feed proj through attn @ v (not q, k).

    A fused qkv tensor is listed three times (q, k, v at offsets 0, W, 2W): keep its last slice.
    Tensors listed once (the output gate) act on the head outputs themselves and are kept.
    """
    by_name: dict[str, list[ParamSlice]] = {}
    for piece in group.producers:
        by_name.setdefault(piece.name, []).append(piece)
    return tuple(max(pieces, key=lambda p: p.offset) for pieces in by_name.values())


def fold(model: nn.Module, slices: tuple[ParamSlice, ...], perm: torch.Tensor) -> None:
    """Reorder channel c ← perm[c] in every slice, in place (parameters and buffers alike)."""
    with torch.no_grad():
        for piece in slices:
            tensor = _tensor(model, piece.name)
            view = tensor.narrow(piece.dim, piece.offset, perm.shape[0])
            view.copy_(view.index_select(piece.dim, perm))


def why_not_permutable(group: ChannelGroup, n: int, eligible: dict[str, bool]) -> str | None:
    """The reason `group` gets no permutation, or None when an exact fold exists and helps."""
    if group.kind not in PERMUTABLE_KINDS:
        return f"no exact fold known for a '{group.kind}' group"
    if not eligible.get(group.consumer_module, False):
        return f"consumer {group.consumer_module} is not k:n eligible"
    if any(piece.dim != 1 or piece.offset for piece in group.consumers):
        return "consumer slice is not whole input columns"
    if group.kind == "attn_heads" and group.unit % n:
        return f"head_dim {group.unit} is not a multiple of n={n}: groups straddle heads"
    if group.width % n:
        return f"width {group.width} is not a multiple of n={n}"
    return None


def permute_groups(
    model: nn.Module,
    groups: list[ChannelGroup],
    energy: dict[str, torch.Tensor],
    n: int,
    eligible: dict[str, bool],
) -> list[PermutationRecord]:
    """Fold an importance-dealing permutation into every group that allows an exact one."""
    records = []
    for group in groups:
        reason = why_not_permutable(group, n, eligible)
        if reason is None and group.consumer_module not in energy:
            reason = f"{group.consumer_module} never ran in the calibration pass"
        if reason is not None:
            records.append(
                PermutationRecord(group.name, group.kind, group.consumer_module, False, reason)
            )
            continue
        importance = channel_importance(model, group, energy[group.consumer_module])
        if group.kind == "attn_heads":
            perm = round_robin(importance, n, block=group.unit)
            producers, how = value_producers(group), "within heads: v rows (+gate) and proj columns"
        else:
            perm = round_robin(importance, n)
            producers, how = group.producers, "producer rows, per-channel params, consumer columns"
        fold(model, producers + group.consumers, perm)
        moved = int((perm != torch.arange(perm.shape[0])).sum())
        records.append(
            PermutationRecord(group.name, group.kind, group.consumer_module, True, how, moved)
        )
    return records


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    return getattr(module, attr)

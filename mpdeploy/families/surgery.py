"""Exact structured removal: rebuild a model's modules at smaller widths, keeping chosen channels.

`prune_groups` slices every producer and consumer tensor of each group (as listed by the
model's family), brings the owning modules' size attributes in line, and lets the family fix
family state (attention head count, GRN channel mean). `resize_to_widths` does the same with the
first k channels of a freshly built model, so `ModelSpec.widths` rebuilds a pruned architecture
whose weights then come from `load_state_dict`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mpdeploy.errors import UserError
from mpdeploy.families import channel_groups, get_family
from mpdeploy.families.groups import ChannelGroup


def prune_groups(model: nn.Module, keep: Mapping[str, Sequence[int] | torch.Tensor]) -> nn.Module:
    """Keep only the listed channel indices of each named group, in place; returns `model`.

    Indices are channel indices in [0, width) and must cover whole units (whole heads).
    Groups not named in `keep` are left as they are.
    """
    family = get_family(model)
    groups = {g.name: g for g in family.channel_groups(model)}
    unknown = sorted(set(keep) - set(groups))
    if unknown:
        raise UserError(f"no prunable group named {', '.join(unknown[:3])} in this model")
    for name, indices in keep.items():
        group = groups[name]
        kept = _checked_indices(group, indices)
        if len(kept) == group.width:
            continue
        _slice_group(model, group, kept)
        family.after_cut(model, group, len(kept))
    return model


def keep_indices(
    groups: list[ChannelGroup], removed: Mapping[str, set[int]]
) -> dict[str, list[int]]:
    """Kept channel indices per group (whole units, ascending) when `removed` units go."""
    keep = {}
    for group in groups:
        gone = removed.get(group.name)
        if not gone:
            continue
        units = [u for u in range(group.units) if u not in gone]
        keep[group.name] = [u * group.unit + c for u in units for c in range(group.unit)]
    return keep


def resize_to_widths(model: nn.Module, widths: Mapping[str, int]) -> nn.Module:
    """Shrink a dense model to `widths` (group name → kept channels); values are not meaningful."""
    groups = {g.name: g for g in channel_groups(model)}
    keep = {}
    for name, width in widths.items():
        group = groups.get(name)
        if group is None:
            raise UserError(f"model spec width for unknown group {name!r}")
        if not 0 < int(width) <= group.width or int(width) % group.unit:
            raise UserError(
                f"model spec width {width} for {name} must be a positive multiple of "
                f"{group.unit} up to {group.width}"
            )
        keep[name] = range(int(width))
    return prune_groups(model, keep)


def group_widths(model: nn.Module) -> dict[str, int]:
    """The current width of every prunable group (what `ModelSpec.widths` records)."""
    return {g.name: g.width for g in channel_groups(model)}


def _checked_indices(group: ChannelGroup, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
    kept = torch.as_tensor(list(indices) if not torch.is_tensor(indices) else indices).long()
    kept = torch.unique(kept)  # sorted: channel order is preserved
    if kept.numel() == 0:
        raise UserError(f"cannot remove every channel of {group.name}")
    if kept.min() < 0 or kept.max() >= group.width:
        raise UserError(f"channel index out of range for {group.name} (width {group.width})")
    if group.unit > 1:
        units = torch.unique(kept // group.unit)
        if units.numel() * group.unit != kept.numel():
            raise UserError(f"{group.name}: kept channels must form whole units of {group.unit}")
    return kept


def _slice_group(model: nn.Module, group: ChannelGroup, kept: torch.Tensor) -> None:
    """Index-select every tensor slice of `group` and resize the modules that own them."""
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    removed = torch.ones(group.width, dtype=torch.bool)
    removed[kept] = False
    masks: dict[tuple[str, int], torch.Tensor] = {}
    for piece in (*group.producers, *group.consumers):
        tensor = state[piece.name]
        mask = masks.setdefault(
            (piece.name, piece.dim), torch.ones(tensor.shape[piece.dim], dtype=torch.bool)
        )
        mask[piece.offset : piece.offset + group.width] &= ~removed
    removed_units = removed.view(group.units, group.unit).all(1)
    for piece in group.unit_params:
        tensor = state[piece.name]
        mask = masks.setdefault(
            (piece.name, piece.dim), torch.ones(tensor.shape[piece.dim], dtype=torch.bool)
        )
        mask[piece.offset : piece.offset + group.units] &= ~removed_units
    for (name, dim), mask in masks.items():
        module_path, _, attr = name.rpartition(".")
        module = model.get_submodule(module_path)
        old = getattr(module, attr)
        new = old.detach().index_select(dim, mask.nonzero().squeeze(1)).clone()
        if isinstance(old, nn.Parameter):
            setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            module._buffers[attr] = new
        _sync_sizes(module)


def _sync_sizes(module: nn.Module) -> None:
    """Make a module's size attributes agree with its (sliced) tensors."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.Conv2d):
        # A grouped conv's rows are cut in whole groups (a depthwise channel is a group of one):
        # the rows per group stay, the group count follows; its columns are per-group inputs.
        out_channels = module.weight.shape[0]
        if module.groups != 1:
            out_per_group = module.out_channels // module.groups
            if out_channels % out_per_group:
                raise UserError(f"cut of grouped conv {module} does not remove whole groups")
            module.groups = out_channels // out_per_group
        module.out_channels = out_channels
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = module.weight.shape[0]
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(module.weight.shape)

"""Grouped-convolution bottlenecks (ResNeXt, RegNet): whole cardinal paths cut at once.

In conv1 (1×1) → norm → conv2 (k×k, `groups` = G, as many outputs as inputs) → norm → [SE] →
conv3 (1×1), output channel c of conv2 is computed from conv2's input group g = c // d only
(d = channels per group), and those inputs are conv1's outputs g·d … (g+1)·d − 1. A unit is one
such path: d conv1 rows (+ norm), the d conv2 filters of group g (+ norm, + SE gate), and d conv3
columns (+ SE reduce columns). conv2's per-group input columns are untouched, so removing whole
paths keeps every shape valid and only lowers G (`surgery._sync_sizes` follows the group count).
Zeroing a path's conv1/conv2 rows and norm scale and shift makes its conv2 output 0 after the
activation, so the masked twin equals the cut model exactly.
"""

from __future__ import annotations

import math

from torch import nn

from mpdeploy.errors import UserError
from mpdeploy.families import Family, register_family
from mpdeploy.families.groups import ChannelGroup, ParamSlice

BN_TENSORS = ("weight", "bias", "running_mean", "running_var")
MIN_CHANNELS = 8  # keep at least this many channels of a path bundle (the planner's floor too)


def _conv_bn_producers(conv: str, conv_module: nn.Conv2d, bn: str) -> list[ParamSlice]:
    producers = [ParamSlice(f"{conv}.weight", 0)]
    if conv_module.bias is not None:
        producers.append(ParamSlice(f"{conv}.bias", 0))
    return producers + [ParamSlice(f"{bn}.{t}", 0) for t in BN_TENSORS]


def cardinal_group(
    model: nn.Module,
    path: str,
    *,
    reduce: tuple[str, str],
    grouped: tuple[str, str],
    consumer: str,
    se: str | None = None,
) -> ChannelGroup:
    """The cardinal paths of one bottleneck; `reduce`/`grouped` are (conv, norm) paths in `path`.

    `se` names an optional squeeze-excitation module (fc1 reduce, fc2 expand convs) on conv2's
    output; `consumer` is the 1×1 conv reading conv2's output.
    """
    first = model.get_submodule(f"{path}.{reduce[0]}")
    conv = model.get_submodule(f"{path}.{grouped[0]}")
    last = model.get_submodule(f"{path}.{consumer}")
    for name, norm in ((reduce[1], reduce[0]), (grouped[1], grouped[0])):
        if not isinstance(model.get_submodule(f"{path}.{name}"), nn.BatchNorm2d):
            raise UserError(f"structured pruning expects BatchNorm2d after {path}.{norm}")
    if first.groups != 1 or last.groups != 1:
        raise UserError(f"structured pruning: {path} has grouped 1×1 convs around its k×k conv")
    if not (first.out_channels == conv.in_channels == conv.out_channels == last.in_channels):
        raise UserError(
            f"structured pruning: {path}.{grouped[0]} must map its {conv.in_channels} input "
            f"channels to as many outputs (got {conv.out_channels})"
        )
    per_group = conv.out_channels // conv.groups
    producers = _conv_bn_producers(f"{path}.{reduce[0]}", first, f"{path}.{reduce[1]}")
    producers += _conv_bn_producers(f"{path}.{grouped[0]}", conv, f"{path}.{grouped[1]}")
    consumers = [ParamSlice(f"{path}.{consumer}.weight", 1)]
    if se is not None:
        producers += [ParamSlice(f"{path}.{se}.fc2.weight", 0)]
        if model.get_submodule(f"{path}.{se}.fc2").bias is not None:
            producers.append(ParamSlice(f"{path}.{se}.fc2.bias", 0))
        consumers.append(ParamSlice(f"{path}.{se}.fc1.weight", 1))
    return ChannelGroup(
        name=f"{path}.{grouped[0]}",
        kind="conv_groups",
        width=int(conv.out_channels),
        unit=per_group,
        producers=tuple(producers),
        consumers=tuple(consumers),
        consumer_module=f"{path}.{consumer}",
        min_units=min(conv.groups, math.ceil(MIN_CHANNELS / per_group)),
        # as for ResNet (families/resnet.py): no LayerNorm divides this residual stream by its norm
        residual_module=None,
    )


@register_family
class RegNetFamily(Family):
    name = "regnet"
    examples = ("regnetx_*", "regnety_*")
    # RegNetY: grouped bottlenecks with squeeze-excitation (RegNetX's blocks are the same without
    # SE, the path the ResNeXt case covers); depth 8 and 64 px keep it small
    test_cases = (
        ("regnety_002", {"depth": 8, "pretrained_cfg_overlay": {"input_size": (3, 64, 64)}}),
    )

    def matches(self, model: nn.Module) -> bool:
        from timm.models.regnet import RegNet

        return isinstance(model, RegNet)

    def channel_groups(self, model: nn.Module) -> list[ChannelGroup]:
        from timm.layers import SEModule
        from timm.models.regnet import Bottleneck

        groups = []
        for stage_name, stage in model.named_children():
            if not stage_name.startswith("s") or not stage_name[1:].isdigit():
                continue
            for block_name, block in stage.named_children():
                path = f"{stage_name}.{block_name}"
                if type(block) is not Bottleneck:  # RegNetV's pre-activation blocks
                    raise UserError(f"structured pruning: unsupported RegNet block at {path}")
                if not isinstance(block.se, (nn.Identity, SEModule)):
                    raise UserError(f"structured pruning: unsupported attention at {path}.se")
                se = "se" if isinstance(block.se, SEModule) else None
                if se is not None and not isinstance(block.se.bn, nn.Identity):
                    raise UserError(f"structured pruning: SE with a norm at {path}.se")
                groups.append(
                    cardinal_group(
                        model,
                        path,
                        reduce=("conv1.conv", "conv1.bn"),
                        grouped=("conv2.conv", "conv2.bn"),
                        consumer="conv3.conv",
                        se=se,
                    )
                )
        return groups

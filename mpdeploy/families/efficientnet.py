"""timm EfficientNet / MobileNetV2/V3 (tf_ "same"-padding and lite variants too): the channels
inside inverted residuals, the stem and the head; block output (residual) widths stay.

An inverted residual's expansion channel c is row c of the expansion conv and of its BatchNorm,
filter c of the depthwise conv (which reads only channel c) and its BatchNorm, column c of the
squeeze-excitation reduce conv, row c (+ bias) of the SE expand conv, and column c of the 1×1
projection. In the masked twin both BatchNorms' scale and shift are zero, so the channel is 0
before the activation and after it (relu, relu6, silu, hard-swish all map 0 to 0: checked per
model), adds 0 to the SE mean and reaches the projection as 0 · gate: the cut is exact.
EdgeResidual (EfficientNetV2's fused block) is the same without the depthwise conv. The stem's
channels are cut through a first depthwise-separable block that has no skip connection, and the
head conv's channels through its norm into the classifier's columns.
"""

from __future__ import annotations

import dataclasses

import torch

# the package mpdeploy.families applies the torchvision shim before this timm import
from timm.models._efficientnet_blocks import (
    ConvBnAct,
    DepthwiseSeparableConv,
    EdgeResidual,
    InvertedResidual,
    SqueezeExcite,
)
from torch import nn

from mpdeploy.errors import UserError
from mpdeploy.families import Family, register_family
from mpdeploy.families.common import require_identity
from mpdeploy.families.groups import ChannelGroup, ParamSlice
from mpdeploy.families.resnet import BN_TENSORS

# blocks with no channel of their own: their input and output are block (residual) widths
PASS_THROUGH_BLOCKS = (ConvBnAct, DepthwiseSeparableConv)


@dataclasses.dataclass(frozen=True)
class SkiplessGroup(ChannelGroup):
    """Channels whose cut no skip connection bypasses: the expansion channels of a block without
    one (a stage's first block: stride 2 or a new width), whose output replaces the stream
    instead of adding to it, and the head conv's channels, which the classifier reads directly
    (and whose `lsq` re-fit would need more calibration images than the head has channels, so it
    falls back to a bias fold). The planner cuts such groups last (`plan_tier` 1,
    `prune.planner.plan_tier`): only when the other groups cannot reach the target alone.
    Measured on efficientnet-lite0 with real weights, 30 % MAC reduction, `mp_fisher_taylor` +
    `lsq+bn`, top-1 agreement with dense on 96 held-out crops (docs/pruning.md, "Diagnosis" and
    "The head conv cut last"): skipless blocks last 41.7 → 55.2 % (14-photo calibration), 3.1 →
    10.4 % (the 3 builtin photos); the head last too, 52.1 → 66.3 % (mean of three calibration
    seeds, val split)."""

    plan_tier: int = 1


@register_family
class EfficientNetFamily(Family):
    name = "efficientnet"
    examples = (
        "efficientnet_*",
        "tf_efficientnet_*",
        "efficientnetv2_*",
        "mobilenetv2_*",
        "mobilenetv3_*",
        "tf_mobilenetv3_*",
        "mnasnet_*",
        "test_efficientnet",
    )
    test_cases = (
        # ConvBnAct, EdgeResidual, inverted residual + SE (silu), BatchNorm head
        ("test_efficientnet", {}),
        # tf_ variants: TensorFlow "same" padding (Conv2dSame, padded at run time)
        ("test_efficientnet", {"pad_type": "same"}),
        # MobileNetV3: depthwise-separable first block (stem group), hard-swish, SE with
        # hard-sigmoid gate, inverted residuals without SE, pooled conv head with bias
        ("mobilenetv3_small_050", {}),
    )

    def matches(self, model: nn.Module) -> bool:
        from timm.models.efficientnet import EfficientNet
        from timm.models.mobilenetv3 import MobileNetV3

        return isinstance(model, (EfficientNet, MobileNetV3))

    def channel_groups(self, model: nn.Module) -> list[ChannelGroup]:
        groups = []
        stem = _stem_group(model)
        if stem is not None:
            groups.append(stem)
        for s, stage in enumerate(model.blocks):
            for b, block in enumerate(stage):
                path = f"blocks.{s}.{b}"
                if type(block) is InvertedResidual:
                    groups.append(_inverted_residual_group(block, path))
                elif type(block) is EdgeResidual:
                    groups.append(_edge_residual_group(block, path))
                elif type(block) not in PASS_THROUGH_BLOCKS:
                    raise UserError(
                        f"structured pruning does not support {type(block).__name__} blocks "
                        f"({path}) in {type(model).__name__}"
                    )
        head = _head_group(model)
        if head is not None:
            groups.append(head)
        return groups


def _inverted_residual_group(block: InvertedResidual, path: str) -> ChannelGroup:
    """conv_pw → bn1 → conv_dw (depthwise) → bn2 → [aa] → se → conv_pwl."""
    _require_plain_block(block, path)
    _require_depthwise(block.conv_dw, f"{path}.conv_dw")
    producers = [
        *_conv_rows(block.conv_pw, f"{path}.conv_pw"),
        *_batch_norm(block.bn1, f"{path}.bn1"),
        *_conv_rows(block.conv_dw, f"{path}.conv_dw"),
        *_batch_norm(block.bn2, f"{path}.bn2"),
    ]
    return _expansion_group(
        block.conv_pw, producers, block.se, path, "conv_pwl", "conv_pw", block.has_skip
    )


def _edge_residual_group(block: EdgeResidual, path: str) -> ChannelGroup:
    """EfficientNetV2's fused block: conv_exp (k×k) → bn1 → [aa] → se → conv_pwl."""
    _require_plain_block(block, path)
    producers = [
        *_conv_rows(block.conv_exp, f"{path}.conv_exp"),
        *_batch_norm(block.bn1, f"{path}.bn1"),
    ]
    return _expansion_group(
        block.conv_exp, producers, block.se, path, "conv_pwl", "conv_exp", block.has_skip
    )


def _expansion_group(
    expansion: nn.Conv2d,
    producers: list[ParamSlice],
    se: nn.Module,
    path: str,
    consumer: str,
    block_input: str,
    has_skip: bool,
) -> ChannelGroup:
    se_producers, se_consumers = _squeeze_excite(se, f"{path}.se")
    return (ChannelGroup if has_skip else SkiplessGroup)(
        name=path,
        kind="conv_inner",
        width=int(expansion.out_channels),
        unit=1,
        producers=(*producers, *se_producers),
        consumers=(*se_consumers, ParamSlice(f"{path}.{consumer}.weight", 1)),
        consumer_module=f"{path}.{consumer}",
        min_units=1,
        # the block's input: the stream its output is added to (or replaces, without a skip)
        residual_module=f"{path}.{block_input}",
    )


def _stem_group(model: nn.Module) -> ChannelGroup | None:
    """conv_stem → bn1 → the first block's depthwise conv → bn1 → se → conv_pw, when that block is
    depthwise-separable without a skip (the stem output then has no other reader)."""
    first = model.blocks[0][0]
    if type(first) is not DepthwiseSeparableConv or first.has_skip or first.conv_s2d is not None:
        return None
    path = "blocks.0.0"
    require_identity(first.aa, "anti-aliasing", path)
    _require_depthwise(first.conv_dw, f"{path}.conv_dw")
    _require_conv(model.conv_stem, "conv_stem")
    producers = [
        *_conv_rows(model.conv_stem, "conv_stem"),
        *_batch_norm(model.bn1, "bn1"),
        *_conv_rows(first.conv_dw, f"{path}.conv_dw"),
        *_batch_norm(first.bn1, f"{path}.bn1"),
    ]
    se_producers, se_consumers = _squeeze_excite(first.se, f"{path}.se")
    return ChannelGroup(
        name="conv_stem",
        kind="conv_inner",
        width=int(model.conv_stem.out_channels),
        unit=1,
        producers=(*producers, *se_producers),
        consumers=(*se_consumers, ParamSlice(f"{path}.conv_pw.weight", 1)),
        consumer_module=f"{path}.conv_pw",
        min_units=1,
        residual_module="conv_stem",  # the image
    )


def _head_group(model: nn.Module) -> ChannelGroup | None:
    """conv_head → norm (EfficientNet `bn2`, MobileNetV3 `norm_head`) → act → pool → classifier.

    None when there is no Linear classifier reading exactly the head's channels (a headless
    model, or concatenated avg+max pooling that doubles them). Cut last, as a `SkiplessGroup`."""
    classifier = getattr(model, "classifier", None)
    conv_head = getattr(model, "conv_head", None)
    if not isinstance(classifier, nn.Linear) or not isinstance(conv_head, nn.Conv2d):
        return None
    if classifier.in_features != conv_head.out_channels:
        return None
    _require_conv(conv_head, "conv_head")
    norm_name = "bn2" if hasattr(model, "bn2") else "norm_head"
    norm = getattr(model, norm_name)
    producers = _conv_rows(conv_head, "conv_head")
    if not isinstance(norm, nn.Identity):
        producers += _batch_norm(norm, norm_name)
    if hasattr(model, "act2"):
        _require_zero_preserving(model.act2, "act2")
    return SkiplessGroup(
        name="conv_head",
        kind="conv_inner",
        width=int(conv_head.out_channels),
        unit=1,
        producers=tuple(producers),
        consumers=(ParamSlice("classifier.weight", 1),),
        consumer_module="classifier",
        min_units=1,
        residual_module="conv_head",
    )


# --- the pieces --------------------------------------------------------------------------------


def _conv_rows(conv: nn.Conv2d, path: str) -> list[ParamSlice]:
    """Output channels of a conv: weight rows and bias."""
    _require_conv(conv, path)
    rows = [ParamSlice(f"{path}.weight", 0)]
    if conv.bias is not None:
        rows.append(ParamSlice(f"{path}.bias", 0))
    return rows


def _batch_norm(norm: nn.Module, path: str) -> list[ParamSlice]:
    """A BatchNorm (timm's BatchNormAct2d included) whose activation keeps 0 at 0."""
    if not isinstance(norm, nn.BatchNorm2d):
        raise UserError(
            f"structured pruning needs BatchNorm at {path} (found {type(norm).__name__}): "
            "a norm across channels changes when channels are removed"
        )
    act = getattr(norm, "act", None)
    if act is not None:
        _require_zero_preserving(act, f"{path}.act")
    return [ParamSlice(f"{path}.{t}", 0) for t in BN_TENSORS]


def _squeeze_excite(se: nn.Module, path: str) -> tuple[list[ParamSlice], list[ParamSlice]]:
    """SE reads every expansion channel (reduce conv columns) and gates each (expand conv rows)."""
    if isinstance(se, nn.Identity):
        return [], []
    if type(se) is not SqueezeExcite:
        raise UserError(f"structured pruning does not support {type(se).__name__} at {path}")
    _require_conv(se.conv_reduce, f"{path}.conv_reduce")
    producers = _conv_rows(se.conv_expand, f"{path}.conv_expand")
    return producers, [ParamSlice(f"{path}.conv_reduce.weight", 1)]


def _require_plain_block(block: nn.Module, path: str) -> None:
    if getattr(block, "conv_s2d", None) is not None:
        raise UserError(f"structured pruning does not support space-to-depth blocks ({path})")
    require_identity(block.aa, "anti-aliasing", path)


def _require_conv(conv: nn.Module, path: str) -> None:
    """A plain (or "same"-padded) Conv2d with one group."""
    if not isinstance(conv, nn.Conv2d):
        raise UserError(f"structured pruning does not support {type(conv).__name__} at {path}")
    if conv.groups != 1 and not _is_depthwise(conv):
        raise UserError(f"structured pruning does not support grouped convs at {path}")


def _require_depthwise(conv: nn.Module, path: str) -> None:
    _require_conv(conv, path)
    if not _is_depthwise(conv):
        raise UserError(
            f"structured pruning needs a depthwise conv at {path} (groups={conv.groups}, "
            f"{conv.in_channels}→{conv.out_channels} channels)"
        )


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels


def _require_zero_preserving(act: nn.Module, path: str) -> None:
    """A removed channel is 0 before its activation; it must stay 0 after it."""
    with torch.no_grad():
        if float(act(torch.zeros(1, 1, 1, 1)).abs().max()) != 0.0:
            raise UserError(f"structured pruning needs act(0) = 0 at {path} ({type(act).__name__})")

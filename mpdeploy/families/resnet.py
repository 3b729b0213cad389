"""timm ResNet / ResNet-D: the inner channels of basic and bottleneck blocks; residual widths stay.

A basic block has one group (conv1 → bn1 → act → conv2); a bottleneck has two (conv1 → bn1 →
conv2, and conv2 → bn2 → conv3). A removed channel has its conv rows and its BatchNorm scale and
shift zeroed in the masked twin, so it is exactly 0 after ReLU and its consumer columns are inert.
"""

from __future__ import annotations

from torch import nn

from mpdeploy.errors import UserError
from mpdeploy.families import Family, register_family
from mpdeploy.families.common import require_identity
from mpdeploy.families.grouped import cardinal_group
from mpdeploy.families.groups import ChannelGroup, ParamSlice

BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def conv_bn_group(block: nn.Module, path: str, conv: str, bn: str, consumer: str) -> ChannelGroup:
    """Output channels of `conv` (+ its BatchNorm `bn`) read by the next conv `consumer`."""
    producer_conv = getattr(block, conv)
    if producer_conv.groups != 1 or getattr(block, consumer).groups != 1:
        raise UserError(f"structured pruning does not support grouped convs (ResNeXt) in {path}")
    if not isinstance(getattr(block, bn), nn.BatchNorm2d):
        raise UserError(f"structured pruning expects BatchNorm2d after {path}.{conv}")
    producers = [ParamSlice(f"{path}.{conv}.weight", 0)]
    if producer_conv.bias is not None:
        producers.append(ParamSlice(f"{path}.{conv}.bias", 0))
    producers += [ParamSlice(f"{path}.{bn}.{t}", 0) for t in BN_TENSORS]
    return ChannelGroup(
        name=f"{path}.{conv}",
        kind="conv_inner",
        width=int(producer_conv.out_channels),
        unit=1,
        producers=tuple(producers),
        consumers=(ParamSlice(f"{path}.{consumer}.weight", 1),),
        consumer_module=f"{path}.{consumer}",
        min_units=1,
        # residual_module stays None: no LayerNorm divides a ResNet's residual stream by its norm,
        # and normalising by the block input's energy made test_resnet's pruned logits worse
        # (docs/pruning.md), so `mp` uses the absolute output energy here.
        residual_module=None,
    )


@register_family
class ResNetFamily(Family):
    name = "resnet"
    examples = ("resnet*", "resnet*d", "resnext*", "seresnext*", "test_resnet")
    # basic + bottleneck blocks, deep stem, avg-down (ResNet-D); a small ResNeXt (cardinality 4)
    test_cases = (
        ("test_resnet", {}),
        (
            "resnext50_32x4d",
            {
                "layers": (1, 1, 1, 1),
                "cardinality": 4,
                "base_width": 64,
                "channels": (16, 16, 32, 32),
                "stem_width": 16,
                "pretrained_cfg_overlay": {"input_size": (3, 64, 64)},
            },
        ),
    )

    def matches(self, model: nn.Module) -> bool:
        from timm.models.resnet import ResNet

        return isinstance(model, ResNet)

    def channel_groups(self, model: nn.Module) -> list[ChannelGroup]:
        from timm.models.resnet import BasicBlock, Bottleneck

        groups = []
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for b, block in enumerate(getattr(model, stage)):
                path = f"{stage}.{b}"
                if type(block) not in (BasicBlock, Bottleneck):  # Res2Net, ResNeSt, SK blocks
                    raise UserError(
                        f"structured pruning: unsupported ResNet block {type(block).__name__} "
                        f"at {path}"
                    )
                require_identity(block.aa, "anti-aliasing", path)
                if type(block) is BasicBlock:
                    groups.append(conv_bn_group(block, path, "conv1", "bn1", "conv2"))
                elif type(block) is Bottleneck and (block.conv2.groups > 1 or _cardinal(block)):
                    groups.append(
                        cardinal_group(
                            model,
                            path,
                            reduce=("conv1", "bn1"),
                            grouped=("conv2", "bn2"),
                            consumer="conv3",
                        )
                    )
                elif type(block) is Bottleneck:
                    groups.append(conv_bn_group(block, path, "conv1", "bn1", "conv2"))
                    groups.append(conv_bn_group(block, path, "conv2", "bn2", "conv3"))
                else:
                    raise UserError(f"structured pruning: unsupported ResNet block at {path}")
        return groups

    def after_cut(self, model: nn.Module, group: ChannelGroup, width: int) -> None:
        if group.kind == "conv_groups":  # stays a ResNeXt block even when cut to one group
            model.get_submodule(group.name.rpartition(".")[0]).mpdeploy_cardinal = True


def _cardinal(block: nn.Module) -> bool:
    return getattr(block, "mpdeploy_cardinal", False)

"""timm ConvNeXt / ConvNeXtV2: the hidden channels of each block's MLP (Linear or 1×1-conv form).

ConvNeXtV2's Global Response Norm divides each channel's spatial L2 norm by the mean over
channels, so dropping channels changes the mean. `ExactGlobalResponseNorm` keeps the original
channel count C and divides the sum over the K kept channels by C: exactly the dense mean when
the removed channels are zero (their fc1 rows and bias, and their GRN gamma/beta, zeroed).
"""

from __future__ import annotations

import dataclasses

import torch

# the package mpdeploy.families applies the torchvision shim before this timm import
from timm.layers import GlobalResponseNormMlp, Mlp
from timm.layers.grn import GlobalResponseNorm
from torch import nn

from mpdeploy.errors import UserError
from mpdeploy.families import Family, register_family
from mpdeploy.families.common import mlp_hidden_group
from mpdeploy.families.groups import ChannelGroup

GRN_PARAMS = ("grn.weight", "grn.bias")  # per-channel gamma, beta: producers of the hidden channels


class ExactGlobalResponseNorm(GlobalResponseNorm):
    """GRN over the kept channels of a layer that had `dense_dim` channels (the rest are zero)."""

    def __init__(self, dim: int, dense_dim: int, eps: float = 1e-6, channels_last: bool = True):
        super().__init__(dim, eps=eps, channels_last=channels_last)
        self.dense_dim = int(dense_dim)  # a plain int: the ONNX graph gets it as a constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_g = x.norm(p=2, dim=self.spatial_dim, keepdim=True)
        mean = x_g.sum(dim=self.channel_dim, keepdim=True) / self.dense_dim
        x_n = x_g / (mean + self.eps)
        return x + torch.addcmul(
            self.bias.view(self.wb_shape), self.weight.view(self.wb_shape), x * x_n
        )

    @classmethod
    def replacing(cls, grn: GlobalResponseNorm, dense_dim: int) -> ExactGlobalResponseNorm:
        exact = cls(
            grn.weight.shape[0], dense_dim, eps=grn.eps, channels_last=grn.channel_dim == -1
        )
        exact.weight, exact.bias = grn.weight, grn.bias
        return exact


@register_family
class ConvNeXtFamily(Family):
    name = "convnext"
    examples = ("convnext_*", "convnextv2_*", "test_convnext")
    test_cases = (
        ("test_convnext", {}),  # ConvNeXt: Linear MLP, layer scale
        ("test_convnext", {"conv_mlp": True}),  # 1×1-conv MLP
        ("test_convnext", {"use_grn": True, "ls_init_value": None}),  # ConvNeXtV2 (Linear + GRN)
        ("test_convnext", {"use_grn": True, "ls_init_value": None, "conv_mlp": True}),  # V2 atto
    )

    def matches(self, model: nn.Module) -> bool:
        from timm.models.convnext import ConvNeXt

        return isinstance(model, ConvNeXt)

    def channel_groups(self, model: nn.Module) -> list[ChannelGroup]:
        groups = []
        for s, stage in enumerate(model.stages):
            for b, block in enumerate(stage.blocks):
                path = f"stages.{s}.blocks.{b}.mlp"
                if type(block.mlp) is GlobalResponseNormMlp:
                    group = mlp_hidden_group(model, path, extra_producers=GRN_PARAMS)
                elif type(block.mlp) is Mlp and isinstance(block.mlp.norm, nn.Identity):
                    group = mlp_hidden_group(model, path)
                else:
                    raise UserError(f"structured pruning: unsupported ConvNeXt MLP at {path}")
                # the block input (= the shortcut the MLP output is added to) enters conv_dw
                residual = f"stages.{s}.blocks.{b}.conv_dw"
                groups.append(dataclasses.replace(group, residual_module=residual))
        return groups

    def after_cut(self, model: nn.Module, group: ChannelGroup, width: int) -> None:
        mlp = model.get_submodule(group.name)
        grn = getattr(mlp, "grn", None)
        if grn is not None and not isinstance(grn, ExactGlobalResponseNorm):
            # group.width is the width before this cut: the dense channel count
            mlp.grn = ExactGlobalResponseNorm.replacing(grn, dense_dim=group.width)

"""timm VisionTransformer / DeiT (and the bundled demo ViT): attention heads and MLP hidden neurons.

A head h owns rows [h·d, (h+1)·d) of q, k and v inside the fused qkv projection (+ bias, + the
optional sigmoid gate) and the same columns of proj. Zeroing those rows makes q = k = v = 0 for
the head, so its softmax output is 0 whatever the (shared) q_norm/k_norm do: the cut is exact.

Prefix tokens are tokens like any other here: DeiT's distillation token (timm
`VisionTransformerDistilled`, two heads averaged at inference) and register tokens (`reg_tokens`)
only widen the token count, which the attention MACs read from the qkv layer's positions; the
residual width they live in is never cut.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from mpdeploy.errors import UserError
from mpdeploy.families import Family, register_family
from mpdeploy.families.common import mlp_hidden_group, require_identity
from mpdeploy.families.groups import ChannelGroup, ParamSlice


@register_family
class ViTFamily(Family):
    name = "vit"
    examples = (
        "vit_*",
        "vit_*_reg*",
        "deit_*",
        "deit_*_distilled_*",
        "test_vit",
        "mpdeploy_demo_vit",
    )
    test_cases = (
        ("mpdeploy_demo_vit", {}),
        ("test_vit", {}),
        ("test_vit", {"qk_norm": True, "qkv_bias": False}),
        ("test_vit", {"reg_tokens": 4}),  # register tokens
        (  # DeiT distilled: distillation token and head, at 64 px and depth 4
            "deit_tiny_distilled_patch16_224",
            {
                "depth": 4,
                "embed_dim": 64,
                "num_heads": 2,
                "img_size": 64,
                "pretrained_cfg_overlay": {"input_size": (3, 64, 64)},
            },
        ),
    )

    def matches(self, model: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def channel_groups(self, model: nn.Module) -> list[ChannelGroup]:
        from timm.layers import Mlp

        groups = []
        for i, block in enumerate(model.blocks):
            path = f"blocks.{i}"
            # residual_module: the pre-norm LayerNorm whose input is the stream the block adds to
            head_group = self._head_group(block.attn, f"{path}.attn")
            groups.append(dataclasses.replace(head_group, residual_module=f"{path}.norm1"))
            if type(block.mlp) is not Mlp:
                raise UserError(f"structured pruning supports timm Mlp blocks only ({path}.mlp)")
            require_identity(block.mlp.norm, "a norm inside the MLP", path)
            mlp_group = mlp_hidden_group(model, f"{path}.mlp")
            groups.append(dataclasses.replace(mlp_group, residual_module=f"{path}.norm2"))
        return groups

    def _head_group(self, attn: nn.Module, path: str) -> ChannelGroup:
        from timm.layers import Attention

        if type(attn) is not Attention:
            raise UserError(f"structured pruning supports timm Attention only ({path})")
        require_identity(attn.norm, "attention scale_norm", path)
        width = attn.num_heads * attn.head_dim
        producers = [ParamSlice(f"{path}.qkv.weight", 0, k * width) for k in range(3)]
        if attn.qkv.bias is not None:
            producers += [ParamSlice(f"{path}.qkv.bias", 0, k * width) for k in range(3)]
        if attn.gate is not None:
            producers.append(ParamSlice(f"{path}.gate.weight", 0))
            if attn.gate.bias is not None:
                producers.append(ParamSlice(f"{path}.gate.bias", 0))
        return ChannelGroup(
            name=path,
            kind="attn_heads",
            width=width,
            unit=attn.head_dim,
            producers=tuple(producers),
            consumers=(ParamSlice(f"{path}.proj.weight", 1),),
            consumer_module=f"{path}.proj",
            min_units=1,
        )

    def after_cut(self, model: nn.Module, group: ChannelGroup, width: int) -> None:
        if group.kind != "attn_heads":
            return
        attn = model.get_submodule(group.name)
        attn.num_heads = width // attn.head_dim
        attn.attn_dim = width

    def extra_channel_macs(self, group: ChannelGroup, positions: dict[str, float]) -> float:
        if group.kind != "attn_heads":
            return 0.0
        tokens = positions.get(f"{group.name}.qkv", 0.0)
        return 2.0 * tokens * tokens  # QKᵀ and AV: N² MACs per head channel each

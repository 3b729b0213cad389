"""timm Swin Transformer (V1 and V2): attention heads with their position bias, MLP hidden neurons.

A head h owns rows [h·d, (h+1)·d) of q, k and v in the fused qkv projection (V2: and of the
separate q/v biases), the same columns of proj, and one per-head slice that is not a channel:
column h of V1's relative-position bias table, or V2's row h of the continuous position bias
MLP's output layer (`cpb_mlp.2`) and its logit scale h. Zeroing the head's q, k and v rows makes
its attention output softmax(bias) · 0 = 0 (V2's cosine attention normalises a zero q to zero),
so the masked twin equals the cut model; the per-head slices are removed with the head
(`ChannelGroup.unit_params`). Window partitioning, shifts and masks are per token and untouched.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F  # noqa: N812

# the package mpdeploy.families applies the torchvision shim before this timm import
from timm.models.swin_transformer_v2 import WindowAttention as WindowAttentionV2
from torch import nn

from mpdeploy.errors import UserError
from mpdeploy.families import Family, register_family
from mpdeploy.families.common import mlp_hidden_group, require_identity
from mpdeploy.families.groups import ChannelGroup, ParamSlice

SWIN_KWARGS = {"embed_dim": 32, "depths": (2, 2), "num_heads": (2, 4), "window_size": 4}
SWIN_TEST_SIZE = {"img_size": 64, "pretrained_cfg_overlay": {"input_size": (3, 64, 64)}}


class PrunedWindowAttentionV2(WindowAttentionV2):
    """timm's V2 window attention whose head outputs may be narrower than its input.

    timm reshapes the heads' output to the input width C, which only holds while every head is
    kept; this forward reshapes to num_heads · head_dim and is otherwise the same computation.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        windows, tokens, _ = x.shape
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = (
                self.qkv(x) + bias if self.qkv_bias_separate else F.linear(x, self.qkv.weight, bias)
            )
        qkv = qkv.reshape(windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        area = self.window_size[0] * self.window_size[1]
        bias = table[self.relative_position_index.view(-1)].view(area, area, -1)
        attn = attn + 16 * torch.sigmoid(bias.permute(2, 0, 1).contiguous()).unsqueeze(0)
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, tokens, tokens)
            attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, self.num_heads, tokens, tokens)
        attn = self.attn_drop(self.softmax(attn))
        x = (attn @ v).transpose(1, 2).reshape(windows, tokens, -1)
        return self.proj_drop(self.proj(x))


@register_family
class SwinFamily(Family):
    name = "swin"
    examples = ("swin_*_patch4_window*", "swinv2_*_window*")
    test_cases = (
        ("swin_tiny_patch4_window7_224", {**SWIN_KWARGS, **SWIN_TEST_SIZE}),  # V1, shifted blocks
        ("swinv2_tiny_window8_256", {**SWIN_KWARGS, **SWIN_TEST_SIZE}),  # V2: cosine attn + CPB
    )

    def matches(self, model: nn.Module) -> bool:
        from timm.models.swin_transformer import SwinTransformer
        from timm.models.swin_transformer_v2 import SwinTransformerV2

        return isinstance(model, (SwinTransformer, SwinTransformerV2))

    def channel_groups(self, model: nn.Module) -> list[ChannelGroup]:
        from timm.layers import Mlp
        from timm.models.swin_transformer import SwinTransformerBlock
        from timm.models.swin_transformer_v2 import SwinTransformerV2Block

        groups = []
        for s, stage in enumerate(model.layers):
            for b, block in enumerate(stage.blocks):
                path = f"layers.{s}.blocks.{b}"
                if type(block) is SwinTransformerBlock:  # pre-norm: norm1/norm2 read the stream
                    heads = self._v1_heads(block.attn, f"{path}.attn")
                    residual_attn, residual_mlp = f"{path}.norm1", f"{path}.norm2"
                elif type(block) is SwinTransformerV2Block:  # post-norm: the block/MLP input is
                    heads = self._v2_heads(block.attn, f"{path}.attn")
                    residual_attn, residual_mlp = path, f"{path}.mlp"
                else:
                    raise UserError(f"structured pruning: unsupported Swin block at {path}")
                groups.append(dataclasses.replace(heads, residual_module=residual_attn))
                if type(block.mlp) is not Mlp:
                    raise UserError(
                        f"structured pruning supports timm Mlp blocks only ({path}.mlp)"
                    )
                require_identity(block.mlp.norm, "a norm inside the MLP", path)
                mlp = mlp_hidden_group(model, f"{path}.mlp")
                groups.append(dataclasses.replace(mlp, residual_module=residual_mlp))
        return groups

    @staticmethod
    def _v1_heads(attn: nn.Module, path: str) -> ChannelGroup:
        from timm.models.swin_transformer import WindowAttention

        if type(attn) is not WindowAttention:
            raise UserError(f"structured pruning: unsupported Swin attention at {path}")
        head_dim = attn.qkv.out_features // (3 * attn.num_heads)
        width = attn.num_heads * head_dim
        producers = [ParamSlice(f"{path}.qkv.weight", 0, k * width) for k in range(3)]
        if attn.qkv.bias is not None:
            producers += [ParamSlice(f"{path}.qkv.bias", 0, k * width) for k in range(3)]
        table = (ParamSlice(f"{path}.relative_position_bias_table", 1),)
        return _head_group(attn, path, producers, table)

    @staticmethod
    def _v2_heads(attn: nn.Module, path: str) -> ChannelGroup:
        if type(attn) not in (WindowAttentionV2, PrunedWindowAttentionV2):
            raise UserError(f"structured pruning: unsupported Swin V2 attention at {path}")
        head_dim = attn.qkv.out_features // (3 * attn.num_heads)
        width = attn.num_heads * head_dim
        producers = [ParamSlice(f"{path}.qkv.weight", 0, k * width) for k in range(3)]
        if attn.qkv.bias is not None:
            producers += [ParamSlice(f"{path}.qkv.bias", 0, k * width) for k in range(3)]
        if attn.q_bias is not None:
            producers += [ParamSlice(f"{path}.{b}_bias", 0) for b in ("q", "k", "v")]
        per_head = (ParamSlice(f"{path}.logit_scale", 0), ParamSlice(f"{path}.cpb_mlp.2.weight", 0))
        group = _head_group(attn, path, producers, per_head)
        # q, k and v biases are separate tensors here: a permutation inside a head that moves v's
        # bias would move q's and k's too (permute.value_producers keeps every tensor listed
        # once), so this kind is not offered to the N:M permutation
        return dataclasses.replace(group, kind="cosine_attn_heads")

    def after_cut(self, model: nn.Module, group: ChannelGroup, width: int) -> None:
        if group.kind not in ("attn_heads", "cosine_attn_heads"):
            return
        attn = model.get_submodule(group.name)
        attn.num_heads = width // group.unit
        if isinstance(attn, WindowAttentionV2):
            attn.__class__ = PrunedWindowAttentionV2

    def extra_channel_macs(self, group: ChannelGroup, positions: dict[str, float]) -> float:
        if group.kind not in ("attn_heads", "cosine_attn_heads"):
            return 0.0
        tokens = positions.get(f"{group.name}.proj", 0.0)  # per image: windows × window area
        # QKᵀ and AV inside each window: window-area MACs per token and head channel, twice;
        # V2's position-bias MLP output row is per head: its MACs spread over the head's channels
        cpb = positions.get(f"{group.name}.cpb_mlp.2", 0.0) * group.cpb_hidden
        # V2 with q/v biases applies qkv.weight through F.linear, outside the qkv module's hooks:
        # its q, k and v rows are counted here instead of from the layer's measured MACs
        qkv = 3.0 * tokens * group.qkv_unhooked_inputs
        return 2.0 * tokens * group.window_area + cpb / group.unit + qkv


@dataclasses.dataclass(frozen=True)
class WindowHeadGroup(ChannelGroup):
    """The heads of one window attention, with what the MAC estimate needs beyond the weights."""

    window_area: int = 0  # tokens per window: each token attends to this many
    cpb_hidden: int = 0  # V2: inputs of the position-bias MLP's per-head output row
    qkv_unhooked_inputs: int = 0  # V2: qkv in_features when the forward bypasses the module


def _head_group(
    attn: nn.Module,
    path: str,
    producers: list[ParamSlice],
    per_head: tuple[ParamSlice, ...],
) -> ChannelGroup:
    head_dim = attn.qkv.out_features // (3 * attn.num_heads)
    width = attn.num_heads * head_dim
    cpb = getattr(attn, "cpb_mlp", None)
    return WindowHeadGroup(
        name=path,
        kind="attn_heads",
        width=width,
        unit=head_dim,
        producers=tuple(producers),
        consumers=(ParamSlice(f"{path}.proj.weight", 1),),
        consumer_module=f"{path}.proj",
        min_units=1,
        unit_params=per_head,
        window_area=int(attn.window_size[0] * attn.window_size[1]),
        cpb_hidden=int(cpb[2].in_features) if cpb is not None else 0,
        qkv_unhooked_inputs=(
            attn.qkv.in_features
            if getattr(attn, "q_bias", None) is not None and not attn.qkv_bias_separate
            else 0
        ),
    )

"""Channel groups: sets of channels inside a block that are removed, or permuted, together.

A family (`families/<family>.py`) lists a model's groups; criteria score them, the planner
picks what to cut, surgery cuts it, and N:M permutation reorders channels inside them. A group's
channels index dimension `dim` of every producer slice (the layers that write them, their biases
and per-channel norms) and of every consumer slice (the weight that reads them).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ParamSlice:
    """`name` is a key of model.state_dict(); channel c lives at index offset + c along `dim`."""

    name: str
    dim: int
    offset: int = 0


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    name: str  # the block's module path, e.g. "blocks.3.mlp"
    kind: str  # "attn_heads" | "mlp_hidden" | "conv_inner"
    width: int  # channels now
    unit: int  # channels removed together: head_dim for heads, 1 otherwise
    producers: tuple[ParamSlice, ...]
    consumers: tuple[ParamSlice, ...]
    consumer_module: str  # module whose input (or input projection) carries these channels
    min_units: int = 1  # never cut below this many units
    # Optional: module whose *input* is the residual stream this group's block adds to (ViT:
    # `blocks.i.norm1`/`norm2`, ConvNeXt: the block's `conv_dw`, ResNet: the block's `conv1`).
    # Read by the `mp` criterion's residual normalisation; None = unknown (no normalisation).
    residual_module: str | None = None
    # Tensors indexed per unit rather than per channel: unit u lives at offset + u along dim (a
    # head's relative-position bias column, Swin V2's logit scale). Surgery slices them with the
    # kept units; criteria, masked twins and permutations leave them alone (a removed head's
    # output is already zero through its v rows, and a permutation inside a head keeps the head).
    unit_params: tuple[ParamSlice, ...] = ()

    @property
    def units(self) -> int:
        return self.width // self.unit

"""Cuts shared by several families: a two-layer MLP's hidden neurons, and refusing extra layers."""

from __future__ import annotations

from torch import nn

from mpdeploy.errors import UserError
from mpdeploy.families.groups import ChannelGroup, ParamSlice


def mlp_hidden_group(
    model: nn.Module, path: str, *, kind: str = "mlp_hidden", extra_producers: tuple[str, ...] = ()
) -> ChannelGroup:
    """The hidden neurons of a timm Mlp-like module at `path` (fc1 → act → [extra] → fc2).

    fc1 may be a Linear or a 1×1 Conv2d; either way channel c is row c of fc1 (and its bias) and
    column c of fc2. `extra_producers` name per-channel parameters in between (GRN gamma/beta).
    """
    mlp = model.get_submodule(path)
    fc1 = mlp.fc1
    producers = [ParamSlice(f"{path}.fc1.weight", 0)]
    if fc1.bias is not None:
        producers.append(ParamSlice(f"{path}.fc1.bias", 0))
    producers += [ParamSlice(f"{path}.{name}", 0) for name in extra_producers]
    return ChannelGroup(
        name=path,
        kind=kind,
        width=int(fc1.weight.shape[0]),
        unit=1,
        producers=tuple(producers),
        consumers=(ParamSlice(f"{path}.fc2.weight", 1),),
        consumer_module=f"{path}.fc2",
        min_units=1,
    )


def require_identity(module: nn.Module | None, what: str, where: str) -> None:
    """Refuse a block configuration whose extra layer would make the cut inexact."""
    if module is not None and not isinstance(module, nn.Identity):
        raise UserError(
            f"structured pruning does not support {what} ({type(module).__name__}) in {where}"
        )

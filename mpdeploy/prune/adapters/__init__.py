"""Architecture adapters: where a model family keeps its removable channel groups, and how to cut them.

One module per family (`vit`, `convnext`, `resnet`); `get_adapter(model)` picks the one that fits.
The shared cut of a two-layer MLP (fc1 rows + bias → fc2 columns) lives here, once.
"""

from __future__ import annotations

from torch import nn

from mpdeploy.errors import UserError
from mpdeploy.prune.groups import ChannelGroup, ParamSlice


class Adapter:
    """One architecture family's knowledge; `mp/` and the criteria never see model classes."""

    family: str = ""
    examples: tuple[str, ...] = ()

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def channel_groups(self, model: nn.Module) -> list[ChannelGroup]:
        """The removable groups at the model's current widths, in forward order."""
        raise NotImplementedError

    def after_cut(self, model: nn.Module, group: ChannelGroup, width: int) -> None:
        """Update family-specific module state once `group`'s tensors hold `width` channels."""

    def extra_channel_macs(self, group: ChannelGroup, positions: dict[str, float]) -> float:
        """MACs per channel outside the group's weights (e.g. attention matmuls); 0 by default.

        `positions[module]` is the number of output positions (tokens or pixels) of a Linear/Conv
        module for one image.
        """
        return 0.0


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


def _registry() -> list[Adapter]:
    from mpdeploy.prune.adapters.convnext import ConvNeXtAdapter
    from mpdeploy.prune.adapters.resnet import ResNetAdapter
    from mpdeploy.prune.adapters.vit import ViTAdapter

    return [ViTAdapter(), ConvNeXtAdapter(), ResNetAdapter()]


def supported_families() -> list[str]:
    return [f"{a.family} ({', '.join(a.examples)})" for a in _registry()]


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter of `model`'s family; a UserError naming the supported families if none fits."""
    import mpdeploy.models  # noqa: F401  (torchvision shim before timm)

    for adapter in _registry():
        if adapter.matches(model):
            return adapter
    raise UserError(
        f"structured pruning has no adapter for {type(model).__name__}; supported: "
        + "; ".join(supported_families())
    )


__all__ = ["Adapter", "get_adapter", "mlp_hidden_group", "require_identity", "supported_families"]

"""Model families: where each architecture keeps its removable channel groups, and how to cut them.

One module per family (`vit`, `convnext`, `resnet`, …) defines a `Family` subclass and registers it
with `@register_family`, the way timm registers models. The registry is the single list of what
mpdeploy can prune: `get_family(model)` picks the family of a model, `registered_families()` feeds
the CLI's messages, `doctor`, the docs table and the parametrised tests. `groups` holds the shared
group abstraction and `surgery` the generic exact cut. This package knows models, not matrices, and
imports neither `mpdeploy.models` nor `mpdeploy.prune`.
"""

from __future__ import annotations

import importlib

from torch import nn

from mpdeploy._compat import ensure_torchvision_importable
from mpdeploy.errors import UserError
from mpdeploy.families.groups import ChannelGroup, ParamSlice

ensure_torchvision_importable()  # family modules import timm; a submodule import runs this first

# The family modules shipped with mpdeploy, imported on first use of the registry (they import
# timm). A new family is one module here plus its name in this tuple.
BUILTIN_FAMILY_MODULES = ("vit", "convnext", "resnet", "efficientnet", "grouped", "swin")

_REGISTRY: dict[str, Family] = {}
_loaded = False


class Family:
    """One architecture family's knowledge; `mp/` and the criteria never see model classes."""

    name: str = ""
    # timm architecture name patterns (fnmatch) this family accepts; shown by `mpdeploy families`
    examples: tuple[str, ...] = ()
    # (timm name, create_model kwargs) of tiny variants covering every block variant the family
    # cuts; the parametrised tests run each, so a registered family is tested without editing them
    test_cases: tuple[tuple[str, dict], ...] = ()

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


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: add one instance of `cls` to the registry under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name`")
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"family {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    for module in BUILTIN_FAMILY_MODULES:
        importlib.import_module(f"mpdeploy.families.{module}")
    _loaded = True


def registered_families() -> list[Family]:
    """Every registered family: the built-in ones in `BUILTIN_FAMILY_MODULES` order, then others."""
    _load_builtin()
    order = {module: i for i, module in enumerate(BUILTIN_FAMILY_MODULES)}

    def rank(family: Family) -> int:
        return order.get(type(family).__module__.rsplit(".", 1)[-1], len(order))

    return sorted(_REGISTRY.values(), key=rank)  # stable: plug-ins keep registration order


def supported_families() -> list[str]:
    """One human-readable entry per family: its name and the architectures it accepts."""
    return [f"{f.name} ({', '.join(f.examples)})" for f in registered_families()]


def find_family(model: nn.Module) -> Family | None:
    for family in registered_families():
        if family.matches(model):
            return family
    return None


def get_family(model: nn.Module) -> Family:
    """The family of `model`; a UserError naming the supported families if none fits."""
    family = find_family(model)
    if family is None:
        raise UserError(
            f"structured pruning has no family for {type(model).__name__}; supported: "
            + "; ".join(supported_families())
        )
    return family


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """Shorthand for `get_family(model).channel_groups(model)`."""
    return get_family(model).channel_groups(model)


__all__ = [
    "BUILTIN_FAMILY_MODULES",
    "ChannelGroup",
    "Family",
    "ParamSlice",
    "channel_groups",
    "find_family",
    "get_family",
    "register_family",
    "registered_families",
    "supported_families",
]

"""Which timm architectures the registry can prune: by name pattern, and checked on the meta device.

`pattern_architectures(family)` lists the timm names matching a family's `examples` (what
`mpdeploy families` shows); `check_architecture(name)` builds the architecture on the meta device
(shapes only: no weights, no download) and asks the registry for its family and channel groups,
so an accepted name is one whose every block the family can cut, and a refusal carries the
family's one-line reason. `scripts/coverage.py` runs it over every timm model (docs/coverage.md).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.overrides import TorchFunctionMode

from mpdeploy.errors import UserError
from mpdeploy.families import Family, find_family


@dataclasses.dataclass(frozen=True)
class Verdict:
    architecture: str
    model_class: str | None  # None when timm could not build it
    family: str | None
    groups: int  # prunable channel groups (0 when refused)
    params: int  # parameters at the default configuration
    reason: str | None = None  # why it is refused; None = accepted

    @property
    def accepted(self) -> bool:
        return self.reason is None


def pattern_architectures(family: Family) -> list[str]:
    """timm model names matching the family's `examples` patterns (not checked one by one)."""
    import timm

    return sorted(set(timm.list_models(list(family.examples))))


def check_architecture(name: str) -> Verdict:
    """Build `name` on the meta device and ask the registry whether it can prune it."""
    import timm

    try:
        with torch.device("meta"), _SkipInPlaceOnMeta():
            model = timm.create_model(name, pretrained=False)
    except Exception as exc:  # timm's own failure (meta-incompatible init, missing extras)
        return Verdict(name, None, None, 0, 0, f"timm cannot build it on meta: {_line(exc)}")
    params = sum(p.numel() for p in model.parameters())
    cls = type(model).__name__
    family = find_family(model)
    if family is None:
        return Verdict(name, cls, None, 0, params, f"no family for {cls}")
    try:
        groups = family.channel_groups(model)
    except UserError as exc:
        return Verdict(name, cls, family.name, 0, params, _line(exc))
    except Exception as exc:  # a block the family did not expect: a refusal, with its cause
        return Verdict(name, cls, family.name, 0, params, f"{type(exc).__name__}: {_line(exc)}")
    if not groups:
        return Verdict(name, cls, family.name, 0, params, "no prunable channel group")
    return Verdict(name, cls, family.name, len(groups), params)


class _SkipInPlaceOnMeta(TorchFunctionMode):
    """Return meta tensors from in-place ops unchanged: weight init has nothing to fill there.

    timm initialises weights in place (trunc_normal_ clamps, erfinv_, …); on the meta device those
    ops still run through decompositions and took ~90 % of building a model.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and args:
            target = args[0]
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **(kwargs or {}))


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."

"""TensorRT's k:n weight layout: which Linear/Conv2d weights can hold it, and how their groups lie.

TensorRT (and Polygraphy's checker) group 2:4 along the reduction dimension of the GEMM: a Linear
weight (out, in) along `in` for every output row; a Conv2d weight (Cout, Cin, kh, kw) along `Cin`
separately for every output channel and kernel pixel — not along the flattened Cin·kh·kw axis.
`grouped(weight, n)` is the one place that turns a weight into (rows, pixels, groups, n) in that
layout; masks are built there and folded back with `ungrouped`.
"""

from __future__ import annotations

import dataclasses
from fnmatch import fnmatchcase

import torch
from torch import nn

from mpdeploy.errors import UserError

STEM_REASON = "stem: reads the {cin}-channel image"
CLASSIFIER_REASON = "classifier head (include_classifier=False)"
GROUPED_CONV_REASON = "grouped/depthwise conv (groups={groups}): no sparse tensor-core kernel"
NOT_MULTIPLE_REASON = "{what} {size} is not a multiple of n={n}"
DENSE_REASON = "kept dense: matches dense_layers pattern '{pattern}'"


@dataclasses.dataclass(frozen=True)
class LayerLayout:
    """One Linear/Conv2d and whether a k:n mask in TensorRT's layout fits its weight."""

    name: str  # module path
    param: str  # state_dict key of the weight
    kind: str  # "linear" | "conv"
    shape: tuple[int, ...]
    eligible: bool
    reason: str | None = None  # why not, when not eligible

    @property
    def grouped_dim(self) -> int:
        """Size of the axis the groups run along: in_features, or Cin."""
        return self.shape[1]


def classifier_name(model: nn.Module) -> str | None:
    """Module path of the model's classifier (timm's `get_classifier()`), if it has one."""
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    if isinstance(head, nn.Module):
        for name, module in model.named_modules():
            if module is head:
                return name
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier")
    return classifier[0] if isinstance(classifier, (list, tuple)) else classifier


def layer_layouts(
    model: nn.Module, n: int, *, include_classifier: bool = False, image_channels: int = 3
) -> list[LayerLayout]:
    """Every Linear and Conv2d of `model` in module order, eligible for k:n or with the reason."""
    head = classifier_name(model)
    layouts = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            kind, what = "linear", "in_features"
        elif isinstance(module, nn.Conv2d):
            kind, what = "conv", "Cin"
        else:
            continue
        shape = tuple(module.weight.shape)
        reason = None
        if kind == "conv" and module.groups != 1:
            reason = GROUPED_CONV_REASON.format(groups=module.groups)
        elif kind == "conv" and module.in_channels == image_channels:
            reason = STEM_REASON.format(cin=image_channels)
        elif name == head and not include_classifier:
            reason = CLASSIFIER_REASON
        elif shape[1] % n:
            reason = NOT_MULTIPLE_REASON.format(what=what, size=shape[1], n=n)
        layouts.append(LayerLayout(name, f"{name}.weight", kind, shape, reason is None, reason))
    return layouts


def grouped(weight: torch.Tensor, n: int) -> torch.Tensor:
    """(out, in) or (Cout, Cin, kh, kw) → (out, pixels, Cin/n, n), TensorRT's grouping (a copy)."""
    if weight.dim() == 2:
        out, cin = weight.shape
        return weight.reshape(out, 1, cin // n, n).clone()
    out, cin, kh, kw = weight.shape
    return weight.permute(0, 2, 3, 1).reshape(out, kh * kw, cin // n, n).clone()


def ungrouped(groups: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `grouped`: back to the weight's own shape."""
    if len(shape) == 2:
        return groups.reshape(shape)
    out, cin, kh, kw = shape
    return groups.reshape(out, kh, kw, cin).permute(0, 3, 1, 2).contiguous()


def kept_per_group(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """Non-zeros in every TensorRT group of a weight or mask: (out, pixels, Cin/n) counts."""
    return (grouped(tensor, n) != 0).sum(dim=-1)


def conforms(weight: torch.Tensor, k: int, n: int) -> bool:
    """True when every group keeps at most k of its n weights (what TensorRT's check asks)."""
    return bool((kept_per_group(weight, n) <= k).all())


def keep_dense(layouts: list[LayerLayout], patterns: tuple[str, ...]) -> list[LayerLayout]:
    """Layers whose module name matches one of `patterns` (shell-style, `fnmatch`) stay dense.

    A pattern that matches no Linear/Conv2d of the model is a UserError (a typo would otherwise
    sparsify everything); one that matches only layers that are ineligible anyway is fine."""
    out = []
    for lay in layouts:
        match = next((p for p in patterns if fnmatchcase(lay.name, p)), None)
        if match is not None and lay.eligible:
            lay = dataclasses.replace(
                lay, eligible=False, reason=DENSE_REASON.format(pattern=match)
            )
        out.append(lay)
    for pattern in patterns:
        if not any(fnmatchcase(lay.name, pattern) for lay in layouts):
            names = ", ".join(lay.name for lay in layouts[:3])
            raise UserError(
                f"--sparsity-dense '{pattern}' matches no Linear/Conv2d layer of the model "
                f"(module names such as {names}; shell-style patterns, e.g. 'blocks.0.*')"
            )
    return out

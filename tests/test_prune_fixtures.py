"""Shared helpers for the structured-pruning tests: tiny models of every family and masked twins."""

from __future__ import annotations

import copy

import torch

import mpdeploy.models  # noqa: F401  (torchvision shim before timm)

# isort: split
import timm

from mpdeploy.families import get_family, registered_families

# (timm name, kwargs): every registered family's test cases, at test size
FAMILY_CASES = [case for family in registered_families() for case in family.test_cases]
CASE_IDS = [
    f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}"
    for name, kw in FAMILY_CASES
]


def make_model(name: str, kwargs: dict, seed: int = 0) -> torch.nn.Module:
    """A random-weight model whose norms and GRN are not at their (degenerate) init values."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if param.ndim == 1 and "pos_embed" not in pname:
                param.normal_(0.0, 0.5)
        for bname, buf in model.named_buffers():
            if bname.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            elif bname.endswith("running_mean"):
                buf.normal_(0.0, 0.3)
    return model


def input_size(model: torch.nn.Module) -> tuple[int, int, int]:
    return tuple(model.pretrained_cfg["input_size"])


def random_keep(model: torch.nn.Module, fraction: float = 0.5, seed: int = 1) -> dict:
    """Kept channel indices per group: a random `fraction` of whole units (≥ 1 unit)."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for group in get_family(model).channel_groups(model):
        count = max(1, int(group.units * fraction))
        units = torch.randperm(group.units, generator=gen)[:count]
        keep[group.name] = (units[:, None] * group.unit + torch.arange(group.unit)).flatten()
    return keep


def masked_twin(model: torch.nn.Module, keep: dict) -> torch.nn.Module:
    """The dense model with every removed channel's producer parameters (rows, bias, norm) zeroed."""
    twin = copy.deepcopy(model)
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for group in get_family(model).channel_groups(model):
            removed = torch.ones(group.width, dtype=torch.bool)
            removed[torch.as_tensor(keep[group.name])] = False
            index = removed.nonzero().squeeze(1)
            for piece in group.producers:
                if piece.name in params:  # BatchNorm running statistics are buffers: left alone
                    params[piece.name].index_fill_(piece.dim, index + piece.offset, 0.0)
    return twin


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference - other).abs().max() / reference.abs().max())


def test_cases_cover_every_registered_family():
    """Each family's test cases are models of that family (so the parametrised tests cover it)."""
    for family in registered_families():
        assert family.test_cases, f"family {family.name} registers no test case"
        for name, kwargs in family.test_cases:
            assert get_family(make_model(name, kwargs)) is family

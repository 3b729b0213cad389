"""A model's architecture spec (timm name + widths) and its persistence as json + safetensors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from mpdeploy.errors import UserError
from mpdeploy.fileio import atomic_path, write_json

SPEC_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a (possibly pruned) timm model without the original weights."""

    timm_name: str
    num_classes: int
    img_size: int
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    widths: dict[str, int] | None = None  # per-layer kept widths set by structured pruning
    class_names: list[str] | None = None
    # token merging (ViTs): ToMeSettings.to_dict(); absent in specs written before it existed
    tome: dict[str, Any] | None = None

    @property
    def architecture(self) -> str:
        return self.timm_name.split(".", 1)[0]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> ModelSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(payload) - fields
        if unknown or "timm_name" not in payload:
            raise UserError(f"not an mpdeploy model spec (unexpected keys {sorted(unknown)})")
        return cls(**payload)

    def with_widths(self, widths: dict[str, int] | None) -> ModelSpec:
        return dataclasses.replace(self, widths=dict(widths) if widths else None)

    def with_tome(self, settings: Any) -> ModelSpec:
        """This spec with token merging `settings` (a ToMeSettings, or None for none)."""
        return dataclasses.replace(self, tome=settings.to_dict() if settings else None)


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """Instantiate the architecture of `spec` (random weights) at its pruned widths."""
    import timm

    import mpdeploy.models  # noqa: F401  (registers the demo model, applies the torchvision shim)

    model = timm.create_model(
        spec.architecture, pretrained=False, num_classes=spec.num_classes, **spec.model_kwargs
    )
    if spec.widths:
        from mpdeploy.families.surgery import resize_to_widths

        resize_to_widths(model, spec.widths)
    if spec.tome:
        from mpdeploy.families.tome import ToMeSettings, apply_tome

        apply_tome(model, ToMeSettings.from_dict(spec.tome))
    return model.eval()


def save_model(model: torch.nn.Module, spec: ModelSpec, directory: str | Path) -> Path:
    """Write `model.json` and `model.safetensors` into `directory`, each atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "timm_name": spec.timm_name})
    write_json(directory / SPEC_FILE, spec.to_dict())
    return directory


def load_spec(directory: str | Path) -> ModelSpec:
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise UserError(f"no model spec at {path}")
    try:
        return ModelSpec.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise UserError(f"unreadable model spec {path}: {exc}") from None


def load_model(directory: str | Path) -> tuple[torch.nn.Module, ModelSpec]:
    """Rebuild a model saved by `save_model`; a spec that does not match the weights is an error."""
    from safetensors.torch import load_file

    directory = Path(directory)
    spec = load_spec(directory)
    model = build_model(spec)
    state = load_file(str(directory / WEIGHTS_FILE))
    check_state_dict(model, state, source=str(directory / WEIGHTS_FILE))
    model.load_state_dict(state, strict=True)
    return model.eval(), spec


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a UserError naming the first tensors whose names or shapes disagree with `model`."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if mismatched:
        raise UserError(f"weights {source} do not fit the model: {'; '.join(mismatched[:3])}")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        raise UserError(f"weights {source} do not fit the model: {'; '.join(parts)}")

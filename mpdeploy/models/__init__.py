"""Model resolution: names → timm architectures, weights (hub, file, bundled, none), data configs."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

from mpdeploy._compat import ensure_torchvision_importable

ensure_torchvision_importable()

import torch  # noqa: E402

from mpdeploy.errors import UserError, one_line  # noqa: E402
from mpdeploy.models import demo  # noqa: E402,F401  (registers the demo model with timm)
from mpdeploy.models.registry import ALIASES, resolve_model_name, short_name  # noqa: E402
from mpdeploy.models.spec import ModelSpec, check_state_dict  # noqa: E402

__all__ = [
    "ALIASES",
    "LoadedModel",
    "ModelSpec",
    "create_model",
    "data_config_for",
    "resolve_model_name",
    "short_name",
]
log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    spec: ModelSpec
    data_config: dict[str, Any]
    weights_source: str  # "hub", "bundled", "none" or the file path


def create_model(
    name: str,
    weights: str = "hub",
    num_classes: int | None = None,
    img_size: int | None = None,
) -> LoadedModel:
    """Create a timm model by alias or timm name with weights from the hub, a file, or none."""
    timm_name = resolve_model_name(name)
    if timm_name == demo.DEMO_MODEL and weights == "hub":
        weights = str(demo.demo_weights_path())
        source = "bundled"
    else:
        source = weights if weights in ("hub", "none") else str(Path(weights))

    if weights == "hub":
        model = _from_hub(timm_name, num_classes, img_size)
    elif weights == "none":
        log.warning(
            "random weights (--weights none): MP pruning of untrained weights is meaningless; "
            "use this only to test the pipeline"
        )
        model = _instantiate(timm_name, num_classes, img_size)
    else:
        model = _from_file(timm_name, Path(weights), num_classes, img_size)

    model.eval()
    resolved_classes = int(model.num_classes)
    resolved_size = _model_img_size(model, img_size)
    kwargs = {"img_size": resolved_size} if _has_pos_embed(model) else {}
    class_names = demo.DEMO_CLASS_NAMES if timm_name == demo.DEMO_MODEL else None
    spec = ModelSpec(
        timm_name=timm_name,
        num_classes=resolved_classes,
        img_size=resolved_size,
        model_kwargs=kwargs,
        class_names=class_names,
    )
    return LoadedModel(model, spec, data_config_for(model, resolved_size), source)


def data_config_for(model: torch.nn.Module, img_size: int) -> dict[str, Any]:
    """timm's own eval preprocessing for `model`, at `img_size`."""
    import timm

    cfg = timm.data.resolve_data_config({}, model=model)
    cfg["input_size"] = (3, img_size, img_size)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def _instantiate(timm_name: str, num_classes: int | None, img_size: int | None, **kw):
    import timm

    kwargs: dict[str, Any] = dict(kw)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        return timm.create_model(timm_name, **kwargs)
    except TypeError as exc:
        if "img_size" in str(exc):
            raise UserError(f"{timm_name} has no fixed input size; drop --img-size") from None
        raise
    except (AssertionError, ValueError, RuntimeError) as exc:
        if img_size is None and num_classes is None:
            raise
        # timm asserts on sizes a model cannot take (a ViT image smaller than one patch, …).
        raise UserError(
            f"{timm_name} cannot be built with --img-size {img_size} / --num-classes "
            f"{num_classes}: {one_line(exc)}"
        ) from None


def _from_hub(timm_name: str, num_classes: int | None, img_size: int | None):
    offline = _hub_unreachable()
    try:
        if offline:  # cached weights still load; anything else fails at once, not after ~55 s
            with _hub_offline():
                return _instantiate(timm_name, num_classes, img_size, pretrained=True)
        return _instantiate(timm_name, num_classes, img_size, pretrained=True)
    except UserError:
        raise
    except Exception as exc:  # network, hub and cache errors come in many types
        reason = offline or one_line(exc, 160)
        raise UserError(
            f"cannot load pretrained weights for {timm_name} from the hub ({reason}); "
            "pass --weights PATH to a local checkpoint"
        ) from None


HUB_HOST = "huggingface.co"


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the model hub cannot be reached from here (None if it can, or a proxy decides).

    One TCP connect replaces the hub client's minute of retries and warnings when offline.
    """
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return None  # the hub client already fails fast, from the cache only
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # only the proxy knows; let the client try
    host = urlparse(os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}")).hostname or HUB_HOST
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return None
    except OSError as exc:
        return f"no network: cannot reach {host} ({exc.strerror or type(exc).__name__})"


@contextlib.contextmanager
def _hub_offline():
    """HF_HUB_OFFLINE for one call: the variable, and the constant the hub client read at import."""
    import os

    values = {"HF_HUB_OFFLINE": "1"}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        import huggingface_hub.constants as hub_constants

        saved_const = hub_constants.HF_HUB_OFFLINE
        hub_constants.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        hub_constants, saved_const = None, None
    try:
        yield
    finally:
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = saved_const
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_weights_file(path: Path) -> None:
    """A --weights PATH that cannot be a checkpoint is refused before any work (one line)."""
    if path.is_dir():
        raise UserError(f"--weights {path} is a directory; pass the checkpoint file inside it")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise UserError(f"unsupported weights file {path.name}: use {', '.join(WEIGHT_SUFFIXES)}")
    if not path.exists():
        raise UserError(f"weights file not found: {path}")
    if not path.is_file():
        raise UserError(f"--weights {path} is not a regular file")
    if path.stat().st_size == 0:
        raise UserError(f"weights file {path} is empty (0 bytes)")


def _from_file(timm_name: str, path: Path, num_classes: int | None, img_size: int | None):
    state = read_checkpoint(path)
    probe = _instantiate(timm_name, None, None)
    if num_classes is None:
        num_classes = _infer_num_classes(probe, state)
    if img_size is None:
        img_size = _infer_img_size(probe, state)
    model = _instantiate(timm_name, num_classes, img_size)
    check_state_dict(model, state, source=str(path))
    model.load_state_dict(state, strict=True)
    return model


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch file (weights_only); unwrap common nesting."""
    check_weights_file(path)
    if path.suffix != ".safetensors":
        with open(path, "rb") as fh:
            magic = fh.read(4)
        # torch.save writes a zip archive; older checkpoints are a pickle (protocol byte 0x80).
        if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
            raise UserError(
                f"cannot read weights {path}: not a torch checkpoint (neither a zip archive nor "
                "a pickle)"
            )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"cannot read weights {path}: not a {path.suffix} checkpoint ({one_line(exc, 160)})"
        ) from None
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    prefix = "module."
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _infer_num_classes(probe: torch.nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    classifier = (
        probe.pretrained_cfg.get("classifier") if hasattr(probe, "pretrained_cfg") else None
    )
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0]
    key = f"{classifier}.weight" if classifier else None
    if key and key in state:
        return int(state[key].shape[0])
    return None


def _infer_img_size(probe: torch.nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    pos = state.get("pos_embed")
    patch_embed = getattr(probe, "patch_embed", None)
    if pos is None or patch_embed is None or not hasattr(patch_embed, "patch_size"):
        return None
    prefix_tokens = 0 if getattr(probe, "no_embed_class", False) else probe.num_prefix_tokens
    grid = math.isqrt(pos.shape[1] - prefix_tokens)
    if grid * grid != pos.shape[1] - prefix_tokens:
        return None
    return grid * int(patch_embed.patch_size[0])


def _has_pos_embed(model: torch.nn.Module) -> bool:
    return getattr(model, "pos_embed", None) is not None and hasattr(model, "patch_embed")


def _model_img_size(model: torch.nn.Module, requested: int | None) -> int:
    if requested is not None:
        return int(requested)
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None):
        return int(patch_embed.img_size[0])
    input_size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return int(input_size[-1])

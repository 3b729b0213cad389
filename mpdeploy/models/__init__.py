"""Model resolution: names → timm architectures, weights (hub, file, bundled, none), data configs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
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
    "read_data_config",
    "resolve_model_name",
    "short_name",
]
log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# timm's preprocessing keys that `--data-config FILE.json` may set (timm.data.resolve_data_config)
DATA_CONFIG_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")


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
    data_config: dict[str, Any] | None = None,
) -> LoadedModel:
    """Create a timm model by alias or timm name with weights from the hub, a file, or none.

    `data_config` (from `read_data_config`) overrides timm's preprocessing; its `input_size`
    sets the image size. A model without a size argument (a CNN) runs at `img_size` as it is.
    """
    timm_name = resolve_model_name(name)
    img_size = _requested_size(img_size, data_config)
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
    config = data_config_for(model, resolved_size, data_config)
    return LoadedModel(model, spec, config, source)


def data_config_for(
    model: torch.nn.Module, img_size: int, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """timm's own eval preprocessing for `model`, at `img_size`, with `overrides` on top."""
    import timm

    cfg = timm.data.resolve_data_config({}, model=model)
    cfg["input_size"] = (3, img_size, img_size)
    cfg.update(overrides or {})
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def read_data_config(path: str | Path) -> dict[str, Any]:
    """A `--data-config FILE.json` of timm preprocessing keys, checked (one-line UserErrors)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data-config file not found: {path}")
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--data-config {path} is not JSON ({one_line(exc, 120)})") from None
    if not isinstance(payload, dict) or not payload:
        raise UserError(
            f"--data-config {path} must be a JSON object with some of {DATA_CONFIG_KEYS}"
        )
    unknown = sorted(set(payload) - set(DATA_CONFIG_KEYS))
    if unknown:
        raise UserError(
            f"--data-config {path}: unknown key(s) {', '.join(unknown)}; "
            f"timm's keys are {', '.join(DATA_CONFIG_KEYS)}"
        )
    return {key: _checked_value(path, key, value) for key, value in payload.items()}


def _checked_value(path: Path, key: str, value: Any) -> Any:
    def bad(why: str) -> UserError:
        return UserError(f"--data-config {path}: {key} {json.dumps(value)} {why}")

    def numbers(count: int) -> list[float]:
        if not isinstance(value, list) or len(value) != count:
            raise bad(f"must be a list of {count} numbers")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise bad(f"must be a list of {count} numbers")
        return [float(v) for v in value]

    if key == "input_size":
        size = numbers(3)
        low, high = IMG_SIZE_RANGE
        if size[0] != 3 or size[1] != size[2] or size[1] != int(size[1]):
            raise bad("must be [3, S, S] (RGB, square)")
        if not low <= size[1] <= high:
            raise bad(f"must have S in [{low}, {high}]")
        return [3, int(size[1]), int(size[2])]
    if key == "interpolation":
        if value not in INTERPOLATIONS:
            raise bad(f"must be one of {', '.join(INTERPOLATIONS)}")
        return value
    if key == "crop_mode":
        if value not in CROP_MODES:
            raise bad(f"must be one of {', '.join(CROP_MODES)}")
        return value
    if key == "crop_pct":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise bad("must be a number in (0, 1]")
        return float(value)
    stats = numbers(3)  # mean, std: per RGB channel
    if key == "std" and min(stats) <= 0:
        raise bad("must be > 0")
    return stats


# Bounds on an image side; the same as the build option checks (pipeline.IMG_SIZE_RANGE)
IMG_SIZE_RANGE = (16, 2048)


def _requested_size(img_size: int | None, data_config: dict[str, Any] | None) -> int | None:
    """--img-size, or the data config's input_size; both given, they must agree."""
    size = (data_config or {}).get("input_size")
    if size is None:
        return img_size
    if img_size is not None and int(img_size) != int(size[-1]):
        raise UserError(
            f"--img-size {img_size} disagrees with the data config's input_size {list(size)}"
        )
    return int(size[-1])


def _instantiate(timm_name: str, num_classes: int | None, img_size: int | None, **kw):
    import timm

    kwargs: dict[str, Any] = dict(kw)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        try:
            return timm.create_model(timm_name, **kwargs)
        except TypeError as exc:
            if img_size is None or "img_size" not in str(exc):
                raise
        # No size argument: a convolutional net with global pooling runs at any size as it is.
        kwargs.pop("img_size")
        require_runs_at(timm_name, img_size, num_classes)
        return timm.create_model(timm_name, **kwargs)
    except (AssertionError, ValueError, RuntimeError) as exc:
        if img_size is None and num_classes is None:
            raise
        # timm asserts on sizes a model cannot take (a ViT image smaller than one patch, …).
        raise UserError(
            f"{timm_name} cannot be built with --img-size {img_size} / --num-classes "
            f"{num_classes}: {one_line(exc)}"
        ) from None


def require_runs_at(timm_name: str, img_size: int, num_classes: int | None = None) -> None:
    """Refuse (one line) an architecture that cannot take `img_size` images: one forward of the
    weightless architecture on the meta device (no memory, no compute)."""
    import timm

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        with torch.device("meta"):
            probe = timm.create_model(timm_name, **kwargs)
            with torch.no_grad():
                probe.eval()(torch.empty(1, 3, img_size, img_size))
    except Exception as exc:  # any op may object to a size (a fixed-size head, a window)
        raise UserError(
            f"{timm_name} cannot run at --img-size {img_size}: {one_line(exc, 160)}"
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


def meta_model(timm_name: str) -> torch.nn.Module | None:
    """The architecture built on the meta device (no weights, no memory), for checks before any
    work; None for one that cannot be built there (its stage checks it later)."""
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(timm_name)
    except Exception:  # noqa: BLE001  (an architecture that needs real tensors to build)
        log.debug("cannot build %s on the meta device; checked later", timm_name)
        return None


def require_prunable(name: str) -> None:
    """Before any work: does a family prune this architecture? One line naming the unsupported
    module type (and where) and the supported families if not.

    The architecture is built on the meta device (no weights, no memory); one that cannot be
    built there is left to the prune stage's own check.
    """
    from mpdeploy.families import get_family, supported_families

    timm_name = resolve_model_name(name)
    probe = meta_model(timm_name)
    if probe is None:
        return
    try:
        get_family(probe).channel_groups(probe)
    except UserError as exc:
        message = str(exc)
        if "supported:" not in message:
            message += "; supported: " + "; ".join(supported_families())
        raise UserError(f"--target-macs: {timm_name}: {message}") from None

"""The bundled demo model: a small timm ViT trained on scikit-learn's digits, shipped offline.

Importing this module registers `mpdeploy_demo_vit` with timm; `scripts/train_demo.py` trains it
and `docs/demo-model.md` documents the data split and the measured accuracy.
"""

from __future__ import annotations

from pathlib import Path

from mpdeploy._compat import ensure_torchvision_importable

ensure_torchvision_importable()

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model  # noqa: E402
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn  # noqa: E402

# Defined up front: timm's register_model appends the entrypoint to `__all__`, creating it if absent.
__all__ = [
    "DEMO_CLASS_NAMES",
    "DEMO_MODEL",
    "create_demo_model",
    "demo_weights_path",
]

DEMO_MODEL = "mpdeploy_demo_vit"
DEMO_CLASS_NAMES = [str(i) for i in range(10)]
DEMO_IMG_SIZE = 32
# Computed by scripts/train_demo.py over the training split (0..1 pixels, all three channels equal).
DEMO_MEAN = (0.3057, 0.3057, 0.3057)
DEMO_STD = (0.3235, 0.3235, 0.3235)
DEMO_ARCH = dict(
    img_size=DEMO_IMG_SIZE,
    patch_size=4,  # 8x8 grid = 64 patch tokens + the class token
    in_chans=3,
    embed_dim=96,
    depth=6,
    num_heads=4,  # head_dim 24
    mlp_ratio=4.0,  # MLP hidden 384
    num_classes=len(DEMO_CLASS_NAMES),
    class_token=True,
    global_pool="token",
)


def demo_weights_path() -> Path:
    """Where the trained demo weights ship inside the package."""
    return Path(__file__).resolve().parent / "weights" / "demo_vit.safetensors"


default_cfgs = generate_default_cfgs(
    {
        DEMO_MODEL: dict(
            file=str(demo_weights_path()),
            input_size=(3, DEMO_IMG_SIZE, DEMO_IMG_SIZE),
            fixed_input_size=True,
            interpolation="bilinear",
            crop_pct=1.0,
            crop_mode="center",
            mean=DEMO_MEAN,
            std=DEMO_STD,
            num_classes=len(DEMO_CLASS_NAMES),
            label_names=tuple(DEMO_CLASS_NAMES),
            first_conv="patch_embed.proj",
            classifier="head",
            license="bsd-3-clause",
            description="mpdeploy demo ViT trained on the scikit-learn digits train split",
        )
    }
)


@register_model
def mpdeploy_demo_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT, patch 4, 32x32 input, dim 96, depth 6, 4 heads; weights from the package, not the hub."""
    return build_model_with_cfg(
        VisionTransformer,
        DEMO_MODEL,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **dict(DEMO_ARCH, **kwargs),
    )


def create_demo_model(pretrained: bool = True) -> VisionTransformer:
    """The demo model in eval mode, with the shipped weights when `pretrained`."""
    if pretrained and not demo_weights_path().is_file():
        from mpdeploy.errors import UserError

        raise UserError(
            f"demo weights missing at {demo_weights_path()}: reinstall mpdeploy "
            "or run scripts/train_demo.py"
        )
    return mpdeploy_demo_vit(pretrained=pretrained).eval()

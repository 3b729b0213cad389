"""Model names: the aliases users type, mapped to the timm checkpoints the MP paper prunes."""

from __future__ import annotations

from mpdeploy.errors import UserError

ALIASES: dict[str, str] = {
    "vit_b16": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "vit_l16": "vit_large_patch16_224.augreg_in21k_ft_in1k",
    "convnextv2_base": "convnextv2_base.fcmae_ft_in22k_in1k",
    "resnet50": "resnet50.tv_in1k",
    "resnet152d": "resnet152d.ra2_in1k",
}
DEMO_ALIAS = "demo"


def resolve_model_name(name: str) -> str:
    """Return the timm name (with pretrained tag where known) for an alias or a timm name."""
    import timm

    from mpdeploy.models.demo import DEMO_MODEL

    if name in (DEMO_ALIAS, DEMO_MODEL):
        return DEMO_MODEL
    if name in ALIASES:
        return ALIASES[name]
    architecture = name.split(".", 1)[0]
    if timm.is_model(architecture):
        return name
    close = timm.list_models(f"*{architecture[:8]}*")[:5]
    hint = f" (similar timm names: {', '.join(close)})" if close else ""
    raise UserError(
        f"unknown model '{name}': use an alias ({', '.join(ALIASES)}, demo) or a timm name{hint}"
    )


def short_name(name: str) -> str:
    """A file-system friendly name for build directories: the alias if any, else the timm name."""
    for alias, timm_name in ALIASES.items():
        if name in (alias, timm_name):
            return alias
    from mpdeploy.models.demo import DEMO_MODEL

    if name in (DEMO_ALIAS, DEMO_MODEL):
        return DEMO_ALIAS
    return name.replace("/", "_").replace(".", "_")

"""Environment fix-ups that must run before timm is imported.

CPU builds of torch have no matching torchvision wheel on PyPI; the CUDA torchvision wheel then
fails at import with ``operator torchvision::nms does not exist`` because its C++ ops are absent.
timm only needs torchvision's transforms, so declaring the two op schemas is enough. The fix is
applied only when the op is really missing, so a matching torch/torchvision pair is left alone.
"""

from __future__ import annotations

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keep the torch.library.Library alive: dropping it unregisters the schemas


def torchvision_ops_missing() -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
    except RuntimeError:
        return True
    return False


def ensure_torchvision_importable() -> bool:
    """Declare torchvision's op schemas if the installed torchvision cannot provide them.

    Returns True when the shim was applied by this call.
    """
    global _library
    import sys

    if _library is not None or "torchvision" in sys.modules and not torchvision_ops_missing():
        return False
    if not torchvision_ops_missing():
        return False
    import torch

    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    return True

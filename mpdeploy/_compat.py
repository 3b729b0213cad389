"""Environment fix-ups that must run before timm is imported.

CPU builds of torch have no matching torchvision wheel on PyPI; the CUDA torchvision wheel then
fails at import with ``operator torchvision::nms does not exist`` because its C++ ops are absent.
timm only needs torchvision's transforms, so declaring the two op schemas is enough. The fix is
applied only when the op is really missing: torchvision's own op library is loaded first, so a
matching torch/torchvision pair (a CUDA machine's, say) registers its real ops and is left alone —
declaring the schemas there would make torchvision's import abort on a duplicate registration.
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


def _load_torchvision_ops() -> bool:
    """Load the installed torchvision's C++ op library, as its import would; False if it cannot."""
    import importlib.util
    from pathlib import Path

    import torch

    try:
        spec = importlib.util.find_spec("torchvision")
    except (ImportError, ValueError):
        return False
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for library in sorted(Path(folder).glob("_C*.so")) + sorted(Path(folder).glob("_C*.pyd")):
            try:
                torch.ops.load_library(str(library))
            except (OSError, RuntimeError):  # built for another torch: undefined symbols
                return False
            return not torchvision_ops_missing()
    return False


def ensure_torchvision_importable() -> bool:
    """Declare torchvision's op schemas if the installed torchvision cannot provide them.

    Returns True when the shim was applied by this call.
    """
    global _library
    import sys

    if _library is not None or "torchvision" in sys.modules and not torchvision_ops_missing():
        return False
    if not torchvision_ops_missing() or _load_torchvision_ops():
        return False
    import torch

    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    return True

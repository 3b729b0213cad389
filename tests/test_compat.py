"""The torchvision shim for CPU torch: applied only when the ops are missing, and timm imports."""

import subprocess
import sys
import textwrap


def test_shim_makes_timm_importable_and_is_idempotent():
    code = textwrap.dedent(
        """
        from mpdeploy._compat import ensure_torchvision_importable, torchvision_ops_missing
        before = torchvision_ops_missing()
        first = ensure_torchvision_importable()
        import timm, torchvision  # would raise 'operator torchvision::nms does not exist'
        timm.create_model("test_vit")
        second = ensure_torchvision_importable()
        print(before, first, second, torchvision_ops_missing())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, first, second, missing_after = out.stdout.split()
    # With a matching torch/torchvision pair the shim must do nothing; on CPU torch it must act once.
    assert first == before
    assert second == "False"
    assert missing_after == "False"


def test_shim_leaves_a_working_torchvision_alone():
    code = textwrap.dedent(
        """
        import torch
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        from mpdeploy._compat import ensure_torchvision_importable
        print(ensure_torchvision_importable())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""The independent check: `polygraphy inspect sparsity` on the exported ONNX confirms every layer
mpdeploy reports as 2:4, whatever the exporter called or did to the weight tensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import mpdeploy.models  # noqa: F401  (torchvision shim before timm)

import timm  # isort: skip
from mpdeploy.errors import UserError
from mpdeploy.models.spec import ModelSpec, save_model
from mpdeploy.prune.nm import NOT_CHECKABLE, SparsityConfig, confirm_with_polygraphy, sparsify


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.conv(self.stem(x)).mean(dim=(2, 3)))


def _sparsified(model: nn.Module, build_dir: Path, images: torch.Tensor, pattern=(2, 4), name="x"):
    result = sparsify(
        model,
        images,
        SparsityConfig(*pattern, include_classifier=True),
        input_shape=images.shape[1:],
    )
    save_model(result.model, ModelSpec(name, 8, images.shape[-1]), build_dir / "pruned")
    result.save(build_dir)
    return result


def _renamed_graph(model: TinyNet, conv_w: np.ndarray, fc_w: np.ndarray, path: Path) -> Path:
    """Conv weight under a new name and scaled per output channel (a folded BatchNorm); the Linear
    as MatMul with a transposed constant, as the legacy exporter writes them."""
    stem_w = model.stem.weight.detach().numpy()
    inits = [
        numpy_helper.from_array(stem_w, "stem.weight"),
        numpy_helper.from_array(conv_w, "onnx::Conv_7"),
        numpy_helper.from_array(fc_w.T.copy(), "onnx::MatMul_9"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "stem.weight"], ["s"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["s", "onnx::Conv_7"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["c"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["m", "onnx::MatMul_9"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(path))
    return path


def test_renamed_transposed_and_rescaled_weights_are_matched_and_confirmed(tmp_path):
    torch.manual_seed(0)
    result = _sparsified(TinyNet().eval(), tmp_path, torch.randn(4, 3, 6, 6))
    conv_w = (
        result.model.conv.weight.detach().numpy()
        * np.linspace(0.5, 2, 8, dtype=np.float32)[:, None, None, None]
    )
    onnx_path = _renamed_graph(
        result.model, conv_w, result.model.fc.weight.detach().numpy(), tmp_path / "model.onnx"
    )
    headline = confirm_with_polygraphy(onnx_path, tmp_path)
    assert headline["polygraphy_sparsity"] == "pass" and headline["polygraphy_sparse_layers"] == 2
    report = json.loads((tmp_path / "sparsity.json").read_text())
    assert {t["onnx"]: t["param"] for t in report["polygraphy"]["tensors"]} == {
        "onnx::Conv_7": "conv.weight",
        "onnx::MatMul_9": "fc.weight",
    }  # Polygraphy skips the stem (Cin 3), so it is not listed
    assert [layer["polygraphy"] for layer in report["layers"]] == [
        "not checked by Polygraphy (axis not a multiple of 4)",
        "sparse",
        "sparse",
    ]


def test_a_weight_that_lost_its_pattern_fails_the_check_in_one_line(tmp_path):
    torch.manual_seed(0)
    result = _sparsified(TinyNet().eval(), tmp_path, torch.randn(4, 3, 6, 6))
    fc_w = result.model.fc.weight.detach().numpy() + 1e-3  # dense again
    onnx_path = _renamed_graph(
        result.model, result.model.conv.weight.detach().numpy(), fc_w, tmp_path / "model.onnx"
    )
    with pytest.raises(UserError) as info:
        confirm_with_polygraphy(onnx_path, tmp_path)
    assert "\n" not in str(info.value) and "1 of 2 sparse layers" in str(info.value)
    report = json.loads((tmp_path / "sparsity.json").read_text())
    assert report["polygraphy"]["verdict"] == "fail"
    assert report["polygraphy"]["unconfirmed_layers"] == ["fc"]
    assert {layer["name"]: layer["polygraphy"] for layer in report["layers"]}["fc"] == "non-sparse"


def test_patterns_without_a_tensorrt_kernel_are_recorded_as_not_checkable(tmp_path):
    torch.manual_seed(0)
    _sparsified(TinyNet().eval(), tmp_path, torch.randn(4, 3, 6, 6), pattern=(4, 8))
    headline = confirm_with_polygraphy(tmp_path / "never-read.onnx", tmp_path)
    assert headline == {"polygraphy_sparsity": NOT_CHECKABLE}
    report = json.loads((tmp_path / "sparsity.json").read_text())
    assert {layer["polygraphy"] for layer in report["layers"]} == {NOT_CHECKABLE}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_exported_timm_models_pass_polygraphy(name, tmp_path):
    from mpdeploy.export import export_onnx

    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    images = torch.randn(8, 3, 160, 160)
    result = sparsify(model, images, SparsityConfig(2, 4), input_shape=(3, 160, 160))
    save_model(result.model, ModelSpec(name, 1000, 160), tmp_path / "pruned")
    result.save(tmp_path)
    export_onnx(result.model, tmp_path / "model.onnx", (3, 160, 160))
    headline = confirm_with_polygraphy(tmp_path / "model.onnx", tmp_path)
    assert headline["polygraphy_sparse_layers"] == result.headline["sparse_layers"]
    report = json.loads((tmp_path / "sparsity.json").read_text())
    verdicts = {layer["name"]: layer["polygraphy"] for layer in report["layers"]}
    assert all(verdicts[r["name"]] == "sparse" for r in report["layers"] if r["eligible"])
    classifier = "head" if name == "test_vit" else "fc"
    assert verdicts[classifier] == "non-sparse"  # dense by default, and Polygraphy sees it dense

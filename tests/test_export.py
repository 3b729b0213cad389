"""ONNX export: both exporters, dynamic batch, checked, ONNX Runtime matches torch."""

import numpy as np
import onnx
import pytest
import torch

from mpdeploy.backends.onnxruntime import make_session
from mpdeploy.export import INPUT_NAME, OPSET, export_onnx
from mpdeploy.export import onnx as export_module
from mpdeploy.models import create_model


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("name", ["test_vit", "test_resnet", "test_convnext"])
def test_exporters_match_torch_with_dynamic_batch(tmp_path, name, exporter):
    loaded = create_model(name, weights="none")
    shape = tuple(loaded.data_config["input_size"])
    record = export_onnx(loaded.model, tmp_path / "model.onnx", shape, exporter=exporter)
    assert record.exporter == exporter and record.opset == OPSET
    proto = onnx.load(str(tmp_path / "model.onnx"))
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # symbolic batch dimension
    session = make_session(tmp_path / "model.onnx")
    for batch in (1, 5):
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            ref = loaded.model(x).numpy()
        got = session.run(None, {INPUT_NAME: x.numpy()})[0]
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert not list(tmp_path.glob(".export-*"))  # temporary files are gone


def test_large_models_use_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_THRESHOLD", 1000)
    loaded = create_model("test_resnet", weights="none")
    shape = tuple(loaded.data_config["input_size"])
    record = export_onnx(loaded.model, tmp_path / "model.onnx", shape)
    assert record.external_data
    assert (tmp_path / "model.onnx.data").stat().st_size > (tmp_path / "model.onnx").stat().st_size
    x = torch.randn(2, *shape)
    got = make_session(tmp_path / "model.onnx").run(None, {INPUT_NAME: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, loaded.model(x).numpy(), atol=1e-4, rtol=1e-4)


def test_dynamo_failure_falls_back_to_legacy(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(export_module, "_export_dynamo", broken)
    loaded = create_model("test_vit", weights="none")
    record = export_onnx(loaded.model, tmp_path / "m.onnx", tuple(loaded.data_config["input_size"]))
    assert record.exporter == "legacy"
    assert "simulated dynamo failure" in record.fallback_reason

"""Model names, weights from files (safetensors, torch), inference of classes and size, persistence."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from mpdeploy.errors import UserError
from mpdeploy.models import ALIASES, create_model, resolve_model_name
from mpdeploy.models.spec import load_model, save_model


def test_aliases_map_to_the_papers_checkpoints():
    assert resolve_model_name("vit_b16") == "vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert resolve_model_name("resnet152d") == "resnet152d.ra2_in1k"
    assert set(ALIASES) == {"vit_b16", "vit_l16", "convnextv2_base", "resnet50", "resnet152d"}
    assert resolve_model_name("test_vit") == "test_vit"
    assert resolve_model_name("resnet18.a1_in1k") == "resnet18.a1_in1k"


def test_unknown_model_is_one_clear_error():
    with pytest.raises(UserError, match="unknown model 'vit_b17'.*vit_b16"):
        resolve_model_name("vit_b17")


def test_hub_offline_says_to_pass_a_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="--weights PATH"):
        create_model("test_vit", weights="hub")


def _checkpoint(tmp_path, name, num_classes, img_size, fmt):
    kwargs = {"num_classes": num_classes}
    if img_size:
        kwargs["img_size"] = img_size
    src = timm.create_model(name, **kwargs).eval()
    path = tmp_path / f"ckpt.{fmt}"
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, str(path))
    return src, path


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_fine_tuned_checkpoint_infers_classes_and_size(tmp_path, fmt):
    src, path = _checkpoint(tmp_path, "test_vit", num_classes=7, img_size=96, fmt=fmt)
    loaded = create_model("test_vit", weights=str(path))
    assert loaded.spec.num_classes == 7
    assert loaded.spec.img_size == 96
    assert loaded.data_config["input_size"] == [3, 96, 96]
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), src(x), rtol=0, atol=0)


def test_cnn_checkpoint_infers_classes(tmp_path):
    _, path = _checkpoint(tmp_path, "test_resnet", num_classes=5, img_size=None, fmt="pth")
    loaded = create_model("test_resnet", weights=str(path))
    assert loaded.spec.num_classes == 5
    assert loaded.spec.model_kwargs == {}


def test_mismatched_weights_name_the_tensors(tmp_path):
    _, path = _checkpoint(tmp_path, "test_vit", num_classes=7, img_size=None, fmt="safetensors")
    with pytest.raises(UserError, match=r"head\.weight \(7, .*\) vs model \(3, "):
        create_model("test_vit", weights=str(path), num_classes=3)
    _, other = _checkpoint(tmp_path, "test_resnet", num_classes=7, img_size=None, fmt="pth")
    with pytest.raises(UserError, match="do not fit the model"):
        create_model("test_vit", weights=str(other))


def test_unreadable_weights(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights"):
        create_model("test_vit", weights=str(bad))
    with pytest.raises(UserError, match="not found"):
        create_model("test_vit", weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(UserError, match="unsupported weights file"):
        create_model("test_vit", weights=str(tmp_path / "x.onnx"))


def test_spec_round_trip_and_mismatch(tmp_path):
    loaded = create_model("test_vit", weights="none", num_classes=4)
    save_model(loaded.model, loaded.spec, tmp_path / "m")
    model, spec = load_model(tmp_path / "m")
    assert spec == loaded.spec
    x = torch.randn(3, *loaded.data_config["input_size"])
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    # A spec that does not match its weights is an error, not a silent partial load.
    spec_path = tmp_path / "m" / "model.json"
    spec_path.write_text(spec_path.read_text().replace('"num_classes": 4', '"num_classes": 6'))
    with pytest.raises(UserError, match="do not fit the model"):
        load_model(tmp_path / "m")


def test_random_weights_warn(caplog):
    with caplog.at_level("WARNING"):
        create_model("test_resnet", weights="none")
    assert "meaningless" in caplog.text

"""The bundled demo model: its fixed digits split, its timm registration and its shipped weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpdeploy.data import digits
from mpdeploy.errors import UserError
from mpdeploy.models import demo

# The split as documented in docs/demo-model.md.
TRAIN_PER_CLASS = [142, 146, 142, 146, 145, 145, 145, 143, 139, 144]
TEST_PER_CLASS = [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
DEMO_PARAMS = 683_242
MIN_TEST_TOP1 = 0.90


@pytest.fixture(scope="module")
def pretrained_model() -> torch.nn.Module:
    return demo.create_demo_model(pretrained=True)


def test_split_is_fixed_disjoint_and_stratified():
    first, second = digits.split_indices(), digits.split_indices()
    train, test = first["train"], first["test"]
    assert np.array_equal(train, second["train"]) and np.array_equal(test, second["test"])
    assert (len(train), len(test)) == (1437, 360)
    assert not set(train) & set(test)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))

    _, train_labels = digits.load_digits_split("train")
    _, test_labels = digits.load_digits_split("test")
    assert np.bincount(train_labels).tolist() == TRAIN_PER_CLASS
    assert np.bincount(test_labels).tolist() == TEST_PER_CLASS
    totals = np.add(TRAIN_PER_CLASS, TEST_PER_CLASS)
    assert np.all(np.abs(np.array(TEST_PER_CLASS) - 0.2 * totals) <= 1)


def test_images_are_upsampled_rgb_of_the_native_digits():
    from sklearn.datasets import load_digits

    images, labels = digits.load_digits_split("test")
    assert images.shape == (360, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.array_equal(images[..., 0], images[..., 1])
    assert np.array_equal(images[..., 0], images[..., 2])
    assert images.max() == 255 and images.min() == 0

    native, native_labels = digits.load_digits_split("test", size=8)
    bunch = load_digits()
    index = digits.split_indices()["test"]
    assert np.array_equal(native[..., 0], np.rint(bunch.images[index] * 255 / 16).astype(np.uint8))
    assert np.array_equal(native_labels, bunch.target[index])


def test_load_returns_copies_and_rejects_unknown_splits():
    images, labels = digits.load_digits_split("test")
    images[:] = 7
    labels[:] = -1
    again, again_labels = digits.load_digits_split("test")
    assert again.max() == 255 and again_labels.min() == 0
    with pytest.raises(UserError, match="unknown digits split"):
        digits.load_digits_split("val")


def test_pil_images_match_the_arrays():
    images, _ = digits.load_digits_split("train")
    pil = digits.digits_pil_images("train")
    assert len(pil) == len(images) and pil[0].mode == "RGB" and pil[0].size == (32, 32)
    assert np.array_equal(np.asarray(pil[-1]), images[-1])


def test_write_image_folder_uses_the_imagenet_layout(tmp_path):
    from PIL import Image

    root = digits.write_image_folder("test", tmp_path / "digits")
    images, labels = digits.load_digits_split("test")
    assert sorted(p.name for p in root.iterdir()) == [str(i) for i in range(10)]
    counts = [len(list((root / str(c)).glob("*.png"))) for c in range(10)]
    assert counts == TEST_PER_CLASS
    first = sorted((root / str(labels[0])).glob("*.png"))[0]
    assert first.name == "test_0000.png"
    assert np.array_equal(np.asarray(Image.open(first).convert("RGB")), images[0])


def test_registered_model_and_data_config():
    import timm
    from timm.models.vision_transformer import VisionTransformer

    model = timm.create_model(demo.DEMO_MODEL, pretrained=False)
    assert isinstance(model, VisionTransformer)
    assert sum(p.numel() for p in model.parameters()) == DEMO_PARAMS
    assert model.patch_embed.num_patches == 64 and model.num_prefix_tokens == 1
    assert [b.attn.num_heads for b in model.blocks] == [4] * 6
    assert model.blocks[0].mlp.fc1.out_features == 384 and model.head.out_features == 10
    assert model.global_pool == "token"
    config = timm.data.resolve_data_config({}, model=model)
    assert config == {
        "input_size": (3, 32, 32),
        "interpolation": "bilinear",
        "mean": (0.3057, 0.3057, 0.3057),
        "std": (0.3235, 0.3235, 0.3235),
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    assert model.pretrained_cfg["label_names"] == tuple(demo.DEMO_CLASS_NAMES)


def test_normalisation_constants_are_the_train_split_statistics():
    images, _ = digits.load_digits_split("train")
    unit = images.astype(np.float64) / 255.0
    assert unit.mean() == pytest.approx(demo.DEMO_MEAN[0], abs=1e-4)
    assert unit.std() == pytest.approx(demo.DEMO_STD[0], abs=1e-4)


def test_shipped_weights_load_strictly(pretrained_model):
    from safetensors.torch import load_file

    state = load_file(demo.demo_weights_path())
    fresh = demo.create_demo_model(pretrained=False)
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, tensor in pretrained_model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert not pretrained_model.training


def test_shipped_weights_classify_the_held_out_split(pretrained_model):
    """Through timm's own eval transform, exactly as `mpdeploy eval --data demo` preprocesses."""
    import timm

    config = timm.data.resolve_data_config({}, model=pretrained_model)
    transform = timm.data.create_transform(**config, is_training=False)
    batch = torch.stack([transform(image) for image in digits.digits_pil_images("test")])
    _, labels = digits.load_digits_split("test")
    with torch.no_grad():
        predicted = pretrained_model(batch).argmax(dim=1).numpy()
    top1 = float(np.mean(predicted == labels))
    assert top1 >= MIN_TEST_TOP1, f"demo test top-1 {top1:.4f}"

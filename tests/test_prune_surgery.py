"""Exact structured surgery: a pruned model equals its masked twin, exports, and persists."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from test_prune_fixtures import (
    CASE_IDS,
    FAMILY_CASES,
    input_size,
    make_model,
    masked_twin,
    random_keep,
    relative_error,
)

from mpdeploy.backends.onnxruntime import make_session
from mpdeploy.data.calibration import load_calibration
from mpdeploy.errors import UserError
from mpdeploy.export import INPUT_NAME, export_onnx
from mpdeploy.families import get_family
from mpdeploy.families.convnext import ExactGlobalResponseNorm
from mpdeploy.families.surgery import group_widths, prune_groups, resize_to_widths
from mpdeploy.models import data_config_for
from mpdeploy.models.spec import ModelSpec, load_model, save_model

TOLERANCE = 1e-5  # relative to the largest logit


def calibration_inputs(model: torch.nn.Module, count: int = 4) -> torch.Tensor:
    size = input_size(model)[-1]
    return load_calibration("builtin", count, data_config_for(model, size), seed=3).images


@pytest.mark.parametrize(("name", "kwargs"), FAMILY_CASES, ids=CASE_IDS)
def test_pruned_model_equals_masked_twin(name, kwargs):
    model = make_model(name, kwargs)
    keep = random_keep(model)
    twin = masked_twin(model, keep)
    pruned = prune_groups(copy.deepcopy(model), keep)
    inputs = [torch.randn(3, *input_size(model)), calibration_inputs(model)]
    with torch.no_grad():
        for x in inputs:
            reference, dense, got = twin(x), model(x), pruned(x)
            assert relative_error(reference, got) <= TOLERANCE
            assert relative_error(reference, dense) > 1e-3  # the cut really changed the model
    dense_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in pruned.parameters()) < 0.8 * dense_params
    for group in get_family(pruned).channel_groups(pruned):
        assert group.width == len(keep[group.name])


def test_vit_head_cut_updates_timm_attention():
    model = make_model("test_vit", {})
    attn = model.blocks[0].attn
    head_dim = attn.head_dim
    pruned = prune_groups(copy.deepcopy(model), {"blocks.0.attn": range(head_dim, 2 * head_dim)})
    cut = pruned.blocks[0].attn
    assert (cut.num_heads, cut.head_dim, cut.attn_dim) == (1, head_dim, head_dim)
    assert tuple(cut.qkv.weight.shape) == (3 * head_dim, model.embed_dim)
    assert cut.proj.in_features == head_dim
    # the kept head is head 1: its q, k and v rows come from each third of the dense qkv
    width = attn.num_heads * head_dim
    for k in range(3):
        rows = slice(k * width + head_dim, k * width + 2 * head_dim)
        assert torch.equal(cut.qkv.weight[k * head_dim : (k + 1) * head_dim], attn.qkv.weight[rows])


def test_grn_cut_keeps_the_dense_channel_mean():
    model = make_model("test_convnext", {"use_grn": True, "ls_init_value": None})
    mlp = model.stages[0].blocks[0].mlp
    dense_width = mlp.fc1.out_features
    pruned = prune_groups(copy.deepcopy(model), {"stages.0.blocks.0.mlp": range(0, dense_width, 3)})
    grn = pruned.stages[0].blocks[0].mlp.grn
    assert isinstance(grn, ExactGlobalResponseNorm)
    assert grn.dense_dim == dense_width and grn.weight.shape[0] == len(range(0, dense_width, 3))
    # a second cut keeps the original channel count
    prune_groups(pruned, {"stages.0.blocks.0.mlp": range(4)})
    assert pruned.stages[0].blocks[0].mlp.grn.dense_dim == dense_width


def test_resnet_groups_cover_inner_channels_only():
    model = make_model("test_resnet", {})
    groups = {g.name: g for g in get_family(model).channel_groups(model)}
    bottleneck = [n for n in groups if n.startswith("layer3.0.")]
    assert bottleneck == [
        "layer3.0.conv1",
        "layer3.0.conv2",
    ]  # test_resnet's layer3 is a bottleneck
    assert "layer1.0.conv1" in groups and "layer1.0.conv2" not in groups  # basic block
    names = {p.name for p in groups["layer3.0.conv2"].producers}
    assert names == {
        f"layer3.0.{t}"
        for t in ("conv2.weight", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var")
    }
    assert groups["layer3.0.conv2"].consumers[0].name == "layer3.0.conv3.weight"


@pytest.mark.parametrize(("name", "kwargs"), FAMILY_CASES[1:], ids=CASE_IDS[1:])
def test_widths_persist_through_save_and_load(tmp_path, name, kwargs):
    model = make_model(name, kwargs)
    pruned = prune_groups(copy.deepcopy(model), random_keep(model, 0.4))
    spec = ModelSpec(
        timm_name=name,
        num_classes=model.num_classes,
        img_size=input_size(model)[-1],
        model_kwargs=kwargs,
        widths=group_widths(pruned),
    )
    save_model(pruned, spec, tmp_path)
    loaded, loaded_spec = load_model(tmp_path)
    assert loaded_spec.widths == spec.widths
    x = torch.randn(2, *input_size(model))
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


def test_spec_that_does_not_fit_the_weights_is_a_user_error(tmp_path):
    model = make_model("test_vit", {})
    pruned = prune_groups(copy.deepcopy(model), random_keep(model, 0.5))
    widths = group_widths(pruned)
    widths["blocks.0.mlp"] += 8  # spec says wider than the weights
    spec = ModelSpec(
        timm_name="test_vit", num_classes=model.num_classes, img_size=160, widths=widths
    )
    save_model(pruned, spec, tmp_path)
    with pytest.raises(UserError, match="do not fit the model"):
        load_model(tmp_path)


def test_bad_widths_and_indices_are_user_errors():
    model = make_model("test_vit", {})
    with pytest.raises(UserError, match="unknown group"):
        resize_to_widths(copy.deepcopy(model), {"blocks.99.mlp": 8})
    with pytest.raises(UserError, match="multiple of 32"):
        resize_to_widths(copy.deepcopy(model), {"blocks.0.attn": 40})  # not whole heads
    with pytest.raises(UserError, match="whole units"):
        prune_groups(copy.deepcopy(model), {"blocks.0.attn": range(5)})
    with pytest.raises(UserError, match="every channel"):
        prune_groups(copy.deepcopy(model), {"blocks.0.mlp": []})


def test_unsupported_family_names_the_supported_ones():
    model = timm.create_model("test_byobnet", pretrained=False)
    with pytest.raises(UserError, match=r"no family for ByobNet.*vit.*convnext.*resnet"):
        get_family(model)


EXPORT_IDS = [
    "mpdeploy_demo_vit-default",
    "test_convnext-use_grn=True-ls_init_value=None",
    "test_resnet-default",
]


@pytest.mark.parametrize(
    ("name", "kwargs"), [FAMILY_CASES[CASE_IDS.index(i)] for i in EXPORT_IDS], ids=EXPORT_IDS
)
def test_pruned_models_export_to_onnx_and_match(tmp_path, name, kwargs):
    model = make_model(name, kwargs)
    pruned = prune_groups(copy.deepcopy(model), random_keep(model, 0.5))
    shape = input_size(model)
    export_onnx(pruned, tmp_path / "model.onnx", shape)
    session = make_session(tmp_path / "model.onnx")
    x = torch.randn(3, *shape)
    with torch.no_grad():
        ref = pruned(x).numpy()
    got = session.run(None, {INPUT_NAME: x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["vit_base_patch16_224", "convnextv2_base", "resnet50", "resnet152d"]
)
def test_full_size_models_cut_exactly(name):
    model = make_model(name, {})
    keep = random_keep(model, 0.5)
    twin = masked_twin(model, keep)
    pruned = prune_groups(copy.deepcopy(model), keep)
    x = torch.randn(1, *input_size(model))
    with torch.no_grad():
        assert relative_error(twin(x), pruned(x)) <= TOLERANCE
    spec_model = resize_to_widths(timm.create_model(name, pretrained=False), group_widths(pruned))
    spec_model.load_state_dict(pruned.state_dict())

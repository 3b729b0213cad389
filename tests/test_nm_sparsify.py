"""sparsify(): masks in TensorRT's layout on every eligible layer, sparse-execution accounting
checked against an independent MAC count, persistence of masks, and masks held through training."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import mpdeploy.models  # noqa: F401  (torchvision shim before timm)

import timm  # isort: skip
from mpdeploy.errors import UserError
from mpdeploy.models.demo import DEMO_MODEL
from mpdeploy.models.spec import ModelSpec, load_model, save_model
from mpdeploy.prune.layout import grouped
from mpdeploy.prune.macs import count_macs
from mpdeploy.prune.nm import (
    SparsityConfig,
    apply_masks,
    load_masks,
    sparsify,
)

DEMO_SHAPE = (3, 32, 32)
TOKENS, DIM, HIDDEN, DEPTH = 65, 96, 384, 6  # the demo ViT: 8×8 patches + class token


@pytest.fixture(scope="module")
def demo_model() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(DEMO_MODEL).eval()


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randn(16, *DEMO_SHAPE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def demo_2to4(demo_model, calib):
    return sparsify(demo_model, calib, SparsityConfig(2, 4), input_shape=DEMO_SHAPE)


def test_every_eligible_weight_keeps_exactly_k_of_n_per_group(demo_2to4):
    layers = {r["name"]: r for r in demo_2to4.report["layers"]}
    eligible = [r for r in layers.values() if r["eligible"]]
    assert len(eligible) == 4 * DEPTH
    assert {r["name"]: r["reason"] for r in layers.values() if not r["eligible"]} == {
        "patch_embed.proj": "stem: reads the 3-channel image",
        "head": "classifier head (include_classifier=False)",
    }
    assert set(demo_2to4.masks) == {r["param"] for r in eligible}
    for record in eligible:
        weight = demo_2to4.model.get_parameter(record["param"]).detach()
        mask = demo_2to4.masks[record["param"]]
        assert (grouped(mask, 4).sum(-1) == 2).all()
        assert torch.equal(weight != 0, mask)
        assert record["achieved_sparsity"] == 0.5 and record["conforms"]


def test_cast_fisher_masks_are_in_pattern_and_differ_from_plain_cast(demo_model, calib, demo_2to4):
    """The logit-weighted projection runs its own capture and still keeps exactly 2 of 4."""
    fisher, plain = (
        sparsify(demo_model, calib, SparsityConfig(2, 4, method=m), input_shape=DEMO_SHAPE)
        for m in ("cast_fisher", "cast")
    )
    assert demo_2to4.report["method"] == "obs_shrink"  # the default (docs/sparsity.md)
    assert set(fisher.masks) == set(demo_2to4.masks) == set(plain.masks)
    for name, mask in fisher.masks.items():
        assert (grouped(mask, 4).sum(-1) == 2).all()
        assert torch.equal(fisher.model.get_parameter(name).detach() != 0, mask)
    # weighting rows by their output gradient must change some choice, or it is not in effect
    assert any(not torch.equal(fisher.masks[n], plain.masks[n]) for n in fisher.masks)


def test_sparse_execution_macs_match_an_independent_count(demo_model, demo_2to4):
    totals = demo_2to4.report["totals"]
    per_block = TOKENS * DIM * (3 * DIM + DIM + HIDDEN) + TOKENS * HIDDEN * DIM
    assert totals["eligible_macs"] == DEPTH * per_block
    dense = count_macs(demo_model, (1, *DEMO_SHAPE)).total_macs
    assert totals["dense_macs"] == dense
    assert totals["sparse_execution_macs"] == dense - 0.5 * DEPTH * per_block
    assert totals["sparse_mac_reduction"] == pytest.approx(0.5 * DEPTH * per_block / dense)
    assert totals["theoretical_speedup"] == pytest.approx(dense / totals["sparse_execution_macs"])
    headline = demo_2to4.headline
    for key in (
        "sparsity_pattern",
        "sparse_layers",
        "ineligible_layers",
        "sparse_execution_macs",
        "sparse_mac_reduction",
        "theoretical_speedup",
        "sparsity_logit_perturbation_max",
        "sparsity_certified_fraction",
    ):
        assert key in headline
    assert headline["sparsity_pattern"] == "2:4" and headline["sparse_layers"] == 24
    assert headline["sparsity_logit_perturbation_max"] > 0


def test_sparsify_leaves_the_input_model_dense(demo_model, demo_2to4):
    assert all((p != 0).all() for n, p in demo_model.named_parameters() if n.endswith("fc1.weight"))


def test_probe_patterns_and_the_classifier_option(demo_model, calib):
    result = sparsify(
        demo_model,
        calib[:8],
        # cast: obs's sampled 8:16 search costs ~25 s more here; the probe pattern is the point
        SparsityConfig(8, 16, "cast", include_classifier=True, permute=False),
        input_shape=DEMO_SHAPE,
    )
    assert result.headline["sparse_layers"] == 4 * DEPTH + 1  # + head (in_features 96 = 6·16)
    head_mask = result.masks["head.weight"]
    assert (grouped(head_mask, 16).sum(-1) == 8).all()


def test_dense_layers_stay_dense_and_say_why(demo_model, calib, demo_2to4):
    """`dense_layers` patterns: the matched layers keep every weight (bitwise the dense model's),
    the report names the pattern, the others are sparsified as without it; a pattern matching
    no layer is a one-line UserError."""
    config = SparsityConfig(2, 4, "magnitude", permute=False, dense_layers=("blocks.0.*",))
    result = sparsify(demo_model, calib, config, input_shape=DEMO_SHAPE)
    assert not any(name.startswith("blocks.0.") for name in result.masks)
    assert result.headline["sparse_layers"] == demo_2to4.headline["sparse_layers"] - 4
    dense = dict(demo_model.named_parameters())
    for name in ("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc2.weight"):
        assert torch.equal(dict(result.model.named_parameters())[name], dense[name])
    assert (dict(result.model.named_parameters())["blocks.1.mlp.fc1.weight"] == 0).any()
    layers = {row["name"]: row for row in result.report["layers"]}
    assert (
        layers["blocks.0.attn.qkv"]["reason"]
        == "kept dense: matches dense_layers pattern 'blocks.0.*'"
    )
    assert set(result.masks) == {n for n in demo_2to4.masks if not n.startswith("blocks.0.")}
    with pytest.raises(UserError, match="'block.*' matches no Linear/Conv2d layer"):
        sparsify(
            demo_model,
            calib,
            SparsityConfig(2, 4, dense_layers=("block.*",)),
            input_shape=DEMO_SHAPE,
        )
    with pytest.raises(UserError, match="tuple of patterns"):
        SparsityConfig(2, 4, dense_layers="blocks.0.*")


def test_a_stage_command_turning_sparsity_off_drops_the_dense_patterns():
    from mpdeploy.pipeline import BuildOptions, check_option_values, stage_options

    built = BuildOptions(sparsity="2:4", sparsity_dense=("blocks.0.*",)).to_dict()
    assert stage_options(built, {}).sparsity_dense == ("blocks.0.*",)  # the JSON list → tuple
    assert stage_options(built, {"sparsity": "4:8"}).sparsity_dense == ("blocks.0.*",)
    off = stage_options(built, {"sparsity": "off"})
    assert off.sparsity_dense == ()
    check_option_values(off)  # would refuse the patterns without --sparsity
    with pytest.raises(UserError, match="--sparsity-dense names layers"):
        check_option_values(BuildOptions(sparsity="off", sparsity_dense=("blocks.0.*",)))


def test_a_pattern_with_no_eligible_layer_is_one_user_error_line():
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)
    )
    with pytest.raises(UserError) as info:
        sparsify(model, torch.randn(2, 3, 8, 8), SparsityConfig(2, 4), input_shape=(3, 8, 8))
    message = str(info.value)
    assert "\n" not in message and "no layer of Sequential can hold it" in message
    with pytest.raises(UserError):
        SparsityConfig(2, 4, method="random")


def test_masks_survive_save_and_load(demo_2to4, tmp_path):
    spec = ModelSpec(
        timm_name=DEMO_MODEL, num_classes=10, img_size=32, model_kwargs={"img_size": 32}
    )
    save_model(demo_2to4.model, spec, tmp_path / "pruned")
    paths = demo_2to4.save(tmp_path)
    assert {p.name for p in paths} == {"sparsity.json", "masks.safetensors"}
    assert json.loads((tmp_path / "sparsity.json").read_text())["totals"] == json.loads(
        json.dumps(demo_2to4.report["totals"])
    )
    masks = load_masks(tmp_path)
    assert masks.keys() == demo_2to4.masks.keys()
    assert all(
        torch.equal(masks[k], demo_2to4.masks[k]) and masks[k].dtype == torch.bool for k in masks
    )
    reloaded, _ = load_model(tmp_path / "pruned")
    for name, mask in masks.items():
        assert torch.equal(reloaded.get_parameter(name) != 0, mask)
    assert load_masks(tmp_path / "elsewhere") is None


def test_apply_masks_refuses_masks_of_another_model(demo_2to4):
    other = timm.create_model("test_vit")
    with pytest.raises(UserError, match="does not match any parameter|has shape"):
        apply_masks(other, demo_2to4.masks)


@pytest.mark.slow
def test_recovery_keeps_every_mask_exactly(demo_model, demo_2to4):
    """recover() (AdamW, weight decay 0.05) re-applies the masks after every optimiser step."""
    from mpdeploy.models import data_config_for
    from mpdeploy.prune.recover import RecoverConfig, recover

    config = RecoverConfig(
        epochs=1, max_steps=3, batch_size=16, eval_images=16, lr=1e-3, progress=False
    )
    data_config = data_config_for(demo_model, 32)
    student = copy.deepcopy(demo_2to4.model)
    recover(student, demo_model, "demo", data_config, config, masks=demo_2to4.masks)
    for name, mask in demo_2to4.masks.items():
        weight = student.get_parameter(name).detach()
        assert (grouped(weight != 0, 4).sum(-1) == 2).all(), name
        assert torch.equal(weight != 0, mask)
        assert not torch.equal(weight, demo_2to4.model.get_parameter(name).detach())  # it trained
    # the control: without masks, momentum and weight decay refill the masked slots
    drifting = copy.deepcopy(demo_2to4.model)
    recover(drifting, demo_model, "demo", data_config, config)
    leaked = [
        n for n, m in demo_2to4.masks.items() if (drifting.get_parameter(n).detach()[~m] != 0).any()
    ]
    assert leaked == list(demo_2to4.masks)


def test_sequential_inputs_refit_later_layers_on_the_sparse_network(demo_model, calib, demo_2to4):
    """`compensate_inputs="sequential"`: the masks are the default's (the choice does not move),
    the first sparse layer reads the same inputs either way and gets the same re-fit, later
    layers are fitted on the already-sparse network's inputs (other weights, every mask kept),
    and the record says which inputs were read. A bad name is one UserError line."""
    config = SparsityConfig(2, 4, compensate_inputs="sequential")
    result = sparsify(demo_model, calib, config, input_shape=DEMO_SHAPE)
    assert result.report["compensation"]["inputs"] == "sequential"
    assert demo_2to4.report["compensation"]["inputs"] == "dense"
    assert set(result.masks) == set(demo_2to4.masks)
    for name, mask in result.masks.items():
        assert torch.equal(mask, demo_2to4.masks[name]), name
    ours = dict(result.model.named_parameters())
    default = dict(demo_2to4.model.named_parameters())
    for name, mask in result.masks.items():
        assert not ours[name][~mask].any(), name
    first = "blocks.0.attn.qkv.weight"  # nothing sparse before it: the same rows either way
    torch.testing.assert_close(ours[first], default[first], rtol=1e-4, atol=1e-5)
    last = "blocks.5.mlp.fc2.weight"
    assert (ours[last] - default[last]).abs().max() > 1e-3
    with pytest.raises(UserError, match="unknown --compensate-inputs 'sideways'"):
        SparsityConfig(2, 4, compensate_inputs="sideways")


def test_the_cli_choices_of_compensate_inputs_are_compensates_own():
    """The torch-free copy the CLI offers is exactly `compensate.INPUTS`, default first."""
    from mpdeploy.pipeline import COMPENSATE_INPUTS, BuildOptions
    from mpdeploy.prune.compensate import INPUTS

    assert COMPENSATE_INPUTS == INPUTS
    assert BuildOptions.compensate_inputs == SparsityConfig.compensate_inputs == INPUTS[0]

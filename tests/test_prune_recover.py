"""Recovery distillation: the loss, the optimiser groups, masks kept exactly, both data sources."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_prune_fixtures import make_model

from mpdeploy.data.digits import write_image_folder
from mpdeploy.errors import UserError
from mpdeploy.models import data_config_for
from mpdeploy.prune.recover import UNLABELLED, RecoverConfig, kd_loss, param_groups, recover

QUICK = dict(epochs=1, max_steps=2, batch_size=8, eval_images=16, progress=False)


@pytest.fixture
def demo_pair():
    teacher = make_model("mpdeploy_demo_vit", {})
    return copy.deepcopy(teacher), teacher, data_config_for(teacher, 32)


def test_kd_loss_is_half_ce_plus_half_tau_squared_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    labels = torch.tensor([1, 2, 3, 4])
    config = RecoverConfig()
    ce = F.cross_entropy(student, labels, label_smoothing=0.1)
    p_t = F.softmax(teacher / 2, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(student / 2, 1))).sum(1).mean()
    assert float(kd_loss(student, teacher, labels, config)) == pytest.approx(
        float(0.5 * ce + 0.5 * 4 * kl), rel=1e-5
    )


def test_no_weight_decay_on_biases_norms_and_embeddings():
    model = make_model("mpdeploy_demo_vit", {})
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.mlp.fc1.bias"} <= skipped
    assert all(p.ndim >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    assert "blocks.0.mlp.fc1.weight" not in skipped


def test_recover_keeps_masks_and_records_the_run(demo_pair):
    student, teacher, data_config = demo_pair
    name = "blocks.0.mlp.fc1.weight"
    mask = torch.rand_like(student.get_parameter(name)) > 0.5
    before = student.get_parameter("blocks.1.mlp.fc1.weight").detach().clone()
    result = recover(
        student, teacher, "demo", data_config, RecoverConfig(**QUICK), masks={name: mask}
    )
    weight = result.model.get_parameter(name).detach()
    assert float(weight[~mask].abs().max()) == 0.0 and float(weight[mask].abs().min()) > 0.0
    assert not torch.equal(before, result.model.get_parameter("blocks.1.mlp.fc1.weight"))
    record = result.record
    assert record["steps"] == 2 and record["masked_tensors"] == 1 and record["classes"] == 10
    assert record["train_images"] == 1437 and record["world_size"] == 1
    assert 0.0 <= result.headline["recover_top1_train_subset_after"] <= 1.0
    assert not result.model.training


def test_recover_from_an_image_folder_freezes_sparsity_zeros(demo_pair, tmp_path):
    student, teacher, data_config = demo_pair
    with torch.no_grad():
        student.blocks[2].mlp.fc2.weight[:, ::2] = 0.0
    folder = write_image_folder("test", tmp_path / "digits")
    result = recover(student, teacher, folder, data_config, RecoverConfig(**QUICK), sparsity=(2, 4))
    assert float(result.model.blocks[2].mlp.fc2.weight.detach()[:, ::2].abs().max()) == 0.0
    assert result.record["train_images"] == 360 and result.record["sparsity"] == "2:4"


def test_recover_input_errors(demo_pair, tmp_path):
    student, teacher, data_config = demo_pair
    with pytest.raises(UserError, match="not a folder"):
        recover(student, teacher, tmp_path / "missing", data_config, RecoverConfig(**QUICK))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no images in"):
        recover(student, teacher, tmp_path / "empty", data_config, RecoverConfig(**QUICK))
    with pytest.raises(UserError, match="not a parameter"):
        recover(
            student,
            teacher,
            "demo",
            data_config,
            RecoverConfig(**QUICK),
            masks={"nope.weight": torch.ones(1, dtype=torch.bool)},
        )


def test_recover_without_labels_distils_kl_only(demo_pair, tmp_path):
    student, teacher, data_config = demo_pair
    labels = torch.tensor([UNLABELLED, UNLABELLED])
    s_logits, t_logits = torch.randn(2, 10), torch.randn(2, 10)
    kl = F.kl_div(
        F.log_softmax(s_logits / 2, 1),
        F.log_softmax(t_logits / 2, 1),
        reduction="batchmean",
        log_target=True,
    )
    assert float(kd_loss(s_logits, t_logits, labels, RecoverConfig())) == pytest.approx(
        4 * float(kl)
    )
    folder = write_image_folder("test", tmp_path / "digits")
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, path in enumerate(sorted(folder.rglob("*.png"))[:40]):
        path.rename(flat / f"img{i}.png")  # images with no class folders: unlabelled
    result = recover(student, teacher, flat, data_config, RecoverConfig(**QUICK))
    assert result.record["data"] == "unlabelled image folder (no labels)"
    assert result.record["train_images"] == 40 and "no labels" in result.record["loss"]
    assert result.record["top1_subset"]["against"].startswith("the dense model")
    calib = torch.randn(12, 3, 32, 32)
    result = recover(student, teacher, calib, data_config, RecoverConfig(**QUICK))
    assert result.record["data"] == "calibration images (12, no labels)"
    assert result.record["top1_subset"]["images"] == 12


def test_cli_train_folder_without_images_is_one_line(tmp_path, capsys, monkeypatch):
    from mpdeploy.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    argv = ["build", "--weights", "none", "--model", "test_vit", "--recover-epochs", "1"]
    code = main([*argv, "--train", "empty"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "no images in empty" in lines[0], lines
    assert not (tmp_path / "engines").exists()

"""Channel permutations folded into the weights: exact on every supported family, and dealt by
importance so each k:n group holds one channel from each importance quantile."""

from __future__ import annotations

import copy

import pytest
import torch

import mpdeploy.models  # noqa: F401  (torchvision shim before timm)

import timm  # isort: skip
from mpdeploy.families import get_family
from mpdeploy.prune import cast, permute
from mpdeploy.prune.layout import layer_layouts

MODELS = [
    ("test_vit", {}),
    ("test_vit", {"qk_norm": True}),  # q/k norms: only v and proj may move
    ("test_resnet", {}),
    ("test_convnext", {}),
    ("test_convnext", {"use_grn": True, "ls_init_value": None}),  # ConvNeXtV2 GRN between fc1/fc2
]


def test_round_robin_deals_one_channel_of_each_quantile_into_every_group():
    importance = torch.tensor([5.0, 0.1, 7.0, 3.0, 0.5, 6.0, 2.0, 1.0])
    perm = permute.round_robin(importance, n=4)
    assert sorted(perm.tolist()) == list(range(8))
    ranks = importance.argsort(descending=True).argsort()  # rank of each channel, 0 = largest
    grouped_ranks = ranks[perm].reshape(2, 4)
    assert torch.equal(grouped_ranks // 2, torch.arange(4).expand(2, 4))  # slot s ↔ quantile s


def test_round_robin_within_blocks_stays_inside_each_block():
    perm = permute.round_robin(torch.rand(24), n=4, block=8)
    assert torch.equal(perm.reshape(3, 8).sort(dim=1).values, torch.arange(24).reshape(3, 8))


@pytest.mark.parametrize(("name", "kwargs"), MODELS, ids=lambda v: str(v))
def test_permuted_model_equals_the_dense_model(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    images = torch.randn(4, 3, 64, 64)
    eligible = {lay.name: lay.eligible for lay in layer_layouts(model, 4)}
    groups = get_family(model).channel_groups(model)
    consumers = [g.consumer_module for g in groups]
    energy = cast.capture_channel_energy(model, consumers, images)
    permuted = copy.deepcopy(model)
    records = permute.permute_groups(permuted, groups, energy, 4, eligible)

    assert records and all(r.permuted for r in records), [
        r.reason for r in records if not r.permuted
    ]
    assert sum(r.moved_channels for r in records) > 0
    changed = [
        k for k, v in model.state_dict().items() if not torch.equal(v, permuted.state_dict()[k])
    ]
    assert changed  # the permutation really lives in the weights
    with torch.no_grad():
        torch.testing.assert_close(permuted(images), model(images), atol=1e-5, rtol=1e-5)


def test_attention_permutes_only_v_rows_and_proj_columns():
    torch.manual_seed(0)
    model = timm.create_model("test_vit").eval()
    group = get_family(model).channel_groups(model)[0]
    assert group.kind == "attn_heads"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    energy = {group.consumer_module: torch.rand(group.width)}
    permute.permute_groups(model, [group], energy, 4, {group.consumer_module: True})
    qkv = model.state_dict()[f"{group.name}.qkv.weight"]
    width = group.width
    assert torch.equal(qkv[: 2 * width], before[f"{group.name}.qkv.weight"][: 2 * width])  # q, k
    assert not torch.equal(qkv[2 * width :], before[f"{group.name}.qkv.weight"][2 * width :])


def test_groups_without_an_exact_fold_are_left_alone_and_recorded():
    model = timm.create_model("test_vit").eval()
    groups = get_family(model).channel_groups(model)[:2]
    eligible = {g.consumer_module: False for g in groups}
    before = copy.deepcopy(model.state_dict())
    records = permute.permute_groups(model, groups, {}, 4, eligible)
    assert [r.permuted for r in records] == [False, False]
    assert all("not k:n eligible" in r.reason for r in records)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_heads_whose_dim_is_not_a_multiple_of_n_are_not_permuted():
    model = timm.create_model("test_vit", embed_dim=96, num_heads=4).eval()  # head_dim 24
    group = get_family(model).channel_groups(model)[0]
    (record,) = permute.permute_groups(model, [group], {}, 16, {group.consumer_module: True})
    assert not record.permuted and record.reason.startswith("head_dim 24 is not a multiple of n=16")


def test_the_energies_read_every_image_so_the_seed_does_not_move_the_permutation():
    """By default (`permute_images=None`) the channel energies come from every image the stage
    reads: two prune seeds give the same permutation and so the same magnitude masks. Capped at a
    seeded subset of 4, the budget records 4 and the seeds rank the channels on other images."""
    from mpdeploy.prune.nm import SparsityConfig, sparsify

    torch.manual_seed(0)
    model = timm.create_model("test_vit").eval()
    images = torch.randn(24, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    def run(seed, cap=None):
        config = SparsityConfig(
            2, 4, method="magnitude", compensate="none", seed=seed, permute_images=cap
        )
        return sparsify(model, images, config, input_shape=(3, 64, 64))

    first, second = run(0), run(1)
    assert first.report["calibration_budget"]["permutation"] == 24
    assert first.report["permutations"] == second.report["permutations"]
    assert first.masks.keys() == second.masks.keys()
    assert all(torch.equal(first.masks[k], second.masks[k]) for k in first.masks)

    capped = [run(seed, cap=4) for seed in range(4)]
    assert {r.report["calibration_budget"]["permutation"] for r in capped} == {4}
    from mpdeploy.errors import UserError

    with pytest.raises(UserError, match="permute_images must be at least 1"):
        SparsityConfig(2, 4, permute_images=0)
    masks = {tuple(r.masks[k].numpy().tobytes() for k in sorted(r.masks)) for r in capped}
    assert len(masks) > 1  # at least two of four seeded 4-image subsets rank channels apart


def test_a_model_without_a_family_reads_no_images_for_the_permutation():
    """No family, no channel groups: the permutation is skipped, recorded with its reason, and
    the budget says no image's energies ranked anything."""
    from mpdeploy.prune.nm import SparsityConfig, sparsify

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(48, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)
    )
    images = torch.randn(6, 3, 4, 4)
    config = SparsityConfig(2, 4, method="magnitude", compensate="none", include_classifier=True)
    result = sparsify(model, images, config, input_shape=(3, 4, 4))
    assert result.report["calibration_budget"]["permutation"] == 0
    (record,) = result.report["permutations"]
    assert not record["permuted"] and record["reason"].startswith("no family")

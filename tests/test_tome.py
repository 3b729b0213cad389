"""Token merging: exactness at r=0, a merge by hand, prefix tokens, scatter-free ONNX (fp32 and
fp16) that ONNX Runtime runs like torch, the spec round trip, MACs vs the analytic model, CLI."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch

from mpdeploy.cli import main
from mpdeploy.errors import UserError
from mpdeploy.families.tome import (
    ToMeSettings,
    apply_tome,
    bipartite_merge,
    requested_merges,
    tome_record,
)
from mpdeploy.models.demo import create_demo_model
from mpdeploy.prune.macs import count_macs, vit_tome_macs

SCATTER_OPS = {"ScatterElements", "ScatterND", "Scatter"}


def _tome(model, r, **kw):
    model = copy.deepcopy(model)
    apply_tome(model, ToMeSettings(r, **kw))
    return model


@pytest.fixture(scope="module")
def demo():
    return create_demo_model().eval()


@pytest.fixture(scope="module")
def demo_images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_r0_is_exactly_the_model(demo, demo_images):
    with torch.no_grad():
        assert torch.equal(_tome(demo, 0)(demo_images), demo(demo_images))


def test_merge_by_hand():
    # prefix token 0, then patches p0..p3: A = (p0, p2), B = (p1, p3). p2's metric equals p1's,
    # so with r = 1 exactly p2 merges into p1, weighted by the sizes (3 and 1).
    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [2.0, 4.0], [6.0, 8.0], [0.0, 5.0]]])
    size = torch.tensor([[[1.0], [1.0], [1.0], [3.0], [2.0]]])
    metric = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.2]]])
    merged, sizes, pairs = bipartite_merge(x, size, metric, r=1, prefix=1)
    assert pairs.tolist() == [[[1, 0]]]  # A's second token (p2) into B's first (p1)
    # prefix, kept A (p0), then B: p1 ← (1·(2,4) + 3·(6,8)) / 4 = (5, 7), p3 unchanged
    expected = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [5.0, 7.0], [0.0, 5.0]]])
    assert torch.allclose(merged, expected)
    assert sizes.flatten().tolist() == [1.0, 1.0, 4.0, 2.0]


def test_prefix_tokens_are_never_merged():
    # two register tokens + the class token; the prefix's keys are made identical to every patch's
    model = timm.create_model("test_vit", reg_tokens=2, pretrained=False).eval()
    assert model.num_prefix_tokens == 3
    record = apply_tome(model, ToMeSettings(8))
    sizes = []
    model.blocks[-1].register_forward_hook(lambda _m, _i, out: sizes.append(out[1]))
    with torch.no_grad():
        model(torch.randn(2, 3, 160, 160))
    (size,) = sizes
    assert torch.equal(size[:, :3], torch.ones(2, 3, 1))
    assert size.shape[1] == record.tokens_after_last_block == 103 - 6 * 8
    assert torch.equal(size[:, 3:].sum(dim=1).flatten(), torch.tensor([100.0, 100.0]))
    x = torch.randn(1, 7, 4)
    metric = torch.ones(1, 7, 4)  # all tokens equally similar
    merged, sizes_out, _ = bipartite_merge(x, torch.ones(1, 7, 1), metric, r=2, prefix=3)
    assert torch.equal(merged[:, :3], x[:, :3]) and torch.equal(
        sizes_out[:, :3], torch.ones(1, 3, 1)
    )


def test_schedules_and_bad_settings(demo):
    assert requested_merges(ToMeSettings(4, "decreasing"), 6) == [8, 6, 5, 3, 2, 0]
    assert sum(requested_merges(ToMeSettings(4, "decreasing"), 6)) == 24
    record = apply_tome(copy.deepcopy(demo), ToMeSettings(10))
    assert record.merges_per_block == [10, 10, 10, 10, 10, 7]  # at most half the patch tokens
    with pytest.raises(UserError, match="at least one must remain"):
        apply_tome(copy.deepcopy(demo), ToMeSettings(11))
    with pytest.raises(UserError, match="ViTs only"):
        apply_tome(timm.create_model("test_resnet", pretrained=False), ToMeSettings(2))


def test_pruned_heads_and_explicit_softmax(demo, demo_images):
    from mpdeploy.families.surgery import group_widths, resize_to_widths

    widths = {k: v // 2 if "attn" in k else v for k, v in group_widths(demo).items()}
    pruned = copy.deepcopy(demo)
    resize_to_widths(pruned, widths)
    assert pruned.blocks[0].attn.num_heads == 2
    merged = _tome(pruned, 6)
    explicit = copy.deepcopy(merged)
    for block in explicit.blocks:
        block.attn.fused_attn = False
    with torch.no_grad():
        assert torch.equal(_tome(pruned, 0)(demo_images), pruned(demo_images))
        fused, manual = merged(demo_images), explicit(demo_images)
    assert torch.allclose(fused, manual, atol=1e-5)


@pytest.fixture(scope="module")
def demo_onnx(demo, tmp_path_factory):
    from mpdeploy.export import export_onnx
    from mpdeploy.export.fp16 import convert_fp16

    root = tmp_path_factory.mktemp("tome-onnx")
    model = _tome(demo, 6)
    export_onnx(model, root / "model.onnx", (3, 32, 32), exporter="legacy")
    convert_fp16(root / "model.onnx", root / "model.fp16.onnx")
    return model, root


def test_onnx_has_no_scatter_and_matches_torch(demo_onnx, demo_images):
    import onnx
    import onnxruntime as ort

    from mpdeploy.families.tome import (
        decision_flips,
        onnx_merge_decisions,
        torch_merge_decisions,
    )

    model, root = demo_onnx
    with torch.no_grad():
        reference = model(demo_images).numpy()
    feeds = [{"input": demo_images.numpy()}]
    torch_decisions = torch_merge_decisions(model, demo_images, batch_size=4)
    assert len(torch_decisions) == 4 and len(torch_decisions[0]) == 6
    for name in ("model.onnx", "model.fp16.onnx"):
        proto = onnx.load(str(root / name))
        ops = {node.op_type for node in proto.graph.node}
        assert not ops & SCATTER_OPS, (name, ops & SCATTER_OPS)
        assert {"TopK", "Equal", "GatherElements", "MatMul"} <= ops
        session = ort.InferenceSession(str(root / name), providers=["CPUExecutionProvider"])
        for batch in (1, 4):  # the batch dimension stays dynamic
            out = session.run(None, {"input": demo_images[:batch].numpy()})[0]
            assert out.shape == (batch, 10)
        flips = decision_flips(torch_decisions, onnx_merge_decisions(root / name, feeds, [6] * 6))
        if name == "model.onnx":
            assert not flips.any()
            np.testing.assert_allclose(out, reference, atol=1e-4)
        else:  # fp16 may change a merge; where it did not, logits agree to fp16 accuracy
            assert (~flips).any()
            np.testing.assert_allclose(out[~flips], reference[~flips], atol=5e-2)


def test_fp16_graph_matches_in_fp32(demo_onnx):
    import onnx

    from mpdeploy.export.fp16 import precision_summary

    proto = onnx.shape_inference.infer_shapes(onnx.load(str(demo_onnx[1] / "model.fp16.onnx")))
    summary = precision_summary(proto)
    # the similarity product, its row maximum and the ranking all compute in fp32
    assert summary["fp32"].get("TopK") == 6 and "TopK" not in summary["fp16"]
    assert summary["fp32"].get("ReduceMax") == 6 and summary["fp32"].get("ArgMax") == 6
    assert summary["fp32"].get("MatMul", 0) >= 6 and summary["fp16"].get("MatMul", 0) > 0


def test_spec_round_trip_reapplies_tome(demo, demo_images, tmp_path):
    from mpdeploy.models.spec import ModelSpec, load_model, save_model

    spec = ModelSpec("mpdeploy_demo_vit", 10, 32, {"img_size": 32})
    model = _tome(demo, 5, schedule="decreasing", proportional=False)
    save_model(model, spec.with_tome(ToMeSettings(5, "decreasing", False)), tmp_path)
    loaded, loaded_spec = load_model(tmp_path)
    assert loaded_spec.tome == {"r": 5, "schedule": "decreasing", "proportional": False}
    assert tome_record(loaded).merges_per_block == tome_record(model).merges_per_block
    with torch.no_grad():
        assert torch.equal(loaded(demo_images), model(demo_images))
    # a spec written before token merging existed still loads
    old = {k: v for k, v in spec.to_dict().items() if k != "tome"}
    assert ModelSpec.from_dict(old).tome is None


@pytest.mark.parametrize("schedule", ["constant", "decreasing"])
@pytest.mark.parametrize(
    "name, shape, dims",
    [
        (
            "test_vit",
            (1, 3, 160, 160),
            dict(depth=6, dim=64, tokens=101, mlp_ratio=3.0, head_dim=32),
        ),
        ("vit_base_patch16_224", (1, 3, 224, 224), dict(depth=12, dim=768, tokens=197)),
    ],
)
def test_macs_counted_on_a_real_forward_match_the_analytic_model(name, shape, dims, schedule):
    with torch.device("meta"):  # the counter needs shapes only
        model = timm.create_model(name, pretrained=False).eval()
    record = apply_tome(model, ToMeSettings(8, schedule))
    measured = count_macs(model, shape).total_macs
    analytic = vit_tome_macs(
        **dims, merges=record.merges_per_block, merge_after_attention=True, patch_size=16
    )
    assert measured == pytest.approx(analytic.total, rel=0.005)
    assert list(analytic.tokens_per_block) == record.tokens_per_block


def test_cli_bad_tome_options(capsys, in_tmp):
    cases = [
        (["--model", "resnet50", "--weights", "none", "--tome", "8"], "applies to ViTs only"),
        (["--tome", "11"], "at least one must remain"),
        (["--tome", "-1"], "whole number of tokens"),
        (["--tome", "4", "--tome-schedule", "fast"], "unknown --tome-schedule 'fast'"),
    ]
    for argv, pattern in cases:
        code = main(["build", *argv])
        err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert code != 0 and len(lines) == 1 and pattern in lines[0], err
        assert "Traceback" not in err
    assert not any(in_tmp.iterdir())

"""N:M layout: TensorRT's grouping (Linear along in_features, Conv2d along Cin per output channel
and kernel pixel) and which layers are eligible, with the reason when not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mpdeploy.models  # noqa: F401  (torchvision shim before timm)

import timm  # isort: skip
from mpdeploy.prune.layout import conforms, grouped, layer_layouts, ungrouped


def trt_groups_conform(weight: np.ndarray, k: int, n: int) -> bool:
    """An independent reading of Polygraphy's checker: axis 1 split into runs of n, strided by the
    trailing dims (kernel pixels), for every leading index (output channel)."""
    out, cin = weight.shape[:2]
    pixels = int(np.prod(weight.shape[2:], dtype=int))
    runs = weight.reshape(out, cin // n, n, pixels)
    return bool(((runs != 0).sum(axis=2) <= k).all())


def test_conv_groups_run_along_cin_for_each_output_channel_and_pixel():
    cout, cin, kh, kw, n = 2, 8, 3, 3, 4
    weight = torch.zeros(cout, cin, kh, kw)
    weight += torch.arange(cin, dtype=torch.float32)[None, :, None, None]  # value = channel
    groups = grouped(weight, n)
    assert groups.shape == (cout, kh * kw, cin // n, n)
    expected = torch.arange(cin, dtype=torch.float32).reshape(cin // n, n)
    assert torch.equal(groups, expected.expand_as(groups))
    assert torch.equal(ungrouped(groups, tuple(weight.shape)), weight)


def test_linear_groups_run_along_in_features():
    weight = torch.arange(3 * 8, dtype=torch.float32).reshape(3, 8)
    groups = grouped(weight, 4)
    assert groups.shape == (3, 1, 2, 4)
    assert torch.equal(groups[1, 0, 1], weight[1, 4:8])
    assert torch.equal(ungrouped(groups, (3, 8)), weight)


def test_flattened_kernel_2to4_is_not_tensorrt_2to4():
    # 2:4 along the flattened Cin·kh·kw axis (the MP paper's ResNet checkpoints) fails TRT's check.
    weight = torch.randn(4, 8, 3, 3)
    flat = weight.reshape(4, -1, 4)
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(
        2, flat.abs().topk(2, dim=2).indices, True
    )
    flattened_sparse = (flat * keep).reshape(weight.shape)
    assert not trt_groups_conform(flattened_sparse.numpy(), 2, 4)
    assert not conforms(flattened_sparse, 2, 4)


def _layouts(name: str, n: int = 4, **kwargs):
    model = timm.create_model(name, **kwargs)
    return {lay.name: lay for lay in layer_layouts(model, n)}, model


def test_resnet_stem_and_classifier_are_ineligible_with_reasons():
    layouts, model = _layouts("test_resnet")
    assert layouts["conv1.0"].reason.startswith("stem")
    assert "classifier" in layouts["fc"].reason
    assert layouts["layer1.0.conv2"].eligible and layouts["layer2.0.downsample.1"].eligible
    assert [name for name, lay in layouts.items() if not lay.eligible] == ["conv1.0", "fc"]
    with_head = {lay.name: lay for lay in layer_layouts(model, 4, include_classifier=True)}
    assert with_head["fc"].eligible


def test_depthwise_and_non_multiple_dims_are_ineligible():
    layouts, _ = _layouts("test_convnext", n=16)
    assert "depthwise" in layouts["stages.0.blocks.0.conv_dw"].reason
    assert layouts["stages.0.blocks.0.mlp.fc1"].reason == "in_features 24 is not a multiple of n=16"
    assert layouts["stages.0.blocks.0.mlp.fc2"].eligible  # 96 = 6·16
    assert layouts["stages.1.downsample.1"].reason == "Cin 24 is not a multiple of n=16"
    assert layouts["stem.0"].reason.startswith("stem")


@pytest.mark.parametrize(("k", "n"), [(2, 4), (1, 4), (3, 4)])
def test_conforms_counts_kept_weights_per_group(k, n):
    weight = torch.randn(6, 8, 3, 3)
    groups = grouped(weight, n)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.abs().topk(k, dim=-1).indices, True)
    sparse = ungrouped(groups * keep, tuple(weight.shape))
    assert conforms(sparse, k, n) and trt_groups_conform(sparse.numpy(), k, n)
    assert not conforms(weight, k, n)

"""After `obs`, the N:M `lsq` re-fit takes its statistics from the Grams OBS captured (no pass)."""

from __future__ import annotations

import pytest
import torch
from test_prune_fixtures import input_size, make_model
from torch import nn

from mpdeploy.prune import compensate as comp
from mpdeploy.prune import nm
from mpdeploy.prune.nm import SparsityConfig, sparsify
from mpdeploy.prune.obs import capture_hessians


class Tiny(nn.Module):
    """A Linear on tokens and a 1×1 conv (with padding, so zero rows count too)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1, padding=1)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        y = self.conv(x)  # (B, 8, H+2, W+2)
        return self.fc(y.flatten(2).transpose(1, 2))


def test_the_sums_from_a_gram_are_the_sums_of_a_pass():
    torch.manual_seed(0)
    model = Tiny().eval()
    images = torch.randn(6, 3, 5, 5) + 0.5
    names = ["conv", "fc"]
    grams = capture_hessians(model, names, images, max_rows=10**6, batch_size=4)
    layers = [comp.LayerFit(name) for name in names]
    passed = comp.collect_statistics(
        model, model, images, layers, comp.CompensateConfig(batch_size=4), need_gram=True
    )
    for name in names:
        module = model.get_submodule(name)
        h = grams[name]
        got = comp.stats_from_gram(h.gram, h.sum_x, h.rows, module.weight, module.bias)
        want = passed[name]
        assert got.rows == want.rows
        for field in ("gram", "cross", "sum_x", "sum_y"):
            a, b = getattr(got, field), getattr(want, field)
            assert float((a - b).norm() / b.norm()) < 1e-6, (name, field)


def test_a_gram_of_another_width_is_refused():
    weight = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="Gram"):
        comp.stats_from_gram(torch.eye(5, dtype=torch.float64), torch.zeros(5), 10, weight, None)


def _run(model, calib, reuse: bool, monkeypatch):
    if not reuse:
        monkeypatch.setattr(nm, "_columns_in_weight_order", lambda module: False)
    result = sparsify(model, calib, SparsityConfig(2, 4), input_shape=input_size(model))
    monkeypatch.undo()
    return result


@pytest.mark.parametrize("name", ["mpdeploy_demo_vit", "test_resnet"])
def test_obs_lsq_with_the_captured_grams_equals_the_extra_pass(name, monkeypatch):
    model = make_model(name, {})
    calib = torch.randn(32, *input_size(model), generator=torch.Generator().manual_seed(1))
    with_grams = _run(model, calib, True, monkeypatch)
    with_pass = _run(model, calib, False, monkeypatch)
    layers = with_grams.report["compensation"]["layers"]
    from_gram = {n for n, e in layers.items() if "statistics" in e}
    for n in layers:  # exactly the Linear and 1×1 conv layers skip the pass
        module = model.get_submodule(n)
        flat = isinstance(module, nn.Linear) or module.kernel_size == (1, 1)
        assert (n in from_gram) == flat, n
    assert from_gram
    assert not any("statistics" in e for e in with_pass.report["compensation"]["layers"].values())
    # the same masks, and the same re-fit up to the pass's float32 sums (~1e-7 relative)
    assert with_grams.masks.keys() == with_pass.masks.keys()
    for key, mask in with_grams.masks.items():
        assert torch.equal(mask, with_pass.masks[key]), key
    with torch.no_grad():
        a, b = with_grams.model(calib), with_pass.model(calib)
    assert float((a - b).norm() / b.norm()) < 1e-3

"""The prune stage gives the pruned model it gave before its calibration passes were fused.

`tests/data/prune_reference.safetensors` holds, for a tiny ViT and a tiny ResNet, what the
unfused prune stage (commit 085e6a2: separate criterion, compensation and headline passes,
float64 Gram sums, weight gradients in the Fisher/Taylor backward) produced: the kept units of
every group, the re-fitted weights (and the biases they moved) and the headline's logit figures.
Kept units must be identical; weights and figures agree within float32 round-off (tolerances
below). After a deliberate change of a criterion's or the compensation's math, rewrite it:

    MPDEPLOY_WRITE_PRUNE_REFERENCE=1 pytest -q tests/test_prune_reference.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_prune_fixtures import make_model

from mpdeploy.prune import PruneConfig, prune_model

REFERENCE = Path(__file__).parent / "data" / "prune_reference.safetensors"
WRITE = os.environ.get("MPDEPLOY_WRITE_PRUNE_REFERENCE") == "1"
# max |Δw| of a re-fitted layer over its max |w|; measured after the fusion (float32 Gram blocks):
# test_vit ≤ 9e-6, test_resnet ≤ 4.2e-3 (layer4.0.conv2: 1 200 im2col rows, ridge-conditioned)
WEIGHT_RTOL = {"test_vit": 1e-4, "test_resnet": 1e-2}
HEADLINE_RTOL = 1e-4  # logit figures of the headline (relative)
HEADLINE_KEYS = (
    "logit_perturbation_max",
    "logit_perturbation_median",
    "top1_agreement_calib",
    "certified_fraction",
)

# mp_fisher + lsq+bn (the default when the plumbing was fused) on both families; the
# Taylor backward and the paired dense/pruned statistics pass; the MP criterion's forward-only
# pass with the bias fit (its mean-only statistics)
FISHER_LSQ = {"method": "mp_fisher", "compensate": "lsq+bn"}
CASES = {
    "vit-mp_fisher": ("test_vit", PruneConfig(0.3, **FISHER_LSQ)),
    "resnet-mp_fisher": ("test_resnet", PruneConfig(0.3, **FISHER_LSQ)),
    "vit-taylor-lsq-pruned": (
        "test_vit",
        PruneConfig(0.3, method="taylor", compensate="lsq", compensate_inputs="pruned"),
    ),
    "resnet-mp-bias": ("test_resnet", PruneConfig(0.16, method="mp", compensate="bias")),
}
CALIB_IMAGES = 48  # ResNet stage-1 convs: 48 × 1600 rows > 65 536, so rows are sampled


def pruned_tensors(case: str) -> dict[str, torch.Tensor]:
    """Kept units, re-fitted tensors and headline figures of one case, flat for safetensors."""
    name, config = CASES[case]
    model = make_model(name, {})
    shape = tuple(model.pretrained_cfg["input_size"])
    calib = torch.randn((CALIB_IMAGES, *shape), generator=torch.Generator().manual_seed(0))
    result = prune_model(model, calib, None, config, input_shape=shape)
    out = {
        f"{case}/keep/{group['name']}": torch.tensor(group["units_kept"], dtype=torch.int64)
        for group in result.plan["groups"]
    }
    state = dict(result.model.state_dict())
    for layer, entry in result.plan["compensation"]["layers"].items():
        out[f"{case}/weight/{layer}"] = state[f"{layer}.weight"].clone()
        sink = entry.get("bias_into")
        if sink and not (sink.endswith("running_mean") and "bn" in config.compensate):
            out[f"{case}/bias/{sink}"] = state[sink].clone()  # a BatchNorm's is redone by `bn`
    norms = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not (norms and "bn" in config.compensate):  # the BatchNorm part is not plumbing: left out
        out[f"{case}/headline"] = torch.tensor(
            [result.headline[k] for k in HEADLINE_KEYS], dtype=torch.float64
        )
    return out


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    if WRITE:
        REFERENCE.parent.mkdir(exist_ok=True)
        save_file({k: v for case in CASES for k, v in pruned_tensors(case).items()}, REFERENCE)
    return load_file(REFERENCE)


@pytest.mark.parametrize("case", list(CASES))
def test_pruned_model_matches_the_unfused_reference(case, reference):
    got = pruned_tensors(case)
    want = {k: v for k, v in reference.items() if k.startswith(f"{case}/")}
    assert sorted(got) == sorted(want), "other groups or re-fitted layers than the reference"
    for key, expected in want.items():
        value = got[key]
        if "/keep/" in key:
            assert torch.equal(value, expected), f"{key}: other kept units"
        elif key.endswith("/headline"):
            torch.testing.assert_close(value, expected, rtol=HEADLINE_RTOL, atol=1e-6, msg=key)
        else:
            scale = float(expected.abs().max())
            error = float((value - expected).abs().max())
            tolerance = WEIGHT_RTOL[CASES[case][0]] * scale
            assert error <= tolerance, f"{key}: max |Δ| {error:.3g} vs scale {scale:.3g}"

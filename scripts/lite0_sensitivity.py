"""efficientnet-lite0 (real ImageNet weights), 30 % structured: where the agreement goes.

Uses the accuracy suite's own lite0 data (`scripts/accuracy_suite.py`: 128 builtin calibration
crops, the val split's 96 held-out crops of astronaut/chelsea/coffee), 1 torch thread. Steps
(environment STEPS, comma-separated; one JSON line per result on stdout and in $OUT/log.jsonl):

- `dense`: the held-out crops' dense softmax margins;
- `zero`: the smallest possible cut (one 8-channel chunk) through prune_model + compensation;
- `plan`: the default criterion's plan at TARGET (kept widths per group) and its agreement;
- `sens`: each group alone cut by FRAC (lowest default-criterion scores), compensated with COMP;
  agreement on the held-out crops and the KL to dense on the calibration crops.

Agreement is reported on all held-out crops and, as a diagnostic only, on the "confident" ones
(dense top-1 − top-2 softmax margin ≥ 0.05).

    OUT=/tmp/l0s STEPS=dense,zero,plan,sens nice -n 19 .venv/bin/python scripts/lite0_sensitivity.py
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import accuracy_suite as suite  # noqa: E402
import torch  # noqa: E402
from lite0_calibration import jsonl_emitter  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/lite0_sensitivity"))
STEPS = os.environ.get("STEPS", "dense,zero,plan,sens").split(",")
TARGET = float(os.environ.get("TARGET", "0.3"))
FRAC = float(os.environ.get("FRAC", "0.3"))
COMP = os.environ.get("COMP", "lsq+bn")
METHOD = os.environ.get("METHOD", "")  # default: PruneConfig's
SPLIT = os.environ.get("SPLIT", "val")
CALIB = os.environ.get("CALIB", "wide")  # "wide": lite0_calibration.WIDE_PHOTOS, or "builtin"
CALIB_SIZE = int(os.environ.get("CALIB_SIZE", "128"))
torch.set_num_threads(int(os.environ.get("THREADS", "1")))


emit = jsonl_emitter(OUT)


def main() -> None:
    from lite0_calibration import calibration_images

    from mpdeploy.data.calibration import load_calibration
    from mpdeploy.families import get_family
    from mpdeploy.families.surgery import keep_indices, prune_groups
    from mpdeploy.prune import PruneConfig, prune_model
    from mpdeploy.prune.compensate import CompensateConfig, compensate, structured_layers
    from mpdeploy.prune.criteria import ScoringContext, get_criterion
    from mpdeploy.prune.macs import count_macs
    from mpdeploy.prune.planner import budget_weights, estimate_unit_macs
    from mpdeploy.spectrum import analyze_model

    key = suite.EFFNET
    model = suite.load_model(key).model
    if CALIB == "builtin":  # mpdeploy's three builtin photos
        calib = load_calibration("builtin", CALIB_SIZE, suite.load_model(key).data_config).images
    else:  # the suite's lite0 calibration: WIDE_PHOTOS
        calib = calibration_images(CALIB_SIZE, suite.load_model(key).data_config)
    held = suite.held_out(key, SPLIT)
    method = METHOD or suite.defaults()["method"]
    with torch.no_grad():
        ref = torch.cat([model(b) for b in held.images.split(48)])
        ref_cal = torch.cat([model(b) for b in calib.split(32)])
    probs = ref.softmax(1).topk(2, 1).values
    confident = (probs[:, 0] - probs[:, 1]) >= 0.05

    def agree(pruned):
        pruned.eval()
        with torch.no_grad():
            out = torch.cat([pruned(b) for b in held.images.split(48)])
            cal = torch.cat([pruned(b) for b in calib.split(32)])
        same = out.argmax(1) == held.labels
        kl = torch.nn.functional.kl_div(
            cal.log_softmax(1), ref_cal.log_softmax(1), log_target=True, reduction="batchmean"
        )
        return {
            "calib_agree": round(float((cal.argmax(1) == ref_cal.argmax(1)).double().mean()), 4),
            "agree": round(float(same.double().mean()), 4),
            "agree_confident": round(float(same[confident].double().mean()), 4),
            "calib_kl": round(float(kl), 4),
        }

    if "dense" in STEPS:
        margin = probs[:, 0] - probs[:, 1]
        emit(step="dense", held=len(held.labels), split=SPLIT, confident=int(confident.sum()),
             margin_median=round(float(margin.median()), 4),
             margin_lt_0p05=round(float((~confident).double().mean()), 4))  # fmt: skip

    spectrum = analyze_model(model, sparsity=TARGET)
    shape = suite.load_model(key).input_shape

    def plan(target, comp):
        res = prune_model(
            model, calib, spectrum, PruneConfig(target, method=method, compensate=comp),
            input_shape=shape,
        )  # fmt: skip
        widths = {
            g["name"]: f"{g['width_before']}->{g['width_after']}"
            for g in res.plan["groups"]
            if g["width_after"] != g["width_before"]
        }
        return res, widths

    if "zero" in STEPS:
        for comp in ("none", COMP):
            res, widths = plan(0.005, comp)
            emit(step="zero", method=method, compensate=comp, widths=widths,
                 mac_reduction=round(res.headline["mac_reduction"], 4), **agree(res.model))  # fmt: skip

    if "plan" in STEPS:
        for comp in os.environ.get("PLAN_COMPS", f"none,{COMP}").split(","):
            res, widths = plan(TARGET, comp)
            emit(step="plan", method=method, compensate=comp, target=TARGET, widths=widths,
                 mac_reduction=round(res.headline["mac_reduction"], 4), **agree(res.model))  # fmt: skip

    if "comp" in STEPS:
        _compensation_grid(model, calib, _removed(model, plan), agree, "comp")

    if "cap" in STEPS:
        import dataclasses
        import math

        from mpdeploy.families import get_family

        family = type(get_family(model))
        orig = family.channel_groups
        exempt = [g for g in os.environ.get("EXEMPT", "").split(",") if g]
        for cap in [float(c) for c in os.environ.get("CAPS", "0.35").split(",")]:

            def capped(self, m, cap=cap):
                return [
                    dataclasses.replace(
                        g,
                        min_units=g.units
                        if g.name in exempt
                        else max(g.min_units, math.ceil(g.units * (1 - cap))),
                    )
                    for g in orig(self, m)
                ]

            family.channel_groups = capped
            try:
                res, widths = plan(TARGET, "none")
                removed = {
                    g["name"]: set(g["units_removed"])
                    for g in res.plan["groups"]
                    if g["units_removed"]
                }
                emit(step="cap", cap=cap, exempt=exempt, widths=widths,
                     mac_reduction=round(res.headline["mac_reduction"], 4))  # fmt: skip
                _compensation_grid(model, calib, removed, agree, f"cap{cap}", orig)
            finally:
                family.channel_groups = orig

    if "sens" in STEPS:
        family = get_family(model)
        groups = family.channel_groups(model)
        dense_count = count_macs(model, (1, *shape))
        unit_macs = estimate_unit_macs(model, groups, family, dense_count)
        ctx = ScoringContext(
            calib=calib, budget_weights=budget_weights(spectrum), unit_macs=unit_macs, seed=0,
            batch_size=32,
        )  # fmt: skip
        scores = get_criterion(method).unit_scores(model, groups, ctx)
        only = os.environ.get("GROUPS")
        for g in groups:
            if only and g.name not in only.split(","):
                continue
            n = 8 * round(g.units * FRAC / 8)
            removed = {g.name: set(scores[g.name].argsort()[:n].tolist())}
            pruned = prune_groups(copy.deepcopy(model), keep_indices(groups, removed)).eval()
            if COMP != "none":
                layers = structured_layers(model, groups, removed)
                compensate(model, pruned, calib, layers, CompensateConfig(COMP))
            emit(step="sens", group=g.name, width=g.width, cut=n, frac=FRAC, compensate=COMP,
                 mac_share=round(unit_macs[g.name] * n / dense_count.total_macs, 4),
                 **agree(pruned))  # fmt: skip


def _removed(model, plan):
    """The plan's removed units at TARGET (cached in $OUT: scoring costs minutes)."""
    path = OUT / f"removed-{TARGET}-{METHOD or 'default'}-{CALIB}{CALIB_SIZE}.json"
    if not path.is_file():
        res, _ = plan(TARGET, "none")
        removed = {g["name"]: g["units_removed"] for g in res.plan["groups"] if g["units_removed"]}
        OUT.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(removed))
    return {k: set(v) for k, v in json.loads(path.read_text()).items()}


def _compensation_grid(model, calib, removed, agree, tag, channel_groups=None):
    """One plan, each compensation; `lsqd<r>` = lsq with its ridge pulled towards the dense
    (kept) weights instead of towards 0 (a patch of this script, not of prune/compensate.py)."""
    from mpdeploy.families import get_family
    from mpdeploy.families.surgery import keep_indices, prune_groups
    from mpdeploy.prune import compensate as C

    family = get_family(model)
    groups = (channel_groups or type(family).channel_groups)(family, model)
    for comp in os.environ.get("COMPS", "none,bias,bn,lsq,bias+bn,lsq+bn").split(","):
        pruned = prune_groups(copy.deepcopy(model), keep_indices(groups, removed)).eval()
        parts, ridge, prior = comp, 1e-3, False
        if comp.startswith("lsqd"):
            head, _, rest = comp.partition("+")
            ridge, prior = float(head[4:]), True
            parts = "lsq" + ("+" + rest if rest else "")
        layers = C.structured_layers(model, groups, removed)
        with _ridge_towards_dense(C, prior):
            C.compensate(model, pruned, calib, layers, C.CompensateConfig(parts, ridge=ridge))
        emit(step=tag, target=TARGET, compensate=comp, **agree(pruned))


class _ridge_towards_dense:
    """Within the block, `solve_lsq` minimises ‖X̃β − y‖² + λ‖β − β₀‖² with β₀ the layer's
    current (kept dense) weights: (G + λD)β = C + λDβ₀."""

    def __init__(self, C, active):
        self.C, self.active, self.prior = C, active, None

    def __enter__(self):
        if not self.active:
            return self
        C = self.C
        self.saved = C.refit_layer, C.solve_lsq
        orig_refit, orig_solve = self.saved

        def refit(pruned, layer, s, part, ridge, **kw):
            w = pruned.get_submodule(layer.name).weight.detach()
            self.prior = w.reshape(w.shape[0], -1).double()
            return orig_refit(pruned, layer, s, part, ridge, **kw)

        def solve(s, support, ridge, **kw):
            features = s.gram.shape[0] - 1
            lam = ridge * float(s.gram.diagonal()[:features].mean())
            shifted = copy.copy(s)
            shifted.cross = s.cross.clone()
            shifted.cross[:features] += lam * self.prior.T
            return orig_solve(shifted, support, ridge, **kw)

        C.refit_layer, C.solve_lsq = refit, solve
        return self

    def __exit__(self, *exc):
        if self.active:
            self.C.refit_layer, self.C.solve_lsq = self.saved


if __name__ == "__main__":
    main()

"""efficientnet-lite0 (real weights) diagnosis for issue 11: compensation sanity with nothing cut,
30 % structured grids (optionally with a per-group cap), 2:4 + label-free recovery, per-group
sensitivity; every figure is top-1 agreement with dense on held-out photo crops (and whether the
dense top-1 is in the pruned top-5). One JSON line per result on stdout and in $OUT/log.jsonl.

    OUT=/tmp/l0 NCAL=64 NHELD=140 THREADS=1 STEPS=grid,cap CRITERIA=mp_fisher \
        COMPS=none,bias+bn,lsq+bn CAPS=0.5 python scripts/lite0_diagnose.py
    OUT=/tmp/l0 NCAL=64 NHELD=140 STEPS=nm NM=magnitude:lsq+bn RECOVER=1:1e-4:1,1:1e-4:0 \
        python scripts/lite0_diagnose.py      # RECOVER: epochs:lr:freeze_bn (1 = frozen)

Options are environment variables (STEPS = sanity,grid,cap,nm,sens). Calibration crops:
engines/lite0-photos/calib-NCAL (scripts/lite0_photo_agreement.py writes them); held out: the
first NHELD of that script's seeded crops.
"""

import copy
import dataclasses
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import torch  # noqa: E402
from lite0_calibration import jsonl_emitter  # noqa: E402

import mpdeploy.models  # noqa: E402,F401

OUT = Path(os.environ.get("OUT", "/tmp/out"))
STEPS = os.environ.get("STEPS", "sanity,grid,nm,sens").split(",")
NCAL = int(os.environ.get("NCAL", "128"))
NHELD = int(os.environ.get("NHELD", "280"))
CRITERIA = os.environ.get("CRITERIA", "mp,mp_absolute,magnitude,mp_fisher").split(",")
COMPS = os.environ.get("COMPS", "none,bias,bn,bias+bn,lsq,lsq+bn").split(",")
torch.set_num_threads(int(os.environ.get("THREADS", "1")))


emit = jsonl_emitter(OUT)


def lite0():
    from convert_efficientnet_lite0 import lite0_model

    return lite0_model()


def held_out(count):
    from lite0_photo_agreement import held_out_crops

    return held_out_crops(count)


def main():
    from mpdeploy.data.calibration import eval_transform, load_calibration
    from mpdeploy.families import get_family
    from mpdeploy.families.surgery import keep_indices, prune_groups
    from mpdeploy.models import data_config_for
    from mpdeploy.prune import PruneConfig, prune_model
    from mpdeploy.prune.compensate import (
        CompensateConfig,
        compensate,
        reestimate_batchnorm,
        structured_layers,
    )

    m = lite0()
    cfg = data_config_for(m, 224)
    from lite0_photo_agreement import calibration_folder

    calib_dir = calibration_folder(NCAL)
    calib = load_calibration(str(calib_dir), NCAL, cfg).images
    t = eval_transform(cfg)
    held = torch.stack([t(c) for c in held_out(NHELD)])

    def logits(model):
        model.eval()
        dev = next(model.parameters()).device
        with torch.no_grad():
            return torch.cat([model(b.to(dev)).float().cpu() for b in held.split(70)])

    ref = logits(m)
    top1 = ref.argmax(1)

    def agree(model):
        out = logits(model)
        return round(float((out.argmax(1) == top1).double().mean()), 4), round(
            float((out.topk(5, 1).indices == top1[:, None]).any(1).double().mean()), 4
        )

    p = ref.softmax(1).topk(2, 1).values
    margin = p[:, 0] - p[:, 1]
    emit(step="dense", held=NHELD, calib=NCAL, top1_prob_median=float(p[:, 0].median()),
         margin_median=float(margin.median()), margin_lt_0p05=float((margin < 0.05).double().mean()))  # fmt: skip
    groups = get_family(m).channel_groups(m)

    if "sanity" in STEPS:
        d = copy.deepcopy(m)
        reestimate_batchnorm(d, calib, 32)
        emit(step="sanity", what="dense + absolute BN re-estimation", agree=agree(d))
        d = copy.deepcopy(m)
        rec = compensate(m, d, calib, structured_layers(m, groups, {}), CompensateConfig("lsq+bn"))
        emit(step="sanity", what="dense + compensate lsq+bn (nothing cut)", agree=agree(d),
             bn=rec.get("batchnorm"))  # fmt: skip

    def grid(tag, criteria, comps, patch_groups=None, target=0.3):
        fam = type(get_family(m))
        orig = fam.channel_groups
        if patch_groups:
            fam.channel_groups = lambda self, model: patch_groups(orig(self, model))
        try:
            for method in criteria:
                res = prune_model(
                    m, calib, None, PruneConfig(target, method=method, compensate="none"),
                    input_shape=(3, 224, 224),
                )  # fmt: skip
                gs = fam.channel_groups(get_family(m), m)
                removed = {
                    g["name"]: set(g["units_removed"])
                    for g in res.plan["groups"]
                    if g["units_removed"]
                }
                widths = {
                    g["name"]: [g["width_before"], g["width_after"]] for g in res.plan["groups"]
                }
                emit(step=tag, method=method, target=target,
                     mac_reduction=round(res.headline["mac_reduction"], 4), widths=widths)  # fmt: skip
                for comp in comps:
                    pm = copy.deepcopy(res.model)
                    if comp != "none":
                        compensate(
                            m, pm, calib, structured_layers(m, gs, removed), CompensateConfig(comp)
                        )
                    emit(step=tag, method=method, target=target, compensate=comp, agree=agree(pm))
        finally:
            fam.channel_groups = orig

    if "grid" in STEPS:
        grid("grid30", CRITERIA, COMPS)

    if "cap" in STEPS:
        import math

        for cap in [float(c) for c in os.environ.get("CAPS", "0.5,0.35").split(",")]:

            def capped(gs, cap=cap):
                return [
                    dataclasses.replace(
                        g, min_units=max(g.min_units, math.ceil(g.units * (1 - cap)))
                    )
                    for g in gs
                ]

            grid(f"cap{cap}", CRITERIA, COMPS, capped)

    if "nm" in STEPS:
        from mpdeploy.prune.compensate import masked_layers  # noqa: F401
        from mpdeploy.prune.nm import SparsityConfig, sparsify
        from mpdeploy.prune.recover import RecoverConfig, recover

        for method, comp in [
            (mc.split(":")[0], mc.split(":")[1])
            for mc in os.environ.get(
                "NM", "magnitude:none,magnitude:lsq+bn,magnitude:bias+bn,cast:lsq+bn"
            ).split(",")
        ]:
            res = sparsify(m, calib, SparsityConfig(2, 4, method=method, compensate=comp),
                           input_shape=(3, 224, 224))  # fmt: skip
            emit(step="nm24", method=method, compensate=comp, agree=agree(res.model))
            if os.environ.get("RECOVER") and comp == os.environ.get("RECOVER_COMP", "lsq+bn"):
                for spec in os.environ["RECOVER"].split(","):
                    epochs, lr, freeze = spec.split(":")
                    student = copy.deepcopy(res.model)
                    if freeze == "1":
                        for mod in student.modules():
                            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                                mod.train = lambda mode=True, mod=mod: mod
                    if torch.cuda.is_available():
                        student.cuda()
                    teacher = copy.deepcopy(m)
                    if torch.cuda.is_available():
                        teacher.cuda()
                    rc = RecoverConfig(
                        epochs=int(epochs), lr=float(lr), batch_size=32, progress=False
                    )
                    rr = recover(student, teacher, calib, cfg, rc, masks=res.masks)
                    emit(step="nm24+recover", method=method, compensate=comp, epochs=int(epochs),
                         lr=float(lr), freeze_bn=freeze == "1", agree=agree(rr.model),
                         train_subset=rr.record["top1_subset"], seconds=rr.record["seconds"])  # fmt: skip

    if "sens" in STEPS:
        sd = dict(m.named_parameters())
        for frac in [float(f) for f in os.environ.get("SENS", "0.3").split(",")]:
            for g in groups:
                w = sd[g.consumers[-1].name].detach()
                score = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
                n = int(round(g.units * frac))
                removed = {g.name: set(score.argsort()[:n].tolist())}
                pm = prune_groups(copy.deepcopy(m), keep_indices(groups, removed)).eval()
                a0 = agree(pm)
                compensate(
                    m, pm, calib, structured_layers(m, groups, removed), CompensateConfig("bias+bn")
                )
                emit(
                    step="sens",
                    group=g.name,
                    width=g.width,
                    cut=n,
                    frac=frac,
                    none=a0,
                    bias_bn=agree(pm),
                )


if __name__ == "__main__":
    main()

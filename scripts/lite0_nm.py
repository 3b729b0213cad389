"""efficientnet-lite0 (real ImageNet weights), N:M (2:4): which method, which compensation, which
layers lose the agreement.

Uses the accuracy suite's own lite0 data (`scripts/accuracy_suite.py`: 128 calibration crops of
`lite0_calibration.WIDE_PHOTOS`, the split's 96 held-out crops), 1 torch thread. Steps
(environment STEPS, comma-separated; one JSON line per result on stdout and in $OUT/log.jsonl):

- `grid`: `sparsify` with each METHODS × COMPS (SparsityConfig, everything else default);
  agreement and top-5 on the held-out crops, KL(dense ‖ sparse) on them and on the calibration;
- `layers`: per-layer sensitivity (`nm_sensitivity.layer_sensitivity`): masks of one
  `sparsify` per method (no permutation, no compensation), applied to ONE layer of the dense
  model at a time (with obs's updated weights); agreement and KL on the held-out crops.

    OUT=/tmp/l0nm STEPS=grid METHODS=obs,magnitude,cast COMPS=lsq+bn,none \
        nice -n 19 .venv/bin/python scripts/lite0_nm.py
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import accuracy_suite as suite  # noqa: E402
import torch  # noqa: E402
from lite0_calibration import jsonl_emitter  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/lite0_nm"))
STEPS = os.environ.get("STEPS", "grid").split(",")
METHODS = os.environ.get("METHODS", "obs,magnitude,cast").split(",")
COMPS = os.environ.get("COMPS", "lsq+bn,none").split(",")
PATTERN = os.environ.get("PATTERN", "2:4")
SPLIT = os.environ.get("SPLIT", "val")
PERMUTE = os.environ.get("PERMUTE", "1") == "1"
torch.set_num_threads(int(os.environ.get("THREADS", "1")))

emit = jsonl_emitter(OUT)


def scorer(model, calib, held):
    with torch.no_grad():
        ref = torch.cat([model(b) for b in held.images.split(48)])
        ref_cal = torch.cat([model(b) for b in calib.split(32)])

    def kl(out, ref):
        return float(
            torch.nn.functional.kl_div(
                out.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="batchmean"
            )
        )

    def score(pruned, calib_too=True):
        pruned.eval()
        with torch.no_grad():
            out = torch.cat([pruned(b) for b in held.images.split(48)])
            cal = torch.cat([pruned(b) for b in calib.split(32)]) if calib_too else None
        top5 = out.topk(5, 1).indices
        rec = {
            "agree": round(float((out.argmax(1) == held.labels).double().mean()), 4),
            "top5": round(float((top5 == held.labels[:, None]).any(1).double().mean()), 4),
            "kl": round(kl(out, ref), 4),
        }
        if cal is not None:
            rec["calib_agree"] = round(
                float((cal.argmax(1) == ref_cal.argmax(1)).double().mean()), 4
            )
            rec["calib_kl"] = round(kl(cal, ref_cal), 4)
        return rec

    return score


class centred_cast:
    """Within the block, CAST's C_g is the centred covariance E[(h − μ)(h − μ)ᵀ] instead of the
    second moment E[h hᵀ] (a patch of this script): the mean part of a dropped contribution,
    (rᵀμ)², is what a bias / BatchNorm compensation restores after projection."""

    def __init__(self, active: bool):
        self.active = active

    def __enter__(self):
        if not self.active:
            return self
        from mpdeploy.prune import cast

        self.cast, self.saved = cast, (cast.sample_rows, cast.capture_group_moments)
        orig_rows, orig_capture = self.saved
        sums: dict = {}

        def rows(module, x, quota):
            chosen, r = orig_rows(module, x, quota)
            sums.setdefault(id(module), []).append(r.sum(0))
            return chosen, r

        def capture(model, layer_names, images, n, **kw):
            sums.clear()
            moments, logits = orig_capture(model, layer_names, images, n, **kw)
            for name, m in moments.items():
                total = sum(sums[id(model.get_submodule(name))])  # (pixels, Cin)
                mu = total.reshape(total.shape[0], -1, n) / max(m.rows, 1)
                m.total = m.total.clone() - m.rows * torch.einsum("pgi,pgj->pgij", mu, mu)
            return moments, logits

        cast.sample_rows, cast.capture_group_moments = rows, capture
        return self

    def __exit__(self, *exc):
        if self.active:
            self.cast.sample_rows, self.cast.capture_group_moments = self.saved


CENTRED = os.environ.get("CENTRED", "0") == "1"
RIDGE = float(os.environ.get("RIDGE", "0"))  # 0: CompensateConfig's default ridge


@contextlib.contextmanager
def ridge(value: float):
    """The `lsq` re-fit's ridge (relative to the mean Gram diagonal) set to `value` within."""
    from mpdeploy.prune import compensate

    saved = compensate.CompensateConfig
    if value:
        compensate.CompensateConfig = functools.partial(saved, ridge=value)
    try:
        yield
    finally:
        compensate.CompensateConfig = saved


def main() -> None:
    from mpdeploy.prune.nm import SparsityConfig, sparsify

    key = suite.EFFNET
    lite0 = suite.load_model(key)
    model, shape = lite0.model, lite0.input_shape
    calib = suite.calibration(key)
    held = suite.held_out(key, SPLIT)
    score = scorer(model, calib, held)
    k, n = (int(v) for v in PATTERN.split(":"))

    if "grid" in STEPS:
        for method in METHODS:
            for comp in COMPS:
                start = time.perf_counter()
                cfg = SparsityConfig(k, n, method=method, compensate=comp, permute=PERMUTE)
                with centred_cast(CENTRED and method == "cast"), ridge(RIDGE):
                    res = sparsify(model, calib, cfg, input_shape=shape)
                emit(step="grid", split=SPLIT, pattern=PATTERN, method=method, compensate=comp,
                     permute=PERMUTE, centred=CENTRED and method == "cast", ridge=RIDGE,
                     seconds=round(time.perf_counter() - start, 1),
                     mac_reduction=round(res.headline.get("sparse_mac_reduction", 0.0), 4),
                     **score(res.model))  # fmt: skip

    if "layers" in STEPS:
        from nm_sensitivity import layer_sensitivity

        only = os.environ.get("LAYERS")
        rows: dict[str, dict[str, str]] = {}
        for method in METHODS:
            for r in layer_sensitivity(
                model, calib, held.images, k, n, method, only.split(",") if only else None
            ):
                rows.setdefault(r["layer"], {})[method] = f"{r['agreement']:.3f}/{r['kl']:.3f}"
        for name in sorted(rows):
            emit(step="layers", param=f"{name}.weight", **rows[name])


if __name__ == "__main__":
    main()

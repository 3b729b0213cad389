"""N:M `lsq` re-fit: the exact per-row Cholesky solve against the batched CG (prune/nm_solve.py).

Runs `sparsify` on one model and, for every N:M layer it re-fits, solves the same normal equations
both ways (the exact solve only on the layers named by --exact, it is slow), timing each and
scoring the relative reconstruction error ‖X̃β − Y‖/‖Y‖ on the calibration rows (computed from the
Gram: y is the dense layer's output on the same rows, so ‖X̃(β − β_dense)‖/‖X̃β_dense‖).

    nice -n 19 .venv/bin/python scripts/nm_lsq_bench.py --model vit_base_patch16_224 --images 32 \
        --exact 'blocks\\.0\\.' --out /tmp/nm_lsq_vitb.json
    nice -n 19 .venv/bin/python scripts/nm_lsq_bench.py --model vit_s --exact . (suite model)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mpdeploy.models  # noqa: E402,F401  (torchvision shim before timm)
from mpdeploy.prune import compensate as comp  # noqa: E402
from mpdeploy.prune import nm  # noqa: E402
from mpdeploy.prune.nm_solve import solve_masked  # noqa: E402


def _model_and_images(name: str, images: int):
    if name in ("vit_t", "vit_s", "convnextv2_n", "resnet18_n", "resnet26_n"):
        import accuracy_suite as suite

        loaded = suite.load_model(name)
        calib = suite.calibration(name)[:images]
        return loaded.model, calib, loaded.input_shape
    import timm

    from mpdeploy.data.calibration import load_calibration

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    config = timm.data.resolve_data_config({}, model=model)
    calib = load_calibration("builtin", images, config).images
    return model, calib, tuple(config["input_size"])


def _error(beta_w, beta_b, dense_w, dense_b, gram) -> float:
    diff = torch.cat([beta_w - dense_w, (beta_b - dense_b)[:, None]], 1)
    full = torch.cat([dense_w, dense_b[:, None]], 1)
    num = torch.einsum("oi,ij,oj->", diff, gram, diff).clamp_min(0).sqrt()
    den = torch.einsum("oi,ij,oj->", full, gram, full).sqrt()
    return float(num / den)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--method", default="cast")
    parser.add_argument("--exact", default="", help="regex of layers also solved exactly")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--capture-only", action="store_true", help="save, solve nothing")
    parser.add_argument("--save", default="", help="regex of layers whose normal equations to save")
    parser.add_argument("--save-dir", type=Path, default=Path("/tmp/nm_lsq_layers"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, calib, shape = _model_and_images(args.model, args.images)
    reference = {}
    rows = []

    original_compensate = nm._compensate

    def keep_reference(ref, *a, **k):
        reference["model"] = ref
        return original_compensate(ref, *a, **k)

    original_refit = comp.refit_layer

    def measured_refit(pruned, layer, s, part, ridge, **kwargs):
        if layer.support is None or part != "lsq":
            return original_refit(pruned, layer, s, part, ridge, **kwargs)
        dense = reference["model"].get_submodule(layer.name)
        dense_w = dense.weight.detach().reshape(dense.weight.shape[0], -1).double()
        dense_b = (
            dense.bias.detach().double()
            if dense.bias is not None
            else torch.zeros(dense_w.shape[0], dtype=torch.float64)
        )
        fit_bias = comp.bias_target(pruned, layer.name, kwargs.get("norm")) is not None
        module = pruned.get_submodule(layer.name)
        start = module.weight.detach().reshape(module.weight.shape[0], -1).double()
        start_b = (
            module.bias.detach().double() if module.bias is not None else torch.zeros_like(dense_b)
        )
        gram = s.gram
        if args.save and re.search(args.save, layer.name):
            args.save_dir.mkdir(parents=True, exist_ok=True)
            saved = dict(gram=gram, cross=s.cross, support=layer.support, start=start)
            saved.update(dense_w=dense_w, dense_b=dense_b, fit_bias=fit_bias, ridge=ridge)
            torch.save(saved, args.save_dir / f"{args.model}.{layer.name}.pt")
        if args.capture_only:
            return {"fit": "not solved (--capture-only)"}
        row = {
            "layer": layer.name,
            "shape": list(start.shape),
            "fit_bias": fit_bias,
            "rows": s.rows,
            "err_projected": _error(start, start_b, dense_w, dense_b, gram),
        }
        t0, c0 = time.perf_counter(), time.process_time()
        fast = solve_masked(s.gram, s.cross, layer.support, ridge, fit_bias=fit_bias, start=start)
        row.update(
            cg_wall_s=time.perf_counter() - t0,
            cg_cpu_s=time.process_time() - c0,
            cg_iterations=fast.iterations,
            cg_residual=fast.residual,
            err_cg=_error(fast.weight, fast.bias if fit_bias else start_b, dense_w, dense_b, gram),
            zeros_kept=bool((fast.weight[~layer.support] == 0).all()),
        )
        if args.exact and re.search(args.exact, layer.name):
            t0, c0 = time.perf_counter(), time.process_time()
            w, b = comp.solve_lsq(s, layer.support, ridge, fit_bias=fit_bias, solver="exact")
            row.update(
                exact_wall_s=time.perf_counter() - t0,
                exact_cpu_s=time.process_time() - c0,
                err_exact=_error(w, b if fit_bias else start_b, dense_w, dense_b, gram),
                max_weight_diff_rel=float((w - fast.weight).abs().max() / w.abs().max()),
            )
        print(json.dumps(row), flush=True)
        rows.append(row)
        return original_refit(pruned, layer, s, part, ridge, **kwargs)

    nm._compensate = keep_reference
    comp.refit_layer = measured_refit
    config = nm.SparsityConfig(2, 4, method=args.method, compensate="lsq")
    t0 = time.perf_counter()
    result = nm.sparsify(model, calib, config, input_shape=shape)
    total = {
        "model": args.model,
        "images": int(calib.shape[0]),
        "sparsify_wall_s": time.perf_counter() - t0,
        "timing_s": result.report.get("timing_s"),
        "cg_wall_s": sum(r["cg_wall_s"] for r in rows),
        "cg_cpu_s": sum(r["cg_cpu_s"] for r in rows),
        "exact_wall_s": sum(r.get("exact_wall_s", 0) for r in rows),
        "exact_cpu_s": sum(r.get("exact_cpu_s", 0) for r in rows),
        "layers": rows,
    }
    print(json.dumps({k: v for k, v in total.items() if k != "layers"}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(total, indent=1) + "\n")


if __name__ == "__main__":
    main()

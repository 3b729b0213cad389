"""The calibrate → analyze → prune step the benchmark scripts share (what `mpdeploy build` runs)."""

from __future__ import annotations


def prune_loaded(loaded, *, calib: str, calib_size: int, target_macs: float, method: str):
    """Prune a `mpdeploy.models.LoadedModel` to `target_macs`; returns the `PruneResult`."""
    from mpdeploy.data.calibration import load_calibration
    from mpdeploy.prune import PruneConfig, prune_model
    from mpdeploy.spectrum import analyze_model

    calibration = load_calibration(
        calib, calib_size, loaded.data_config, model_name=loaded.spec.timm_name
    )
    return prune_model(
        loaded.model,
        calibration.images,
        analyze_model(loaded.model, sparsity=target_macs),
        PruneConfig(target_macs=target_macs, method=method),
        spec=loaded.spec,
        input_shape=tuple(int(v) for v in loaded.data_config["input_size"]),
    )


def check_bench_args(parser, args):
    """The argument rules both benchmark scripts share; `parser.error` exits with a usage line."""
    if not 0.0 < args.target_macs < 1.0:
        parser.error("--target-macs must be in (0, 1)")
    if min(args.batches) < 1 or args.iterations < 1:
        parser.error("--batches and --iterations must be ≥ 1")
    return args

"""build(): runs the stages in order over one build directory and keeps the manifest.

resolve → calibrate → analyze → prune (+ sparsify, + recover) → export → engine → verify → bench
→ package. Each stage reads what earlier stages wrote (from memory within one build, from the
build directory when a stage is run on its own) and records itself in manifest.json.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpdeploy.errors import ParityError, UserError, raise_if_terminated
from mpdeploy.fileio import atomic_dir, remove_stale_debris, write_json
from mpdeploy.locks import build_lock_path, exclusive
from mpdeploy.manifest import Manifest

log = logging.getLogger(__name__)

SPARSITY_PATTERNS = ("off", "2:4", "4:8", "6:12", "8:16", "12:16")
TOME_SCHEDULES = ("constant", "decreasing")  # mpdeploy.families.tome.SCHEDULES (no timm import)
COMPENSATE_INPUTS = ("dense", "pruned", "sequential")  # mpdeploy.prune.compensate.INPUTS (no torch)
METHODS = (
    "mp_fisher_split",
    "mp_fisher_taylor",
    "mp_fisher_draws",
    "mp_fisher_robust",
    "mp_fisher",
    "mp",
    "mp_taylor",
    "fisher",
    "magnitude",
    "random",
    "taylor",
)
STAGES = (
    "resolve",
    "calibrate",
    "analyze",
    "prune",
    "sparsify",
    "recover",
    "export",
    "engine",
    "verify",
    "bench",
    "package",
)


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    model: str = "demo"
    weights: str = "hub"
    num_classes: int | None = None
    img_size: int | None = None
    data_config: str | None = None  # JSON file of timm preprocessing keys overriding timm's
    target_macs: float = 0.0
    sparsity: str = "off"
    sparsity_method: str = "obs_shrink"  # mpdeploy.prune.nm.METHODS (SparsityConfig.method)
    sparsity_dense: tuple[str, ...] = ()  # module-name patterns left dense (dense_layers)
    method: str = "mp_fisher_split"  # PruneConfig.method
    compensate: str = "lsq+bn"  # mpdeploy.prune.compensate.DEFAULT_COMPENSATION
    compensate_inputs: str = "dense"  # mpdeploy.prune.compensate.INPUTS (CompensateConfig.inputs)
    round_to: int = 8
    backend: str = "onnxruntime"
    precision: str = "fp32"
    device: str = "cpu"  # where the engine runs: cpu | cuda
    ort_provider: str | None = None  # ONNX Runtime on cuda: cuda (default) | tensorrt
    calib: str = "builtin"
    calib_size: int = 256
    calib_refine: int = 0  # Adam steps towards the BatchNorm statistics (mpdeploy.data.refine)
    recover_epochs: int = 0
    train: str | None = None
    max_batch: int = 64
    bench_batches: tuple[int, ...] | None = None
    bench_iterations: int | None = None  # a fixed count; None: time-budgeted (bench_budget)
    bench_budget: float = 60.0  # seconds of timed runs for the whole batch sweep
    exporter: str = "auto"
    out: str | None = None
    triton_repo: str | None = None
    model_name: str | None = None  # Triton model name
    spectrum_layer: str | None = None  # layer drawn in spectrum.png (default: the most spiked)
    tome: int = 0  # token merging (ViTs): tokens merged per block; 0 = off
    tome_schedule: str = "constant"  # constant | decreasing
    tome_proportional: bool = True  # add log(token size) to the attention logits
    force: bool = False
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        payload = dataclasses.asdict(self)
        payload["bench_batches"] = list(self.bench_batches) if self.bench_batches else None
        return payload

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> BuildOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in payload.items() if k in known}
        if values.get("bench_batches"):
            values["bench_batches"] = tuple(values["bench_batches"])
        if "sparsity_dense" in values:
            values["sparsity_dense"] = tuple(values["sparsity_dense"] or ())
        return cls(**values)


# Bounds on sizes: nothing a real classifier uses lies outside them, and inside them the memory
# a size needs is checked against what the machine has before any work starts.
IMG_SIZE_RANGE = (16, 2048)
CALIB_SIZE_MAX = 100_000
CALIB_REFINE_MAX = 10_000
BENCH_ITERATIONS_MAX = 100_000


def validate_options(opts: BuildOptions) -> None:
    """Reject bad input before any work is done or anything is written (one line each)."""
    check_option_values(opts)
    if opts.calib != "builtin" and not Path(opts.calib).is_dir():
        raise UserError(f"calibration folder not found: {opts.calib}")
    if opts.recover_epochs and opts.train not in (None, "demo") and not Path(opts.train).is_dir():
        raise UserError(f"--train folder not found: {opts.train}")
    if opts.recover_epochs and opts.train not in (None, "demo"):
        from mpdeploy.prune.recover import check_train_folder

        check_train_folder(opts.train)
    if opts.weights not in ("hub", "none"):
        from mpdeploy.models import check_weights_file

        check_weights_file(Path(opts.weights))
    size = opts.img_size
    if opts.data_config is not None:
        from mpdeploy.models import read_data_config

        input_size = read_data_config(opts.data_config).get("input_size")
        size = input_size[-1] if input_size else size
    if size is not None:
        from mpdeploy.data.calibration import check_calibration_memory

        check_calibration_memory(opts.calib_size, (3, size, size))
    from mpdeploy.backends import get_backend

    if opts.bench_budget <= 0:
        raise UserError(f"--bench-budget must be > 0 seconds (got {opts.bench_budget})")
    # A precision, device or provider the backend lacks here fails now, before any work.
    get_backend(opts.backend, require_available=False).check(engine_options(opts))
    check_tome_fits(opts)
    check_sparsity_dense(opts)


def check_option_values(opts: BuildOptions) -> None:
    """The checks that need nothing but the values (also run by the one-stage commands)."""
    if _has_control_characters(str(opts.model)):
        raise UserError(f"invalid --model {opts.model!r}: control characters in a model name")
    if not 0.0 <= opts.target_macs <= 0.95:
        raise UserError(f"--target-macs must be in [0, 0.95] (got {opts.target_macs})")
    parse_sparsity(opts.sparsity)
    from mpdeploy.prune.nm import check_method

    check_method(opts.sparsity_method)
    for pattern in opts.sparsity_dense:
        if not pattern or _has_control_characters(pattern):
            raise UserError(f"invalid --sparsity-dense {pattern!r}: empty or control characters")
    if opts.sparsity_dense and parse_sparsity(opts.sparsity) is None:
        raise UserError(
            "--sparsity-dense names layers to leave dense under --sparsity N:M: give one"
        )
    tome_settings(opts)
    if opts.method not in METHODS:
        raise UserError(f"unknown --method '{opts.method}': choose one of {', '.join(METHODS)}")
    from mpdeploy.prune.compensate import check_compensate_inputs, parse_compensation

    parse_compensation(opts.compensate)
    check_compensate_inputs(opts.compensate_inputs)
    if opts.max_batch < 1:
        raise UserError(f"--max-batch must be at least 1 (got {opts.max_batch})")
    if not 1 <= opts.calib_size <= CALIB_SIZE_MAX:
        raise UserError(f"--calib-size must be in [1, {CALIB_SIZE_MAX}] (got {opts.calib_size})")
    if not 0 <= opts.calib_refine <= CALIB_REFINE_MAX:
        raise UserError(
            f"--calib-refine must be in [0, {CALIB_REFINE_MAX}] steps (got {opts.calib_refine})"
        )
    if opts.num_classes is not None and opts.num_classes < 1:
        raise UserError(
            f"--num-classes must be at least 1 (got {opts.num_classes}): mpdeploy deploys "
            "classifiers; a headless feature extractor has no logits to publish"
        )
    low, high = IMG_SIZE_RANGE
    if opts.img_size is not None and not low <= opts.img_size <= high:
        raise UserError(f"--img-size must be in [{low}, {high}] pixels (got {opts.img_size})")
    if opts.recover_epochs < 0:
        raise UserError("--recover-epochs must be ≥ 0")
    if opts.round_to < 1:
        raise UserError("--round-to must be ≥ 1")
    if opts.bench_iterations is not None and not 1 <= opts.bench_iterations <= BENCH_ITERATIONS_MAX:
        raise UserError(
            f"--bench-iterations must be in [1, {BENCH_ITERATIONS_MAX}] "
            f"(got {opts.bench_iterations})"
        )
    for batch in opts.bench_batches or ():
        if batch < 1:
            raise UserError(f"--bench-batch must be at least 1 (got {batch})")
        if batch > opts.max_batch:
            raise UserError(
                f"--bench-batch {batch} is larger than --max-batch {opts.max_batch}; "
                "raise --max-batch or drop that batch size"
            )
    if opts.model_name is not None:
        from mpdeploy.serving.repository import validate_model_name

        validate_model_name(opts.model_name)


def _has_control_characters(text: str) -> bool:
    return any(ch in text for ch in "\n\r\t\x00")


def stage_options(previous: dict[str, Any], overrides: dict[str, Any]) -> BuildOptions:
    """A build's recorded options with a one-stage command's overrides on top. Turning N:M off
    (`prune --sparsity off`) also drops the layers `--sparsity-dense` kept dense under it."""
    merged = {**previous, **overrides}
    if parse_sparsity(merged.get("sparsity")) is None:
        merged["sparsity_dense"] = ()
    return BuildOptions.from_dict(merged)


def validate_stage_options(options: BuildOptions, overrides: dict[str, Any]) -> None:
    """A one-stage command's options, merged with the build's, checked before anything runs."""
    from mpdeploy.backends import get_backend

    check_option_values(options)
    # precision, device and provider are the backend's to judge (`export --precision int4`)
    backend = get_backend(options.backend, require_available="backend" in overrides)
    backend.check(engine_options(options))
    if overrides.get("train") not in (None, "demo") and not Path(overrides["train"]).is_dir():
        raise UserError(f"--train folder not found: {overrides['train']}")


def parse_sparsity(pattern: str | None) -> tuple[int, int] | None:
    """'k:n' → (k, n) with 0 < k < n ≤ 16; 'off'/None → None."""
    if pattern in (None, "", "off"):
        return None
    try:
        k_text, n_text = str(pattern).split(":")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise UserError(
            f"--sparsity must look like k:n (e.g. 2:4) or 'off' (got {pattern})"
        ) from None
    if not 0 < k < n <= 16:
        raise UserError(f"--sparsity {pattern}: need 0 < k < n ≤ 16")
    return k, n


def tome_settings(opts: BuildOptions) -> Any:
    """The ToMeSettings that `--tome`, `--tome-schedule`, `--tome-proportional` ask for, or None."""
    if isinstance(opts.tome, bool) or not isinstance(opts.tome, int) or opts.tome < 0:
        raise UserError(f"--tome must be a whole number of tokens ≥ 0 (got {opts.tome})")
    if opts.tome_schedule not in TOME_SCHEDULES:
        raise UserError(
            f"unknown --tome-schedule '{opts.tome_schedule}': choose one of "
            + ", ".join(TOME_SCHEDULES)
        )
    if opts.tome == 0:
        return None
    from mpdeploy.families.tome import ToMeSettings

    return ToMeSettings(opts.tome, opts.tome_schedule, bool(opts.tome_proportional))


def check_tome_fits(opts: BuildOptions) -> None:
    """`--tome` on a model that is not a ViT, or an r that leaves no patch token: fail now.

    The architecture is instantiated on the meta device (shapes only, no weights, no memory).
    """
    settings = tome_settings(opts)
    if settings is None:
        return
    from mpdeploy.families.tome import describe

    describe(_meta_model(opts), settings)


def check_sparsity_dense(opts: BuildOptions) -> None:
    """A `--sparsity-dense` pattern that matches no Linear/Conv2d of the model: fail now."""
    pattern = parse_sparsity(opts.sparsity)
    if not opts.sparsity_dense or pattern is None:
        return
    from mpdeploy.prune.layout import keep_dense, layer_layouts

    keep_dense(layer_layouts(_meta_model(opts), pattern[1]), opts.sparsity_dense)


def _meta_model(opts: BuildOptions):
    """The architecture on the meta device (shapes only, no weights, no memory)."""
    import torch

    from mpdeploy.models import resolve_model_name

    architecture = resolve_model_name(opts.model).split(".", 1)[0]
    import timm  # only after mpdeploy.models: its torchvision shim must run first

    sizes = {"num_classes": opts.num_classes, "img_size": opts.img_size}
    with torch.device("meta"):
        try:
            return timm.create_model(architecture, **{k: v for k, v in sizes.items() if v})
        except TypeError:  # a CNN takes no img_size (a --tome on it is refused as "not a ViT")
            return timm.create_model(architecture)


def default_out_dir(opts: BuildOptions) -> Path:
    from mpdeploy.models import short_name

    parts = []
    if opts.target_macs > 0:
        parts.append(f"{opts.method}{round(opts.target_macs * 100)}")
    if opts.sparsity != "off":
        parts.append(opts.sparsity.replace(":", "of"))
    if opts.tome:
        parts.append(f"tome{opts.tome}")
    parts.append("dense" if not parts else "")
    device = [opts.ort_provider or opts.device] if opts.device != "cpu" else []
    parts = [p for p in parts if p] + [opts.backend, *device, opts.precision]
    return Path("engines") / f"{short_name(opts.model)}-{'-'.join(parts)}"


@dataclasses.dataclass
class BuildContext:
    """One build directory plus what the stages have already computed in this process."""

    build_dir: Path
    options: BuildOptions
    manifest: Manifest
    progress: bool = True
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return self.build_dir.joinpath(*parts)

    def dense(self):
        if "dense" not in self.cache:
            from mpdeploy.models.spec import load_model

            self.cache["dense"] = load_model(self.path("dense"))
        return self.cache["dense"]

    def pruned(self):
        if "pruned" not in self.cache:
            from mpdeploy.models.spec import load_model

            self.cache["pruned"] = load_model(self.path("pruned"))
        return self.cache["pruned"]

    def calibration(self):
        if "calibration" not in self.cache:
            from mpdeploy.data.calibration import read_calibration

            self.cache["calibration"] = read_calibration(self.build_dir)
        return self.cache["calibration"]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest.model["input_shape"])


@dataclasses.dataclass(frozen=True)
class StageOutcome:
    outputs: list[Path]
    headline: dict[str, Any]
    inputs: list[Path] = dataclasses.field(default_factory=list)
    status: str = "done"


# --- stages -----------------------------------------------------------------------------------


def stage_resolve(ctx: BuildContext) -> StageOutcome:
    from mpdeploy.models import create_model, short_name
    from mpdeploy.models.spec import save_model
    from mpdeploy.prune.macs import count_macs

    opts = ctx.options
    overrides = None
    if opts.data_config is not None:
        from mpdeploy.models import read_data_config

        overrides = read_data_config(opts.data_config)
    loaded = create_model(opts.model, opts.weights, opts.num_classes, opts.img_size, overrides)
    save_model(loaded.model, loaded.spec, ctx.path("dense"))
    input_shape = tuple(int(v) for v in loaded.data_config["input_size"])
    macs = count_macs(loaded.model, (1, *input_shape))
    params = sum(p.numel() for p in loaded.model.parameters())
    ctx.manifest.payload["model"] = {
        "requested": opts.model,
        "alias": short_name(opts.model),
        "timm_name": loaded.spec.timm_name,
        "num_classes": loaded.spec.num_classes,
        "img_size": loaded.spec.img_size,
        "input_shape": list(input_shape),
        "weights": loaded.weights_source,
        "data_config": loaded.data_config,  # the effective one: every stage preprocesses by it
        "data_config_overrides": overrides,  # from --data-config (None: timm's own)
        "class_names": loaded.spec.class_names,
    }
    ctx.cache["dense"] = (loaded.model, loaded.spec)
    ctx.cache["dense_macs"] = macs.total_macs
    return StageOutcome(
        outputs=[ctx.path("dense", "model.json"), ctx.path("dense", "model.safetensors")],
        headline={"dense_macs": macs.total_macs, "dense_params": params},
    )


def stage_calibrate(ctx: BuildContext) -> StageOutcome:
    from mpdeploy.data.calibration import load_calibration, save_calibration

    opts = ctx.options
    calib = load_calibration(
        opts.calib,
        opts.calib_size,
        ctx.manifest.model["data_config"],
        seed=opts.seed,
        model_name=ctx.manifest.model["timm_name"],
    )
    if opts.calib_refine:
        calib = _refined_calibration(ctx, calib)
    ctx.cache["calibration"] = calib
    outputs = save_calibration(calib, ctx.build_dir)
    return StageOutcome(
        outputs=outputs,
        headline={"calibration_images": len(calib), "calibration_skipped": calib.skipped},
    )


def _require_batchnorm(name: str) -> None:
    """`--calib-refine` needs BatchNorm layers to match: one line if the model has none. An
    architecture the meta device cannot build is refused by `refine_calibration` itself."""
    from mpdeploy.data.refine import matched_norms
    from mpdeploy.models import meta_model, resolve_model_name

    model = meta_model(resolve_model_name(name))
    if model is not None and not matched_norms(model):
        raise UserError(
            f"--calib-refine matches BatchNorm running statistics and {name} has no "
            "BatchNorm2d layer (ViTs and ConvNeXts have none); drop the option"
        )


def _refined_calibration(ctx: BuildContext, calib):
    """The calibration images after `--calib-refine` steps towards the BatchNorm statistics."""
    from tqdm.auto import tqdm

    from mpdeploy.data.calibration import images_sha256
    from mpdeploy.data.refine import DEFAULT_BATCH, refine_calibration

    steps = ctx.options.calib_refine
    total = steps * -(-len(calib) // DEFAULT_BATCH)
    with tqdm(
        total=total,
        desc="calib-refine",
        unit="step",
        leave=False,
        disable=None if ctx.progress else True,
    ) as bar:
        images, record = refine_calibration(
            ctx.dense()[0], calib.images, steps, progress=bar.update
        )
    log.info(
        "calibration refined towards %d BatchNorm layers' statistics: mismatch %.3f -> %.3f",
        record.norms,
        record.loss_before,
        record.loss_after,
    )
    return dataclasses.replace(
        calib, images=images, sha256=images_sha256(images), refined=record.record()
    )


def stage_analyze(ctx: BuildContext) -> StageOutcome:
    from mpdeploy.spectrum import analyze_model, write_spectrum

    model, _ = ctx.dense()
    report = analyze_model(model, sparsity=max(ctx.options.target_macs, 0.0))
    ctx.cache["spectrum"] = report
    json_path, png_path = write_spectrum(
        report, ctx.build_dir, highlight_layer=ctx.options.spectrum_layer
    )
    return StageOutcome(
        outputs=[json_path, png_path],
        inputs=[ctx.path("dense", "model.safetensors")],
        headline=spectrum_headline(report),
    )


def spectrum_headline(report) -> dict[str, Any]:
    fits = [layer.fit for layer in report.layers]
    worst = max(report.layers, key=lambda layer: layer.fit.fit_error)
    return {
        "spectrum_layers": len(fits),
        "spectrum_spikes": sum(f.spike_count for f in fits),
        "spectrum_mean_bulk_fraction": sum(f.bulk_fraction for f in fits) / len(fits),
        "spectrum_worst_fit": {"layer": worst.name, "fit_error": worst.fit.fit_error},
    }


def stage_prune(ctx: BuildContext) -> StageOutcome:
    from mpdeploy.models.spec import save_model

    opts = ctx.options
    model, spec = ctx.dense()
    dense_macs = ctx.cache.get("dense_macs") or ctx.manifest.payload["headline"]["dense_macs"]
    # Token merging goes in first: pruning scores and cuts the graph that will be deployed.
    model, spec, tome = with_token_merging(model, spec, opts, ctx.input_shape, dense_macs)
    figures = [] if tome is None else [write_tome_figure(ctx, tome)]
    if opts.target_macs <= 0:
        import copy

        pruned, pruned_spec = copy.deepcopy(model), spec
        save_model(pruned, pruned_spec, ctx.path("pruned"))
        ctx.cache["pruned"] = (pruned, pruned_spec)
        outputs = [ctx.path("pruned", "model.json"), ctx.path("pruned", "model.safetensors")]
        if tome is None:
            return StageOutcome(
                outputs=outputs,
                headline={"pruned_macs": dense_macs, "mac_reduction": 0.0},
                status="skipped (target 0: the dense model is deployed as it is)",
            )
        write_json(ctx.path("plan.json"), {"target_macs": 0.0, "tome": tome})
        return StageOutcome(
            outputs=[ctx.path("plan.json"), *outputs, *figures],
            headline={
                "pruned_macs": tome["macs"],
                "mac_reduction": tome["mac_reduction"],
                **tome_headline(tome),
            },
            status="done",
        )
    from mpdeploy.prune import PruneConfig, prune_model
    from mpdeploy.spectrum import load_spectrum

    spectrum = ctx.cache.get("spectrum") or load_spectrum(ctx.path("spectrum.json"))
    result = prune_model(
        model,
        ctx.calibration().images,
        spectrum,
        PruneConfig(
            target_macs=opts.target_macs,
            method=opts.method,
            round_to=opts.round_to,
            seed=opts.seed,
            compensate=opts.compensate,
            compensate_inputs=opts.compensate_inputs,
        ),
        spec=spec,
        input_shape=ctx.input_shape,
        groups=ctx.calibration().groups(),
    )
    headline = dict(result.headline)
    if tome is not None:  # the planner's figures are relative to the merging model; ours to dense
        result.plan["tome"] = tome
        headline["dense_macs"] = dense_macs
        headline["mac_reduction"] = 1.0 - headline["pruned_macs"] / dense_macs
        headline.update(tome_headline(tome))
    save_model(result.model, result.spec, ctx.path("pruned"))
    write_json(ctx.path("plan.json"), result.plan)
    ctx.cache["pruned"] = (result.model, result.spec)
    return StageOutcome(
        outputs=[
            ctx.path("plan.json"),
            ctx.path("pruned", "model.json"),
            ctx.path("pruned", "model.safetensors"),
            *figures,
        ],
        inputs=[ctx.path("dense", "model.safetensors"), ctx.path("spectrum.json")],
        headline=headline,
    )


def with_token_merging(model, spec, opts: BuildOptions, input_shape, dense_macs: int):
    """(model, spec, record) with `--tome` applied to a copy; the inputs and None when it is off.

    The record (plan.json's "tome") holds the settings, the token counts per block and the MACs
    of the merging model, counted on a real forward, against the dense model's.
    """
    settings = tome_settings(opts)
    if settings is None:
        return model, spec, None
    import copy

    from mpdeploy.families.tome import apply_tome
    from mpdeploy.prune.macs import count_macs

    model = copy.deepcopy(model)
    record = apply_tome(model, settings).to_dict()
    macs = count_macs(model, (1, *input_shape)).total_macs
    record.update(macs=macs, dense_macs=dense_macs, mac_reduction=1.0 - macs / dense_macs)
    return model, spec.with_tome(settings), record


def write_tome_figure(ctx: BuildContext, tome: dict[str, Any]) -> Path:
    """tome.png. With labelled images (the demo's held-out digits, a labelled --train folder) it
    adds top-1 of the dense model merging at several r, also kept in plan.json's "tome"."""
    from mpdeploy.families.tome import ToMeSettings, largest_r
    from mpdeploy.tome_plot import (
        TOME_PNG,
        labelled_sweep_set,
        sweep_image_count,
        sweep_values,
        top1_by_r,
        write_tome_png,
    )

    dense = ctx.dense()[0]
    settings = ToMeSettings(tome["r"], tome["schedule"], tome["proportional"])
    values = sweep_values(largest_r(dense, settings.schedule), settings.r)
    model = ctx.manifest.model
    data = labelled_sweep_set(
        model["timm_name"],
        ctx.options.train,
        model["data_config"],
        ctx.options.seed,
        max_images=sweep_image_count(tome["dense_macs"], len(values)),
    )
    if data is not None:
        images, labels, what = data
        scores = top1_by_r(dense, settings, images, labels, values)
        tome["top1_sweep"] = {"images": what, "top1_by_r": scores}
    return write_tome_png(ctx.path(TOME_PNG), tome, tome.get("top1_sweep"))


def tome_headline(tome: dict[str, Any]) -> dict[str, Any]:
    return {
        "tome_r": tome["r"],
        "tome_schedule": tome["schedule"],
        "tome_proportional": tome["proportional"],
        "tome_tokens_after_last_block": tome["tokens_after_last_block"],
        "tome_macs": tome["macs"],
        "tome_mac_reduction": tome["mac_reduction"],
    }


def stage_sparsify(ctx: BuildContext) -> StageOutcome:
    pattern = parse_sparsity(ctx.options.sparsity)
    if pattern is None:
        return StageOutcome(outputs=[], headline={}, status="skipped (--sparsity off)")
    from mpdeploy.models.spec import save_model
    from mpdeploy.prune.nm import SparsityConfig, sparsify

    model, spec = ctx.pruned()
    narrow = narrow_calibration_warning(
        ctx.options.sparsity_method, ctx.calibration(), ctx.options.calib_size
    )
    if narrow:
        log.warning(narrow)
    result = sparsify(
        model,
        ctx.calibration().images,
        SparsityConfig(
            k=pattern[0],
            n=pattern[1],
            method=ctx.options.sparsity_method,
            seed=ctx.options.seed,
            compensate=ctx.options.compensate,
            compensate_inputs=ctx.options.compensate_inputs,
            dense_layers=tuple(ctx.options.sparsity_dense),
        ),
        input_shape=ctx.input_shape,
        reference_macs=ctx.manifest.payload["headline"]["dense_macs"] if spec.tome else None,
        groups=ctx.calibration().groups(),
    )
    headline = dict(result.headline)
    if spec.tome and not spec.widths:  # the paper's accounting knows no pruned widths
        accounting = tome_mac_accounting(ctx.dense()[0], spec.tome, pattern)
        accounting["exported_graph_mac_reduction"] = headline.get("total_mac_reduction")
        result.report["token_merging"] = accounting
        headline["paper_accounting_mac_reduction"] = accounting["paper_accounting_mac_reduction"]
        headline["mac_accounting_note"] = accounting["difference"]
    save_model(result.model, spec, ctx.path("pruned"))
    result.save(ctx.build_dir)
    ctx.cache["pruned"] = (result.model, spec)
    return StageOutcome(
        outputs=[ctx.path("sparsity.json"), ctx.path("pruned", "model.safetensors")],
        headline=headline,
    )


TOME_ACCOUNTING_DIFFERENCE = (
    "the paper's accounting counts every block at the tokens entering it, while the exported graph "
    "merges between attention and MLP (as the paper describes), so each block's MLP runs on the "
    "r_l fewer tokens left after that block's merge"
)


def tome_mac_accounting(dense, tome: dict[str, Any], pattern: tuple[int, int]) -> dict[str, Any]:
    """N:M + ToMe sparse-execution MAC reduction in the MP paper's accounting
    (docs/tome.md), and the
    analytic count of the graph mpdeploy exports, for `dense` (a meta-device model is enough).

    The paper's figure (59.81 % for ViT-B/16, 2:4, r = 8) counts each whole block l at the N_l
    tokens entering it; the exported graph merges after attention, so it executes fewer MACs.
    """
    from mpdeploy.families.tome import ToMeSettings, describe
    from mpdeploy.prune.macs import mac_reduction, vit_tome_macs

    record = describe(dense, ToMeSettings.from_dict(tome))
    shape = dict(
        depth=len(dense.blocks),
        dim=dense.embed_dim,
        tokens=record.patch_tokens + record.prefix_tokens,
        mlp_ratio=dense.blocks[0].mlp.fc1.out_features / dense.embed_dim,
        prefix_tokens=record.prefix_tokens,
        patch_size=dense.patch_embed.patch_size[0],
        num_classes=dense.num_classes,
        head_dim=dense.blocks[0].attn.head_dim,
    )
    base = vit_tome_macs(**shape).total
    keep, merges = pattern[0] / pattern[1], record.merges_per_block
    paper = vit_tome_macs(**shape, merges=merges, keep_fraction=keep).total
    graph = vit_tome_macs(**shape, merges=merges, keep_fraction=keep, merge_after_attention=True)
    return {
        **record.to_dict(),
        "paper_accounting": "MP paper: whole block l at the N_l tokens entering it, "
        "block Linears at k/n, attention matmuls, patch embedding and head dense",
        "paper_accounting_mac_reduction": mac_reduction(base, paper),
        "exported_graph": "counted on a real forward of the exported graph (total_mac_reduction): "
        "block l's qkv, proj and attention on N_l tokens, its MLP on N_l − r_l",
        "exported_graph_analytic_mac_reduction": mac_reduction(base, graph.total),
        "difference": TOME_ACCOUNTING_DIFFERENCE,
    }


def narrow_calibration_warning(method: str, calib, calib_size: int) -> str | None:
    """A warning when a data-aware N:M choice (every method but `magnitude`) is fitted to crops of
    only a few photos (`--calib builtin`, or a folder with fewer images than --calib-size).

    Measured on efficientnet-lite0's real ImageNet weights with 128 crops of 14 photos, 2:4 +
    `lsq+bn`: held-out agreement with dense magnitude 35.4 %, obs 30.2 %, cast 7.3 % (val), while
    all three fit the calibration crops alike: the data-aware choices overfit the photos
    (docs/sparsity.md, "efficientnet-lite0, 2:4"). `obs_shrink` (the default) leans on the
    weights by as much as the photos disagree and did better than magnitude there (test 49.0
    against 45.8 %, docs/sparsity.md, "`obs_shrink`"), so the other methods are pointed to it."""
    if method == "magnitude":
        return None
    from mpdeploy.data.calibration import calibration_photo_paths

    photos = calibration_photo_paths(calib, calib_size)  # counted, not decoded
    if not photos:
        return None
    way_out = (
        "obs_shrink already leans on the weights where the photos disagree, but a few photos "
        "stay a narrow sample"
        if method == "obs_shrink"
        else "--sparsity-method obs_shrink (the default) leans on the weights where the photos "
        "disagree, or use --sparsity-method magnitude"
    )
    return (
        f"--sparsity-method {method} chooses the kept weights of each N:M group from the "
        f"calibration statistics, and these are crops of only {len(photos)} photos: on real "
        "ImageNet weights such a choice overfits them (docs/sparsity.md, efficientnet-lite0); "
        f"pass --calib DIR with a few hundred of your own images ({way_out})"
    )


def label_free_train_set(calib, calib_size: int, data_config: dict[str, Any], seed: int):
    """What `--recover-epochs` without `--train` distils on, and its description: fresh random
    crops of the calibration photos every epoch (as many per epoch as the calibration set holds)
    when the set was cut from a few photos (`--calib builtin`, or a folder with fewer images than
    --calib-size), else the calibration images themselves. A fixed set of crops of a few photos
    is memorised: efficientnet-lite0 2:4 kept 11.5 % agreement after an epoch on 128 fixed crops
    (docs/sparsity.md, "efficientnet-lite0, 2:4")."""
    from mpdeploy.data.calibration import PhotoCropStream, calibration_photos

    photos = calibration_photos(calib, calib_size)
    if not photos:
        return calib.images, f"the {len(calib)} calibration images only"
    stream = PhotoCropStream(photos, data_config, len(calib), seed, calib.origin)
    return (
        stream,
        f"fresh random crops ({len(calib)} per epoch) of the {len(photos)} calibration photos",
    )


def stage_recover(ctx: BuildContext) -> StageOutcome:
    opts = ctx.options
    if opts.recover_epochs <= 0:
        return StageOutcome(outputs=[], headline={}, status="skipped (--recover-epochs 0)")
    from mpdeploy.models.spec import save_model
    from mpdeploy.prune.recover import RecoverConfig, recover

    teacher, _ = ctx.dense()
    student, spec = ctx.pruned()
    sparsity = parse_sparsity(opts.sparsity)
    masks = None
    if sparsity:  # N:M masks must survive fine-tuning: re-applied after every optimiser step
        from mpdeploy.prune.nm import load_masks

        masks = load_masks(ctx.build_dir)
    train = opts.train
    if train is None:  # label-free: distil on the calibration images themselves
        train, what = label_free_train_set(
            ctx.calibration(), opts.calib_size, ctx.manifest.model["data_config"], opts.seed
        )
        log.warning(
            "--recover-epochs without --train: distilling on %s "
            "(pass --train DIR, labelled or not, for more)",
            what,
        )
    result = recover(
        student,
        teacher,
        train,
        ctx.manifest.model["data_config"],
        RecoverConfig(epochs=opts.recover_epochs, seed=opts.seed),
        sparsity=sparsity,
        masks=masks,
    )
    save_model(result.model, spec, ctx.path("pruned"))
    write_json(ctx.path("recover.json"), result.record)
    ctx.cache["pruned"] = (result.model, spec)
    return StageOutcome(
        outputs=[ctx.path("recover.json"), ctx.path("pruned", "model.safetensors")],
        headline=result.headline,
    )


def stage_export(ctx: BuildContext) -> StageOutcome:
    from mpdeploy.export import export_onnx

    model, _ = ctx.pruned()
    record = export_onnx(
        model, ctx.path("model.onnx"), ctx.input_shape, exporter=ctx.options.exporter
    )
    outputs = [ctx.path("model.onnx"), ctx.path("model.onnx.data")]
    headline: dict[str, Any] = {"exporter": record.exporter, "onnx_bytes": record.size_bytes}
    if ctx.options.precision == "fp16":
        from mpdeploy.export.fp16 import convert_fp16

        convert_fp16(ctx.path("model.onnx"), ctx.path("model.fp16.onnx"))
        outputs.append(ctx.path("model.fp16.onnx"))
    if parse_sparsity(ctx.options.sparsity):
        from mpdeploy.prune.nm import confirm_with_polygraphy

        headline.update(confirm_with_polygraphy(ctx.path("model.onnx"), ctx.build_dir))
        outputs.append(ctx.path("sparsity.json"))
    write_json(ctx.path("export.json"), dataclasses.asdict(record))
    return StageOutcome(
        outputs=outputs, headline=headline, inputs=[ctx.path("pruned", "model.safetensors")]
    )


def engine_options(opts: BuildOptions) -> Any:
    from mpdeploy.backends import EngineOptions

    return EngineOptions(
        precision=opts.precision,
        max_batch=opts.max_batch,
        sparsity=opts.sparsity if opts.sparsity != "off" else None,
        device=opts.device,
        provider=opts.ort_provider,
    )


def stage_engine(ctx: BuildContext) -> StageOutcome:
    from mpdeploy.backends import get_backend

    backend = get_backend(ctx.options.backend)
    options = engine_options(ctx.options)
    onnx_name = backend.source_onnx(options)
    record = backend.build(ctx.path(onnx_name), ctx.build_dir, options)
    ctx.cache["engine"] = record
    headline = {
        "backend": record.backend,
        "precision": record.precision,
        "engine_bytes": record.size_bytes,
        "engine_build_seconds": record.build_seconds,
    }
    headline.update(record.details.get("headline", {}))
    return StageOutcome(
        outputs=[ctx.path("engine", "engine.json"), ctx.path(record.artifact)],
        inputs=[ctx.path(onnx_name)],
        headline=headline,
    )


def stage_verify(ctx: BuildContext) -> StageOutcome:
    from mpdeploy.backends import get_backend, read_engine_record
    from mpdeploy.verify.parity import require_pass, verify_engine

    record = ctx.cache.get("engine") or read_engine_record(ctx.build_dir)
    backend = get_backend(record.backend)
    model, spec = ctx.pruned()
    report = verify_engine(
        model,
        backend.runner(record, ctx.build_dir),
        ctx.calibration().images,
        ctx.build_dir,
        backend=record.backend,
        precision=record.precision,
        artifact=record.artifact,
        batch_size=min(16, record.max_batch),
        tolerances=backend.parity_tolerances(record.precision),
        recheck_command=backend.recheck_command(
            record, backend.parity_tolerances(record.precision)
        ),
        merge_flips=merge_flips_check(model, ctx.path(record.artifact)) if spec.tome else None,
    )
    headline = {
        "parity": report.verdict,
        "parity_max_abs_error": max(s["max_abs"] for s in report.outputs.values()),
        "parity_top1_agreement": report.top1_agreement,
        "parity_certified_fraction": report.certificate["certified_fraction"],
    }
    if report.merge_decisions:
        headline["parity_inputs_with_changed_merges"] = report.merge_decisions[
            "inputs_with_changed_merges"
        ]
        headline["parity_changed_merges_within_tolerance"] = report.merge_decisions[
            "elementwise_passed_on_all"
        ]
    ctx.cache["failed_headline"] = headline
    outputs = [
        ctx.path("parity", n)
        for n in ("inputs.json", "reference.json", "results.json", "report.json")
    ]
    require_pass(report)
    return StageOutcome(outputs=outputs, headline=headline, inputs=[ctx.path(record.artifact)])


def merge_flips_check(model, artifact: Path):
    """For a token-merging model: per parity input, did the engine merge other tokens than torch?

    The engine's choices are read from a verification-only copy of the ONNX artifact whose
    decision tensors are outputs, run by ONNX Runtime on the CPU; a TensorRT plan has no such
    copy, so its parity stays the plain elementwise check.
    """
    if artifact.suffix != ".onnx":
        return None
    import numpy as np
    import torch

    from mpdeploy.export.onnx import INPUT_NAME
    from mpdeploy.families.tome import (
        decision_flips,
        onnx_merge_decisions,
        tome_record,
        torch_merge_decisions,
    )

    merges = tome_record(model).merges_per_block

    def flips(feeds):
        images = torch.from_numpy(np.concatenate([feed[INPUT_NAME] for feed in feeds]))
        batch = feeds[0][INPUT_NAME].shape[0]
        return decision_flips(
            torch_merge_decisions(model, images, batch),
            onnx_merge_decisions(artifact, feeds, merges),
        )

    return flips


def stage_bench(ctx: BuildContext) -> StageOutcome:
    from mpdeploy.backends import read_engine_record
    from mpdeploy.verify.bench import BenchOptions, bench_build

    record = ctx.cache.get("engine") or read_engine_record(ctx.build_dir)
    opts = ctx.options
    report = bench_build(
        ctx.build_dir,
        dense_model=ctx.dense()[0],
        engine=record,
        options=BenchOptions(
            batches=opts.bench_batches,
            iterations=opts.bench_iterations,
            budget_seconds=opts.bench_budget,
            max_batch=opts.max_batch,
            exporter=opts.exporter,
            same_model=opts.target_macs <= 0 and parse_sparsity(opts.sparsity) is None,
            progress=ctx.progress,
        ),
        engine_options=engine_options(opts),
    )
    return StageOutcome(
        outputs=[ctx.path("bench.json"), ctx.path("bench.png")],
        inputs=[ctx.path(record.artifact)],
        headline=report.headline,
    )


def stage_package(ctx: BuildContext) -> StageOutcome:
    from mpdeploy.serving import publish

    published = publish(ctx.build_dir, ctx.path("model_repository"), name=ctx.options.model_name)
    files = [
        published.config_path,
        *sorted(p for p in published.version_dir.rglob("*") if p.is_file()),
    ]
    return StageOutcome(
        outputs=files,
        headline={"triton_model": published.name, "triton_version": published.version},
    )


STAGE_FUNCTIONS: dict[str, Callable[[BuildContext], StageOutcome]] = {
    "resolve": stage_resolve,
    "calibrate": stage_calibrate,
    "analyze": stage_analyze,
    "prune": stage_prune,
    "sparsify": stage_sparsify,
    "recover": stage_recover,
    "export": stage_export,
    "engine": stage_engine,
    "verify": stage_verify,
    "bench": stage_bench,
    "package": stage_package,
}


def run_stage(ctx: BuildContext, name: str) -> StageOutcome:
    start = time.perf_counter()
    ctx.cache.pop("failed_headline", None)
    try:
        outcome = STAGE_FUNCTIONS[name](ctx)
        raise_if_terminated()  # a signal whose exception third-party code swallowed in the stage
    except UserError:
        ctx.manifest.record_stage(
            name,
            status="failed",
            seconds=time.perf_counter() - start,
            headline=ctx.cache.pop("failed_headline", None),
        )
        raise
    ctx.manifest.record_stage(
        name,
        status=outcome.status,
        seconds=time.perf_counter() - start,
        inputs=outcome.inputs,
        outputs=outcome.outputs,
        headline=outcome.headline,
    )
    return outcome


# --- orchestration ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BuildResult:
    build_dir: Path
    manifest: dict[str, Any]
    published: str | None = None

    @property
    def headline(self) -> dict[str, Any]:
        return self.manifest["headline"]


def build(
    opts: BuildOptions, *, progress: bool = True, stages: tuple[str, ...] = STAGES
) -> BuildResult:
    """Run every stage into a temporary directory; rename it to the build directory on success.

    A parity failure keeps the evidence in `<out>.failed/`; any other error leaves nothing behind.
    """
    validate_options(opts)
    if opts.target_macs > 0 and "prune" in stages:
        from mpdeploy.models import require_prunable

        require_prunable(opts.model)  # an unsupported architecture: one line, before any work
    if opts.calib_refine and "calibrate" in stages:
        _require_batchnorm(opts.model)  # before any work
    out = Path(opts.out) if opts.out else default_out_dir(opts)
    if out.exists() and not opts.force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    _require_writable(out.parent)
    if opts.triton_repo:
        _require_writable_repo(Path(opts.triton_repo), opts)

    with exclusive(build_lock_path(out), f"build directory {out}"):
        remove_stale_debris(out.parent, out.name)
        if out.exists() and not opts.force:  # finished by another process since the check above
            raise UserError(f"{out} already exists; pass --force to replace it")
        with atomic_dir(out, replace=opts.force) as tmp:
            ctx = BuildContext(tmp, opts, Manifest.create(tmp, opts.to_dict()), progress=progress)
            _run_all(ctx, stages)
            manifest = ctx.manifest.payload
        final_manifest = Manifest(out, manifest)
        published = None
        if opts.triton_repo:
            from mpdeploy.serving import publish

            result = publish(out, Path(opts.triton_repo), name=opts.model_name)
            published = f"{result.name}/{result.version}"
            final_manifest.payload["headline"]["published"] = str(
                Path(opts.triton_repo) / published
            )
            final_manifest.save()
    return BuildResult(out, final_manifest.payload, published)


def _run_all(ctx: BuildContext, stages: tuple[str, ...]) -> None:
    from tqdm.auto import tqdm

    # disable=None: tqdm draws only on a terminal, so logs and captured stderr stay clean.
    with tqdm(
        stages,
        desc="mpdeploy build",
        unit="stage",
        disable=None if ctx.progress else True,
        leave=False,
    ) as bar:
        for name in bar:
            bar.set_postfix_str(name)
            try:
                run_stage(ctx, name)
            except ParityError as exc:
                failed = ctx.build_dir.parent / f"{_final_name(ctx)}.failed"
                shutil.rmtree(failed, ignore_errors=True)
                shutil.copytree(ctx.build_dir, failed)
                raise ParityError(f"{exc} (evidence kept in {failed})") from None


def _final_name(ctx: BuildContext) -> str:
    return Path(ctx.options.out).name if ctx.options.out else default_out_dir(ctx.options).name


def run_stages_on(
    build_dir: Path,
    names: list[str],
    overrides: dict[str, Any] | None = None,
    *,
    progress: bool = True,
) -> Manifest:
    """Re-run stages on an existing build directory (the one-stage CLI commands).

    The options are checked before anything is written; the manifest's options change only
    when every stage ran through (a failed stage is recorded as failed, under the old options).
    """
    manifest = Manifest.load(build_dir)
    previous = manifest.options
    try:
        options = stage_options(previous, overrides or {})
    except TypeError as exc:
        raise UserError(
            f"{build_dir}/manifest.json: options do not fit this mpdeploy ({exc})"
        ) from None
    validate_stage_options(options, overrides or {})
    build_dir = Path(build_dir)
    with exclusive(build_lock_path(build_dir), f"build directory {build_dir}"):
        manifest = Manifest.load(build_dir)  # as it is now that no one else writes it
        for folder in (build_dir, *(p for p in build_dir.iterdir() if p.is_dir())):
            remove_stale_debris(folder)
        manifest.payload["options"] = options.to_dict()
        ctx = BuildContext(build_dir, options, manifest, progress=progress)
        try:
            for name in names:
                run_stage(ctx, name)
        except BaseException:
            manifest.payload["options"] = previous
            if (build_dir / "manifest.json").is_file():
                manifest.save()
            raise
    return manifest


def _require_writable(directory: Path) -> None:
    probe = directory
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise UserError(f"cannot write to {directory}")


def _require_writable_repo(repo: Path, opts: BuildOptions) -> None:
    """The target repository is checked before the first stage, not after the whole build."""
    if repo.exists() and not repo.is_dir():
        raise UserError(f"--triton-repo {repo} is a file, not a directory")
    _require_writable(repo)
    from mpdeploy.models import short_name
    from mpdeploy.serving.config import read_config

    name = opts.model_name or short_name(opts.model)
    config = repo / name / "config.pbtxt"
    if config.is_file():
        read_config(config)  # a malformed config is a UserError naming the file
    elif (repo / name).exists():
        raise UserError(
            f"{repo / name}: exists without a config.pbtxt; remove it or publish under another "
            "--name"
        )

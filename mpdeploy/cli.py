"""The `mpdeploy` command: parse options, call the library, print. No logic lives here."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from mpdeploy.errors import UserError

log = logging.getLogger("mpdeploy")


# --- shared option groups ---------------------------------------------------------------------


def model_options(fn):
    fn = click.option(
        "--img-size",
        type=int,
        default=None,
        help="Input size, for any model that runs at it (CNNs as they are, ViTs with a resized "
        "position embedding); inferred from a checkpoint's position embedding.",
    )(fn)
    fn = click.option(
        "--data-config",
        default=None,
        help="JSON file of timm preprocessing keys (input_size, interpolation, crop_pct, "
        "crop_mode, mean, std) overriding timm's; used for calibration, recovery, eval, parity.",
    )(fn)
    fn = click.option(
        "--num-classes",
        type=int,
        default=None,
        help="Classifier width; inferred from the checkpoint's head.",
    )(fn)
    fn = click.option(
        "--weights",
        default="hub",
        show_default=True,
        help="'hub' (timm pretrained), a .safetensors/.pth/.pt/.bin file, or 'none'.",
    )(fn)
    return fn


def calib_options(fn):
    fn = click.option(
        "--calib-refine",
        type=int,
        default=0,
        show_default=True,
        metavar="STEPS",
        help="BatchNorm networks: move the calibration pixels for STEPS Adam steps (per batch of "
        "32) towards the model's BatchNorm running statistics. Helped 2:4 and hurt 30 % "
        "structured pruning of efficientnet-lite0 on the builtin photos (docs/pruning.md); "
        "~5 s per step per 32 images at 224 px on 2 cores; try 40. 0 = off.",
    )(fn)
    fn = click.option(
        "--calib-size",
        type=int,
        default=256,
        show_default=True,
        help="Number of calibration images (seeded choice).",
    )(fn)
    fn = click.option(
        "--calib",
        default="builtin",
        show_default=True,
        help="Folder of images (searched recursively) or 'builtin'.",
    )(fn)
    return fn


def build_dir_option(fn):
    return click.option(
        "--build",
        "build_dir",
        required=True,
        type=click.Path(path_type=Path),
        help="An mpdeploy build directory.",
    )(fn)


def force_option(fn):
    return click.option("--force", is_flag=True, help="Replace existing outputs.")(fn)


def prune_options(fn):
    from mpdeploy.pipeline import COMPENSATE_INPUTS, METHODS, BuildOptions

    fn = click.option(
        "--round-to",
        type=int,
        default=8,
        show_default=True,
        help="Kept widths are rounded to multiples of this.",
    )(fn)
    fn = click.option(
        "--compensate",
        default="lsq+bn",
        show_default=True,
        help="Closed-form re-fit after pruning: none, bias, lsq, bn, bias+bn, lsq+bn.",
    )(fn)
    fn = click.option(
        "--compensate-inputs",
        type=click.Choice(list(COMPENSATE_INPUTS)),
        default=BuildOptions.compensate_inputs,
        show_default=True,
        help="Where the lsq re-fit reads each layer's inputs: the dense network's (one pass), or "
        "'sequential': the network whose earlier layers are already cut and re-fitted, so each "
        "fit also corrects what they left (one partial pass per layer: slow on big models).",
    )(fn)
    fn = click.option(
        "--method",
        type=click.Choice(list(METHODS)),
        default=BuildOptions.method,
        show_default=True,
        help="Pruning criterion.",
    )(fn)
    fn = click.option(
        "--target-macs",
        type=float,
        default=0.0,
        show_default=True,
        help="Fraction of MACs to remove (0 = deploy as is, 0.5 = half).",
    )(fn)
    return fn


def engine_options(fn):
    fn = click.option(
        "--max-batch",
        type=int,
        default=64,
        show_default=True,
        help="Largest batch the engine (and Triton) accepts.",
    )(fn)
    from mpdeploy.backends import all_devices, all_precisions, backend_names

    fn = click.option(
        "--ort-provider",
        type=click.Choice(["cuda", "tensorrt"]),
        default=None,
        help="ONNX Runtime on --device cuda: its CUDA (default) or TensorRT execution provider.",
    )(fn)
    fn = click.option(
        "--device",
        type=click.Choice(all_devices()),
        default="cpu",
        show_default=True,
        help="Where the engine runs (tensorrt: always cuda).",
    )(fn)
    fn = click.option(
        "--precision",
        type=click.Choice(all_precisions()),
        default="fp32",
        show_default=True,
        help="Each backend accepts its own subset (openvino: fp32, bf16).",
    )(fn)
    fn = click.option(
        "--backend",
        type=click.Choice(backend_names()),
        default="onnxruntime",
        show_default=True,
    )(fn)
    return fn


def sparsity_option(fn):
    from mpdeploy.pipeline import BuildOptions

    fn = click.option(
        "--sparsity-method",
        default=BuildOptions.sparsity_method,
        show_default=True,
        help="How N:M picks the kept weights: obs, obs_fisher, obs_shrink, cast, cast_fisher, "
        "magnitude.",
    )(fn)
    fn = click.option(
        "--sparsity-dense",
        "sparsity_dense",
        multiple=True,
        metavar="PATTERN",
        help="Leave the layers whose module name matches this shell-style pattern dense "
        "(repeatable), e.g. 'blocks.0.*'.",
    )(fn)
    return click.option(
        "--sparsity",
        default="off",
        show_default=True,
        help="N:M pattern: off, 2:4 (TensorRT-native), 4:8, 6:12, 8:16, 12:16.",
    )(fn)


def tome_options(fn):
    fn = click.option(
        "--tome-proportional",
        type=click.Choice(["on", "off"]),
        default="on",
        show_default=True,
        help="Proportional attention: add log(token size) to the attention logits.",
    )(fn)
    fn = click.option(
        "--tome-schedule",
        default="constant",
        show_default=True,
        help="Merges per block: constant (r in every block) or decreasing (2r falling to 0).",
    )(fn)
    fn = click.option(
        "--tome",
        type=int,
        default=0,
        show_default=True,
        help="Token merging (ViTs): merge r tokens in every block, after attention (0 = off).",
    )(fn)
    return fn


def recover_options(fn):
    fn = click.option(
        "--train",
        default=None,
        help="Images for recovery distillation: a labelled folder (one sub-folder per class; "
        "'demo' = digits) or unlabelled images (KL to the dense model only).",
    )(fn)
    fn = click.option(
        "--recover-epochs",
        type=int,
        default=0,
        show_default=True,
        help="Epochs of frozen-architecture distillation from the dense model.",
    )(fn)
    return fn


# --- commands ---------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mpdeploy")
@click.option("-v", "--verbose", is_flag=True, help="Show debug logging.")
def cli(verbose: bool):
    """Prune timm vision models with Marchenko–Pastur criteria and deploy them with proof."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="mpdeploy: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


@cli.command()
@click.option(
    "--model",
    default="demo",
    show_default=True,
    help="Alias (vit_b16, vit_l16, convnextv2_base, resnet50, resnet152d, demo) or timm name.",
)
@model_options
@prune_options
@sparsity_option
@tome_options
@engine_options
@calib_options
@recover_options
@click.option("--out", default=None, help="Build directory [default: engines/<model>-<tag>/].")
@click.option("--triton-repo", default=None, help="Also publish into this Triton model repository.")
@click.option("--name", "model_name", default=None, help="Triton model name.")
@click.option(
    "--bench-batch",
    "bench_batches",
    type=int,
    multiple=True,
    help="Batch sizes to benchmark (repeatable) [default: 1 8 32 64 up to --max-batch].",
)
@click.option(
    "--bench-iterations",
    type=int,
    default=None,
    help="A fixed number of interleaved pairs per batch size [default: time-budgeted].",
)
@click.option(
    "--bench-budget",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds of timed runs; each batch size stops once its speedup's 95 % CI is ±3 %.",
)
@click.option(
    "--exporter", type=click.Choice(["auto", "dynamo", "legacy"]), default="auto", show_default=True
)
@click.option("--seed", type=int, default=0, show_default=True)
@force_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
def build(quiet: bool, bench_batches, tome_proportional: str, **kwargs):
    """Build a deployable, parity-checked artifact (the bundled demo model by default)."""
    from mpdeploy.pipeline import BuildOptions
    from mpdeploy.pipeline import build as run_build
    from mpdeploy.report import summary_table

    opts = BuildOptions(
        bench_batches=tuple(bench_batches) or None,
        sparsity_dense=tuple(kwargs.pop("sparsity_dense", ())),
        tome_proportional=tome_proportional == "on",
        **kwargs,
    )
    result = run_build(opts, progress=not quiet)
    click.echo(summary_table(result.manifest, result.build_dir))


@cli.command()
@click.option("--model", default="demo", show_default=True)
@model_options
@click.option(
    "--target-macs",
    type=float,
    default=0.0,
    help="Sparsity at which the layer budget weights are reported.",
)
@click.option("--layer", default=None, help="Layer whose eigenvalue histogram spectrum.png shows.")
@click.option("--out", default=None, help="Output folder [default: engines/<model>-spectrum/].")
@force_option
def spectrum(model, weights, num_classes, img_size, data_config, target_macs, layer, out, force):
    """Marchenko–Pastur analysis only: spectrum.json and spectrum.png."""
    from mpdeploy.models import short_name
    from mpdeploy.pipeline import BuildOptions
    from mpdeploy.pipeline import build as run_build

    out = out or str(Path("engines") / f"{short_name(model)}-spectrum")
    opts = BuildOptions(
        model=model,
        weights=weights,
        num_classes=num_classes,
        img_size=img_size,
        data_config=data_config,
        target_macs=target_macs,
        spectrum_layer=layer,
        out=out,
        force=force,
    )
    result = run_build(opts, progress=False, stages=("resolve", "analyze"))
    head = result.headline
    click.echo(
        f"spectrum of {result.manifest['model']['timm_name']}: "
        f"{head.get('spectrum_layers')} layers → {result.build_dir / 'spectrum.json'}, "
        f"{result.build_dir / 'spectrum.png'}"
    )


def _stage_command(name: str, stages: list[str], extra_options=(), doc: str = ""):
    def command(build_dir: Path, force: bool, **overrides):
        from mpdeploy.manifest import Manifest
        from mpdeploy.pipeline import run_stages_on
        from mpdeploy.report import summary_table

        manifest = Manifest.load(build_dir)
        done = [s for s in stages if (manifest.stage(s) or {}).get("status") == "done"]
        if done and not force:
            raise UserError(
                f"{build_dir} already has the {', '.join(done)} stage; pass --force to redo it"
            )
        overrides = {k: v for k, v in overrides.items() if v is not None}
        result = run_stages_on(build_dir, stages, overrides)
        click.echo(summary_table(result.payload, build_dir))

    command.__doc__ = doc
    command.__name__ = name
    for option in reversed([build_dir_option, force_option, *extra_options]):
        command = option(command)
    return cli.command(name=name)(command)


def _optional(option_name, **kw):
    return click.option(option_name, default=None, **kw)


_stage_command(
    "prune",
    ["prune", "sparsify", "recover"],
    [
        _optional("--target-macs", type=float),
        _optional("--method"),
        _optional("--compensate"),
        _optional("--compensate-inputs"),
        _optional("--sparsity"),
        _optional("--sparsity-method"),
        _optional("--recover-epochs", type=int),
        _optional("--train"),
    ],
    "Prune (and sparsify, recover) the dense model of a build directory.",
)
_stage_command(
    "export",
    ["export"],
    [_optional("--precision")],
    "Export the pruned model of a build directory to ONNX.",
)
_stage_command(
    "engine",
    ["engine"],
    [
        _optional("--backend"),
        _optional("--precision"),
        _optional("--device"),
        _optional("--ort-provider"),
        _optional("--max-batch", type=int),
    ],
    "Build the inference engine of a build directory.",
)
_stage_command("verify", ["verify"], [], "Check the engine against PyTorch with Polygraphy.")
_stage_command(
    "bench",
    ["bench"],
    [_optional("--bench-iterations", type=int), _optional("--bench-budget", type=float)],
    "Benchmark dense vs pruned on the engine's backend.",
)


@cli.command()
@click.option(
    "--build",
    "build_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Build directory to publish (its verify stage must have passed).",
)
@click.option(
    "--triton-repo",
    type=click.Path(path_type=Path),
    default=None,
    help="Triton model repository to publish into.",
)
@click.option("--name", default=None, help="Model name in the repository.")
@click.option(
    "--python-backend",
    is_flag=True,
    help="Publish a Triton python-backend model that runs the artifact with ONNX Runtime or "
    "OpenVINO on the CPU.",
)
@click.option(
    "--check",
    "check_repo",
    type=click.Path(path_type=Path),
    default=None,
    help="Validate an existing repository instead of publishing.",
)
def package(build_dir, triton_repo, name, python_backend, check_repo):
    """Publish a verified build into a Triton model repository, or --check a repository."""
    from mpdeploy import serving

    if check_repo is not None:
        problems = serving.check_repository(check_repo)
        if problems:
            click.echo(serving.format_problems(problems), err=True)
            raise UserError(f"{len(problems)} problem(s) in {check_repo}")
        click.echo(f"{check_repo}: valid")
        return
    if build_dir is None or triton_repo is None:
        raise UserError("package needs --build DIR and --triton-repo DIR (or --check DIR)")
    result = serving.publish(build_dir, triton_repo, name=name, python_backend=python_backend)
    click.echo(f"published {result.name} version {result.version} into {triton_repo}")


@cli.command()
@click.option("--repo", required=True, type=click.Path(path_type=Path))
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option(
    "--strict",
    is_flag=True,
    help="Serve the repository as published: only models this server's own backends load.",
)
def serve(repo, http_port, grpc_port, strict):
    """Serve a model repository with a local Triton server on 127.0.0.1 (Ctrl-C stops it).

    Models whose backend the local server lacks (onnxruntime_onnx, openvino) are served through
    its python backend from a temporary overlay; the repository itself is not changed.
    """
    from mpdeploy.serving import serve as run_server

    run_server(repo, http_port=http_port, grpc_port=grpc_port, strict=strict)


@cli.command(name="eval")
@build_dir_option
@click.option(
    "--data", required=True, help="Labelled image folder (one sub-folder per class) or 'demo'."
)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--limit", type=int, default=None, help="Evaluate at most this many images.")
def evaluate(build_dir, data, batch_size, limit):
    """Top-1/top-5 of the dense model, the pruned model and the engine on labelled images."""
    from mpdeploy.evaluate import evaluate_build, format_eval

    report = evaluate_build(build_dir, data, batch_size=batch_size, limit=limit)
    click.echo(format_eval(report))


@cli.command()
def doctor():
    """What this machine can do: versions, CPU/GPU, CUDA, TensorRT and Triton."""
    from mpdeploy.doctor import diagnose, format_diagnosis

    click.echo(format_diagnosis(diagnose()))


@cli.command()
@click.option("--all", "show_all", is_flag=True, help="List every matching timm name.")
@click.option(
    "--check",
    is_flag=True,
    help="Build each matching architecture on the meta device (no weights) and show refusals.",
)
def families(show_all: bool, check: bool):
    """Registered model families and the timm architectures they accept (docs/coverage.md)."""
    from mpdeploy.families import registered_families
    from mpdeploy.families.coverage import check_architecture, pattern_architectures

    for family in registered_families():
        names = pattern_architectures(family)
        click.echo(f"{family.name}: {', '.join(family.examples)} — {len(names)} timm names")
        verdicts = [check_architecture(name) for name in names] if check else []
        refused = [v for v in verdicts if not v.accepted]
        if check:
            click.echo(f"  checked: {len(names) - len(refused)} accepted, {len(refused)} refused")
        shown = names if show_all else names[:8]
        if shown:
            more = "" if len(shown) == len(names) else f", … (+{len(names) - len(shown)}; --all)"
            click.echo(f"  {', '.join(shown)}{more}")
        for verdict in refused:
            click.echo(f"  refused {verdict.architecture}: {verdict.reason}")


def main(argv: list[str] | None = None) -> int:
    # Busy-waiting OpenMP threads made MP analysis ~8× slower on a shared 2-core machine; a user
    # who wants spinning sets OMP_WAIT_POLICY=ACTIVE. Must happen before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from mpdeploy.errors import DiskError, Terminated, disk_error, noted_termination

    restore = _terminate_like_interrupt()
    try:
        cli.main(args=argv, prog_name="mpdeploy", standalone_mode=False)
    except UserError as exc:
        click.echo(f"mpdeploy: error: {_single_line(str(exc))}", err=True)
        return exc.exit_code
    except Terminated as exc:
        return _terminated(exc.signum)
    except click.exceptions.Abort:
        click.echo("mpdeploy: aborted", err=True)
        return 130
    except click.ClickException as exc:
        click.echo(f"mpdeploy: error: {_single_line(exc.format_message())}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("mpdeploy: interrupted", err=True)
        return 130
    except Exception as exc:
        # a C extension that catches what a call into Python raises turns the handler's
        # Terminated into its own error (matplotlib's Agg renderer: "Invalid bounding box");
        # the signal was noted, and the `finally` blocks have removed the partial output
        signum = noted_termination()
        if signum is not None:
            return _terminated(signum)
        reason = disk_error(exc)
        if reason is None:
            raise
        click.echo(f"mpdeploy: error: {_single_line(reason)}; partial output removed", err=True)
        return DiskError.exit_code
    finally:
        restore()
    return 0


def _terminated(signum: int) -> int:
    """The one line and exit status of a build stopped by a signal (its output already gone)."""
    click.echo(f"mpdeploy: terminated by signal {signum}; partial output removed", err=True)
    return 128 + signum


def _single_line(message: str) -> str:
    """User input (a model name, a path) may hold newlines; the promise is one line."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def _terminate_like_interrupt():
    """SIGTERM/SIGHUP (timeout, CI cancels, Kubernetes) unwind like Ctrl-C: every `finally`
    removes its partial output. Returns a function that restores the previous handlers."""
    import signal
    import threading

    from mpdeploy.errors import clear_termination, note_termination, raise_if_terminated

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def terminate(signum, frame):
        note_termination(signum)  # also raised again between stages if this raise is swallowed
        unwind(frame)

    def unwind(frame):
        if _swallows_exceptions(frame):  # retry in 50 ms rather than lose the signal
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut cleanup short
            signal.signal(sig, signal.SIG_IGN)
        raise_if_terminated()  # Terminated(the first signal noted)

    def retry(signum, frame):
        unwind(frame)

    signals = (signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, terminate) for sig in signals}
    previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, retry)

    def restore():
        signal.setitimer(signal.ITIMER_REAL, 0)
        clear_termination()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _swallows_exceptions(frame) -> bool:
    """Python ignores exceptions raised in weakref callbacks and finalizers (importlib's module
    lock callbacks are a common place for a signal to land)."""
    code = frame.f_code if frame is not None else None
    return code is None or code.co_filename.startswith("<frozen") or code.co_name == "__del__"


if __name__ == "__main__":
    sys.exit(main())

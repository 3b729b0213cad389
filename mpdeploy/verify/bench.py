"""The speed benchmark: dense vs pruned on the same backend, in one process, interleaved.

Protocol (docs/benchmarks.md): both engines are built by the same backend with the same options
(the dense one from the dense model, without sparsity), both are timed through the Polygraphy
runners that verify parity, warm-up runs first, then every timed iteration runs dense and pruned
back to back (alternating which goes first) so drift in clocks, caches or other load hits both
alike; median and p90 latency and throughput per batch size. A MAC ratio is reported next to the
measured speedup as the physical limit of what removing work can buy — never as a speedup.

How long it runs: by default a time budget. Each batch size gets its share of what is left, runs
at least `min_pairs` interleaved pairs, and stops as soon as the 95 % bootstrap confidence
interval of its speedup (median dense / median pruned, resampling pairs) lies within ±3 % of the
estimate, or when its share is spent. A batch size whose minimum pairs cannot fit in what is left
is skipped and named in bench.json. `iterations` gives a fixed count instead. Every speedup is
reported with its interval.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mpdeploy.backends.base import cuda_feed  # noqa: F401  (the GPU scripts feed through it)
from mpdeploy.errors import UserError
from mpdeploy.fileio import atomic_dir, atomic_path, write_json

DEFAULT_BATCHES = (1, 8, 32, 64)
BENCH_DIR = "bench"
BENCH_JSON = "bench.json"
BENCH_PNG = "bench.png"


DEFAULT_BUDGET_SECONDS = 60.0
CI_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    batches: tuple[int, ...] | None = None  # default: DEFAULT_BATCHES capped at max_batch
    iterations: int | None = None  # fixed count of interleaved pairs; None: time budget
    warmup: int = 3
    budget_seconds: float = DEFAULT_BUDGET_SECONDS  # timed runs of the whole sweep
    min_pairs: int = 5
    max_pairs: int = 300
    ci_target: float = 0.03  # stop once the 95 % interval is within ±3 % of the speedup
    max_batch: int = 64
    exporter: str = "auto"
    same_model: bool = False  # nothing pruned, no sparsity: time the artifact alone
    seed: int = 0
    progress: bool = True

    def batch_sizes(self) -> tuple[int, ...]:
        if (self.iterations is not None and self.iterations < 1) or self.warmup < 0:
            raise UserError("benchmark needs ≥ 1 timed iteration and ≥ 0 warm-up runs")
        if self.iterations is None and (self.budget_seconds <= 0 or self.min_pairs < 2):
            raise UserError("a time-budgeted benchmark needs a budget > 0 s and ≥ 2 pairs")
        if self.batches:
            too_big = [b for b in self.batches if b > self.max_batch or b < 1]
            if too_big:
                raise UserError(
                    f"--bench-batch {too_big[0]} is outside the engine's batch profile "
                    f"1…{self.max_batch} (raise --max-batch)"
                )
            return tuple(sorted(set(self.batches)))
        return tuple(sorted({b for b in DEFAULT_BATCHES if b <= self.max_batch} | {self.max_batch}))


@dataclasses.dataclass(frozen=True)
class BatchTiming:
    batch: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    throughput: float  # images per second at the median latency
    samples: int

    @classmethod
    def from_seconds(cls, batch: int, seconds: list[float]) -> BatchTiming:
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        if ms.size == 0 or not np.all(np.isfinite(ms)) or np.any(ms <= 0):
            raise UserError(f"benchmark produced no valid timings at batch {batch}")
        median = float(np.median(ms))
        return cls(
            batch=batch,
            median_ms=round(median, 4),
            p90_ms=round(float(np.percentile(ms, 90)), 4),
            mean_ms=round(float(ms.mean()), 4),
            min_ms=round(float(ms.min()), 4),
            throughput=round(batch / (median / 1e3), 2),
            samples=int(ms.size),
        )


@dataclasses.dataclass(frozen=True)
class BenchReport:
    backend: str
    precision: str
    comparison: str  # "dense vs pruned" | "no pruning"
    batches: list[int]
    pruned: list[BatchTiming]
    dense: list[BatchTiming] | None
    speedup_by_batch: dict[int, float]
    mac_ratio: float | None
    protocol: dict[str, Any]
    machine: dict[str, Any]
    headline: dict[str, Any]
    # 95 % bootstrap interval [low, high] of each speedup (None where nothing was compared)
    speedup_ci95_by_batch: dict[int, list[float] | None] = dataclasses.field(default_factory=dict)
    stopping: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        payload = dataclasses.asdict(self)
        for key in ("speedup_by_batch", "speedup_ci95_by_batch", "stopping"):
            payload[key] = {str(k): v for k, v in getattr(self, key).items()}
        return payload


@dataclasses.dataclass
class TimedRunner:
    """A Polygraphy runner plus how to feed it: `feed(batch)` → feed dict, extra infer kwargs."""

    runner: Any
    feed: Callable[[int], dict[str, Any]]
    infer_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


# --- the measurement -------------------------------------------------------------------------


def measure_interleaved(
    runners: dict[str, TimedRunner],
    batches: tuple[int, ...],
    *,
    iterations: int,
    warmup: int,
    progress: bool = True,
    desc: str = "bench",
) -> dict[str, dict[int, list[float]]]:
    """Seconds per inference for every runner and batch, from `runner.last_inference_time()`.

    Runners are activated together and stay active; per batch size every runner is warmed up,
    then each timed iteration runs all runners, rotating which one goes first.
    """
    from tqdm.auto import tqdm

    names = list(runners)
    times: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batches} for n in names}
    total = len(batches) * (warmup + iterations) * len(names)
    with (
        contextlib.ExitStack() as stack,
        tqdm(
            total=total, desc=desc, unit="run", disable=None if progress else True, leave=False
        ) as bar,
    ):
        for timed in runners.values():
            stack.enter_context(timed.runner)
        for batch in batches:
            feeds = {n: runners[n].feed(batch) for n in names}
            for _ in range(warmup):
                for n in names:
                    runners[n].runner.infer(feeds[n], **runners[n].infer_kwargs)
                    bar.update()
            for i in range(iterations):
                shift = i % len(names)
                for n in names[shift:] + names[:shift]:
                    runners[n].runner.infer(feeds[n], **runners[n].infer_kwargs)
                    times[n][batch].append(float(runners[n].runner.last_inference_time()))
                    bar.update()
    return times


def speedup_ci(
    reference: list[float],
    candidate: list[float],
    *,
    level: float = CI_LEVEL,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(speedup, low, high): median(reference) / median(candidate) and its percentile bootstrap
    interval, resampling interleaved pairs together so drift shared by a pair cancels.

    With no candidate (one runner timed alone) the interval is of `median(reference)` itself.
    """
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64) if len(candidate) else None
    n = ref.size
    if n == 0 or (cand is not None and cand.size != n):
        raise UserError("a confidence interval needs the same number (≥ 1) of timings per runner")
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    boot = np.median(ref[idx], axis=1)
    point = float(np.median(ref))
    if cand is not None:
        boot = boot / np.median(cand[idx], axis=1)
        point = point / float(np.median(cand))
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    return point, float(low), float(high)


def ci_within(point: float, low: float, high: float, target: float) -> bool:
    """The interval lies within ±target (relative) of the estimate."""
    return low >= point * (1 - target) and high <= point * (1 + target)


def measure_budgeted(
    runners: dict[str, TimedRunner],
    batches: tuple[int, ...],
    *,
    budget_seconds: float,
    warmup: int,
    min_pairs: int = 5,
    max_pairs: int = 300,
    ci_target: float = 0.03,
    reference: str = "dense",
    candidate: str = "pruned",
    progress: bool = True,
    desc: str = "bench",
) -> tuple[dict[str, dict[int, list[float]]], dict[int, dict[str, Any]]]:
    """Interleaved timing that stops each batch size when the speedup's 95 % interval is within
    ±`ci_target`, or when its share of the budget is spent (never before `min_pairs`).

    Returns the timings and, per batch size, why it stopped (`converged`, `budget`, `max_pairs`)
    or that it was `skipped` because `min_pairs` would not fit in what was left of the budget.
    """
    from tqdm.auto import tqdm

    names = list(runners)
    compared = (reference, candidate) if {reference, candidate} <= set(names) else (names[0],)
    times: dict[str, dict[int, list[float]]] = {n: {} for n in names}
    stops: dict[int, dict[str, Any]] = {}
    with (
        contextlib.ExitStack() as stack,
        tqdm(desc=desc, unit="pair", disable=None if progress else True, leave=False) as bar,
    ):
        for timed in runners.values():
            stack.enter_context(timed.runner)
        start = time.perf_counter()
        rounds = max(warmup, 1)  # ≥ 1 warm-up round: it also prices one pair
        priced: tuple[int, float] | None = None  # (batch, seconds of one pair) last measured
        for position, batch in enumerate(batches):
            left = budget_seconds - (time.perf_counter() - start)
            if priced is not None:  # price it from the last batch size, before any warm-up
                guess = priced[1] * batch / priced[0]
                if (rounds + min_pairs) * guess > left:
                    stops[batch] = {
                        "status": "skipped",
                        "reason": f"{min_pairs} pairs and {rounds} warm-up need ~"
                        f"{(rounds + min_pairs) * guess:.1f} s (priced from batch {priced[0]}), "
                        f"{max(left, 0):.1f} s of the {budget_seconds:g} s budget left",
                    }
                    continue
            feeds = {n: runners[n].feed(batch) for n in names}
            round_start = time.perf_counter()
            for _ in range(rounds):
                _run_round(runners, feeds, names, None, batch, shift=0)
            pair_seconds = (time.perf_counter() - round_start) / rounds
            priced = (batch, pair_seconds)
            left = budget_seconds - (time.perf_counter() - start)
            if position > 0 and min_pairs * pair_seconds > left:
                stops[batch] = {
                    "status": "skipped",
                    "reason": f"{min_pairs} pairs need ~{min_pairs * pair_seconds:.1f} s, "
                    f"{max(left, 0):.1f} s of the {budget_seconds:g} s budget left",
                }
                continue
            # this batch's share: what is left over the batch sizes still expected to fit
            share = left / _expected_to_fit(
                batches[position:], left, pair_seconds / batch, min_pairs, rounds
            )
            for n in names:
                times[n][batch] = []
            batch_start, status, pairs = time.perf_counter(), "max_pairs", 0
            interval = None
            while pairs < max_pairs:
                _run_round(runners, feeds, names, times, batch, shift=pairs % len(names))
                pairs += 1
                bar.update()
                if pairs < min_pairs:
                    continue
                if len(compared) == 2:
                    interval = speedup_ci(times[reference][batch], times[candidate][batch])
                else:
                    interval = speedup_ci(times[compared[0]][batch], [])
                if ci_within(*interval, ci_target):
                    status = "converged"
                    break
                if time.perf_counter() - batch_start >= share:
                    status = "budget"
                    break
            stops[batch] = {
                "status": status,
                "pairs": pairs,
                "seconds": round(time.perf_counter() - batch_start, 2),
                "share_seconds": round(share, 2),
                "relative_half_width": round((interval[2] - interval[1]) / 2 / interval[0], 4)
                if interval
                else None,
            }
    return times, stops


def _expected_to_fit(
    batches: tuple[int, ...], left: float, pair_per_image: float, min_pairs: int, rounds: int
) -> int:
    """How many of `batches` (the first already warmed up) fit their minimum pairs (and the
    others their warm-up) in `left` seconds, in order, priced linearly in the batch size."""
    count, need = 0, 0.0
    for i, batch in enumerate(batches):
        cost = pair_per_image * batch * (min_pairs + (rounds if i else 0))
        if need + cost <= left:
            need += cost
            count += 1
    return max(count, 1)


def _run_round(runners, feeds, names, times, batch: int, shift: int) -> None:
    """Every runner once, starting with the `shift`-th; timings recorded when `times` is given."""
    for n in names[shift:] + names[:shift]:
        runners[n].runner.infer(feeds[n], **runners[n].infer_kwargs)
        if times is not None:
            times[n][batch].append(float(runners[n].runner.last_inference_time()))


def random_feed(input_name: str, input_shape: tuple[int, ...], seed: int = 0):
    """feed(batch) → {input_name: seeded N(0,1) float32 array}; same data for every runner."""
    cache: dict[int, dict[str, np.ndarray]] = {}

    def feed(batch: int) -> dict[str, np.ndarray]:
        if batch not in cache:
            rng = np.random.default_rng(seed + batch)
            data = rng.standard_normal((batch, *input_shape), dtype=np.float32)
            cache[batch] = {input_name: data}
        return cache[batch]

    return feed


# --- the build-directory benchmark -----------------------------------------------------------


def bench_build(
    build_dir: str | Path,
    *,
    dense_model,
    engine,
    options: BenchOptions,
    engine_options,
) -> BenchReport:
    """Benchmark the build's engine against a dense engine built the same way; write bench.json,
    bench.png (and the dense engine under bench/) atomically; return the report."""
    from mpdeploy.backends import get_backend

    build_dir = Path(build_dir)
    batches = options.batch_sizes()
    backend = get_backend(engine.backend)
    feed = backend.bench_feed(
        engine, random_feed(engine.input_name, tuple(engine.input_shape), options.seed)
    )
    runners = {
        "pruned": TimedRunner(
            backend.runner(engine, build_dir, name="pruned"),
            feed,
            backend.bench_infer_kwargs(engine),
        )
    }
    dense_record = None
    # The dense twin lives in bench/ (its own engine/ inside), never in the build's engine/.
    staging = (
        contextlib.nullcontext(None)
        if options.same_model
        else atomic_dir(build_dir / BENCH_DIR, replace=True)
    )
    with staging as bench_dir:
        if bench_dir is not None:
            dense_record = build_dense_engine(
                dense_model, engine, bench_dir, options, engine_options
            )
            runners["dense"] = TimedRunner(
                backend.runner(dense_record, bench_dir, name="dense"),
                feed,
                backend.bench_infer_kwargs(dense_record),
            )
        times, stops = run_protocol(runners, batches, options, desc=f"bench {engine.backend}")
    measured = tuple(b for b in batches if stops.get(b, {}).get("status") != "skipped")
    report = make_report(
        times,
        engine,
        options,
        measured,
        _mac_counts(build_dir, engine),
        dense_record,
        stopping=stops,
    )
    write_json(build_dir / BENCH_JSON, report.to_dict())
    plot_bench(report, build_dir / BENCH_PNG)
    return report


def run_protocol(runners: dict[str, TimedRunner], batches, options: BenchOptions, desc: str):
    """Fixed `iterations` or the time budget; returns timings and per-batch stopping records."""
    if options.iterations is not None:
        times = measure_interleaved(
            runners,
            batches,
            iterations=options.iterations,
            warmup=options.warmup,
            progress=options.progress,
            desc=desc,
        )
        return times, {b: {"status": "fixed", "pairs": options.iterations} for b in batches}
    return measure_budgeted(
        runners,
        batches,
        budget_seconds=options.budget_seconds,
        warmup=options.warmup,
        min_pairs=options.min_pairs,
        max_pairs=options.max_pairs,
        ci_target=options.ci_target,
        progress=options.progress,
        desc=desc,
    )


def build_dense_engine(dense_model, engine, bench_dir: Path, options: BenchOptions, engine_options):
    """Export the dense model and build it with the engine's backend and options, minus sparsity."""
    from mpdeploy.backends import get_backend
    from mpdeploy.export import export_onnx

    backend = get_backend(engine.backend)
    dense_options = dataclasses.replace(engine_options, sparsity=None)
    onnx_path = bench_dir / "dense.onnx"
    export_onnx(dense_model, onnx_path, tuple(engine.input_shape), exporter=options.exporter)
    if backend.source_onnx(dense_options) == "model.fp16.onnx":
        from mpdeploy.export.fp16 import convert_fp16

        onnx_path = convert_fp16(onnx_path, bench_dir / "dense.fp16.onnx")
    return backend.build(onnx_path, bench_dir, dense_options)


def make_report(
    times: dict[str, dict[int, list[float]]],
    engine,
    options: BenchOptions,
    batches: tuple[int, ...],
    macs: dict[str, Any],
    dense_record=None,
    stopping: dict[int, dict[str, Any]] | None = None,
) -> BenchReport:
    pruned = [BatchTiming.from_seconds(b, times["pruned"][b]) for b in batches]
    dense = (
        [BatchTiming.from_seconds(b, times["dense"][b]) for b in batches]
        if "dense" in times
        else None
    )
    if dense is None:
        speedups = {b: 1.0 for b in batches}
        comparison = "no pruning"
    else:
        speedups = {
            d.batch: round(d.median_ms / p.median_ms, 4) for d, p in zip(dense, pruned, strict=True)
        }
        comparison = "dense vs pruned"
    intervals: dict[int, list[float] | None] = {
        b: [round(v, 4) for v in speedup_ci(times["dense"][b], times["pruned"][b])[1:]]
        if dense is not None
        else None
        for b in batches
    }
    values = list(speedups.values())
    best_batch = max(speedups, key=speedups.get)
    first, last = pruned[0], pruned[-1]
    headline: dict[str, Any] = {
        "bench_comparison": comparison,
        "speedup_median": round(float(np.median(values)), 4),
        "speedup_best": speedups[best_batch],
        "speedup_best_batch": best_batch,
        "speedup_by_batch": {str(b): s for b, s in speedups.items()},
        "speedup_ci95_by_batch": {str(b): ci for b, ci in intervals.items()},
        "mac_ratio": macs.get("mac_ratio"),
        f"latency_ms_batch{first.batch}": first.median_ms,
        f"latency_ms_batch{last.batch}": last.median_ms,
        f"throughput_batch{last.batch}": last.throughput,
    }
    if dense is not None:
        headline[f"dense_latency_ms_batch{dense[0].batch}"] = dense[0].median_ms
        headline[f"dense_latency_ms_batch{dense[-1].batch}"] = dense[-1].median_ms
    limit = macs.get("mac_ratio")
    if dense is not None and limit and speedups[best_batch] > 1.1 * limit:
        # Removing work cannot buy more than the work removed: this is noise (a loaded machine,
        # too few iterations) or the two engines took different kernel paths.
        headline["bench_warning"] = (
            f"speedup {speedups[best_batch]:.2f}x at batch {best_batch} exceeds the MAC ratio "
            f"{limit:.2f}x: check machine load (bench.json machine.load_average) and iterations"
        )
    return BenchReport(
        backend=engine.backend,
        precision=engine.precision,
        comparison=comparison,
        batches=list(batches),
        pruned=pruned,
        dense=dense,
        speedup_by_batch=speedups,
        mac_ratio=macs.get("mac_ratio"),
        speedup_ci95_by_batch=intervals,
        stopping=dict(stopping or {}),
        protocol={
            "warmup": options.warmup,
            "iterations": options.iterations,
            "budget_seconds": options.budget_seconds if options.iterations is None else None,
            "min_pairs": options.min_pairs if options.iterations is None else None,
            "ci_target": options.ci_target if options.iterations is None else None,
            "interval": f"{CI_LEVEL:.0%} percentile bootstrap over interleaved pairs "
            f"({BOOTSTRAP_RESAMPLES} resamples) of median dense / median pruned",
            "order": "interleaved per iteration, alternating which model runs first",
            "timer": "Polygraphy runner.last_inference_time() around one infer() call",
            "inputs": "seeded N(0, 1) float32, identical for both models",
            "same_process": True,
            "artifact": engine.artifact,
            "dense_artifact": f"{BENCH_DIR}/{dense_record.artifact}" if dense_record else None,
            "macs": macs,
            "note": (
                "nothing was pruned or sparsified: only the artifact was timed and the speedup "
                "is 1.0 by definition, not a measurement"
            )
            if dense is None
            else None,
        },
        machine=machine_info(engine),
        headline=headline,
    )


def machine_info(engine=None) -> dict[str, Any]:
    from mpdeploy import hardware
    from mpdeploy.manifest import environment

    env = environment()
    cpu = hardware.cpu_info()
    on_gpu = engine is None or getattr(engine, "device", "cpu") != "cpu"
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu.model,
        "cpu_count": cpu.logical_cores,
        "cpu_flags": list(cpu.flags),
        "cpu_native_bf16": cpu.native_bf16,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {k: v for k, v in env["versions"].items() if v},
        "gpus": [dict(g) for g in hardware.gpu_devices()] if on_gpu else [],
        "load_average": [round(v, 2) for v in os.getloadavg()],  # 1, 5, 15 min, at the end
    }
    if engine is not None:
        info["engine_details"] = {
            k: v
            for k, v in engine.details.items()
            if k
            in (
                "onnxruntime_version",
                "openvino_version",
                "inference_precision_hint",
                "provider",
                "providers",
                "intra_op_threads",
                "tensorrt_version",
                "gpu",
                "compute_capability",
            )
        }
    return info


def plot_bench(report: BenchReport, path: Path) -> Path:
    """Latency (median, p90 whisker), throughput and the speedup with its 95 % interval vs batch
    size, dense vs pruned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if report.dense else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    ax_lat, ax_thr = axes[0], axes[1]
    series = [("pruned" if report.dense else "artifact", report.pruned, "C1")]
    if report.dense:
        series.insert(0, ("dense", report.dense, "C0"))
    for label, rows, color in series:
        xs = [r.batch for r in rows]
        med = np.array([r.median_ms for r in rows])
        p90 = np.array([r.p90_ms for r in rows])
        ax_lat.errorbar(
            xs,
            med,
            yerr=[np.zeros_like(med), p90 - med],
            marker="o",
            color=color,
            capsize=3,
            label=f"{label} (median, p90)",
        )
        ax_thr.plot(xs, [r.throughput for r in rows], marker="o", color=color, label=label)
    if report.dense:
        ax_sp = axes[2]
        xs = report.batches
        point = np.array([report.speedup_by_batch[b] for b in xs])
        cis = [
            report.speedup_ci95_by_batch.get(b) or [p, p] for b, p in zip(xs, point, strict=True)
        ]
        low, high = np.array([c[0] for c in cis]), np.array([c[1] for c in cis])
        # the interval as drawn from its ends: a percentile bootstrap interval of a ratio of
        # medians need not contain the point estimate, so it is not an error bar around it
        ax_sp.vlines(xs, low, high, color="C2", lw=2, alpha=0.5, label="95 % CI")
        ax_sp.plot(xs, point, marker="o", color="C2", label="speedup (median ratio)")
        if report.mac_ratio:
            ax_sp.axhline(report.mac_ratio, color="grey", ls="--", label="MAC ratio (limit)")
        ax_sp.axhline(1.0, color="black", lw=0.8)
        ax_sp.set_ylabel("dense / pruned median latency")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(report.batches, [str(b) for b in report.batches])
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency per batch (ms)")
    ax_thr.set_ylabel("throughput (images/s)")
    head = report.headline
    mac = f", MAC ratio {report.mac_ratio:.2f}×" if report.mac_ratio else ""
    title = (
        f"{report.backend} {report.precision}: speedup median {head['speedup_median']:.2f}×, "
        f"best {head['speedup_best']:.2f}×{mac}"
        if report.dense
        else f"{report.backend} {report.precision}: no pruning (speedup 1.0 by definition)"
    )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _mac_counts(build_dir: Path, engine) -> dict[str, Any]:
    """dense/pruned/sparse-execution MACs from the manifest headline, and their ratio."""
    from mpdeploy.manifest import MANIFEST, Manifest

    if not (build_dir / MANIFEST).is_file():
        return {"mac_ratio": None}
    head = Manifest.load(build_dir).payload.get("headline", {})
    dense, pruned = head.get("dense_macs"), head.get("pruned_macs")
    sparse = head.get("sparse_execution_macs")
    sparse_used = bool(engine.details.get("sparse_weights")) and bool(sparse)
    executed = sparse if sparse_used else pruned
    ratio = round(dense / executed, 4) if dense and executed else None
    return {
        "dense_macs": dense,
        "pruned_macs": pruned,
        "sparse_execution_macs": sparse,
        "ratio_uses": "sparse_execution_macs" if sparse_used else "pruned_macs",
        "mac_ratio": ratio,
    }

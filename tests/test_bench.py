"""The benchmark protocol (batch sizes, statistics, interleaving, the report), the build-directory
benchmark on ONNX Runtime, the torch GPU backend's CPU-testable parts and the bench scripts."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from polygraphy.backend.base import BaseRunner

from mpdeploy.backends import EngineOptions, get_backend
from mpdeploy.backends.torch import (
    TorchCudaRunner,
    cuda_unavailable_reason,
    is_2of4,
    mask_2of4,
    prepare_model,
    semi_structured_eligible,
)
from mpdeploy.errors import MissingDependencyError, UserError
from mpdeploy.verify.bench import (
    BatchTiming,
    BenchOptions,
    TimedRunner,
    bench_build,
    ci_within,
    make_report,
    measure_budgeted,
    measure_interleaved,
    speedup_ci,
)

ROOT = Path(__file__).resolve().parents[1]
CUDA_REASON = cuda_unavailable_reason()


# --- protocol pieces --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_batch", "expected"),
    [(64, (1, 8, 32, 64)), (8, (1, 8)), (16, (1, 8, 16)), (1, (1,)), (128, (1, 8, 32, 64, 128))],
)
def test_default_batches_are_capped_at_max_batch(max_batch, expected):
    assert BenchOptions(max_batch=max_batch).batch_sizes() == expected


def test_explicit_batches_outside_the_profile_are_refused():
    assert BenchOptions(batches=(4, 2, 4), max_batch=8).batch_sizes() == (2, 4)
    with pytest.raises(UserError, match="outside the engine's batch profile"):
        BenchOptions(batches=(16,), max_batch=8).batch_sizes()
    with pytest.raises(UserError, match="timed iteration"):
        BenchOptions(iterations=0).batch_sizes()


def test_batch_timing_statistics():
    row = BatchTiming.from_seconds(8, [0.010, 0.020, 0.030, 0.040, 0.100])
    assert row.median_ms == 30.0
    assert row.p90_ms == pytest.approx(76.0)  # numpy linear interpolation between 40 and 100
    assert row.min_ms == 10.0 and row.mean_ms == 40.0
    assert row.throughput == pytest.approx(8 / 0.030, rel=1e-4)
    with pytest.raises(UserError):
        BatchTiming.from_seconds(1, [])


class _ScriptedRunner(BaseRunner):
    """Reports a fixed inference time and logs the order it was called in."""

    def __init__(self, name, seconds, calls):
        super().__init__(name=name)
        self.seconds, self.calls = seconds, calls

    def activate_impl(self):
        pass

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        return TensorMetadata().add("input", dtype=np.float32, shape=(-1, 1))

    def infer_impl(self, feed_dict):
        self.calls.append(self.name)
        self.inference_time = self.seconds * feed_dict["input"].shape[0]
        return OrderedDict(logits=feed_dict["input"])

    def deactivate_impl(self):
        pass


def _scripted(calls):
    def feed(batch):
        return {"input": np.zeros((batch, 1), np.float32)}

    return {
        "dense": TimedRunner(_ScriptedRunner("dense", 0.002, calls), feed),
        "pruned": TimedRunner(_ScriptedRunner("pruned", 0.001, calls), feed),
    }


def test_measurement_interleaves_and_alternates_order():
    calls: list[str] = []
    times = measure_interleaved(_scripted(calls), (1, 4), iterations=4, warmup=1, progress=False)
    assert {b: len(v) for b, v in times["dense"].items()} == {1: 4, 4: 4}
    assert times["pruned"][4] == [0.004] * 4
    timed = calls[2:10]  # after the warm-up pair of batch 1
    assert timed == ["dense", "pruned", "pruned", "dense", "dense", "pruned", "pruned", "dense"]


def _engine(backend="onnxruntime", details=None):
    from mpdeploy.backends import EngineRecord

    return EngineRecord(
        backend=backend,
        precision="fp32",
        onnx="model.onnx",
        artifact="model.onnx",
        max_batch=8,
        profile={"min": 1, "opt": 8, "max": 8},
        input_name="input",
        output_name="logits",
        input_shape=[1],
        num_classes=1,
        build_seconds=0.0,
        size_bytes=1,
        details=details or {},
    )


def test_report_speedups_mac_ratio_and_noise_warning():
    calls: list[str] = []
    times = measure_interleaved(_scripted(calls), (1, 8), iterations=3, warmup=0, progress=False)
    options = BenchOptions(max_batch=8)
    report = make_report(times, _engine(), options, (1, 8), {"mac_ratio": 1.5})
    assert report.comparison == "dense vs pruned"
    assert report.speedup_by_batch == {1: 2.0, 8: 2.0}
    head = report.headline
    assert head["speedup_median"] == 2.0 and head["speedup_best"] == 2.0
    assert head["mac_ratio"] == 1.5
    assert head["latency_ms_batch1"] == 1.0 and head["latency_ms_batch8"] == 8.0
    assert head["dense_latency_ms_batch8"] == 16.0
    assert "exceeds the MAC ratio" in head["bench_warning"]
    quiet = make_report(times, _engine(), options, (1, 8), {"mac_ratio": 2.0})
    assert "bench_warning" not in quiet.headline


def test_the_picture_draws_an_interval_that_leaves_out_its_point(tmp_path):
    """A percentile bootstrap interval of a ratio of medians can miss the ratio itself (seen in
    CI: the plot raised "'yerr' must not contain negative values"); the picture draws it."""
    from dataclasses import replace

    from mpdeploy.verify.bench import plot_bench

    calls: list[str] = []
    times = measure_interleaved(_scripted(calls), (1, 8), iterations=3, warmup=0, progress=False)
    report = make_report(times, _engine(), BenchOptions(max_batch=8), (1, 8), {"mac_ratio": 1.5})
    assert report.speedup_by_batch[1] == 2.0
    report = replace(report, speedup_ci95_by_batch={1: [2.1, 2.3], 8: [1.7, 1.9]})
    out = plot_bench(report, tmp_path / "bench.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mac_ratio_prefers_sparse_execution_macs_only_for_sparse_engines(tmp_path):
    from mpdeploy.manifest import Manifest
    from mpdeploy.verify.bench import _mac_counts

    manifest = Manifest.create(tmp_path, {})
    manifest.payload["headline"].update(dense_macs=1000, pruned_macs=500, sparse_execution_macs=250)
    manifest.save()
    assert _mac_counts(tmp_path, _engine())["mac_ratio"] == 2.0
    sparse = _engine("tensorrt", {"sparse_weights": True})
    assert _mac_counts(tmp_path, sparse)["mac_ratio"] == 4.0


# --- confidence intervals and the time budget ------------------------------------------------


def test_speedup_ci_brackets_the_ratio_of_medians_and_narrows_with_pairs():
    rng = np.random.default_rng(0)
    exact = speedup_ci([2.0] * 10, [1.0] * 10)
    assert exact == (2.0, 2.0, 2.0)
    widths = []
    for n in (8, 200):
        dense = 2.0 + rng.normal(0, 0.2, n)
        pruned = 1.0 + rng.normal(0, 0.1, n)
        point, low, high = speedup_ci(list(dense), list(pruned))
        assert point == pytest.approx(np.median(dense) / np.median(pruned))
        assert low < point < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 25× the pairs, well under half the width
    alone = speedup_ci([1.0, 2.0, 3.0], [])
    assert alone[0] == 2.0 and 1.0 <= alone[1] <= alone[2] <= 3.0
    assert ci_within(2.0, 1.95, 2.05, 0.03) and not ci_within(2.0, 1.9, 2.05, 0.03)
    with pytest.raises(UserError):
        speedup_ci([1.0, 2.0], [1.0])


class _SleepingRunner(_ScriptedRunner):
    """Takes real wall time (what the budget counts), with seeded noise in its reported time."""

    def __init__(self, name, seconds, calls, noise=0.0, seed=0):
        super().__init__(name, seconds, calls)
        self.noise, self.rng = noise, np.random.default_rng(seed)

    def infer_impl(self, feed_dict):
        out = super().infer_impl(feed_dict)
        time.sleep(self.inference_time)
        self.inference_time *= 1 + self.noise * self.rng.standard_normal()
        return out


def _sleeping(noise, seconds=(0.0004, 0.0002)):
    def feed(batch):
        return {"input": np.zeros((batch, 1), np.float32)}

    calls: list[str] = []
    return {
        "dense": TimedRunner(_SleepingRunner("dense", seconds[0], calls, noise, 1), feed),
        "pruned": TimedRunner(_SleepingRunner("pruned", seconds[1], calls, noise, 2), feed),
    }


def test_budget_stops_a_batch_once_its_interval_is_within_three_percent():
    times, stops = measure_budgeted(
        _sleeping(noise=0.0), (1, 2), budget_seconds=5, warmup=1, min_pairs=4, progress=False
    )
    for batch in (1, 2):
        assert stops[batch]["status"] == "converged" and stops[batch]["pairs"] == 4
        assert len(times["dense"][batch]) == len(times["pruned"][batch]) == 4
        assert stops[batch]["relative_half_width"] == 0.0


def test_budget_share_ends_a_noisy_batch_and_skips_one_that_cannot_fit():
    # batch 1: ±40 % noise never converges to ±3 % in its 0.15 s share; batch 256: one pair
    # sleeps ~0.15 s, so its 5 minimum pairs cannot fit in what is left of 0.3 s.
    times, stops = measure_budgeted(
        _sleeping(noise=0.4, seconds=(0.0006, 0.0003)),
        (1, 256),
        budget_seconds=0.3,
        warmup=1,
        min_pairs=5,
        progress=False,
    )
    assert stops[1]["status"] == "budget" and stops[1]["pairs"] >= 5
    assert stops[1]["relative_half_width"] > 0.03
    assert stops[256]["status"] == "skipped" and "budget left" in stops[256]["reason"]
    assert 256 not in times["dense"]


def test_a_batch_priced_out_of_the_budget_runs_not_even_its_warm_up():
    # batch 1 prices a pair at ~3 ms; batch 64 is priced linearly at ~0.19 s a pair, so its
    # warm-up and 5 minimum pairs (~1.2 s) cannot fit in 0.5 s: it is skipped before it runs,
    # and batch 1, the only batch size expected to fit, gets the whole budget as its share.
    seen: list[int] = []

    class Logging(_SleepingRunner):
        def infer_impl(self, feed_dict):
            seen.append(int(feed_dict["input"].shape[0]))
            return super().infer_impl(feed_dict)

    def feed(batch):
        return {"input": np.zeros((batch, 1), np.float32)}

    calls: list[str] = []
    runners = {
        "dense": TimedRunner(Logging("dense", 0.002, calls), feed),
        "pruned": TimedRunner(Logging("pruned", 0.001, calls), feed),
    }
    _, stops = measure_budgeted(
        runners, (1, 64), budget_seconds=0.5, warmup=1, min_pairs=5, progress=False
    )
    assert 64 not in seen
    assert stops[64]["status"] == "skipped" and "priced from batch 1" in stops[64]["reason"]
    assert stops[1]["status"] == "converged" and stops[1]["share_seconds"] > 0.4


# --- the build-directory benchmark on ONNX Runtime --------------------------------------------


@pytest.fixture(scope="module")
def vit_build(tmp_path_factory):
    """A minimal build directory: a 'pruned' test_vit engine, plus a different dense test_vit."""
    from mpdeploy.export import export_onnx
    from mpdeploy.models import create_model

    torch.manual_seed(0)
    build_dir = tmp_path_factory.mktemp("build")
    dense = create_model("test_vit", "none").model
    pruned = create_model("test_vit", "none").model
    export_onnx(pruned, build_dir / "model.onnx", (3, 160, 160))
    options = EngineOptions(max_batch=2, threads=1)
    record = get_backend("onnxruntime").build(build_dir / "model.onnx", build_dir, options)
    return build_dir, dense, record, options


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bench_build_dense_vs_pruned(vit_build):
    build_dir, dense, record, options = vit_build
    engine_json = _digest(build_dir / "engine" / "engine.json")
    report = bench_build(
        build_dir,
        dense_model=dense,
        engine=record,
        options=BenchOptions(iterations=3, warmup=1, max_batch=2, progress=False),
        engine_options=options,
    )
    payload = json.loads((build_dir / "bench.json").read_text())
    assert payload["comparison"] == "dense vs pruned"
    assert payload["batches"] == [1, 2]
    for series in ("dense", "pruned"):
        for row in payload[series]:
            assert row["samples"] == 3
            assert 0 < row["min_ms"] <= row["median_ms"] <= row["p90_ms"]
            assert row["throughput"] > 0
    assert set(payload["speedup_by_batch"]) == {"1", "2"}
    assert all(v > 0 for v in payload["speedup_by_batch"].values())
    assert payload["protocol"]["iterations"] == 3
    assert payload["stopping"] == {b: {"status": "fixed", "pairs": 3} for b in ("1", "2")}
    for batch, (low, high) in payload["speedup_ci95_by_batch"].items():
        assert low <= payload["speedup_by_batch"][batch] <= high
    assert payload["protocol"]["dense_artifact"] == "bench/dense.onnx"
    assert payload["machine"]["cpu_count"] >= 1
    assert report.headline["speedup_best"] >= report.headline["speedup_median"] > 0
    assert (build_dir / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert (build_dir / "bench" / "engine" / "engine.json").is_file()
    assert _digest(build_dir / "engine" / "engine.json") == engine_json  # engine/ untouched


def test_bench_build_time_budget_records_why_each_batch_stopped(vit_build):
    # The artifact alone (no dense export: ~20 s on a loaded machine); the speedup intervals of
    # a dense-vs-pruned run are checked above and on scripted runners.
    build_dir, dense, record, options = vit_build
    bench_build(
        build_dir,
        dense_model=dense,
        engine=record,
        options=BenchOptions(
            budget_seconds=1.0, warmup=1, min_pairs=3, max_batch=2, same_model=True, progress=False
        ),
        engine_options=options,
    )
    payload = json.loads((build_dir / "bench.json").read_text())
    assert payload["protocol"]["iterations"] is None
    assert payload["protocol"]["budget_seconds"] == 1.0
    assert payload["batches"] == [1, 2]
    for row in payload["pruned"]:
        stop = payload["stopping"][str(row["batch"])]
        assert stop["status"] in ("converged", "budget", "max_pairs")
        assert stop["pairs"] == row["samples"] >= 3
    assert payload["speedup_ci95_by_batch"] == {"1": None, "2": None}


def test_bench_build_same_model_reports_no_pruning(vit_build):
    build_dir, dense, record, options = vit_build
    report = bench_build(
        build_dir,
        dense_model=dense,
        engine=record,
        options=BenchOptions(iterations=2, warmup=0, max_batch=2, same_model=True, progress=False),
        engine_options=options,
    )
    payload = json.loads((build_dir / "bench.json").read_text())
    assert payload["comparison"] == "no pruning"
    assert payload["dense"] is None
    assert payload["speedup_by_batch"] == {"1": 1.0, "2": 1.0}
    assert report.headline["speedup_median"] == 1.0
    assert report.headline["bench_comparison"] == "no pruning"
    assert "by definition" in payload["protocol"]["note"]
    assert all(row["median_ms"] > 0 for row in payload["pruned"])


# --- torch GPU backend: the parts that run on a CPU -------------------------------------------


def test_mask_2of4_keeps_the_two_largest_of_every_four():
    weight = torch.tensor([[1.0, -4.0, 3.0, 0.5, 0.125, 0.25, -0.375, 0.5]])
    masked = mask_2of4(weight)
    assert masked.tolist() == [[0.0, -4.0, 3.0, 0.0, 0.0, 0.0, -0.375, 0.5]]
    assert is_2of4(masked) and not is_2of4(weight)
    with pytest.raises(UserError):
        mask_2of4(torch.ones(2, 6))


def test_semi_structured_eligibility_follows_kernel_constraints():
    assert semi_structured_eligible(torch.nn.Linear(768, 3072), torch.bfloat16)
    assert semi_structured_eligible(torch.nn.Linear(768, 3072), torch.bfloat16, force_cutlass=True)
    assert not semi_structured_eligible(
        torch.nn.Linear(100, 64), torch.bfloat16, force_cutlass=True
    )
    assert not semi_structured_eligible(torch.nn.Linear(64, 64), torch.float64)


def test_prepare_model_copies_and_casts_without_touching_the_original():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    prepared, info = prepare_model(model, "bf16", device="cpu")
    assert next(prepared.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32
    assert info["semi_structured_layers"] == []
    with pytest.raises(UserError, match="dtype"):
        prepare_model(model, "int4", device="cpu")


@pytest.mark.skipif(CUDA_REASON is None, reason="CUDA is available here")
def test_torch_cuda_runner_without_cuda_is_one_line():
    with pytest.raises(MissingDependencyError, match="GPU benchmarking needs CUDA") as info:
        TorchCudaRunner(torch.nn.Linear(2, 2), (2,))
    assert "\n" not in str(info.value)


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_REASON is not None, reason=f"needs a CUDA GPU: {CUDA_REASON}")
def test_torch_cuda_runner_graph_and_2of4_on_gpu():
    from mpdeploy.verify.bench import cuda_feed, random_feed

    model = torch.nn.Sequential(
        torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)
    ).eval()
    dense, _ = prepare_model(model, "bf16")
    sparse, info = prepare_model(model, "bf16", semi_structured=True, apply_mask=True)
    assert info["semi_structured_layers"] == ["0", "2"]
    feed = cuda_feed(random_feed("input", (128,)))
    runners = {
        "dense": TimedRunner(TorchCudaRunner(dense, (128,), name="dense"), feed),
        "sparse": TimedRunner(TorchCudaRunner(sparse, (128,), name="sparse"), feed),
    }
    times = measure_interleaved(runners, (64,), iterations=5, warmup=2, progress=False)
    assert all(t > 0 for t in times["dense"][64] + times["sparse"][64])
    assert runners["dense"].runner.graph_error is None


# --- scripts ----------------------------------------------------------------------------------


def _script(name: str):
    # As `python scripts/NAME.py` would: the script's folder is on sys.path for its helpers.
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_arguments():
    bench_gpu = _script("bench_gpu")
    args = bench_gpu.parse_args([])
    assert args.models == ["vit_b16", "vit_l16", "convnextv2_base", "resnet50"]
    assert args.batches == [64, 128, 256] and args.dtype == "bf16" and args.target_macs == 0.5
    args = bench_gpu.parse_args(
        [
            "--models",
            "resnet50",
            "--batches",
            "8",
            "--method",
            "magnitude",
            "--weights",
            "none",
            "--force-cutlass",
        ]
    )
    assert args.models == ["resnet50"] and args.batches == [8] and args.force_cutlass
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--target-macs", "1.5"])


@pytest.mark.skipif(CUDA_REASON is None, reason="CUDA is available here")
def test_bench_gpu_without_cuda_exits_with_one_line(tmp_path, capsys):
    bench_gpu = _script("bench_gpu")
    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--models", "vit_b16", "--out", str(out)]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench_gpu: needs a CUDA GPU: ")
    assert not out.exists()


def test_bench_cpu_arguments():
    bench_cpu = _script("bench_cpu")
    args = bench_cpu.parse_args([])
    assert args.models == ["vit_b16", "resnet50", "convnextv2_base"]
    assert args.batches == [1, 8] and args.target_macs == 0.5 and args.weights == "none"
    with pytest.raises(SystemExit):
        bench_cpu.parse_args(["--batches", "0"])


def test_gpu_check_script_is_valid_and_its_benchmark_arguments_parse():
    import re
    import subprocess

    script = ROOT / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    line = re.search(r'"\$PY" scripts/bench_gpu\.py (.*?)--out', text, re.S).group(1)
    args = _script("bench_gpu").parse_args(line.replace("\\\n", " ").split())
    assert args.models == ["vit_b16", "resnet50"] and args.batches == [64, 256]
    assert args.weights == "none" and args.dtype == "bf16"
    assert '-m "gpu or tensorrt"' in text and "gpu_check.json" in text


def test_summary_shows_each_speedup_with_its_interval():
    from mpdeploy.report import _speed_rows

    rows = dict(
        _speed_rows(
            {
                "bench_comparison": "dense vs pruned",
                "speedup_median": 1.9,
                "speedup_best": 2.0,
                "speedup_best_batch": 8,
                "mac_ratio": 2.0,
                "speedup_by_batch": {"1": 1.8, "8": 2.0},
                "speedup_ci95_by_batch": {"1": [1.75, 1.86], "8": [1.95, 2.04]},
            }
        )
    )
    assert rows["speedup, 95 % CI"] == "batch 1: 1.80× [1.75, 1.86], batch 8: 2.00× [1.95, 2.04]"

"""The summary table printed at the end of `mpdeploy build` (every figure is from the manifest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _giga(value: Any) -> str:
    return f"{value / 1e9:.3f} G" if isinstance(value, (int, float)) else "–"


def _mega(value: Any) -> str:
    return f"{value / 1e6:.2f} M" if isinstance(value, (int, float)) else "–"


def _pct(value: Any) -> str:
    return f"{value:.2%}" if isinstance(value, (int, float)) else "–"


def _num(value: Any, fmt: str = ".3g") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "–"


def summary_table(manifest: dict[str, Any], build_dir: Path) -> str:
    head = manifest.get("headline", {})
    model = manifest.get("model", {})
    rows = [
        ("model", model.get("timm_name", "–")),
        ("weights", model.get("weights", "–")),
        (
            "dense MACs / params",
            f"{_giga(head.get('dense_macs'))} / {_mega(head.get('dense_params'))}",
        ),
    ]
    if head.get("mac_reduction"):
        rows.append(
            (
                "pruned MACs / params",
                f"{_giga(head.get('pruned_macs'))} / {_mega(head.get('pruned_params'))}",
            )
        )
        rows.append(("MAC reduction", _pct(head.get("mac_reduction"))))
    if head.get("sparsity_pattern"):
        rows.append(
            (
                "N:M sparsity",
                f"{head['sparsity_pattern']}: sparse-execution MACs "
                f"{_giga(head.get('sparse_execution_macs'))}",
            )
        )
    if head.get("tome_r"):
        rows.append(
            (
                "token merging",
                f"r={head['tome_r']} ({head.get('tome_schedule')}), "
                f"{head.get('tome_tokens_after_last_block')} tokens after the last block, "
                f"MACs {_giga(head.get('tome_macs'))} ({_pct(head.get('tome_mac_reduction'))} fewer)",
            )
        )
    if head.get("total_mac_reduction") is not None:
        rows.append(("sparse-execution MAC reduction", _total_reduction(head)))
    if head.get("parity_inputs_with_changed_merges"):
        checked = (
            "still within the elementwise tolerances"
            if head.get("parity_changed_merges_within_tolerance")
            else "left out of the elementwise check"
        )
        rows.append(
            (
                "parity merge decisions",
                f"{head['parity_inputs_with_changed_merges']} input(s) merged other tokens in the "
                f"engine ({checked}; see parity/report.json)",
            )
        )
    if "certified_fraction" in head:
        rows.append(
            (
                "pruning certificate",
                f"{_pct(head['certified_fraction'])} of calibration predictions provably unchanged",
            )
        )
    rows += [
        ("engine", f"{head.get('backend', '–')} {head.get('precision', '')}".strip()),
        (
            "parity",
            f"{head.get('parity', '–')} (max abs error {_num(head.get('parity_max_abs_error'))}, "
            f"top-1 agreement {_pct(head.get('parity_top1_agreement'))})",
        ),
    ]
    rows += _speed_rows(head)
    if head.get("triton_model"):
        # the build's own repository; a --triton-repo publish has its own version, shown below
        rows.append(
            (
                "Triton model",
                f"model_repository/{head['triton_model']}/{head.get('triton_version')} (in the build)",
            )
        )
    if head.get("published"):
        rows.append(("published to", head["published"]))
    rows.append(("build directory", str(build_dir)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _total_reduction(head: dict[str, Any]) -> str:
    """N:M (+ ToMe) vs dense; with ToMe, the paper's accounting first: that is the comparable one."""
    measured = _pct(head["total_mac_reduction"])
    if head.get("paper_accounting_mac_reduction") is None:
        return f"{measured} vs dense"
    return (
        f"{_pct(head['paper_accounting_mac_reduction'])} vs dense in the MP paper's accounting "
        f"(the figure comparable with the paper), {measured} counted on the exported graph: "
        f"{head.get('mac_accounting_note', '')}"
    )


def _speed_rows(head: dict[str, Any]) -> list[tuple[str, str]]:
    if head.get("bench_comparison") == "no pruning":
        return [
            (
                "latency, batch 1",
                f"{_num(head.get('latency_ms_batch1'))} ms "
                "(nothing was pruned, so there is no speedup to measure)",
            )
        ]
    if "speedup_median" not in head:
        return []
    text = (
        f"{_num(head['speedup_median'], '.2f')}× median over batch sizes, best "
        f"{_num(head.get('speedup_best'), '.2f')}× at batch {head.get('speedup_best_batch')}; "
        f"MAC ratio {_num(head.get('mac_ratio'), '.2f')}× is the limit"
    )
    rows = [("measured speedup", text)]
    intervals = head.get("speedup_ci95_by_batch") or {}
    speedups = head.get("speedup_by_batch") or {}
    if any(intervals.values()):
        rows.append(
            (
                "speedup, 95 % CI",
                ", ".join(
                    f"batch {b}: {_num(speedups.get(b), '.2f')}× "
                    f"[{_num(ci[0], '.2f')}, {_num(ci[1], '.2f')}]"
                    for b, ci in intervals.items()
                    if ci
                ),
            )
        )
    if head.get("bench_warning"):
        rows.append(("bench warning", str(head["bench_warning"])))
    return rows

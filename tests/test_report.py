"""The summary table shows what the manifest measured, and says so when nothing was compared."""

from pathlib import Path

from mpdeploy.report import summary_table


def _manifest(**headline):
    base = {
        "dense_macs": 2e9,
        "dense_params": 5e6,
        "backend": "onnxruntime",
        "precision": "fp32",
        "parity": "pass",
        "parity_max_abs_error": 1e-6,
        "parity_top1_agreement": 1.0,
    }
    return {"model": {"timm_name": "m", "weights": "none"}, "headline": {**base, **headline}}


def test_pruned_build_shows_speedup_next_to_mac_ratio():
    text = summary_table(
        _manifest(
            mac_reduction=0.5,
            pruned_macs=1e9,
            speedup_median=1.83,
            speedup_best=1.93,
            speedup_best_batch=8,
            mac_ratio=2.01,
        ),
        Path("b"),
    )
    assert "1.83× median" in text and "1.93× at batch 8" in text and "MAC ratio 2.01×" in text
    assert "50.00%" in text


def test_unpruned_build_does_not_claim_a_speedup():
    text = summary_table(_manifest(bench_comparison="no pruning", latency_ms_batch1=1.8), Path("b"))
    assert "no speedup to measure" in text and "measured speedup" not in text


def test_changed_merge_decisions_say_whether_they_were_checked():
    within = summary_table(
        _manifest(parity_inputs_with_changed_merges=3, parity_changed_merges_within_tolerance=True),
        Path("b"),
    )
    assert "3 input(s) merged other tokens" in within
    assert "still within the elementwise tolerances" in within
    outside = summary_table(
        _manifest(
            parity_inputs_with_changed_merges=2, parity_changed_merges_within_tolerance=False
        ),
        Path("b"),
    )
    assert "left out of the elementwise check" in outside

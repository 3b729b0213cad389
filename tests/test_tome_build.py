"""Token merging in a build: the paper-convention and exported-graph MAC reductions (ViT-B/16
2:4 + r=8 on the meta device; both in sparsity.json, the manifest and the summary of a demo
build), tome.png, and the --tome bad-input refusals run as a real `mpdeploy` process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch

from mpdeploy.families.tome import ToMeSettings, apply_tome
from mpdeploy.pipeline import BuildOptions, build, tome_mac_accounting
from mpdeploy.prune.macs import count_macs, mac_reduction
from mpdeploy.report import summary_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_vit_b16_2of4_tome8_paper_accounting_is_the_papers_59_81():
    with torch.device("meta"):
        dense = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    tome = ToMeSettings(8).to_dict()
    accounting = tome_mac_accounting(dense, tome, (2, 4))  # what the sparsify stage records
    assert accounting["paper_accounting_mac_reduction"] == pytest.approx(0.598, abs=0.001)
    assert accounting["paper_accounting_mac_reduction"] == pytest.approx(0.59807, abs=5e-5)
    graph = accounting["exported_graph_analytic_mac_reduction"]
    assert graph == pytest.approx(0.6104, abs=5e-5)
    # the exported-graph figure from a real (meta-device) forward: block Linears at 2:4
    dense_macs = count_macs(dense, (1, 3, 224, 224)).total_macs
    apply_tome(dense, ToMeSettings(8))
    counted = count_macs(dense, (1, 3, 224, 224))
    eligible = sum(layer.macs for layer in counted.layers if layer.name.startswith("blocks."))
    measured = mac_reduction(dense_macs, counted.total_macs - 0.5 * eligible)
    assert measured == pytest.approx(graph, abs=0.005 * graph)


def test_demo_build_headline_states_both_figures_and_writes_tome_png(in_tmp, monkeypatch):
    import mpdeploy.tome_plot

    monkeypatch.setattr(mpdeploy.tome_plot, "SWEEP_POINTS", 2)  # r = 0, 4 (the build's), 10
    monkeypatch.setattr(mpdeploy.tome_plot, "SWEEP_IMAGES", 64)  # of the 360 held-out digits
    opts = BuildOptions(tome=4, sparsity="2:4", calib_size=8, compensate="none", out="b")
    result = build(opts, progress=False, stages=("resolve", "calibrate", "prune", "sparsify"))
    head = result.manifest["headline"]
    paper, graph = head["paper_accounting_mac_reduction"], head["total_mac_reduction"]
    assert 0.5 < paper < graph < 0.6  # the exported graph merges before the MLP: fewer MACs
    merging = json.loads((in_tmp / "b" / "sparsity.json").read_text())["token_merging"]
    assert merging["paper_accounting_mac_reduction"] == paper
    assert merging["exported_graph_mac_reduction"] == graph
    assert merging["exported_graph_analytic_mac_reduction"] == pytest.approx(graph, rel=0.005)
    assert "MLP" in merging["difference"] and head["mac_accounting_note"] == merging["difference"]
    (row,) = [
        line
        for line in summary_table(result.manifest, result.build_dir).splitlines()
        if "sparse-execution MAC reduction" in line
    ]
    assert f"{paper:.2%} vs dense in the MP paper's accounting" in row
    assert f"{graph:.2%} counted on the exported graph" in row and "MLP" in row
    assert (in_tmp / "b" / "tome.png").read_bytes()[:8] == PNG_MAGIC
    sweep = json.loads((in_tmp / "b" / "plan.json").read_text())["tome"]["top1_sweep"]
    assert sweep["images"] == "64 held-out digits (test split)"
    assert set(sweep["top1_by_r"]) == {"0", "4", "10"}
    assert sweep["top1_by_r"]["0"] > 0.9  # the bundled demo weights on their held-out digits
    assert result.manifest["stages"]["prune"]["status"] == "done"


def test_a_total_reduction_through_the_merging_models_target(in_tmp, monkeypatch):
    """docs/tome.md's recipe: with --tome, --target-macs is a fraction of the merging model's
    MACs; a --target-macs 0 build's plan.json gives both counts, and 1 − (1 − T) · dense /
    merging then lands the build's headline (against dense) at the total T."""
    import mpdeploy.tome_plot

    monkeypatch.setattr(mpdeploy.tome_plot, "SWEEP_POINTS", 0)
    monkeypatch.setattr(mpdeploy.tome_plot, "SWEEP_IMAGES", 8)
    stages = ("resolve", "calibrate", "analyze", "prune")
    first = build(BuildOptions(tome=3, calib_size=16, out="m"), progress=False, stages=stages)
    record = json.loads((in_tmp / "m" / "plan.json").read_text())["tome"]
    assert record["macs"] < record["dense_macs"]
    assert first.manifest["headline"]["mac_reduction"] == pytest.approx(record["mac_reduction"])
    total = 0.6
    target = 1.0 - (1.0 - total) * record["dense_macs"] / record["macs"]
    opts = BuildOptions(tome=3, target_macs=round(target, 4), calib_size=16, out="t")
    head = build(opts, progress=False, stages=stages).manifest["headline"]
    assert head["dense_macs"] == record["dense_macs"]
    assert head["mac_reduction"] == pytest.approx(total, abs=0.01)  # the planner's tolerance


BAD_TOME = [
    (["--tome", "11"], "at least one must remain"),
    (["--tome", "11", "--tome-schedule", "decreasing"], "at least one must remain"),
    (["--tome", "-3"], "whole number of tokens"),
    (["--model", "resnet18", "--weights", "none", "--tome", "2"], "applies to ViTs only"),
    (["--tome", "4", "--tome-schedule", "linear"], "unknown --tome-schedule 'linear'"),
]


def _one_error_line(code: int, stderr: str, message: str) -> None:
    lines = stderr.strip().splitlines()
    assert code != 0 and len(lines) == 1 and message in lines[0], stderr
    assert lines[0].startswith("mpdeploy: error:") and "Traceback" not in stderr


def test_bad_tome_input_one_line_nothing_written(in_tmp, capsys):
    from mpdeploy.cli import main

    for argv, message in BAD_TOME:
        code = main(["build", *argv, "--out", "out"])
        _one_error_line(code, capsys.readouterr().err, message)
        assert not (in_tmp / "out").exists() and not any(in_tmp.iterdir()), argv


def test_bad_tome_input_in_a_real_process(in_tmp):
    # the installed entry point's exit status and stderr, not just main()'s return value
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from mpdeploy.cli import main; sys.exit(main())"]
        + ["build", "--model", "resnet18", "--weights", "none", "--tome", "2", "--out", "out"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    _one_error_line(run.returncode, run.stderr, "applies to ViTs only")
    assert not (in_tmp / "out").exists() and not any(in_tmp.iterdir())


def test_sweep_set_from_a_labelled_train_folder_and_a_token_only_png(tmp_path, monkeypatch):
    import mpdeploy.tome_plot as tome_plot
    from mpdeploy.data.digits import write_image_folder
    from mpdeploy.models import create_model
    from mpdeploy.models.demo import DEMO_MODEL

    data_config = create_model(DEMO_MODEL).data_config
    labelled = write_image_folder("test", tmp_path / "labelled")
    assert tome_plot.sweep_image_count(17.56e9, 7) == 32  # ViT-B/16: the sweep stays ~4 TMACs
    assert tome_plot.sweep_image_count(48.3e6, 6) == 360  # the demo: all its test digits
    monkeypatch.setattr(tome_plot, "SWEEP_IMAGES", 20)
    images, labels, what = tome_plot.labelled_sweep_set("vit_x", str(labelled), data_config)
    assert images.shape == (20, 3, 32, 32) and labels.shape == (20,)
    assert what.startswith("20 --train images") and "not held out" in what
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    (labelled / "0").rename(unlabelled / "0")  # images without class folders of their own
    assert tome_plot.labelled_sweep_set("vit_x", str(unlabelled / "0"), data_config) is None
    assert tome_plot.labelled_sweep_set("vit_x", None, data_config) is None
    assert tome_plot.sweep_values(16, 7) == [0, 3, 6, 7, 10, 13, 16]
    record = dict(
        r=8, schedule="constant", prefix_tokens=1, patch_tokens=196, tokens_after_last_block=101
    )
    record["tokens_per_block"] = [197 - 8 * block for block in range(12)]
    png = tome_plot.write_tome_png(tmp_path / "tome.png", record)
    assert png.read_bytes()[:8] == PNG_MAGIC

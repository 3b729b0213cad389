"""End to end: `mpdeploy build` produces a complete, parity-checked build directory."""

import json
from pathlib import Path

import pytest
from _helpers import polygraphy_recheck

from mpdeploy.cli import main
from mpdeploy.pipeline import BuildOptions, build

EXPECTED_FILES = [
    "manifest.json",
    "calibration.json",
    "calibration.safetensors",
    "dense/model.json",
    "dense/model.safetensors",
    "spectrum.json",
    "spectrum.png",
    "pruned/model.json",
    "pruned/model.safetensors",
    "model.onnx",
    "engine/engine.json",
    "parity/inputs.json",
    "parity/reference.json",
    "parity/results.json",
    "parity/report.json",
    "bench.json",
    "bench.png",
]
FAST_BENCH = ("--bench-batch", "1", "--bench-batch", "4", "--bench-iterations", "30")


def assert_complete(build_dir: Path) -> dict:
    for name in EXPECTED_FILES:
        assert (build_dir / name).is_file(), name
    manifest = json.loads((build_dir / "manifest.json").read_text())
    for stage in (
        "resolve",
        "calibrate",
        "analyze",
        "prune",
        "export",
        "engine",
        "verify",
        "bench",
        "package",
    ):
        assert manifest["stages"][stage]["status"] in ("done",) or manifest["stages"][stage][
            "status"
        ].startswith("skipped"), stage
    assert manifest["stages"]["verify"]["status"] == "done"
    # Hashes recorded for what each stage wrote really are those files' hashes.
    from mpdeploy.fileio import sha256_file

    for rel, digest in manifest["stages"]["export"]["outputs"].items():
        assert sha256_file(build_dir / rel) == digest
    report = json.loads((build_dir / "parity" / "report.json").read_text())
    assert report["verdict"] == "pass" and report["top1_agreement"] >= 0.99
    recheck = polygraphy_recheck(build_dir)
    assert recheck.returncode == 0, recheck.stdout[-3000:] + recheck.stderr[-3000:]
    assert not list(build_dir.parent.glob(".*partial"))
    return manifest


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "build"
    result = build(BuildOptions(out=str(out), bench_batches=(1, 8)), progress=False)
    return result


def test_demo_build_is_complete(demo_build):
    manifest = assert_complete(demo_build.build_dir)
    head = manifest["headline"]
    assert manifest["model"]["timm_name"] == "mpdeploy_demo_vit"
    assert manifest["model"]["weights"] == "bundled"
    assert head["dense_macs"] > 0 and head["mac_reduction"] == 0.0
    assert manifest["environment"]["versions"]["torch"]
    assert (demo_build.build_dir / "model_repository").is_dir()


def test_demo_eval_on_held_out_split(demo_build, capsys):
    assert main(["eval", "--build", str(demo_build.build_dir), "--data", "demo"]) == 0
    out = capsys.readouterr().out
    report = json.loads((demo_build.build_dir / "eval.json").read_text())
    assert report["images"] == 360
    top1 = {k: v["top1"] for k, v in report["results"].items()}
    # Unpruned: all three are the same function, so identical accuracy, and the demo is trained.
    assert top1["dense"] == top1["pruned"] == top1["engine"] >= 0.9
    assert "engine" in out


def test_eval_on_an_image_folder_matches_demo_split(demo_build, tmp_path):
    from mpdeploy.data.digits import write_image_folder
    from mpdeploy.evaluate import evaluate_build

    write_image_folder("test", tmp_path / "digits")
    (tmp_path / "digits" / "3" / "broken.png").write_bytes(b"nope")
    folder = evaluate_build(demo_build.build_dir, str(tmp_path / "digits"))
    demo = evaluate_build(demo_build.build_dir, "demo")
    assert folder["unreadable"] == 1 and folder["images"] == demo["images"]
    assert folder["results"]["engine"]["top1"] == pytest.approx(
        demo["results"]["engine"]["top1"], abs=0.01
    )


def test_stage_commands_need_force_to_redo(demo_build, capsys):
    build_dir = str(demo_build.build_dir)
    assert main(["verify", "--build", build_dir]) != 0
    assert "pass --force" in capsys.readouterr().err
    assert main(["verify", "--build", build_dir, "--force"]) == 0


@pytest.mark.parametrize("model", ["test_vit", "test_resnet"])
def test_random_weight_builds_via_cli(in_tmp, capsys, model):
    code = main(
        [
            "build",
            "--model",
            model,
            "--weights",
            "none",
            "--calib-size",
            "32",
            "--out",
            "b",
            *FAST_BENCH,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "parity" in out and "pass" in out
    assert_complete(in_tmp / "b")


def test_parity_failure_exits_3_and_keeps_evidence(in_tmp, capsys, monkeypatch):
    from mpdeploy.verify import parity

    monkeypatch.setitem(
        parity.TOLERANCES, "fp32", {"atol": 0.0, "rtol": 0.0, "min_top1_agreement": 1.0}
    )
    code = main(
        [
            "build",
            "--model",
            "test_resnet",
            "--weights",
            "none",
            "--calib-size",
            "8",
            "--out",
            "b",
            *FAST_BENCH,
        ]
    )
    err = capsys.readouterr().err
    assert code == 3 and "parity FAILED" in err and "Traceback" not in err
    assert not (in_tmp / "b").exists()
    report = json.loads((in_tmp / "b.failed" / "parity" / "report.json").read_text())
    assert report["verdict"] == "fail"


def test_package_cli_publishes_new_versions_and_checks(demo_build, tmp_path, capsys):
    repo = tmp_path / "repo"
    build_dir = str(demo_build.build_dir)
    assert main(["package", "--build", build_dir, "--triton-repo", str(repo)]) == 0
    assert main(["package", "--build", build_dir, "--triton-repo", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "version 1" in out and "version 2" in out
    model_dir = next(p for p in repo.iterdir() if p.is_dir())
    assert sorted(p.name for p in model_dir.iterdir() if p.name.isdigit()) == ["1", "2"]
    assert main(["package", "--check", str(repo)]) == 0
    (model_dir / "config.pbtxt").write_text("name: 'x'\nmax_batch_size: banana\n")
    assert main(["package", "--check", str(repo)]) != 0
    assert "problem" in capsys.readouterr().err


def test_spectrum_cli(in_tmp, capsys):
    assert main(["spectrum", "--model", "test_resnet", "--weights", "none"]) == 0
    out = capsys.readouterr().out
    spectrum = json.loads(
        (in_tmp / "engines" / "test_resnet-spectrum" / "spectrum.json").read_text()
    )
    assert "layers" in out and len(spectrum["layers"]) > 5
    assert (in_tmp / "engines" / "test_resnet-spectrum" / "spectrum.png").stat().st_size > 10_000
    args = ["spectrum", "--model", "test_resnet", "--weights", "none", "--force"]
    assert main([*args, "--layer", "layer1.0.conv2"]) == 0
    spectrum = json.loads(
        (in_tmp / "engines" / "test_resnet-spectrum" / "spectrum.json").read_text()
    )
    assert spectrum["highlight_layer"] == "layer1.0.conv2"
    with_eigenvalues = [r["name"] for r in spectrum["layers"] if r.get("eigenvalues")]
    assert with_eigenvalues == ["layer1.0.conv2"]
    assert main([*args, "--layer", "no.such.layer"]) != 0
    assert "no layer 'no.such.layer'" in capsys.readouterr().err


def test_pruned_demo_build_measures_speed_against_dense(in_tmp, capsys):
    code = main(["build", "--target-macs", "0.5", "--out", "p", *FAST_BENCH])
    out = capsys.readouterr().out
    assert code == 0, out
    manifest = assert_complete(in_tmp / "p")
    head = manifest["headline"]
    assert abs(head["mac_reduction"] - 0.5) <= 0.01
    assert head["pruned_macs"] < head["dense_macs"] and 0 <= head["certified_fraction"] <= 1
    plan = json.loads((in_tmp / "p" / "plan.json").read_text())
    assert plan and (in_tmp / "p" / "bench" / "dense.onnx").is_file()
    bench = manifest["stages"]["bench"]["headline"]
    assert bench["bench_comparison"] != "no pruning" and bench["speedup_median"] > 0
    assert "measured speedup" in out and "MAC ratio" in out


def test_sparse_build_is_confirmed_by_polygraphy(in_tmp, capsys):
    code = main(
        [
            "build",
            "--model",
            "test_vit",
            "--weights",
            "none",
            "--sparsity",
            "2:4",
            "--calib-size",
            "16",
            "--out",
            "s",
            *FAST_BENCH,
        ]
    )
    assert code == 0, capsys.readouterr().err
    manifest = assert_complete(in_tmp / "s")
    sparsity = json.loads((in_tmp / "s" / "sparsity.json").read_text())
    assert manifest["headline"]["sparse_layers"] > 0
    assert (in_tmp / "s" / "pruned" / "masks.safetensors").is_file()
    assert "2:4" in json.dumps(sparsity) and "polygraphy" in json.dumps(sparsity).lower()
    # the default obs_shrink, its folds the builtin photos the crops were cut from (docs/sparsity.md)
    assert sparsity["method"] == "obs_shrink"
    eligible = [layer for layer in sparsity["layers"] if layer["eligible"]]
    assert eligible and all(0.0 <= layer["shrinkage"] <= 1.0 for layer in eligible)


@pytest.mark.slow
def test_prune_sparsify_recover_build(in_tmp, capsys):
    code = main(
        [
            "build",
            "--target-macs",
            "0.3",
            "--sparsity",
            "2:4",
            "--recover-epochs",
            "1",
            "--train",
            "demo",
            "--out",
            "c",
            *FAST_BENCH,
        ]
    )
    assert code == 0, capsys.readouterr().err
    manifest = assert_complete(in_tmp / "c")
    for stage in ("prune", "sparsify", "recover"):
        assert manifest["stages"][stage]["status"] == "done", stage
    # The masks survived recovery: every masked weight is still exactly zero.
    from safetensors.torch import load_file

    masks = load_file(str(in_tmp / "c" / "pruned" / "masks.safetensors"))
    weights = load_file(str(in_tmp / "c" / "pruned" / "model.safetensors"))
    assert masks
    for name, mask in masks.items():
        assert not weights[name][~mask.bool()].any(), name

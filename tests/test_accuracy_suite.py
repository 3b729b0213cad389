"""scripts/accuracy_suite.py end to end on the bundled demo ViT: one pruned cell and the dense cell."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EVAL_IMAGES = 48


@pytest.fixture
def suite(tmp_path, monkeypatch):
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    import accuracy_suite

    settings = dataclasses.replace(
        accuracy_suite.SETTINGS, calib_size=32, eval_limit=EVAL_IMAGES, results_dir=tmp_path
    )
    monkeypatch.setattr(accuracy_suite, "SETTINGS", settings)
    for cached in (accuracy_suite.held_out, accuracy_suite.calibration):
        cached.cache_clear()
    yield accuracy_suite
    for cached in (accuracy_suite.held_out, accuracy_suite.calibration):
        cached.cache_clear()


def independent_dense_top1() -> float:
    """The demo's top-1 on the first val images, computed without the suite's code."""
    import torch
    import train_suite
    from PIL import Image

    from mpdeploy.data.calibration import eval_transform
    from mpdeploy.models import create_model

    loaded = create_model("demo", weights="hub")
    images, labels = train_suite.split_arrays("val")
    transform = eval_transform(loaded.data_config)
    batch = torch.stack([transform(Image.fromarray(i, mode="RGB")) for i in images[:EVAL_IMAGES]])
    with torch.no_grad():
        predicted = loaded.model.eval()(batch).argmax(1).numpy()
    return float((predicted == labels[:EVAL_IMAGES]).mean())


def test_pruned_cell_record_and_dense_cell(suite, tmp_path):
    record = suite.run_cell("demo", "magnitude", "none", 0.3, 0, 0, "val")
    assert {k: record[k] for k in ("model", "method", "compensate", "target", "split")} == {
        "model": "demo",
        "method": "magnitude",
        "compensate": "none",
        "target": 0.3,
        "split": "val",
    }
    assert record["recover_epochs"] == 0 and record["seed"] == 0 and record["metric"] == "top1"
    assert record["eval_images"] == EVAL_IMAGES and record["calib_images"] == 32
    assert abs(record["mac_reduction"] - 0.3) <= 0.01  # the planner's tolerance, counted MACs
    assert record["pruned_macs"] < record["dense_macs"]
    assert record["top1"] == record["top1_zero_shot"]
    assert 0.0 <= record["top1"] <= 1.0
    stored = tmp_path / "val" / "demo" / "magnitude__none__t0.30__r0__s0.json"
    assert json.loads(stored.read_text()) == record
    assert suite.run_cell("demo", "magnitude", "none", 0.3, 0, 0, "val") == record  # cached

    dense = suite.run_cell("demo", "magnitude", "none", 0.0, 0, 0, "val")
    assert dense["top1"] == dense["dense_top1"] == record["dense_top1"]
    assert dense["top1"] == pytest.approx(independent_dense_top1(), abs=1e-9)
    assert dense["mac_reduction"] == 0.0


def test_grid_reads_the_criterion_registry_and_seeds_every_prune_of_ours(suite):
    from mpdeploy.prune.criteria import CRITERIA

    assert set(CRITERIA) <= set(suite.all_methods())
    cells = suite.grid(
        ["demo"],
        ["magnitude", "random", "nm_cast", "tp_magnitude"],
        ["none"],
        [0.5],
        [0, 1],
        [0, 1, 2],
    )
    seeds = {(c.method, c.recover_epochs): [] for c in cells}
    for c in cells:
        seeds[(c.method, c.recover_epochs)].append(c.seed)
    # our prunes draw from their seed (Fisher labels, row samples, shuffles); Torch-Pruning not
    for method in ("magnitude", "random", "nm_cast"):
        assert sorted(seeds[(method, 0)]) == [0, 1, 2]
    assert seeds[("tp_magnitude", 0)] == [0] and sorted(seeds[("tp_magnitude", 1)]) == [0, 1, 2]
    assert {c.target for c in cells if c.method == "nm_cast"} == {"2:4"}
    assert [c.seed for c in cells] == sorted((c.seed for c in cells), key=lambda s: s > 0)
    order = [(c.method, c.recover_epochs) for c in cells if c.seed == 0]
    assert order.index(("magnitude", 0)) + 1 == order.index(("magnitude", 1))  # one prune
    # a zero-shot cell prunes with its seed; a recovery cell trains seed 0's prune
    assert [suite.prune_seed("mp_fisher", 0, s) for s in (0, 1, 2)] == [0, 1, 2]
    assert [suite.prune_seed("mp_fisher", 1, s) for s in (0, 1, 2)] == [0, 0, 0]
    assert [suite.prune_seed("random", 1, s) for s in (0, 1, 2)] == [0, 1, 2]
    assert suite.prune_seed("tp_taylor", 0, 2) == 0


def test_zero_shot_seeds_are_draws_of_the_prune(suite):
    """Two zero-shot seeds of a Fisher criterion prune differently (its labels are drawn);
    the record says which prune seed it used."""
    one, two = (suite.run_cell("demo", "mp_fisher", "none", 0.5, 0, s, "val") for s in (0, 1))
    assert one["prune_seed"] == 0 and two["prune_seed"] == 1
    a, b = (suite._pruned_cached("demo", "mp_fisher", "none", 0.5, s).model for s in (0, 1))
    differs = [
        name
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True)
        if x.shape != y.shape or not torch.equal(x, y)
    ]
    assert differs, "seeds 0 and 1 gave the same prune: the seed does not reach the criterion"


def test_unknown_method_is_one_line_and_nothing_written(suite, tmp_path, capsys):
    assert suite.main(["--split", "val", "--methods", "no_such_method"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_method" in err[0]
    assert not any(tmp_path.iterdir())
    assert suite.main(["--split", "val", "--train-seed", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--train-seed" in err[0]
    assert not any(tmp_path.iterdir())


def test_target_table_gives_the_margin_in_held_out_images(suite):
    """A 2:4 default one image behind magnitude reads as a miss by -1.0 image, a tie as +0.0."""
    from mpdeploy.prune.nm import SparsityConfig

    default = suite.defaults()
    n = 360

    def record(method, comp, target, epochs, correct, seed=0):
        return {
            "model": "vit_t",
            "method": method,
            "compensate": comp,
            "target": target,
            "recover_epochs": epochs,
            "seed": seed,
            "dense_top1": 350 / n,
            "eval_images": n,
            "top1": correct / n,
        }

    nm_default = f"nm_{SparsityConfig.method}"
    records = [
        record(nm_default, default["compensate"], "2:4", 0, 340),
        record("nm_magnitude", default["compensate"], "2:4", 0, 341),
        # +1 epoch, two seeds each: means 345.5 against 345.5 images, a tie
        record(nm_default, default["compensate"], "2:4", 1, 345, seed=0),
        record(nm_default, default["compensate"], "2:4", 1, 346, seed=1),
        record("nm_magnitude", default["compensate"], "2:4", 1, 344, seed=0),
        record("nm_magnitude", default["compensate"], "2:4", 1, 347, seed=1),
        # 50 %: 343 images against dense 350 - 2 pp (342.8 images): met by 0.2 image
        record(default["method"], default["compensate"], 0.5, 0, 343),
    ]
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")
        for line in suite.target_checks(records)
        if line.startswith("| ") and "vit_t" in line
    }
    zero_shot = rows[f"2:4 {SparsityConfig.method} beats magnitude, zero-shot"]
    assert zero_shot[4] == "-1.0" and zero_shot[5].strip(" |") == "**missed**"
    one_epoch = rows[f"2:4 {SparsityConfig.method} beats magnitude, +1 ep"]
    assert one_epoch[4] == "+0.0" and one_epoch[5].strip(" |") == "tie"
    fifty = rows["50 % zero-shot within 2 pp of dense"]
    assert fifty[4] == "+0.2" and fifty[5].strip(" |") == "met"
    unmeasured = rows["70 % +1 ep within 3 pp of dense"]
    assert unmeasured[4] == "–" and unmeasured[5].strip(" |") == "not measured"


def test_target_met_exactly_is_met_despite_float32_round_off(suite):
    """Dense 292/300 and three recovery seeds at 283/300: exactly 3 pp below, so met, margin 0."""
    import numpy as np

    default = suite.defaults()
    records = [
        {
            "model": "vit_s",
            "method": default["method"],
            "compensate": default["compensate"],
            "target": 0.7,
            "recover_epochs": 1,
            "seed": seed,
            "dense_top1": float(np.float32(292 / 300)),
            "eval_images": 300,
            "top1": float(np.float32(283 / 300)),
        }
        for seed in range(3)
    ]
    (row,) = [
        line.split(" | ")
        for line in suite.target_checks(records)
        if line.startswith("| 70 % +1 ep within 3 pp")
    ]
    assert row[4] == "+0.0" and row[5].strip(" |") == "met"


def test_compare_sets_the_default_against_the_best_peer_both_runs_measured(suite, tmp_path):
    """scripts/accuracy_compare.py: margins in images, peers only where both runs have them."""
    import accuracy_compare

    default = suite.defaults()
    n = 300

    def record(method, correct, comp=None, target=0.7):
        return {
            "model": "vit_t",
            "method": method,
            "compensate": comp or default["compensate"],
            "target": target,
            "recover_epochs": 0,
            "seed": 0,
            "eval_images": n,
            "top1": correct / n,
        }

    run_a = [record(default["method"], 250), record("taylor", 253), record("magnitude", 240)]
    run_b = [
        record(default["method"], 260),
        record("taylor", 255),
        record("magnitude", 262),
        record("random", 299),  # only in run B: not a peer
        record("tp_taylor", 258, comp="none"),  # only in run B: not a peer
    ]
    (row,) = accuracy_compare.compare(run_a, run_b)
    assert row["peers"] == 2
    assert row["a_best_other"] == f"taylor/{default['compensate']}"
    assert abs(row["a_margin"] - (-3.0)) < 1e-9
    assert row["b_best_other"] == f"magnitude/{default['compensate']}"
    assert abs(row["b_margin"] - (-2.0)) < 1e-9
    summary = accuracy_compare.summary([row])
    assert summary["behind_more_in_both"] == 1 and summary["points"] == 1
    assert summary["behind_more_in_all"] == 1
    # a third run without magnitude: only taylor is a peer of all three
    run_c = [record(default["method"], 270), record("taylor", 280)]
    (row,) = accuracy_compare.compare(run_a, run_b, run_c)
    assert row["peers"] == 1
    assert [round(row[f"{n}_margin"], 9) for n in "abc"] == [-3.0, 5.0, -10.0]
    summary = accuracy_compare.summary([row])
    assert summary["behind_more_in_all"] == 0 and "behind_more_in_both" not in summary
    assert summary["c_behind_more"] == 1
    assert accuracy_compare.markdown([row])[0].count("margin") == 3
    # a payload file and a missing path on the command line
    payload = tmp_path / "a.json"
    payload.write_text(json.dumps({"splits": {"val": run_a}}))
    assert accuracy_compare.load_run(payload, "val") == run_a
    assert accuracy_compare.main(["--a", str(payload), "--b", str(tmp_path / "missing")]) == 2


def test_cells_from_runs_exactly_the_listed_cells(suite, tmp_path, capsys):
    """--cells-from: the cells of the split in a payload, nothing else; a bad file is one line."""
    listed = {"model": "demo", "method": "mp_fisher_taylor", "compensate": "lsq+bn", "target": 0}
    other = {**listed, "model": "vit_t"}
    payload = tmp_path / "listed.json"
    payload.write_text(
        json.dumps(
            {
                "splits": {
                    "val": [{**listed, "recover_epochs": 0, "seed": 0, "top1": 0.5}],
                    "test": [{**other, "recover_epochs": 0, "seed": 0, "top1": 0.5}],
                }
            }
        )
    )
    assert suite.cells_from(payload, "val") == [
        suite.Cell("demo", "mp_fisher_taylor", "lsq+bn", 0, 0, 0)
    ]
    assert suite.main(["--split", "val", "--cells-from", str(payload)]) == 0
    stored = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json"))
    assert stored == ["listed.json", "val/demo/mp_fisher_taylor__lsq+bn__t0.00__r0__s0.json"]
    capsys.readouterr()
    assert suite.main(["--split", "val", "--cells-from", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --cells-from")


def test_train_suite_passes_the_seed_and_cache_dir_to_train(suite, tmp_path, monkeypatch):
    """`train_suite.py --seed 3 --cache-dir D`: another training of the same recipe, elsewhere."""
    import train_suite

    calls = []

    def fake_train(spec, cache_dir, seed=0, threads=1):
        calls.append((spec.key, cache_dir, seed, threads))
        return {"key": spec.key, "params": 1, "val_top1": 0.5, "train_seconds": 0.0}

    monkeypatch.setattr(train_suite, "train", fake_train)
    argv = ["--models", "vit_t", "--seed", "3", "--cache-dir", str(tmp_path), "--threads", "2"]
    assert train_suite.main(argv) == 0
    assert calls == [("vit_t", tmp_path, 3, 2)]
    assert train_suite.parse_args([]).seed == 0
    # without --cache-dir, another seed trains beside the suite's own weights, not over them
    assert train_suite.parse_args([]).cache_dir == train_suite.CACHE_DIR
    assert (
        train_suite.parse_args(["--seed", "2"]).cache_dir == train_suite.CACHE_DIR / "train-seed-2"
    )


def test_train_seed_measures_another_training_kept_apart(suite, tmp_path, monkeypatch):
    """--train-seed 1: the digits model of that training (trained with seed 1 when missing), its
    cells beside the suite's own (not among them), the bundled models skipped, and the doc's
    replication section built from them."""
    import torch
    import train_suite
    from safetensors.torch import save_file

    weights = tmp_path / "weights"
    monkeypatch.setattr(train_suite, "CACHE_DIR", weights)
    trained = []

    def fake_train(spec, cache_dir, seed=0, threads=1):
        trained.append((spec.key, cache_dir, seed))
        torch.manual_seed(seed)
        cache_dir.mkdir(parents=True, exist_ok=True)
        model = train_suite.build_model(spec)
        save_file(model.state_dict(), str(train_suite.weights_path(spec.key, cache_dir)))
        summary = {"key": spec.key, "sha256": f"untrained-seed-{seed}"}
        train_suite.weights_path(spec.key, cache_dir).with_suffix(".json").write_text(
            json.dumps(summary)
        )
        return summary

    monkeypatch.setattr(train_suite, "train", fake_train)
    results = tmp_path / "results"
    monkeypatch.setattr(
        suite, "SETTINGS", dataclasses.replace(suite.SETTINGS, results_dir=results, train_seed=1)
    )
    suite._load_model.cache_clear()
    try:
        record = suite.run_cell("vit_t", "magnitude", "none", 0.0, 0, 0, "val")
        assert trained == [("vit_t", weights / "train-seed-1", 1)]
        assert record["train_seed"] == 1 and record["weights_sha256"] == "untrained-seed-1"
        stored = results / "train-seed-1" / "val" / "vit_t" / "magnitude__none__t0.00__r0__s0.json"
        assert json.loads(stored.read_text()) == record
        assert suite.load_records("val", results) == []  # the suite's own cells: untouched
        assert suite.skip_reason(suite.Cell("demo", "magnitude", "none", 0.3, 0, 0))
        assert suite.skip_reason(suite.Cell("vit_t", "magnitude", "none", 0.3, 0, 0)) is None
        assert suite.trainings(results) == [1]

        doc, doc_json = tmp_path / "accuracy.md", tmp_path / "accuracy.json"
        doc.write_text("# intro kept\n")
        monkeypatch.setattr(suite, "environment", lambda: {"machine": "test"})
        suite.write_doc(doc, doc_json)
        text = doc.read_text()
        assert text.startswith("# intro kept") and "trained with seed 1" in text
        payload = json.loads(doc_json.read_text())
        assert payload["splits"] == {} and payload["trainings"]["1"]["val"] == [record]
    finally:
        suite._load_model.cache_clear()


def test_recovery_cells_of_an_older_recipe_are_marked_in_the_model_table(suite):
    """A +1 epoch cell trained at batch 16 (71 steps on the 1,137 fit images) is older than
    today's rule (batch 8, 142 steps) and carries the mark; today's batch does not, nor does a
    label-free cell at batch 8 on 128 crops, whose batch the rule leaves as it was."""

    def record(method, target, epochs, batch=None, steps=None):
        r = {
            "model": "vit_t",
            "method": method,
            "compensate": "lsq+bn",
            "target": target,
            "recover_epochs": epochs,
            "seed": 0,
            "dense_top1": 0.97,
            "eval_images": 300,
            "eval_set": "digits val",
            "metric": "top1",
            "top1": 0.95,
        }
        if epochs:
            r.update(recover_steps=steps, recover_recipe={"batch_size": batch})
        return r

    assert suite.old_recipe(record("magnitude", 0.7, 1, 16, 71))
    assert suite.old_recipe(record("magnitude", 0.7, 1))  # no recipe recorded: before it was
    assert not suite.old_recipe(record("magnitude", 0.7, 1, 8, 142))
    assert not suite.old_recipe(record("magnitude", 0.7, 1, 8, 16))  # 128 calibration crops
    assert not suite.old_recipe(record("magnitude", 0.7, 0))
    # a BatchNorm network frozen on a folder without re-estimating first (before 2026-11-29
    # 09:30 UTC) is older; with the re-estimate recorded, or a ViT (no BatchNorm), it is not
    frozen = {**record("magnitude", 0.7, 1, 8, 142), "model": "resnet18_n"}
    frozen["recover_recipe"]["norms_frozen"] = True
    assert suite.old_recipe(frozen)
    frozen["recover_recipe"]["norms_reestimated"] = 2
    assert not suite.old_recipe(frozen)
    vit = record("magnitude", 0.7, 1, 8, 142)
    vit["recover_recipe"]["norms_frozen"] = True
    assert not suite.old_recipe(vit)
    records = [
        record("magnitude", 0.7, 0),
        record("magnitude", 0.7, 1, 16, 71),
        record("taylor", 0.7, 1, 8, 142),
    ]
    lines = suite.model_table("vit_t", records, [0.7])
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}
    assert rows["magnitude"].endswith(f"95.0%{suite.OLD_RECIPE} |")
    assert not rows["taylor"].endswith(f"{suite.OLD_RECIPE} |")
    assert any("older recipe" in line for line in lines)


def test_default_standing_lists_each_point_another_criterion_is_ahead(suite):
    """The generated "where the default is not the best" table: a criterion ahead by a mean of
    1.5 images is listed with that margin; a tie (same mean image count), a criterion behind and
    Torch-Pruning (a peer with its own target) are not; 2:4 compares N:M methods only."""
    from mpdeploy.prune.nm import SparsityConfig

    default = suite.defaults()
    comp = default["compensate"]
    nm_default = f"nm_{SparsityConfig.method}"

    def record(method, target, epochs, correct, seed=0, c=comp):
        return {
            "model": "vit_t",
            "method": method,
            "compensate": c,
            "target": target,
            "recover_epochs": epochs,
            "seed": seed,
            "dense_top1": 0.97,
            "eval_images": 300,
            "top1": correct / 300,
        }

    records = [
        record(default["method"], 0.7, 0, 270),
        record("taylor", 0.7, 0, 270),  # tie
        record("magnitude", 0.7, 0, 260),  # behind
        record("tp_taylor", 0.7, 0, 280, c="none"),  # a peer, not a criterion of ours
        record(default["method"], 0.7, 1, 280, seed=0),
        record(default["method"], 0.7, 1, 281, seed=1),
        record("magnitude", 0.7, 1, 282, seed=0),  # mean 282 against 280.5: ahead by 1.5
        record("magnitude", 0.7, 1, 282, seed=1),
        record(nm_default, "2:4", 0, 290),
        record("nm_magnitude", "2:4", 0, 291),  # ahead by 1
        record(default["method"], "2:4", 0, 299),  # not an N:M method: ignored at 2:4
    ]
    lines = suite.default_standing(records)
    rows = [line.split(" | ") for line in lines if line.startswith("| vit_t")]
    assert [(r[1], r[2], r[-1].strip(" |")) for r in rows] == [
        ("70%", "+1 ep", "1.5"),
        ("2:4", "zero-shot", "1.0"),
    ]
    assert "`magnitude` 94.0%" in rows[0][4]
    assert (
        "best or tied at 1 of 3 points, behind by one image or less at 1, by more at 1" in lines[0]
    )

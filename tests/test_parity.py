"""Parity through Polygraphy: a faithful engine passes, a perturbed one fails, the CLI re-checks."""

import numpy as np
import onnx
import pytest
from _helpers import polygraphy_recheck
from onnx import numpy_helper

from mpdeploy.backends import EngineOptions, get_backend
from mpdeploy.data.calibration import load_calibration
from mpdeploy.errors import ParityError
from mpdeploy.export import export_onnx
from mpdeploy.models import create_model
from mpdeploy.verify.certificate import margin_certificate, top1_margin
from mpdeploy.verify.parity import require_pass, verify_engine


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    build = tmp_path_factory.mktemp("parity")
    loaded = create_model("test_vit", weights="none")
    export_onnx(loaded.model, build / "model.onnx", tuple(loaded.data_config["input_size"]))
    calib = load_calibration("builtin", 24, loaded.data_config)
    return loaded, build, calib


def _verify(loaded, build, calib, merge_flips=None):
    backend = get_backend("onnxruntime")
    record = backend.build(build / "model.onnx", build, EngineOptions(max_batch=8))
    return verify_engine(
        loaded.model,
        backend.runner(record, build),
        calib.images,
        build,
        backend="onnxruntime",
        precision="fp32",
        artifact="model.onnx",
        batch_size=8,
        merge_flips=merge_flips,
    )


def _all_flipped(feeds):
    return [True] * sum(len(f["input"]) for f in feeds)


def test_faithful_engine_passes_and_polygraphy_cli_agrees(exported):
    loaded, build, calib = exported
    report = _verify(loaded, build, calib)
    assert report.verdict == "pass" and report.polygraphy_passed
    assert report.samples == 24 and report.top1_agreement == 1.0
    assert report.outputs["logits"]["max_abs"] < 1e-4
    for name in ("inputs.json", "reference.json", "results.json", "report.json"):
        assert (build / "parity" / name).is_file()
    # The independent re-check, with Polygraphy's own (stricter) default tolerances.
    done = polygraphy_recheck(build)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "PASSED" in done.stdout + done.stderr


def test_perturbed_engine_fails(exported, tmp_path):
    loaded, build, calib = exported
    proto = onnx.load(str(build / "model.onnx"))
    for tensor in proto.graph.initializer:  # every weight matrix 1 % off: a subtle graph bug
        array = numpy_helper.to_array(tensor)
        if array.ndim == 2 and array.dtype == np.float32:
            tensor.CopyFrom(numpy_helper.from_array(array * np.float32(1.01), tensor.name))
    onnx.save(proto, str(tmp_path / "model.onnx"))
    report = _verify(loaded, tmp_path, calib)
    assert report.verdict == "fail" and not report.polygraphy_passed
    with pytest.raises(ParityError, match="parity FAILED"):
        require_pass(report)


def test_changed_merges_are_counted_and_never_loosen_the_check(exported, tmp_path):
    """Token merging: inputs whose merges changed are reported. A faithful engine still passes
    when every input's merges changed (all of them pass the unchanged elementwise check); a
    perturbed one fails even when the changed inputs leave nothing else to check."""
    loaded, build, calib = exported
    report = _verify(loaded, build, calib, merge_flips=_all_flipped)
    decisions = report.merge_decisions
    assert report.verdict == "pass"
    assert decisions["inputs"] == 24 and decisions["inputs_with_changed_merges"] == 24
    assert decisions["elementwise_passed_on_all"] is True
    assert decisions["elementwise_checked_inputs"] == 0
    assert decisions["elementwise_passed_on_unchanged"] is False

    proto = onnx.load(str(build / "model.onnx"))
    for tensor in proto.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.ndim == 2 and array.dtype == np.float32:
            tensor.CopyFrom(numpy_helper.from_array(array * np.float32(1.01), tensor.name))
    onnx.save(proto, str(tmp_path / "model.onnx"))
    bad = _verify(loaded, tmp_path, calib, merge_flips=_all_flipped)
    assert bad.verdict == "fail" and bad.merge_decisions["elementwise_passed_on_all"] is False
    bad = _verify(loaded, tmp_path, calib, merge_flips=lambda feeds: [False] * 24)
    assert bad.verdict == "fail" and bad.merge_decisions["elementwise_checked_inputs"] == 24


def test_margin_certificate():
    ref = np.array([[5.0, 1.0, 0.0], [1.0, 1.2, 0.0], [0.0, 0.0, 3.0]])
    np.testing.assert_allclose(top1_margin(ref), [4.0, 0.2, 3.0])
    perturbed = ref + np.array([[1.9, 0, 0], [0.3, 0, 0], [0, 0, -1.6]])
    cert = margin_certificate(ref, perturbed)
    # Sample 0: margin 4 > 2·1.9 certified; 1: 0.2 < 0.6 flips; 2: margin 3 < 3.2 not certified.
    assert cert["certified_fraction"] == pytest.approx(1 / 3)
    assert cert["top1_agreement"] == pytest.approx(2 / 3)
    assert cert["max_logit_perturbation"] == pytest.approx(1.9)

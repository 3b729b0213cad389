"""Publishing into a Triton model repository and validating one, without a server."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from _serving_build import MAX_BATCH, copy_build, make_plan_build, verified_build
from onnx import TensorProto, helper

from mpdeploy.errors import MissingDependencyError, ParityError, UserError
from mpdeploy.serving import check_repository, format_problems, publish
from mpdeploy.serving import server as server_module
from mpdeploy.serving.config import config_text, data_type_name, model_config_pb2, parse_config

pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed")


@pytest.fixture(scope="session")
def build(tmp_path_factory) -> Path:
    return verified_build(tmp_path_factory.getbasetemp() / "serving")


def tree_hash(path: Path) -> dict | str | None:
    """Every file and folder under `path` (hidden ones too) with its content hash."""
    if not path.exists():
        return None
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return {
        str(p.relative_to(path)): "dir"
        if p.is_dir()
        else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
    }


def tensors(fields) -> list[tuple[str, list[int], str]]:
    return [(t.name, list(t.dims), data_type_name(t.data_type)) for t in fields]


def instance_kinds(config) -> list[tuple[str, int]]:
    kind = model_config_pb2().ModelInstanceGroup.Kind
    return [(kind.Name(g.kind), g.count) for g in config.instance_group]


def read_config(path: Path):
    return parse_config(path.read_text())


def write_config(path: Path, config) -> None:
    path.write_text(config_text(config))


def tiny_build(path: Path, elem_type=TensorProto.FLOAT16, classes=10, manifest=None) -> Path:
    """A verified build whose artifact is a tiny hand-made ONNX (fp16 I/O by default)."""
    (path / "engine").mkdir(parents=True)
    (path / "parity").mkdir()
    np_type = helper.tensor_dtype_to_np_dtype(elem_type)
    weight = helper.make_tensor(
        "w", elem_type, [48, classes], np.ones((48, classes), np_type).tobytes(), raw=True
    )
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["scores"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", elem_type, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("scores", elem_type, ["batch", classes])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, path / "model.fp16.onnx")
    records = {
        "parity/report.json": {"verdict": "pass"},
        "engine/engine.json": {
            "backend": "onnxruntime",
            "precision": "fp16",
            "onnx": "model.fp16.onnx",
            "artifact": "model.fp16.onnx",
            "max_batch": 8,
            "profile": {"min": 1, "opt": 4, "max": 8},
            "input_name": "x",
            "output_name": "scores",
            "input_shape": [3, 4, 4],
            "num_classes": classes,
        },
        "manifest.json": manifest or {"model": {"alias": "tiny"}},
    }
    for name, record in records.items():
        (path / name).write_text(json.dumps(record))
    return path


# ── the config: Triton's schema, the artifact's own I/O, the engine's profile ────────────────


def test_config_round_trips_through_triton_schema(build, tmp_path):
    published = publish(build, tmp_path / "repo")
    text = published.config_path.read_text()
    config = parse_config(text)
    assert config_text(config) == text
    assert (published.name, published.version, published.kind) == (
        "test_vit",
        1,
        "onnxruntime_onnx",
    )
    assert config.name == "test_vit" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == MAX_BATCH == published.max_batch_size
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 1000
    assert config.version_policy.latest.num_versions == 1
    assert instance_kinds(config) == [("KIND_CPU", 1)]
    assert config.model_warmup[0].batch_size == 1
    assert config.model_warmup[0].inputs["input"].zero_data

    graph = onnx.load(build / "model.onnx", load_external_data=False).graph
    onnx_dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]]
    assert tensors(config.input) == [("input", onnx_dims, "TYPE_FP32")]
    assert tensors(config.output) == [("logits", [1000], "TYPE_FP32")]
    labels = (published.model_dir / "labels.txt").read_text().splitlines()
    assert len(labels) == 1000 and labels[0].startswith("tench")

    version = published.version_dir
    assert {p.name for p in version.iterdir()} == {"model.onnx", "model.onnx.data", "mpdeploy"}
    for name in ("model.onnx", "model.onnx.data"):
        assert (version / name).read_bytes() == (build / name).read_bytes()
    sidecar = version / "mpdeploy"
    assert json.loads((sidecar / "parity_report.json").read_text())["verdict"] == "pass"
    assert {"artifact.json", "engine.json", "manifest.json"} <= {p.name for p in sidecar.iterdir()}
    assert check_repository(tmp_path / "repo") == []


def test_types_and_dims_come_from_the_artifact(tmp_path):
    build = tiny_build(tmp_path / "tiny")
    config = read_config(publish(build, tmp_path / "repo").config_path)
    assert tensors(config.input) == [("x", [3, 4, 4], "TYPE_FP16")]
    assert tensors(config.output) == [("scores", [10], "TYPE_FP16")]
    assert (tmp_path / "repo/tiny/labels.txt").read_text().split() == [str(i) for i in range(10)]
    # The python variant casts its outputs, so they are declared float32 whatever the model says.
    python = read_config(publish(build, tmp_path / "repo", python_backend=True).config_path)
    assert python.backend == "python"
    assert tensors(python.input) == [("x", [3, 4, 4], "TYPE_FP16")]
    assert tensors(python.output) == [("scores", [10], "TYPE_FP32")]
    assert check_repository(tmp_path / "repo") == []


def test_class_names_from_the_manifest(tmp_path):
    names = [f"digit {i}" for i in range(10)]
    build = tiny_build(tmp_path / "b", manifest={"model": {"alias": "d", "class_names": names}})
    publish(build, tmp_path / "repo")
    assert (tmp_path / "repo/d/labels.txt").read_text().splitlines() == names


def test_default_name_is_the_sanitised_alias(tmp_path):
    build = tiny_build(tmp_path / "b", manifest={"model": {"alias": "vit b16/pruned 50%"}})
    assert publish(build, tmp_path / "repo").name == "vit_b16_pruned_50"
    assert publish(build, tmp_path / "repo", python_backend=True).name == "vit_b16_pruned_50_python"


def test_max_batch_size_never_above_the_profile(build, tmp_path):
    repo = tmp_path / "repo"
    config = read_config(publish(build, repo, name="b2", max_batch=2).config_path)
    assert config.max_batch_size == 2 and list(config.dynamic_batching.preferred_batch_size) == [2]
    config = read_config(publish(build, repo, name="b1", max_batch=1).config_path)
    assert config.max_batch_size == 1 and not config.HasField("dynamic_batching")
    before = tree_hash(repo)
    with pytest.raises(UserError, match=r"outside the engine's batch profile 1\.\.4"):
        publish(build, repo, name="b8", max_batch=MAX_BATCH + 1)
    with pytest.raises(UserError, match="max_batch_size 2 ≠ requested 4"):
        publish(build, repo, name="b2", max_batch=4)
    assert tree_hash(repo) == before


def test_versions_count_up_and_never_overwrite(build, tmp_path):
    repo = tmp_path / "repo"
    first = publish(build, repo)
    v1, config = tree_hash(first.version_dir), first.config_path.read_bytes()
    versions = [publish(build, repo).version for _ in range(2)]
    assert [first.version, *versions] == [1, 2, 3]
    assert tree_hash(first.version_dir) == v1
    assert first.config_path.read_bytes() == config  # a compatible config is kept as it was
    shutil.rmtree(repo / "test_vit" / "2")  # a removed version number is not reused
    assert publish(build, repo).version == 4
    assert not [p for p in (repo / "test_vit").iterdir() if p.name.startswith(".")]


def test_tensorrt_plan_records_its_version_lock(build, tmp_path):
    plan_build = make_plan_build(build, tmp_path / "plan-build")
    repo = tmp_path / "repo"
    published = publish(plan_build, repo, name="vit_trt")
    config = read_config(published.config_path)
    assert config.platform == "tensorrt_plan" and published.kind == "tensorrt_plan"
    assert instance_kinds(config) == [("KIND_GPU", 1)]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params == {
        "mpdeploy_tensorrt_version": "10.13.0",
        "mpdeploy_gpu_name": "NVIDIA H100 80GB HBM3",
        "mpdeploy_compute_capability": "9.0",
    }
    assert {p.name for p in published.version_dir.iterdir()} == {"model.plan", "mpdeploy"}
    assert check_repository(repo) == []

    engine_path = plan_build / "engine" / "engine.json"
    engine = json.loads(engine_path.read_text())
    engine["details"]["tensorrt_version"] = "10.14.1"
    engine_path.write_text(json.dumps(engine))
    before = tree_hash(repo)
    with pytest.raises(UserError, match=r"incompatible.*10\.14\.1"):
        publish(plan_build, repo, name="vit_trt")
    with pytest.raises(UserError, match="python-backend variant runs ONNX"):
        publish(plan_build, repo, python_backend=True)
    assert tree_hash(repo) == before


# ── safe publishing: every refusal leaves the repository exactly as it was ───────────────────


def _fail_verdict(build: Path) -> None:
    (build / "parity" / "report.json").write_text(json.dumps({"verdict": "fail"}))


def _no_report(build: Path) -> None:
    (build / "parity" / "report.json").unlink()


@pytest.mark.parametrize(
    ("break_build", "error", "match"),
    [(_fail_verdict, ParityError, "verdict is 'fail'"), (_no_report, UserError, "verify")],
    ids=["verdict-fail", "unverified"],
)
def test_unverified_build_is_refused(build, tmp_path, break_build, error, match):
    broken = copy_build(build, tmp_path / "build")
    break_build(broken)
    repo = tmp_path / "repo"
    publish(build, repo)
    before = tree_hash(repo)
    with pytest.raises(error, match=match):
        publish(broken, repo)
    with pytest.raises(error, match=match):
        publish(broken, tmp_path / "fresh")
    assert tree_hash(repo) == before and not (tmp_path / "fresh").exists()


@pytest.mark.parametrize(
    "name", ["a/b", "..", "../escape", "", ".hidden", "x..y", "a\\b", "sp ace"]
)
def test_bad_model_names_are_refused(build, tmp_path, name):
    repo = tmp_path / "repo"
    publish(build, repo)
    before = tree_hash(tmp_path)
    with pytest.raises(UserError, match="invalid model name"):
        publish(build, repo, name=name)
    assert tree_hash(tmp_path) == before


def test_repository_path_that_is_a_file(build, tmp_path):
    repo = tmp_path / "repo"
    repo.write_text("not a directory\n")
    with pytest.raises(UserError, match="is a file"):
        publish(build, repo)
    assert repo.read_text() == "not a directory\n"


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (
            lambda m: (m / "config.pbtxt").write_text("name: 'test_vit'\nmax_batch_size: [\n"),
            "config.pbtxt: not a valid",
        ),
        (
            lambda m: (m / "config.pbtxt").write_text('name: "test_vit"\nbogus_field: 1\n'),
            "config.pbtxt: not a valid",
        ),
        (lambda m: (m / "config.pbtxt").unlink(), "without a config.pbtxt"),
    ],
    ids=["syntax", "unknown-field", "missing"],
)
def test_corrupt_existing_config_is_refused(build, tmp_path, damage, match):
    repo = tmp_path / "repo"
    damage(publish(build, repo).model_dir)
    before = tree_hash(repo)
    with pytest.raises(UserError, match=match):
        publish(build, repo)
    assert tree_hash(repo) == before


def test_incompatible_existing_config_is_refused(build, tmp_path):
    repo = tmp_path / "repo"
    publish(build, repo, name="vit", python_backend=True)
    before = tree_hash(repo)
    with pytest.raises(
        UserError, match=r"incompatible.*serves python, this build is onnxruntime_onnx"
    ):
        publish(build, repo, name="vit")
    tiny = tiny_build(tmp_path / "tiny")
    with pytest.raises(UserError, match=r"incompatible.*inputs"):
        publish(tiny, repo, name="vit", python_backend=True)
    assert tree_hash(repo) == before


@pytest.mark.parametrize("existing_model", [False, True], ids=["new-model", "new-version"])
def test_a_failed_write_leaves_no_trace(build, tmp_path, monkeypatch, existing_model):
    repo = tmp_path / "repo"
    publish(build, repo, name="other")
    if existing_model:
        publish(build, repo)
    before = tree_hash(repo)
    real_copy = shutil.copyfile

    def copy_then_fail(src, dst, *args, **kwargs):
        if str(dst).endswith("model.onnx.data"):
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr("mpdeploy.serving.repository.shutil.copyfile", copy_then_fail)
    with pytest.raises(OSError, match="No space left"):
        publish(build, repo)
    assert tree_hash(repo) == before


# ── check_repository: one broken repository per rule ────────────────────────────────────────


def _edit(model_dir: Path, edit) -> None:
    config = read_config(model_dir / "config.pbtxt")
    edit(config)
    write_config(model_dir / "config.pbtxt", config)


def _set_dim(config):
    config.input[0].dims[0] = 4


def _set_fp16(config):
    config.output[0].data_type = model_config_pb2().DataType.Value("TYPE_FP16")


def _set_batch(config):
    config.max_batch_size = MAX_BATCH * 2
    config.dynamic_batching.ClearField("preferred_batch_size")


def _rename(config):
    config.name = "someone_else"


BROKEN = {
    "syntax": (lambda m: (m / "config.pbtxt").write_text("name: \n}"), "not a valid Triton config"),
    "bad-enum": (
        lambda m: (m / "config.pbtxt").write_text(
            (m / "config.pbtxt").read_text().replace("TYPE_FP32", "TYPE_FLOAT32", 1)
        ),
        "not a valid Triton config",
    ),
    "unknown-field": (
        lambda m: (m / "config.pbtxt").write_text((m / "config.pbtxt").read_text() + "gpus: 1\n"),
        "not a valid Triton config",
    ),
    "no-config": (lambda m: (m / "config.pbtxt").unlink(), "no config.pbtxt"),
    "name": (lambda m: _edit(m, _rename), "name 'someone_else' ≠ directory name"),
    "non-numeric-version": (lambda m: (m / "1").rename(m / "v1"), "v1: not a version folder"),
    "leading-zero": (lambda m: (m / "1").rename(m / "01"), "01: not a version folder"),
    "no-model-file": (lambda m: (m / "1" / "model.onnx").unlink(), "1: no model.onnx"),
    "dims": (lambda m: _edit(m, _set_dim), "input 'input' dims \\[4, 160, 160\\] in config"),
    "data-type": (lambda m: _edit(m, _set_fp16), "output 'logits' is TYPE_FP16 in config"),
    "max-batch": (lambda m: _edit(m, _set_batch), "max_batch_size 8 exceeds .* profile max 4"),
    "labels": (lambda m: (m / "labels.txt").write_text("cat\ndog\n"), "2 labels for 1000 classes"),
    "changed": (
        lambda m: (m / "1" / "model.onnx").write_bytes(
            (m / "1" / "model.onnx").read_bytes() + b"\0"
        ),
        "changed since it was published",
    ),
}


@pytest.mark.parametrize("rule", list(BROKEN))
def test_check_repository_catches(build, tmp_path, rule):
    repo = tmp_path / "repo"
    publish(build, repo, name="good", python_backend=True)
    model_dir = publish(build, repo, name="test_vit").model_dir
    assert check_repository(repo) == []
    damage, pattern = BROKEN[rule]
    damage(model_dir)
    problems = check_repository(repo)
    assert len(problems) >= 1, rule
    assert all(p.startswith("test_vit") for p in problems), problems
    assert any(re.search(pattern, p) for p in problems), problems
    report = format_problems(problems, repo)
    assert report.splitlines()[0].endswith(f"{len(problems)} problem" + "s" * (len(problems) > 1))


def test_check_repository_python_variant_and_plans(build, tmp_path):
    repo = tmp_path / "repo"
    python = publish(build, repo, python_backend=True)
    (python.version_dir / "model.py").unlink()
    plan = publish(make_plan_build(build, tmp_path / "plan"), repo, name="plan")
    shutil.rmtree(plan.version_dir / "mpdeploy")
    problems = check_repository(repo)
    assert any(p.startswith("plan/1: no mpdeploy/artifact.json") for p in problems), problems
    assert any(p.startswith("test_vit_python/1: no model.py") for p in problems), problems
    assert check_repository(tmp_path / "absent") == [f"{tmp_path / 'absent'}: not a directory"]
    assert format_problems([], repo) == f"{repo}: valid Triton model repository"


# ── the python backend's batching and the server's missing dependency ─────────────────────────


def test_python_model_runs_requests_as_one_batch(build):
    import onnxruntime as ort

    from mpdeploy.serving.python_model import run_batched

    session = ort.InferenceSession(str(build / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = [{"input": rng.standard_normal((n, 3, 160, 160), dtype=np.float32)} for n in (1, 3)]
    batched = run_batched(session, feeds, ["logits"])
    for feed, out in zip(feeds, batched, strict=True):
        alone = session.run(["logits"], feed)[0]
        assert out["logits"].shape == alone.shape
        np.testing.assert_allclose(out["logits"], alone, atol=1e-5, rtol=1e-5)


def test_missing_pytriton_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(server_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'mpdeploy\[serve\]'") as info:
        server_module.find_bundled_server()
    assert "\n" not in str(info.value)

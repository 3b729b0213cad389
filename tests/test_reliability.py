"""Crash safety, locking and bounds (issue 12): real signals on real processes, two real
writers, a real full disk where the machine allows a small file system, else ENOSPC injected.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _reliability import (
    cli_env,
    complete_build,
    set_stage,
    start_cli,
    stderr_lines,
    tree_hash,
)

from mpdeploy.cli import main
from mpdeploy.errors import UserError
from mpdeploy.fileio import remove_stale_debris, stale_debris

# The smallest real build: random test_vit weights, 4 calibration crops, one short benchmark.
SMALL_BUILD = [
    "build", "--model", "test_vit", "--weights", "none", "--calib-size", "4",
    "--max-batch", "2", "--bench-batch", "1", "--bench-iterations", "2", "--quiet",
]  # fmt: skip
DEFAULT_OUT = Path("engines") / "test_vit-dense-onnxruntime-fp32"


@pytest.fixture
def build(tmp_path_factory, tmp_path) -> Path:
    return complete_build(tmp_path_factory.getbasetemp() / "serving", tmp_path / "build")


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def wait_for(predicate, timeout: float, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"exited early ({process.returncode}): {err[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s")


def partials(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.partial")) if folder.is_dir() else []


# ── 1. a refused or failed stage command leaves the build's record as it was ───────────────


def test_refused_stage_command_leaves_the_manifest_byte_identical(build, capsys):
    before = (build / "manifest.json").read_bytes()
    for argv in (
        ["prune", "--force", "--target-macs", "5"],
        ["prune", "--force", "--method", "bogus"],
        ["prune", "--force", "--sparsity", "9:4"],
        ["export", "--force", "--precision", "int4"],
    ):
        assert main([argv[0], "--build", str(build), *argv[1:]]) == 2
        assert (build / "manifest.json").read_bytes() == before, argv
    assert len(stderr_lines(capsys.readouterr().err)) == 4


def test_failed_stage_keeps_the_old_options_and_blocks_package(build, tmp_path, monkeypatch):
    from mpdeploy import pipeline

    def failing_bench(ctx):
        raise UserError("bench broke")

    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "bench", failing_bench)
    options = json.loads((build / "manifest.json").read_text())["options"]
    with pytest.raises(UserError, match="bench broke"):
        pipeline.run_stages_on(build, ["bench"], {"bench_iterations": 7})
    manifest = json.loads((build / "manifest.json").read_text())
    assert manifest["options"] == options  # not the 7 of the run that failed
    assert manifest["stages"]["bench"]["status"] == "failed"  # it ran, so it is recorded

    from mpdeploy.serving import publish

    repo = tmp_path / "repo"
    with pytest.raises(UserError, match="stage bench is failed"):
        publish(build, repo)
    assert not repo.exists()


def test_package_refuses_a_stage_redone_after_verify(build, tmp_path):
    from mpdeploy.serving import publish

    set_stage(build, "prune", finished="2026-11-27T23:59:59+00:00")
    with pytest.raises(UserError, match="prune was redone after export"):
        publish(build, tmp_path / "repo")


# ── 2. SIGTERM cleans up like Ctrl-C; SIGKILL debris is removed by the next run ─────────────


def test_sigkill_debris_is_stale_and_the_next_run_removes_it(tmp_path, monkeypatch, capsys, caplog):
    out = tmp_path / "out" / "b"
    build = start_cli([*SMALL_BUILD, "--out", str(out)], tmp_path)
    try:
        (debris,) = wait_for(lambda: partials(out.parent), 120, build)
        build.send_signal(signal.SIGKILL)
        build.wait(timeout=30)
    finally:
        build.kill()
    assert debris.is_dir() and stale_debris(out.parent, "b") == [debris]
    # The next run on that path takes the lock, removes the debris, then fails in its first stage.
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mpdeploy.fileio"):
        code = main(["build", "--model", "test_vit", "--weights", "text.pth", "--out", str(out)])
    (error,) = stderr_lines(capsys.readouterr().err)
    assert code == 2 and "not a torch checkpoint" in error, error
    assert f"removed stale {debris} (its process is gone)" in caplog.text
    assert not out.parent.exists() or sorted(out.parent.iterdir()) == []


def test_stage_commands_remove_stale_export_scratch(build, monkeypatch):
    from mpdeploy import pipeline

    gone = dead_pid()
    stale = [build / f".export-{gone}-abc", build / "engine" / f".engine.json.{gone}-x.tmp"]
    stale[0].mkdir()
    stale[1].write_text("half")
    alive = build / f".export-{os.getpid()}-mine"  # ours: a live owner's folder stays
    alive.mkdir()
    monkeypatch.setitem(
        pipeline.STAGE_FUNCTIONS, "bench", lambda ctx: pipeline.StageOutcome([], {})
    )
    pipeline.run_stages_on(build, ["bench"])
    assert not any(p.exists() for p in stale) and alive.is_dir()


def test_only_debris_of_dead_owners_is_stale(tmp_path):
    gone, me = dead_pid(), os.getpid()
    names = [f".b.{gone}-x1.partial", f".b.{me}-x2.partial", f".b.old-{gone}",
             f".c.{gone}-x3.partial", f"mpdeploy-tritonserver-{gone}-q", ".b.lock", "b"]  # fmt: skip
    for name in names:
        (tmp_path / name).mkdir()
    assert {p.name for p in stale_debris(tmp_path, "b")} == {
        f".b.old-{gone}",
        f".b.{gone}-x1.partial",
    }
    removed = remove_stale_debris(tmp_path)
    assert {p.name for p in removed} == {
        f".b.{gone}-x1.partial", f".b.old-{gone}", f".c.{gone}-x3.partial",
        f"mpdeploy-tritonserver-{gone}-q",
    }  # fmt: skip


# ── 3. one writer per output: the second gets one line at once ─────────────────────────────


def test_a_termination_swallowed_inside_a_stage_is_raised_again_after_it(monkeypatch):
    """A SIGTERM whose `Terminated` lands in third-party code with a bare `except:` (Polygraphy's
    `LazyModule.is_importable`) must not be lost: the stage loop raises it again (CI 2026-11-28:
    a SIGTERM-ed build finished with exit 0)."""
    from types import SimpleNamespace

    from mpdeploy import pipeline
    from mpdeploy.cli import _terminate_like_interrupt
    from mpdeploy.errors import Terminated

    swallowed = []

    def stage(ctx):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises Terminated in here
        except:  # noqa: E722 - what the third-party code does
            swallowed.append(True)
        return SimpleNamespace(status="done", inputs={}, outputs={}, headline={})

    recorded = []
    ctx = SimpleNamespace(
        cache={}, manifest=SimpleNamespace(record_stage=lambda name, **kw: recorded.append(name))
    )
    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "swallowing", stage)
    restore = _terminate_like_interrupt()
    try:
        with pytest.raises(Terminated) as raised:
            pipeline.run_stage(ctx, "swallowing")
    finally:
        restore()
    assert swallowed == [True] and raised.value.signum == signal.SIGTERM
    assert recorded == []  # the stage is not recorded as done
    pipeline.raise_if_terminated()  # restore() disarmed it: nothing pending afterwards


def test_a_termination_turned_into_another_error_still_exits_as_terminated(monkeypatch, capsys):
    """A C extension that catches the handler's `Terminated` and raises its own error instead
    (matplotlib's Agg renderer answered a SIGTERM mid-draw with "ValueError: Invalid bounding
    box", 2026-11-29) still ends as terminated: one line, exit 128 + 15, no traceback; without a
    noted signal the same error is a bug and propagates."""
    from mpdeploy import cli as cli_module
    from mpdeploy.errors import note_termination

    def drawing(**kwargs):
        note_termination(signal.SIGTERM)
        raise ValueError("Invalid bounding box")

    monkeypatch.setattr(cli_module.cli, "main", drawing)
    assert cli_module.main(["build"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.splitlines() == [
        "mpdeploy: terminated by signal 15; partial output removed"
    ]

    def bug(**kwargs):
        raise ValueError("Invalid bounding box")

    monkeypatch.setattr(cli_module.cli, "main", bug)
    with pytest.raises(ValueError, match="Invalid bounding box"):
        cli_module.main(["build"])


def test_two_builds_race_for_one_output_and_sigterm_cleans_up(tmp_path):
    """Two real builds into the default output: one line at once for the loser; the winner,
    stopped by SIGTERM as `timeout`, CI cancels and Kubernetes do, leaves nothing at all."""
    # A bench long enough that SIGTERM lands inside the build, not after its last rename (with
    # SMALL_BUILD's 2 iterations the winner could finish first on a fast run: rc 0, CI 2026-11-28).
    argv = [*SMALL_BUILD, "--bench-iterations", "3000", "--force"]
    first, second = start_cli(argv, tmp_path), start_cli(argv, tmp_path)
    try:
        loser = wait_for(lambda: next((p for p in (first, second) if p.poll() is not None), None),
                         240)  # fmt: skip
        winner = second if loser is first else first
        _, err = loser.communicate()
        assert winner.poll() is None, "the loser must not wait for the winner to finish"
        assert loser.returncode == 5, err
        (line,) = stderr_lines(err)
        assert "is being written by another mpdeploy process (pid" in line, line
        wait_for(lambda: partials(tmp_path / "engines"), 120, winner)
        winner.send_signal(signal.SIGTERM)
        _, err = winner.communicate(timeout=60)
    finally:
        for process in (first, second):
            process.kill()
    assert winner.returncode == 128 + signal.SIGTERM, err
    assert stderr_lines(err)[-1] == "mpdeploy: terminated by signal 15; partial output removed"
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no engines/, no lock, no debris


# ── 4. one line instead of a traceback ─────────────────────────────────────────────────────


def test_decompression_bomb_is_skipped_and_counted(tmp_path, monkeypatch, caplog):
    from PIL import Image

    from mpdeploy.data.calibration import load_calibration

    for i, size in enumerate((32, 32, 200)):
        Image.new("RGB", (size, size), (i * 60, 90, 30)).save(tmp_path / f"{i}.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 200×200 > 2× this: a "bomb"
    config = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3,
              "std": [0.5] * 3, "crop_pct": 1.0, "crop_mode": "center"}  # fmt: skip
    with caplog.at_level(logging.WARNING):
        calib = load_calibration(str(tmp_path), 3, config)
    assert len(calib) == 2 and calib.skipped == 1
    assert "skipped 1 unreadable" in caplog.text


def _small_fs_available() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
         "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || mount -t tmpfs -o size=64k tmpfs "
         "\"$TMPDIR\""],
        capture_output=True, timeout=30, env={**os.environ, "TMPDIR": "/tmp"},
    )  # fmt: skip
    return probe.returncode == 0


def _in_small_fs(
    size: str, mountpoint: Path, command: str, cwd: Path
) -> subprocess.CompletedProcess:
    """Run `command` with a `size` tmpfs mounted on `mountpoint` (a private mount namespace)."""
    script = f'mount -t tmpfs -o size={size} tmpfs {mountpoint} && {command}; echo "rc=$?"; ls -A {mountpoint}'
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        cwd=cwd, capture_output=True, text=True, timeout=300, env=cli_env(),
    )  # fmt: skip


_FULL_DISK_RUN = """
import sys
from mpdeploy.cli import main
build_argv, package_argv = sys.argv[1].split("\x1f"), sys.argv[2].split("\x1f")
codes = [main(build_argv)]
print("--", file=sys.stderr, flush=True)
codes.append(main(package_argv))
print(*codes)
"""


@pytest.mark.skipif(not _small_fs_available(), reason="no user namespaces for a small tmpfs")
def test_full_disk_during_build_and_publish(build, tmp_path):
    """A real 256 KiB file system: the dense test_vit checkpoint (~1.5 MB) and the published
    ONNX copy do not fit. Both commands exit 6 with one line and leave the file system empty."""
    small = tmp_path / "small"
    small.mkdir()
    build_argv = [*SMALL_BUILD, "--out", f"{small}/b"]
    package_argv = ["package", "--build", str(build), "--triton-repo", f"{small}/repo"]
    command = " ".join(
        f"'{a}'" for a in [sys.executable, "-c", _FULL_DISK_RUN, "\x1f".join(build_argv),
                           "\x1f".join(package_argv)]
    )  # fmt: skip
    done = _in_small_fs("256k", small, command, tmp_path)
    codes, rc, *listing = done.stdout.strip().splitlines()
    assert (codes, rc, listing) == ("6 6", "rc=0", []), done.stdout + done.stderr
    build_err, package_err = done.stderr.split("--\n")
    for err in (build_err, package_err):
        lines = [line for line in stderr_lines(err) if "WARNING: random weights" not in line]
        assert len(lines) == 1 and "space" in lines[0].lower(), err
        assert "partial output removed" in lines[0] and "Traceback" not in err


def test_enospc_while_publishing_is_one_line_and_leaves_the_repository(build, tmp_path, capsys,
                                                                        monkeypatch):  # fmt: skip
    from mpdeploy.serving import repository

    repo = tmp_path / "repo"
    assert main(["package", "--build", str(build), "--triton-repo", str(repo)]) == 0
    before = tree_hash(repo)
    real_copy = shutil.copyfile

    def full_disk(src, dst, *args, **kwargs):
        if str(dst).endswith(".onnx"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(repository.shutil, "copyfile", full_disk)
    capsys.readouterr()
    assert main(["package", "--build", str(build), "--triton-repo", str(repo)]) == 6
    (line,) = stderr_lines(capsys.readouterr().err)
    assert "No space left on device" in line and "partial output removed" in line
    assert tree_hash(repo) == before


# ── 5. bounds ──────────────────────────────────────────────────────────────────────────────


def test_builtin_photo_set_is_capped_and_says_so(monkeypatch, caplog):
    from mpdeploy.data import calibration

    monkeypatch.setattr(calibration, "BUILTIN_PHOTO_CROPS", 3)
    config = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3,
              "std": [0.5] * 3, "crop_pct": 1.0, "crop_mode": "center"}  # fmt: skip
    with caplog.at_level(logging.WARNING):
        calib = calibration.load_calibration("builtin", 1_000, config, model_name="test_vit")
    assert len(calib) == 3
    assert "holds 3 distinct crops; calibrating on 3, not 1000" in caplog.text


# ── 8. the offline hub fails in one line, at once ──────────────────────────────────────────


def test_offline_hub_fails_fast_without_hf_hub_offline(in_tmp, monkeypatch, capsys, caplog):
    from mpdeploy.models import _hub_unreachable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if _hub_unreachable() is None:
        pytest.skip("the model hub is reachable from here")
    with caplog.at_level(logging.WARNING):
        code = main(["build", "--model", "test_vit"])
    (line,) = stderr_lines(capsys.readouterr().err)  # not ~45 retry warnings over ~55 s
    assert code == 2 and "no network: cannot reach" in line, line
    assert not [r for r in caplog.records if "retry" in r.getMessage().lower()]
    assert list(in_tmp.iterdir()) == []

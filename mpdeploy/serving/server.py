"""Run a model repository locally with the `tritonserver` that nvidia-pytriton bundles.

The bundle holds a real Triton server with only the python backend. `serve` therefore serves the
models whose backend it lacks through a temporary overlay (see overlay.py): an onnxruntime_onnx or
openvino model runs in the python backend with ONNX Runtime or OpenVINO, under its own name.
`TritonServer` runs exactly the repository it is given.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mpdeploy.errors import MissingDependencyError, UserError
from mpdeploy.fileio import remove_stale_debris
from mpdeploy.serving.overlay import (
    NOT_SERVED,
    PYTHON,
    ModelRoute,
    ServingPlan,
    overlay_repository,
    plan_serving,
)
from mpdeploy.serving.ports import check_ports

INSTALL_HINT = "pip install 'mpdeploy[serve]'"
_POLL_S = 0.2
_STOP_TIMEOUT_S = 15.0
_NOISE = "CudaDriverHelper has not been initialized"  # logged as an error on every CPU machine


@dataclass(frozen=True)
class ModelState:
    name: str
    version: str
    state: str  # READY, UNAVAILABLE, LOADING, …
    reason: str


@dataclass(frozen=True)
class _Bundle:
    server_dir: Path  # pytriton/tritonserver: bin/, backends/, caches/
    stub: Path  # python backend stub built for this interpreter's version
    libs: Path  # the wheel's vendored shared libraries


def find_bundled_server() -> _Bundle:
    """Locate the tritonserver inside the installed nvidia-pytriton wheel, without importing it."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"the local Triton server needs nvidia-pytriton: {INSTALL_HINT}"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    server_dir = package / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not (server_dir / "bin" / "tritonserver").is_file():
        raise MissingDependencyError(f"{server_dir}: no tritonserver binary; {INSTALL_HINT}")
    if not stub.is_file():
        raise MissingDependencyError(
            f"nvidia-pytriton has no python backend stub for Python {version}"
        )
    libs = package.parent / "nvidia_pytriton.libs"  # wheel install
    if not libs.is_dir():
        libs = server_dir / "external_libs"  # editable install
    return _Bundle(server_dir, stub, libs)


def server_backends(bundle: _Bundle | None = None) -> frozenset[str]:
    """The Triton backends the bundled server has (the folders in its backends/)."""
    backends = (bundle or find_bundled_server()).server_dir / "backends"
    return frozenset(p.name for p in backends.iterdir() if p.is_dir())


class TritonServer:
    """A `tritonserver` child process on 127.0.0.1, started on enter and stopped on exit.

    `strict=True` keeps Triton's defaults (exit if a model fails to load; ready only when every
    model is). `strict=False` lets the server come up with failed models, whose reasons
    `model_states()` then reports (how a config is checked against a backend that is absent).
    """

    def __init__(
        self,
        repo: str | os.PathLike,
        http_port: int = 8000,
        grpc_port: int = 8001,
        *,
        ready_timeout: float = 60.0,
        strict: bool = True,
    ):
        self.repo = Path(repo).resolve()
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.ready_timeout = ready_timeout
        self.strict = strict
        self.startup_s: float | None = None
        self._process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._log = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        if not self.repo.is_dir():
            raise UserError(f"{self.repo}: model repository not found")
        check_ports(self.http_port, self.grpc_port)
        remove_stale_debris(tempfile.gettempdir(), "mpdeploy-tritonserver")  # killed servers'
        _require_numpy_below_2()
        bundle = find_bundled_server()
        # The pid in the name marks the folder as debris once this process is gone.
        self._workdir = Path(tempfile.mkdtemp(prefix=f"mpdeploy-tritonserver-{os.getpid()}-"))
        server_dir = _install_server(bundle, self._workdir)
        self._log = open(self._workdir / "tritonserver.log", "wb")  # noqa: SIM115 (kept open)
        started = time.monotonic()
        self._process = subprocess.Popen(
            self._command(server_dir),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=_server_env(bundle),
            start_new_session=True,  # Ctrl-C reaches only us; we stop the server in order
            preexec_fn=_parent_death_signal(),
        )
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started

    def _command(self, server_dir: Path) -> list[str]:
        strict = "true" if self.strict else "false"
        return [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={self.repo}",
            f"--backend-directory={server_dir / 'backends'}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            "--strict-model-config=true",
            f"--exit-on-error={strict}",
            f"--strict-readiness={strict}",
            "--exit-timeout-secs=5",
        ]

    def _wait_ready(self, started: float) -> None:
        deadline = started + self.ready_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise UserError(
                    f"tritonserver exited with code {self._process.returncode} while starting: "
                    f"{self.failure_summary()}"
                )
            if self._get("/v2/health/ready") == 200:
                return
            time.sleep(_POLL_S)
        raise UserError(
            f"tritonserver not ready after {self.ready_timeout:.0f} s: {self.failure_summary()}"
        )

    def _get(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError):
            return None

    def model_states(self) -> list[ModelState]:
        """Each model's load state and the server's reason, from the repository index."""
        request = urllib.request.Request(
            f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            index = json.load(response)
        return [
            ModelState(m["name"], m.get("version", ""), m.get("state", ""), m.get("reason", ""))
            for m in index
        ]

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def logs(self) -> str:
        if self._workdir is None or not (self._workdir / "tritonserver.log").exists():
            return ""
        return (self._workdir / "tritonserver.log").read_text(errors="replace")

    def failure_summary(self) -> str:
        """The server's error lines (Triton prefixes them with E), else its last line."""
        lines = [line.strip() for line in self.logs().splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("E") and _NOISE not in line]
        return " | ".join(errors[-3:]) or (lines[-1] if lines else "no output")

    def stop(self) -> None:
        """SIGINT (Triton's graceful shutdown), then SIGKILL if it has not exited in time."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.send_signal(signal.SIGINT)
                try:
                    self._process.wait(timeout=_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait(timeout=_STOP_TIMEOUT_S)
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


def serve(
    repo: str | os.PathLike,
    http_port: int = 8000,
    grpc_port: int = 8001,
    *,
    ready_timeout: float = 60.0,
    strict: bool = False,
    echo: Callable[[str], None] | None = None,
) -> None:
    """Serve `repo` on 127.0.0.1 until Ctrl-C or SIGTERM, printing endpoints and model states.

    Models whose backend the bundled server lacks are served through a temporary overlay when
    mpdeploy can run their artifact here; `strict=True` serves `repo` exactly as published (only
    what the server's own backends load). `repo` itself is never written.
    """
    check_ports(http_port, grpc_port)
    echo = echo or functools.partial(print, flush=True)  # flushed: the caller may be piped
    repo = Path(repo)
    if not repo.is_dir():
        raise UserError(f"{repo}: model repository not found")
    _require_numpy_below_2()
    bundle = find_bundled_server()
    plan = plan_serving(repo, server_backends(bundle))
    if not plan.routes:
        raise UserError(
            f"{repo}: no model folders in it; publish one with `mpdeploy build --triton-repo {repo}`"
        )
    if not strict and all(route.served_by == NOT_SERVED for route in plan.routes):
        _echo_states(echo, plan, [], strict=False)
        raise UserError(f"{repo}: no model in it can be served here (reasons above)")
    with (
        _sigterm_as_interrupt(),
        contextlib.nullcontext(repo) if strict else overlay_repository(plan) as served_repo,
        TritonServer(
            served_repo, http_port, grpc_port, ready_timeout=ready_timeout, strict=False
        ) as server,
    ):
        states = server.model_states()
        _echo_states(echo, plan, states, strict=strict)
        if not any(m.state == "READY" for m in states):
            raise UserError(f"{repo}: no model is READY in the bundled Triton server")
        try:  # from here on, a signal (even one sent on seeing the lines below) stops cleanly
            if served_repo != repo:
                echo(f"Serving through the temporary overlay {served_repo} ({repo} is not changed)")
            echo(f"Triton is serving {repo} (started in {server.startup_s:.1f} s)")
            echo(f"  HTTP  http://{server.http_url}")
            echo(f"  gRPC  {server.grpc_url}")
            echo("Press Ctrl-C to stop.")
            while server.running():
                time.sleep(0.5)
            raise UserError(f"tritonserver exited unexpectedly: {server.failure_summary()}")
        except KeyboardInterrupt:
            echo("stopping Triton…")


def _echo_states(echo, plan: ServingPlan, states: list[ModelState], *, strict: bool) -> None:
    """One line per model version the server knows, saying how it is served (or, under
    `strict`, how it would be without it), then one per model it was not given and why."""
    for model in states:
        route = plan.route(model.name)
        reason = f" ({model.reason})" if model.reason else ""
        how = _how(route, model, strict, plan.repo)
        state = model.state or "NOT LOADED"  # e.g. a config the server could not parse
        echo(f"  {model.name} v{model.version or '-'}: {state}{reason}{how}")
    if strict:
        return
    listed = {model.name for model in states}
    for route in plan.routes:
        if route.served_by == NOT_SERVED and route.name not in listed:
            echo(f"  {route.name}: NOT SERVED — {route.describe()}")


def _how(route: ModelRoute | None, model: ModelState, strict: bool, repo: Path) -> str:
    if route is None:
        return ""
    if not strict:
        check = (
            "" if model.state == "READY" else f"; check it with `mpdeploy package --check {repo}`"
        )
        return f" — {route.describe()}{check}"
    if model.state == "READY":
        return ""
    if route.served_by == PYTHON:
        return f" — without --strict: {route.describe()}"
    if route.served_by == NOT_SERVED:
        return f" — {route.describe()}"
    return ""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM and SIGHUP like Ctrl-C so `serve` shuts the server down the same way.

    A second signal is ignored, so that stopping the server and removing the overlay finish.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _install_server(bundle: _Bundle, workdir: Path) -> Path:
    """Copy the bundled server layout and put this interpreter's stub into backends/python."""
    server_dir = workdir / "tritonserver"
    shutil.copytree(
        bundle.server_dir, server_dir, ignore=shutil.ignore_patterns("python_backend_stubs")
    )
    shutil.copy2(bundle.stub, server_dir / "backends" / "python" / "triton_python_backend_stub")
    return server_dir


def _server_env(bundle: _Bundle) -> dict[str, str]:
    env = os.environ.copy()
    # The python stub embeds this interpreter's libpython; without its LIBDIR first it picks up
    # another one and fails with "'_thread.RLock' object has no attribute '_recursion_count'".
    library_path = [sysconfig.get_config_var("LIBDIR") or "", str(bundle.libs)]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in [*library_path, env.get("LD_LIBRARY_PATH", "")] if p
    )
    # model.py imports numpy and onnxruntime from this environment.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [*site.getsitepackages(), env.get("PYTHONPATH", "")] if p
    )
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _require_numpy_below_2() -> None:
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise MissingDependencyError(
            f"the bundled Triton python backend needs numpy<2 (found {numpy.__version__}): "
            f"{INSTALL_HINT}"
        )


def _parent_death_signal() -> Callable[[], None] | None:
    """Linux: a pre-exec hook that sends the server SIGTERM if the thread that started it dies.

    libc is resolved here, in the parent: the hook runs between fork and exec, where importing
    could deadlock on a lock another thread held at fork time.
    """
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG

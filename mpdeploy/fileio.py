"""Atomic writes and content hashes: nothing a user sees is ever half-written.

Every temporary name carries the writer's process id (`.NAME.<pid>-XXXX.partial`,
`.NAME.<pid>-XXXX.tmp`, `.export-<pid>-XXXX`), so debris a killed process left behind is
recognised as stale once that process is gone and removed by the next writer of the same path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# name → owner pid, for every kind of temporary this package makes.
_DEBRIS_PATTERNS = (
    re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[^/]+\.(?:partial|tmp)$"),  # atomic_dir/_path
    re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$"),  # a replaced build being deleted
    re.compile(r"^(?P<name>\.export|\.onnx|mpdeploy-tritonserver)-(?P<pid>\d+)-[^/]+$"),
)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_owned(f".{target.name}."), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are meant to be shared
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary sibling name and rename it into place on success.

    With `replace`, an existing directory at `path` is swapped out only after the new one is
    complete. On failure the temporary directory is removed, `path` is untouched and parent
    folders this call created are removed again.
    """
    target = Path(path)
    with created_parents(target):
        tmp = Path(
            tempfile.mkdtemp(
                prefix=_owned(f".{target.name}."), suffix=".partial", dir=target.parent
            )
        )
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            yield tmp
            if target.exists():
                if not replace:
                    raise FileExistsError(target)
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def created_parents(path: str | os.PathLike) -> Iterator[None]:
    """Create the missing parents of `path`; if the block fails, remove those still empty.

    A failed build into the default `engines/x` must not leave an empty `engines/` behind.
    """
    parent = Path(path).parent
    missing = []
    probe = parent
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in missing:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


@contextlib.contextmanager
def scratch_dir(parent: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """A temporary folder inside `parent`, named with this process id so debris is recognisable."""
    with tempfile.TemporaryDirectory(dir=parent, prefix=_owned(prefix)) as tmp:
        yield Path(tmp)


def _owned(prefix: str) -> str:
    return f"{prefix}{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (on this machine's pid namespace)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_debris(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Temporaries in `directory` whose owning process is gone (for `name` only, if given)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        for pattern in _DEBRIS_PATTERNS:
            match = pattern.match(entry.name)
            if not match:
                continue
            owner, pid = match.group("name"), int(match.group("pid"))
            if pid == os.getpid() or pid_alive(pid):
                break
            if name is None or owner == name:
                found.append(entry)
            break
    return sorted(found)


def remove_stale_debris(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove what `stale_debris` finds; returns the removed paths (also logged)."""
    removed = []
    for entry in stale_debris(directory, name):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        if not entry.exists():
            removed.append(entry)
            log.warning("removed stale %s (its process is gone)", entry)
    return removed

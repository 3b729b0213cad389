"""One writer at a time: an exclusive, non-blocking lock on a build directory or a repository.

The lock is `flock` on a small file (`.NAME.lock` beside a build directory, `.mpdeploy.lock`
inside a Triton repository). The kernel drops it when the holder exits, even on SIGKILL, so a
stale lock never blocks anyone; the file records who holds it for the message a second writer
gets at once.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from mpdeploy.errors import BusyError, UserError
from mpdeploy.fileio import created_parents

REPOSITORY_LOCK = ".mpdeploy.lock"
UNKNOWN_HOLDER = "holder unknown"
# a lock taken an instant before its holder wrote its line: re-read it for up to 0.5 s, so the
# refusal names the pid (seen once under load in tests/test_reliability.py's race)
HOLDER_WAIT_TRIES = 10
HOLDER_WAIT_S = 0.05


def build_lock_path(build_dir: str | os.PathLike) -> Path:
    build_dir = Path(build_dir)
    return build_dir.parent / f".{build_dir.name}.lock"


def repository_lock_path(repo: str | os.PathLike) -> Path:
    return Path(repo) / REPOSITORY_LOCK


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold `lock_path` for the block, or raise BusyError naming the holder at once."""
    lock_path = Path(lock_path)
    with created_parents(lock_path):
        fd = _acquire(lock_path, what)
        try:
            holder = f"pid {os.getpid()} since {_now()}: {' '.join(sys.argv[:3])[:120]}\n"
            os.ftruncate(fd, 0)
            os.write(fd, holder.encode())
            yield
        finally:
            # Unlink while still holding it: whoever opened the old file re-checks the inode.
            with contextlib.suppress(OSError):
                os.unlink(lock_path)
            os.close(fd)


def _acquire(lock_path: Path, what: str) -> int:
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise UserError(f"cannot lock {what}: {exc.strerror} ({lock_path})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            for _ in range(HOLDER_WAIT_TRIES):  # locked a moment ago: its line is on the way
                if holder != UNKNOWN_HOLDER:
                    break
                time.sleep(HOLDER_WAIT_S)
                holder = _read_holder(fd)
            os.close(fd)
            raise BusyError(
                f"{what} is being written by another mpdeploy process ({holder}); "
                "wait for it to finish or choose another path"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the previous holder removed this file after we opened it: try again


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return " ".join(text.split()) or UNKNOWN_HOLDER


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S UTC")

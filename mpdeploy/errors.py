"""The one exception type a user can cause; the CLI prints it as a single line on stderr."""

from __future__ import annotations

import errno

# Write failures that are the machine's state, not a bug: reported as one line, exit code 6.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_DISK_TEXTS = ("no space left on device", "disk quota exceeded", "file too large", "os error 28")


class UserError(Exception):
    """Bad input or an unmet requirement: reported as one line, exit code `exit_code`, no traceback."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ParityError(UserError):
    """The engine disagrees with the PyTorch reference beyond the stated tolerances."""

    exit_code = 3


class MissingDependencyError(UserError):
    """An optional component (TensorRT, a GPU, the Triton server) is not available here."""

    exit_code = 4


class BusyError(UserError):
    """Another process is writing the same output or repository right now: try again later."""

    exit_code = 5


class DiskError(UserError):
    """The disk filled up (or refused writes) mid-way; whatever was half-written was removed."""

    exit_code = 6


class Terminated(BaseException):
    """SIGTERM/SIGHUP arrived: unwinds like Ctrl-C so every `finally` removes partial output.

    A BaseException so that no `except Exception` in a stage can swallow it. A bare `except:` in
    third-party code still can (Polygraphy's `LazyModule.is_importable` wraps an import in one,
    and export and verify import lazily: CI 2026-11-28 saw a SIGTERM-ed build finish with exit 0),
    so the signal is also noted (`note_termination`) and raised again between stages
    (`raise_if_terminated`).
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_TERMINATION: list[int] = []  # signals noted by the CLI's handler since it was installed


def note_termination(signum: int) -> None:
    _TERMINATION.append(signum)


def clear_termination() -> None:
    _TERMINATION.clear()


def noted_termination() -> int | None:
    """The first termination signal the CLI's handler noted, or None."""
    return _TERMINATION[0] if _TERMINATION else None


def raise_if_terminated() -> None:
    """Raise `Terminated` again if a termination signal arrived, in case its first raise was
    swallowed where it landed."""
    signum = noted_termination()
    if signum is not None:
        raise Terminated(signum)


def one_line(exc: BaseException, limit: int = 200) -> str:
    """A readable single line for any exception: its first non-empty line, else its type name.

    Messages that say nothing on their own (empty, a bare number such as a pickle's "101", a
    KeyError's key) are prefixed with the exception type.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) < 12 or not any(ch.isalpha() for ch in text) or isinstance(exc, KeyError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:limit]


def disk_error(exc: BaseException) -> str | None:
    """One line if `exc` (or what caused it) is a full or read-only disk, else None.

    Writers report this in many types: OSError (Python, shutil), RuntimeError (torch.save),
    SafetensorError (safetensors) — so the cause chain and the text are both consulted.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_ERRNOS:
            where = f" while writing {current.filename}" if current.filename else ""
            return f"{current.strerror or 'disk error'}{where}"
        text = str(current).lower()
        for marker in _DISK_TEXTS:
            if marker in text:
                return f"{marker if marker != 'os error 28' else 'no space left on device'}"
        current = current.__cause__ or current.__context__
    return None

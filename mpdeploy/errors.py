"""The one exception type a user can cause; the CLI prints it as a single line on stderr."""


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

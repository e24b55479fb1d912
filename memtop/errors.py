"""One exception type for every failure a user should see as a single line, not a traceback."""


class MemtopError(Exception):
    """A failure with a message fit for the user's terminal; the CLI prints it and exits non-zero."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

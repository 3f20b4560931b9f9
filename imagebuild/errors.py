"""One exception root for everything imagebuild reports to a person.

Every message says what failed, on which input, and (in ``hint``) what to do next.
Only the CLI turns these into exit codes; nothing else prints tracebacks.
"""

from __future__ import annotations


class ImagebuildError(Exception):
    """Root of all errors that end a run with a message for the user."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class SpecError(ImagebuildError):
    """A spec file is malformed, or names an unknown key or value (carries file:line)."""


class ConfigError(ImagebuildError):
    """Command-line options or resolved settings are inconsistent or invalid."""


class ToolMissingError(ImagebuildError):
    """A host program the step needs is not installed."""


class CommandError(ImagebuildError):
    """An external command failed; the message carries the command and its stderr."""


class StageError(ImagebuildError):
    """The stage tarball is missing, unreadable, unsafe or lacks what an image needs."""


class ImageError(ImagebuildError):
    """Laying out, filling or converting the disk image failed."""


class WorkspaceError(ImagebuildError):
    """The workspace cannot be created or safely removed (for example a foreign mount below it)."""


class SmokeTestError(ImagebuildError):
    """The smoke test could not run at all (missing firmware, unreadable image, ...).

    A guest that boots but fails a check is not an error: it is a failed result.
    """


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; cleanup runs as it unwinds.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` (a smoke-test
    check, a launch error wrapper, a library) can turn a signal into an ordinary failure.
    """

    exit_code = 130

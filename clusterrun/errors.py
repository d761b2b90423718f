"""One exception root for everything a user can cause.

Only the CLI prints these, without a traceback; each carries the exit code the
contract gives it (GUIDE.md: 1 job failed, 2 bad input, 3 unreachable node).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130


class ClusterrunError(Exception):
    """An expected, user-facing error: its message says what to do."""

    exit_code = EXIT_USAGE


class UsageError(ClusterrunError):
    """Bad arguments or options."""


class HostsFileError(ClusterrunError):
    """The hosts file is missing, malformed or invalid."""

    def __init__(self, path: str, where: str, message: str) -> None:
        self.path, self.where = path, where
        prefix = f"{path}: {where}: " if where else f"{path}: "
        super().__init__(prefix + message)


class UnreachableError(ClusterrunError):
    """One or more nodes could not be reached or refused us."""

    exit_code = EXIT_UNREACHABLE

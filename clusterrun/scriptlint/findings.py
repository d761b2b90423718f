"""What lint reports: one finding per problem, and its two-line text."""

from __future__ import annotations

from dataclasses import dataclass

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True)
class Finding:
    """One problem in one file. ``line`` and ``col`` are 1-based."""

    path: str
    line: int
    col: int
    code: str        # short stable id, e.g. "CR001"
    severity: str    # "error" | "warning"
    message: str     # what is wrong, naming the expression
    fix: str         # what to write instead


def format_finding(f: Finding) -> str:
    """``train.py:12:5: error CR001 <message>`` and an indented ``fix:`` line."""
    return f"{f.path}:{f.line}:{f.col}: {f.severity} {f.code} {f.message}\n    fix: {f.fix}"

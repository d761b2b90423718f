"""`clusterrun lint SCRIPT...`: print what scriptlint finds in training scripts, a
summary line, and exit 1 if any finding is an error.

The checks themselves (rank / local-rank mistakes, CR000-CR007) are
clusterrun/scriptlint/; see docs/lint.md.
"""

from __future__ import annotations

import os
from typing import Sequence

from ..errors import UsageError
from ..scriptlint import ERROR, format_finding, lint_paths, python_files


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def lint_command(paths: Sequence[str]) -> int:
    """`clusterrun lint SCRIPT...`: print every finding and a summary; 1 if any
    error, else 0. A path that does not exist is bad usage (UsageError, exit 2)."""
    if not paths:
        raise UsageError("lint: name at least one script to check")
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise UsageError(f"lint: no such file: {', '.join(missing)}")
    files = python_files(paths)
    findings = lint_paths(files)
    for f in findings:
        print(format_finding(f))
    errors = sum(f.severity == ERROR for f in findings)
    n_warnings = len(findings) - errors
    checked = _plural(len(files), "file")
    if not findings:
        print(f"no problems found in {checked}")
    else:
        with_problems = len({f.path for f in findings})
        where = checked if with_problems == len(files) else f"{with_problems} of {checked}"
        counts = [_plural(errors, "error")] if errors else []
        counts += [_plural(n_warnings, "warning")] if n_warnings else []
        print(f"{', '.join(counts)} in {where}")
    return 1 if errors else 0

"""Static checks of a torchrun training script for the rank / local-rank mistakes that
work on one machine and break on several (the standard library's ``ast``; torch is
never imported). See docs/lint.md for the checks.

- scope.py    what names mean where: imports, aliases, scopes, assignments
- values.py   what a value is known to hold: the global rank, the local rank, ...
- rules.py    the CR001-CR007 checks over those
- findings.py a finding and its text

CR000 is this module's: a file that cannot be read or parsed is one finding, never
an exception, so that a caller (`clusterrun lint`, `up`'s warnings) needs no handler.
"""

from __future__ import annotations

import ast
import os
import tokenize
import warnings
from typing import Sequence

from .findings import ERROR, WARNING, Finding, format_finding
from .rules import check

__all__ = ["ERROR", "WARNING", "Finding", "format_finding", "lint_source", "lint_paths",
           "python_files"]


def lint_source(source: str, path: str = "<string>") -> list[Finding]:
    """Check one script's source; findings sorted by line. A syntax error is one
    CR000 finding, never an exception."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # SyntaxWarning: not ours to report
            tree = ast.parse(source, filename=path)
        return check(tree, path)
    except SyntaxError as e:
        return [Finding(path, e.lineno or 1, e.offset or 1, "CR000", ERROR,
                        f"syntax error: {e.msg}", "fix the syntax error; nothing else was checked")]
    except ValueError as e:              # e.g. a NUL byte in the source
        return [Finding(path, 1, 1, "CR000", ERROR, f"cannot parse: {e}",
                        "is this a Python source file?")]
    except RecursionError:
        return [Finding(path, 1, 1, "CR000", ERROR, "too deeply nested to check",
                        "nothing was checked in this file")]


def python_files(paths: Sequence[str]) -> list[str]:
    """Files as given; directories become the .py files under them (not hidden
    directories, __pycache__ or virtual environments)."""
    out: list[str] = []
    for p in paths:
        if not os.path.isdir(p):
            out.append(p)
            continue
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__"
                             and not os.path.exists(os.path.join(root, d, "pyvenv.cfg")))
            out += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
    return out


def lint_paths(paths: Sequence[str]) -> list[Finding]:
    """Check files (directories: the .py files under them). A file that cannot be
    read or parsed is one CR000 finding, never an exception."""
    findings: list[Finding] = []
    for path in python_files(paths):
        try:
            with tokenize.open(path) as f:       # honours a PEP 263 coding line
                source = f.read()
        except (OSError, UnicodeDecodeError, SyntaxError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            findings.append(Finding(path, 1, 1, "CR000", ERROR, f"cannot read the file: {reason}",
                                    "check the path and that it is a readable Python file"))
            continue
        findings += lint_source(source, path)
    return findings

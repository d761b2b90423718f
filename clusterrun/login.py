"""The login line: what a node's shell runs before clusterrun's program there.

`cd WORKDIR`, then the `setup:` lines (reading nothing from stdin, which may carry
the node agent), then `exec` the program: the node agent for `up` and the commands
that reach a job, the user's command for `exec`. `--dry-run` prints the same steps
joined by `&&`. Built here only, and its failures put in words here only.

The node's login shell may be any shell (bash, dash, zsh, ksh, tcsh, fish): sshd
runs the line with it. So the login shell only ever gets `for_any_shell`'s line,
which has it exec /bin/sh with the script as data it cannot read (octal escapes);
the script is POSIX sh, run by /bin/sh. `setup:` lines run in the login shell
itself where it is one of the Bourne family (`source`, and what its rc files set
up, work as in a terminal), else in that /bin/sh.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from .nodeagent import FAILED_MARK, FAILED_SETUP, FAILED_WORKDIR, SETUP_VAR
from .plan import quote_path, setup_part

# Bytes that mean the same to every shell inside single quotes and to printf's format
# inside sh's double quotes; every other byte is written as an octal escape. (`\` then a
# digit is left alone in single quotes by every shell, fish and tcsh included; no `!`
# for tcsh's history, no `'`, no newline, no `%` or `$`.)
_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _,./:=@+-")

# Login shells of the Bourne family, in which `setup:` lines run as their user wrote
# them; under any other (tcsh, csh, fish) they run in /bin/sh. SHLVL is unset so that
# bash reads its .bashrc as sshd's bash did (bash skips it for a nested shell).
_SETUP_IN_LOGIN_SHELL = 'case ${SHELL##*/} in bash|zsh|ksh|ksh93|mksh) unset SHLVL; exec "$SHELL" -c '


def for_any_shell(script: str) -> str:
    """The line that runs the POSIX sh `script` in /bin/sh whatever the login shell is
    that reads it: `exec /bin/sh -c 'eval "$(printf "...")"'`, the script in octal
    escapes, so that no shell expands, splits or rejects any of it (tcsh's `!`, fish's
    syntax) and every argument arrives as written."""
    data = script.encode()
    text = "".join(chr(b) if b in _PLAIN and (i or chr(b).isalnum()) else f"\\{b:03o}"
                   for i, b in enumerate(data))
    return f"exec /bin/sh -c 'eval \"$(printf \"{text}\")\"'"


# Shells word a failed cd each their own way (bash: "No such file or directory",
# dash: "can't cd to"), so the reason comes from test(1), which every POSIX shell has.
_CD_REASONS = {"missing": "No such file or directory", "notdir": "Not a directory",
               "denied": "Permission denied"}


# Why a shell could not run a program, in the system's words (strerror), which each shell
# puts in a sentence of its own: "sh: 1: exec: P: Permission denied", "zsh:1: permission denied: P".
_EXEC_REASONS = ("Permission denied", "Exec format error", "Is a directory", "Text file busy")


def _exec_reason(line: str) -> str:
    """The reason in a shell's line about a program it could not run, as strerror words it."""
    return next((r for r in _EXEC_REASONS if r.lower() in line.lower()), line.rsplit(": ", 1)[-1])


@dataclass(frozen=True)
class Login:
    """A node's workdir and `setup:` lines (from its Host or its NodePlan)."""

    workdir: str | None
    setup: tuple[str, ...]

    def _steps(self) -> list[tuple[str, str]]:
        """Each step, and what its failure runs: FAILED_MARK and the step's name on stderr."""
        steps = []
        if self.workdir:
            q = quote_path(self.workdir)
            why = f"$([ -d {q} ] && echo denied || {{ [ -e {q} ] && echo notdir || echo missing; }})"
            steps.append((f"cd {q}", f"echo \"{FAILED_MARK}{FAILED_WORKDIR} {why}\" >&2; exit 1"))
        setup = self.setup_lines()
        if setup:
            steps.append(("{ " + " && ".join(setup) + "; } </dev/null",
                          f"echo \"{FAILED_MARK}{FAILED_SETUP} $?\" >&2; exit 1"))
        return steps

    def shown_steps(self) -> str:
        """The steps as `--dry-run` shows them, for a person to paste: `cd W && { S; } </dev/null && `."""
        return "".join(f"{step} && " for step, _ in self._steps())

    def line(self, program: str, make_workdir: bool = False, tag: str = "") -> str:
        """The whole login line, as the node's login shell gets it (`for_any_shell`)."""
        return for_any_shell(self.script(program, make_workdir, tag))

    def script(self, program: str, make_workdir: bool = False, tag: str = "") -> str:
        """The login line's POSIX sh script: the steps, then `exec PROGRAM` (a shell line,
        quoted by the caller). make_workdir: create the workdir first (`up --sync` fills
        it); if that fails, the script ends with mkdir's own words. The setup lines and
        the program run in the login shell where it is of the Bourne family. tag (letters
        and digits): the setup's processes carry it in SETUP_VAR, so that a setup still
        running when clusterrun gives up can be found and ended (the program does not get it)."""
        made = f"mkdir -p {quote_path(self.workdir)} || exit; " if make_workdir and self.workdir else ""
        steps = [f"{step} || {{ {fail}; }}; " for step, fail in self._steps()]
        if not self.setup_lines():
            return made + "".join(steps) + "exec " + program
        setup = steps.pop()             # the last step
        if tag:
            assert tag.isalnum(), tag
            setup = f"{SETUP_VAR}={tag}; export {SETUP_VAR}; {setup}unset {SETUP_VAR}; "
        rest = setup + "exec " + program
        return made + "".join(steps) + _SETUP_IN_LOGIN_SHELL + shlex.quote(rest) + ";; esac; " + rest

    def setup_lines(self) -> list[str]:
        return [setup_part(s) for s in self.setup if s.strip()]

    def marked_failure(self, stderr_lines: list[str], output: list[str]) -> str | None:
        """The marked step that stopped the line, in words; None if no step did.
        stderr_lines: the login's stderr (or all its output, where stderr is merged),
        output: its other lines, whose last ones a failed setup shows."""
        mark = next((line[line.index(FAILED_MARK) + len(FAILED_MARK):].split()
                     for line in stderr_lines if FAILED_MARK in line), None)
        if not mark:
            return None
        if mark[0] == FAILED_WORKDIR:
            return f"workdir {self.workdir}: {_CD_REASONS.get(mark[-1], 'cannot be entered')}"
        rest = [line for line in stderr_lines if FAILED_MARK not in line and line.strip()]
        last = " | ".join(line.strip() for line in (rest or output)[-3:] if line.strip())
        return f"setup failed with exit code {mark[1] if len(mark) > 1 else '?'}" + (f": {last}" if last else "")


    def why_failed(self, python: str, code: int | None, stderr: str, output: bytes = b"") -> str:
        """Why a login line that execs `python` ended before the program spoke, in words:
        the workdir, the setup (with its exit status and last lines), or the python."""
        lines = [line for line in stderr.splitlines() if line.strip()]
        why = self.marked_failure(lines, output.decode("utf-8", "replace").splitlines())
        if why is not None:
            return why
        if code == 127:
            return f"python {python} not found"
        if code == 126:
            return f"python {python} cannot be run" + (f" ({_exec_reason(lines[-1])})" if lines else "")
        return lines[-1] if lines else f"the login shell exited with code {code} before python started"

"""The login line: what a node's shell runs before clusterrun's program there.

`cd WORKDIR`, then the `setup:` lines (reading nothing from stdin, which may carry
the node agent), then `exec` the program: the node agent for `up` and the commands
that reach a job, the user's command for `exec`. `--dry-run` prints the same steps
joined by `&&`. Built here only, and its failures put in words here only.
"""

from __future__ import annotations

from dataclasses import dataclass

from .nodeagent import FAILED_MARK, FAILED_SETUP, FAILED_WORKDIR, SETUP_VAR
from .plan import quote_path, setup_part

# Shells word a failed cd each their own way (bash: "No such file or directory",
# dash: "can't cd to"), so the reason comes from test(1), which every POSIX shell has.
_CD_REASONS = {"missing": "No such file or directory", "notdir": "Not a directory",
               "denied": "Permission denied"}


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
        setup = [setup_part(s) for s in self.setup if s.strip()]
        if setup:
            steps.append(("{ " + " && ".join(setup) + "; } </dev/null",
                          f"echo \"{FAILED_MARK}{FAILED_SETUP} $?\" >&2; exit 1"))
        return steps

    def steps(self) -> str:
        """`cd WORKDIR`, then the setup lines, each stopping the line with its mark if it fails."""
        return "".join(f"{step} || {{ {fail}; }}; " for step, fail in self._steps())

    def shown_steps(self) -> str:
        """The steps as `--dry-run` shows them, for a person to paste: `cd W && { S; } </dev/null && `."""
        return "".join(f"{step} && " for step, _ in self._steps())

    def line(self, program: str, make_workdir: bool = False, tag: str = "") -> str:
        """The whole login line: the steps, then `exec PROGRAM` (a shell line, quoted by
        the caller). make_workdir: create the workdir first (`up --sync` fills it);
        if that fails, the line ends with mkdir's own words. tag (letters and digits):
        the setup's processes carry it in SETUP_VAR, so that a setup still running
        when clusterrun gives up can be found and ended (the program does not get it)."""
        made = f"mkdir -p {quote_path(self.workdir)} || exit; " if make_workdir and self.workdir else ""
        steps = self.steps()
        if tag and any(s.strip() for s in self.setup):
            assert tag.isalnum(), tag
            steps = f"{SETUP_VAR}={tag}; export {SETUP_VAR}; {steps}unset {SETUP_VAR}; "
        return made + steps + "exec " + program

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
            return f"python {python} cannot be run" + (f" ({lines[-1]})" if lines else "")
        return lines[-1] if lines else f"the login shell exited with code {code} before python started"

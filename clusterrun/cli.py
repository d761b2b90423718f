"""The command line: parse options, call one library function, map errors to exit codes."""

from __future__ import annotations

import os
import shlex
import sys

import click

from . import __version__

from . import compat
from .errors import EXIT_INTERRUPTED, ClusterrunError
from .hostsfile import ON_HANG, HostsFileError, parse_duration, parse_env_mapping
from .options import RECONNECT_WINDOW, RECONNECT_WINDOW_ENV, LaunchOptions, UpOptions, WatchOptions
from .run.stream import use_color

# Each command imports its module when it runs: a command pays only for what it
# uses (`kill` through a live collector, `lint` and `--help` never load paramiko;
# see docs/performance.md).


def _run(fn, *args) -> None:
    """Call into the library; expected errors become a message and an exit code."""
    compat.gc_freeze()      # start-up's objects live as long as the process: compat.py
    try:
        code = fn(*args)
    except ClusterrunError as e:
        click.echo(f"clusterrun: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    finally:
        compat.gc_freeze()
    sys.exit(code or 0)


def _parse_env(values: tuple[str, ...]) -> dict[str, str]:
    pairs = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {v!r}", param_hint="--env")
        pairs[key] = value
    try:
        return parse_env_mapping(pairs, "--env", "")
    except HostsFileError as e:
        raise click.BadParameter(str(e).removeprefix("--env: "), param_hint="--env") from None


def _master_port(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    if not (value.isascii() and value.isdigit() and len(value) <= 5 and 1 <= int(value) <= 65535):
        raise click.BadParameter(f"expected a port 1-65535 or auto, got {value!r}", param_hint="--master-port")
    return int(value)


def _reconnect_window() -> float:
    """The hidden CLUSTERRUN_RECONNECT_WINDOW (options.py), read here only: each command
    that follows a run reads it once. A detached run's collector inherits it with `up`'s
    environment."""
    raw = os.environ.get(RECONNECT_WINDOW_ENV)
    if raw is None:
        return RECONNECT_WINDOW
    try:
        return parse_duration(raw)
    except ValueError as e:
        raise click.UsageError(f"{RECONNECT_WINDOW_ENV}: {e}") from None


class _Duration(click.ParamType):
    name = "duration"

    def convert(self, value, param, ctx):
        try:
            return value if isinstance(value, float) else parse_duration(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


DURATION = _Duration()


class _Nproc(click.ParamType):
    """--nproc-per-node: a count, or `gpu` (one process per GPU of each node)."""

    name = "N|gpu"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "gpu":
            return value
        if isinstance(value, str) and value.isascii() and value.isdigit() and int(value) >= 1:
            return int(value)
        self.fail(f"expected a positive integer or gpu, got {value!r}", param, ctx)


NPROC = _Nproc()


def transport_option(f):
    """--transport, shared by every command that connects from a hosts file."""
    return click.option(
        "--transport", type=click.Choice(["paramiko", "openssh"]),
        help="paramiko (default) or openssh: every session through the system ssh client "
             "(one ControlMaster per node); overrides the hosts file's `transport:`.")(f)


class _UpCommand(click.Command):
    """`up`, which keeps the words it was given: a SCRIPT that is an option (typed
    after HOSTS, as torchrun takes them) is then answered with the command reordered."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["up_args"] = list(args)
        return super().parse_args(ctx, args)


def _options_after_hosts(ctx: click.Context, hosts: str, script: str, script_args: tuple[str, ...]) -> None:
    """A SCRIPT that starts with `-` is an option of `up` typed after HOSTS, where
    everything is the script's: a usage error (exit 2) with the command as it should be."""
    if not script.startswith("-") or script == "-":
        return
    msg = (f"SCRIPT {script!r} starts with '-': options of `up` go before HOSTS "
           "(everything after SCRIPT is the script's own)")
    fixed = _reordered(ctx, [script, *script_args])
    before = ctx.meta.get("up_args", [])[:-(2 + len(script_args))]
    if fixed is not None and "--" not in before:
        msg += ":\n  " + shlex.join(["clusterrun", "up", *before, *fixed[0], hosts, *fixed[1]])
    raise click.UsageError(msg, ctx)


def _reordered(ctx: click.Context, words: list[str]) -> tuple[list[str], list[str]] | None:
    """Split the words after HOSTS into `up`'s options (with their values) and SCRIPT
    with its arguments; None when a word is no option of `up` or no SCRIPT follows."""
    options = {name: p for p in ctx.command.params if isinstance(p, click.Option)
               for name in (*p.opts, *p.secondary_opts)}
    i = 0
    while i < len(words) and words[i].startswith("-") and words[i] != "-":
        if words[i] == "--":            # `HOSTS -- SCRIPT`: up needs no `--`; leave it out
            return (words[:i], words[i + 1:]) if i + 1 < len(words) else None
        name, eq, _ = words[i].partition("=")
        param = options.get(name)
        if param is None or (eq and param.is_flag):
            return None
        i += 1 if param.is_flag or eq else 2
    if i >= len(words):
        return None
    return words[:i], words[i:]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="clusterrun")
def main() -> None:
    """Launch PyTorch distributed training on your machines over SSH."""


@main.command("up", cls=_UpCommand,
              context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-m", "--module", is_flag=True, help="SCRIPT is a module (python -m SCRIPT).")
@click.option("--nproc-per-node", type=NPROC, metavar="N|gpu",
              help="Processes per node, for every node; gpu: one per GPU the node has.")
@click.option("--master-port", metavar="PORT|auto", help="Port of the rendezvous on node 0.")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="Set on every node; repeatable.")
@click.option("-d", "--detach", is_flag=True, help="Return once every node has started; print the run id.")
@click.option("--dry-run", is_flag=True, help="Print the rank table and each node's command; connect to nothing.")
@click.option("--sync", is_flag=True, help="Copy the current directory to each node's workdir first.")
@click.option("--skip-check", is_flag=True, help="Start without the preflight of every node.")
@click.option("--no-fail-fast", is_flag=True, help="Keep the other nodes running when one fails.")
@click.option("--hang-timeout", type=DURATION, metavar="DURATION",
              help="No line this long (300, 90s, 5m) and no rank working: a hang; print every "
                   "rank's stacks (start-up, before a rank's first line or collective: 10x this).")
@click.option("--on-hang", type=click.Choice(ON_HANG),
              help="Once hung: report (default: go on waiting) or kill the run.")
@click.option("--max-restarts", type=click.IntRange(min=0, max=1000), metavar="N",
              help="Restart the whole job up to N times after a failure (spares replace lost nodes).")
@click.option("--restart-delay", type=DURATION, metavar="SECONDS", help="Wait before a restart (default 5).")
@click.option("--start-timeout", type=DURATION, metavar="DURATION",
              help="Give up if a node has not logged in, run its setup and been checked by then (default 10m).")
@click.option("--accept-new-host-keys", is_flag=True, help="Trust hosts not yet in known_hosts.")
@transport_option
@click.option("--sbatch-arg", "sbatch_args", multiple=True, metavar="OPTION",
              help="Outside a Slurm allocation: an sbatch option for the job `up` submits; repeatable.")
@click.option("--run-id", hidden=True, help="The batch step of this submitted run (run/submit.py).")
@click.option("--no-color", is_flag=True, help="No colours (also: NO_COLOR=1).")
@click.argument("hosts", type=click.Path(dir_okay=False))
@click.argument("script")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
def up_cmd(module, nproc_per_node, master_port, env, detach, dry_run, sync, skip_check, no_fail_fast, hang_timeout,
           on_hang, max_restarts, restart_delay, start_timeout, accept_new_host_keys, transport, sbatch_args, run_id,
           no_color, hosts, script, script_args) -> None:
    """Start SCRIPT with torchrun on every node of HOSTS and stream every rank's lines.

    Options go before HOSTS; everything after SCRIPT is passed to the script.
    """
    _options_after_hosts(click.get_current_context(), hosts, script, script_args)
    opts = LaunchOptions(
        script=script, script_args=tuple(script_args), module=module,
        nproc_per_node=nproc_per_node, master_port=_master_port(master_port), env=_parse_env(env),
    )
    from .commands import up

    up_opts = UpOptions(fail_fast=not no_fail_fast, accept_new_host_keys=accept_new_host_keys,
                        color=use_color(no_color=no_color), detach=detach, skip_check=skip_check,
                        sync=sync, transport=transport, hang_timeout=hang_timeout, on_hang=on_hang,
                        max_restarts=max_restarts, restart_delay=restart_delay, start_timeout=start_timeout,
                        reconnect_window=_reconnect_window(), sbatch_args=tuple(sbatch_args),
                        batch_args=_batch_args(click.get_current_context()), run_id=run_id)
    if dry_run:
        _run(lambda: click.echo(up.dry_run(hosts, opts, transport, up_opts)))
    _run(up.up, hosts, opts, up_opts)


# Options only the `up` that submits a run to Slurm uses; its batch step gets the others.
_SUBMITTER_ONLY = frozenset({"detach", "dry_run", "sbatch_args", "run_id", "no_color"})


def _batch_args(ctx: click.Context) -> tuple[str, ...]:
    """`up`'s words as typed (options, HOSTS, SCRIPT, its arguments), less the options only
    the submitting `up` uses: what the batch step of a submitted run runs again."""
    words = ctx.meta.get("up_args", [])
    options = {name: p for p in ctx.command.params if isinstance(p, click.Option)
               for name in (*p.opts, *p.secondary_opts)}
    kept: list[str] = []
    i = 0
    while i < len(words) and words[i].startswith("-") and words[i] not in ("-", "--"):
        name, eq, _ = words[i].partition("=")
        param = options.get(name)
        if param is None and not name.startswith("--"):      # short flags together: -md
            flags = "".join(c for c in name[1:] if (p := options.get("-" + c)) is None
                            or p.name not in _SUBMITTER_ONLY)
            kept += [f"-{flags}"] if flags else []
            i += 1
            continue
        n = 1 if param is None or param.is_flag or eq else 2
        if param is None or param.name not in _SUBMITTER_ONLY:
            kept += words[i:i + n]
        i += n
    return tuple(kept + words[i:])


def _control(no_color: bool = True):
    return WatchOptions(color=use_color(no_color=no_color), reconnect_window=_reconnect_window())


@main.command("logs")
@click.argument("run", required=False)
@click.option("--rank", "ranks", type=click.IntRange(min=0), multiple=True, help="Only this global rank; repeatable.")
@click.option("--node", help="Only this node (name, host or node_rank), with torchrun's own lines.")
@click.option("-f", "--follow", is_flag=True, help="Follow a live run until it ends.")
@click.option("--tail", type=click.IntRange(min=0), help="Only the last N lines of each rank.")
@click.option("--attempt", type=click.IntRange(min=0), help="Only this attempt (after restarts; 0 is the first).")
@click.option("--no-color", is_flag=True, help="No colours (also: NO_COLOR=1).")
def logs_cmd(run, ranks, node, follow, tail, attempt, no_color) -> None:
    """Print a run's tagged lines (RUN defaults to the latest run)."""
    from .commands import logs

    _run(logs.logs, run, tuple(ranks), node, follow, tail, _control(no_color), attempt)


@main.command("stacks")
@click.argument("run", required=False)
@click.option("--rank", "ranks", type=click.IntRange(min=0), multiple=True, help="Only this global rank; repeatable.")
@click.option("--node", help="Only this node (name, host or node_rank).")
@click.option("--native", is_flag=True, help="Native (C/C++) frames too, where py-spy is on the node.")
@click.option("--children", is_flag=True, help="Also the ranks' child processes (DataLoader workers).")
def stacks_cmd(run, ranks, node, native, children) -> None:
    """Every rank's Python stacks, grouped by identical stack (RUN defaults to the latest run)."""
    from .commands import stacks

    _run(stacks.stacks, run, tuple(ranks), node, native, children, _control())


@main.command("status")
@click.argument("run", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status_cmd(run, as_json) -> None:
    """Each node's state: starting, running, exited with code, killed, lost."""
    from .commands import status

    _run(status.status, run, as_json, _control())


@main.command("ps")
def ps_cmd() -> None:
    """List runs, newest first."""
    from .commands import status

    _run(status.ps)


@main.command("kill")
@click.argument("run", required=False)
@click.option("--all", "all_runs", is_flag=True, help="Every run that has not ended.")
@click.option("--grace", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds between TERM and KILL.")
def kill_cmd(run, all_runs, grace) -> None:
    """Stop a run (default the latest) on every node; returns once nothing of it is left."""
    from .commands import kill

    _run(kill.kill, run, all_runs, grace)


@main.command("check")
@click.argument("hosts", type=click.Path(dir_okay=False))
@click.option("--accept-new-host-keys", is_flag=True, help="Trust hosts not yet in known_hosts.")
@transport_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--timeout", type=DURATION, metavar="DURATION",
              help="A node not done logging in, with its setup and probe by then is reported (default 2m).")
def check_cmd(hosts, accept_new_host_keys, transport, as_json, timeout) -> None:
    """Preflight and inventory of every node of HOSTS, one row each."""
    from .commands import check

    _run(check.check, hosts, accept_new_host_keys, transport, as_json, timeout)


@main.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--accept-new-host-keys", is_flag=True, help="Trust hosts not yet in known_hosts.")
@transport_option
@click.option("--no-color", is_flag=True, help="No colours (also: NO_COLOR=1).")
@click.argument("hosts", type=click.Path(dir_okay=False))
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
def exec_cmd(hosts, argv, accept_new_host_keys, transport, no_color) -> None:
    """Run a command on every node of HOSTS: clusterrun exec HOSTS -- CMD [ARGS...]."""
    from .commands import exec as exec_command

    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    _run(exec_command.run_exec, hosts, argv, use_color(no_color=no_color), accept_new_host_keys, transport)


@main.command("lint")
@click.argument("scripts", nargs=-1, required=True)
def lint_cmd(scripts) -> None:
    """Find rank/local-rank mistakes in training scripts."""
    from .commands import lint
    _run(lint.lint_command, list(scripts))


@main.command("_collect", hidden=True)
@click.argument("run")
@click.option("--lock-fd", type=int, help="The run's collector lock, inherited locked from `up -d`.")
@click.option("--connect-timeout", type=float, help="The hosts file's connect_timeout.")
@click.option("--hang-timeout", type=float, help="up's hang timeout, in seconds.")
@click.option("--on-hang", type=click.Choice(ON_HANG), default="report")
@click.option("--restarts-on-stdin", is_flag=True, help="up's restart settings, as JSON on stdin.")
def collect_cmd(run, lock_fd, connect_timeout, hang_timeout, on_hang, restarts_on_stdin) -> None:
    """Stream a detached run into its logs (started by `up --detach`)."""
    from .run.controller import collect
    from .run.runs import CollectorLock, RunDir
    from .run.stream import Terminal

    held = CollectorLock(lock_fd) if lock_fd is not None else None
    term, after = Terminal(), None
    if restarts_on_stdin:           # the run restarts itself: what `up` knew, never written down
        from .run.attempts import Restarts, restart_loop

        after = restart_loop(Restarts.from_json(sys.stdin.read()), term)
    _run(collect, RunDir.find(run), term,
         WatchOptions(print_lines=False, connect_timeout=connect_timeout, hang_timeout=hang_timeout,
                      on_hang=on_hang, reconnect_window=_reconnect_window()), True, None, held, after)

if __name__ == "__main__":  # pragma: no cover
    main()

"""The command line: parse options, call one library function, map errors to exit codes."""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import EXIT_USAGE, ClusterrunError
from .hostsfile import HostsFileError, parse_env_mapping
from . import launch
from .plan import LaunchOptions
from .stream import use_color


def _run(fn, *args) -> None:
    """Call into the library; expected errors become a message and an exit code."""
    try:
        code = fn(*args)
    except ClusterrunError as e:
        click.echo(f"clusterrun: {e}", err=True)
        sys.exit(e.exit_code)
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
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise click.BadParameter(f"expected a port 1-65535 or auto, got {value!r}", param_hint="--master-port")
    return int(value)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="clusterrun")
def main() -> None:
    """Launch PyTorch distributed training on your machines over SSH."""


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-m", "--module", is_flag=True, help="SCRIPT is a module (python -m SCRIPT).")
@click.option("--nproc-per-node", type=click.IntRange(min=1), help="Processes per node, for every node.")
@click.option("--master-port", metavar="PORT|auto", help="Port of the rendezvous on node 0.")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="Set on every node; repeatable.")
@click.option("--dry-run", is_flag=True, help="Print the rank table and each node's command; connect to nothing.")
@click.option("--no-fail-fast", is_flag=True, help="Keep the other nodes running when one fails.")
@click.option("--accept-new-host-keys", is_flag=True, help="Trust hosts not yet in known_hosts.")
@click.option("--no-color", is_flag=True, help="No colours (also: NO_COLOR=1).")
@click.argument("hosts", type=click.Path(dir_okay=False))
@click.argument("script")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
def up_cmd(module, nproc_per_node, master_port, env, dry_run, no_fail_fast, accept_new_host_keys,
           no_color, hosts, script, script_args) -> None:
    """Start SCRIPT with torchrun on every node of HOSTS and stream every rank's lines.

    Options go before HOSTS; everything after SCRIPT is passed to the script.
    """
    opts = LaunchOptions(
        script=script, script_args=tuple(script_args), module=module,
        nproc_per_node=nproc_per_node, master_port=_master_port(master_port), env=_parse_env(env),
    )
    if dry_run:
        _run(lambda: click.echo(launch.dry_run(hosts, opts)))
    up_opts = launch.UpOptions(fail_fast=not no_fail_fast, accept_new_host_keys=accept_new_host_keys,
                        color=use_color(no_color=no_color))
    _run(launch.up, hosts, opts, up_opts)


up_cmd.name = "up"

if __name__ == "__main__":  # pragma: no cover
    main()

"""The plan: ranks, MASTER_ADDR, environment and the exact command of every node.

`--dry-run` prints this plan and the real run executes it, so what is checked
here is what the user sees and what runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from clusterrun.errors import UsageError
from clusterrun.hostsfile import parse_hosts
from clusterrun.options import LaunchOptions
from clusterrun.dryrun import manual_argv, node_command, node_line, pick_interface, render_plan
from clusterrun.plan import (
    IFNAME_VARS,
    JOB_MARKER_VAR,
    Plan,
    make_plan,
    master_addr_for,
)

RUN_ID = "20260101-000000-abc123"


def plan_for(hosts_data, opts: LaunchOptions | None = None, *, run_id: str = RUN_ID,
             master_addr: str = "10.0.0.1", master_port: int = 29500,
             controller_python: str = "/usr/bin/python3", local_home: str = "/tmp/crh") -> Plan:
    return make_plan(
        parse_hosts(hosts_data, "hosts.yaml"), opts or LaunchOptions("train.py"),
        run_id=run_id, master_addr=master_addr, master_port=master_port,
        controller_python=controller_python, local_home=local_home,
    )


def argv_value(argv, flag: str) -> str:
    """The value of `--flag=value` in argv (exactly one occurrence)."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(flag + "=")]
    assert len(values) == 1, (flag, argv)
    return values[0]


# --- ranks -------------------------------------------------------------------------


@pytest.mark.parametrize("nprocs", [(3, 1), (2, 2, 4), (1,), (8, 1, 1, 5)])
def test_ranks_are_prefix_sums_of_nproc_in_file_order(nprocs):
    hosts = [f"gpu-{i}:{n}" for i, n in enumerate(nprocs)]
    plan = plan_for(hosts)
    assert plan.world_size == sum(nprocs)
    assert [n.node_rank for n in plan.nodes] == list(range(len(nprocs)))
    assert [n.host.host for n in plan.nodes] == [f"gpu-{i}" for i in range(len(nprocs))]
    assert [n.nproc for n in plan.nodes] == list(nprocs)
    assert [n.rank_start for n in plan.nodes] == [sum(nprocs[:i]) for i in range(len(nprocs))]
    # every global rank appears exactly once, in order
    assert [r for n in plan.nodes for r in n.ranks] == list(range(sum(nprocs)))


def test_uneven_3_1():
    a, b = plan_for(["a:3", "b:1"]).nodes
    assert (list(a.ranks), list(b.ranks)) == ([0, 1, 2], [3])


def test_uneven_2_2_4():
    plan = plan_for(["a:2", "b:2", "c:4"])
    assert [list(n.ranks) for n in plan.nodes] == [[0, 1], [2, 3], [4, 5, 6, 7]]
    assert plan.world_size == 8


def test_nproc_option_overrides_every_host():
    plan = plan_for(["a:3", "b:1"], LaunchOptions("t.py", nproc_per_node=2))
    assert [n.nproc for n in plan.nodes] == [2, 2] and plan.world_size == 4


def test_torchrun_flags_on_every_node():
    plan = plan_for(["a:3", "b:1"], master_addr="10.9.9.9", master_port=29611)
    for n in plan.nodes:
        assert n.argv[:3] == ("/usr/bin/python3", "-m", "torch.distributed.run")
        assert argv_value(n.argv, "--nnodes") == "2"
        assert argv_value(n.argv, "--node-rank") == str(n.node_rank)
        assert argv_value(n.argv, "--nproc-per-node") == str(n.nproc)
        assert argv_value(n.argv, "--master-addr") == "10.9.9.9"
        assert argv_value(n.argv, "--master-port") == "29611"
        assert argv_value(n.argv, "--rdzv-backend") == "static"
        assert argv_value(n.argv, "--rdzv-id") == RUN_ID
        assert argv_value(n.argv, "--max-restarts") == "0"


def test_script_mode_runs_the_script_with_its_args_verbatim():
    args = ("--lr", "0.1", "-m", "x", "two words", "", "it's", '"q"', "$(touch x)", "`id`", "a\nb", "日本",
            "--log-dir=elsewhere")
    (n,) = plan_for(["a:2"], LaunchOptions("train.py", args)).nodes
    assert n.argv[-len(args) - 3:] == ("/usr/bin/python3", "-u", "train.py", *args)


def test_module_mode_uses_dash_m():
    (n,) = plan_for(["a"], LaunchOptions("pkg.train", ("--epochs", "3"), module=True)).nodes
    assert n.argv[-6:] == ("/usr/bin/python3", "-u", "-m", "pkg.train", "--epochs", "3")


def test_the_hosts_python_is_used_else_the_controllers():
    plan = plan_for({"hosts": [{"host": "a", "python": "/opt/venv/bin/python"}, "b"]})
    assert [n.python for n in plan.nodes] == ["/opt/venv/bin/python", "/usr/bin/python3"]
    assert [n.argv[0] for n in plan.nodes] == ["/opt/venv/bin/python", "/usr/bin/python3"]


def test_job_dir_is_unique_per_run_and_node_and_local_nodes_use_the_local_home():
    plan = plan_for(["localhost", "gpu-b", {"host": "gpu-b", "name": "gpu-b-2"}])
    assert [n.job_dir for n in plan.nodes] == [
        f"/tmp/crh/jobs/{RUN_ID}/0", f"~/.clusterrun/jobs/{RUN_ID}/1", f"~/.clusterrun/jobs/{RUN_ID}/2"]
    for n in plan.nodes:
        assert argv_value(n.argv, "--log-dir").startswith(n.job_dir + "/")


# --- environment -------------------------------------------------------------------


def test_env_hosts_file_then_env_option_wins():
    data = {"env": {"A": "file", "B": "file"}, "hosts": [{"host": "a", "env": {"B": "host", "C": "host"}}]}
    (n,) = plan_for(data, LaunchOptions("t.py", env={"C": "cli", "D": "cli"})).nodes
    assert {k: n.env[k] for k in "ABCD"} == {"A": "file", "B": "host", "C": "cli", "D": "cli"}


def test_pythonunbuffered_defaults_to_1_but_the_users_value_is_kept():
    a, b, c = plan_for({"hosts": ["a", {"host": "b", "env": {"PYTHONUNBUFFERED": "0"}}, "c"]}).nodes
    assert (a.env["PYTHONUNBUFFERED"], b.env["PYTHONUNBUFFERED"]) == ("1", "0")
    (d,) = plan_for(["d"], LaunchOptions("t.py", env={"PYTHONUNBUFFERED": ""})).nodes
    assert d.env["PYTHONUNBUFFERED"] == ""


def test_job_marker_is_unique_per_node_and_per_run():
    p1 = plan_for(["a", {"host": "a", "name": "a2"}, "b"])
    p2 = plan_for(["a", {"host": "a", "name": "a2"}, "b"], run_id="20260101-000000-def456")
    markers = [n.env[JOB_MARKER_VAR] for p in (p1, p2) for n in p.nodes]
    assert len(set(markers)) == 6
    assert all(n.env[JOB_MARKER_VAR] == n.marker for p in (p1, p2) for n in p.nodes)


def test_job_marker_cannot_be_overridden_by_the_user():
    (n,) = plan_for(["a"], LaunchOptions("t.py", env={JOB_MARKER_VAR: "mine"})).nodes
    assert n.env[JOB_MARKER_VAR] == n.marker != "mine"


def test_socket_ifname_picked_on_the_node_only_when_the_user_did_not_set_it():
    every = {"GLOO_SOCKET_IFNAME": "eth1", "NCCL_SOCKET_IFNAME": "ib0", "TP_SOCKET_IFNAME": "eth1"}
    a, b, c = plan_for({"hosts": [
        "a", {"host": "b", "env": {"NCCL_SOCKET_IFNAME": "ib0"}}, {"host": "c", "env": every},
    ]}).nodes
    assert a.pick_ifname == ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TP_SOCKET_IFNAME")
    assert b.pick_ifname == ("GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME")
    assert c.pick_ifname == ()
    (d,) = plan_for(["d"], LaunchOptions("t.py", env=every)).nodes
    assert d.pick_ifname == ()
    assert {k: d.env[k] for k in every} == every


# --- MASTER_ADDR ---------------------------------------------------------------------


def test_master_addr_setting_wins():
    hf = parse_hosts({"master_addr": "10.0.0.9", "hosts": [{"host": "a", "addr": "10.0.0.1"}, "b"]})
    assert master_addr_for(hf, "192.168.1.1") == "10.0.0.9"


def test_then_node_0s_addr():
    hf = parse_hosts({"hosts": [{"host": "a", "addr": "10.0.0.1"}, {"host": "b", "addr": "10.0.0.2"}]})
    assert master_addr_for(hf, "192.168.1.1") == "10.0.0.1"


def test_all_localhost_is_loopback():
    assert master_addr_for(parse_hosts(["localhost:2", "localhost:2"]), None) == "127.0.0.1"


def test_then_where_ssh_reached_node_0():
    assert master_addr_for(parse_hosts(["gpu-a", "gpu-b"]), "192.168.1.1") == "192.168.1.1"


def test_localhost_node_0_with_remote_nodes_needs_an_address():
    hf = parse_hosts(["localhost", "gpu-b"], "hosts.yaml")
    with pytest.raises(UsageError) as info:
        master_addr_for(hf, "127.0.0.1")
    assert info.value.exit_code == 2
    assert str(info.value).startswith("hosts.yaml: ") and "master_addr" in str(info.value)
    # ... which either setting gives
    assert master_addr_for(parse_hosts({"master_addr": "10.0.0.5", "hosts": ["localhost", "b"]}), None) == "10.0.0.5"
    assert master_addr_for(parse_hosts([{"host": "localhost", "addr": "10.0.0.6"}, "b"]), None) == "10.0.0.6"


# --- the dry-run: one line per node that runs its part by hand ----------------------------

NASTY_ARGS = ("--lr", "0.1", "two words", "it's", 'say "hi"', "$(touch x)", "`touch y`", "${HOME}", "$HOME",
              "a\nb", "tab\there", "日本語 ünï", "", " ", "*", "~", "~/x", "-m", "--", ";", "&&", "|", "#c",
              "\\", "'", '"', "!", "--env=A=B", "--log-dir=~/runs", "--redirects=3", "--no-python")
PICKED = tuple(f'{v}=${{{v}:-$IF}}' for v in IFNAME_VARS)     # as shlex reads the picked variables
RUN_ID_SHAPE = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")


def command_of(line: str) -> str:
    """The node's command in a dry-run line: ssh's last argument, or the inside of `( ... )`."""
    if line.startswith("( "):
        assert line.endswith(" )"), line
        return line[2:-2]
    words = shlex.split(line)
    assert words[:2] == ["ssh", "-t"], line
    return words[-1]


def split_env(cmd: str) -> tuple[list[str], list[str], list[str]]:
    """`[cd .. && setup && pick && ] env K=V ... argv` -> (words before env, K=V words, argv)."""
    words = shlex.split(cmd)
    i = next(k for k, w in enumerate(words) if w == "env" and (k == 0 or words[k - 1] == "&&"))
    j = i + 1
    while j < len(words) and "=" in words[j] and not words[j].startswith("-"):
        j += 1
    return words[:i], words[i + 1:j], words[j:]


def line_of(plan: Plan, node_rank: int = 0, **kw) -> str:
    return node_line(plan, plan.nodes[node_rank], **kw)


def test_manual_argv_is_the_plans_torchrun_without_clusterruns_own_parts():
    (n,) = plan_for(["gpu-a:2"], LaunchOptions("train.py", NASTY_ARGS), master_port=29511).nodes
    argv = manual_argv(n, "29511")
    assert argv == ("/usr/bin/python3", "-m", "torch.distributed.run", "--nnodes=1", "--node-rank=0",
                    "--nproc-per-node=2", "--master-addr=10.0.0.1", "--master-port=29511",
                    "--rdzv-backend=static", "--max-restarts=0", "train.py", *NASTY_ARGS)
    (m,) = plan_for(["gpu-a"], LaunchOptions("pkg.train", ("--epochs", "3"), module=True)).nodes
    assert manual_argv(m, "29500")[-4:] == ("-m", "pkg.train", "--epochs", "3")


@pytest.mark.parametrize("hosts", [["localhost:2"], ["gpu-a:2"]])
def test_the_line_parses_back_to_exactly_the_env_and_argv(hosts):
    env = {"SPACES": "a b", "QUOTE": "it's", "DOLLAR": "$(touch z)", "EMPTY": "", "NL": "a\nb"}
    plan = plan_for(hosts, LaunchOptions("train.py", NASTY_ARGS, env=env))
    (n,) = plan.nodes
    prefix, env_words, argv = split_env(command_of(line_of(plan)))
    assert env_words == [f"{k}={v}" for k, v in n.env.items() if k != JOB_MARKER_VAR] + list(PICKED)
    assert argv == list(manual_argv(n, "29500"))


def test_the_remote_line_is_ssh_with_a_terminal_and_the_command_as_one_argument():
    plan = plan_for({"hosts": [{"host": "gpu-a", "user": "alice", "port": 2222,
                                "identity_file": "~/.ssh/id_ed25519"}, "gpu-b"]},
                    LaunchOptions("train.py", NASTY_ARGS))
    a, b = (shlex.split(line_of(plan, i)) for i in (0, 1))
    assert a[:-1] == ["ssh", "-t", "-p", "2222", "-i", "~/.ssh/id_ed25519", "-l", "alice", "gpu-a"]
    assert b[:-1] == ["ssh", "-t", "gpu-b"]
    assert a[-1] == node_command(plan, plan.nodes[0]) and len(a) == 10


def test_no_trace_of_clusterruns_machinery_in_the_lines():
    plan = plan_for(["gpu-a:2", "localhost"], LaunchOptions("train.py", ("--x",)))
    for n in plan.nodes:
        words = shlex.split(command_of(node_line(plan, n)))
        for word in words:
            assert not word.startswith(("--log-dir", "--redirects", "--rdzv-id", "--no-python")), word
            assert JOB_MARKER_VAR not in word and "exec" != word
        assert "sh" not in words and "-u" not in words


def test_a_dry_run_prints_no_run_id_and_no_job_directory():
    plan = plan_for(["gpu-a:2", "localhost"], LaunchOptions("train.py"))
    text = render_plan(plan)
    assert RUN_ID not in text and not RUN_ID_SHAPE.search(text)
    assert ".clusterrun/jobs" not in text and "/tmp/crh" not in text and "run " not in text.split("\n")[0]


def test_the_interface_pick_is_there_exactly_for_the_variables_the_user_did_not_set():
    every = {"GLOO_SOCKET_IFNAME": "eth1", "NCCL_SOCKET_IFNAME": "ib0", "TP_SOCKET_IFNAME": "eth1"}
    plan = plan_for({"hosts": ["a", {"host": "b", "env": {"NCCL_SOCKET_IFNAME": "ib0"}},
                               {"host": "c", "env": every}]})
    a, b, c = (command_of(line_of(plan, i)) for i in range(3))
    assert a.count("IF=$(ip -o addr show to") == 1 and b.count("IF=$(ip -o addr show to") == 1
    assert all(f'{v}="${{{v}:-$IF}}"' in a for v in IFNAME_VARS)
    assert 'NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME' not in b and "NCCL_SOCKET_IFNAME=ib0" in b
    assert 'GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$IF}"' in b
    assert "ip " not in c and "$IF" not in c and "SRC=" not in c
    _, env_words, _ = split_env(c)
    assert [w for w in env_words if "IFNAME" in w] == [f"{k}={v}" for k, v in every.items()]


def test_a_master_addr_that_is_a_name_is_resolved_on_the_node():
    by_name = command_of(line_of(plan_for(["gpu-a"], master_addr="gpu-a.cluster")))
    assert by_name.startswith("MASTER_IP=$(getent ahosts gpu-a.cluster | ")
    assert 'ip -o route get "$MASTER_IP"' in by_name and "--master-addr=gpu-a.cluster" in by_name
    for literal in ("10.0.0.1", "fd00::1"):
        cmd = command_of(line_of(plan_for(["gpu-a"], master_addr=literal)))
        assert "getent" not in cmd and f"ip -o route get {literal} |" in cmd


def ip_works() -> bool:
    return shutil.which("ip") is not None and subprocess.run(
        ["ip", "-o", "route", "get", "127.0.0.1"], capture_output=True).returncode == 0


def own_addresses() -> list[str]:
    """127.0.0.1, a name, and the address this machine reaches the world from, if any."""
    addrs = ["127.0.0.1", "localhost"]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))     # a route only; nothing is sent
        addrs.append(s.getsockname()[0])
    except OSError:
        pass
    finally:
        s.close()
    return addrs


@pytest.mark.skipif(not ip_works(), reason="needs iproute2's `ip`")
@pytest.mark.parametrize("addr", own_addresses())
def test_the_shell_picks_the_interface_the_node_agent_picks(addr):
    """The line's pick, in sh, agrees with the node agent's `interface_to` (the real run's)."""
    from clusterrun.nodeagent import interface_to

    shell = pick_interface(addr) + 'printf %s "$IF"'
    got = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, timeout=30)
    assert got.returncode == 0, got.stderr
    assert got.stdout == interface_to(addr) and got.stdout


@pytest.mark.parametrize("workdir, rendered", [
    ("/data/run 1", "cd '/data/run 1' && "),
    ("~", "cd ~ && "),
    ("~/p", "cd ~/p && "),
    ("~other/p", "cd '~other/p' && "),
    ("$(touch x)", "cd '$(touch x)' && "),
])
def test_workdir_quoting(workdir, rendered):
    plan = plan_for({"workdir": workdir, "hosts": ["gpu-a"]})
    assert command_of(line_of(plan)).startswith(rendered)


def test_workdir_and_setup_come_first():
    plan = plan_for({"workdir": "~/my project", "setup": ["source ~/venv/bin/activate", "ulimit -n 4096"],
                     "hosts": ["gpu-a"]})
    assert command_of(line_of(plan)).startswith(
        "cd ~/'my project' && { source ~/venv/bin/activate && ulimit -n 4096; } </dev/null && SRC=$(ip ")


@pytest.fixture()
def argv_recorder(tmp_path: Path) -> Path:
    """An executable that records its argv, cwd and some env vars as JSON in $RECORD_TO."""
    exe = tmp_path / "bin" / "record-argv"
    exe.parent.mkdir()
    exe.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "keys = ('CLUSTERRUN_JOB', 'PYTHONUNBUFFERED', 'SPACES', 'FROM_SETUP', 'GLOO_SOCKET_IFNAME',\n"
        "        'NCCL_SOCKET_IFNAME', 'TP_SOCKET_IFNAME')\n"
        "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd(),\n"
        "           'env': {k: os.environ.get(k) for k in keys}}, open(os.environ['RECORD_TO'], 'w'))\n"
    )
    exe.chmod(0o755)
    return exe


def run_line(line: str, env: dict[str, str], shell: str = "sh") -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run([shell, "-c", line], env={**base, **env}, capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(not ip_works(), reason="needs iproute2's `ip`")
def test_a_real_shell_runs_the_pasted_line_with_exactly_the_planned_argv(tmp_path, argv_recorder):
    """What --dry-run prints, pasted into a shell, runs torchrun with the same argv, env and directory."""
    home = tmp_path / "home"
    (home / "my project").mkdir(parents=True)
    data = {"workdir": "~/my project", "setup": "FROM_SETUP=yes; export FROM_SETUP",
            "python": str(argv_recorder), "hosts": ["localhost:2"]}
    plan = plan_for(data, LaunchOptions("train.py", NASTY_ARGS, env={"SPACES": "a  b"}), master_addr="127.0.0.1")
    (n,) = plan.nodes
    record = tmp_path / "record.json"
    r = run_line(line_of(plan), {"HOME": str(home), "RECORD_TO": str(record)})
    assert r.returncode == 0, r.stderr
    got = json.loads(record.read_text())
    assert got["argv"] == list(manual_argv(n, "29500")[1:])
    assert got["cwd"] == str(home / "my project")
    assert got["env"] == {"CLUSTERRUN_JOB": None, "PYTHONUNBUFFERED": "1", "SPACES": "a  b", "FROM_SETUP": "yes",
                          **{v: "lo" for v in IFNAME_VARS}}
    assert not (home / "my project" / "x").exists() and not (home / "my project" / "y").exists()


@pytest.mark.skipif(not ip_works(), reason="needs iproute2's `ip`")
def test_an_interface_set_by_setup_or_the_environment_wins_over_the_pick(tmp_path, argv_recorder):
    data = {"setup": "export GLOO_SOCKET_IFNAME=fromsetup", "python": str(argv_recorder), "hosts": ["localhost"]}
    plan = plan_for(data, master_addr="127.0.0.1")
    record = tmp_path / "record.json"
    r = run_line(line_of(plan), {"RECORD_TO": str(record), "TP_SOCKET_IFNAME": "fromenv"})
    assert r.returncode == 0, r.stderr
    assert json.loads(record.read_text())["env"] == {
        "CLUSTERRUN_JOB": None, "PYTHONUNBUFFERED": "1", "SPACES": None, "FROM_SETUP": None,
        "GLOO_SOCKET_IFNAME": "fromsetup", "NCCL_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "fromenv"}


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_a_localhost_line_runs_in_a_subshell_leaving_the_users_shell_as_it_was(tmp_path, argv_recorder, shell):
    if shutil.which(shell) is None:
        pytest.skip(f"no {shell}")
    (tmp_path / "wd").mkdir()
    plan = plan_for({"workdir": str(tmp_path / "wd"), "python": str(argv_recorder), "hosts": ["localhost"]},
                    master_addr="127.0.0.1")
    record = tmp_path / "record.json"
    r = run_line(line_of(plan) + '; echo "after: $(pwd) IF=$IF SRC=$SRC"', {"RECORD_TO": str(record)}, shell)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"after: {os.getcwd()} IF= SRC=\n"
    assert json.loads(record.read_text())["cwd"] == str(tmp_path / "wd")


@pytest.mark.parametrize("setup", [
    "FROM_SETUP=yes; export FROM_SETUP",                                   # one line
    ["FROM_SETUP=yes", "export FROM_SETUP"],                               # a list
    "FROM_SETUP=yes\nexport FROM_SETUP\n",                                 # a YAML `|` block
    "FROM_SETUP=yes  # set it\nif true; then\n  export FROM_SETUP\nfi\n",   # comments, a compound
    "export FROM_SETUP=yes  # a comment at the end",
    ["", "FROM_SETUP=yes\n\n", "export FROM_SETUP  # last"],                # empty entries and lines
])
def test_every_form_of_setup_runs_in_a_real_shell(tmp_path, argv_recorder, setup):
    data = {"setup": setup, "python": str(argv_recorder), "hosts": ["localhost"]}
    plan = plan_for(data, LaunchOptions("train.py", ("--x",)), master_addr="127.0.0.1")
    record = tmp_path / "record.json"
    r = run_line(line_of(plan), {"RECORD_TO": str(record)})
    assert r.returncode == 0, r.stderr
    got = json.loads(record.read_text())
    assert got["env"]["FROM_SETUP"] == "yes" and got["argv"][-1] == "--x"


def test_a_failing_setup_line_stops_the_launch(tmp_path, argv_recorder):
    data = {"setup": ["false", "true"], "python": str(argv_recorder), "hosts": ["localhost"]}
    plan = plan_for(data, LaunchOptions("train.py"))
    record = tmp_path / "record.json"
    r = run_line(line_of(plan), {"RECORD_TO": str(record)})
    assert r.returncode != 0 and not record.exists()


def test_an_auto_master_port_is_a_placeholder_to_replace():
    plan = plan_for(["gpu-a", "gpu-b"], master_port=0)
    text = render_plan(plan, port_auto=True)
    assert "MASTER_PORT=auto (a free port on node 0, picked at start)" in text.splitlines()[0]
    assert "# master_port is auto: replace PORT in every line" in text
    for n in plan.nodes:
        assert "--master-port=PORT" in shlex.split(command_of(node_line(plan, n, port_auto=True)))
    assert "--master-port=0" not in text and "<" not in text


# --- golden: the dry-run text of a fixed plan ---------------------------------------------

GOLDEN = r"""3 nodes, world size 6, MASTER_ADDR=10.0.0.1 MASTER_PORT=29500

node       node_rank  nproc  global ranks  ssh target
node0              0      3           0-2  gpu-a
gpu-b              1      2           3-4  gpu-b
localhost          2      1             5  (local, no ssh)

# To run this job by hand, paste each line below into a terminal of its own on this
# machine, all at about the same time: each starts one node's ranks with the same
# environment and script as `clusterrun up`, and their output appears in that terminal.
# On the node, a line picks the interface that reaches MASTER_ADDR with `ip` (iproute2)
# for GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME and TP_SOCKET_IFNAME, unless already set.
# What `clusterrun up` adds to this: every line whole (here, ranks that share a terminal
# can splice theirs) and tagged with its node, global and local rank ([node g5 l1]);
# every node stopped when one fails (here, the others wait in their collectives until
# you press Ctrl-C there); every process on every node ended on Ctrl-C or
# `clusterrun kill`; logs and status under ~/.clusterrun/runs.
# NCCL on node0, node 2 (localhost): set by you (env:, --env): NCCL_DEBUG=WARN; set by clusterrun: NCCL_SOCKET_IFNAME (the interface that reaches MASTER_ADDR, picked on the node).
# NCCL on gpu-b: set by you (env:, --env): NCCL_DEBUG=WARN, NCCL_SOCKET_IFNAME=ib0; set by clusterrun: none.

# node 0 (node0): global ranks 0-2
ssh -t -p 2222 -i '~/.ssh/id_ed25519' -l alice gpu-a 'cd ~/'"'"'my project'"'"' && { source ~/venv/bin/activate; } </dev/null && SRC=$(ip -o route get 10.0.0.1 | sed -n "s/.* src \([^ ]*\).*/\1/p") && IF=$(ip -o addr show to "$SRC" | sed -n "1s/^[0-9]*: *\([^ @]*\).*/\1/p") && env NCCL_DEBUG=WARN PYTHONUNBUFFERED=1 CLUSTERRUN_ATTEMPT=0 GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$IF}" NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$IF}" TP_SOCKET_IFNAME="${TP_SOCKET_IFNAME:-$IF}" ~/venv/bin/python -m torch.distributed.run --nnodes=3 --node-rank=0 --nproc-per-node=3 --master-addr=10.0.0.1 --master-port=29500 --rdzv-backend=static --max-restarts=0 train.py --lr 0.1 --name '"'"'my run'"'"''

# node 1 (gpu-b): global ranks 3-4
ssh -t gpu-b 'SRC=$(ip -o route get 10.0.0.1 | sed -n "s/.* src \([^ ]*\).*/\1/p") && IF=$(ip -o addr show to "$SRC" | sed -n "1s/^[0-9]*: *\([^ @]*\).*/\1/p") && env NCCL_DEBUG=WARN NCCL_SOCKET_IFNAME=ib0 PYTHONUNBUFFERED=1 CLUSTERRUN_ATTEMPT=0 GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$IF}" TP_SOCKET_IFNAME="${TP_SOCKET_IFNAME:-$IF}" /usr/bin/python3 -m torch.distributed.run --nnodes=3 --node-rank=1 --nproc-per-node=2 --master-addr=10.0.0.1 --master-port=29500 --rdzv-backend=static --max-restarts=0 train.py --lr 0.1 --name '"'"'my run'"'"''

# node 2 (localhost): global rank 5
( SRC=$(ip -o route get 10.0.0.1 | sed -n "s/.* src \([^ ]*\).*/\1/p") && IF=$(ip -o addr show to "$SRC" | sed -n "1s/^[0-9]*: *\([^ @]*\).*/\1/p") && env NCCL_DEBUG=WARN PYTHONUNBUFFERED=1 CLUSTERRUN_ATTEMPT=0 GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$IF}" NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$IF}" TP_SOCKET_IFNAME="${TP_SOCKET_IFNAME:-$IF}" /usr/bin/python3 -m torch.distributed.run --nnodes=3 --node-rank=2 --nproc-per-node=1 --master-addr=10.0.0.1 --master-port=29500 --rdzv-backend=static --max-restarts=0 train.py --lr 0.1 --name 'my run' )"""


def test_render_plan_golden():
    plan = plan_for(
        {
            "nproc_per_node": 2,
            "env": {"NCCL_DEBUG": "WARN"},
            "hosts": [
                {"host": "gpu-a", "name": "node0", "addr": "10.0.0.1", "nproc_per_node": 3,
                 "user": "alice", "port": 2222, "identity_file": "~/.ssh/id_ed25519",
                 "workdir": "~/my project", "setup": "source ~/venv/bin/activate",
                 "python": "~/venv/bin/python"},
                {"host": "gpu-b", "env": {"NCCL_SOCKET_IFNAME": "ib0"}},
                "localhost:1",
            ],
        },
        LaunchOptions("train.py", ("--lr", "0.1", "--name", "my run")),
        master_addr="10.0.0.1", master_port=29500,
        controller_python="/usr/bin/python3", local_home="/tmp/crh",
    )
    assert render_plan(plan) == GOLDEN


def test_spares_are_marked_in_the_table_and_get_no_line():
    hosts = parse_hosts({"hosts": ["gpu-a", "gpu-b"], "spares": ["gpu-z"]}, "hosts.yaml")
    plan = plan_for({"hosts": ["gpu-a", "gpu-b"]})
    text = render_plan(plan, spares=hosts.spares)
    lines = text.splitlines()
    assert lines[0].startswith("2 nodes (and 1 spare), world size 2, ")
    assert lines[3:6] == ["gpu-a          0      1             0  gpu-a",
                          "gpu-b          1      1             1  gpu-b",
                          "gpu-z      spare                       gpu-z"]
    assert lines[-1] == ("# spare gpu-z: no line: it runs nothing until it takes a lost node's place "
                         "(clusterrun up, at a restart)")
    assert [l.split()[2] for l in lines if l.startswith("ssh ")] == ["gpu-a", "gpu-b"]


def test_secret_looking_env_values_are_masked_in_the_dry_run_only():
    data = {"env": {"WANDB_API_KEY": "s3cr3tvalue", "HF_TOKEN": "hf_x", "DB_PASSWORD": "pw", "LR": "0.1"},
            "hosts": ["gpu-a", "localhost"]}
    plan = plan_for(data)
    text = render_plan(plan)
    for secret in ("s3cr3tvalue", "hf_x", "=pw"):
        assert secret not in text
    # Each line shows **** in their place, and a comment says so, once.
    for n in plan.nodes:
        _, env_words, _ = split_env(command_of(node_line(plan, n)))
        assert env_words[:4] == ["WANDB_API_KEY=****", "HF_TOKEN=****", "DB_PASSWORD=****", "LR=0.1"]
    assert text.count("****") == 7
    assert "# **** stands for the value of DB_PASSWORD, HF_TOKEN, WANDB_API_KEY (never printed)" in text
    assert "**** stands" not in render_plan(plan_for(["gpu-a"]))
    # What the node gets is the real value.
    assert plan.nodes[0].env["WANDB_API_KEY"] == "s3cr3tvalue"


# --- property: any hosts file the parser accepts, any arguments: a consistent plan -------

from hypothesis import given, settings, strategies as st  # noqa: E402

from clusterrun.errors import ClusterrunError  # noqa: E402

_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)
_host = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,8}(:[1-8])?", fullmatch=True),
    st.from_regex(r"[a-z]{1,4}\[[0-3]-[4-6]\]", fullmatch=True),
    st.builds(lambda h, n: {"host": h, "nproc_per_node": n},
              st.from_regex(r"[a-z][a-z0-9.]{0,8}", fullmatch=True), st.integers(1, 8)),
    _text,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_host, min_size=1, max_size=6), st.lists(_text, max_size=6),
       st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,6}", fullmatch=True), _text, max_size=3),
       st.one_of(st.none(), st.integers(1, 16)))
def test_any_accepted_hosts_and_arguments_give_a_consistent_plan(hosts, args, env, nproc):
    try:
        hf = parse_hosts({"hosts": hosts}, "hosts.yaml")
        opts = LaunchOptions("train.py", tuple(args), env=env, nproc_per_node=nproc)
        plan = make_plan(hf, opts, run_id=RUN_ID, master_addr=master_addr_for(hf, "10.0.0.1"),
                         master_port=29500, controller_python="/usr/bin/python3", local_home="/tmp/crh")
    except ClusterrunError as e:
        assert e.exit_code == 2 and str(e)
        return
    start = 0
    for i, n in enumerate(plan.nodes):
        assert n.node_rank == i and n.rank_start == start and n.nproc >= 1
        start += n.nproc
        assert list(n.argv[-len(args):] if args else []) == args
        # The line parses back to the plan's environment and torchrun argv, less clusterrun's parts.
        _, env_words, argv = split_env(command_of(node_line(plan, n, mask=False)))
        assert argv == list(manual_argv(n, "29500")) and argv[-len(args) or len(argv):] == args
        assert env_words == ([f"{k}={v}" for k, v in n.env.items() if k != JOB_MARKER_VAR]
                             + [f'{v}=${{{v}:-$IF}}' for v in n.pick_ifname])
    assert plan.world_size == start


def test_the_plan_of_an_attempt_is_made_from_what_the_nodes_told():
    """build_plan: node 0's address (where ssh reached it), the port it picked for
    `master_port: auto` and the GPU counts of `gpu` nodes go into the plan; a plan
    that would run without its auto port is refused, a provisional one shows 0."""
    from clusterrun.plan import Facts, build_plan

    hosts = parse_hosts({"master_port": "auto", "hosts": ["gpu-a", {"host": "gpu-b", "nproc_per_node": "gpu"}]},
                        "hosts.yaml")
    opts = LaunchOptions("train.py")
    plan = build_plan(hosts, opts, Facts("10.9.0.1", 41234, {1: 4}), run_id=RUN_ID, local_home="/tmp/crh")
    assert (plan.master_addr, plan.master_port, plan.world_size) == ("10.9.0.1", 41234, 5)
    assert plan.complete and "--master-port=41234" in plan.nodes[1].argv
    with pytest.raises(UsageError, match="master_port is auto"):
        build_plan(hosts, opts, Facts("10.9.0.1"), run_id=RUN_ID, local_home="/tmp/crh")
    shown = build_plan(hosts, opts, Facts("10.9.0.1"), run_id=RUN_ID, local_home="/tmp/crh", provisional=True)
    assert shown.master_port == 0 and not shown.complete
    asked = build_plan(hosts, LaunchOptions("train.py", master_port=29600), Facts("10.9.0.1", 41234, {1: 4}),
                       run_id=RUN_ID, local_home="/tmp/crh")
    assert asked.master_port == 29600       # --master-port overrides the hosts file's auto

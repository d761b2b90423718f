"""The plan: ranks, MASTER_ADDR, environment and the exact command of every node.

`--dry-run` prints this plan and the real run executes it, so what is checked
here is what the user sees and what runs.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from clusterrun.errors import UsageError
from clusterrun.hostsfile import parse_hosts
from clusterrun.options import LaunchOptions
from clusterrun.plan import (
    JOB_MARKER_VAR,
    Plan,
    make_plan,
    master_addr_for,
    render_plan,
    shell_command,
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


# --- the rendered command ----------------------------------------------------------------

NASTY_ARGS = ("--lr", "0.1", "two words", "it's", 'say "hi"', "$(touch x)", "`touch y`", "${HOME}", "$HOME",
              "a\nb", "tab\there", "日本語 ünï", "", " ", "*", "~", "~/x", "-m", "--", ";", "&&", "|", "#c",
              "\\", "'", '"', "!", "--env=A=B")


def split_env(cmd: str) -> tuple[list[str], list[str], list[str]]:
    """`[cd .. && setup && ] env K=V ... argv` -> (prefix words, K=V words, argv)."""
    words = shlex.split(cmd)
    i = words.index("env")
    j = i + 1
    while j < len(words) and "=" in words[j] and not words[j].startswith("-"):
        j += 1
    return words[:i], words[i + 1:j], words[j:]


def test_shell_command_parses_back_to_exactly_the_env_and_argv():
    env = {"SPACES": "a b", "QUOTE": "it's", "DOLLAR": "$(touch z)", "EMPTY": ""}
    (n,) = plan_for(["localhost:2"], LaunchOptions("train.py", NASTY_ARGS, env=env)).nodes
    prefix, env_words, argv = split_env(shell_command(n))
    assert prefix == []
    assert env_words == [f"{k}={v}" for k, v in n.env.items()]
    assert argv == list(n.argv)


def test_shell_command_for_a_module_and_a_remote_node_parses_back():
    (n,) = plan_for(["gpu-a"], LaunchOptions("pkg.train", NASTY_ARGS, module=True)).nodes
    _, _, argv = split_env(shell_command(n))
    # Our own --log-dir under the node's home is rendered as "$HOME"/... so the node expands it.
    log_dir = argv_value(n.argv, "--log-dir")
    assert log_dir.startswith("~/")
    expected = [a.replace(f"--log-dir={log_dir}", f"--log-dir=$HOME/{log_dir[2:]}") for a in n.argv]
    assert argv == expected


def test_workdir_tilde_expands_and_the_rest_is_quoted():
    (n,) = plan_for({"workdir": "~/my project", "setup": ["source ~/venv/bin/activate", "ulimit -n 4096"],
                     "hosts": ["gpu-a"]}).nodes
    cmd = shell_command(n)
    assert cmd.startswith("cd ~/'my project' && { source ~/venv/bin/activate && ulimit -n 4096; } </dev/null && env ")


@pytest.mark.parametrize("workdir, rendered", [
    ("/data/run 1", "cd '/data/run 1' && "),
    ("~", "cd ~ && "),
    ("~/p", "cd ~/p && "),
    ("~other/p", "cd '~other/p' && "),
    ("$(touch x)", "cd '$(touch x)' && "),
])
def test_workdir_quoting(workdir, rendered):
    (n,) = plan_for({"workdir": workdir, "hosts": ["gpu-a"]}).nodes
    assert shell_command(n).startswith(rendered)


@pytest.fixture()
def argv_recorder(tmp_path: Path) -> Path:
    """An executable that records its argv, cwd and some env vars as JSON in $RECORD_TO."""
    exe = tmp_path / "bin" / "record-argv"
    exe.parent.mkdir()
    exe.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "keys = ('CLUSTERRUN_JOB', 'PYTHONUNBUFFERED', 'SPACES', 'FROM_SETUP')\n"
        "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd(),\n"
        "           'env': {k: os.environ.get(k) for k in keys}}, open(os.environ['RECORD_TO'], 'w'))\n"
    )
    exe.chmod(0o755)
    return exe


def test_a_real_shell_runs_the_rendered_command_with_exactly_the_planned_argv(tmp_path, argv_recorder):
    """What --dry-run prints, pasted into sh, runs the plan: same argv, env and directory."""
    home = tmp_path / "home"
    (home / "my project").mkdir(parents=True)
    data = {"workdir": "~/my project", "setup": "FROM_SETUP=yes; export FROM_SETUP",
            "python": str(argv_recorder), "hosts": ["localhost:2"]}
    (n,) = plan_for(data, LaunchOptions("train.py", NASTY_ARGS, env={"SPACES": "a  b"})).nodes
    record = tmp_path / "record.json"
    subprocess.run(["sh", "-c", shell_command(n)], check=True, timeout=30,
                   env={"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                        "RECORD_TO": str(record)})
    got = json.loads(record.read_text())
    assert got["argv"] == list(n.argv[1:])
    assert got["cwd"] == str(home / "my project")
    assert got["env"] == {"CLUSTERRUN_JOB": n.marker, "PYTHONUNBUFFERED": "1", "SPACES": "a  b",
                          "FROM_SETUP": "yes"}
    assert not (home / "my project" / "x").exists() and not (home / "my project" / "y").exists()


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
    (n,) = plan_for(data, LaunchOptions("train.py", ("--x",))).nodes
    record = tmp_path / "record.json"
    subprocess.run(["sh", "-c", shell_command(n)], check=True, timeout=30,
                   env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RECORD_TO": str(record)})
    got = json.loads(record.read_text())
    assert got["env"]["FROM_SETUP"] == "yes" and got["argv"][-1] == "--x"


def test_a_failing_setup_line_stops_the_launch(tmp_path, argv_recorder):
    data = {"setup": ["false", "true"], "python": str(argv_recorder), "hosts": ["localhost"]}
    (n,) = plan_for(data, LaunchOptions("train.py")).nodes
    record = tmp_path / "record.json"
    r = subprocess.run(["sh", "-c", shell_command(n)], timeout=30,
                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RECORD_TO": str(record)})
    assert r.returncode != 0 and not record.exists()


def test_regression_a_script_arg_that_looks_like_our_log_dir_is_not_verbatim():
    (n,) = plan_for(["localhost"], LaunchOptions("train.py", ("--log-dir=~/runs",))).nodes
    _, _, argv = split_env(shell_command(n))
    assert argv == list(n.argv)


def test_render_for_remote_nodes_is_ssh_with_the_command_as_one_argument():
    plan = plan_for({"hosts": [{"host": "gpu-a", "user": "alice", "port": 2222}, "localhost"]},
                    LaunchOptions("train.py", tuple(a for a in NASTY_ARGS if "\n" not in a)),
                    master_addr="10.0.0.1")
    lines = render_plan(plan).splitlines()
    ssh_line = lines[lines.index("# node 0 (gpu-a)") + 2]
    assert shlex.split(ssh_line) == ["ssh", "-p", "2222", "-l", "alice", "gpu-a", shell_command(plan.nodes[0])]


# --- golden: the dry-run text of a fixed plan ---------------------------------------------

GOLDEN = r"""run 20260101-000000-abc123: 3 nodes, world size 6, MASTER_ADDR=10.0.0.1 MASTER_PORT=29500

node       node_rank  nproc  global ranks  ssh target
node0              0      3           0-2  gpu-a
gpu-b              1      2           3-4  gpu-b
localhost          2      1             5  (local, no ssh)

# node 0 (node0)
# GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME and TP_SOCKET_IFNAME: set on the node to the interface that reaches 10.0.0.1
ssh -p 2222 -i '~/.ssh/id_ed25519' -l alice gpu-a 'cd ~/'"'"'my project'"'"' && { source ~/venv/bin/activate; } </dev/null && env NCCL_DEBUG=WARN PYTHONUNBUFFERED=1 CLUSTERRUN_JOB=20260101-000000-abc123.0 ~/venv/bin/python -m torch.distributed.run --nnodes=3 --node-rank=0 --nproc-per-node=3 --master-addr=10.0.0.1 --master-port=29500 --rdzv-backend=static --rdzv-id=20260101-000000-abc123 --max-restarts=0 --log-dir="$HOME"/.clusterrun/jobs/20260101-000000-abc123/0/torchrun --redirects=3 --no-python sh -c '"'"'exec "$0" "$@" 2>&1'"'"' ~/venv/bin/python -u train.py --lr 0.1 --name '"'"'my run'"'"''

# node 1 (gpu-b)
# GLOO_SOCKET_IFNAME and TP_SOCKET_IFNAME: set on the node to the interface that reaches 10.0.0.1
ssh gpu-b 'env NCCL_DEBUG=WARN NCCL_SOCKET_IFNAME=ib0 PYTHONUNBUFFERED=1 CLUSTERRUN_JOB=20260101-000000-abc123.1 /usr/bin/python3 -m torch.distributed.run --nnodes=3 --node-rank=1 --nproc-per-node=2 --master-addr=10.0.0.1 --master-port=29500 --rdzv-backend=static --rdzv-id=20260101-000000-abc123 --max-restarts=0 --log-dir="$HOME"/.clusterrun/jobs/20260101-000000-abc123/1/torchrun --redirects=3 --no-python sh -c '"'"'exec "$0" "$@" 2>&1'"'"' /usr/bin/python3 -u train.py --lr 0.1 --name '"'"'my run'"'"''

# node 2 (localhost)
# GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME and TP_SOCKET_IFNAME: set on the node to the interface that reaches 10.0.0.1
env NCCL_DEBUG=WARN PYTHONUNBUFFERED=1 CLUSTERRUN_JOB=20260101-000000-abc123.2 /usr/bin/python3 -m torch.distributed.run --nnodes=3 --node-rank=2 --nproc-per-node=1 --master-addr=10.0.0.1 --master-port=29500 --rdzv-backend=static --rdzv-id=20260101-000000-abc123 --max-restarts=0 --log-dir=/tmp/crh/jobs/20260101-000000-abc123/2/torchrun --redirects=3 --no-python sh -c 'exec "$0" "$@" 2>&1' /usr/bin/python3 -u train.py --lr 0.1 --name 'my run'"""


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


def test_secret_looking_env_values_are_masked_in_the_dry_run_only():
    data = {"env": {"WANDB_API_KEY": "s3cr3tvalue", "HF_TOKEN": "hf_x", "DB_PASSWORD": "pw", "LR": "0.1"},
            "hosts": ["gpu-a"]}
    plan = plan_for(data)
    text = render_plan(plan)
    for secret in ("s3cr3tvalue", "hf_x", "=pw"):
        assert secret not in text
    assert text.count("****") == 3 and "LR=0.1" in text
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
        # (Our own --log-dir=~/... renders as "$HOME"/... so that the node's shell expands it.)
        words = [w.replace("--log-dir=$HOME/", "--log-dir=~/", 1)
                 for w in shlex.split(shell_command(n, mask=False))]
        cut = words.index(n.python)
        assert words[cut:] == list(n.argv)
        assert dict(w.split("=", 1) for w in words[1:cut]) == dict(n.env)
    assert plan.world_size == start

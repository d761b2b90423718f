"""What OpenSSH means by a target: `ssh -G`, and the fallback parser without ssh.

`ssh` reads ~/.ssh/config from the passwd home, not $HOME, so as in
tests/conftest.py an `ssh` wrapper first on PATH adds `-F HOME/.ssh/config`.
`ssh -G` connects to nothing: these tests need no network and no sshd.
"""

from __future__ import annotations

import os
import pwd
import shutil
import textwrap
import time
from pathlib import Path

import pytest

from clusterrun.transports import sshconfig
from clusterrun.errors import EXIT_UNREACHABLE, UnreachableError
from clusterrun.transports.sshconfig import Hop, SSHTarget, parse_jump, resolve, resolve_many

REAL_SSH = shutil.which("ssh", path="/usr/bin:/bin:/usr/local/bin")
LOCAL_USER = pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home"
    (h / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return h


def config(home: Path, text: str, name: str = "config") -> Path:
    path = home / ".ssh" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).replace("HOME", str(home)))
    return path


@pytest.fixture()
def openssh(home, tmp_path, monkeypatch) -> Path:
    """`ssh` on PATH is OpenSSH reading HOME/.ssh/config; returns the log of its runs."""
    if REAL_SSH is None:
        pytest.skip("needs the OpenSSH client (ssh)")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "ssh-runs"
    wrapper = bindir / "ssh"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec {REAL_SSH} -F "{home}/.ssh/config" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    (home / ".ssh" / "config").touch()
    return log


@pytest.fixture()
def no_ssh(home, tmp_path, monkeypatch) -> Path:
    """No `ssh` anywhere on PATH: the fallback parser. Returns where the system file goes."""
    empty = tmp_path / "nobin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    system = tmp_path / "etc" / "ssh" / "ssh_config"
    system.parent.mkdir(parents=True)
    monkeypatch.setattr(sshconfig, "SYSTEM_CONFIG", str(system))
    return system


@pytest.fixture(params=["ssh -G", "parser"])
def either(request) -> str:
    """Run a test once against OpenSSH and once against the fallback: they must agree."""
    if request.param == "ssh -G":
        request.getfixturevalue("openssh")
    else:
        request.getfixturevalue("no_ssh")
    return request.param


# --- ProxyJump syntax -------------------------------------------------------------

@pytest.mark.parametrize("spec, hops", [
    ("bastion", (Hop("bastion"),)),
    ("u@b:2222", (Hop("b", "u", 2222),)),
    ("ssh://u@c:22", (Hop("c", "u", 22),)),
    ("ssh://c/", (Hop("c"),)),
    ("a,u@b:2222,ssh://u@c:22", (Hop("a"), Hop("b", "u", 2222), Hop("c", "u", 22))),
    ("[fd00::1]:2222", (Hop("fd00::1", None, 2222),)),
    ("u@[fd00::1]", (Hop("fd00::1", "u"),)),
    ("fd00::1", (Hop("fd00::1"),)),
    ("a@b@c:7", (Hop("c", "a@b", 7),)),           # OpenSSH splits at the last @
    ("none", ()),
    ("NONE", ()),
])
def test_parse_jump_every_syntax(spec, hops):
    assert parse_jump(spec) == hops


@pytest.mark.parametrize("spec", ["", "a,,b", "a:b", "a:", "a:0", "a:65536", "@a", "[fd00::1", "[fd00::1]x"])
def test_parse_jump_says_which_entry_is_wrong(spec):
    with pytest.raises(ValueError, match="bad jump host"):
        parse_jump(spec)


# --- ssh -G ---------------------------------------------------------------------------

def test_ssh_g_resolves_what_openssh_means(openssh, home, tmp_path):
    (home / ".ssh" / "config.d").mkdir()
    config(home, """\
        Host gpu-a
          HostName 10.9.0.5
          Port 2200
          User alice
          IdentityFile ~/.ssh/one
          IdentityFile ~/.ssh/%h-%r
          CertificateFile ~/.ssh/certs/alice-signed.pub
          IdentitiesOnly yes
          IdentityAgent ~/agent.sock
          HostKeyAlias gpu-a-key
          ConnectTimeout 7
          AddressFamily inet
          UserKnownHostsFile HOME/kh1 HOME/kh2
          GlobalKnownHostsFile HOME/global_kh
          StrictHostKeyChecking accept-new
        """)
    t = resolve("gpu-a")
    assert t == SSHTarget(
        target="gpu-a", hostname="10.9.0.5", port=2200, user="alice",
        identity_files=(f"{home}/.ssh/one", f"{home}/.ssh/10.9.0.5-alice"),
        certificate_files=(f"{home}/.ssh/certs/alice-signed.pub",),
        identities_only=True, identity_agent=f"{pwd.getpwuid(os.getuid()).pw_dir}/agent.sock",
        user_known_hosts=(f"{home}/kh1", f"{home}/kh2"), global_known_hosts=(f"{home}/global_kh",),
        strict_host_key_checking="accept-new", host_key_alias="gpu-a-key", connect_timeout=7.0,
        proxy_command=None, proxy_jump=(), address_family="inet", source="ssh -G",
    )


def test_ssh_g_defaults(openssh, home):
    t = resolve("plain")
    assert (t.hostname, t.port, t.user) == ("plain", 22, LOCAL_USER)
    assert t.identity_files == tuple(os.path.expanduser(p) for p in sshconfig.DEFAULT_IDENTITY_FILES)
    assert t.identity_files[0] == f"{home}/.ssh/id_rsa"       # ~ is $HOME
    assert (t.certificate_files, t.identities_only, t.identity_agent) == ((), False, None)
    assert t.global_known_hosts == ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
    assert (t.strict_host_key_checking, t.connect_timeout, t.host_key_alias) == ("yes", None, None)
    assert (t.proxy_command, t.proxy_jump, t.address_family) == (None, (), "any")


def test_ssh_g_follows_include_globs_and_match_host(openssh, home):
    config(home, """\
        Include HOME/.ssh/config.d/*.conf
        Match host 10.9.*
          User matched
        Host *
          Port 2022
        """)
    config(home, "Host gpu-*\n  HostName 10.9.0.1\n", "config.d/10-gpus.conf")
    config(home, "Host cpu-*\n  HostName 10.8.0.1\n  Port 2323\n", "config.d/20-cpus.conf")
    config(home, "Host gpu-*\n  HostName 1.1.1.1\n", "config.d/ignored.txt")
    gpu, cpu = resolve("gpu-7"), resolve("cpu-1")
    assert (gpu.hostname, gpu.user, gpu.port) == ("10.9.0.1", "matched", 2022)
    assert (cpu.hostname, cpu.user, cpu.port) == ("10.8.0.1", LOCAL_USER, 2323)


@pytest.mark.parametrize("value, expected", [
    ("yes", "yes"), ("ask", "yes"), ("true", "yes"),
    ("no", "no"), ("off", "no"), ("false", "no"),
    ("accept-new", "accept-new"),
])
def test_strict_host_key_checking_means_yes_no_or_accept_new(either, home, value, expected):
    config(home, f"Host x\n  StrictHostKeyChecking {value}\n")
    assert resolve("x").strict_host_key_checking == expected


@pytest.mark.parametrize("line, expected", [
    ("", None),
    ("IdentityAgent none", ""),
    ("IdentityAgent SSH_AUTH_SOCK", None),
    ("IdentityAgent /run/agent.sock", "/run/agent.sock"),
    ("IdentityAgent ${AGENT_DIR}/s-%h", "/run/user/7/s-x"),
    ("IdentityAgent $MY_AGENT", "/tmp/my-agent"),
    ("IdentityAgent $UNSET_AGENT", ""),
])
def test_identity_agent(either, home, monkeypatch, line, expected):
    monkeypatch.setenv("AGENT_DIR", "/run/user/7")
    monkeypatch.setenv("MY_AGENT", "/tmp/my-agent")
    monkeypatch.delenv("UNSET_AGENT", raising=False)
    config(home, f"Host x\n  {line}\n")
    assert resolve("x").identity_agent == expected


def test_send_env_and_set_env_as_openssh_reads_them(either, home):
    """SendEnv adds patterns line after line (`-PATTERN` takes back those before); the
    first SetEnv line that applies is the one, a name given twice keeps its first value."""
    config(home, """\
        Host x
          SendEnv LANG LC_*
          SetEnv A=1 "B=two words" A=3
        Host *
          SendEnv XYZ -LC_*
          SetEnv C=ignored
        """)
    x = resolve("x")
    assert x.send_env == ("LANG", "XYZ")
    assert x.set_env == (("A", "1"), ("B", "two words"))
    env = {"LANG": "C.UTF-8", "LC_ALL": "C", "XYZ": "x", "HOME": "/h"}
    assert x.session_env(env) == [("LANG", "C.UTF-8"), ("XYZ", "x"), ("A", "1"), ("B", "two words")]
    assert resolve("y").session_env(env) == [("XYZ", "x"), ("C", "ignored")]


@pytest.mark.parametrize("line, expected", [
    ("", None), ("ConnectTimeout 7", 7.0), ("ConnectTimeout 1m30", 90.0), ("ConnectTimeout 0", None),
])
def test_connect_timeout(either, home, line, expected):
    config(home, f"Host x\n  {line}\n")
    assert resolve("x").connect_timeout == expected


def test_proxy_command_tokens_are_expanded(either, home):
    config(home, """\
        Host db
          HostName 10.0.0.9
          User carol
          Port 2201
          ProxyCommand ssh -W %h:%p %r@bastion --name %n 100%% done
        """)
    t = resolve("db")
    assert t.proxy_command == "ssh -W 10.0.0.9:2201 carol@bastion --name db 100% done"
    assert t.proxy_jump == ()


def test_proxy_command_with_a_token_openssh_does_not_know_names_the_node(either, home):
    config(home, "Host x\n  ProxyCommand nc %h %z\n")
    with pytest.raises(UnreachableError, match=r"^node3: ProxyCommand nc %h %z: unknown token %z"):
        resolve("x", node="node3")


@pytest.mark.parametrize("lines, jump, command", [
    (["ProxyJump a"], (Hop("a"),), None),
    (["ProxyJump u@b:2222"], (Hop("b", "u", 2222),), None),
    (["ProxyJump ssh://u@c:22"], (Hop("c", "u", 22),), None),
    (["ProxyJump a,u@b:2222,ssh://u@c"], (Hop("a"), Hop("b", "u", 2222), Hop("c", "u")), None),
    (["ProxyJump [fd00::1]:2222"], (Hop("fd00::1", None, 2222),), None),
    (["ProxyJump none"], (), None),
    # the first of the two wins, as in OpenSSH, `ProxyCommand none` too;
    # OpenSSH 9.2 applies a ProxyCommand after `ProxyJump none`
    (["ProxyCommand nc %h %p", "ProxyJump a"], (), "nc x 22"),
    (["ProxyJump a", "ProxyCommand nc %h %p"], (Hop("a"),), None),
    (["ProxyCommand none", "ProxyJump a"], (), None),
    (["ProxyJump none", "ProxyJump a"], (), None),
    (["ProxyJump none", "ProxyCommand nc %h %p"], (), "nc x 22"),
])
def test_proxy_jump_in_every_syntax(either, home, lines, jump, command):
    config(home, "Host x\n" + "".join(f"  {line}\n" for line in lines))
    t = resolve("x")
    assert (t.proxy_jump, t.proxy_command) == (jump, command)


def test_identity_and_certificate_files_keep_their_order_and_expand(either, home, monkeypatch):
    monkeypatch.setenv("KEYS", "/keys")
    config(home, """\
        Host x
          HostName x.example
          User dave
          IdentityFile ~/.ssh/first
          IdentityFile ${KEYS}/%r@%h
          CertificateFile ~/.ssh/first-cert.pub
        Host *
          IdentityFile /keys/last
          IdentityFile ~/.ssh/first
          CertificateFile /keys/second-cert.pub
        """)
    t = resolve("x")
    assert t.identity_files == (f"{home}/.ssh/first", "/keys/dave@x.example", "/keys/last")
    assert t.certificate_files == (f"{home}/.ssh/first-cert.pub", "/keys/second-cert.pub")


def test_the_hosts_file_overrides_win(either, home, tmp_path):
    key = tmp_path / "hostsfile_key"
    key.write_text("")
    config(home, "Host x\n  User cfg\n  Port 2200\n  IdentityFile /keys/cfg\n")
    t = resolve("x", user="hf", port=2222, identity_file=str(key))
    assert (t.user, t.port) == ("hf", 2222)
    assert t.identity_files == (str(key), "/keys/cfg")
    # user@target beats the config; the hosts file's user beats both
    assert resolve("bob@x").user == "bob"
    assert resolve("bob@x", user="hf").user == "hf"
    assert resolve("bob@x").target == "bob@x"


def test_an_identity_file_that_is_missing_is_kept_first_for_callers_to_report(either, home):
    t = resolve("x", identity_file="~/nope")
    assert t.identity_files[0] == f"{home}/nope"


def test_a_config_ssh_rejects_is_unreachable_with_openssh_s_own_words(openssh, home):
    path = config(home, "Host x\n  HostName h\n  Frobnicate yes\n")
    with pytest.raises(UnreachableError) as e:
        resolve("x", node="node5")
    message = str(e.value)
    assert message.startswith("node5: ssh -G rejects your ssh configuration: ")
    assert f"{path}: line 3: Bad configuration option: frobnicate; " in message
    assert "\n" not in message
    assert e.value.exit_code == EXIT_UNREACHABLE


# --- resolve_many ------------------------------------------------------------------------

def test_resolve_many_runs_each_distinct_request_once(openssh, home):
    config(home, "Host gpu-*\n  User alice\n")
    requests = [("gpu-1", None, None, None), ("gpu-2", None, None, None),
                ("gpu-1", None, None, None), ("gpu-1", None, 2222, None)]
    results = resolve_many(requests, ["n0", "n1", "n2", "n3"])
    assert [(r.hostname, r.port, r.user) for r in results] == [  # type: ignore[union-attr]
        ("gpu-1", 22, "alice"), ("gpu-2", 22, "alice"), ("gpu-1", 22, "alice"), ("gpu-1", 2222, "alice")]
    assert len(openssh.read_text().splitlines()) == 3


def test_resolve_many_returns_errors_each_naming_its_node(openssh, home):
    config(home, "Host bad\n  ProxyCommand nc %h %Q\n")
    results = resolve_many([("good", None, None, None), ("bad", None, None, None), ("bad", None, None, None)],
                           ["node0", "node1", "node2"])
    assert isinstance(results[0], SSHTarget)
    assert [str(r).split(":")[0] for r in results[1:]] == ["node1", "node2"]
    assert all(isinstance(r, UnreachableError) and "unknown token %Q" in str(r) for r in results[1:])


def test_resolve_many_runs_in_parallel(openssh, home, tmp_path):
    # every ssh -G takes 0.3 s here: 12 of them one after the other would take 3.6 s
    wrapper = tmp_path / "bin" / "ssh"
    wrapper.write_text(wrapper.read_text().replace("exec ", "sleep 0.3; exec ", 1))
    t0 = time.monotonic()
    results = resolve_many([(f"n{i}", None, None, None) for i in range(12)], [f"node{i}" for i in range(12)])
    assert time.monotonic() - t0 < 1.8
    assert [r.hostname for r in results] == [f"n{i}" for i in range(12)]  # type: ignore[union-attr]


def test_resolve_many_needs_one_name_per_request():
    with pytest.raises(ValueError):
        resolve_many([("a", None, None, None)], [])


# --- the fallback parser ---------------------------------------------------------------

def test_fallback_defaults_are_openssh_s(no_ssh, home):
    t = resolve("plain")
    assert t.source == "parser"
    assert (t.hostname, t.port, t.user) == ("plain", 22, LOCAL_USER)
    assert t.identity_files == tuple(f"{home}/.ssh/{n}" for n in (
        "id_rsa", "id_ecdsa", "id_ecdsa_sk", "id_ed25519", "id_ed25519_sk", "id_xmss", "id_dsa"))
    assert t.user_known_hosts == (f"{home}/.ssh/known_hosts", f"{home}/.ssh/known_hosts2")
    assert t.global_known_hosts == ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
    assert (t.strict_host_key_checking, t.identity_agent, t.connect_timeout) == ("yes", None, None)
    assert (t.proxy_command, t.proxy_jump, t.identities_only, t.address_family) == (None, (), False, "any")


def test_fallback_include_relative_glob_and_nested(no_ssh, home):
    config(home, """\
        # relative paths are under ~/.ssh; globs expand in lexical order
        Include config.d/*
        Host *
          User fallback
        """)
    config(home, "Host gpu-*\n  HostName 10.9.0.1\n  Include nested/deeper\n", "config.d/10-gpus")
    config(home, "Host gpu-*\n  HostName 1.1.1.1\n  Port 1\n", "config.d/20-later")
    config(home, "User nested\nPort 2200\n", "nested/deeper")
    t = resolve("gpu-3")
    assert (t.hostname, t.port, t.user) == ("10.9.0.1", 2200, "nested")
    assert (resolve("cpu").user, resolve("cpu").port) == ("fallback", 22)


def test_fallback_include_inside_a_host_block_is_conditional(no_ssh, home):
    config(home, """\
        Host a
          Include inc
          HostName a.after
        Host *
          IdentitiesOnly yes
        """)
    # the included file's own Host blocks do not leak out of the Host a block
    config(home, "User from-inc\nHost *\n  Port 2200\n", "inc")
    a, b = resolve("a"), resolve("b")
    assert (a.user, a.port, a.hostname, a.identities_only) == ("from-inc", 2200, "a.after", True)
    assert (b.user, b.port, b.hostname, b.identities_only) == (LOCAL_USER, 22, "b", True)


def test_fallback_include_absolute_and_tilde_and_missing(no_ssh, home, tmp_path):
    (tmp_path / "abs").write_text("Host x\n  Port 2001\n")
    config(home, f"Include {tmp_path}/abs ~/.ssh/tilde does-not-exist\n")
    config(home, "Host x\n  User tilde\n", "tilde")
    t = resolve("x")
    assert (t.port, t.user) == (2001, "tilde")


def test_fallback_include_loop_is_an_error_naming_the_node(no_ssh, home):
    config(home, "Include config\n")
    with pytest.raises(UnreachableError, match=r"^node2: .*too many recursive configuration includes"):
        resolve("x", node="node2")


def test_fallback_host_patterns_negation_and_first_value_wins(no_ssh, home):
    config(home, """\
        Host web? !web9
          User web
        Host *.example.com db
          User example
          Port=2222
        Host *
          User everyone
          Port 22
        """)
    assert [resolve(h).user for h in ("web1", "web9", "web10", "x.example.com", "db")] == [
        "web", "everyone", "everyone", "example", "example"]
    assert resolve("db").port == 2222


def test_fallback_match_criteria(no_ssh, home, tmp_path):
    flag = tmp_path / "flag-x"
    flag.touch()
    config(home, f"""\
        Host x y z
          HostName %h.internal
        Match host *.internal user root,{LOCAL_USER} !originalhost z
          Port 2001
        Match originalhost z
          User zed
        Match user zed
          IdentitiesOnly yes
        Match localuser {LOCAL_USER} exec "test -e {tmp_path}/flag-%n"
          ConnectTimeout 9
        Match final host x.internal
          HostKeyAlias final-x
        Match all
          AddressFamily inet6
        """)
    x, z = resolve("x"), resolve("z")
    assert (x.hostname, x.port, x.connect_timeout, x.host_key_alias) == ("x.internal", 2001, 9.0, "final-x")
    assert (z.hostname, z.port, z.user, z.identities_only, z.connect_timeout) == ("z.internal", 22, "zed", True, None)
    assert (z.host_key_alias, z.address_family) == (None, "inet6")


def test_fallback_unsupported_match_and_missing_arguments_are_errors(no_ssh, home):
    config(home, "Match tagged foo\n  User x\n")
    with pytest.raises(UnreachableError, match=r"^n1: .*config line 1: unsupported Match attribute tagged"):
        resolve("x", node="n1")
    config(home, "Host x\n  HostName\n")
    with pytest.raises(UnreachableError, match=r"^n1: .*config line 2: no argument after keyword 'hostname'"):
        resolve("x", node="n1")


def test_fallback_reads_the_system_file_after_the_user_s(no_ssh, home):
    no_ssh.write_text("Include ssh_config.d/*.conf\nHost *\n  User system\n  Port 2200\n")
    (no_ssh.parent / "ssh_config.d").mkdir()
    (no_ssh.parent / "ssh_config.d" / "a.conf").write_text("Host x\n  IdentitiesOnly yes\n")
    config(home, "Host *\n  Port 2022\n")
    t = resolve("x")
    assert (t.user, t.port, t.identities_only) == ("system", 2022, True)


def test_fallback_overrides_and_ssh_urls(no_ssh, home):
    config(home, "Host x\n  User cfg\n  Port 2200\nMatch user hf\n  ConnectTimeout 3\n")
    t = resolve("x", user="hf", port=2222, identity_file="/k")
    assert (t.user, t.port, t.identity_files[0], t.connect_timeout) == ("hf", 2222, "/k", 3.0)
    t = resolve("ssh://bob@x:2300")
    assert (t.hostname, t.user, t.port) == ("x", "bob", 2300)


def test_fallback_agrees_with_ssh_g_on_a_realistic_config(home, tmp_path, monkeypatch):
    """The same files through OpenSSH and through the parser give the same targets."""
    if REAL_SSH is None:
        pytest.skip("needs the OpenSSH client (ssh)")
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / "jumps").write_text(textwrap.dedent("""\
        Host gpu-*
          ProxyJump admin@bastion:2222,ssh://b2
          User trainer
        Host bastion
          HostName 192.0.2.1
        """))
    monkeypatch.setenv("AGENTS", str(tmp_path))
    (tmp_path / "cond").write_text("IdentityAgent none\nHost *\n  AddressFamily inet6\n")
    (tmp_path / "flag-db").touch()
    config(home, f"""\
        Include {tmp_path}/inc/*
        Host gpu-1
          Include {tmp_path}/cond
          HostName=10.1.0.1
          IdentityFile ~/.ssh/gpu
          CertificateFile ~/.ssh/gpu-cert.pub
          IdentitiesOnly yes
        Host db
          ProxyCommand ssh -W %h:%p bastion
          HostKeyAlias db-key
        Match host 10.1.*
          Port 2022
          StrictHostKeyChecking accept-new
        Match user trainer,root !originalhost gpu-1
          HostName %h.cluster
        Match exec "test -e {tmp_path}/flag-%n"
          IdentityAgent ${{AGENTS}}/.agent
        Host *
          UserKnownHostsFile {home}/kh
          ConnectTimeout 5
        """)
    targets = [("gpu-1", None, None, None), ("gpu-2", "root", 2200, None), ("db", None, None, "/k"),
               ("bastion", None, None, None), ("alice@other", None, None, None)]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text(f'#!/bin/sh\nexec {REAL_SSH} -F "{home}/.ssh/config" "$@"\n')
    (bindir / "ssh").chmod(0o755)
    with monkeypatch.context() as m:
        m.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
        via_ssh = resolve_many(targets, [t[0] for t in targets])
    empty = tmp_path / "nobin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(sshconfig, "SYSTEM_CONFIG", str(tmp_path / "no-system-config"))
    via_parser = resolve_many(targets, [t[0] for t in targets])
    for a, b in zip(via_ssh, via_parser):
        assert isinstance(a, SSHTarget) and isinstance(b, SSHTarget)
        assert (a.source, b.source) == ("ssh -G", "parser")
        assert a.__dict__ | {"source": ""} == b.__dict__ | {"source": ""}
    gpu1, gpu2, db = via_ssh[:3]
    assert gpu1.proxy_jump == (Hop("bastion", "admin", 2222), Hop("b2"))  # type: ignore[union-attr]
    assert (gpu1.port, gpu1.address_family, gpu1.identity_agent) == (2022, "inet6", "")  # type: ignore[union-attr]
    assert (gpu2.hostname, gpu2.address_family) == ("gpu-2.cluster", "any")  # type: ignore[union-attr]
    assert db.identity_agent == f"{tmp_path}/.agent"  # type: ignore[union-attr]

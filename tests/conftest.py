"""Shared pytest fixtures for clusterrun.

The ``cluster`` fixture builds a real N-node SSH test cluster on this machine
with ``scripts/testcluster`` (one network namespace + own hostname + own sshd
per node, on a private bridge 10.231.19.0/24 with IPv6 addresses too, plus the
private nodes crt-p1, crt-p2 behind the bastion crt-n1 and crt-q1 behind
crt-n1 then crt-p1) and tears it down at the end of the session. It needs
root; without root the e2e tests are skipped (or fail when ``CI=true``).

Environment:
  CLUSTERRUN_TEST_NODES          number of nodes (default 4, max 64)
  CLUSTERRUN_TESTCLUSTER_STATE   state dir (default /tmp/clusterrun-testcluster)

Note: OpenSSH ignores $HOME; it reads ~/.ssh/config from the passwd entry's
home directory (/root). So ``cluster.env()`` also puts ``<home>/bin`` first on
PATH, where an ``ssh`` wrapper runs ``/usr/bin/ssh -F <home>/.ssh/config``.
A plain ``ssh crt-n2 ...`` (or pdsh -R ssh) run with that environment then
behaves as for a user whose ~/.ssh/config is set up for the cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from slurmkit import slurm  # noqa: F401  (the Slurm test cluster fixture)

# A suite started in the background by a non-interactive shell (`bash .ci/run &`) inherits
# SIGINT ignored, and so would every clusterrun it starts: the Ctrl-C tests would then test
# nothing a user can do. Catching it here resets it to the default in every child (exec
# keeps an ignored signal ignored, a caught one not).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parent.parent
TESTCLUSTER = REPO / "scripts" / "testcluster"
DEFAULT_STATE = Path("/tmp/clusterrun-testcluster")
DEFAULT_NODES = 4
NEEDS_ROOT = "needs root to create network namespaces (scripts/testcluster)"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "e2e: end-to-end test: on the real SSH test cluster (root; fixture `cluster`, "
        "scripts/testcluster), or real torch on this machine; not in the fast tier",
    )
    config.addinivalue_line(
        "markers",
        "transports(*kinds): run this cluster test only on these transports "
        "(default: paramiko and openssh)",
    )
    config.addinivalue_line(
        "markers",
        "no_transport: a cluster test that runs no clusterrun transport (it checks the test "
        "cluster itself): it runs once, not once per transport",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test on the cluster is e2e, marked or not: `-m "not e2e"` never builds a cluster."""
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()) and item.get_closest_marker("e2e") is None:
            item.add_marker(pytest.mark.e2e)


@dataclasses.dataclass
class TestCluster:
    """A running test cluster (see scripts/testcluster).

    state:   the testcluster state dir (ssh_config, known_hosts, known_hosts_ca,
             id_ed25519, id_cert + usercert.pub, host_ca, user_ca, nodes.txt,
             nodes6.txt, private.txt, nodes/<name>/{sshd_config,sshd.pid,sshd.log});
             see scripts/testcluster
    nodes:   [(name, addr), ...] from nodes.txt, e.g. ("crt-n1", "10.231.19.11"):
             the N public nodes only (``names``/``addrs`` too)
    home:    temporary HOME for the controller, with .ssh/{config,known_hosts,
             id_ed25519,id_ed25519.pub} (.ssh mode 0700, keys 0600), plus
             .ssh/{id_cert,id_cert.pub,usercert.pub} (a key no node authorizes,
             and its user certificate), .ssh/{host_ca.pub,known_hosts_ca} (the
             host CA; known_hosts_ca is just its @cert-authority line) and
             bin/ssh (wrapper adding -F home/.ssh/config). The config has every
             Host block of STATE/ssh_config: crt-n<i>, crt-n<i>-v6, crt-n1-2222,
             crt-p1/-p2 (ProxyJump crt-n1), crt-q1 (ProxyJump crt-n1,crt-p1).
    private: [(name, addr, via), ...] from private.txt, e.g.
             ("crt-q1", "10.233.19.11", "crt-n1,crt-p1"): the nodes only their
             bastions reach (``via`` is the ProxyJump list)
    v6:      {name: IPv6 address} of the public nodes, from nodes6.txt
    """

    __test__ = False  # not a test class, despite the name

    state: Path
    nodes: list[tuple[str, str]]
    home: Path
    tmp: Path  # scratch root for per-call CLUSTERRUN_HOME dirs
    private: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    v6: dict[str, str] = dataclasses.field(default_factory=dict)
    _counter: itertools.count = dataclasses.field(
        default_factory=lambda: itertools.count(1), repr=False
    )

    # ------------------------------------------------------------ lookups
    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.nodes]

    @property
    def addrs(self) -> list[str]:
        return [addr for _, addr in self.nodes]

    @property
    def prefix(self) -> str:
        """The cluster's name prefix ("crt" unless CLUSTERRUN_TESTCLUSTER_PREFIX)."""
        return self.names[0].rsplit("-n", 1)[0]

    @property
    def private_names(self) -> list[str]:
        """The nodes behind bastions, e.g. crt-p1, crt-p2, crt-q1."""
        return [name for name, _, _ in self.private]

    @property
    def all_names(self) -> list[str]:
        """Public nodes, then the private ones: every node with an sshd."""
        return self.names + self.private_names

    def addr_of(self, name: str) -> str:
        """IPv4 address of any node, public or private."""
        for n, addr in self.nodes:
            if n == name:
                return addr
        for n, addr, _ in self.private:
            if n == name:
                return addr
        raise KeyError(f"no node {name!r} in {self.all_names}")

    def via_of(self, name: str) -> str:
        """ProxyJump list of a private node, e.g. "crt-n1,crt-p1"."""
        for n, _, via in self.private:
            if n == name:
                return via
        raise KeyError(f"no private node {name!r} in {self.private_names}")

    @property
    def ssh_config(self) -> Path:
        """home/.ssh/config (identity, known_hosts, User root per node)."""
        return self.home / ".ssh" / "config"

    @property
    def ssh_args(self) -> list[str]:
        """Arguments making a plain ssh use the cluster's config."""
        return ["-F", str(self.ssh_config)]

    # --------------------------------------------------------- environment
    def env(
        self,
        clusterrun_home: Path | str | None = None,
        *,
        ssh_wrapper: bool = True,
        **extra: object,
    ) -> dict[str, str]:
        """os.environ copy for running the controller against the cluster.

        HOME=<home>, CLUSTERRUN_HOME=<clusterrun_home or a fresh dir per call>,
        NO_COLOR=1, PATH with <home>/bin first (unless ssh_wrapper=False),
        then ``extra`` (values str()'d; a value of None removes the variable).
        """
        env = dict(os.environ)
        env["HOME"] = str(self.home)
        if clusterrun_home is None:
            clusterrun_home = self.tmp / f"clusterrun-home-{next(self._counter)}"
        clusterrun_home = Path(clusterrun_home)      # clusterrun makes it, as for a user
        env["CLUSTERRUN_HOME"] = str(clusterrun_home)
        env["NO_COLOR"] = "1"
        if ssh_wrapper:
            env["PATH"] = f"{self.home / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}"
        for key, value in extra.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        return env

    # ---------------------------------------------------------- node access
    def ssh(
        self, name: str, command: str, *, timeout: float = 30, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` (a shell string) on node ``name`` via real ssh."""
        return subprocess.run(
            ["ssh", *self.ssh_args, "-o", "BatchMode=yes", name, command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def sshd_pid(self, name: str) -> int | None:
        """pid of the node's sshd listener (from its pid file), or None."""
        try:
            return int((self.state / "nodes" / name / "sshd.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def ns_pids(self, name: str) -> list[int]:
        """``ip netns pids <name>``: every process in the node's namespace,
        including its sshd listener (see leftover_pids)."""
        self.addr_of(name)  # validates the name
        out = subprocess.run(
            ["ip", "netns", "pids", name],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        return sorted(int(p) for p in out.split())

    def leftover_pids(self, name: str) -> list[int]:
        """ns_pids(name) without the node's sshd listener."""
        sshd = self.sshd_pid(name)
        return [p for p in self.ns_pids(name) if p != sshd]

    def wait_no_leftovers(self, timeout: float = 10.0) -> dict[str, list[int]]:
        """Wait (bounded) until no node (private ones included) runs anything
        but its sshd listener.

        Returns {} on success, else {name: [pid, ...]} of what is still
        running (pids with their command lines are easy to print via
        describe_pids)."""
        deadline = time.monotonic() + timeout
        while True:
            left = {n: pids for n in self.all_names if (pids := self.leftover_pids(n))}
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.1)

    @staticmethod
    def describe_pids(pids: list[int]) -> list[str]:
        """'pid: command line' for each pid (for assertion messages)."""
        out = []
        for pid in pids:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                out.append(f"{pid}: {cmd.decode(errors='replace').strip()}")
            except OSError:
                out.append(f"{pid}: (gone)")
        return out

    def run_on(
        self, name: str, *argv: str, timeout: float = 30, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run argv directly in the node's network + UTS namespaces (no ssh),
        via nsenter into its sshd listener: sees the node's hostname and
        network, like a process started by sshd on that node."""
        pid = self.sshd_pid(name)
        if pid is None:
            raise RuntimeError(f"no sshd pid for node {name}")
        return subprocess.run(
            ["nsenter", "-t", str(pid), "-n", "-u", "--", *argv],
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=timeout, check=check,
        )

    def hostname_of(self, name: str) -> str:
        """The hostname a process on that node sees (should be ``name``)."""
        return self.run_on(name, "hostname", check=True).stdout.strip()


@pytest.fixture
def ctl(cluster, tmp_path):
    """A kit.Controller: clusterrun commands run as a user would, with one CLUSTERRUN_HOME."""
    from kit import Controller

    return Controller(cluster, tmp_path)


@pytest.fixture
def ssh_config(cluster):
    """Prepend Host blocks to the controller's ~/.ssh/config for one test."""
    path = cluster.home / ".ssh" / "config"
    original = path.read_text()
    yield lambda text: path.write_text(text + "\n" + original)
    path.write_text(original)


# Every test on the real cluster runs once per transport: what a run does must
# work the same through paramiko and through the system ssh client. A test
# pins one with `transport:` in its hosts file where only one applies.
TRANSPORTS = ("paramiko", "openssh")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cluster" in metafunc.fixturenames and not metafunc.definition.get_closest_marker("no_transport"):
        only = metafunc.definition.get_closest_marker("transports")
        kinds = only.args if only else TRANSPORTS
        metafunc.fixturenames.append("ssh_transport")
        metafunc.parametrize("ssh_transport", kinds, ids=kinds)


@pytest.fixture(autouse=True)
def _default_transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """CLUSTERRUN_TRANSPORT (the default where a hosts file names none) for this test."""
    kind = getattr(getattr(request.node, "callspec", None), "params", {}).get("ssh_transport")
    if kind is not None:
        monkeypatch.setenv("CLUSTERRUN_TRANSPORT", kind)


def _run_testcluster(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TESTCLUSTER), *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )


def _make_home(home: Path, state: Path) -> None:
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True)
    ssh_dir.chmod(0o700)
    for name in ("id_ed25519", "id_ed25519.pub", "known_hosts", "id_cert",
                 "id_cert.pub", "usercert.pub", "host_ca.pub", "known_hosts_ca"):
        shutil.copyfile(state / name, ssh_dir / name)
    # ssh refuses private keys that others can read
    (ssh_dir / "id_ed25519").chmod(0o600)
    (ssh_dir / "id_cert").chmod(0o600)
    # same Host blocks as STATE/ssh_config, but using the copies in home
    config = (state / "ssh_config").read_text()
    config = config.replace(f"{state}/id_ed25519", f"{ssh_dir}/id_ed25519")
    config = config.replace(f"{state}/known_hosts", f"{ssh_dir}/known_hosts")
    (ssh_dir / "config").write_text(config)
    (ssh_dir / "config").chmod(0o600)
    # ssh reads ~/.ssh/config from the passwd home dir, not $HOME: wrapper
    bindir = home / "bin"
    bindir.mkdir(exist_ok=True)
    ssh_path = shutil.which("ssh", path="/usr/bin:/bin:/usr/local/bin") or "/usr/bin/ssh"
    wrapper = bindir / "ssh"
    wrapper.write_text(
        "#!/bin/sh\n"
        "# OpenSSH ignores $HOME for ~/.ssh/config; use the test HOME's config.\n"
        f'exec {ssh_path} -F "{ssh_dir}/config" "$@"\n'
    )
    wrapper.chmod(0o755)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """Session-wide real SSH test cluster; yields a TestCluster."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{NEEDS_ROOT}; CI=true, so this is an error, not a skip")
        pytest.skip(NEEDS_ROOT)
    missing = [t for t in ("ip", "unshare", "ssh", "ssh-keygen", "nsenter") if shutil.which(t) is None]
    if missing or not os.path.exists("/usr/sbin/sshd"):
        reason = f"test cluster needs iproute2, util-linux and openssh; missing: {missing or ['/usr/sbin/sshd']}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)

    n = int(os.environ.get("CLUSTERRUN_TEST_NODES", str(DEFAULT_NODES)))
    state = Path(os.environ.get("CLUSTERRUN_TESTCLUSTER_STATE") or DEFAULT_STATE)
    session_done = False
    try:
        up = _run_testcluster("up", str(n), "--state", str(state), timeout=60 + 2 * n)
        if up.returncode != 0:
            pytest.fail(
                f"scripts/testcluster up {n} failed (exit {up.returncode}):\n"
                f"{up.stdout}{up.stderr}",
                pytrace=False,
            )
        nodes = []
        for line in (state / "nodes.txt").read_text().splitlines():
            if line.strip():
                name, addr = line.split()
                nodes.append((name, addr))
        private = []
        for line in (state / "private.txt").read_text().splitlines():
            if line.strip():
                name, addr, via = line.split()
                private.append((name, addr, via))
        v6 = {}
        for line in (state / "nodes6.txt").read_text().splitlines():
            if line.strip():
                name, addr = line.split()
                v6[name] = addr
        home = tmp_path_factory.mktemp("controller-home")
        _make_home(home, state)
        yield TestCluster(
            state=state,
            nodes=nodes,
            home=home,
            tmp=tmp_path_factory.mktemp("clusterrun-homes"),
            private=private,
            v6=v6,
        )
        session_done = True
    finally:
        down = _run_testcluster("down", "--state", str(state), timeout=60)
        if down.returncode != 0:
            msg = (f"scripts/testcluster down failed (exit {down.returncode}):\n"
                   f"{down.stdout}{down.stderr}")
            if session_done:
                pytest.fail(msg, pytrace=False)  # reported as a teardown error
            print(msg)  # don't mask the setup error that got us here


# --- shared by the unit tests of the controller side -----------------------------------------

UNIT_RUN_ID = "20260101-000000-abc123"


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A CLUSTERRUN_HOME of the test's own (not created: clusterrun makes it)."""
    h = tmp_path / "crh"
    monkeypatch.setenv("CLUSTERRUN_HOME", str(h))
    return h


@pytest.fixture()
def plan():
    """nodeW has ranks 0-2, nodeX ranks 3-4 (so nodeX's local rank 1 is global rank 4)."""
    from clusterrun.hostsfile import parse_hosts
    from clusterrun.options import LaunchOptions
    from clusterrun.plan import make_plan

    hosts = parse_hosts({"hosts": [{"host": "gpu-w", "name": "nodeW", "nproc_per_node": 3},
                                   {"host": "gpu-x", "name": "nodeX", "nproc_per_node": 2}]})
    return make_plan(hosts, LaunchOptions("train.py"), run_id=UNIT_RUN_ID, master_addr="10.0.0.1",
                     master_port=29500, controller_python="/usr/bin/python3", local_home="/tmp/crh")


@pytest.fixture()
def run(home):
    from clusterrun.run.runs import RunDir

    return RunDir.create(UNIT_RUN_ID)


@pytest.fixture()
def fake_sessions():
    """No thread of a failed test stays blocked on a session of tests/fakenode.py."""
    import fakenode

    fakenode.reset()
    yield
    fakenode.hang_up_all()


# --- a non-root user on the nodes (e2e) -----------------------------------------------------

@pytest.fixture
def crtuser(cluster, tmp_path):
    """A non-root user on the nodes (they share this machine's /etc/passwd), removed
    afterwards: `<prefix>user` (crtuser), so that clusters of other prefixes on this
    machine have users of their own. It may traverse (o+x, not list) the directories on the way to the
    controller's Python, torch and the test's files, as on a machine with a shared
    install; the modes are restored afterwards."""
    with node_user(f"{cluster.prefix}user", "/bin/bash", tmp_path) as user:
        yield user


@contextlib.contextmanager
def node_user(name: str, shell: str, tmp_path: Path) -> Iterator[str]:
    """A user `name` with this login shell on the nodes, as `crtuser` (every sshd of the
    test cluster takes the cluster's key for every user); removed at the end."""
    _remove_user(name)
    # "*": no password, but not locked (sshd without PAM refuses locked accounts)
    subprocess.run(["useradd", "-m", "-s", shell, "-p", "*", name], check=True)
    changed: dict[Path, int] = {}
    for leaf in (Path(os.path.realpath(sys.executable)), Path(sys.executable), tmp_path / "x"):
        for d in leaf.parents:
            mode = d.stat().st_mode
            if d not in changed and not mode & 0o001:
                changed[d] = mode
                d.chmod(mode | 0o001)
    tmp_path.chmod(0o755)
    try:
        yield name
    finally:
        for d, mode in changed.items():
            d.chmod(mode)
        _remove_user(name)


def _remove_user(name: str) -> None:
    """Kill the user's processes (bounded wait), then remove the user and its home."""
    deadline = time.monotonic() + 10
    while subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True).returncode == 0:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    subprocess.run(["userdel", "-r", name], capture_output=True)

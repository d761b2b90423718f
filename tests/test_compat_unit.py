"""Unit: every workaround in compat.py still applies, on the installed paramiko and the oldest allowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

OLDEST_PARAMIKO = "3.2.0"       # setup.cfg: paramiko>=3.2,<6

# Run in a fresh interpreter, so that nothing this test process imported already
# (invoke, paramiko) hides a regression. Prints one JSON object.
CHECKS = r"""
import importlib.util, json, socket, sys, threading
from clusterrun import compat

paramiko = compat.import_paramiko()
out = {"version": paramiko.__version__, "invoke_loaded": "invoke" in sys.modules,
       "invoke_findable": importlib.util.find_spec("invoke") is not None}

# The transport thread's wake-up: its socket's timeout, which paramiko's loop waits on.
a, b = socket.socketpair()
out["wakeup"] = compat.quiet_transport()(a).sock.gettimeout()

# An agent on our own socket: a fake agent holding no keys answers its first request.
ours, theirs = socket.socketpair()
def fake_agent():
    out["agent_request"] = theirs.recv(64).hex()
    theirs.sendall(bytes([0, 0, 0, 5, 12, 0, 0, 0, 0]))    # IDENTITIES_ANSWER, 0 keys
threading.Thread(target=fake_agent, daemon=True).start()
out["agent_keys"] = len(compat.agent_on(ours).get_keys())
print(json.dumps(out))
"""


def run_checks(env: dict[str, str]) -> dict:
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", CHECKS], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def assert_workarounds_apply(out: dict) -> None:
    assert out["invoke_loaded"] is False            # paramiko came without invoke...
    assert out["wakeup"] == 1.0                     # ...and its thread wakes once a second
    assert out["agent_request"] == "000000010b"     # REQUEST_IDENTITIES on the socket we gave
    assert out["agent_keys"] == 0


def test_every_workaround_applies_on_the_installed_paramiko():
    out = run_checks(dict(os.environ))
    assert out["invoke_findable"] is True           # installed: paramiko would have imported it
    assert_workarounds_apply(out)


def test_every_workaround_applies_on_the_oldest_paramiko_allowed(tmp_path):
    target = tmp_path / "paramiko"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          "--no-deps", "--target", str(target), f"paramiko=={OLDEST_PARAMIKO}"],
                         capture_output=True, text=True, timeout=300)
    if pip.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot install paramiko {OLDEST_PARAMIKO}: {pip.stderr[-500:]}")
        pytest.skip(f"cannot install paramiko {OLDEST_PARAMIKO} (offline?)")
    out = run_checks({**os.environ, "PYTHONPATH": str(target)})
    assert out["version"] == OLDEST_PARAMIKO
    assert_workarounds_apply(out)


def test_setup_cfg_pins_the_range_checked():
    from clusterrun import compat

    cfg = (os.path.dirname(__file__) + "/../setup.cfg")
    with open(cfg) as f:
        assert "paramiko>=3.2,<6" in f.read()
    assert compat.PARAMIKO_CHECKED[0] == OLDEST_PARAMIKO

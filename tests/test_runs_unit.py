"""Unit: the runs registry under $CLUSTERRUN_HOME."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from clusterrun.run.runs import RunDir, new_run_id


def mode(p) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_a_home_clusterrun_makes_is_private(tmp_path, monkeypatch):
    home = tmp_path / "fresh" / ".clusterrun"
    monkeypatch.setenv("CLUSTERRUN_HOME", str(home))
    run = RunDir.create(new_run_id())
    assert mode(home) == 0o700 and mode(home / "runs") == 0o700 and mode(run.path) == 0o700


def test_an_existing_shared_home_keeps_its_mode(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)                    # like /tmp: others must keep their access
    monkeypatch.setenv("CLUSTERRUN_HOME", str(shared))
    run = RunDir.create(new_run_id())
    assert mode(shared) == 0o1777
    assert mode(run.path) == 0o700          # the run itself is still private


def test_ps_status_and_logs_of_an_ended_run_never_load_paramiko(tmp_path):
    """They read the run's directory only: no SSH stack to import (0.2 s of start-up)."""
    env = {**os.environ, "CLUSTERRUN_HOME": str(tmp_path / "home")}
    code = ("import sys\n"
            "from clusterrun.hostsfile import parse_hosts\n"
            "from clusterrun.options import LaunchOptions\n"
            "from clusterrun.plan import make_plan\n"
            "from clusterrun.run.runs import RunDir\n"
            "run = RunDir.create('20260101-000000-abc123')\n"
            "plan = make_plan(parse_hosts({'hosts': ['gpu-a']}), LaunchOptions('t.py'), run_id=run.run_id,\n"
            "                 master_addr='10.0.0.1', master_port=29500, controller_python='python',\n"
            "                 local_home='/tmp/h')\n"
            "run.write_plan(plan)\n"
            "(run.path / 'state.json').write_text('{\"0\": {\"node\": \"gpu-a\", \"state\": \"exited\", \"code\": 0}}')\n"
            "(run.path / 'result.json').write_text('{}')\n")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    for args in (["ps"], ["status"], ["status", "--json"], ["logs"]):
        probe = ("import sys\nfrom clusterrun.cli import main\n"
                 "try:\n    main(%r)\nexcept SystemExit as e:\n    code = e.code\n"
                 "print('EXIT', code, 'paramiko' in sys.modules)\n" % args)
        r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
        assert r.stdout.splitlines()[-1] == "EXIT 0 False", (args, r.stdout, r.stderr)

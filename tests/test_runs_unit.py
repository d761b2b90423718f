"""Unit: the runs registry under $CLUSTERRUN_HOME."""

from __future__ import annotations

import stat

from clusterrun.runs import RunDir, new_run_id


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

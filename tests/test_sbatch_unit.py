"""Unit: the sbatch script of a submitted run (sbatch.py), and `up`'s words that its
batch step runs again (cli._batch_args); what `up` says when it cannot submit."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from clusterrun.cli import main
from clusterrun.errors import UsageError
from clusterrun.hostsfile import parse_hosts
from clusterrun.sbatch import batch_job

WORDS = ["two words", 'a "quoted" \'one\'', "$HOME", "`id`", "#hash", "back\\slash", "", "-x"]


def spec(**slurm):
    return parse_hosts({"slurm": slurm, "nproc_per_node": 2}, "job.yaml").slurm


def job(sbatch_args=(), nproc=2, env=None, up_args=("job.yaml", "train.py"), **slurm):
    return batch_job(spec(**({"nodes": 2} | slurm)), "job.yaml", tuple(sbatch_args), run_id="R1", nproc=nproc,
                     up_args=tuple(up_args), python="/venv/bin/python", workdir="/shared/p",
                     output="/home/u/.clusterrun/runs/R1/batch.log",
                     env=env if env is not None else {"PATH": "/usr/bin", "CLUSTERRUN_HOME": "/home/u/.clusterrun"})


def sbatch_words(line: str) -> list[str]:
    """An #SBATCH line read back as sbatch reads it (Slurm's _get_argument): quotes group,
    a backslash takes the next character, an unquoted # ends the line."""
    words, i, text = [], 0, line[len("#SBATCH"):]
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return words
        word, quote, escape = "", "", False
        while i < len(text) and (quote or not text[i].isspace()):
            c = text[i]
            i += 1
            if escape:
                word, escape = word + c, False
            elif c == "\\":
                escape = True
            elif quote:
                if c == quote:
                    quote = ""
                else:
                    word += c
            elif c in "\"'":
                quote = c
            elif c == "#":
                return words + [word] if word else words
            else:
                word += c
        words.append(word)


def options(script: str) -> list[list[str]]:
    return [sbatch_words(l) for l in script.splitlines() if l.startswith("#SBATCH")]


def exec_argv(script: str) -> list[str]:
    line = next(l for l in script.splitlines() if l.startswith("exec "))
    return shlex.split(line)[1:]


def test_the_script_asks_one_task_per_node_with_the_ranks_cpus_and_runs_the_controller():
    script = job(partition="gpu", time="02:00:00", gpus_per_node=8, account="proj").script()
    assert script.startswith("#!/bin/sh\n")
    assert options(script) == [
        ["--job-name=clusterrun"], ["--nodes=2"], ["--ntasks-per-node=1"], ["--cpus-per-task=2"],
        ["--gpus-per-node=8"], ["--partition=gpu"], ["--time=02:00:00"], ["--account=proj"], ["--no-kill"],
        ["--no-requeue"],
        ["--export=NONE"], ["--chdir=/shared/p"], ["--output=/home/u/.clusterrun/runs/R1/batch.log"]]
    assert exec_argv(script) == ["/venv/bin/python", "-m", "clusterrun", "up", "--run-id=R1", "job.yaml",
                                 "train.py"]


def test_every_word_reaches_the_script_unchanged():
    script = job(sbatch_args=[f"--comment={w}" for w in WORDS],
                 up_args=["--env", "A=$B c", "job.yaml", "train.py", *WORDS]).script()
    assert exec_argv(script)[5:] == ["--env", "A=$B c", "job.yaml", "train.py", *WORDS]
    assert options(script)[-len(WORDS):] == [[f"--comment={w}"] for w in WORDS]


def test_the_hosts_files_sbatch_args_then_the_options_each_option_with_its_values():
    script = batch_job(spec(nodes=2, sbatch_args=["--account", "proj"]), "job.yaml", ("--qos", "high", "--exclusive"),
                       run_id="R1", nproc=2, up_args=(), python="p", workdir="/w", output="/o", env={}).script()
    assert options(script)[-3:] == [["--account", "proj"], ["--qos", "high"], ["--exclusive"]]
    assert ["--cpus-per-task=2"] not in options(script)     # the user's --exclusive decides the CPUs


@pytest.mark.parametrize("nproc,gpus,expected", [(4, None, ["--cpus-per-task=4"]),
                                                 ("gpu", 8, ["--cpus-per-task=8"]),
                                                 ("gpu", None, ["--exclusive"])])
def test_the_cpus_asked_follow_nproc_per_node(nproc, gpus, expected):
    assert expected in options(job(nproc=nproc, gpus_per_node=gpus).script())


@pytest.mark.parametrize("cpu_option", ["-c4", "--cpus-per-task=4", "--exclusive", "--ntasks-per-node=2"])
def test_a_cpu_option_of_the_user_replaces_clusterruns(cpu_option):
    opts = options(job(sbatch_args=[cpu_option]).script())
    assert ["--cpus-per-task=2"] not in opts and opts[-1] == [cpu_option]


def test_only_the_controllers_own_variables_are_passed():
    script = job(env={"PATH": "/opt/slurm/bin:/usr/bin", "CLUSTERRUN_HOME": "/h", "AWS_SECRET_ACCESS_KEY": "s",
                      "CUDA_VISIBLE_DEVICES": "0"}).script()
    assert [l for l in script.splitlines() if l.startswith("export ")] == [
        "export CLUSTERRUN_HOME=/h", "export PATH=/opt/slurm/bin:/usr/bin"]
    assert "AWS" not in script and "CUDA" not in script


def test_no_node_count_is_a_usage_error_unless_sbatch_args_give_one():
    with pytest.raises(UsageError, match="nothing says how many nodes to submit for"):
        batch_job(spec(), "HOSTS slurm", (), run_id="R", nproc=1, up_args=(), python="p", workdir="/w",
                  output="/o", env={})
    for given in ("--nodes=3", "-N3", "-N"):
        script = batch_job(spec(), "HOSTS slurm", (given,), run_id="R", nproc=1, up_args=(), python="p",
                           workdir="/w", output="/o", env={}).script()
        assert [given] in options(script)


def test_a_line_break_in_an_sbatch_option_is_refused():
    with pytest.raises(UsageError, match="line break"):
        job(sbatch_args=["--comment=a\n#SBATCH --exclusive"])


def up_words(*args: str) -> list[str]:
    """The words the batch step gets, read from `up --dry-run`'s script."""
    r = CliRunner().invoke(main, ["up", "--dry-run", *args])
    assert r.exit_code == 0, r.output
    return exec_argv(r.output)[5:]


@pytest.fixture
def outside(tmp_path: Path, monkeypatch) -> Path:
    for var in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLUSTERRUN_HOME", str(tmp_path / "home"))
    (tmp_path / "job.yaml").write_text("slurm: {nodes: 2}\n")
    return tmp_path


def test_the_batch_step_gets_ups_words_less_the_submitting_ones(outside):
    assert up_words("-d", "--sbatch-arg", "--qos=x", "--sbatch-arg=-c2", "--env", "A=1", "-m", "--no-color",
                    "--nproc-per-node=2", "job.yaml", "pkg.train", "-d", "--sbatch-arg=y") == [
        "--env", "A=1", "-m", "--nproc-per-node=2", "job.yaml", "pkg.train", "-d", "--sbatch-arg=y"]
    assert up_words("-md", "job.yaml", "pkg.train") == ["-m", "job.yaml", "pkg.train"]
    assert up_words("-d", "job.yaml", "train.py") == ["job.yaml", "train.py"]


def test_dry_run_outside_an_allocation_prints_the_script_and_submits_nothing(outside):
    r = CliRunner().invoke(main, ["up", "--dry-run", "--sbatch-arg=--partition=gpu", "job.yaml", "t.py"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("#!/bin/sh\n") and "#SBATCH --partition=gpu\n" in r.output
    script, by_hand = r.output.split("# ---- the script ends here.")
    assert script.rstrip().splitlines()[-1].startswith("exec ")
    assert "srun --jobid=JOB --overlap --pty bash" in by_hand and "per node" in by_hand
    assert not (outside / "home").exists()


def test_no_sbatch_on_path_is_exit_2(outside, monkeypatch):
    monkeypatch.setenv("PATH", str(outside))
    r = CliRunner().invoke(main, ["up", "job.yaml", "t.py"])
    assert r.exit_code == 2
    assert "the Slurm client `sbatch` is not on PATH" in r.output
    assert not (outside / "home" / "runs").exists() or not any((outside / "home" / "runs").iterdir())


def test_while_pending_the_progress_line_says_why_and_how_long_then_the_run_ends(outside, monkeypatch):
    """follow() before the run starts, with a fake squeue saying PENDING (Resources): the
    progress line (a terminal's) shows it; the batch step's words are relayed; the
    controller's exit code is up's."""
    import io
    import threading
    import time

    from clusterrun.run.records import BatchEnd, Submission
    from clusterrun.run.runs import RunDir
    from clusterrun.run.stream import Terminal
    from clusterrun.run.submit import follow

    bin_dir = outside / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\necho '41|PENDING|Resources'\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    run = RunDir.create("20261207-000000-abcdef")
    run.record_submission(Submission("41", time.time(), "job.yaml", ["t.py"]))
    err = io.StringIO()
    term = Terminal(out=io.BytesIO(), err=err)
    term._show_progress = True          # as on a terminal
    codes: list[int] = []
    t = threading.Thread(target=lambda: codes.append(follow(run, "41", term)), daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while "pending (Resources) " not in err.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "pending (Resources) 0s: Slurm job 41" in err.getvalue()
    run.batch_log.write_text("clusterrun: preflight failed, nothing was started:\n")
    run.record_batch_end(BatchEnd(2, "preflight failed"))
    t.join(20)
    assert codes == [2]
    assert "clusterrun: preflight failed, nothing was started:\n" in err.getvalue()

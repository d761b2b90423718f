"""`clusterrun lint`: correct scripts stay silent; each mistake is found on its line.

Bad examples mark every line that must be reported with a trailing ``# expect: CRnnn``
comment; the test compares the (line, code) pairs found with the marked ones, so a
finding on an unmarked line fails as loudly as a missed one.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from clusterrun.errors import EXIT_USAGE, UsageError
from clusterrun.commands.lint import lint_command
from clusterrun.scriptlint import Finding, format_finding, lint_paths, lint_source

REPO = Path(__file__).resolve().parent.parent

HEADER = """\
import os
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
"""


def expected(source: str) -> set[tuple[int, str]]:
    return {(i, code)
            for i, line in enumerate(source.splitlines(), 1)
            for code in re.findall(r"expect: (CR\d{3})", line)}


def found(source: str) -> set[tuple[int, str]]:
    return {(f.line, f.code) for f in lint_source(source, "train.py")}


def check(body: str, header: str = HEADER) -> list[Finding]:
    """Lint header + body; the findings must be exactly the marked lines."""
    source = header + textwrap.dedent(body)
    assert found(source) == expected(source), "\n".join(
        format_finding(f) for f in lint_source(source, "train.py"))
    return lint_source(source, "train.py")


# -- correct scripts: no findings ---------------------------------------------------

GOOD_MULTINODE_TUTORIAL = '''
"""Shaped like the PyTorch multinode tutorial (multinode.py)."""
import os
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DataLoader
from torch.utils.data.distributed import DistributedSampler
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.distributed import init_process_group, destroy_process_group


def ddp_setup():
    init_process_group(backend="nccl")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


class Trainer:
    def __init__(self, model, train_data, optimizer, save_every, snapshot_path):
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.global_rank = int(os.environ["RANK"])
        self.model = model.to(self.local_rank)
        self.train_data = train_data
        self.optimizer = optimizer
        self.model = DDP(self.model, device_ids=[self.local_rank])

    def _run_epoch(self, epoch):
        self.train_data.sampler.set_epoch(epoch)
        for source, targets in self.train_data:
            source = source.to(self.local_rank)
            targets = targets.to(self.local_rank)
            self.optimizer.zero_grad()
            loss = F.cross_entropy(self.model(source), targets)
            loss.backward()
            self.optimizer.step()

    def train(self, max_epochs):
        for epoch in range(max_epochs):
            self._run_epoch(epoch)
            if self.global_rank == 0:
                torch.save(self.model.module.state_dict(), "snapshot.pt")


def prepare_dataloader(dataset, batch_size):
    return DataLoader(dataset, batch_size=batch_size, pin_memory=True, shuffle=False,
                      sampler=DistributedSampler(dataset))


def main(total_epochs, batch_size):
    ddp_setup()
    dataset = load_train_objs()
    trainer = Trainer(build_model(), prepare_dataloader(dataset, batch_size), None, 1, "s.pt")
    trainer.train(total_epochs)
    destroy_process_group()
'''

GOOD_MODULO_DEVICE_COUNT = '''
"""The elastic DDP tutorial: device from the global rank modulo the GPUs."""
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP


def demo_basic():
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    print(f"Start running basic DDP example on rank {rank}.")
    device_id = rank % torch.cuda.device_count()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    model = nn.Linear(10, 5).to(device_id)
    ddp_model = DDP(model, device_ids=[device_id])
    x = torch.randn(20, 10, device=f"cuda:{device_id}")
    for _ in range(3):
        ddp_model(x).sum().backward()
    if rank == 0:
        print("done")
    dist.destroy_process_group()


if __name__ == "__main__":
    demo_basic()
'''

GOOD_FALLBACK_AND_EVAL = '''
"""Runs under torchrun, or alone for debugging; a validation sampler without shuffle."""
import os
from os import environ

import torch
from torch import distributed as d
from torch.utils import data


def setup():
    if "RANK" in os.environ:
        d.init_process_group("nccl")
    else:
        d.init_process_group("gloo", init_method="tcp://127.0.0.1:29500", rank=0, world_size=1)
    local_rank = int(environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    return local_rank


def main():
    local_rank = setup()
    rank, world = d.get_rank(), d.get_world_size()
    device = torch.device("cuda", local_rank)
    state = torch.load("ckpt.pt", map_location=f"cuda:{local_rank}")
    train_sampler = data.DistributedSampler(train_ds, num_replicas=world, rank=rank, seed=1)
    val_sampler = data.DistributedSampler(val_ds, shuffle=False)
    loader = data.DataLoader(train_ds, sampler=train_sampler)
    for epoch in range(10):
        train_sampler.set_epoch(epoch)
        for batch in loader:
            batch = batch.to(device, non_blocking=True)
        objs = [None] * world
        d.all_gather_object(objs, {"epoch": epoch, "rank": rank})
        if rank == 0:
            print(objs)
'''

GOOD_UNKNOWN_ORIGINS = '''
"""Variables named rank whose origin the file does not show: never flagged."""
import argparse
import os
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler


def worker(rank, world_size):
    # mp.spawn style: `rank` is a parameter, here equal to the local rank.
    dist.init_process_group("nccl", rank=rank, world_size=world_size)
    torch.cuda.set_device(rank)
    model = DDP(torch.nn.Linear(2, 2).to(rank), device_ids=[rank])


def other(args):
    global_rank = args.rank
    torch.cuda.set_device(global_rank)
    sampler = DistributedSampler(ds, rank=args.local_rank, num_replicas=args.world)


def reassigned():
    rank = dist.get_rank()
    rank = rank % torch.cuda.device_count()     # two assignments: not only the global rank
    torch.cuda.set_device(rank)
    local_rank = int(os.environ["LOCAL_RANK"])
    for local_rank in range(4):                 # rebound by a loop: unknown
        pass
    sampler = DistributedSampler(ds, rank=local_rank)
    for epoch in range(3):
        sampler.set_epoch(epoch)


def shadowed():
    dist = object()                             # not torch.distributed here
    torch.cuda.set_device(dist.get_rank())


if __name__ == "__main__":
    mp.spawn(worker, args=(2,), nprocs=2)
'''

GOOD_LAUNCH_ARGPARSE = '''
"""Old torch.distributed.launch style, made safe for torchrun: --local_rank defaults to LOCAL_RANK."""
import argparse
import os
import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
args = parser.parse_args()
torch.cuda.set_device(args.local_rank)
dist.init_process_group(backend="nccl", init_method="env://")
model = torch.nn.parallel.DistributedDataParallel(
    torch.nn.Linear(2, 2).cuda(args.local_rank), device_ids=[args.local_rank],
    output_device=args.local_rank)
'''


@pytest.mark.parametrize("source", [
    GOOD_MULTINODE_TUTORIAL, GOOD_MODULO_DEVICE_COUNT, GOOD_FALLBACK_AND_EVAL,
    GOOD_UNKNOWN_ORIGINS, GOOD_LAUNCH_ARGPARSE,
], ids=["multinode-tutorial", "modulo-device-count", "fallback-and-eval", "unknown-origins",
        "launch-argparse"])
def test_correct_scripts_have_no_findings(source):
    assert lint_source(source, "train.py") == []


def test_the_repos_example_script_is_clean():
    assert lint_paths([str(REPO / "scripts" / "ddp_example.py")]) == []


def test_this_package_is_clean():
    # No false positives on a real code base that mentions ranks all over.
    files = sorted(str(p) for p in (REPO / "clusterrun").glob("*.py"))
    assert lint_paths(files) == []


# -- CR001: the global rank as a device index ----------------------------------------

def test_cr001_direct_calls():
    check("""
        dist.init_process_group("nccl")
        torch.cuda.set_device(dist.get_rank())  # expect: CR001
        torch.cuda.set_device(torch.distributed.get_rank())  # expect: CR001
        torch.cuda.set_device(int(os.environ["RANK"]))  # expect: CR001
        torch.cuda.set_device(int(os.environ.get("RANK", "0")))  # expect: CR001
        torch.cuda.set_device(int(os.getenv("RANK")))  # expect: CR001
        torch.cuda.set_device(device=dist.get_rank())  # expect: CR001
        with torch.cuda.device(dist.get_rank()):  # expect: CR001
            pass
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    """)


def test_cr001_every_device_spelling():
    check("""
        rank = dist.get_rank()
        a = torch.device("cuda", rank)  # expect: CR001
        b = torch.device(type="cuda", index=rank)  # expect: CR001
        c = torch.device(f"cuda:{rank}")  # expect: CR001
        d = torch.device("cuda:%d" % rank)  # expect: CR001
        e = torch.device("cuda:" + str(rank))  # expect: CR001
        f = torch.device("cuda:{}".format(rank))  # expect: CR001
        g = torch.device(rank)  # expect: CR001
        model = model.cuda(rank)  # expect: CR001
        model = model.to(rank)  # expect: CR001
        model = model.to(device=rank)  # expect: CR001
        x = x.to(f"cuda:{rank}", non_blocking=True)  # expect: CR001
        y = torch.zeros(3, device=rank)  # expect: CR001
        dist.barrier(device_ids=[rank])  # expect: CR001
        ok = torch.device("cpu")
        ok = torch.device("cuda", rank % torch.cuda.device_count())
    """)


def test_cr001_ddp_and_fsdp_one_finding_per_call():
    findings = check("""
        rank = int(os.environ["RANK"])
        model = DDP(model, device_ids=[rank], output_device=rank)  # expect: CR001
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])  # expect: CR001
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        model = FSDP(model, device_id=rank)  # expect: CR001
        model = FSDP(model, device_id=torch.cuda.current_device())
    """)
    assert findings[0].fix == ("use the local rank: "
                               "DDP(model, device_ids=[int(os.environ['LOCAL_RANK'])], "
                               "output_device=int(os.environ['LOCAL_RANK']))")


def test_cr001_a_device_string_kept_in_a_variable():
    check("""
        rank = dist.get_rank()
        device = f"cuda:{rank}"  # expect: CR001
        model.to(device)
        state = torch.load("ckpt.pt", map_location=f"cuda:{rank}")  # expect: CR001
        print(f"rank {rank} on cuda:{rank}")
        print(f"cuda:{rank}")
        logger.info("cuda:%d" % rank)
    """)


@pytest.mark.parametrize("imports, call", [
    ("import torch.distributed as dist", "dist.get_rank()"),
    ("import torch.distributed as td", "td.get_rank()"),
    ("from torch import distributed as d", "d.get_rank()"),
    ("import torch.distributed", "torch.distributed.get_rank()"),
    ("from torch.distributed import get_rank", "get_rank()"),
    ("from torch.distributed import get_rank as grank", "grank()"),
    ("import torch.distributed.distributed_c10d as c10d", "c10d.get_rank()"),
    ("from os import environ", "int(environ['RANK'])"),
    ("import os as _os", "int(_os.environ['RANK'])"),
    ("from os import getenv", "int(getenv('RANK', 0))"),
])
def test_cr001_aliases(imports, call):
    source = f"import torch\n{imports}\nr = {call}\ntorch.cuda.set_device(r)\n"
    assert found(source) == {(4, "CR001")}


def test_cr001_get_rank_of_a_group_is_not_the_global_rank():
    # get_rank(group) may well be a rank within a per-node group: do not guess.
    check("""
        torch.cuda.set_device(dist.get_rank(local_group))
        torch.cuda.set_device(dist.get_rank(group=local_group))
    """)


def test_cr001_variable_tracking():
    findings = check("""
        RANK = int(os.environ["RANK"])


        def main():
            global_rank = RANK                  # via another variable, from module scope
            torch.cuda.set_device(global_rank)  # expect: CR001
            r: int = dist.get_rank()
            model.to(r)  # expect: CR001
            rank, world = dist.get_rank(), dist.get_world_size()
            torch.cuda.set_device(rank)  # expect: CR001
            if (me := dist.get_rank()) == 0:
                torch.cuda.set_device(me)  # expect: CR001


        class Trainer:
            def __init__(self):
                self.rank = dist.get_rank()
                self.model = build().to(self.rank)  # expect: CR001

            def elsewhere(self):
                self.model.to(self.rank)        # another method: not followed


        def untouched(rank):
            torch.cuda.set_device(rank)
    """)
    assert "global_rank = RANK, line" in findings[0].message


def test_cr001_scopes_follow_python():
    check("""
        try:
            import torch.distributed as tdist
        except ImportError:
            tdist = None
        rank = None


        def init():
            global rank
            rank = tdist.get_rank()


        def use():
            torch.cuda.set_device(rank)  # expect: CR001
            devices = [torch.device("cuda", rank) for rank in range(8)]


        def outer():
            g = int(os.environ["RANK"])

            def inner():
                return torch.device("cuda", g)  # expect: CR001
            return inner
    """)


def test_cr001_message_and_fix_name_the_expression_and_the_local_rank_variable():
    [f] = check("""
        def main():
            local_rank = int(os.environ["LOCAL_RANK"])
            rank = dist.get_rank()
            torch.cuda.set_device(rank)  # expect: CR001
    """)
    assert f.severity == "error"
    assert f.message.startswith("torch.cuda.set_device(rank) uses the global rank "
                                "(rank = dist.get_rank(), line 9) as a CUDA device index")
    assert f.fix == "use the local rank: torch.cuda.set_device(local_rank)"
    assert (f.line, f.col) == (10, 5)


def test_cr001_torch_accelerator():
    findings = check("""
        rank = dist.get_rank()
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.accelerator.set_device_index(rank)  # expect: CR001
        with torch.accelerator.device_index(rank):  # expect: CR001
            pass
        acc = torch.accelerator.current_accelerator()
        device = torch.device(f"{acc}:{rank}")  # expect: CR001
        kind = acc.type
        x = torch.zeros(3, device=f"{kind}:{rank}")  # expect: CR001
        y = torch.device(acc, rank)  # expect: CR001
        torch.accelerator.set_device_index(local_rank)
        ok = torch.device(f"{acc}:{local_rank}")
        label = f"{host}:{rank}"
    """)
    assert findings[0].fix == "use the local rank: torch.accelerator.set_device_index(local_rank)"


def test_cr001_a_global_rank_passed_to_a_function_of_this_file():
    # Shaped like pytorch/examples distributed/ddp/example.py.
    findings = check("""
        def demo_basic(rank):
            model = build().to(rank)  # expect: CR001
            ddp_model = DDP(model, device_ids=[rank])  # expect: CR001
            labels = torch.randn(20, 5).to(rank)  # expect: CR001


        def main():
            env_dict = {key: os.environ[key] for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
            rank = int(env_dict["RANK"])
            local_rank = int(env_dict["LOCAL_RANK"])
            torch.accelerator.set_device_index(rank)  # expect: CR001
            dist.init_process_group("nccl", rank=int(env_dict["RANK"]),
                                    world_size=int(env_dict["WORLD_SIZE"]))
            demo_basic(rank)
    """)
    assert "(rank from demo_basic(rank), line 20; rank = int(env_dict['RANK']), line 15)" \
        in findings[0].message
    assert findings[-1].fix == "use the local rank: torch.accelerator.set_device_index(local_rank)"


def test_cr001_parameters_are_followed_only_when_every_call_is_visible():
    check("""
        def spawned(rank):
            torch.cuda.set_device(rank)


        def mixed(rank):
            torch.cuda.set_device(rank)


        def defaulted(rank=0):
            torch.cuda.set_device(rank)


        @decorator
        def decorated(rank):
            torch.cuda.set_device(rank)


        class Worker:
            def run(self, rank):
                torch.cuda.set_device(rank)


        def recursive(rank, n):
            if n:
                recursive(rank, n - 1)
            torch.cuda.set_device(rank)


        def local(rank):
            torch.cuda.set_device(rank)


        g = dist.get_rank()
        spawned(g)
        torch.multiprocessing.spawn(spawned, nprocs=2)  # handed on: its caller is not visible
        mixed(g)
        mixed(0)
        defaulted()
        decorated(g)
        Worker().run(g)
        recursive(g, 2)
        local(int(os.environ["LOCAL_RANK"]))
        local(rank=int(os.environ["LOCAL_RANK"]))
    """)


def test_cr001_long_call_is_shortened_to_the_offending_argument():
    [f] = check("""
        rank = dist.get_rank()
        model = DDP(build_a_model_with_a_long_name(layers=48, hidden=8192), find_unused_parameters=True, device_ids=[rank])  # expect: CR001
    """)
    assert "DDP(..., device_ids=[rank]) uses the global rank" in f.message
    assert f.fix.endswith("DDP(..., device_ids=[int(os.environ['LOCAL_RANK'])])")


# -- CR002: the local rank / local world size where the global one is needed ------------

def test_cr002_sampler_rank_and_num_replicas():
    findings = check("""
        local_rank = int(os.environ["LOCAL_RANK"])
        a = DistributedSampler(ds, rank=local_rank)  # expect: CR002
        b = DistributedSampler(ds, rank=int(os.environ.get("LOCAL_RANK", 0)))  # expect: CR002
        c = DistributedSampler(ds, None, local_rank)  # expect: CR002
        d = DistributedSampler(ds, num_replicas=int(os.environ["LOCAL_WORLD_SIZE"]))  # expect: CR002
        e = DistributedSampler(ds, num_replicas=torch.cuda.device_count())  # expect: CR002
        f = DistributedSampler(ds, rank=dist.get_rank(), num_replicas=dist.get_world_size())
        for epoch in range(2):
            for s in (a, b, c, d, e, f):
                s.set_epoch(epoch)
    """)
    assert findings[0].fix == ("DistributedSampler(ds) takes the rank and world size from the "
                               "process group (or pass rank=dist.get_rank())")
    assert "passes the local rank (local_rank = int(os.environ['LOCAL_RANK']), line 7)" \
        in findings[0].message
    assert findings[2].fix.startswith("DistributedSampler(ds) takes")


def test_cr002_positional_arguments_keep_their_meaning_in_the_fix():
    [f] = check("""
        lr = int(os.environ["LOCAL_RANK"])
        s = DistributedSampler(ds, 8, lr, False, 7)  # expect: CR002
    """)
    assert f.fix.startswith("DistributedSampler(ds, shuffle=False, seed=7) takes")


def test_cr002_argparse_local_rank_and_attribute_assignments():
    check("""
        import argparse
        from torch.utils.data.distributed import DistributedSampler as DS
        parser = argparse.ArgumentParser()
        parser.add_argument("--local-rank", type=int)
        args = parser.parse_args()
        sampler = DS(ds, rank=args.local_rank)  # expect: CR002


        def other(cfg):
            cfg.local_rank = int(os.environ["LOCAL_RANK"])
            return DS(ds, rank=cfg.local_rank, shuffle=False)  # expect: CR002
    """)


def test_cr002_init_process_group_with_the_local_rank():
    check("""
        local_rank = int(os.environ["LOCAL_RANK"])
        dist.init_process_group("nccl", rank=local_rank, world_size=int(os.environ["WORLD_SIZE"]))  # expect: CR002
        dist.init_process_group("nccl", rank=int(os.environ["RANK"]), world_size=torch.cuda.device_count())  # expect: CR002
    """)


# -- CR003: no set_epoch -----------------------------------------------------------------

def test_cr003_shuffling_sampler_without_set_epoch():
    [f] = check("""
        train_sampler = DistributedSampler(ds)  # expect: CR003
        val_sampler = DistributedSampler(val_ds, shuffle=False)
        loader = DataLoader(ds, sampler=train_sampler)
        for epoch in range(10):
            for batch in loader:
                pass
    """)
    assert f.severity == "warning"
    assert f.fix.startswith("call train_sampler.set_epoch(epoch) at the top of each epoch")


def test_cr003_shuffle_true_or_unknown_still_warns_and_the_loop_may_be_elsewhere():
    check("""
        def make(ds, shuffle):
            return DataLoader(ds, sampler=DistributedSampler(ds, shuffle=shuffle))  # expect: CR003


        def train(loader):
            for batch in loader:
                step(batch)


        s = DistributedSampler(ds, shuffle=True)  # expect: CR003
    """)


def test_cr003_not_reported_when_the_sampler_is_handed_to_a_helper():
    # Shaped like pytorch/examples distributed/FSDP/T5_training.py: the helper is imported.
    check("""
        from train_utils import train
        import engine
        sampler = DistributedSampler(ds)
        loader = DataLoader(ds, sampler=sampler)
        for epoch in range(10):
            train(model, loader, epoch, sampler=sampler)
        other = DistributedSampler(ds)
        for epoch in range(10):
            engine.fit(other, epoch)
        engine.run(DistributedSampler(ds))
    """)


def test_cr003_still_reported_when_the_sampler_reaches_only_loaders_builtins_or_this_files_code():
    check("""
        def evaluate(loader, sampler):
            for batch in loader:
                pass


        sampler = DistributedSampler(ds)  # expect: CR003
        kwargs = {"batch_size": 8, "sampler": sampler}
        loader = DataLoader(ds, **kwargs)
        print(len(sampler))
        for epoch in range(10):
            evaluate(loader, sampler)
    """)


@pytest.mark.parametrize("body", [
    # set_epoch called in any way at all
    "s = DistributedSampler(ds)\nfor e in range(3):\n    loader.sampler.set_epoch(e)\n",
    "s = DistributedSampler(ds)\nfor e in range(3):\n    getattr(s, 'set_epoch')(e)\n",
    # no loop in this file: the training loop lives somewhere else
    "s = DistributedSampler(ds)\ntrainer.fit(DataLoader(ds, sampler=s))\n",
    # no shuffling, nothing to vary
    "s = DistributedSampler(ds, shuffle=False)\nfor e in range(3):\n    pass\n",
    "s = DistributedSampler(ds, None, None, False)\nfor e in range(3):\n    pass\n",
])
def test_cr003_not_reported(body):
    assert lint_source(HEADER + body) == []


# -- CR004: literal rank / world_size ------------------------------------------------------

def test_cr004_literal_rank_and_world_size():
    findings = check("""
        WORLD = 8
        dist.init_process_group("nccl", rank=0, world_size=2)  # expect: CR004
        dist.init_process_group("nccl", rank=int(os.environ["RANK"]), world_size=16)  # expect: CR004
        dist.init_process_group("nccl", "env://", None, 4, int(os.environ["RANK"]))  # expect: CR004
        dist.init_process_group(backend="gloo", world_size=WORLD)  # expect: CR004
        from torch.distributed import init_process_group as ipg
        ipg("nccl", rank=1)  # expect: CR004
        dist.init_process_group("nccl", rank=-1, world_size=-1)
        dist.init_process_group("nccl")
    """)
    both = [f for f in findings if f.line == 8]
    assert len(both) == 2
    assert "hard-codes the rank (rank=0)" in both[0].message
    assert "hard-codes the world size (world_size=2)" in both[1].message
    assert both[0].fix.endswith("drop rank= and world_size=: dist.init_process_group('nccl')")
    only_ws = [f for f in findings if f.line == 9]
    assert len(only_ws) == 1 and "world_size=16" in only_ws[0].message
    positional = [f for f in findings if f.line == 10][0]
    assert positional.fix.endswith("dist.init_process_group('nccl', init_method='env://', timeout=None)")
    assert "from WORLD = 8, line 7" in [f for f in findings if f.line == 11][0].message


def test_cr004_not_reported_in_a_single_process_fallback():
    check("""
        if os.environ.get("WORLD_SIZE") is None:
            dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:1234")
        if not dist.is_torchelastic_launched():
            dist.init_process_group("gloo", rank=0, world_size=1)
        elif True:
            pass
    """)


def test_cr004_and_cr002_not_reported_for_an_explicit_rendezvous_or_rpc():
    # Shaped like pytorch/examples distributed/rpc/ddp_rpc/main.py: a sub-group of 2 trainers.
    check("""
        from torch.distributed import rpc, TCPStore
        r = int(os.environ["RANK"])
        local_rank = int(os.environ["LOCAL_RANK"])
        dist.init_process_group("gloo", init_method="tcp://localhost:29500", rank=r, world_size=2)
        dist.init_process_group("gloo", "file:///tmp/rdzv", rank=0, world_size=2)
        dist.init_process_group(backend="gloo", init_method=url, rank=0, world_size=2)
        store = TCPStore("10.0.0.1", 29501, 2, r == 0)
        dist.init_process_group("gloo", store=store, rank=r, world_size=2)
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29600", rank=local_rank,
                                world_size=torch.cuda.device_count())
        rpc.init_rpc("trainer0", rank=0, world_size=4)
        rpc.init_rpc(name="ps", rank=r, world_size=3)
    """)


def test_cr004_still_reported_with_the_env_init_method():
    check("""
        dist.init_process_group("nccl", init_method="env://", world_size=2)  # expect: CR004
    """)


# -- CR005: NCCL object collectives without set_device ------------------------------------

def test_cr005_object_collective_without_set_device():
    [f] = check("""
        dist.init_process_group(backend="nccl")
        local_rank = int(os.environ["LOCAL_RANK"])
        model = DDP(model.to(local_rank), device_ids=[local_rank])
        objs = [None] * dist.get_world_size()
        dist.all_gather_object(objs, {"x": 1})  # expect: CR005
        dist.broadcast_object_list(objs, src=0, device=torch.device("cuda", local_rank))
    """)
    assert f.severity == "warning"
    assert "torch.cuda.set_device(int(os.environ['LOCAL_RANK']))" in f.fix


@pytest.mark.parametrize("line", [
    "torch.cuda.set_device(int(os.environ['LOCAL_RANK']))",
    "torch.accelerator.set_device_index(int(os.environ['LOCAL_RANK']))",
    "setup.set_device()",
    "os.environ['CUDA_VISIBLE_DEVICES'] = os.environ['LOCAL_RANK']",
    "dist.init_process_group('gloo')",
    "dist.init_process_group('cpu:gloo,cuda:nccl')",
])
def test_cr005_not_reported_when_the_device_is_chosen_or_not_nccl(line):
    source = HEADER + line + "\ndist.init_process_group('nccl')\ndist.all_gather_object([None], 1)\n"
    if "init_process_group" in line:
        source = HEADER + line + "\ndist.all_gather_object([None], 1)\n"
    assert lint_source(source) == []


# -- CR006: torch.distributed.launch's --local_rank under torchrun ------------------------

def test_cr006_launch_local_rank_argument_used_as_a_device():
    findings = check("""
        import argparse
        parser = argparse.ArgumentParser()
        parser.add_argument("--local_rank", type=int, default=0)  # expect: CR006
        args = parser.parse_args()
        torch.cuda.set_device(args.local_rank)
        dist.init_process_group(backend="nccl", init_method="env://")
        model = DDP(build().cuda(args.local_rank), device_ids=[args.local_rank])
    """)
    [f] = findings
    assert f.severity == "error"
    assert "torchrun does not pass it" in f.message
    assert "args.local_rank is 0 in every process" in f.message
    assert "torch.cuda.set_device(args.local_rank) (line 11)" in f.message
    assert f.fix == ("read LOCAL_RANK from the environment: parser.add_argument('--local_rank', "
                     "type=int, default=int(os.environ.get('LOCAL_RANK', 0)))")


def test_cr006_no_default_a_variable_and_a_function():
    [f] = check("""
        import argparse


        def setup(opts):
            lr = opts.local_rank
            return torch.device("cuda", lr)


        parser = argparse.ArgumentParser()
        parser.add_argument("--local-rank", "--local_rank", type=int)  # expect: CR006
        setup(parser.parse_args())
    """)
    assert "opts.local_rank is None in every process" in f.message
    assert f.fix.endswith("parser.add_argument('--local-rank', '--local_rank', type=int, "
                          "default=int(os.environ.get('LOCAL_RANK', 0)))")


def test_cr006_the_legacy_minus_one_default():
    [f] = check("""
        import argparse
        parser = argparse.ArgumentParser()
        parser.add_argument("--local_rank", default=-1, type=int, help="set by torch.distributed.launch")  # expect: CR006
        args = parser.parse_args()
        if args.local_rank != -1:
            torch.cuda.set_device(args.local_rank)
    """)
    assert "args.local_rank is -1 in every process" in f.message
    assert f.message.startswith("parser.add_argument(...) declares")
    assert f.fix == ("read LOCAL_RANK from the environment: parser.add_argument('--local_rank', ..., "
                     "default=int(os.environ.get('LOCAL_RANK', 0)))")


@pytest.mark.parametrize("lines", [
    # the default reads the environment (torchrun), the flag still works (launch)
    ["p.add_argument('--local_rank', type=int, default=int(os.environ.get('LOCAL_RANK', 0)))",
     "args = p.parse_args()", "torch.cuda.set_device(args.local_rank)"],
    # overwritten from the environment after parsing
    ["p.add_argument('--local_rank', type=int, default=0)", "args = p.parse_args()",
     "args.local_rank = int(os.environ['LOCAL_RANK'])", "torch.cuda.set_device(args.local_rank)"],
    # declared for a launcher's sake, never used as a device
    ["p.add_argument('--local_rank', type=int, default=-1)", "args = p.parse_args()",
     "print(args.local_rank)"],
    # required: fails loudly under torchrun, not silently
    ["p.add_argument('--local_rank', type=int, required=True)", "args = p.parse_args()",
     "torch.cuda.set_device(args.local_rank)"],
])
def test_cr006_not_reported(lines):
    source = HEADER + "import argparse\np = argparse.ArgumentParser()\n" + "\n".join(lines) + "\n"
    assert lint_source(source) == []


# -- CR007: ranks from Slurm's task variables under torchrun -------------------------------

def test_cr007_slurm_task_variables_used_as_ranks():
    findings = check("""
        rank = int(os.environ["SLURM_PROCID"])  # expect: CR007
        world_size = int(os.environ.get("SLURM_NTASKS", 1))  # expect: CR007
        dist.init_process_group("nccl", rank=rank, world_size=world_size)
        torch.cuda.set_device(int(os.getenv("SLURM_LOCALID")))  # expect: CR007
        node = int(os.environ["SLURM_NODEID"])  # expect: CR007
        sampler = DistributedSampler(ds, num_replicas=nodes, rank=node, shuffle=False)
        os.environ["RANK"] = os.environ["SLURM_PROCID"]  # expect: CR007
        os.environ["WORLD_SIZE"] = str(int(os.environ["SLURM_NNODES"]))  # expect: CR007
        x = torch.zeros(3, device=f"cuda:{os.environ['SLURM_LOCALID']}")  # expect: CR007
        self.local_rank = int(os.environ["SLURM_LOCALID"])  # expect: CR007
        cfg.node_rank = int(os.environ["SLURM_NODEID"])  # expect: CR007
        setup(world_size=int(os.environ["SLURM_NTASKS"]))  # expect: CR007
    """)
    assert {f.severity for f in findings} == {"warning"}
    f = findings[0]
    assert (f.line, f.col) == (7, 12)
    assert f.message == (
        "os.environ['SLURM_PROCID'] takes Slurm's SLURM_PROCID as the global rank in "
        "rank = int(os.environ['SLURM_PROCID']); under torchrun SLURM_PROCID numbers srun's "
        "tasks, not torchrun's processes: every process torchrun starts on a node reads the "
        "same value (0 on every node when clusterrun runs on Slurm, unset over SSH)")
    assert f.fix == ("use the global rank torchrun sets: int(os.environ['RANK']), or "
                     "dist.get_rank() once the process group is up")
    assert "as a CUDA device index in torch.cuda.set_device(" in findings[2].message
    assert findings[2].fix == "use the local rank torchrun sets: int(os.environ['LOCAL_RANK'])"
    # One finding per read, naming its first use as a rank, on another line here.
    assert "as the global rank in DistributedSampler(ds, num_replicas=nodes, rank=node, " \
        "shuffle=False) (line 12)" in findings[3].message
    assert "SLURM_NODEID is the node's index in its srun step" in findings[3].message
    assert findings[5].message.startswith(
        "os.environ['SLURM_NNODES'] takes Slurm's SLURM_NNODES as the world size in "
        "os.environ['WORLD_SIZE'] = str(int(os.environ['SLURM_NNODES']))")
    assert findings[8].fix.startswith("use the node rank torchrun sets: int(os.environ['GROUP_RANK'])")


def test_cr007_through_variables_and_functions_of_the_file():
    findings = check("""
        def setup(r, n):
            dist.init_process_group("nccl", rank=r, world_size=n)


        def main():
            proc = int(os.environ["SLURM_PROCID"])  # expect: CR007
            ntasks = int(os.environ["SLURM_NTASKS"])  # expect: CR007
            lid = int(os.environ["SLURM_LOCALID"])  # expect: CR007
            model = DDP(build().to(lid), device_ids=[lid])
            setup(proc, ntasks)
    """)
    assert "in dist.init_process_group('nccl', rank=r, world_size=n) (line 8)" in findings[0].message
    assert "as a CUDA device index in DDP(build().to(lid), device_ids=[lid]) (line 15)" \
        in findings[2].message


def test_cr007_not_reported_for_a_fallback_logging_or_a_chosen_slurm_launcher():
    # RANK first, Slurm's only when torchrun's is absent: harmless under torchrun.
    check("""
        import logging
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
        local_rank = int(os.getenv("LOCAL_RANK", os.getenv("SLURM_LOCALID", "0")))
        if "RANK" in os.environ:
            world_size = int(os.environ["WORLD_SIZE"])
        else:
            world_size = int(os.environ["SLURM_NTASKS"])
        if not dist.is_torchelastic_launched():
            dist.init_process_group("nccl", rank=int(os.environ["SLURM_PROCID"]))
        try:
            node_rank = int(os.environ["GROUP_RANK"])
        except KeyError:
            node_rank = int(os.environ["SLURM_NODEID"])
        os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
        job = os.environ["SLURM_JOB_ID"]
        task = int(os.environ["SLURM_PROCID"])
        print(f"rank {os.environ['SLURM_PROCID']} of job {job}")
        logging.info("slurm task %s", os.environ.get("SLURM_PROCID"))
        logging.info("on", rank=os.environ.get("SLURM_PROCID"))
        torch.cuda.set_device(local_rank)


        def get_rank():
            if "RANK" in os.environ:
                return int(os.environ["RANK"])
            rank = int(os.environ["SLURM_PROCID"])
            return rank


        def init_dist(launcher):
            if launcher == "slurm":
                os.environ["RANK"] = os.environ["SLURM_PROCID"]
            dist.init_process_group("nccl")


        def _init_dist_slurm():
            os.environ["LOCAL_RANK"] = str(int(os.environ["SLURM_LOCALID"]))


        class SLURMEnvironment:
            def global_rank(self):
                return int(os.environ["SLURM_PROCID"])

            def set_up(self):
                self.rank = int(os.environ["SLURM_PROCID"])
    """)


def test_cr007_an_if_on_slurms_own_variable_is_no_fallback():
    # Under `srun torchrun` SLURM_PROCID is set, so this branch is the one taken.
    check("""
        if "SLURM_PROCID" in os.environ:
            rank = int(os.environ["SLURM_PROCID"])  # expect: CR007
        else:
            rank = int(os.environ["RANK"])
        rank = int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", 0)))  # expect: CR007
    """)


# -- CR000, output, the command ---------------------------------------------------------

def test_syntax_error_is_a_finding_not_an_exception(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import torch\ndef main(:\n    pass\n")
    [f] = lint_paths([str(bad)])
    assert (f.path, f.line, f.code, f.severity) == (str(bad), 2, "CR000", "error")
    assert "syntax error" in f.message


def test_unreadable_or_missing_file_is_a_finding(tmp_path):
    binary = tmp_path / "weights.py"
    binary.write_bytes(b"\xff\xfe\x00\x01garbage")
    missing = tmp_path / "nope.py"
    findings = lint_paths([str(binary), str(missing)])
    assert [(f.path, f.code) for f in findings] == [(str(binary), "CR000"), (str(missing), "CR000")]


def test_findings_are_sorted_by_line():
    source = HEADER + "r = dist.get_rank()\nmodel.to(r)\ntorch.cuda.set_device(r)\n" \
        "dist.init_process_group('nccl', rank=0)\n"
    lines = [f.line for f in lint_source(source)]
    assert lines == sorted(lines) == [7, 8, 9]


def test_format_finding():
    f = Finding("train.py", 12, 5, "CR001", "error", "torch.cuda.set_device(rank) uses ...",
                "use the local rank: torch.cuda.set_device(local_rank)")
    assert format_finding(f) == ("train.py:12:5: error CR001 torch.cuda.set_device(rank) uses ...\n"
                                 "    fix: use the local rank: torch.cuda.set_device(local_rank)")


def write(tmp_path: Path, name: str, body: str) -> str:
    p = tmp_path / name
    p.write_text(HEADER + textwrap.dedent(body))
    return str(p)


def test_lint_command_errors_exit_1(tmp_path, capsys):
    bad = write(tmp_path, "bad.py", """
        rank = dist.get_rank()
        torch.cuda.set_device(rank)
        sampler = DistributedSampler(ds)
        for epoch in range(3):
            pass
    """)
    good = str(REPO / "scripts" / "ddp_example.py")
    assert lint_command([bad, good]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{bad}:8:1: error CR001 torch.cuda.set_device(rank) uses the global rank")
    assert out[1] == "    fix: use the local rank: torch.cuda.set_device(int(os.environ['LOCAL_RANK']))"
    assert out[2].startswith(f"{bad}:9:11: warning CR003 ")
    assert out[-1] == "1 error, 1 warning in 1 of 2 files"


def test_lint_command_warnings_only_exit_0(tmp_path, capsys):
    warn = write(tmp_path, "warn.py", """
        sampler = DistributedSampler(ds)
        for epoch in range(3):
            pass
    """)
    assert lint_command([warn]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "1 warning in 1 file"


def test_lint_command_clean_exit_0(tmp_path, capsys):
    a = write(tmp_path, "a.py", "dist.init_process_group('nccl')\n")
    assert lint_command([a, str(REPO / "scripts" / "ddp_example.py")]) == 0
    assert capsys.readouterr().out == "no problems found in 2 files\n"


def test_lint_command_directory(tmp_path, capsys):
    write(tmp_path, "a.py", "torch.cuda.set_device(dist.get_rank())\n")
    (tmp_path / "pkg").mkdir()
    write(tmp_path / "pkg", "b.py", "x = 1\n")
    (tmp_path / ".venv").mkdir()
    write(tmp_path / ".venv", "c.py", "torch.cuda.set_device(dist.get_rank())\n")
    assert lint_command([str(tmp_path)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "1 error in 1 of 2 files"


def test_lint_command_syntax_error_exit_1(tmp_path, capsys):
    p = tmp_path / "broken.py"
    p.write_text("def (:\n")
    assert lint_command([str(p)]) == 1
    assert "error CR000 syntax error" in capsys.readouterr().out


def test_lint_command_missing_file_is_usage_error(tmp_path):
    missing = str(tmp_path / "train.py")
    with pytest.raises(UsageError, match=re.escape(f"no such file: {missing}")) as e:
        lint_command([missing])
    assert e.value.exit_code == EXIT_USAGE


# -- CR001: the frameworks' global ranks as a device ---------------------------------

FRAMEWORKS = """\
import os
import torch
import lightning as L
import pytorch_lightning as pl
from lightning.pytorch import LightningModule, Callback
from transformers import HfArgumentParser, Trainer, TrainingArguments
from accelerate import Accelerator
from torch.utils.data import DataLoader, DistributedSampler
"""


def test_cr001_the_frameworks_global_ranks_used_as_a_device():
    findings = check("""
        class Model(L.LightningModule):
            def setup(self, stage):
                torch.cuda.set_device(self.global_rank)  # expect: CR001

            def on_fit_start(self):
                self.buf = torch.zeros(3).to(f"cuda:{self.trainer.global_rank}")  # expect: CR001

            def train_dataloader(self):  # the local rank as the sampler's: CR002, as for torch's own
                return DataLoader(self.ds, sampler=DistributedSampler(self.ds, rank=self.local_rank))  # expect: CR002


        class Old(pl.LightningModule):
            def configure_model(self):
                self.to(self.global_rank)  # expect: CR001


        class Pin(Callback):
            def on_train_start(self, trainer, pl_module):
                torch.cuda.set_device(trainer.global_rank)  # expect: CR001


        args = TrainingArguments(output_dir="out")
        torch.cuda.set_device(args.process_index)  # expect: CR001

        trainer = L.Trainer(devices=2, num_nodes=2)
        x = torch.zeros(1, device=trainer.global_rank)  # expect: CR001

        accelerator = Accelerator()
        torch.cuda.set_device(accelerator.process_index)  # expect: CR001


        class MyTrainer(Trainer):
            def create_optimizer(self):
                torch.cuda.set_device(self.args.process_index)  # expect: CR001
                return super().create_optimizer()
    """, FRAMEWORKS)
    # The fix is the framework's own local rank.
    fixes = [f.fix for f in findings]
    assert "use the local rank: torch.cuda.set_device(self.local_rank)" in fixes
    assert "use the local rank: torch.zeros(3).to(f'cuda:{self.trainer.local_rank}')" in fixes
    assert "use the local rank: torch.cuda.set_device(args.local_process_index)" in fixes
    assert "use the local rank: torch.cuda.set_device(self.args.local_process_index)" in fixes


def test_correct_framework_code_is_silent():
    """Lightning, Hugging Face and accelerate code as their docs write it: the local rank
    for the device, the global rank for logging, seeding, sampling and rank-0 work."""
    check('''
        class LitModel(LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(4, 4)

            def setup(self, stage):
                torch.cuda.set_device(self.local_rank)
                torch.manual_seed(1234 + self.global_rank)

            def on_fit_start(self):
                self.buf = torch.zeros(3).to(f"cuda:{self.trainer.local_rank}")
                if self.global_rank == 0:
                    print(f"rank {self.global_rank} of {self.trainer.world_size} on cuda:{self.local_rank}")

            def train_dataloader(self):
                sampler = DistributedSampler(self.ds, num_replicas=self.trainer.world_size,
                                             rank=self.trainer.global_rank)
                return DataLoader(self.ds, sampler=sampler)

            def training_step(self, batch, batch_idx):
                self.log("rank", float(self.global_rank))
                return self.layer(batch.to(self.device)).sum()


        class Report(Callback):
            def on_train_end(self, trainer, pl_module):
                if trainer.global_rank == 0:
                    torch.save(pl_module.state_dict(), f"model-{trainer.global_rank}.pt")
                torch.cuda.set_device(trainer.local_rank)


        trainer = L.Trainer(accelerator="gpu", devices=2, num_nodes=2)
        trainer.fit(LitModel())
        if trainer.global_rank == 0:
            print("done")

        parser = HfArgumentParser(TrainingArguments)
        (args,) = parser.parse_args_into_dataclasses()
        training_args = TrainingArguments(output_dir="out")
        torch.cuda.set_device(training_args.local_process_index)
        device = torch.device("cuda", training_args.local_process_index)
        if training_args.process_index == 0:
            print(f"process {training_args.process_index} writes the checkpoints")
        sampler = DistributedSampler(ds, rank=training_args.process_index, num_replicas=training_args.world_size)


        class QuietTrainer(Trainer):
            def log(self, logs, *a, **k):
                if self.args.process_index == 0:
                    super().log(logs, *a, **k)


        accelerator = Accelerator()
        model = model.to(accelerator.device)
        torch.cuda.set_device(accelerator.local_process_index)
        if accelerator.process_index == 0:
            accelerator.print(f"on cuda:{accelerator.local_process_index}")
    ''', FRAMEWORKS)


def test_a_class_of_the_same_name_from_elsewhere_is_not_a_framework():
    check("""
        class LightningModule:
            global_rank = 3

        class Mine(LightningModule):
            def setup(self):
                torch.cuda.set_device(self.global_rank)

        class TrainingArguments:
            process_index = 1

        args = TrainingArguments()
        torch.cuda.set_device(args.process_index)
    """, "import torch\n")

"""A small DDP training run: a linear model on synthetic data, gloo on CPU.

Every rank prints its global rank, local rank and world size as torchrun set them,
then a loss per epoch. Run it with:

    clusterrun up hosts.example.yaml scripts/ddp_example.py --epochs 2
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ["LOCAL_RANK"])       # a device index: never the global rank
    device = torch.device(f"cuda:{local_rank}" if backend == "nccl" else "cpu")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    print(f"hello from rank {rank}/{world} (local rank {local_rank}) on {os.uname().nodename}")

    torch.manual_seed(0)
    x = torch.randn(1024, 8)
    y = x @ torch.arange(8.0) + 1.0
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data)                # uses the global rank and world size
    loader = DataLoader(data, batch_size=64, sampler=sampler)
    model = DDP(torch.nn.Linear(8, 1).to(device))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total = torch.zeros(1)
        for xb, yb in loader:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xb.to(device)).squeeze(1), yb.to(device))
            loss.backward()
            opt.step()
            total += loss.detach().cpu()
        dist.all_reduce(total)
        if rank == 0:
            print(f"epoch {epoch} mean loss {total.item() / (world * len(loader)):.4f}")
    # Wait for every rank before tearing down. gloo runs each collective on a worker thread,
    # which lets go of the collective's tensors (all_reduce's `total`) only after the caller
    # has been told it is done; letting go of a Python tensor takes the GIL. Without the
    # barrier the main thread can reach the interpreter's shutdown first, and the worker,
    # denied the GIL then, aborts the process ("terminate called without an active
    # exception", SIGABRT) after all the work is done. The barrier waits with the GIL
    # released, so the worker finishes its release while the interpreter is still whole.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

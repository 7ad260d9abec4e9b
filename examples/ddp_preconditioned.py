"""Data-parallel training with a KFAC-preconditioned optimizer: 2 processes (gloo, CPU).

Each process holds half of every batch; ``DistributedDataParallel`` averages the gradients and
``backpack(KFAC(), sync=True)`` gives every process the Kronecker factors of the whole batch, so
all processes take the same preconditioned step ``(G + λI)^-1 grad (A + λI)^-1`` and the
replicas stay identical. Prints the loss of the whole batch per step.

    python examples/ddp_preconditioned.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from backpack import backpack, extend
from backpack.extensions import KFAC
from backpack.utils.kroneckers import apply_inv_kfac_mat_prod

WORLD, STEPS, BATCH, LR, DAMPING = 2, 10, 64, 0.2, 1e-2


def data(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's half of batch ``step``: 2 classes split by a quadric in 8 dims."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(BATCH, 8, generator=gen)
    y = (x[:, 0] * x[:, 1] + x[:, 2] > 0).long()
    half = BATCH // WORLD
    return x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]


@torch.no_grad()
def precondition(model: nn.Module) -> None:
    """``p.grad <- (G + λI)^-1 p.grad (A + λI)^-1`` (weights), ``(G + λI)^-1 p.grad`` (biases)."""
    for p in model.parameters():
        p.grad = apply_inv_kfac_mat_prod(p.kfac, p.grad.flatten(), DAMPING).view_as(p)


def train(rank: int, init: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    torch.manual_seed(0)  # same initial weights (DDP also broadcasts rank 0's)
    model = extend(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2)))
    ddp, lossfunc = DDP(model), extend(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        x, y = data(step, rank)
        loss = lossfunc(ddp(x), y)
        opt.zero_grad()
        with backpack(KFAC(mc_samples=4), sync=True):
            loss.backward()  # .grad: averaged by DDP; .kfac: the whole batch's factors
        precondition(model)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)  # equal halves: the whole batch's mean loss
        if rank == 0:
            print(f"step {step}: loss {total.item() / WORLD:.4f}")
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    others = [torch.empty_like(weights) for _ in range(WORLD)]
    dist.all_gather(others, weights)
    assert all(torch.equal(o, weights) for o in others), "replicas diverged"
    if rank == 0:
        print("replicas identical after preconditioned steps")
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(train, args=(f"file://{Path(tmp) / 'init'}",), nprocs=WORLD)

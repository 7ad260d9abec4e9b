"""Peak memory and time of one HMP backward pass plus one product per parameter, and of a
Newton-CG-style loop (CG on each parameter's Hessian block), on a small sigmoid CNN.

Each measurement runs in a fresh subprocess so that ``ru_maxrss`` (peak resident memory) is
its own; the reported memory is that peak minus the process's resident memory before the
forward pass.

    python benchmarks/hmp_memory.py [--batch 8] [--cg-steps 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn

from backpack import backpack, extend
from backpack.extensions import HMP


def model() -> nn.Module:
    """Conv(1,8,3)-Sigmoid-Conv(8,8,3)-Sigmoid-Flatten-Linear-Sigmoid-Linear on 1x28x28."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.Sigmoid(),
        nn.Conv2d(8, 8, 3),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(8 * 24 * 24, 32),
        nn.Sigmoid(),
        nn.Linear(32, 10),
    )


def cg(apply, b: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` conjugate-gradient iterations on ``apply(x) = b`` from ``x = 0``."""
    x, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), (r * r).sum()
    for _ in range(steps):
        ap = apply(p)
        alpha = rr / (p * ap).sum().clamp(min=1e-12)
        x, r = x + alpha * p, r - alpha * ap
        new = (r * r).sum()
        p, rr = r + new / rr * p, new
    return x


def measure(batch: int, cg_steps: int, newton_steps: int) -> dict:
    torch.manual_seed(0)
    net, lossfunc = extend(model()), extend(nn.CrossEntropyLoss())
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for _ in range(max(newton_steps, 1)):
        with backpack(HMP()):
            loss = lossfunc(net(x), y)
            loss.backward()
        backward = time.perf_counter() - start
        for p in net.parameters():
            if cg_steps:  # a Newton-CG step on the block (damped: the block is indefinite)
                step = cg(lambda v, p=p: p.hmp(v) + 1e-1 * v, p.grad, cg_steps)
                p.data.sub_(step.clamp(-1, 1))
            else:
                p.hmp(torch.randn(1, *p.shape))
        net.zero_grad()
    total = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"backward_s": backward, "total_s": total, "peak_mb": (peak - base) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cg-steps", type=int, default=0)
    parser.add_argument("--newton-steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.batch, args.cg_steps, args.newton_steps)))
        return
    argv = [sys.executable, __file__, "--child", *sys.argv[1:]]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()

"""Cost of ``backpack(..., sync=True)`` under DistributedDataParallel: 2 gloo processes on CPU.

Per extension, each process runs a DDP training step (zero-grad, forward, backward) with the
extension, without and with ``sync``, interleaved in a rotating order after a warm-up (ranks
aligned by a barrier before each step, outside the timing). Printed (rank 0, medians):
``sync/step``, the time inside the aggregation (flattening, the collectives, unflattening; after
a barrier, so without waiting for the slower rank) over the unsynced step time; ``step ratio``,
synced over unsynced step time (barrier included: on a loaded machine it is mostly skew).

    python benchmarks/distributed.py [--reps 20] [--problems mlp,3c3d-64]
        [--extensions DiagGGNExact,KFAC,Variance,BatchGrad] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from benchmark import EXTENSIONS, PROBLEMS
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from backpack import backpack, extend
from backpack.distributed import SyncObserver

WORLD = 2
AGGREGATE = SyncObserver._aggregate
SYNC_TIMES: list[float] = []


def _timed_aggregate(self, rec) -> None:
    dist.barrier()  # the ranks' skew (the all_reduce would wait for the slower one) not counted
    start = time.perf_counter()
    AGGREGATE(self, rec)
    SYNC_TIMES.append(time.perf_counter() - start)


def worker(rank: int, init: str, args: argparse.Namespace) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    torch.set_num_threads(args.threads)
    SyncObserver._aggregate = _timed_aggregate
    rows = []
    for problem in args.problems.split(","):
        make, data, n = PROBLEMS[problem]
        torch.manual_seed(rank)
        x, y = data(n)
        torch.manual_seed(0)
        model = DDP(extend(make()))
        lossfunc = extend(nn.CrossEntropyLoss())
        for ext_name in args.extensions.split(","):

            def step(sync: bool, ext_name: str = ext_name) -> None:
                model.zero_grad(set_to_none=True)
                loss = lossfunc(model(x), y)
                with backpack(EXTENSIONS[ext_name](), sync=sync):
                    loss.backward()

            times: dict[bool, list[float]] = {False: [], True: []}
            for rep in range(args.reps + 2):  # 2 warm-up repetitions
                for sync in (rep % 2 == 0, rep % 2 == 1):
                    dist.barrier()
                    SYNC_TIMES.clear()
                    start = time.perf_counter()
                    step(sync)
                    if rep >= 2:
                        times[sync].append(time.perf_counter() - start)
                        if sync:
                            times.setdefault("agg", []).append(sum(SYNC_TIMES))
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append((problem, ext_name, med["agg"] / med[False], med[True] / med[False]))
    if rank == 0:
        print(
            f"torch {torch.__version__}, {WORLD} gloo processes x {args.threads} threads, "
            f"median of {args.reps} interleaved repetitions"
        )
        print(f"{'problem':<10}{'extension':<16}{'sync/step':>10}{'step ratio':>12}")
        for problem, ext_name, share, ratio in rows:
            print(f"{problem:<10}{ext_name:<16}{share:>10.3f}{ratio:>11.2f}x")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--problems", default="mlp,3c3d-64")
    parser.add_argument("--extensions", default="DiagGGNExact,KFAC,Variance,BatchGrad")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(f"file://{Path(tmp) / 'init'}", args), nprocs=WORLD)


if __name__ == "__main__":
    main()

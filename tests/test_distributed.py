"""``backpack(..., sync=...)`` under DistributedDataParallel: 2 gloo processes on CPU against one
process on the concatenated batch (float64), unequal local batches (3 and 5 samples).

One spawn runs every scenario (starting processes is the slow part); each worker collects its
mismatches and raises them together, which ``mp.spawn`` re-raises here.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from backpack import backpack, extend
from backpack.distributed import Sync
from backpack.extensions import (
    GGNMP,
    KFAC,
    KFLR,
    KFRA,
    BatchDiagGGNExact,
    BatchDiagHessian,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    SqrtGGNExact,
    SumGradSquared,
    Variance,
)

D = torch.float64
SIZES = (3, 5)  # local batch sizes of ranks 0 and 1
REDUCED = ("sum_grad_squared", "variance", "diag_ggn_exact", "diag_h", "kflr")
PER_SAMPLE = {"grad_batch": 0, "batch_l2": 0, "diag_ggn_exact_batch": 0, "diag_h_batch": 0}
PER_SAMPLE["sqrt_ggn_exact"] = 1


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(9, 4), nn.Sigmoid(), nn.Linear(4, 3)
    ).to(D)


def _data(mse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(sum(SIZES), 2, 4, dtype=D)
    y = torch.randn(sum(SIZES), 3, dtype=D) if mse else torch.randint(0, 3, (sum(SIZES),))
    if not mse:
        y[-2] = -100  # an ignored target: the mean divides by the non-ignored count
    return x, y


def _run(model, lossfunc, x, y, exts, **kwargs) -> dict:
    """``{(parameter name, savefield): value}`` after one backward pass."""
    loss = lossfunc(model(x), y)
    with backpack(*exts, **kwargs):
        loss.backward()
    inner = model.module if isinstance(model, DDP) else model
    return {
        (n, e.savefield): getattr(p, e.savefield) for n, p in inner.named_parameters() for e in exts
    }


def _close(a, b) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(u, v) for u, v in zip(a, b))
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def _check(errors: list, what: str, got: dict, ref: dict, rows: slice | None) -> None:
    """``got`` equals ``ref``; per-sample fields: rows ``rows`` of the reference (None: all)."""
    for (name, field), value in got.items():
        want = ref[(name, field)]
        if field in PER_SAMPLE and rows is not None:
            want = want.narrow(PER_SAMPLE[field], rows.start, rows.stop - rows.start)
        if not _close(value, want):
            errors.append(f"{what}: {name}.{field}")


def _worker(rank: int, init: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=len(SIZES))
    errors: list[str] = []
    rows = slice(sum(SIZES[:rank]), sum(SIZES[: rank + 1]))
    all_exts = [
        BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance(), DiagGGNExact(),
        BatchDiagGGNExact(), DiagHessian(), BatchDiagHessian(), KFLR(), SqrtGGNExact(),
    ]  # fmt: skip
    for mse, reduction, ddp_kwargs in [
        (False, "mean", dict(find_unused_parameters=True, bucket_cap_mb=1e-5)),
        (True, "sum", dict()),
        (True, "mean", dict(static_graph=True)),
    ]:
        what = f"{'MSE' if mse else 'CE'} {reduction} {ddp_kwargs}"
        x, y = _data(mse)
        lossfunc = extend((nn.MSELoss if mse else nn.CrossEntropyLoss)(reduction=reduction))
        ref = _run(extend(_net()), lossfunc, x, y, all_exts)
        ddp = DDP(extend(_net()), **ddp_kwargs)
        for step in range(2):  # static_graph's first step differs from later ones
            got = _run(ddp, lossfunc, x[rows], y[rows], all_exts, sync=True)
            _check(errors, f"{what} step {step}", got, ref, rows)
        gather = [BatchGrad(), BatchL2Grad(), BatchDiagGGNExact(), SqrtGGNExact()]
        got = _run(ddp, lossfunc, x[rows], y[rows], gather, sync=Sync(gather=True))
        _check(errors, f"{what} gathered", got, ref, None)
        with ddp.no_sync():  # hooks work under no_sync; without sync the quantities are local
            local = _run(ddp, lossfunc, x[rows], y[rows], all_exts)
        plain = _run(extend(_net()), lossfunc, x[rows], y[rows], all_exts)
        _check(errors, f"{what} no_sync, local", local, plain, None)
    # Monte-Carlo: KFAC's A is exact; every rank holds the same synced values
    x, y = _data(False)
    model, lossfunc = extend(_net()), extend(nn.CrossEntropyLoss())
    ref = _run(extend(_net()), lossfunc, x, y, [KFLR()])
    got = _run(DDP(model), lossfunc, x[rows], y[rows], [KFAC(), DiagGGNMC()], sync=True)
    for name in ("0.weight", "3.weight", "5.weight"):
        if not _close(got[(name, "kfac")][1], ref[(name, "kflr")][1]):
            errors.append(f"KFAC A of {name}")
    for value in got.values():
        flat = torch.cat([f.flatten() for f in (value if isinstance(value, list) else [value])])
        other = [torch.empty_like(flat) for _ in SIZES]
        dist.all_gather(other, flat)
        if not torch.equal(other[0], other[1]):
            errors.append("MC quantities differ between the ranks")
    # a module called twice (its calls' contributions summed), without DDP
    torch.manual_seed(0)  # the same weights on both ranks (no DDP to broadcast them)
    lin = nn.Linear(8, 8).to(D)
    shared = extend(nn.Sequential(nn.Flatten(), lin, nn.Tanh(), lin, nn.Linear(8, 3).to(D)))
    exts = [BatchGrad(), SumGradSquared(), Variance(), DiagGGNExact(), KFLR()]
    ref = _run(shared, lossfunc, x, y, exts)
    _check(errors, "shared module", _run(shared, lossfunc, x[rows], y[rows], exts, sync=True),
           ref, rows)  # fmt: skip
    try:  # the loss not extended: its reduction is unknown
        _run(shared, nn.CrossEntropyLoss(), x[rows], y[rows], [BatchGrad()], sync=True)
        errors.append("sync without an extended loss did not raise")
    except RuntimeError as err:
        if "extend" not in str(err):
            raise
    for ext in (KFRA(), GGNMP()):
        try:
            backpack(ext, sync=True)
            errors.append(f"{type(ext).__name__} with sync did not raise")
        except NotImplementedError:
            pass
    dist.destroy_process_group()
    assert not errors, f"rank {rank}: " + "; ".join(errors)


def test_ddp_sync_equals_single_process_on_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path / 'init'}",), nprocs=len(SIZES))


def test_sync_without_process_group_raises():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        backpack(DiagGGNExact(), sync=True)

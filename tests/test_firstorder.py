"""First-order extensions against per-sample gradients from ``vmap(grad)``, on every problem."""

from __future__ import annotations

import pytest
import torch

from backpack.extensions import BatchGrad, BatchL2Grad, SumGradSquared, Variance
from tests.cases import DEVICES, GAPS, problems
from tests.oracles import per_sample_grads

PROBLEMS = problems()
FIELDS = {
    BatchGrad: lambda gb: gb,
    BatchL2Grad: lambda gb: gb.flatten(1).square().sum(1),
    SumGradSquared: lambda gb: gb.square().sum(0),
    Variance: lambda gb: gb.var(0, unbiased=False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.id)
def test_first_order_matches_vmap_grad(problem, device):
    """Each extension alone and all four together equal the reductions of vmap(grad)."""
    problem.skip_gaps(GAPS)
    model, lossfunc, x, y = problem.run([ext() for ext in FIELDS], device)
    ref = per_sample_grads(model, lossfunc, x, y)
    for name, p in model.named_parameters():
        gb = ref[name]
        torch.testing.assert_close(p.grad_batch.sum(0), p.grad)
        for ext, reduce in FIELDS.items():
            got = getattr(p, ext().savefield)
            torch.testing.assert_close(got, reduce(gb), msg=lambda m: f"{ext.__name__} {name}: {m}")
    if problem.n == 1 or problem.reduction == "sum":
        return
    for ext, reduce in FIELDS.items():  # alone: no shared cache between extensions
        model, *_ = problem.run([ext()], device)
        for name, p in model.named_parameters():
            torch.testing.assert_close(getattr(p, ext().savefield), reduce(ref[name]))


SUB = [p for p in PROBLEMS if p.n == 3 and p.loss == "ce" and p.reduction == "mean"]


@pytest.mark.parametrize("problem", SUB, ids=lambda p: p.id)
def test_subsampling(problem):
    """``subsampling`` restricts to the chosen samples (repeats, any order), full-batch scale."""
    problem.skip_gaps(GAPS)
    idx = [2, 0, 0]
    exts = [ext(subsampling=idx) for ext in FIELDS]
    model, lossfunc, x, y = problem.run(exts)
    ref = per_sample_grads(model, lossfunc, x, y)
    for name, p in model.named_parameters():
        gb = ref[name][idx]
        for ext, reduce in FIELDS.items():
            torch.testing.assert_close(getattr(p, ext().savefield), reduce(gb))

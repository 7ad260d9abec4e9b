"""Block products (GGNMP, HMP) and the Kronecker extensions through the layers of
``tests/cases_activations.py`` (test_curvmatprod.py runs only the chain cases)."""

from __future__ import annotations

import pytest
import torch

from backpack.extensions import GGNMP, HMP, KFAC, KFLR, KFRA
from tests.cases import problems
from tests.cases_activations import CASES
from tests.oracles import ggn_block
from tests.test_curvmatprod import hessian_block

PROBLEMS = [
    p
    for p in problems([c for c in CASES if not c.name.startswith("EmbeddingBag")])
    if (p.loss, p.reduction, p.n) in {("ce", "mean", 3), ("mse", "sum", 1)}
]


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.id)
def test_products_match_dense_blocks_and_kronecker_passes(problem):
    model, lossfunc, x, y = problem.run([GGNMP(), HMP(), KFLR(), KFAC(), KFRA()])
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        mat = torch.randn(2, *p.shape, generator=gen, dtype=p.dtype)
        flat = mat.flatten(1).T
        ggn = ggn_block(model, lossfunc, x, y, name)
        torch.testing.assert_close(p.ggnmp(mat), (ggn @ flat).T.reshape(mat.shape))
        if "Hardsigmoid" not in problem.id:  # torch has no double backward for hardsigmoid
            hess = hessian_block(model, lossfunc, x, y, name)
            torch.testing.assert_close(p.hmp(mat), (hess @ flat).T.reshape(mat.shape))
        for field in ("kflr", "kfac", "kfra"):
            assert len(getattr(p, field)) == (1 if name.endswith("bias") else 2)

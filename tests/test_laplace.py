"""laplace-torch's BackPACK backends (``BackPackGGN``, ``BackPackEF``) on this library agree with
its curvlinops backend: posterior precisions and GLM predictives, several batches, both
likelihoods, backpropagation through the predictive (``enable_backprop=True``).

Needs the optional client libraries (``pip install -e ".[clients]"`` and
``pip install --no-deps laplace-torch==0.3 curvlinops-for-pytorch==3.0.1``; ``.ci/run`` does it).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.zoo import import_torchvision  # noqa: E402

import_torchvision()  # laplace imports torchvision, whose PyPI wheel needs this here (see there)
laplace = pytest.importorskip("laplace", reason="laplace-torch is not installed (see docstring)")
from laplace.curvature import (  # noqa: E402
    BackPackEF,
    BackPackGGN,
    CurvlinopsEF,
    CurvlinopsGGN,
)

REFERENCE = {BackPackGGN: CurvlinopsGGN, BackPackEF: CurvlinopsEF}


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _problem(likelihood: str):
    torch.manual_seed(0)
    x = torch.randn(10, 3)
    y = torch.randint(0, 4, (10,)) if likelihood == "classification" else torch.randn(10, 4)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    return model, DataLoader(TensorDataset(x, y), batch_size=4), x  # batches of 4, 4, 2


def _fit(backend, likelihood: str, structure: str, **kwargs):
    model, loader, x = _problem(likelihood)
    la = laplace.Laplace(model, likelihood, hessian_structure=structure, backend=backend, **kwargs)
    la.fit(loader)
    return la, x


def _precision(la) -> torch.Tensor:
    prec = la.posterior_precision
    return prec.to_matrix() if hasattr(prec, "to_matrix") else prec


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize(
    "backend, structure",
    [(BackPackGGN, "diag"), (BackPackGGN, "kron"), (BackPackGGN, "full"),
     (BackPackEF, "diag"), (BackPackEF, "full")],
)  # fmt: skip
def test_backpack_backend_matches_curvlinops(backend, structure, likelihood):
    ours, x = _fit(backend, likelihood, structure)
    if (backend, structure) == (BackPackEF, "diag"):
        # laplace-torch 0.3's CurvlinopsEF.diag returns zeros: compare with its full EF
        ref, _ = _fit(CurvlinopsEF, likelihood, "full")
        torch.testing.assert_close(_precision(ours), _precision(ref).diagonal())
        return
    ref, _ = _fit(REFERENCE[backend], likelihood, structure)
    torch.testing.assert_close(_precision(ours), _precision(ref))
    torch.testing.assert_close(ours.loss, ref.loss)
    _assert_same_predictive(ours, ref, x[:3])


def _assert_same_predictive(ours, ref, x: torch.Tensor, pred_type: str = "glm") -> None:
    """GLM predictives agree, three times: each re-extends the model (laplace resets the
    flags); the k-th call used to add a k-th hook and give k times the Jacobian."""
    for _ in range(3):
        f_ours, f_ref = ours(x, pred_type=pred_type), ref(x, pred_type=pred_type)
        pairs = zip(f_ours, f_ref) if isinstance(f_ours, tuple) else [(f_ours, f_ref)]
        for a, b in pairs:
            torch.testing.assert_close(a, b)


def test_enable_backprop_gradients_through_the_predictive():
    """``jacobians(create_graph=True)``: the GLM predictive's gradient w.r.t. the input."""
    grads = []
    for backend in (BackPackGGN, CurvlinopsGGN):
        la, x = _fit(backend, "regression", "kron", enable_backprop=True)
        x = x[:3].clone().requires_grad_(True)
        mean, var = la(x, pred_type="glm")
        (mean.square().sum() + var.diagonal(dim1=-2, dim2=-1).sum()).backward()
        grads.append(x.grad)
    torch.testing.assert_close(*grads)


def test_jacobians_stay_exact_over_calls():
    """Before the fix, the k-th call installed a k-th hook and returned k times the Jacobian."""
    model, _, x = _problem("classification")
    backend = BackPackGGN(model, "classification")
    ref, _ = CurvlinopsGGN(model, "classification").jacobians(x)
    model.output_size = 4
    for _ in range(3):
        J, _ = backend.jacobians(x)
        torch.testing.assert_close(J, ref)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_functional_laplace(likelihood):
    """FunctionalLaplace (``hessian_structure="gp"``) builds its kernel from Jacobians."""
    fits = [_fit(b, likelihood, "gp", n_subset=10) for b in (BackPackGGN, CurvlinopsGGN)]
    (ours, x), (ref, _) = fits
    torch.testing.assert_close(ours.log_marginal_likelihood(), ref.log_marginal_likelihood())
    _assert_same_predictive(ours, ref, x[:3], "gp")

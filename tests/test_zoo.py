"""The model zoo: tiny torchvision, timm and Hugging Face models (``tests/zoo.py``), each
extension on each, against float64 oracles built independently of backpack (per-sample
gradients by ``autograd.grad`` per sample, GGN diagonals by one vector-Jacobian product per
column of the loss Hessian's square root, Hessian diagonal entries by double backward).

One test id per (model, extension). ``KNOWN`` lists what does not work yet, each with its
reason: ``raises`` where backpack refuses with a clear error, ``WRONG`` where it returns a
value that disagrees with the oracle without saying so. They run as ``xfail(strict=False)``:
a case that starts to pass shows as XPASS, then delete its row.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

from backpack import backpack, extend
from backpack.extensions import (
    KFAC,
    KFLR,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    SumGradSquared,
    Variance,
)
from backpack.utils.kroneckers import kfacs_to_mat
from tests import oracles
from tests.oracles import FIRST_ORDER, flat_factors
from tests.zoo import (
    BUILDERS,
    CLASSIFIERS,
    Zoo,
    _twice_differentiable,
    build,
    ggn_block,
    ggn_diag,
    hessian_diag_entries,
)
from tests.zoo import per_sample_grads as zoo_per_sample_grads

FIRST = ("BatchGrad", "BatchL2Grad", "SumGradSquared", "Variance")
SECOND = ("DiagGGNExact", "DiagGGNMC", "DiagHessian", "KFAC", "KFLR", "KFLR-exact")
_TIED_KRON = (
    "raises NotImplementedError: GPT-2's embedding is tied to the output layer, whose Kronecker "
    "factors have the input-side factor on the other side: their sum is no Kronecker product"
)
# (model, extension) -> why it fails: "raises ..." (a clear error) or "WRONG ..." (a value that
# disagrees with the oracle, silently). Extensions: EXTENSIONS' keys, "KFLR-exact" (classifier
# head at batch size one) and "DiagGGNMC-converges". Delete a row once its case passes.
KNOWN: dict[tuple[str, str], str] = {
    (model, ext): _TIED_KRON for model in ("gpt2", "gpt2_last") for ext in ("KFAC", "KFLR")
}

EXTENSIONS = {
    "BatchGrad": BatchGrad,
    "BatchL2Grad": BatchL2Grad,
    "SumGradSquared": SumGradSquared,
    "Variance": Variance,
    "DiagGGNExact": DiagGGNExact,
    "DiagGGNMC": DiagGGNMC,
    "DiagHessian": DiagHessian,
    "KFAC": KFAC,
    "KFLR": KFLR,
}
SAVEFIELD = {"BatchGrad": "grad_batch", "BatchL2Grad": "batch_l2",
             "SumGradSquared": "sum_grad_squared", "Variance": "variance"}  # fmt: skip
HESSIAN_ALL_ENTRIES = 3000  # larger models: 8 entries of 4 parameters (double backward each)
MC_MODEL = "mlp"  # DiagGGNMC's expectation is checked on one cheap model


def _case(model: str, ext: str):
    reason = KNOWN.get((model, ext))
    marks = []
    if reason:  # a wrong value where an error was expected (or the reverse) fails the test
        raises = (
            AssertionError if reason.startswith("WRONG") else (RuntimeError, NotImplementedError)
        )
        marks = [pytest.mark.xfail(strict=False, reason=reason, raises=raises)]
    return pytest.param(model, ext, marks=marks, id=f"{model}-{ext}")


def _run(zoo: Zoo, *exts) -> dict[str, torch.Tensor]:
    """Extend, one backward pass with ``exts``; the named trainable parameters."""
    model = extend(zoo.model)
    lossfunc = extend(nn.CrossEntropyLoss())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # automatic rules, transformers' config notes
        with backpack(*exts):
            lossfunc(zoo.head(model(zoo.x)), zoo.y).backward()
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


@functools.cache
def _grads(model: str) -> dict[str, torch.Tensor]:
    return zoo_per_sample_grads(build(model))


@functools.cache
def _ggn(model: str) -> dict[str, torch.Tensor]:
    return ggn_diag(build(model))


def _hessian_picks(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flat indices of the diagonal entries the Hessian oracle computes: all of a small model;
    else 8 of each of four parameters (first, two in between, last)."""
    if sum(p.numel() for p in params.values()) <= HESSIAN_ALL_ENTRIES:
        return {k: torch.arange(p.numel()) for k, p in params.items()}
    names = list(params)
    chosen = [names[i] for i in sorted({0, len(names) // 3, 2 * len(names) // 3, len(names) - 1})]
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randperm(params[k].numel(), generator=gen)[:8] for k in chosen}


def _check_kron(name: str, p: torch.Tensor, factors: list, groups: int = 1) -> None:
    """Square, symmetric factors; a flat list of them spans the parameter (``prod = numel``;
    grouped convolutions: the equivalent dense weight, ``groups`` times the entries)."""
    for f in flat_factors(factors):
        assert f.dim() == 2 and f.shape[0] == f.shape[1], (name, f.shape)
        assert torch.isfinite(f).all(), name
        torch.testing.assert_close(f, f.T, msg=name)
    if all(isinstance(f, torch.Tensor) for f in factors):
        assert torch.Size([f.shape[0] for f in factors]).numel() == p.numel() * groups, name


@pytest.mark.parametrize("model, ext", [_case(m, e) for m in BUILDERS for e in EXTENSIONS])
def test_zoo(model, ext):
    zoo = build(model)
    params = _run(zoo, EXTENSIONS[ext]())
    if ext in SAVEFIELD:
        grads = _grads(model)
        for k, p in params.items():
            got, want = getattr(p, SAVEFIELD[ext]), FIRST_ORDER[SAVEFIELD[ext]](grads[k])
            torch.testing.assert_close(got, want, msg=lambda m, k=k: f"{k}: {m}")
    elif ext == "DiagGGNExact":
        ggn = _ggn(model)
        for k, p in params.items():
            torch.testing.assert_close(
                p.diag_ggn_exact, ggn[k].sum(0), msg=lambda m, k=k: f"{k}: {m}"
            )
    elif ext == "DiagGGNMC":
        for k, p in params.items():
            assert p.diag_ggn_mc.shape == p.shape and torch.isfinite(p.diag_ggn_mc).all(), k
            assert (p.diag_ggn_mc >= 0).all(), k
    elif ext == "DiagHessian":
        want = hessian_diag_entries(build(model), _hessian_picks(params))
        # Llama's RMSNorm computes in float32 whatever the model's dtype
        tol = {"rtol": 1e-5, "atol": 1e-8} if model.startswith("llama") else {}
        for k, idx in _hessian_picks(params).items():
            got = params[k].diag_h.flatten()[idx]
            torch.testing.assert_close(got, want[k], msg=lambda m, k=k: f"{k}: {m}", **tol)
    else:
        for k, p in params.items():
            owner = zoo.model.get_submodule(k.rpartition(".")[0])
            groups = getattr(owner, "groups", 1) if k.endswith("weight") else 1
            _check_kron(k, p, getattr(p, ext.lower()), groups if isinstance(groups, int) else 1)


@pytest.mark.parametrize("model, ext", [_case(m, "KFLR-exact") for m in CLASSIFIERS])
def test_kflr_exact_on_the_classifier_at_batch_one(model, ext):
    """A Linear feeding the loss, one sample: ``G ⊗ A`` (and ``G`` of the bias) is its GGN
    block exactly (``G`` the loss Hessian, ``A = x x^T``)."""
    zoo = build(model)
    zoo.x, zoo.y = zoo.x[:1], zoo.y[:1]
    params = _run(zoo, KFLR())
    for suffix in ("weight", "bias"):
        name = f"{zoo.classifier}.{suffix}"
        torch.testing.assert_close(kfacs_to_mat(params[name].kflr), ggn_block(zoo, name), msg=name)


@pytest.mark.parametrize("model, ext", [_case(MC_MODEL, "DiagGGNMC-converges")])
def test_diag_ggn_mc_converges_to_the_exact_diagonal(model, ext):
    """The mean over many sampled targets approaches the exact GGN diagonal."""
    torch.manual_seed(1)
    params = _run(build(model), DiagGGNMC(mc_samples=4000))
    ggn = _ggn(model)
    for k, p in params.items():
        exact = ggn[k].sum(0)
        torch.testing.assert_close(p.diag_ggn_mc, exact, rtol=0.1, atol=0.05 * exact.abs().max())


def test_zoo_oracles_agree_with_torch_func():
    """The zoo's oracles (autograd, per model) against tests/oracles.py (torch.func)."""
    zoo = build("mlp")
    lossfunc = nn.CrossEntropyLoss()
    grads = oracles.per_sample_grads(zoo.model, lossfunc, zoo.x, zoo.y)
    ggn = oracles.ggn_diag(zoo.model, lossfunc, zoo.x, zoo.y, per_sample=True)
    hess = oracles.hessian_diag(zoo.model, lossfunc, zoo.x, zoo.y)
    params = dict(zoo.model.named_parameters())
    picks = {k: torch.arange(p.numel()) for k, p in params.items()}
    for name, want in zoo_per_sample_grads(zoo).items():
        torch.testing.assert_close(want, grads[name])
    for name, want in ggn_diag(zoo).items():
        torch.testing.assert_close(want, ggn[name])
    for name, want in hessian_diag_entries(zoo, picks).items():
        torch.testing.assert_close(want, hess[name].flatten())
    torch.testing.assert_close(
        ggn_block(zoo, "0.weight"), oracles.ggn_block(zoo.model, lossfunc, zoo.x, zoo.y, "0.weight")
    )
    zoo = build("mobilenet_v3_small")  # its Hessian oracle swaps Hardsigmoid for an equal function
    with torch.no_grad():
        torch.testing.assert_close(zoo.logits(_twice_differentiable(zoo.model)), zoo.logits())

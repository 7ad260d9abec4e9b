"""One Parameter object owned by several modules (GPT-2's tied embedding and output layer, a
shared projection): every extension stores the quantity of the tied model, the sum over the
uses (per-sample gradients ``sum_u J_u^T g_u``, the curvature of ``sum_u J_u``, the Hessian's
blocks between a use and the uses its input depends on)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from backpack import backpack, extend
from backpack.custom_module.branching import SumModule
from backpack.custom_module.permute import Permute
from backpack.extensions import (
    GGNMP,
    HMP,
    KFAC,
    KFLR,
    KFRA,
    PCHMP,
    BatchDiagGGNExact,
    BatchDiagGGNMC,
    BatchDiagHessian,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    SqrtGGNExact,
    SqrtGGNMC,
    SumGradSquared,
    Variance,
)
from tests.cases import LAYER_CASES  # noqa: F401  (imports cases_attention without a cycle)
from tests.cases_attention import Attend
from tests.oracles import (
    assert_first_order,
    assert_memory_flat,
    ggn_block,
    ggn_diag,
    hessian_block,
    hessian_diag,
    live_records,
    per_sample_grads,
)

D = torch.float64
V, E, T = 5, 3, 2  # vocabulary, width, tokens


class TinyGPT(nn.Module):
    """Embedding -> Linear/Tanh/Linear -> output layer whose weight is the embedding's; the
    logits ``[N, V, T]`` for a cross-entropy per token. The output layer's input depends on the
    tied weight through the embedding (Hessian blocks between the uses)."""

    in_shape = "tokens"

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(V, E)
        self.block = nn.Sequential(nn.Linear(E, E), nn.Tanh(), nn.Linear(E, E))
        self.lm_head = nn.Linear(E, V, bias=False)
        self.lm_head.weight = self.wte.weight
        self.perm = Permute(0, 2, 1)

    def forward(self, idx):
        return self.perm(self.lm_head(self.block(self.wte(idx))))


class Chain(nn.Module):
    """``second(tanh(first(x)))`` with ``second.weight is first.weight`` (own biases)."""

    in_shape = (4,)

    def __init__(self):
        super().__init__()
        self.first, self.act, self.second = nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)
        self.second.weight = self.first.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.second(self.act(self.first(x))))


class Parallel(nn.Module):
    """Two Linear layers sharing weight and bias on two views, their codes summed."""

    in_shape = (4,)

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(4, 5)
        self.b.weight, self.b.bias = self.a.weight, self.a.bias
        self.act, self.add, self.head = nn.Sigmoid(), SumModule(), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.add(self.act(self.a(x)), self.act(self.b(x.flip(1)))))


class OneModuleTwice(Parallel):
    """``Parallel`` with one module called twice (module reuse): the same quantities."""

    def forward(self, x):
        return self.head(self.add(self.act(self.a(x)), self.act(self.a(x.flip(1)))))


class AttentionTied(nn.Module):
    """A Linear whose weight is ``mha.out_proj.weight``: local names ``out_proj.weight`` (the
    attention's rule) and ``weight`` (the Linear's) of one Parameter."""

    in_shape = (2, 4)

    def __init__(self):
        super().__init__()
        self.attend = Attend(nn.MultiheadAttention(4, 2, batch_first=True))
        self.proj = nn.Linear(4, 4)
        self.proj.weight = self.attend.mha.out_proj.weight
        self.flat, self.head = nn.Flatten(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.flat(self.proj(self.attend(x))))


MODELS = [TinyGPT, Chain, Parallel]
FIRST = [BatchGrad, BatchL2Grad, SumGradSquared, Variance]
DIAG = [DiagGGNExact, BatchDiagGGNExact, DiagHessian, BatchDiagHessian]


def _problem(model_cls, n: int = 3, reduction: str = "mean"):
    torch.manual_seed(0)
    model = model_cls().to(D)
    if model_cls.in_shape == "tokens":
        x, y = torch.randint(0, V, (n, T)), torch.randint(0, V, (n, T))
    else:
        x, y = torch.randn(n, *model_cls.in_shape, dtype=D), torch.randint(0, 3, (n,))
    return model, extend(nn.CrossEntropyLoss(reduction=reduction)), x, y


def _run(model, lossfunc, x, y, *exts, **kwargs):
    with backpack(*exts, **kwargs):
        lossfunc(model(x), y).backward()


def _tied(model) -> list[nn.Parameter]:
    """The parameters owned by several modules."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [p for p in model.parameters() if owners[id(p)] > 1]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("model_cls", MODELS + [AttentionTied], ids=lambda c: c.__name__)
def test_first_order(model_cls, reduction):
    model, lossfunc, x, y = _problem(model_cls, reduction=reduction)
    assert _tied(model)
    ref = per_sample_grads(model, lossfunc, x, y)
    _run(extend(model), lossfunc, x, y, *(ext() for ext in FIRST))
    params = dict(model.named_parameters())  # a tied parameter once
    for p in params.values():
        torch.testing.assert_close(p.grad_batch.sum(0), p.grad)
    assert_first_order(params, ref)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("model_cls", MODELS, ids=lambda c: c.__name__)
def test_diagonals(model_cls, reduction):
    """GGN and Hessian diagonals of the tied parameter's whole block (cross terms between the
    uses; for ``TinyGPT`` and ``Chain`` the Hessian's mixed terms between dependent uses)."""
    model, lossfunc, x, y = _problem(model_cls, reduction=reduction)
    ggn_n = ggn_diag(model, lossfunc, x, y, per_sample=True)
    hess_n = hessian_diag(model, lossfunc, x, y, per_sample=True)
    _run(extend(model), lossfunc, x, y, *(ext() for ext in DIAG))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_ggn_exact, ggn_n[name].sum(0), msg=name)
        torch.testing.assert_close(p.diag_ggn_exact_batch, ggn_n[name], msg=name)
        torch.testing.assert_close(p.diag_h, hess_n[name].sum(0), msg=name)
        torch.testing.assert_close(p.diag_h_batch, hess_n[name], msg=name)


@pytest.mark.parametrize("model_cls", MODELS, ids=lambda c: c.__name__)
def test_subsampling(model_cls):
    model, lossfunc, x, y = _problem(model_cls)
    idx = [2, 0]
    ref = per_sample_grads(model, lossfunc, x, y)
    ggn_n = ggn_diag(model, lossfunc, x, y, per_sample=True)
    hess_n = hessian_diag(model, lossfunc, x, y, per_sample=True)
    exts = [ext(subsampling=idx) for ext in FIRST + DIAG]
    _run(extend(model), lossfunc, x, y, *exts)
    params = dict(model.named_parameters())
    assert_first_order(params, {k: g[idx] for k, g in ref.items()})
    for name, p in params.items():
        torch.testing.assert_close(p.diag_ggn_exact, ggn_n[name][idx].sum(0))
        torch.testing.assert_close(p.diag_ggn_exact_batch, ggn_n[name][idx])
        torch.testing.assert_close(p.diag_h, hess_n[name][idx].sum(0))
        torch.testing.assert_close(p.diag_h_batch, hess_n[name][idx])


@pytest.mark.parametrize("model_cls", MODELS, ids=lambda c: c.__name__)
def test_sqrt_ggn_and_products_equal_the_blocks(model_cls):
    """SqrtGGNExact and GGNMP: the GGN block; HMP: the Hessian block (mixed terms included);
    PCHMP, SqrtGGNMC: shapes."""
    model, lossfunc, x, y = _problem(model_cls)
    exts = [SqrtGGNExact(), SqrtGGNMC(mc_samples=2), GGNMP(), HMP(), PCHMP(modify="abs")]
    _run(extend(model), lossfunc, x, y, *exts)
    for name, p in model.named_parameters():
        ggn, hess = (
            ggn_block(model, lossfunc, x, y, name),
            hessian_block(model, lossfunc, x, y, name),
        )
        v = p.sqrt_ggn_exact.flatten(2)
        torch.testing.assert_close(torch.einsum("cnp,cnq->pq", v, v), ggn, msg=name)
        assert p.sqrt_ggn_mc.shape == (2, x.shape[0], *p.shape)
        mat = torch.randn(2, *p.shape, dtype=D)
        torch.testing.assert_close(p.ggnmp(mat).flatten(1), mat.flatten(1) @ ggn, msg=name)
        torch.testing.assert_close(p.hmp(mat).flatten(1), mat.flatten(1) @ hess, msg=name)
        assert p.pchmp(mat).shape == mat.shape


def test_tied_modules_equal_one_module_called_twice():
    """Two modules sharing weight and bias give what one module called twice gives, for every
    extension (MC ones with the same seed, Kronecker factors: G summed, A averaged)."""
    exts = [
        *FIRST, *DIAG, DiagGGNMC, BatchDiagGGNMC, SqrtGGNExact, KFAC, KFLR, KFRA,
    ]  # fmt: skip
    results = []
    for model_cls in (Parallel, OneModuleTwice):
        model, lossfunc, x, y = _problem(model_cls)
        torch.manual_seed(1)
        _run(extend(model), lossfunc, x, y, *(ext() for ext in exts))
        results.append({(n, e().savefield): getattr(p, e().savefield)
                        for n, p in model.named_parameters() for e in exts})  # fmt: skip
    for key, value in results[0].items():
        torch.testing.assert_close(value, results[1][key], msg=str(key))


@pytest.mark.parametrize("model_cls", [Chain, Parallel], ids=lambda c: c.__name__)
def test_kronecker_factors_of_linear_layers_sharing_a_weight(model_cls):
    """``[G, A]`` of the tied weight: shapes, symmetric positive semi-definite; a tied bias
    keeps its exact GGN block (KFLR)."""
    model, lossfunc, x, y = _problem(model_cls)
    _run(extend(model), lossfunc, x, y, KFAC(), KFLR(), KFRA())
    for name, p in model.named_parameters():
        for field in ("kfac", "kflr", "kfra"):
            factors = getattr(p, field)
            sizes = [p.shape[0]] if p.dim() == 1 else [p.shape[0], p[0].numel()]
            assert [f.shape for f in factors] == [(s, s) for s in sizes]
            for f in factors:
                torch.testing.assert_close(f, f.T)
                assert torch.linalg.eigvalsh(f).min() > -1e-10
        if p.dim() == 1:
            torch.testing.assert_close(p.kflr[0], ggn_block(model, lossfunc, x, y, name))


@pytest.mark.parametrize("ext", [KFAC, KFLR, KFRA])
def test_kronecker_factors_of_embedding_tied_to_output_layer_raise(ext):
    model, lossfunc, x, y = _problem(TinyGPT)
    with pytest.raises(NotImplementedError, match="Embedding.*tied to .*input-side factor"):
        _run(extend(model), lossfunc, x, y, ext())


@pytest.mark.parametrize("model_cls", MODELS, ids=lambda c: c.__name__)
def test_no_false_warning_of_gradient_outside_the_path(model_cls):
    """The watch sums the path gradients of every use; a regulariser still warns."""
    model, lossfunc, x, y = _problem(model_cls)
    extend(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(model, lossfunc, x, y, DiagGGNExact())
    model.zero_grad()
    tied = _tied(model)[0]
    with backpack(DiagGGNExact()), pytest.warns(UserWarning, match="outside the path"):
        (lossfunc(model(x), y) + tied.square().sum()).backward()


def test_deepcopy_keeps_the_tie():
    model, lossfunc, x, y = _problem(TinyGPT)
    clone = copy.deepcopy(extend(model))
    assert clone.wte.__dict__["_backpack_calls"] is clone.lm_head.__dict__["_backpack_calls"]
    assert clone.wte.__dict__["_backpack_calls"] is not model.wte.__dict__["_backpack_calls"]
    _run(clone, lossfunc, x, y, BatchGrad())
    torch.testing.assert_close(clone.wte.weight.grad_batch.sum(0), clone.wte.weight.grad)


def test_extension_hook_runs_once_per_module():
    model, lossfunc, x, y = _problem(TinyGPT)
    seen = []
    _run(extend(model), lossfunc, x, y, BatchGrad(), DiagGGNExact(), extension_hook=seen.append)
    for m in (model.wte, model.lm_head, model.block[0]):
        assert seen.count(m) == 1


def test_untied_modules_keep_their_own_records():
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3)).to(D))
    loss = nn.CrossEntropyLoss()(model(torch.randn(2, 4, dtype=D)), torch.tensor([0, 1]))
    assert model[0].__dict__["_backpack_calls"] is not model[2].__dict__["_backpack_calls"]
    assert not any(r.shared for r in live_records())
    del loss


def test_tie_after_extend_needs_extend_again():
    """Weights tied after ``extend``: ``extend`` again groups them."""
    model, lossfunc, x, y = _problem(Chain)
    model.second.weight = nn.Parameter(model.first.weight.detach().clone())
    extend(model)
    model.second.weight = model.first.weight
    extend(model)
    ref = per_sample_grads(model, lossfunc, x, y)
    _run(model, lossfunc, x, y, BatchGrad())
    torch.testing.assert_close(model.first.weight.grad_batch, ref["first.weight"])


def test_memory_flat_and_nothing_left_on_modules():
    model, lossfunc, x, y = _problem(TinyGPT, n=4)
    extend(model)
    exts = [BatchGrad(), Variance(), DiagGGNExact(), DiagHessian()]
    before = {m: set(m.__dict__) for m in model.modules()}

    def step(i):
        model.zero_grad()
        _run(model, lossfunc, x, y, *(exts if i % 2 else exts[:2]))

    assert_memory_flat(step, 10)
    for m in model.modules():
        assert set(m.__dict__) <= before[m] | {"_backpack_calls"}
        assert not m.__dict__.get("_backpack_calls")


def test_untie_after_extend_and_extend_again():
    """Weights untied after ``extend``: ``extend`` again gives each module its own records."""
    model, lossfunc, x, y = _problem(Chain)
    extend(model)
    model.second.weight = nn.Parameter(model.first.weight.detach().clone())
    extend(model)
    assert model.first.__dict__["_backpack_calls"] is not model.second.__dict__["_backpack_calls"]
    loss = lossfunc(model(x), y)
    assert not any(r.shared for r in live_records())
    ref = per_sample_grads(model, lossfunc, x, y)
    with backpack(BatchGrad()):
        loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, ref[name])


def test_modules_extended_separately_are_tied():
    """The owners of a parameter are known across ``extend`` calls (any hooked module)."""
    model, lossfunc, x, y = _problem(Parallel)
    for m in (model.a, model.b, model.act, model.add, model.head):
        extend(m)
    ref = per_sample_grads(model, lossfunc, x, y)
    _run(model, lossfunc, x, y, BatchGrad())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, ref[name])

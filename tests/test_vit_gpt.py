"""A ViT-style classifier and a GPT-style language model (cross-entropy over positions), extended
with ``use_converter=True``: every extension against the float64 oracles.

The oracles run the user's (unconverted) model under torch.func with SDPA's math kernel: the
fused CPU attention kernel has neither forward-mode AD (Hessians) nor a batching rule.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from backpack import backpack, extend
from backpack.custom_module.position import PositionalEmbedding
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
from tests.cases import LayerCase, problems
from tests.models import GPT, ViT
from tests.oracles import (
    assert_first_order_and_diagonals,
    assert_kfra_exact_at_batch_one,
    ggn_block,
    ggn_diag,
    hessian_block,
    hessian_diag,
    per_sample_grads,
)

D, N = torch.float64, 3
MODELS = ["vit", "gpt"]


def _build(name: str, n: int = N):
    """(model in eval mode, loss, input, target), float64, seeded; GPT: targets per position."""
    torch.manual_seed(0)
    if name == "vit":
        model, x = ViT(), torch.randn(n, 2, 4, 4, dtype=D)
        y = torch.randint(0, 3, (n,))
    else:
        model, x = GPT(), torch.randint(0, 7, (n, 4))
        y = torch.randint(0, 7, (n, 4))
    return model.to(D).eval(), nn.CrossEntropyLoss(), x, y


def _run(name: str, exts: list, trainable=lambda m: True, n: int = N):
    """One extended backward pass through the converted model; parameters of modules for which
    ``trainable(module)`` is False are frozen."""
    model, lossfunc, x, y = _build(name, n)
    for m in model.modules():
        if not trainable(m):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
    converted = extend(model, use_converter=True)
    torch.manual_seed(1)  # MC extensions
    with backpack(*exts):
        extend(lossfunc)(converted(x), y).backward()
    return model, converted, lossfunc, x, y


@pytest.mark.parametrize("name", MODELS)
def test_conversion_keeps_outputs_and_parameters(name):
    model, _, x, _ = _build(name)
    converted = extend(model, use_converter=True)
    torch.testing.assert_close(converted(x), model(x))
    params = dict(model.named_parameters())
    assert all(p is params[k] for k, p in converted.named_parameters())
    assert len(params) == len(list(converted.parameters()))


@pytest.mark.parametrize("name", MODELS)
def test_first_order_and_diagonals_match_oracles(name):
    exts = [BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance(), DiagGGNExact()]
    exts += [BatchDiagGGNExact(), DiagHessian(), BatchDiagHessian()]
    exts += [DiagGGNMC(mc_samples=2), BatchDiagGGNMC(mc_samples=2)]
    model, converted, lossfunc, x, y = _run(name, exts)
    params = dict(converted.named_parameters())
    assert_first_order_and_diagonals(params, model, lossfunc, x, y)
    for p in params.values():
        assert p.diag_ggn_mc_batch.shape == (N, *p.shape)
        assert (p.diag_ggn_mc >= 0).all()


@pytest.mark.parametrize("name", MODELS)
def test_sqrt_ggn_and_products_match_dense_blocks(name):
    """Square roots, GGNMP and HMP against the dense blocks; PCHMP (attention's own residuals
    modified too) on every parameter, equal to the GGN block for the head."""
    exts = [SqrtGGNExact(), SqrtGGNMC(mc_samples=2), GGNMP(), HMP(), PCHMP(modify="abs")]
    model, converted, lossfunc, x, y = _run(name, exts)
    torch.manual_seed(2)
    for key, p in converted.named_parameters():
        with sdpa_kernel(SDPBackend.MATH):
            ggn = ggn_block(model, lossfunc, x, y, key)
        flat = p.sqrt_ggn_exact.reshape(-1, p.numel())
        torch.testing.assert_close(flat.T @ flat, ggn)
        assert p.sqrt_ggn_mc.shape == (2, N, *p.shape)
        mat = torch.randn(2, *p.shape, dtype=D)
        torch.testing.assert_close(p.ggnmp(mat).flatten(1), (ggn @ mat.flatten(1).T).T)
        with sdpa_kernel(SDPBackend.MATH):
            hess = hessian_block(model, lossfunc, x, y, key)
        torch.testing.assert_close(p.hmp(mat).flatten(1), (hess @ mat.flatten(1).T).T)
        assert p.pchmp(mat).shape == mat.shape
        if key.startswith("head."):
            torch.testing.assert_close(p.pchmp(mat).flatten(1), (ggn @ mat.flatten(1).T).T)


def _linear_form(m: nn.Module) -> bool:
    return type(m) in (nn.Linear, nn.Conv2d)  # not MultiheadAttention's out_proj


def _check_factors(p: torch.Tensor, factors: list[torch.Tensor]) -> None:
    """Square, symmetric, positive semi-definite factors whose sizes multiply to ``p.numel()``."""
    assert torch.Size([f.shape[0] for f in factors]).numel() == p.numel()
    for f in factors:
        assert f.shape[0] == f.shape[1]
        torch.testing.assert_close(f, f.T)
        assert torch.linalg.eigvalsh(f).min() >= -1e-10 * f.abs().max()


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", MODELS)
def test_kronecker_factors_of_linear_and_conv_weights(name, approx):
    """KFAC/KFLR on the Linear (inputs ``[n, L, E]``: both approximations) and Conv2d layers;
    KFLR's bias factor is the bias's exact GGN block; ``A`` follows ``kfac_approx``."""
    inputs = {}

    def keep_input(module, args, out):
        inputs[module] = args[0].detach()

    exts = [KFAC(kfac_approx=approx), KFLR(kfac_approx=approx)]
    model, converted, lossfunc, x, y = _run(name, exts, _linear_form)
    for m in converted.modules():
        if _linear_form(m):
            m.register_forward_hook(keep_input)
    converted(x)  # the layers' inputs, for ``A``
    for key, p in converted.named_parameters():
        if not p.requires_grad:
            continue
        for factors in (p.kfac, p.kflr):
            _check_factors(p, factors)
        if key.endswith("bias"):
            with sdpa_kernel(SDPBackend.MATH):
                torch.testing.assert_close(p.kflr[0], ggn_block(model, lossfunc, x, y, key))
    for m, a in inputs.items():
        if type(m) is nn.Linear:
            a = a.reshape(N, -1, a.shape[-1])  # [n, s, i]
            if approx == "reduce":
                a = a.mean(1, keepdim=True)
            a = a.flatten(0, 1)
            torch.testing.assert_close(m.weight.kflr[1], a.T @ a / a.shape[0])
            torch.testing.assert_close(m.weight.kfac[1], m.weight.kflr[1])


@pytest.mark.parametrize("name", MODELS)
def test_kronecker_factors_on_the_whole_model(name):
    """KFAC and KFLR on every parameter: Linear, conv and attention weights ``[G, A]``,
    embeddings ``[A, G]``, LayerNorm parameters and biases ``[G]`` (KFLR: their exact GGN
    block)."""
    model, converted, lossfunc, x, y = _run(name, [KFAC(), KFLR()])
    for key, p in converted.named_parameters():
        for factors in (p.kfac, p.kflr):
            _check_factors(p, factors)
        if len(p.kflr) == 1:
            with sdpa_kernel(SDPBackend.MATH):
                torch.testing.assert_close(p.kflr[0], ggn_block(model, lossfunc, x, y, key))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("name", MODELS)
def test_kfra_through_residuals_and_attention(name, n):
    """KFRA through the residual connections and the attention's shared query/key/value input:
    equal to KFLR at batch size one, symmetric PSD at batch size three."""
    _, converted, *_ = _run(name, [KFLR(), KFRA()], n=n)
    assert_kfra_exact_at_batch_one(dict(converted.named_parameters()), n)


POSITION_PROBLEMS = [
    p
    for p in problems(
        [
            LayerCase(  # 4 of 5 positions used: the last row gets no gradient
                "PositionalEmbedding",
                lambda: nn.Sequential(
                    PositionalEmbedding(5, 3), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)
                ),
                lambda n: torch.randn(n, 4, 3, dtype=D),
            )
        ]
    )
    if (p.reduction, p.n) in {("mean", 3), ("sum", 1)} and p.loss != "bce"
]


@pytest.mark.parametrize("problem", POSITION_PROBLEMS, ids=lambda p: p.id)
def test_positional_embedding_layer(problem):
    exts = [BatchGrad(), SumGradSquared(), DiagGGNExact(), BatchDiagGGNExact()]
    exts += [DiagHessian(), BatchDiagHessian(), SqrtGGNExact(), GGNMP()]
    model, lossfunc, x, y = problem.run(exts)
    grads = per_sample_grads(model, lossfunc, x, y)
    ggn = ggn_diag(model, lossfunc, x, y, per_sample=True)
    hess = hessian_diag(model, lossfunc, x, y, per_sample=True)
    pos = model[0].weight
    assert not pos.grad_batch[:, 4].any()
    for key, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, grads[key])
        torch.testing.assert_close(p.sum_grad_squared, grads[key].square().sum(0))
        torch.testing.assert_close(p.diag_ggn_exact_batch, ggn[key])
        torch.testing.assert_close(p.diag_ggn_exact, ggn[key].sum(0))
        torch.testing.assert_close(p.diag_h_batch, hess[key])
        torch.testing.assert_close(p.diag_h, hess[key].sum(0))
        block = ggn_block(model, lossfunc, x, y, key)
        flat = p.sqrt_ggn_exact.reshape(-1, p.numel())
        torch.testing.assert_close(flat.T @ flat, block)
        mat = torch.randn(2, *p.shape, dtype=D)
        torch.testing.assert_close(p.ggnmp(mat).flatten(1), (block @ mat.flatten(1).T).T)

"""Kronecker factors (KFAC, KFLR, KFRA, HBP) against exact GGN blocks and explicit formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from backpack import backpack, extend
from backpack.custom_module.branching import SumModule
from backpack.extensions import HBP, KFAC, KFLR, KFRA, DiagGGNExact
from backpack.extensions.curvature import Curvature
from backpack.extensions.secondorder.hbp.hbp_options import (
    BackpropStrategy,
    ExpectationApproximation,
    LossHessianStrategy,
)
from backpack.extensions.secondorder.kron import transposed_patches
from backpack.utils.kroneckers import kfacs_to_mat

D = torch.float64


def ggn_blocks(model, lossfunc, x, y):
    """name -> exact GGN block ``J^T H J`` ``[P, P]`` of each parameter."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    out = functional_call(model, params, (x,))
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    h = hessian(lambda o: lossfunc(o, y))(out).reshape(out.numel(), out.numel())
    blocks = {}
    for name, p in params.items():
        j = jac[name].reshape(out.numel(), p.numel())
        blocks[name] = j.T @ h @ j
    return blocks


def run(model, lossfunc, x, y, *exts):
    extend(model)
    extend(lossfunc)
    torch.manual_seed(1)
    with backpack(*exts):
        lossfunc(model(x), y).backward()
    return model


def check_exact(model, lossfunc, x, y, field, ext):
    run(model, lossfunc, x, y, ext)
    blocks = ggn_blocks(model, lossfunc, x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(kfacs_to_mat(getattr(p, field)), blocks[name])


def deep_linear(*extra):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(3, 2), nn.Flatten()).to(D)
    x = torch.randn(6, *extra, 4, dtype=D)
    return model, x, torch.randn(6, 2 * (extra[0] if extra else 1), dtype=D)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ext,field", [(KFLR, "kflr"), (KFRA, "kfra")])
def test_deep_linear_mse_exact(reduction, ext, field):
    """Constant Jacobians and loss Hessian: G ⊗ A is the exact GGN block (KFRA = KFLR here)."""
    model, x, y = deep_linear()
    check_exact(model, nn.MSELoss(reduction=reduction), x, y, field, ext())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_deep_linear_extra_dims_expand_exact(reduction):
    """Positions as extra samples: exact when every position meets the loss on its own."""
    model, x, y = deep_linear(3)
    check_exact(model, nn.MSELoss(reduction=reduction), x, y, "kflr", KFLR())


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_batch_size_one_exact(loss):
    """N = 1: the Linear weight's block is (sum_v b b^T) ⊗ x x^T, curved nets included."""
    torch.manual_seed(0)
    outputs = 1 if loss == "mse" else 3
    model = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, outputs)).to(D)
    x = torch.randn(1, 4, dtype=D)
    lossfunc = nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()
    y = torch.randn(1, 1, dtype=D) if loss == "mse" else torch.tensor([2])
    check_exact(model, lossfunc, x, y, "kflr", KFLR())


def curved(n=5, classes=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, classes)).to(D)
    return model, torch.randn(n, 4, dtype=D), torch.randint(0, classes, (n,))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bias_is_exact_block_and_a_is_input_second_moment(reduction):
    model, x, y = curved()
    lossfunc = nn.CrossEntropyLoss(reduction=reduction)
    run(model, lossfunc, x, y, KFLR(), KFAC(), KFRA())
    blocks = ggn_blocks(model, lossfunc, x, y)
    first = model[0]
    for field in ("kflr", "kfac", "kfra"):
        torch.testing.assert_close(getattr(first.weight, field)[1], x.T @ x / x.shape[0])
    for i in (0, 2):
        torch.testing.assert_close(model[i].bias.kflr[0], blocks[f"{i}.bias"])
        torch.testing.assert_close(model[i].weight.kflr[0], model[i].bias.kflr[0])


def test_kfac_converges_to_kflr():
    model, x, y = curved()
    run(model, nn.CrossEntropyLoss(), x, y, KFLR(), KFAC(mc_samples=40000))
    for p in model.parameters():
        for mc, exact in zip(p.kfac, p.kflr):
            torch.testing.assert_close(mc, exact, atol=0.03 * exact.abs().max(), rtol=0.05)


def test_kfra_recursion_through_curved_layer():
    """First layer: G = (1/N) sum_n D_n W^T (sum_m H_m) W D_n, D_n = diag(tanh'(z_n))."""
    model, x, y = curved()
    lossfunc = nn.CrossEntropyLoss(reduction="sum")
    run(model, lossfunc, x, y, KFRA())
    with torch.no_grad():
        z = model[0](x)
        p = model(x).softmax(1)
    h = torch.diag_embed(p) - torch.einsum("na,nb->nab", p, p)
    w = model[2].weight
    g_out = h.sum(0)
    torch.testing.assert_close(model[2].weight.kfra[0], g_out)
    d = 1 - z.tanh() ** 2
    expected = torch.einsum("na,ab,nb->ab", d, w.T @ g_out @ w, d) / x.shape[0]
    torch.testing.assert_close(model[0].weight.kfra[0], expected)


def test_kfra_single_linear_batch_one_equals_kflr():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).to(D)
    x, y = torch.randn(1, 4, dtype=D), torch.tensor([1])
    run(model, nn.CrossEntropyLoss(), x, y, KFLR(), KFRA())
    for p in model.parameters():
        for a, b in zip(p.kfra, p.kflr):
            torch.testing.assert_close(a, b)


def test_kfra_conv_flatten_linear_float64():
    """The original fails here in float64; the conv G sums the dense block over positions."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).to(
        D
    )
    x, y = torch.randn(4, 2, 5, 5, dtype=D), torch.randint(0, 3, (4,))
    run(model, nn.CrossEntropyLoss(), x, y, KFRA(), KFLR())
    conv = model[0]
    assert [f.shape for f in conv.weight.kfra] == [(3, 3), (8, 8)]
    torch.testing.assert_close(conv.weight.kfra[1], conv.weight.kflr[1])
    torch.testing.assert_close(conv.weight.kfra[0], conv.bias.kfra[0])


CONVS = [
    (nn.Conv1d(2, 3, 3, padding=1), (2, 6)),
    (nn.Conv2d(2, 3, (2, 3), stride=2), (2, 6, 5)),
    (nn.Conv3d(2, 3, 2), (2, 3, 4, 3)),
    (nn.Conv2d(4, 6, 3, groups=2), (4, 5, 5)),
    (nn.ConvTranspose1d(2, 3, 3, stride=2, output_padding=1), (2, 4)),
    (nn.ConvTranspose2d(4, 6, 3, groups=2, dilation=2), (4, 3, 4)),
    (nn.ConvTranspose3d(2, 3, 2), (2, 2, 3, 2)),
]


@pytest.mark.parametrize("conv,shape", CONVS, ids=lambda c: str(c)[:40])
def test_conv_layout(conv, shape):
    torch.manual_seed(0)
    transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
    model = nn.Sequential(conv, nn.Sigmoid(), nn.Flatten(), nn.LazyLinear(3)).to(D)
    x, y = torch.randn(3, *shape, dtype=D), torch.randint(0, 3, (3,))
    model(x)
    lossfunc = nn.CrossEntropyLoss()
    exts = (KFLR(), KFAC(), KFRA())
    if transposed:
        with pytest.warns(UserWarning, match=r"weight.transpose\(0, 1\)"):
            run(model, lossfunc, x, y, *exts)
    else:
        run(model, lossfunc, x, y, *exts)
    c_out, c_in, k = conv.out_channels, conv.in_channels, conv.weight[0, 0].numel()
    groups = conv.groups
    for field in ("kflr", "kfac", "kfra"):
        g, a = getattr(conv.weight, field)
        assert g.shape == (c_out, c_out) and a.shape == (c_in * k, c_in * k)
        (bias_g,) = getattr(conv.bias, field)
        torch.testing.assert_close(g, torch.block_diag(*_blocks(bias_g, groups)))
        torch.testing.assert_close(a, torch.block_diag(*_blocks(a, groups)))
    # bias G is the exact GGN block of the bias
    blocks = ggn_blocks(model, lossfunc, x, y)
    torch.testing.assert_close(conv.bias.kflr[0], blocks["0.bias"])
    # A = (1/N) sum over positions of the patches the (dense-equivalent) weight acts on
    if transposed:
        patches = transposed_patches(conv, x, model[0](x).shape[2:])
    elif isinstance(conv, nn.Conv2d):
        patches = nn.functional.unfold(
            x, conv.kernel_size, conv.dilation, conv.padding, conv.stride
        )
    else:
        return
    patches = patches.reshape(3, groups, -1, patches.shape[-1])
    a = torch.einsum("ngas,ngbs->gab", patches, patches) / 3
    torch.testing.assert_close(conv.weight.kflr[1], torch.block_diag(*a))


def _blocks(m, groups):
    b = m.shape[0] // groups
    return [m[i * b : (i + 1) * b, i * b : (i + 1) * b] for i in range(groups)]


def test_transposed_patches_give_the_weight_gradient():
    """sum_{n,t} g[n, o, t] patches[n, (i, k), t] is the gradient of weight.transpose(0, 1)."""
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(
        2, 3, (3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0), dilation=(1, 2)
    ).to(D)
    x = torch.randn(2, 2, 4, 3, dtype=D)
    out = conv(x)
    g = torch.randn_like(out)
    out.backward(g)
    patches = transposed_patches(conv, x, out.shape[2:])[:, 0]
    grad_t = torch.einsum("not,nat->oa", g.flatten(2), patches)
    torch.testing.assert_close(grad_t, conv.weight.grad.transpose(0, 1).reshape(3, -1))


def test_linear_extra_dims_reduce():
    model, x, y = deep_linear(3)
    run(model, nn.MSELoss(), x, y, KFLR(kfac_approx="reduce"))
    first = model[0]
    xbar = x.mean(1)
    torch.testing.assert_close(first.weight.kflr[1], xbar.T @ xbar / x.shape[0])
    run(model, nn.MSELoss(), x, y, KFLR())
    torch.testing.assert_close(first.weight.kflr[1], x.flatten(0, 1).T @ x.flatten(0, 1) / 18)


def test_kfra_linear_extra_dims_expand_equals_kflr():
    model, x, y = deep_linear(3)
    run(model, nn.MSELoss(), x, y, KFLR(), KFRA())
    for p in model.parameters():
        for a, b in zip(p.kfra, p.kflr):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("ext", [KFAC, KFLR, KFRA])
def test_unsupported_layers_raise(ext):
    model = nn.Sequential(nn.EmbeddingBag(7, 4, mode="max"), nn.Linear(4, 3)).to(D)
    with pytest.raises(NotImplementedError, match=r"KFAC/KFLR/KFRA.*EmbeddingBag.*mode='max'"):
        run(
            model,
            nn.CrossEntropyLoss(),
            torch.randint(0, 7, (3, 2)),
            torch.tensor([0, 1, 2]),
            ext(),
        )


def test_frozen_unsupported_layer_is_fine():
    model = nn.Sequential(nn.EmbeddingBag(7, 4, mode="max"), nn.Linear(4, 3)).to(D)
    model[0].requires_grad_(False)
    x, y = torch.randint(0, 7, (3, 2)), torch.tensor([0, 1, 2])
    run(model, nn.CrossEntropyLoss(), x, y, KFLR())
    assert len(model[1].weight.kflr) == 2


def test_hbp_presets_and_options():
    model, x, y = curved()
    hbp = HBP(Curvature.GGN, "exact", BackpropStrategy.SQRT, ExpectationApproximation.BOTEV_MARTENS)
    run(model, nn.CrossEntropyLoss(), x, y, hbp, KFLR(), DiagGGNExact())
    for p in model.parameters():
        for a, b in zip(p.hbp, p.kflr):
            torch.testing.assert_close(a, b)
    kfra = KFRA()
    assert isinstance(kfra, HBP) and kfra.loss_hessian_strategy == LossHessianStrategy.SUM
    assert KFAC(mc_samples=3).mc_samples == 3
    bad = [  # HBP with curv_type HESSIAN: tests/test_public_names.py
        (Curvature.GGN, "exact", "average", ExpectationApproximation.BOTEV_MARTENS),
        (Curvature.GGN, "sum", "sqrt", ExpectationApproximation.BOTEV_MARTENS),
        (Curvature.GGN, "exact", "sqrt", ExpectationApproximation.CHEN),
    ]
    for args in bad:
        with pytest.raises(NotImplementedError, match="not supported"):
            HBP(*args)
    with pytest.raises(ValueError, match="kfac_approx"):
        KFAC(kfac_approx="mean")


class _TwoInputs(nn.Module):
    """Two model inputs through their own Linear, summed: KFRA's paths never meet again."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.sum, self.c = nn.Linear(3, 4), nn.Linear(3, 4), SumModule(), nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.sum(self.a(x[:, :3]), self.b(x[:, 3:])))


def test_kfra_paths_ending_at_inputs_free_their_cross_blocks():
    """Batch size one: KFRA = KFLR; the cross blocks of paths that end at the model's inputs
    are dropped, so nothing accumulates over backward passes in one ``backpack`` block."""
    from backpack._state import STATE

    torch.manual_seed(0)
    model, lossfunc = _TwoInputs().to(D), nn.MSELoss()
    extend(model), extend(lossfunc)
    with backpack(KFLR(), KFRA()):
        for _ in range(3):
            x, y = torch.randn(1, 6, dtype=D), torch.randn(1, 4, dtype=D)
            lossfunc(model(x), y).backward()
            assert not STATE.flowing.get(("kfra_crosses",))
    for p in model.parameters():
        for a, b in zip(p.kfra, p.kflr):
            torch.testing.assert_close(a, b)

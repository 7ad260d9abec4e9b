"""backpack.hessianfree: R-op, L-op, Hessian- and GGN-vector products against torch.func, float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev, jvp, vjp

from backpack.hessianfree.ggnvp import ggn_vector_product, ggn_vector_product_from_plist
from backpack.hessianfree.hvp import hessian_vector_product
from backpack.hessianfree.lop import L_op, transposed_jacobian_vector_product
from backpack.hessianfree.rop import R_op, jacobian_vector_product

DT = torch.float64


def _two_in_two_out(a, b):
    return torch.tanh(a @ b), (a.sin() ** 2).sum(0) * b.sum()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 4, dtype=DT, generator=g, requires_grad=True)
    b = torch.randn(4, 2, dtype=DT, generator=g, requires_grad=True)
    return a, b


def _close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w)


def test_aliases():
    assert jacobian_vector_product is R_op
    assert transposed_jacobian_vector_product is L_op


def test_rop_matches_jvp():
    a, b = _inputs()
    va, vb = torch.randn_like(a), torch.randn_like(b)
    _, want = jvp(_two_in_two_out, (a.detach(), b.detach()), (va, vb))
    got = R_op(_two_in_two_out(a, b), [a, b], [va, vb])
    _close(got, want)
    assert all(not g.requires_grad for g in got)


def test_rop_single_tensors_return_tuple():
    a, b = _inputs()
    v = torch.randn_like(a)
    _, want = jvp(lambda x: torch.tanh(x @ b.detach()), (a.detach(),), (v,))
    got = R_op(torch.tanh(a @ b), a, v)
    assert isinstance(got, tuple)
    _close(got, (want,))


def test_lop_matches_vjp():
    a, b = _inputs()
    outs, pullback = vjp(_two_in_two_out, a.detach(), b.detach())
    ws = tuple(torch.randn_like(o) for o in outs)
    got = L_op(_two_in_two_out(a, b), (a, b), ws)
    _close(got, pullback(ws))
    single = L_op(_two_in_two_out(a, b)[0], a, ws[0])
    _close(single, (vjp(lambda x: _two_in_two_out(x, b.detach())[0], a.detach())[1](ws[0])[0],))


def test_rop_lop_keep_graph_and_differentiate_when_not_detached():
    """R_op of ∇f (not detached) is H v; retain_graph lets the products be repeated."""
    a, _ = _inputs()
    f = (a.sin() ** 3).sum()
    (g,) = torch.autograd.grad(f, a, create_graph=True)
    v = torch.randn_like(a)
    want = hessian(lambda x: (x.sin() ** 3).sum())(a.detach()).reshape(a.numel(), -1)
    want = (want @ v.flatten()).reshape_as(a)
    for _ in range(2):
        _close(R_op(g, a, v), (want,))
    (hv,) = R_op(g, a, v, detach=False)
    assert hv.requires_grad
    (vjv,) = L_op(g, a, v, detach=False)
    assert vjv.requires_grad
    _close((vjv,), (want,))  # H is symmetric


def test_unused_inputs_give_zeros():
    a, b = _inputs()
    c = torch.randn(5, dtype=DT, requires_grad=True)
    y = torch.tanh(a @ b)
    jv = R_op([y, c.detach() * 2.0], [a, b, c], [torch.zeros_like(a), torch.zeros_like(b), c])
    _close(jv, (torch.zeros_like(y), torch.zeros(5, dtype=DT)))
    _close(L_op(y, [a, c], torch.ones_like(y))[1:], (torch.zeros_like(c),))
    (hv_c,) = hessian_vector_product((a**3).sum() + c.sum(), [c], [torch.ones_like(c)])
    _close((hv_c,), (torch.zeros_like(c),))


def test_hvp_matches_hessian():
    a, b = _inputs()

    def f(x, y):
        return (torch.tanh(x @ y) ** 2).sum() + (x.cos() * x).sum()

    v = (torch.randn_like(a), torch.randn_like(b))
    hess = hessian(f, argnums=(0, 1))(a.detach(), b.detach())
    want = tuple(
        sum(hess[i][j].reshape(p.numel(), -1) @ v[j].flatten() for j in range(2)).reshape_as(p)
        for i, p in enumerate((a, b))
    )
    loss = f(a, b)
    got = hessian_vector_product(loss, [a, b], list(v))
    assert isinstance(got, tuple)
    _close(got, want)
    grad_params = torch.autograd.grad(loss, [a, b], create_graph=True)
    for _ in range(2):  # reusing grad_params, as CG does
        _close(hessian_vector_product(loss, [a, b], v, grad_params=grad_params), want)
    assert all(not h.requires_grad for h in got)
    assert all(h.requires_grad for h in hessian_vector_product(f(a, b), [a, b], v, detach=False))


@pytest.mark.parametrize(
    "call",
    [
        lambda a, b, f: hessian_vector_product(f, [a, b], [torch.zeros_like(a)]),
        lambda a, b, f: hessian_vector_product(f, [a, b], [torch.zeros_like(a), torch.zeros(3)]),
        lambda a, b, f: hessian_vector_product(
            f, [a, b], [torch.zeros_like(a), torch.zeros_like(b)], grad_params=[a]
        ),
        lambda a, b, f: R_op(f, [a, b], [torch.zeros_like(b), torch.zeros_like(a)]),
        lambda a, b, f: L_op(f, [a, b], torch.zeros(2)),
    ],
    ids=["hvp-length", "hvp-shape", "hvp-grad-params", "rop-shape", "lop-shape"],
)
def test_mismatch_raises_value_error(call):
    a, b = _inputs()
    with pytest.raises(ValueError, match="shape|as many"):
        call(a, b, (a @ b).pow(2).sum())


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


@pytest.mark.parametrize(
    "lossfunc, target",
    [
        (nn.CrossEntropyLoss(), torch.tensor([0, 2, 1, 2, 0, 1])),
        (nn.MSELoss(), torch.randn(6, 3, dtype=DT, generator=torch.Generator().manual_seed(1))),
    ],
    ids=["ce", "mse"],
)
def test_ggnvp_matches_explicit_ggn(lossfunc, target):
    model = _mlp()
    model[0].bias.requires_grad_(False)  # frozen parameters are left out
    x = torch.randn(6, 4, dtype=DT)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters()}
    out = model(x)

    def net(*trainable):
        return functional_call(model, {**params, **dict(zip(names, trainable))}, (x,))

    jac = jacrev(net, argnums=tuple(range(len(names))))(*(params[n] for n in names))
    jac = torch.cat([j.reshape(out.numel(), -1) for j in jac], dim=1)
    hess = hessian(lambda o: lossfunc(o, target))(out.detach()).reshape(out.numel(), -1)
    ggn = jac.T @ hess @ jac

    v = [torch.randn_like(params[n]) for n in names]
    want = ggn @ torch.cat([t.flatten() for t in v])
    loss = lossfunc(out, target)
    for _ in range(2):  # the graph is kept for repeated products
        got = ggn_vector_product(loss, out, model, v)
        assert isinstance(got, tuple) and len(got) == len(names)
        torch.testing.assert_close(torch.cat([g.flatten() for g in got]), want)


def test_ggnvp_from_plist_unused_parameter_gives_zeros():
    model = _mlp()
    unused = torch.randn(7, dtype=DT, requires_grad=True)
    x = torch.randn(6, 4, dtype=DT)
    out = model(x)
    loss = nn.MSELoss()(out, torch.zeros_like(out))
    w = model[2].weight
    v = [torch.randn_like(w), torch.randn_like(unused)]
    got = ggn_vector_product_from_plist(loss, out, [w, unused], v)
    _close(got[1:], (torch.zeros_like(unused),))
    (alone,) = ggn_vector_product_from_plist(loss, out, [w], v[:1])
    _close(got[:1], (alone,))

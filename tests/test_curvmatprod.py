"""Block curvature-matrix products (HMP, GGNMP, PCHMP) against dense float64 blocks."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev

from backpack import backpack, disable, extend
from backpack.custom_module.reduce_tuple import ReduceTuple
from backpack.extensions import GGNMP, HMP, PCHMP
from tests.cases import CHAIN_CASES, SECOND_ORDER_GAPS, problems
from tests.oracles import ggn_block
from tests.oracles import hessian_block as full_hessian_block

# every chain (MLPs, conv nets, BatchNorm, Embedding); CE mean N=3 and MSE sum N=1, plus both
# reductions of both losses on the two MLPs
PROBLEMS = [
    p
    for p in problems(CHAIN_CASES)
    if (p.loss, p.reduction, p.n) in {("ce", "mean", 3), ("mse", "sum", 1)}
    or (p.case.name in ("Linear-Sigmoid-Linear", "Linear-ReLU-Linear") and p.loss != "bce")
]
EXTS = [HMP(), GGNMP(), PCHMP(modify="clip"), PCHMP(savefield="pchmp_abs", modify="abs")]
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU, nn.LogSigmoid)


def _layer_forward(layers: list[nn.Module], k: int, pname: str):
    """``p -> (inputs of the elementwise layers after layer k, output)`` with layer k's ``pname``
    set to ``p``."""

    def forward(p: Tensor, x: Tensor) -> tuple[list[Tensor], Tensor]:
        acts = []
        for i, layer in enumerate(layers):
            if i > k and isinstance(layer, ELEMENTWISE):
                acts.append(x)
                x = x.clone()  # an in-place activation would overwrite the recorded input
            x = functional_call(layer, {pname: p}, (x,)) if i == k else layer(x)
        return acts, x

    return forward


def hessian_block(
    model: nn.Module, lossfunc: nn.Module, x: Tensor, y: Tensor, name: str, modify=None
):
    """The Hessian block ``[p, p]`` of parameter ``name`` of a Sequential model, assembled as
    ``J^T H_loss J + sum_m J_m^T diag(modify(f_m'' g_m)) J_m`` over its elementwise layers ``m``;
    without ``modify`` directly by ``torch.func.hessian``."""
    layers = list(model)
    k, pname = name.split(".")
    k = int(k)
    p = getattr(layers[k], pname).detach()
    forward = _layer_forward(layers, k, pname)
    after = [i for i in range(len(layers)) if isinstance(layers[i], ELEMENTWISE) and i > k]
    if modify is None:
        return hessian(lambda q: lossfunc(forward(q, x)[1], y))(p).reshape(p.numel(), p.numel())
    acts, out = forward(p, x)
    j_out = jacrev(lambda q: forward(q, x)[1])(p).reshape(out.numel(), -1)
    h_loss = hessian(lambda o: lossfunc(o, y))(out).reshape(out.numel(), out.numel())
    block = j_out.T @ h_loss @ j_out
    for i, (m, a) in enumerate(zip(after, acts)):
        act, rest = layers[m], nn.Sequential(*layers[m + 1 :])
        g = grad(lambda t: lossfunc(rest(t), y))(act(a.clone()))  # w.r.t. the layer's output
        d2 = grad(lambda t: grad(lambda u: act(u.clone()).sum())(t).sum())(a)  # f'' elementwise
        j_m = jacrev(lambda q, i=i: forward(q, x)[0][i])(p).reshape(a.numel(), -1)
        block = block + j_m.T @ (modify((d2 * g).flatten())[:, None] * j_m)
    return block


def _check(model, lossfunc, x, y, mats):
    """Every stored product equals the dense block times ``mats`` (and keeps no graph)."""
    with disable():
        for name, p in model.named_parameters():
            mat = mats[name]
            flat = mat.flatten(1).T
            blocks = {
                "ggnmp": ggn_block(model, lossfunc, x, y, name),
                "hmp": hessian_block(model, lossfunc, x, y, name),
                "pchmp": hessian_block(
                    model, lossfunc, x, y, name, modify=lambda r: r.clamp(min=0)
                ),
                "pchmp_abs": hessian_block(model, lossfunc, x, y, name, modify=torch.abs),
            }
            for field, block in blocks.items():
                result = getattr(p, field)(mat)
                assert not result.requires_grad
                torch.testing.assert_close(result, (block @ flat).T.reshape(mat.shape))


def _mats(model: nn.Module) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        n: torch.randn(3, *p.shape, generator=gen, dtype=p.dtype).to(p.device)
        for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.id)
def test_products_match_dense_blocks(problem):
    problem.skip_gaps(SECOND_ORDER_GAPS)
    model, lossfunc, x, y = problem.run(EXTS)
    _check(model, lossfunc, x, y, _mats(model))


@pytest.mark.parametrize(
    "name", ["Linear-Sigmoid-Linear-ce-mean-N3", "Conv2d-AvgPool2d-Tanh-mse-sum-N1"]
)
def test_products_survive_later_backward(name):
    """Closures hold their own record: an unrelated forward/backward afterwards changes nothing."""
    problem = next(p for p in PROBLEMS if p.id == name)
    model, lossfunc, x, y = problem.run(EXTS)
    lossfunc(model(x + 1), y).backward()  # without backpack: frees that pass's records
    with backpack(HMP(savefield="other")):
        lossfunc(model(2 * x), y).backward()
    _check(model, lossfunc, x, y, _mats(model))


def test_piecewise_linear_net_all_products_agree():
    """No curved layer: Hessian, GGN and positive-curvature Hessian blocks coincide."""
    problem = next(p for p in PROBLEMS if p.id == "Linear-ReLU-Linear-ce-sum-N1")
    model, *_ = problem.run(EXTS)
    for name, p in model.named_parameters():
        mat = _mats(model)[name]
        ggn = p.ggnmp(mat)
        for field in ("hmp", "pchmp", "pchmp_abs"):
            torch.testing.assert_close(getattr(p, field)(mat), ggn)


def test_pchmp_rejects_unknown_modify():
    with pytest.raises(ValueError, match="clip"):
        PCHMP(modify="square")


def test_backpack_import_path():
    from backpack.extensions.curvmatprod import GGNMP as G
    from backpack.extensions.curvmatprod import HMP as H
    from backpack.extensions.curvmatprod import PCHMP as P

    assert (G, H, P) == (GGNMP, HMP, PCHMP)


@pytest.mark.parametrize("modify", ["clip", "abs"])
def test_pchmp_modifies_the_own_residual_of_parameters_the_output_is_curved_in(modify, monkeypatch):
    """LSTM -> last step -> Linear: the LSTM weights' block is ``GGN + m(H - GGN)`` with ``m``
    clipping (or taking the absolute value of) the eigenvalues of their own residual; over
    ``PCHMP.DENSE_LIMIT`` entries it raises."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 2, batch_first=True).double()
    model = nn.Sequential(lstm, ReduceTuple(0), nn.Flatten(), nn.Linear(8, 3)).double()
    x, y = torch.randn(2, 4, 3, dtype=torch.float64), torch.tensor([0, 2])
    model, lossfunc = extend(model), extend(nn.CrossEntropyLoss())
    with backpack(PCHMP(modify=modify)):
        lossfunc(model(x), y).backward()
    for name, p in lstm.named_parameters():
        ggn = ggn_block(model, lossfunc, x, y, f"0.{name}")
        hess = full_hessian_block(model, lossfunc, x, y, f"0.{name}")
        evals, evecs = torch.linalg.eigh(hess - ggn)
        evals = evals.clamp(min=0) if modify == "clip" else evals.abs()
        ref = ggn + (evecs * evals) @ evecs.T
        mat = torch.randn(2, *p.shape, dtype=torch.float64)
        torch.testing.assert_close(p.pchmp(mat).flatten(1), mat.flatten(1) @ ref)
    monkeypatch.setattr(PCHMP, "DENSE_LIMIT", 10)
    with pytest.raises(NotImplementedError, match=r"PCHMP: the output of LSTM.*weight_ih_l0"):
        with backpack(PCHMP()):
            lossfunc(model(x), y).backward()

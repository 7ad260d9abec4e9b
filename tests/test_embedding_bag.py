"""``nn.EmbeddingBag``: every option (mode, 2-D input or offsets, per_sample_weights,
padding_idx, scale_grad_by_freq, include_last_offset) against per-bag oracles.

The second-order oracles (and the ``scale_grad_by_freq`` one) use ``_emulate``, the layer rebuilt
from ``F.embedding`` and segment reductions: torch has no double backward for ``embedding_bag``, and
its CPU backward divides by wrong counts under ``scale_grad_by_freq`` (pytorch/pytorch#190063).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

from backpack import backpack, extend
from backpack.extensions import (
    GGNMP,
    HMP,
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
V, DIM, C = 6, 3, 4
OFFSETS = [0, 2, 2, 4, 5]  # an empty bag, the last bag the longest; 9 indices in all
CONFIGS = {
    "sum-2d": (dict(mode="sum"), "2d", False),
    "sum-offsets-psw-padding": (dict(mode="sum", padding_idx=1), "1d", True),
    "sum-2d-psw-freq": (dict(mode="sum", scale_grad_by_freq=True), "2d", True),
    "sum-last-offset": (dict(mode="sum", include_last_offset=True), "1d", False),
    "mean-2d-padding": (dict(mode="mean", padding_idx=1), "2d", False),
    "mean-offsets-freq-padding": (
        dict(mode="mean", scale_grad_by_freq=True, padding_idx=-1),
        "1d",
        False,
    ),
    "max-2d": (dict(mode="max"), "2d", False),
    "max-offsets-padding": (dict(mode="max", padding_idx=1), "1d", False),
    "max-last-offset": (dict(mode="max", include_last_offset=True), "1d", False),
}
FIRST_ORDER = {
    BatchGrad: lambda gb: gb,
    BatchL2Grad: lambda gb: gb.flatten(1).square().sum(1),
    SumGradSquared: lambda gb: gb.square().sum(0),
    Variance: lambda gb: gb.var(0, unbiased=False),
}


def _problem(config: str, seed: int = 0):
    """Layer, input, keyword arguments, head (Tanh, Linear) and class targets of one config."""
    kw, form, psw = CONFIGS[config]
    torch.manual_seed(seed)
    emb = nn.EmbeddingBag(V, DIM, **kw).to(D)
    if form == "2d":
        x, args = torch.randint(0, V, (4, 3)), {}
        x[0, :2] = x[1, 0] = 1  # repeats in and across bags; bag 0 all padding where 1 is
        x[0, 2] = 1
    else:
        x = torch.randint(0, V, (9,))
        x[:2] = x[5] = 1
        last = [9] if emb.include_last_offset else []
        args = {"offsets": torch.tensor(OFFSETS + last)}
    if psw:
        args["per_sample_weights"] = torch.randn(x.shape, dtype=D)
    n = emb(x, **args).shape[0]
    head = nn.Sequential(nn.Tanh(), nn.Linear(DIM, C)).to(D)
    return emb, x, args, head, torch.randint(0, C, (n,))


def _bag_of_position(x: Tensor, args: dict) -> Tensor:
    if x.dim() == 2:
        return torch.arange(x.shape[0]).repeat_interleave(x.shape[1])
    starts = args["offsets"][: len(OFFSETS)]
    return torch.searchsorted(starts, torch.arange(x.numel()), right=True) - 1


def _emulate(emb: nn.EmbeddingBag, weight: Tensor, x: Tensor, args: dict) -> Tensor:
    """The layer's output from ``F.embedding`` and per-bag sums / maxima (``[n, D]``)."""
    bag, flat = _bag_of_position(x, args), x.flatten()
    n = x.shape[0] if x.dim() == 2 else len(OFFSETS)
    rows = F.embedding(flat, weight, emb.padding_idx, scale_grad_by_freq=emb.scale_grad_by_freq)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if emb.padding_idx is not None:
        keep = flat != emb.padding_idx
    if emb.mode == "max":
        rows = rows.masked_fill(~keep[:, None], -torch.inf)
        init = torch.full((n, weight.shape[1]), -torch.inf, dtype=D)
        out = init.scatter_reduce(0, bag[:, None].expand_as(rows), rows, "amax")
        return out.masked_fill(out == -torch.inf, 0.0)
    psw = args.get("per_sample_weights")
    rows = rows * keep[:, None] * (1.0 if psw is None else psw.flatten()[:, None])
    out = torch.zeros(n, weight.shape[1], dtype=D).index_add(0, bag, rows)
    if emb.mode == "mean":
        count = torch.zeros(n, dtype=D).index_add(0, bag, keep.to(D))
        out = out / count.clamp(min=1)[:, None]
    return out


def _terms(emb, x, args, head, y, forward) -> Tensor:
    """Each bag's term of the weight gradient ``[n, V, D]`` (``forward(weight)``: the layer)."""
    weight = emb.weight.detach().requires_grad_()
    out = forward(weight)
    (g,) = torch.autograd.grad(nn.CrossEntropyLoss()(head(out), y), out, retain_graph=True)
    mask = torch.eye(out.shape[0], dtype=D)[:, :, None]
    return torch.stack(
        [torch.autograd.grad(out, weight, g * m, retain_graph=True)[0] for m in mask]
    )


def _oracle_terms(config: str) -> Tensor:
    emb, x, args, head, y = _problem(config)
    if emb.scale_grad_by_freq:  # torch's own CPU backward miscounts (see the module docstring)
        return _terms(emb, x, args, head, y, lambda w: _emulate(emb, w, x, args))
    return _terms(emb, x, args, head, y, lambda w: functional_call(emb, {"weight": w}, x, args))


def _run(config: str, exts: list, subsampling: list[int] | None = None):
    emb, x, args, head, y = _problem(config)
    extend(emb)
    lossfunc = extend(nn.CrossEntropyLoss())
    extend(head)
    torch.manual_seed(1)
    with backpack(*exts):
        lossfunc(head(emb(x, **args)), y).backward()
    return emb


@pytest.mark.parametrize("config", CONFIGS)
def test_emulation_matches_the_layer(config):
    emb, x, args, *_ = _problem(config)
    torch.testing.assert_close(_emulate(emb, emb.weight, x, args), emb(x, **args))


@pytest.mark.parametrize("config", CONFIGS)
def test_first_order(config):
    ref = _oracle_terms(config)
    w = _run(config, [ext() for ext in FIRST_ORDER]).weight
    torch.testing.assert_close(w.grad_batch.sum(0), ref.sum(0))
    for ext, reduce in FIRST_ORDER.items():
        torch.testing.assert_close(getattr(w, ext().savefield), reduce(ref))
    if CONFIGS[config][0].get("padding_idx") == 1:
        assert not w.grad_batch[:, 1].any()


def test_subsampling_keeps_batch_frequencies():
    config = "mean-offsets-freq-padding"
    idx = [3, 0, 0, 1]
    w = _run(config, [BatchGrad(subsampling=idx)]).weight
    torch.testing.assert_close(w.grad_batch, _oracle_terms(config)[idx])


SECOND = [c for c in CONFIGS if "freq" not in c]  # scaled gradients have no Hessian


@pytest.mark.parametrize("config", SECOND)
def test_diagonals_and_sqrt_ggn(config):
    """GGN (explicit Jacobian, per-bag loss Hessian blocks) and Hessian (double backward of each
    bag's loss term) of the emulated layer; the Tanh after the layer makes them differ."""
    emb, x, args, head, y = _problem(config)
    n, weight = y.shape[0], emb.weight.detach()
    logits = head(_emulate(emb, weight, x, args))
    jac = jacrev(lambda w: head(_emulate(emb, w, x, args)))(weight).reshape(n, C, -1)
    h_loss = hessian(lambda z: nn.CrossEntropyLoss()(z, y))(logits)
    h_loss = torch.stack([h_loss[i, :, i] for i in range(n)])  # [n, C, C]
    ggn_n = torch.einsum("ncp,ncd,ndp->np", jac, h_loss, jac).reshape(n, *weight.shape)

    def term(w: Tensor, i: int) -> Tensor:
        return nn.CrossEntropyLoss(reduction="sum")(head(_emulate(emb, w, x, args))[i], y[i]) / n

    hess_n = torch.stack(
        [hessian(term)(weight, i).reshape(weight.numel(), -1).diagonal() for i in range(n)]
    ).reshape(n, *weight.shape)

    exts = [DiagGGNExact(), BatchDiagGGNExact(), DiagHessian(), BatchDiagHessian()]
    w = _run(config, [*exts, SqrtGGNExact()]).weight
    torch.testing.assert_close(w.diag_ggn_exact, ggn_n.sum(0))
    torch.testing.assert_close(w.diag_ggn_exact_batch, ggn_n)
    torch.testing.assert_close(w.diag_h, hess_n.sum(0))
    torch.testing.assert_close(w.diag_h_batch, hess_n)
    flat = w.sqrt_ggn_exact.reshape(-1, weight.numel())
    torch.testing.assert_close(flat.T @ flat, torch.einsum("ncp,ncd,ndq->pq", jac, h_loss, jac))


def _dense_blocks(config: str) -> tuple[Tensor, Tensor]:
    """GGN and Hessian of the batch loss w.r.t. the weight ``[V D, V D]`` (emulated layer)."""
    emb, x, args, head, y = _problem(config)
    weight = emb.weight.detach()
    logits = head(_emulate(emb, weight, x, args))
    jac = jacrev(lambda w: head(_emulate(emb, w, x, args)))(weight).reshape(logits.numel(), -1)
    h_loss = hessian(lambda z: nn.CrossEntropyLoss()(z, y))(logits).flatten(2).flatten(0, 1)
    hess = hessian(lambda w: nn.CrossEntropyLoss()(head(_emulate(emb, w, x, args)), y))(weight)
    return jac.T @ h_loss @ jac, hess.reshape(weight.numel(), -1)


@pytest.mark.parametrize("config", ["sum-offsets-psw-padding", "mean-2d-padding", "max-2d"])
def test_block_products_and_mc(config):
    ggn, hess = _dense_blocks(config)
    w = _run(config, [GGNMP(), HMP(), DiagGGNMC(mc_samples=20000)]).weight
    mat = torch.randn(2, *w.shape, dtype=D)
    for product, block in ((w.ggnmp, ggn), (w.hmp, hess)):
        torch.testing.assert_close(product(mat), (block @ mat.flatten(1).T).T.reshape(mat.shape))
    scale = ggn.diagonal().abs().max().item()
    torch.testing.assert_close(w.diag_ggn_mc.flatten(), ggn.diagonal(), atol=0.05 * scale, rtol=0.1)


def test_differentiable_per_sample_weights_raise_in_second_order():
    emb, x, args, head, y = _problem("sum-2d-psw-freq")
    psw = nn.Linear(3, 3).to(D)(args["per_sample_weights"])  # depends on a parameter
    extend(emb)
    extend(head)
    with pytest.raises(NotImplementedError, match="per_sample_weights"):
        with backpack(DiagGGNExact()):
            extend(nn.CrossEntropyLoss())(head(emb(x, None, psw)), y).backward()

"""BatchNorm (eval-mode Jacobians, errors with batch statistics) and Embedding (options, memory)."""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from backpack import backpack, extend
from backpack.derivatives.base import IO
from backpack.extensions import BatchGrad, BatchL2Grad, SumGradSquared, Variance
from backpack.registry import rule_for
from backpack.utils.errors import batch_norm_raise_error_if_train
from tests.oracles import per_sample_grads

FIRST_ORDER = [BatchGrad, BatchL2Grad, SumGradSquared, Variance]
REDUCE = {
    BatchGrad: lambda gb: gb,
    BatchL2Grad: lambda gb: gb.flatten(1).square().sum(1),
    SumGradSquared: lambda gb: gb.square().sum(0),
    Variance: lambda gb: gb.var(0, unbiased=False),
}


# ---------------------------------------------------------------- BatchNorm with batch statistics
def _bn_model(**kw) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, **kw), nn.Linear(4, 3)).double()


@pytest.mark.parametrize("ext", FIRST_ORDER, ids=lambda e: e.__name__)
@pytest.mark.parametrize(
    "kw, train, pattern",
    [
        ({}, True, r"BatchNorm1d.*training mode.*model\.eval\(\).*GroupNorm"),
        ({"track_running_stats": False}, False, r"BatchNorm1d.*track_running_stats=True"),
    ],
    ids=["train", "no-running-stats"],
)
def test_batchnorm_batch_statistics_raise(ext, kw, train, pattern):
    model = extend(_bn_model(**kw).train(train))
    loss = nn.MSELoss()(model(torch.randn(6, 5, dtype=torch.float64)), torch.zeros(6, 3).double())
    with pytest.raises(NotImplementedError, match=pattern) as err:
        with backpack(ext()):
            loss.backward()
    assert ext.__name__ in str(err.value)


def test_batch_norm_raise_error_if_train_modes():
    bn = nn.BatchNorm2d(3)
    with pytest.raises(NotImplementedError, match="training mode"):
        batch_norm_raise_error_if_train(bn)
    with pytest.warns(UserWarning, match="training mode"):
        batch_norm_raise_error_if_train(bn, raise_error=False)
    bn.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch_norm_raise_error_if_train(bn)


# --------------------------------------------------------------- BatchNorm Jacobians in eval mode
BN_SHAPES = [
    (nn.BatchNorm1d, (3, 4)),
    (nn.BatchNorm1d, (3, 4, 5)),
    (nn.BatchNorm2d, (3, 4, 2, 3)),
    (nn.BatchNorm3d, (3, 4, 2, 3, 2)),
]


def _bn(cls: type, c: int, affine: bool = True) -> nn.Module:
    bn = cls(c, affine=affine).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    return bn


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("cls, shape", BN_SHAPES, ids=lambda a: str(a))
def test_batchnorm_jacobians_match_torch_func(cls, shape, affine):
    torch.manual_seed(1)
    bn = _bn(cls, shape[1], affine)
    x = torch.randn(*shape, dtype=torch.float64)
    rule, io = rule_for(bn), IO((x,), None)
    mat = torch.randn(2, *shape, dtype=torch.float64)  # V = 2

    _, pullback = vjp(bn, x)
    torch.testing.assert_close(rule.jac_t_mat_prod(bn, io, mat), vmap(pullback)(mat)[0])
    push = vmap(lambda t: jvp(bn, (x,), (t,))[1])
    torch.testing.assert_close(rule.jac_mat_prod(bn, io, mat), push(mat))

    params = dict(bn.named_parameters())
    for name in params:  # per-sample: vjp of each sample's output w.r.t. the parameters

        def sample_out(p: dict, xn: Tensor) -> Tensor:
            return functional_call(bn, p, (xn[None],))[0]

        def sample_vjp(xn: Tensor, mn: Tensor) -> Tensor:
            return vjp(lambda p: sample_out(p, xn), params)[1](mn)[0][name]

        ref = vmap(vmap(sample_vjp), in_dims=(None, 0))(x, mat)  # [v, n, c]
        got = rule.param_jac_t_mat_prod(bn, io, mat, name, sum_batch=False)
        torch.testing.assert_close(got, ref)
        got = rule.param_jac_t_mat_prod(bn, io, mat, name, sum_batch=True)
        torch.testing.assert_close(got, ref.sum(1))


# -------------------------------------------------------------------- Embedding, large vocabulary
class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, Tensor)]
        self.numel = max([self.numel, *sizes])
        return out


def test_embedding_large_vocab_no_per_sample_tensor():
    n, vocab, dim, length = 8, 50_000, 16, 10
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(vocab, dim), nn.Flatten(), nn.Linear(length * dim, 3))
    model = extend(model.double())
    lossfunc = extend(nn.CrossEntropyLoss())
    x, y = torch.randint(0, vocab, (n, length)), torch.randint(0, 3, (n,))
    x[0, :3] = x[1, 0] = 7  # repeated indices within and across samples

    exts = [BatchL2Grad, SumGradSquared, Variance]
    largest = _LargestTensor()
    start = time.perf_counter()
    with largest, backpack(*(e() for e in exts)):
        lossfunc(model(x), y).backward()
    seconds = time.perf_counter() - start
    assert largest.numel <= vocab * dim  # the parameter's size, never [n, V, D]
    assert seconds < 5.0

    ref = per_sample_grads(model, lossfunc, x, y)["0.weight"]
    weight = model[0].weight
    for ext in exts:
        torch.testing.assert_close(getattr(weight, ext().savefield), REDUCE[ext](ref))


# ------------------------------------------------------------------------------ Embedding options
def _term_oracle(emb: nn.Embedding, x: Tensor, y: Tensor, head: nn.Module) -> Tensor:
    """Each sample's term of PyTorch's own weight gradient ``[n, V, D]`` (batch forward, so
    ``scale_grad_by_freq`` counts over the batch): backward of the output gradient masked to
    one sample at a time."""
    out = emb(x)
    loss = nn.CrossEntropyLoss()(head(out.flatten(1)), y)
    (g,) = torch.autograd.grad(loss, out, retain_graph=True)
    rows = []
    for i in range(x.shape[0]):
        mask = torch.zeros_like(g)
        mask[i] = 1
        (gw,) = torch.autograd.grad(out, emb.weight, g * mask, retain_graph=True)
        rows.append(gw.to_dense())
    return torch.stack(rows)


EMB_OPTIONS = {
    "padding_idx": dict(padding_idx=2),
    "padding_idx-negative": dict(padding_idx=-1),
    "scale_grad_by_freq": dict(scale_grad_by_freq=True),
    "freq-padding": dict(scale_grad_by_freq=True, padding_idx=0),
    "max_norm": dict(max_norm=0.5),
    "sparse": dict(sparse=True),
    "all": dict(padding_idx=1, scale_grad_by_freq=True, max_norm=1.0),  # torch: freq xor sparse
    "sparse-padding-max_norm": dict(padding_idx=1, max_norm=1.0, sparse=True),
}
EMB_INPUTS = {"N": (5,), "NT": (5, 4), "NST": (5, 2, 3)}


@pytest.mark.parametrize("shape", EMB_INPUTS.values(), ids=EMB_INPUTS.keys())
@pytest.mark.parametrize("kw", EMB_OPTIONS.values(), ids=EMB_OPTIONS.keys())
def test_embedding_options(kw, shape):
    torch.manual_seed(0)
    emb = nn.Embedding(6, 3, **kw).double()
    x = torch.randint(0, 6, shape)
    x.view(-1)[:3] = emb.padding_idx if emb.padding_idx is not None else 0  # repeats + padding
    positions = x[0].numel()
    head = nn.Linear(positions * 3, 4).double()
    y = torch.randint(0, 4, (shape[0],))
    ref = _term_oracle(copy.deepcopy(emb), x, y, head)

    extend(emb)
    with backpack(*(e() for e in FIRST_ORDER)):
        loss = nn.CrossEntropyLoss()(head(emb(x).flatten(1)), y)
        loss.backward()
    w = emb.weight
    torch.testing.assert_close(w.grad_batch.sum(0), w.grad.to_dense())
    for ext in FIRST_ORDER:
        torch.testing.assert_close(getattr(w, ext().savefield), REDUCE[ext](ref))
    if emb.padding_idx is not None:
        assert not w.grad_batch[:, emb.padding_idx].any()
        assert not w.sum_grad_squared[emb.padding_idx].any()


def test_embedding_subsampling_keeps_batch_frequencies():
    torch.manual_seed(0)
    emb = nn.Embedding(6, 3, scale_grad_by_freq=True, padding_idx=5).double()
    x = torch.randint(0, 6, (4, 5))
    x[:, 0] = 3  # index 3 is counted in every sample
    head = nn.Linear(15, 4).double()
    y = torch.randint(0, 4, (4,))
    ref = _term_oracle(copy.deepcopy(emb), x, y, head)

    idx = [2, 0, 0]
    extend(emb)
    with backpack(BatchGrad(subsampling=idx)):
        nn.CrossEntropyLoss()(head(emb(x).flatten(1)), y).backward()
    torch.testing.assert_close(emb.weight.grad_batch, ref[idx])


def test_embedding_has_no_input_jacobian():
    emb = nn.Embedding(6, 3)
    x = torch.randint(0, 6, (2, 4))
    with pytest.raises(NotImplementedError, match="integer indices"):
        rule_for(emb).jac_t_mat_prod(emb, IO((x,), None), torch.randn(1, 2, 4, 3))

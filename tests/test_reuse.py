"""A module called several times in one forward: every extension sums the contributions of
all calls (per-sample gradients ``sum_c J_c^T g_c``, curvature of ``sum_c J_c``)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.func import functional_call

from backpack import backpack, extend
from backpack.custom_module.branching import SumModule
from backpack.custom_module.reduce_tuple import ReduceTuple
from backpack.extensions import (
    GGNMP,
    HMP,
    KFAC,
    KFLR,
    KFRA,
    PCHMP,
    BackpropExtension,
    BatchDiagGGNExact,
    BatchDiagGGNMC,
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
from tests.oracles import (
    assert_memory_flat,
    ggn_block,
    ggn_diag,
    hessian_diag,
    live_records,
    per_sample_grads,
)


class Twice(nn.Module):
    """``lin(tanh(lin(x)))``: the second call's input depends on the first call."""

    def __init__(self):
        super().__init__()
        self.lin, self.act = nn.Linear(4, 4), nn.Tanh()

    def forward(self, x):
        return self.lin(self.act(self.lin(x)))


class Siamese(nn.Module):
    """One encoder on two inputs, the codes summed: parallel calls."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid())
        self.add, self.head = SumModule(), nn.Linear(5, 4)

    def forward(self, x):
        return self.head(self.add(self.enc(x), self.enc(x.flip(1) * 0.5)))


class Unrolled(nn.Module):
    """A recurrence unrolled by hand: ``cell`` 3 times, ``inp`` 4 times, one shared Tanh."""

    def __init__(self):
        super().__init__()
        self.inp, self.cell, self.head = nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, 4)
        self.act, self.add = nn.Tanh(), SumModule()

    in_shape = (4, 4)  # 4 steps

    def forward(self, x):
        h = self.act(self.inp(x[:, 0]))
        for t in range(1, x.shape[1]):
            h = self.act(self.add(self.cell(h), self.inp(x[:, t])))
        return self.head(h)


class ConvTwice(nn.Module):
    """A convolution applied twice in a chain."""

    in_shape = (2, 4, 4)

    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(2, 2, 3, padding=1), nn.Sigmoid()
        self.flat, self.head = nn.Flatten(), nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.flat(self.act(self.conv(self.act(self.conv(x))))))


MODELS = [Twice, Siamese, Unrolled, ConvTwice]
FIRST = {
    BatchGrad: lambda gb: gb,
    BatchL2Grad: lambda gb: gb.flatten(1).square().sum(1),
    SumGradSquared: lambda gb: gb.square().sum(0),
    Variance: lambda gb: gb.var(0, unbiased=False),
}


def _problem(model_cls, n: int = 3):
    torch.manual_seed(0)
    model = model_cls().double()
    shape = getattr(model_cls, "in_shape", (4,))
    x, y = torch.randn(n, *shape, dtype=torch.float64), torch.randint(0, 4, (n,))
    return model, extend(nn.CrossEntropyLoss()), x, y


def _run(model, lossfunc, x, y, *exts, **kwargs):
    with backpack(*exts, **kwargs):
        lossfunc(model(x), y).backward()


@pytest.mark.parametrize("model_cls", MODELS, ids=lambda c: c.__name__)
def test_first_order(model_cls):
    model, lossfunc, x, y = _problem(model_cls)
    ref = per_sample_grads(model, lossfunc, x, y)
    _run(extend(model), lossfunc, x, y, *(ext() for ext in FIRST))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch.sum(0), p.grad)
        for ext, reduce in FIRST.items():
            torch.testing.assert_close(getattr(p, ext().savefield), reduce(ref[name]))


@pytest.mark.parametrize("model_cls", MODELS, ids=lambda c: c.__name__)
def test_diagonals(model_cls):
    model, lossfunc, x, y = _problem(model_cls)
    ggn_n = ggn_diag(model, lossfunc, x, y, per_sample=True)
    hess_n = hessian_diag(model, lossfunc, x, y, per_sample=True)
    exts = [DiagGGNExact(), BatchDiagGGNExact(), DiagHessian(), BatchDiagHessian()]
    _run(extend(model), lossfunc, x, y, *exts)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_ggn_exact, ggn_n[name].sum(0))
        torch.testing.assert_close(p.diag_ggn_exact_batch, ggn_n[name])
        torch.testing.assert_close(p.diag_h, hess_n[name].sum(0))
        torch.testing.assert_close(p.diag_h_batch, hess_n[name])


@pytest.mark.parametrize("model_cls", MODELS, ids=lambda c: c.__name__)
def test_sqrt_ggn_and_ggn_products_equal_the_block(model_cls):
    model, lossfunc, x, y = _problem(model_cls)
    _run(extend(model), lossfunc, x, y, SqrtGGNExact(), GGNMP())
    for name, p in model.named_parameters():
        block = ggn_block(model, lossfunc, x, y, name)
        v = p.sqrt_ggn_exact.flatten(2)
        torch.testing.assert_close(torch.einsum("cnp,cnq->pq", v, v), block)
        mat = torch.randn(2, *p.shape, dtype=torch.float64)
        torch.testing.assert_close(p.ggnmp(mat).flatten(1), mat.flatten(1) @ block)


@pytest.mark.parametrize("model_cls", MODELS, ids=lambda c: c.__name__)
def test_subsampling(model_cls):
    model, lossfunc, x, y = _problem(model_cls)
    idx = [2, 0]
    ref = per_sample_grads(model, lossfunc, x, y)
    hess_n = hessian_diag(model, lossfunc, x, y, per_sample=True)
    exts = [BatchGrad(subsampling=idx), Variance(subsampling=idx), BatchDiagHessian(idx)]
    _run(extend(model), lossfunc, x, y, *exts)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, ref[name][idx])
        torch.testing.assert_close(p.variance, ref[name][idx].var(0, unbiased=False))
        torch.testing.assert_close(p.diag_h_batch, hess_n[name][idx])


class SiameseBatchNorm(nn.Module):
    """Batch statistics after one call only: one origin coupled in one call, not the other."""

    def __init__(self):
        super().__init__()
        self.enc, self.act, self.bn = (
            nn.Linear(4, 5),
            nn.Sigmoid(),
            nn.BatchNorm1d(5, affine=False, track_running_stats=False),
        )
        self.add, self.head = SumModule(), nn.Linear(5, 4)

    def forward(self, x):
        return self.head(self.add(self.act(self.bn(self.enc(x))), self.act(self.enc(x.flip(1)))))


def test_samples_coupled_after_one_call_only():
    model, lossfunc, x, y = _problem(SiameseBatchNorm, n=5)
    ggn = ggn_diag(model, lossfunc, x, y)
    _run(extend(model), lossfunc, x, y, DiagGGNExact(), GGNMP(), SqrtGGNExact())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_ggn_exact, ggn[name])
        mat = torch.randn(2, *p.shape, dtype=torch.float64)
        block = ggn_block(model, lossfunc, x, y, name)
        torch.testing.assert_close(p.ggnmp(mat).flatten(1), mat.flatten(1) @ block)
        v = p.sqrt_ggn_exact.flatten(2)
        torch.testing.assert_close(torch.einsum("cnp,cnq->pq", v, v), block)


class SiameseRNN(nn.Module):
    """One ``nn.RNN`` (tuple output) on a sequence and on its reversal."""

    def __init__(self):
        super().__init__()
        self.rnn, self.pick = nn.RNN(3, 4, batch_first=True), ReduceTuple(0)
        self.add, self.flat, self.head = SumModule(), nn.Flatten(), nn.Linear(8, 4)

    def forward(self, x):
        codes = self.pick(self.rnn(x)), self.pick(self.rnn(x.flip(1)))
        return self.head(self.flat(self.add(*codes)))


def test_recurrent_layer_called_twice():
    torch.manual_seed(0)
    model, lossfunc = SiameseRNN().double(), extend(nn.CrossEntropyLoss())
    x, y = torch.randn(3, 2, 3, dtype=torch.float64), torch.tensor([0, 3, 1])
    grads = per_sample_grads(model, lossfunc, x, y)
    ggn_n = ggn_diag(model, lossfunc, x, y, per_sample=True)
    hess_n = hessian_diag(model, lossfunc, x, y, per_sample=True)
    _run(extend(model), lossfunc, x, y, BatchGrad(), BatchDiagGGNExact(), BatchDiagHessian())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, grads[name])
        torch.testing.assert_close(p.diag_ggn_exact_batch, ggn_n[name])
        torch.testing.assert_close(p.diag_h_batch, hess_n[name])


def test_module_with_live_records_copies_and_pickles():
    """The per-module set of live records is neither copied nor pickled."""
    model, lossfunc, x, y = _problem(Twice)
    loss = lossfunc(extend(model)(x), y)
    for clone in (copy.deepcopy(model), torch.load(_saved(model), weights_only=False)):
        assert not clone.lin.__dict__["_backpack_calls"]
        _run(clone, lossfunc, x, y, BatchGrad())
        torch.testing.assert_close(clone.lin.weight.grad_batch.sum(0), clone.lin.weight.grad)
    del loss


def _saved(model: nn.Module) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("model_cls", [Siamese, Twice], ids=lambda c: c.__name__)
def test_hessian_products_of_parallel_and_chained_calls(model_cls):
    """HMP is the Hessian block, the blocks between dependent calls (``Twice``) included;
    PCHMP has the same shape, and equals HMP where no term is negative."""
    model, lossfunc, x, y = _problem(model_cls)
    _run(extend(model), lossfunc, x, y, HMP(), PCHMP(modify="abs"))
    params = {k: p.detach() for k, p in model.named_parameters()}
    for name, p in model.named_parameters():

        def loss(q, name=name):
            return lossfunc(functional_call(model, {**params, name: q}, (x,)), y)

        hess = torch.func.hessian(loss)(p.detach()).reshape(p.numel(), p.numel())
        mat = torch.randn(2, *p.shape, dtype=torch.float64)
        torch.testing.assert_close(p.hmp(mat).flatten(1), mat.flatten(1) @ hess)
        assert p.pchmp(mat).shape == mat.shape


@pytest.mark.parametrize("model_cls", MODELS, ids=lambda c: c.__name__)
def test_mc_and_kronecker_shapes(model_cls):
    """MC diagonals: shapes, per-sample sum; Kronecker factors (calls as extra positions):
    shapes, symmetric, positive semi-definite; the bias's exact block."""
    model, lossfunc, x, y = _problem(model_cls)
    exts = [DiagGGNMC(mc_samples=2), BatchDiagGGNMC(mc_samples=2), KFAC(), KFLR(), KFRA()]
    _run(extend(model), lossfunc, x, y, *exts)
    for name, p in model.named_parameters():
        assert p.diag_ggn_mc.shape == p.shape
        torch.testing.assert_close(p.diag_ggn_mc_batch.sum(0), p.diag_ggn_mc)
        for field in ("kfac", "kflr", "kfra"):
            factors = getattr(p, field)
            sizes = [p.shape[0]] if p.dim() == 1 else [p.shape[0], p[0].numel()]
            assert [f.shape for f in factors] == [(s, s) for s in sizes]
            for f in factors:
                torch.testing.assert_close(f, f.T)
                assert torch.linalg.eigvalsh(f).min() > -1e-10
        if p.dim() == 1:  # KFLR's bias factor is the exact GGN block
            torch.testing.assert_close(p.kflr[0], ggn_block(model, lossfunc, x, y, name))


def test_calls_of_an_earlier_retained_graph_do_not_count():
    """A live record of an earlier forward marks the modules as shared (a false mark): the
    result is still that of the calls reached in this backward, as on the fast path."""
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 4)).double())
    _, lossfunc, x, y = _problem(Twice)
    exts = [BatchGrad, BatchL2Grad, DiagGGNExact, DiagHessian, KFLR, SqrtGGNExact, GGNMP]
    mat = torch.randn(2, 5, 4, dtype=torch.float64)

    def results():
        fields = [e().savefield for e in exts]
        out = {(n, f): getattr(p, f) for n, p in model.named_parameters() for f in fields}
        out[("0.weight", "ggnmp")] = model[0].weight.ggnmp(mat)
        return out

    _run(model, lossfunc, x, y, *(ext() for ext in exts))
    expected = results()
    kept = lossfunc(model(x * 2), y)  # an earlier graph kept alive, never differentiated
    loss = lossfunc(model(x), y)
    assert all(r.shared for r in live_records())
    with backpack(*(ext() for ext in exts)):
        loss.backward()
    for key, value in results().items():
        if key[1] != "ggnmp":
            torch.testing.assert_close(value, expected[key], msg=str(key))
    torch.testing.assert_close(model[0].weight.ggnmp(mat), expected[("0.weight", "ggnmp")])
    del kept


def test_unshared_calls_keep_the_fast_path():
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3)).double())
    loss = nn.CrossEntropyLoss()(model(torch.randn(2, 4).double()), torch.tensor([0, 1]))
    assert not any(r.shared for r in live_records())
    del loss


def test_extension_hook_runs_once_per_module():
    model, lossfunc, x, y = _problem(Unrolled)
    seen = []
    _run(extend(model), lossfunc, x, y, BatchGrad(), DiagGGNExact(), extension_hook=seen.append)
    counts = {m: seen.count(m) for m in (model.inp, model.cell, model.head)}
    assert counts == {model.inp: 1, model.cell: 1, model.head: 1}


class TwoViews(Siamese):
    """The shared encoder on two differentiated views ``pre1(x)``, ``pre2(x)``."""

    def __init__(self):
        super().__init__()
        self.pre1, self.pre2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.add(self.enc(self.pre1(x)), self.enc(self.pre2(x))))


def test_mixed_derivatives_only_where_a_call_depends_on_another(monkeypatch):
    """Parallel calls on a shared, differentiated input skip the mixed terms; chained calls
    beyond the memory budget raise."""
    import backpack.engine.reuse as reuse

    model, lossfunc, x, y = _problem(TwoViews)
    hess_n = hessian_diag(model, lossfunc, x, y, per_sample=True)

    def never(*args):
        raise AssertionError("mixed terms computed for parallel calls")

    monkeypatch.setattr(reuse, "mixed_factors", never)
    _run(extend(model), lossfunc, x, y, BatchDiagHessian())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_h_batch, hess_n[name])
    monkeypatch.setattr(reuse, "MIXED_BUDGET", 100)
    model, lossfunc, x, y = _problem(Twice)
    with pytest.raises(NotImplementedError, match="beyond the memory budget"):
        _run(extend(model), lossfunc, x, y, DiagHessian())


def test_retained_graph_backpropagated_twice():
    model, lossfunc, x, y = _problem(Unrolled)
    loss = lossfunc(extend(model)(x), y)
    results = []
    for _ in range(2):
        with backpack(BatchL2Grad(), DiagHessian(), retain_graph=True):
            loss.backward(retain_graph=True)
        results.append([(p.batch_l2, p.diag_h) for p in model.parameters()])
    for first, second in zip(*results):
        torch.testing.assert_close(first, second)


def test_extension_without_collect_raises_on_a_module_called_twice():
    class Custom(BackpropExtension):
        def __init__(self):
            super().__init__("custom")

        def run(self, call):
            pass

    model, lossfunc, x, y = _problem(Twice)
    with pytest.raises(NotImplementedError, match="Custom: .*called several times"):
        _run(extend(model), lossfunc, x, y, Custom())


def test_memory_flat_with_reuse():
    model, lossfunc, x, y = _problem(Unrolled, n=8)
    extend(model)
    exts = [BatchGrad(), Variance(), DiagGGNExact(), DiagHessian()]

    def step(i):
        model.zero_grad()
        _run(model, lossfunc, x, y, *(exts if i % 2 else exts[:2]))

    assert_memory_flat(step, 20)

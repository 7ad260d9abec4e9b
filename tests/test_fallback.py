"""The automatic rule (``torch.func``) of modules without a hand-written one: against every
hand-written rule, every extension on layers without a rule against the oracles, the one-time
warning and strict mode, losses without a rule."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.loss import _Loss
from torch.utils._pytree import tree_flatten, tree_map

from backpack import backpack, extend, set_strict
from backpack._state import STATE
from backpack.derivatives.automatic import AutogradLossRule, AutogradRule
from backpack.derivatives.base import IO
from backpack.extensions import (
    GGNMP,
    HMP,
    KFLR,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    SqrtGGNExact,
    SumGradSquared,
    Variance,
)
from backpack.registry import _RULES, rule_for
from tests.cases import CHAIN_CASES, DTYPE, LAYER_CASES, LayerCase, Problem, _chain, problems
from tests.oracles import ggn_block, ggn_diag, per_sample_grads
from tests.test_firstorder import test_first_order_matches_vmap_grad as _first_order
from tests.test_secondorder import test_diagonals_match_oracles as _second_order

AUTO = AutogradRule()
pytestmark = pytest.mark.filterwarnings(r"ignore:\w+. no rule for module type:UserWarning")


# --- (1) hand-written rules against the automatic one, on every layer ------------------------


def _calls(model: nn.Module, x: Tensor) -> list[tuple]:
    """``(module, hand-written rule's record, automatic rule's record, outputs)`` of each call
    of a module with a hand-written rule (inputs cloned before the call: in-place layers
    overwrite them; records made right after the call, as the engine does)."""
    calls, pending = [], {}
    clone = lambda t: t.detach().clone() if isinstance(t, Tensor) else t  # noqa: E731

    def pre(m, args, kwargs):
        pending[m] = tree_map(clone, (args, kwargs))

    def post(m, args, kwargs, out):
        args, kwargs = pending.pop(m)
        ios = []
        for rule in (rule_for(m), AUTO):
            io = IO(tree_map(clone, args), tree_map(clone, out), kwargs)
            if isinstance(out, Tensor):
                rule.on_forward(m, io, out)
            ios.append(io)
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, Tensor) and o.is_floating_point()]
        calls.append((m, *ios, [o.detach().clone() for o in outs]))

    ruled = [m for m in model.modules() if type(m) in _RULES]
    hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in ruled]
    hooks += [m.register_forward_hook(post, with_kwargs=True) for m in ruled]
    model(x)
    for h in hooks:
        h.remove()
    return calls


def _parts(res) -> list:
    return list(res) if isinstance(res, tuple) else [res]


def _dense(factors: list, n: int):
    """``sum sign R R^T`` per sample ``[n, D, D]`` (0 if no factors)."""
    total = 0
    for sign, r in factors:
        flat = torch.cat([p.reshape(p.shape[0], n, -1) for p in _parts(r) if p is not None], 2)
        total = total + sign * torch.einsum("rnd,rne->nde", flat, flat)
    return total


def _close(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return
    if isinstance(a, int) or isinstance(b, int):  # no factors on one side: the other is zero
        a, b = (torch.zeros_like(b), b) if isinstance(a, int) else (a, torch.zeros_like(a))
    torch.testing.assert_close(a, b)


# the recurrent "-all" cases hold the same layers as the "-seq" ones
RULED = [c for c in LAYER_CASES + CHAIN_CASES if not c.name.endswith("-all")]


@pytest.mark.parametrize("case", RULED, ids=lambda c: c.name)
def test_hand_written_rules_match_automatic(case: LayerCase):
    """jac_t_mat_prod, jac_mat_prod, param_jac_t_mat_prod (summed, per sample), residual
    factors and parameter residual diagonals of each module with a rule, on random matrices."""
    n = 2  # not 3: attention's shared masks [L, L] have L = 3
    model, *_ = Problem(case, "mse", "sum", n).build()
    x = case.input(n)
    torch.manual_seed(1)
    for m, hand_io, auto_io, outs in _calls(model, x):
        rule = rule_for(m)
        if rule.is_loss or getattr(m, "inplace", False):  # the automatic rule needs the input
            continue
        per_sample = rule.batch_axis(m) == 0
        mat = torch.randn(2, *outs[0].shape, dtype=DTYPE)
        where = f"{case.name}: {m}"
        try:
            hand = rule.jac_t_mat_prod(m, hand_io, mat)
        except NotImplementedError:
            hand = None
        if hand is not None:
            auto = AUTO.jac_t_mat_prod(m, auto_io, mat)
            for h, a in zip(_parts(hand), _parts(auto)):
                if h is not None:
                    torch.testing.assert_close(h, a, msg=lambda s: f"{where} J^T: {s}")
        x_in = hand_io.inputs[0]
        if len(hand_io.inputs) == 1 and x_in.is_floating_point():
            tangent = torch.randn(2, *x_in.shape, dtype=DTYPE)
            try:
                hand = rule.jac_mat_prod(m, hand_io, tangent)
            except NotImplementedError:
                hand = None
            if hand is not None:
                auto = AUTO.jac_mat_prod(m, auto_io, tangent)
                torch.testing.assert_close(hand, auto, msg=lambda s: f"{where} J: {s}")
        for name in rule.param_names(m):
            for sum_batch in (True, False) if per_sample else (True,):
                hand = rule.param_jac_t_mat_prod(m, hand_io, mat, name, sum_batch=sum_batch)
                auto = AUTO.param_jac_t_mat_prod(m, auto_io, mat, name, sum_batch=sum_batch)
                torch.testing.assert_close(hand, auto, msg=lambda s: f"{where} {name}: {s}")
        if not per_sample:
            continue
        g = tuple(torch.randn_like(o) for o in outs)
        # per sample: only the first output (recurrent states have the batch on axis 1)
        g_n = (g[0], *map(torch.zeros_like, g[1:]))
        g, g_n = (g[0], g_n[0]) if len(g) == 1 else (g, g_n)
        try:
            _compare_residuals(rule, m, hand_io, auto_io, g, g_n, where)
        except NotImplementedError as e:  # torch has no double backward for some layers
            assert "forward AD" in str(e)


def _compare_residuals(rule, m, hand_io, auto_io, g, g_n, where):
    n = (g_n[0] if isinstance(g_n, tuple) else g_n).shape[0]
    auto = _dense(AUTO.residual_factors(m, auto_io, g), n)
    _close(_dense(rule.residual_factors(m, hand_io, g), n), auto)
    for name in rule.param_names(m):
        for sum_batch, gs in ((True, g), (False, g_n)):
            hand = rule.param_residual_diag(m, hand_io, gs, name, sum_batch)
            auto = AUTO.param_residual_diag(m, auto_io, gs, name, sum_batch)
            hand = torch.zeros_like(auto) if hand is None else hand
            torch.testing.assert_close(hand, auto, msg=lambda s: f"{where} {name}: {s}")


# --- (2) every extension on layers without a rule, against the oracles ----------------------


class Custom(nn.Module):
    """``tanh(x W^T) * b + sin(x)``: a leaf with parameters and no rule."""

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.b = nn.Parameter(torch.randn(d))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w.T) * self.b + x.sin()


class Mix(nn.Module):
    """``a * w + a * b``: two inputs."""

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a * self.w + a * b


class TwoBranches(nn.Module):
    """A container (no rule, not hooked) feeding two Linear branches into ``Mix``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.mix = nn.Linear(4, 5), nn.Linear(4, 5), Mix(5)

    def forward(self, x: Tensor) -> Tensor:
        return self.mix(self.a(x), self.b(x))


class FunctionalChild(nn.Module):
    """Own parameter, and a child whose parameters it reads but which it never calls."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.scale = nn.Parameter(torch.randn(5))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(F.linear(x, self.lin.weight, self.lin.bias)) * self.scale


FALLBACK_CASES = [
    _chain("Linear-Custom-Softsign", lambda: [nn.Linear(4, 5), Custom(5), nn.Softsign()], 4),
    _chain(
        "Conv1d-Tanhshrink-Conv1d",
        lambda: [nn.Conv1d(2, 3, 2), nn.Tanhshrink(), nn.Conv1d(3, 2, 2)],
        2,
        6,
    ),
    _chain("TwoBranches-Mix", lambda: [TwoBranches(), nn.Tanh()], 4),
    _chain("Linear-FunctionalChild", lambda: [nn.Linear(4, 5), FunctionalChild()], 4),
]
FIRST = problems(FALLBACK_CASES)
SECOND = [p for p in FIRST if (p.reduction, p.n) in {("mean", 3), ("sum", 1)}]


@pytest.mark.parametrize("problem", FIRST, ids=lambda p: p.id)
def test_first_order_without_rules(problem):
    _first_order(problem, "cpu")


@pytest.mark.parametrize("problem", SECOND, ids=lambda p: p.id)
def test_second_order_without_rules(problem):
    _second_order(problem, "cpu")


def test_other_extensions_without_rules():
    """Square root of the GGN, GGN and Hessian block products, Monte-Carlo GGN; Kronecker
    extensions store the exact block of the parameters of layers without a rule. (HMP omits ``d2 out / dw2`` of a
    layer nonlinear in its weight ``w``, here ``Custom.w``: a gap of HMP, rules or not.)"""
    problem = next(p for p in SECOND if p.id == "Linear-Custom-Softsign-ce-mean-N3")
    exts = [SqrtGGNExact(), GGNMP(), HMP(), DiagGGNMC(mc_samples=20000), DiagGGNExact()]
    model, lossfunc, x, y = problem.run(exts)
    params = {k: p.detach() for k, p in model.named_parameters()}
    for name, p in model.named_parameters():
        ggn = ggn_block(model, lossfunc, x, y, name)
        mat = torch.randn(2, *p.shape, dtype=DTYPE)
        flat = mat.flatten(1)

        def loss_of(q, name=name):
            return lossfunc(functional_call(model, {**params, name: q}, (x,)), y)

        hess = torch.func.hessian(loss_of)(p.detach()).reshape(p.numel(), p.numel())
        root = p.sqrt_ggn_exact.flatten(0, 1).flatten(1)
        torch.testing.assert_close(root.T @ root, ggn)
        torch.testing.assert_close(p.ggnmp(mat).flatten(1), flat @ ggn)
        torch.testing.assert_close(p.hmp(mat).flatten(1), flat @ hess)
        scale = p.diag_ggn_exact.abs().max()
        torch.testing.assert_close(p.diag_ggn_mc, p.diag_ggn_exact, atol=0.05 * scale, rtol=0.1)
    model, lossfunc, x, y = problem.run([KFLR()])  # no Kronecker structure: the exact block
    for name, p in model.named_parameters():
        if isinstance(model.get_submodule(name.rpartition(".")[0]), Custom):
            torch.testing.assert_close(p.kflr[0], ggn_block(model, lossfunc, x, y, name))


def test_rule_lookup():
    """Hand-written rules first; the automatic one for leaves and losses; modules with children
    get none (their own parameters are read by recorded function calls)."""
    assert type(rule_for(nn.Linear(2, 2))) is not AutogradRule
    assert isinstance(rule_for(nn.Softsign()), AutogradRule)
    assert isinstance(rule_for(Custom(2)), AutogradRule)
    assert rule_for(FunctionalChild()) is None
    assert rule_for(TwoBranches()) is None
    assert isinstance(rule_for(nn.L1Loss()), AutogradLossRule)
    assert isinstance(rule_for(type("MyMSE", (nn.MSELoss,), {})()), AutogradLossRule)


# --- (3) warning, strict mode, what the automatic rule refuses ------------------------------


def _data(n: int = 4):
    torch.manual_seed(0)
    return torch.randn(n, 4, dtype=DTYPE), torch.randint(0, 3, (n,))


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, dtype=DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.w + x**3


@pytest.mark.filterwarnings("default")
def test_warns_once_per_type_and_strict_raises():
    model = extend(nn.Sequential(nn.Linear(4, 3).double(), Odd(), Odd()))
    lossfunc = extend(nn.CrossEntropyLoss())
    x, y = _data()
    STATE.warned.discard((Odd, "automatic"))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(2):
            with backpack(BatchGrad(), DiagGGNExact()):
                lossfunc(model(x), y).backward()
    msgs = [str(w.message) for w in rec if "Odd" in str(w.message)]
    assert len(msgs) == 1 and "slower" in msgs[0] and "@backpack.register(Odd)" in msgs[0]
    assert model[1].w.grad_batch.shape == (4, 3)
    with pytest.raises(NotImplementedError, match="BatchGrad: no rule for module type Odd.*strict"):
        with backpack(BatchGrad(), strict=True):
            lossfunc(model(x), y).backward()
    set_strict(True)
    try:
        with pytest.raises(NotImplementedError, match="DiagGGNExact: .*Odd.*strict"):
            with backpack(DiagGGNExact()):
                lossfunc(model(x), y).backward()
    finally:
        set_strict(False)
    with backpack(BatchGrad()):  # strict mode is off again
        lossfunc(model(x), y).backward()


def test_strict_from_environment():
    code = (
        "import torch, backpack\n"
        "from backpack.extensions import BatchGrad\n"
        "m = backpack.extend(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.PReLU()))\n"
        "try:\n"
        "    with backpack.backpack(BatchGrad()):\n"
        "        m(torch.randn(3, 2)).sum().backward()\n"
        "except NotImplementedError as e:\n"
        "    print('raised', 'PReLU' in str(e))\n"
    )
    env = {**os.environ, "BACKPACK_STRICT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "raised True", out.stderr


class Noisy(nn.Module):
    """A leaf with a parameter and dropout: not reproducible in training mode."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, dtype=DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x * self.w, 0.5, self.training)


def test_random_forward_raises_in_training_and_works_in_eval():
    model = extend(nn.Sequential(nn.Linear(4, 3).double(), Noisy()))
    lossfunc = nn.CrossEntropyLoss()
    x, y = _data()
    with pytest.raises(RuntimeError, match="cannot reproduce its forward"):
        with backpack(BatchGrad()):
            lossfunc(model(x), y).backward()
    model.eval()
    ref = per_sample_grads(model, lossfunc, x, y)
    with backpack(BatchGrad()):
        lossfunc(model(x), y).backward()
    torch.testing.assert_close(model[1].w.grad_batch, ref["1.w"])


class CallsChild(nn.Module):
    """Own parameter and a child it calls: the child runs its own rule."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(x)) * self.scale


def test_module_calling_extended_children():
    """Each parameter once (own by the recorded function calls, the child's by its rule), for
    first and second order."""
    model = nn.Sequential(CallsChild(), nn.Linear(3, 3)).double()
    lossfunc = extend(nn.CrossEntropyLoss())
    x, y = _data()
    ref = per_sample_grads(model, lossfunc, x, y)
    extend(model)
    with backpack(BatchGrad(), SumGradSquared()):
        lossfunc(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, ref[name])
    with backpack(DiagGGNExact()):
        lossfunc(model(x), y).backward()
    for name, diag in ggn_diag(model, lossfunc, x, y).items():
        torch.testing.assert_close(model.get_parameter(name).diag_ggn_exact, diag)


class Pair(nn.Module):
    """Two outputs, both used."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, dtype=DTYPE))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * self.w, (x * self.w).sin()


class UsePair(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.pair = nn.Linear(4, 3), Pair()

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.pair(self.lin(x))
        return a + b**2


def test_first_order_on_module_with_several_outputs():
    model = UsePair().double()
    lossfunc = nn.CrossEntropyLoss()
    x, y = _data()
    ref = per_sample_grads(model, lossfunc, x, y)
    extend(model)
    with backpack(BatchGrad(), BatchL2Grad(), Variance(subsampling=[2, 0])):
        lossfunc(model(x), y).backward()
    gb = ref["pair.w"]
    torch.testing.assert_close(model.pair.w.grad_batch, gb)
    torch.testing.assert_close(model.pair.w.batch_l2, gb.square().sum(1))
    torch.testing.assert_close(model.pair.w.variance, gb[[2, 0]].var(0, unbiased=False))


# --- (4) losses without a rule ---------------------------------------------------------------


class Quartic(_Loss):
    """``mean((x - y)^4)``: convex, not quadratic."""

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return (x - y).pow(4).mean() if self.reduction == "mean" else (x - y).pow(4).sum()


class Cosine(_Loss):
    """``mean(cos(x - y))``: its Hessian has negative eigenvalues."""

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return (x - y).cos().mean()


MyCE = type("MyCE", (nn.CrossEntropyLoss,), {})


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_without_rule_matches_oracle(reduction):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(4, 4, dtype=DTYPE), torch.randn(4, 3, dtype=DTYPE)
    lossfunc = Quartic(reduction=reduction)
    ref = ggn_diag(model, lossfunc, x, y, per_sample=True)
    extend(model)
    with backpack(DiagGGNExact()):
        extend(lossfunc)(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_ggn_exact, ref[name].sum(0))


def test_subclassed_loss_equals_its_hand_written_rule():
    """A subclass has no rule (exact type match): the automatic root gives the same GGN."""
    model = extend(nn.Sequential(nn.Linear(4, 3)).double())
    x, y = _data()
    results = []
    for lossfunc in (nn.CrossEntropyLoss(), MyCE()):
        with backpack(DiagGGNExact(), DiagHessian()):
            extend(lossfunc)(model(x), y).backward()
        results.append([(p.diag_ggn_exact, p.diag_h) for p in model.parameters()])
    torch.testing.assert_close(results[0], results[1])


def test_loss_without_rule_errors():
    model = extend(nn.Sequential(nn.Linear(4, 3)).double())
    x, _ = _data()
    y = torch.randn(4, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        with backpack(DiagGGNExact()):
            extend(Cosine())(model(x), y).backward()
    with pytest.raises(NotImplementedError, match="Quartic has no rule, so no likelihood"):
        with backpack(DiagGGNMC()):
            extend(Quartic())(model(x), y).backward()
    with pytest.raises(ValueError, match="need a scalar loss"):
        with backpack(DiagGGNExact()):
            extend(Quartic(reduction="none"))(model(x), y).backward()

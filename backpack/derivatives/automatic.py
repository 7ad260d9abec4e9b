"""The automatic rule: modules without a hand-written rule, differentiated by ``torch.func``.

``rule_for`` hands ``AutogradRule`` to leaves and to modules with parameters of their own, and
``AutogradLossRule`` to losses (``nn.modules.loss._Loss``), when no rule is registered for their
type. They recompute the recorded forward call with ``functional_call`` and differentiate it
with ``vjp``/``jvp`` under ``vmap``: correct for every extension, but slower than a rule (a
one-time warning says so; strict mode, ``backpack(..., strict=True)``, ``backpack.set_strict``
or the environment variable ``BACKPACK_STRICT=1``, raises instead).

Assumptions, each checked where it can be:
- the forward is reproducible from the recorded inputs; a forward that draws random numbers
  (dropout in training mode), changes state or works in place on its input raises;
- samples are independent and the batch is axis 0 of the outputs (per-sample quantities, the
  Hessian blocks of residuals and losses). Per-sample parameter Jacobians vmap a one-sample
  forward over the tensor arguments whose leading size is the batch size; where that fails or
  disagrees with the summed Jacobian they restrict each column to one sample instead (exact,
  ``n`` times the cost);
- submodules that run their own rules are not called in the forward: then second-order
  extensions raise (their quantities would pass these submodules twice); submodules used only
  functionally (their parameters read, as ``nn.MultiheadAttention.out_proj``) are covered.
"""

from __future__ import annotations

import math
import warnings
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap
from torch.nn import Module
from torch.nn.modules.loss import _Loss
from torch.utils._pytree import tree_flatten, tree_map

from backpack._state import STATE, is_strict
from backpack.derivatives.autograd import (
    agree,
    call,
    cotangents,
    float_outputs,
    hessian_blocks,
    masked_vjp,
    param_residual_diag_autograd,
    param_residual_mat_prod_autograd,
    per_sample_vjp,
    recorded,
    residual_factors_autograd,
    split_samples,
    state_of,
)
from backpack.derivatives.base import IO, LossRule, Request, Rule
from backpack.registry import set_fallback

MAX_BLOCK = 4096  # largest parameter whose exact curvature block Kronecker extensions store
# module -> names of its extended submodules its forward calls (found once, by a recompute)
_CALLED: WeakKeyDictionary[Module, tuple[str, ...]] = WeakKeyDictionary()


def warn_no_rule(module: Module, request: Request | None, strict: bool, seen: set) -> None:
    """Warn once per module type that ``module`` has no hand-written rule, so that the extension
    uses the automatic rule from ``torch.func`` (``backpack.derivatives.automatic``), a slower one.

    Raises:
        NotImplementedError: in strict mode (``backpack(..., strict=True)``, ``set_strict``).
    """
    kind, ext_name = type(module).__name__, request.name if request is not None else "backpack"
    remedy = f"Register one with @backpack.register({kind}) on a Rule subclass"
    if strict:
        raise NotImplementedError(
            f"{ext_name}: no rule for module type {kind} ({module}), and strict mode forbids "
            f"the automatic rule. {remedy}, or leave strict mode (backpack(..., strict=False), "
            "backpack.set_strict(False), environment variable BACKPACK_STRICT=0)."
        )
    if (type(module), "automatic") not in seen:
        seen.add((type(module), "automatic"))
        warnings.warn(
            f"{ext_name}: no rule for module type {kind} ({module}); using the automatic rule "
            "from torch.func: correct, but slower (it recomputes the forward pass and builds "
            f"per-sample derivatives densely). {remedy} for speed.",
            UserWarning,
            stacklevel=3,
        )


def _fingerprint(outs: list[Tensor]) -> Tensor:
    """Per-row sums and sums of squares of the outputs (float64): a cheap signature of a call."""
    rows = [o.detach().reshape(o.shape[0] if o.dim() else 1, -1).double() for o in outs]
    return torch.cat([torch.stack([r.sum(1), r.square().sum(1)]) for r in rows], 1)


def _check_reproduced(module: Module, io: IO, outs: list[Tensor]) -> None:
    """Raise if the recomputed outputs differ from the recorded ones."""
    ref = io.cache.get("fingerprint")
    if ref is None and io.output is not None:
        ref = _fingerprint(float_outputs(io.output))
    if ref is None:
        return
    new = _fingerprint(outs)
    tol = 1e3 * torch.finfo(outs[0].dtype).eps
    if new.shape != ref.shape or not torch.allclose(new, ref, rtol=tol, atol=tol * ref.abs().max()):
        raise RuntimeError(
            f"backpack: {module} has no rule, and the automatic rule cannot reproduce its forward "
            "call from the recorded inputs: it draws random numbers (dropout in training mode), "
            "changes state or modifies its input in place. Use model.eval() or inplace=False, or "
            f"register a rule with @backpack.register({type(module).__name__})."
        )


def _called_children(module: Module, io: IO) -> tuple[str, ...]:
    """Names of the extended submodules ``module``'s forward calls; found once per module by a
    recompute that leaves no trace (no records, copied buffers, random state restored)."""
    if module not in _CALLED:
        subs = [(k, m) for k, m in module.named_modules() if k and hasattr(m, "_backpack_extend")]
        called: list[str] = []
        hooks = [m.register_forward_pre_hook(lambda *_, k=k: called.append(k)) for k, m in subs]
        devices = {t.device for t in tree_flatten(io.inputs)[0] if isinstance(t, Tensor)}
        accel = [d for d in devices if d.type != "cpu"]
        try:
            if subs:
                with (
                    torch.no_grad(),
                    torch.random.fork_rng(
                        devices=[d.index or 0 for d in accel],
                        device_type=accel[0].type if accel else "cuda",
                    ),
                ):
                    call(module, state_of(module), io.inputs, io.kwargs)
        finally:
            for h in hooks:
                h.remove()
        _CALLED[module] = tuple(dict.fromkeys(called))
    return _CALLED[module]


def _uncalled(module: Module, called: tuple[str, ...]) -> list[str]:
    """Trainable parameters of ``module`` outside the submodules ``called``."""
    return [
        k
        for k, p in module.named_parameters()
        if p.requires_grad and not any(k.startswith(c + ".") for c in called)
    ]


def _first(g: Any) -> Tensor:
    """The gradient of the first output (``g`` a tuple for several outputs)."""
    return g[0] if isinstance(g, tuple) else g


def _column(g: Any) -> Any:
    """An output gradient (a tuple for several outputs) as one column ``[1, n, *out]``."""
    return tuple(t.unsqueeze(0) for t in g) if isinstance(g, tuple) else g.unsqueeze(0)


class AutogradRule(Rule):
    """The rule of a module without a hand-written one, from ``torch.func`` (module docstring).

    Several outputs: ``mat`` may be a tuple (one per floating-point output leaf); a tensor
    belongs to the first output. Several inputs: results are tuples over the input leaves.
    """

    differentiable = False  # torch.func transforms of detached parameters

    def on_forward(self, module: Module, io: IO, output: Tensor) -> None:
        io.cache["fingerprint"] = _fingerprint([output])
        try:  # known before the first backward pass asks for ``param_names``
            _called_children(module, io)
        except Exception:  # never break a forward pass: ``check`` retries (and raises) later
            pass

    def param_names(self, module: Module) -> list[str]:
        """Trainable parameters of the module and of submodules its forward does not call (own
        ones only until a forward call showed which submodules it calls)."""
        called = _CALLED.get(module)
        return super().param_names(module) if called is None else _uncalled(module, called)

    def check(self, module: Module, io: IO, request: Request | None) -> None:
        warn_no_rule(module, request, is_strict(), STATE.warned)
        called = _called_children(module, io)
        if called and request is not None and request.second_order:
            raise NotImplementedError(
                f"{request.name}: {type(module).__name__} has no rule and its forward "
                f"calls the extended submodules {list(called)}: the automatic rule would "
                "differentiate through them while they run their own rules. Register a rule "
                f"with @backpack.register({type(module).__name__}), or move its own parameters "
                "into a submodule so that it becomes a container."
            )

    def _linearised(self, module: Module, io: IO) -> tuple:
        """``(vjp_fn, outputs, input positions, number of input leaves)`` of the recorded call
        w.r.t. its floating-point inputs and ``param_names``: one forward per backward pass."""
        if "vjp" not in io.cache:
            leaves, pos, forward = recorded(module, io)
            state = state_of(module)
            params = {k: state.pop(k) for k in _uncalled(module, _called_children(module, io))}
            primals = [leaves[i] for i in pos]
            outs, fn = vjp(lambda xs, ps: forward(xs, {**state, **ps}), primals, params)
            _check_reproduced(module, io, outs)
            io.cache["vjp"] = (fn, outs, pos, len(leaves))
        return io.cache["vjp"]

    def jac_t_mat_prod(self, module: Module, io: IO, mat: Any) -> Any:
        """``[v, n, *out] -> [v, n, *in]``: one vjp of the batched forward per column."""
        fn, outs, pos, k = self._linearised(module, io)
        grads = vmap(lambda ct: fn(ct)[0])(cotangents(outs, mat))
        full: list = [None] * k
        for i, gi in zip(pos, grads):
            full[i] = gi
        return full[0] if k == 1 else tuple(full)

    def jac_mat_prod(self, module: Module, io: IO, mat: Any) -> Tensor:
        """``[v, n, *in] -> [v, n, *out]`` (first output): one jvp per column; ``mat`` a tuple
        over the input leaves (None: no tangent) or the tangent of the first float input."""
        leaves, pos, forward = recorded(module, io)
        if not pos:
            raise ValueError(f"{module}: no floating-point input to take a tangent of.")
        mats = mat if isinstance(mat, tuple) else [mat if i == pos[0] else None for i in pos]
        mats = dict(zip(range(len(leaves)) if isinstance(mat, tuple) else pos, mats))
        v = next(m for m in mats.values() if m is not None).shape[0]
        zero = leaves[pos[0]].new_zeros(())
        tangents = [zero.expand(v, *leaves[i].shape) if mats[i] is None else mats[i] for i in pos]
        state = state_of(module)

        def column(*ts: Tensor) -> Tensor:
            return jvp(lambda *xs: forward(xs, state)[0], tuple(leaves[i] for i in pos), ts)[1]

        return vmap(column)(*tangents)

    def param_jac_t_mat_prod(
        self, module: Module, io: IO, mat: Any, name: str, sum_batch: bool = True
    ) -> Tensor:
        """``[v, n, *out] -> [v, (n,) *param]``; per sample: vmap of a one-sample forward,
        checked against the summed vjp, else the vjp of each column restricted to a sample."""
        fn, outs, _, _ = self._linearised(module, io)
        cts = cotangents(outs, mat)
        total = vmap(lambda ct: fn(ct)[1][name])(cts)
        if sum_batch:
            return total
        per = per_sample_vjp(module, io, cts, name)  # [n, v, *param]
        return per.transpose(0, 1) if agree(per, total) else masked_vjp(fn, cts, name)

    def residual_factors(self, module: Module, io: IO, g: Any) -> list[tuple[float, Any]]:
        return residual_factors_autograd(module, io, g)

    def kron_factors(self, module: Module, io: IO, mat: Tensor, name: str) -> None:
        """No Kronecker structure is known: Kronecker extensions store the parameter's exact
        ``[P, P]`` block ``[G]`` (a layer scale, a class token, a norm's weight).

        Raises:
            NotImplementedError: for a parameter of more than ``MAX_BLOCK`` entries.
        """
        shape = tuple(module.get_parameter(name).shape)
        if math.prod(shape) > MAX_BLOCK:
            raise NotImplementedError(
                f"Kronecker extensions: parameter '{name}' {shape} of {module} has no rule with "
                f"Kronecker factors, and its exact curvature block would have "
                f"{math.prod(shape)}^2 entries. Register a rule with kron_factors "
                f"(@backpack.register({type(module).__name__})), freeze the parameter "
                "(requires_grad=False), or use a diagonal extension (DiagGGNExact, DiagGGNMC)."
            )
        return None

    def param_residual_diag(
        self, module: Module, io: IO, g: Any, name: str, sum_batch: bool = True
    ) -> Tensor:
        """Summed; per sample: vmap over samples, checked against the sum, else the summed
        diagonal of ``g`` restricted to each sample (exact, ``n`` times the cost)."""
        total = param_residual_diag_autograd(module, io, g, name)
        if sum_batch:
            return total
        try:
            per = param_residual_diag_autograd(module, io, g, name, sum_batch=False)
        except Exception:  # no batching rule, keyword arguments per sample, states on axis 1
            per = None
        if agree(per, total):
            return per
        n = _first(g).shape[0]
        split = tree_map(lambda t: split_samples(t, n), g)
        return vmap(lambda gk: param_residual_diag_autograd(module, io, gk, name))(split)

    def param_residual_mat_prod(
        self, module: Module, io: IO, g: Any, name: str, mat: Tensor
    ) -> Tensor:
        return param_residual_mat_prod_autograd(module, io, g, name, mat)

    # the base versions take a single output gradient; these also take a tuple
    def batch_grad(
        self, module: Module, io: IO, g: Any, name: str, out: Tensor | None = None
    ) -> Tensor:
        key = ("batch_grad", name)
        if key not in io.cache:
            io.cache[key] = self.param_jac_t_mat_prod(module, io, _column(g), name, False)[0]
        return io.cache[key]

    def grad(self, module: Module, io: IO, g: Any, name: str) -> Tensor:
        key = ("batch_grad", name)
        if key in io.cache:
            return io.cache[key].sum(0)
        return self.param_jac_t_mat_prod(module, io, _column(g), name, sum_batch=True)[0]

    def subsample(self, module: Module, io: IO, g: Any, idx: list[int]) -> tuple[IO, Any]:
        """Every tensor (inputs, keyword arguments, outputs, output gradients) whose leading
        size is the batch size, restricted to the samples ``idx``."""
        first = _first(g)
        n, index = first.shape[0], torch.tensor(idx, device=first.device)

        def pick(t: Any) -> Any:
            batched = isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n
            return t.index_select(0, index) if batched else t

        sub = IO(*(tree_map(pick, part) for part in (io.inputs, io.output, io.kwargs)))
        return sub, tree_map(pick, g)


class AutogradLossRule(AutogradRule, LossRule):
    """The rule of a loss without a hand-written one: the exact root of its Hessian w.r.t. the
    model output (first input), from ``torch.func``; no Monte-Carlo root (no known likelihood).
    """

    def param_names(self, module: Module) -> list[str]:
        """None: the loss ends the backward pass (its parameters, if any, get nothing)."""
        return []

    def check(self, module: Module, io: IO, request: Request | None) -> None:
        super().check(module, io, request)
        reduction = getattr(module, "reduction", "mean")
        scalar = io.output is None or io.output.numel() == 1
        if reduction not in ("mean", "sum") or not scalar:
            raise ValueError(
                f"{module} (reduction={reduction!r}): second-order extensions need a scalar "
                "loss; use reduction='mean' or 'sum'."
            )

    def sqrt_hessian(self, module: Module, io: IO) -> Tensor:
        """``S [D, n, *x]`` with ``S S^T`` the per-sample blocks of ``d2 loss / dx2`` (``D``
        entries per sample): ``D`` Hessian-vector products and an eigendecomposition.

        Raises:
            ValueError: where a block has a clearly negative eigenvalue (no square root; the
                GGN needs a loss convex in the model output).
        """
        x = io.inputs[0]
        hess = hessian_blocks(module, io, x.new_ones(()), [0], [0])
        evals, evecs = torch.linalg.eigh(hess)
        tol = torch.finfo(x.dtype).eps ** 0.5 * evals.abs().amax()
        if (evals < -tol).any():
            raise ValueError(
                f"{module} has no rule, and its Hessian w.r.t. the model output is not positive "
                f"semi-definite (eigenvalue {evals.min().item():.3g}), so it has no square root: "
                "second-order extensions need a loss that is convex in the model output. "
                f"Register a rule with @backpack.register({type(module).__name__})."
            )
        root = evecs * evals.clamp(min=0).sqrt().unsqueeze(1)  # [n, D (entry), D (column)]
        return root.permute(2, 0, 1).reshape(-1, *x.shape)

    def sqrt_hessian_sampled(self, module: Module, io: IO, mc_samples: int) -> Tensor:
        raise NotImplementedError(
            f"{type(module).__name__} has no rule, so no likelihood to sample targets from for "
            "Monte-Carlo extensions (DiagGGNMC, KFAC, SqrtGGNMC, ...). Use the exact ones "
            "(DiagGGNExact, KFLR, SqrtGGNExact, ...) or register a rule with "
            f"sqrt_hessian_sampled via @backpack.register({type(module).__name__})."
        )


_AUTOGRAD, _AUTOGRAD_LOSS = AutogradRule(), AutogradLossRule()


def automatic_rule(module: Module) -> Rule | None:
    """The automatic rule of a module without a registered one: losses and leaves; None for
    modules with children (their submodules have rules, and the function calls between them,
    reading the module's own parameters too, are recorded: ``backpack.engine.ops``)."""
    if isinstance(module, _Loss):
        return _AUTOGRAD_LOSS
    return _AUTOGRAD if next(module.children(), None) is None else None


set_fallback(automatic_rule)

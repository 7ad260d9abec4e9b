"""The elementwise family: activations and dropout, ``out = f(x)`` entry by entry.

A rule of this family gives only ``f'`` and ``f''``; the Jacobian is ``diag(f'(x))`` and the
Hessian residual of the layer is ``diag(f''(x) * g)``. ``f''`` of None marks a piecewise linear
layer (its Hessian residual is zero).

In-place layers (``inplace=True``) overwrite their input with their output. Rows that can read
``f'`` and ``f''`` from ``y = f(x)`` (sign and interval tests that ``f`` preserves, or a branch
on ``module.inplace``) set ``inplace_needs_input = False``: ``io.inputs[0]`` then holds ``y``.
The others (SiLU, Mish, Hardswish: ``y`` does not determine ``x``) get the input as it was, a
copy the engine takes before the layer runs (``Rule.inplace_needs_input``). Which tensor a row
reads mirrors what autograd saves for the layer: a later in-place change to that tensor makes
PyTorch's own backward fail as well.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import Module

from backpack.derivatives.base import IO, Rule
from backpack.registry import register

Derivative = Callable[[Module, Tensor, "Tensor | None"], "Tensor | float"]


class ElementwiseRule(Rule):
    """``y = f(x)`` elementwise: subclasses give ``df`` (``f'``) and ``d2f`` (``f''``)."""

    needs_output = False  # rows reading the output set it to True
    inplace_needs_input = False  # rows whose f', f'' need x itself set it to True
    fresh_jac_t = True

    def df(self, module: Module, x: Tensor, y: Tensor | None) -> Tensor | float:
        """``f'`` ``[n, *in]`` (or a scalar) from the input ``x`` and output ``y``."""
        raise NotImplementedError

    def d2f(self, module: Module, x: Tensor, y: Tensor | None) -> Tensor | float | None:
        """``f''`` ``[n, *in]`` (or a scalar); None where ``f`` is piecewise linear."""
        return None

    def _df(self, module: Module, io: IO) -> Tensor | float:
        if ("df",) not in io.cache:  # shared by every extension in this backward
            io.cache[("df",)] = self.df(module, io.inputs[0], io.output)
        return io.cache[("df",)]

    def jac_t_mat_prod(self, module: Module, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, *out] -> [v, n, *in]``: ``f'(x) * mat``."""
        return self._df(module, io) * mat

    def jac_t_mat_prod_(self, module: Module, io: IO, mat: Tensor) -> Tensor:
        """``jac_t_mat_prod`` written into ``mat`` (no new memory for the largest columns)."""
        return mat.mul_(self._df(module, io))

    def jac_mat_prod(self, module: Module, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, *in] -> [v, n, *out]``: ``f'(x) * mat``."""
        return self._df(module, io) * mat

    def residual_diag(self, module: Module, io: IO, g: Tensor) -> Tensor | None:
        """``[n, *out] -> [n, *in]``: ``f''(x) * g``; None for piecewise linear ``f``."""
        d2 = self.d2f(module, io.inputs[0], io.output)
        return None if d2 is None else d2 * g


def _row(
    types: tuple[type[Module], ...],
    df: Derivative,
    d2f: Derivative | None = None,
    output: bool = False,
    needs_input: bool = False,
) -> None:
    """Register an elementwise rule for ``types`` from ``f'`` and ``f''`` (None: piecewise linear).

    ``output``: whether ``f'`` or ``f''`` read the output ``y`` (else it is None).
    ``needs_input``: whether they need ``x`` itself, which an in-place call overwrites with
    ``y`` (``Rule.inplace_needs_input``: the engine then keeps a copy of ``x``).
    """
    body = {"df": staticmethod(df), "needs_output": output, "inplace_needs_input": needs_input}
    if d2f is not None:
        body["d2f"] = staticmethod(d2f)
    register(*types)(type(f"{types[0].__name__}Rule", (ElementwiseRule,), body))


def _leaky_df(m: nn.LeakyReLU, x: Tensor, y: None) -> Tensor:
    # the sign of the output is that of the input for slopes >= 0 (the only in-place case)
    return (x > 0).to(x.dtype) * (1 - m.negative_slope) + m.negative_slope


def _exp_branch(m: Module, x: Tensor, scale: float, alpha: float) -> Tensor:
    """``scale * alpha * exp(x)``; in place ``x`` holds ``scale * alpha * (exp(x) - 1)``."""
    return x + scale * alpha if m.inplace else scale * alpha * x.exp()


def _elu_df(m: nn.ELU, x: Tensor, y: None) -> Tensor:
    return torch.where(x > 0, 1.0, _exp_branch(m, x, 1.0, m.alpha))


def _elu_d2f(m: nn.ELU, x: Tensor, y: None) -> Tensor:
    return torch.where(x > 0, 0.0, _exp_branch(m, x, 1.0, m.alpha))


# torch's SELU constants (torch.nn.functional.selu)
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _selu_df(m: nn.SELU, x: Tensor, y: None) -> Tensor:
    return torch.where(x > 0, _SELU_SCALE, _exp_branch(m, x, _SELU_SCALE, _SELU_ALPHA))


def _selu_d2f(m: nn.SELU, x: Tensor, y: None) -> Tensor:
    return torch.where(x > 0, 0.0, _exp_branch(m, x, _SELU_SCALE, _SELU_ALPHA))


def _celu_exp(m: nn.CELU, x: Tensor) -> Tensor:
    """``exp(x / alpha)``; in place ``x`` holds ``alpha * (exp(x / alpha) - 1)``."""
    return x / m.alpha + 1 if m.inplace else (x / m.alpha).exp()


def _celu_df(m: nn.CELU, x: Tensor, y: None) -> Tensor:
    return torch.where(x > 0, 1.0, _celu_exp(m, x))


def _celu_d2f(m: nn.CELU, x: Tensor, y: None) -> Tensor:
    return torch.where(x > 0, 0.0, _celu_exp(m, x) / m.alpha)


def _rrelu_df(m: nn.RReLU, x: Tensor, y: Tensor) -> Tensor:
    """1 for ``x >= 0``, else the slope ``y / x`` (eval: ``(lower + upper) / 2``; training:
    the slope drawn for that entry in forward)."""
    return torch.where(x >= 0, 1.0, y / x)


def _dropout_df(m: nn.Dropout, x: Tensor, y: Tensor) -> Tensor | float:
    """Eval: 1. Train: the kept entries (``y != 0``) scaled by ``1 / (1 - p)``."""
    if not m.training:
        return 1.0
    scale = 0.0 if m.p == 1 else 1 / (1 - m.p)
    return (y != 0).to(y.dtype) * scale


@register(nn.ReLU)
class ReLURule(ElementwiseRule):
    """``f' = [x > 0]`` (the sign of ``x`` is that of ``y``: in place too). The products keep
    ``mat`` where ``x > 0`` in one pass (autograd's own ReLU backward), without a mask."""

    def df(self, module: Module, x: Tensor, y: None) -> Tensor:
        return (x > 0).to(x.dtype)

    def jac_t_mat_prod(self, module: Module, io: IO, mat: Tensor) -> Tensor:
        return torch.ops.aten.threshold_backward(mat, io.inputs[0], 0)

    jac_mat_prod = jac_t_mat_prod

    def jac_t_mat_prod_(self, module: Module, io: IO, mat: Tensor) -> Tensor:
        return torch.ops.aten.threshold_backward.grad_input(mat, io.inputs[0], 0, grad_input=mat)


# the rows: module types, f', f'' (omitted: piecewise linear), whether they read the output
_row((nn.Identity,), lambda m, x, y: 1.0)
_row((nn.LeakyReLU,), _leaky_df)
_row((nn.Hardtanh, nn.ReLU6), lambda m, x, y: ((x > m.min_val) & (x < m.max_val)).to(x.dtype))
_row((nn.Sigmoid,), lambda m, x, y: y * (1 - y), lambda m, x, y: y * (1 - y) * (1 - 2 * y), True)
_row((nn.Tanh,), lambda m, x, y: 1 - y**2, lambda m, x, y: -2 * y * (1 - y**2), True)
_row(
    (nn.LogSigmoid,),
    lambda m, x, y: torch.sigmoid(-x),
    lambda m, x, y: -torch.sigmoid(x) * torch.sigmoid(-x),
)
_row((nn.ELU,), _elu_df, _elu_d2f)
_row((nn.SELU,), _selu_df, _selu_d2f)
_row((nn.CELU,), _celu_df, _celu_d2f)
# the input is ``x`` itself (the engine copies it in place): ``y`` does not determine it
_row((nn.Threshold,), lambda m, x, y: (x > m.threshold).to(x.dtype), needs_input=True)
_row((nn.RReLU,), _rrelu_df, output=True, needs_input=True)
_row((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d), _dropout_df, output=True)


_SQRT_2_PI = (2 / math.pi) ** 0.5
_GELU_C = 0.044715


def _gaussian(x: Tensor) -> tuple[Tensor, Tensor]:
    """Standard normal cdf and pdf at ``x``."""
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))), torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)


def _gelu_tanh(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``t = tanh(u)``, ``u'``, ``u''`` for ``u = sqrt(2/pi) (x + c x^3)``."""
    t = torch.tanh(_SQRT_2_PI * (x + _GELU_C * x**3))
    return t, _SQRT_2_PI * (1 + 3 * _GELU_C * x**2), _SQRT_2_PI * 6 * _GELU_C * x


def _gelu_df(m: nn.GELU, x: Tensor, y: None) -> Tensor:
    """``Phi + x phi``; tanh form: ``(1 + t)/2 + x (1 - t^2) u'/2``."""
    if m.approximate == "tanh":
        t, du, _ = _gelu_tanh(x)
        return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * du
    cdf, pdf = _gaussian(x)
    return cdf + x * pdf


def _gelu_d2f(m: nn.GELU, x: Tensor, y: None) -> Tensor:
    """``phi (2 - x^2)``; tanh form: ``(1 - t^2) (u' + x (u'' - 2 t u'^2) / 2)``."""
    if m.approximate == "tanh":
        t, du, d2u = _gelu_tanh(x)
        return (1 - t**2) * (du + 0.5 * x * (d2u - 2 * t * du**2))
    return _gaussian(x)[1] * (2 - x**2)


def _silu_df(m: nn.SiLU, x: Tensor, y: None) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _silu_d2f(m: nn.SiLU, x: Tensor, y: None) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s) * (2 + x * (1 - 2 * s))


def _mish_parts(x: Tensor) -> tuple[Tensor, Tensor]:
    """``t = tanh(softplus(x))`` and ``s = sigmoid(x)`` (= softplus')."""
    return torch.tanh(F.softplus(x)), torch.sigmoid(x)


def _mish_df(m: nn.Mish, x: Tensor, y: None) -> Tensor:
    t, s = _mish_parts(x)
    return t + x * (1 - t**2) * s


def _mish_d2f(m: nn.Mish, x: Tensor, y: None) -> Tensor:
    t, s = _mish_parts(x)
    return (1 - t**2) * s * (2 + x * (1 - s - 2 * t * s))


def _softplus_df(m: nn.Softplus, x: Tensor, y: None) -> Tensor:
    """``sigmoid(beta x)``; 1 where ``beta x > threshold`` (the layer is linear there)."""
    bx = m.beta * x
    return torch.where(bx > m.threshold, 1.0, torch.sigmoid(bx))


def _softplus_d2f(m: nn.Softplus, x: Tensor, y: None) -> Tensor:
    bx = m.beta * x
    s = torch.sigmoid(bx)
    return torch.where(bx > m.threshold, 0.0, m.beta * s * (1 - s))


def _hardsigmoid_df(m: nn.Hardsigmoid, x: Tensor, y: None) -> Tensor:
    """``1/6`` on ``(-3, 3)``; in place ``x`` holds ``y``, in ``(0, 1)`` exactly there."""
    lo, hi = (0.0, 1.0) if m.inplace else (-3.0, 3.0)
    return ((x > lo) & (x < hi)).to(x.dtype) / 6


def _hardswish_df(m: nn.Hardswish, x: Tensor, y: None) -> Tensor:
    return torch.where(x < -3, 0.0, torch.where(x > 3, 1.0, (2 * x + 3) / 6))


def _hardswish_d2f(m: nn.Hardswish, x: Tensor, y: None) -> Tensor:
    return ((x > -3) & (x < 3)).to(x.dtype) / 3


_row((nn.GELU,), _gelu_df, _gelu_d2f)
_row((nn.SiLU,), _silu_df, _silu_d2f, needs_input=True)
_row((nn.Mish,), _mish_df, _mish_d2f, needs_input=True)
_row((nn.Softplus,), _softplus_df, _softplus_d2f)
_row((nn.Hardsigmoid,), _hardsigmoid_df)
_row((nn.Hardswish,), _hardswish_df, _hardswish_d2f, needs_input=True)

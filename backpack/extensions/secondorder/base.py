"""Second-order machinery: quantities that flow backward from the loss through every module.

A *stream* says what flows (a square root of the loss Hessian, exact or sampled; for the Hessian also
the residual terms of curved layers), how it starts at a loss and how it passes a module. Extensions
that need the same stream share one backpropagation of it. Flowing values are keyed by the autograd
identity ``(node, output index)`` of the tensor they belong to.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from backpack.extensions.base import BackpropExtension, Call


@dataclass(frozen=True)
class SqrtGGNStream:
    """``S [v, n, *out]`` with ``S S^T`` the GGN w.r.t. a module's output (``mc_samples``: MC)."""

    mc_samples: int | None = None

    def start(self, call: Call) -> Tensor:
        if self.mc_samples is None:
            return call.rule.sqrt_hessian(call.module, call.io)
        return call.rule.sqrt_hessian_sampled(call.module, call.io, self.mc_samples)

    def propagate(self, call: Call, mat: Tensor) -> Tensor:
        return call.rule.jac_t_mat_prod(call.module, call.io, mat)

    def scale(self, mat: Tensor, factor: float) -> Tensor:
        return mat * factor

    def accumulate(self, old: Tensor, new: Tensor) -> Tensor:
        return old + new


@dataclass(frozen=True)
class SqrtHessianStream:
    """Signed factors ``{origin: (sign, S)}`` with ``sum sign S S^T`` the Hessian w.r.t. an output.

    The loss contributes its exact factor; each curved elementwise layer adds its residual
    ``diag(f'' g)`` split into positive and negative parts (diagonal factors over the input).
    """

    def start(self, call: Call) -> dict:
        return {"loss": (1.0, call.rule.sqrt_hessian(call.module, call.io))}

    def propagate(self, call: Call, terms: dict) -> dict:
        out = {o: (s, call.rule.jac_t_mat_prod(call.module, call.io, m)) for o, (s, m) in terms.items()}
        residual = call.rule.residual_diag(call.module, call.io, call.g)
        if residual is not None:
            for sign, part in ((1.0, residual.clamp(min=0)), (-1.0, (-residual).clamp(min=0))):
                if part.any():
                    out[(id(call), sign)] = (sign, _diag_factor(part.sqrt()))
        return out

    def scale(self, terms: dict, factor: float) -> dict:
        return {o: (s, m * factor) for o, (s, m) in terms.items()}

    def accumulate(self, old: dict, new: dict) -> dict:
        merged = dict(old)
        for o, (s, m) in new.items():
            merged[o] = (s, merged[o][1] + m) if o in merged else (s, m)
        return merged


def _diag_factor(root: Tensor) -> Tensor:
    """``[n, *in] -> [d, n, *in]`` with ``d = prod(in)``: column d holds ``root`` at entry d."""
    n, shape = root.shape[0], root.shape[1:]
    flat = root.reshape(n, -1)
    return torch.diag_embed(flat).permute(1, 0, 2).reshape(flat.shape[1], n, *shape)


class SecondOrderExtension(BackpropExtension):
    """An extension storing, per parameter, a reduction of what its stream brings to a module."""

    def expects_backpropagation_quantities(self) -> bool:
        return True

    def param_value(self, call: Call, io: Any, flowing: Any, name: str) -> Tensor:
        """The quantity for parameter ``name`` (``io`` and ``flowing`` possibly subsampled)."""
        raise NotImplementedError

    def store(self, call: Call, flowing: Any) -> None:
        call.rule.check(call.module, call.io, self)
        io, flowing = _subsample(call, flowing, self.subsampling)
        for name, param in call.params():
            setattr(param, self.savefield, self.param_value(call, io, flowing, name))


def _subsample(call: Call, flowing: Any, idx: list[int] | None) -> tuple[Any, Any]:
    """Restrict record and flowing matrices ``[v, n, ...]`` to the samples ``idx``."""
    if idx is None:
        return call.io, flowing
    index = torch.tensor(idx, device=call.grads[0].device)
    io, _ = call.rule.subsample(call.module, call.io, call.grads[0], idx)
    if isinstance(flowing, dict):
        return io, {o: (s, m.index_select(1, index)) for o, (s, m) in flowing.items()}
    return io, flowing.index_select(1, index)


def _missing(call: Call, exts: list[BackpropExtension]) -> RuntimeError:
    names = ", ".join(type(e).__name__ for e in exts)
    return RuntimeError(
        f"{names}: module {call.module} received no backpropagated quantity. Either the loss is "
        "not extended (call extend(lossfunc)), the backward pass did not start at an extended "
        "loss, or a function call between extended modules (x.view, +, torch.relu, ...) breaks "
        "the chain: replace it by a module (nn.Flatten, nn.ReLU, ...) or use "
        "extend(model, use_converter=True)."
    )


def _loss_scale(call: Call) -> float:
    """Factor the loss output was multiplied by after the loss module (1 if untouched)."""
    g = call.grads[0]
    if g.numel() != 1:
        raise ValueError(
            f"{call.module}: second-order extensions need a scalar loss, got output shape "
            f"{tuple(g.shape)}. Use reduction='mean' or 'sum'."
        )
    factor = g.item()
    if factor != 1.0:
        if factor <= 0:
            raise ValueError(
                f"The output of {call.module} was multiplied by {factor} <= 0 after the loss "
                "module; its curvature has no square root. Differentiate the loss itself."
            )
        warnings.warn(
            f"The output of {call.module} seems to have been modified (its gradient is "
            f"{factor}, not 1); second-order quantities treat it as scaled by {factor}. Terms "
            "added to the loss afterwards (regularisers) are not included.",
            UserWarning,
            stacklevel=2,
        )
    return factor


def run_streams(call: Call, exts: tuple[BackpropExtension, ...], flowing: dict) -> None:
    """At one module: fetch (or, at a loss, start) each stream, store results, pass it on."""
    groups: dict[Any, list[SecondOrderExtension]] = {}
    for ext in exts:
        if ext.stream is not None:
            groups.setdefault(ext.stream, []).append(ext)
    key = call.in_keys[0] if call.in_keys else None
    for stream, group in groups.items():
        if call.rule.is_loss:  # the root: what flows into the loss's input
            call.rule.check(call.module, call.io, group[0])
            new = stream.start(call)
            factor = _loss_scale(call)
            if factor != 1.0:
                new = stream.scale(new, factor**0.5)
        else:
            value = flowing.pop((stream, *call.out_key), None)
            if value is None:
                raise _missing(call, group)
            for ext in group:
                ext.store(call, value)
            if key is None:
                continue
            new = stream.propagate(call, value)
        if key is not None:
            old = flowing.get((stream, *key))
            flowing[(stream, *key)] = new if old is None else stream.accumulate(old, new)

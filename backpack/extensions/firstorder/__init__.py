"""First-order extensions: reductions of the per-sample gradients, from each module's output
gradient alone (no backpropagated matrix, so they work on any graph).

Scaling: the per-sample gradients are those of the actual loss, ``grad_batch.sum(0) == grad``;
with ``reduction='mean'`` each carries the loss's ``1/N``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import Module

import backpack._torch_private as _tp
from backpack._state import STATE
from backpack.derivatives.base import IO, Rule
from backpack.engine.call import Call
from backpack.engine.reuse import Pieces
from backpack.extensions.base import BackpropExtension


class FirstOrderExtension(BackpropExtension):
    """Stores ``compute(...)`` for each trainable parameter of every module with a rule."""

    savefield_default = ""

    @property
    def accepts_coupled_samples(self) -> bool:
        """Through BatchNorm with batch statistics only under ``backpack(...,
        batchnorm_contributions=True)``: per-sample contributions ``J_n^T g_n``."""
        return STATE.batchnorm_contributions

    def __init__(self, subsampling: list[int] | None = None):
        super().__init__(self.savefield_default, subsampling=subsampling)

    def run(self, call: Call) -> None:
        """Store the quantity of each parameter of the module from its output gradient."""
        params = call.params()
        if not params:
            return
        self.check_module(call)
        io, g = call.view(self.subsampling)
        for name, param in params:
            setattr(param, self.savefield, self.compute(call.rule, call.module, io, g, name))

    def compute(self, rule: Rule, module: Module, io: IO, g: Tensor, name: str) -> Tensor:
        """The quantity for parameter ``name`` from the output gradient ``g`` ``[n, *out]``."""
        raise NotImplementedError

    def collect(self, call: Call, pieces: Pieces) -> None:
        """One call using shared parameters: add its per-sample gradients."""
        self.check_module(call)
        io, g = call.view(self.subsampling)
        for name, param in call.params():
            pieces.add(
                ("batch_grad", id(param), self.subsampling_key),
                lambda n=name: call.rule.batch_grad(call.module, io, g, n),
                lambda acc, n=name: call.rule.add_batch_grad(call.module, io, g, n, acc),
            )

    def finish(self, pieces: Pieces) -> None:
        """Store the quantity of the per-sample gradients summed over the calls."""
        for pid, param in pieces.params.items():
            grad_batch = pieces.sums.get(("batch_grad", pid, self.subsampling_key))
            if grad_batch is not None:
                setattr(param, self.savefield, self.from_batch_grad(grad_batch))

    def from_batch_grad(self, grad_batch: Tensor) -> Tensor:
        """The quantity from the per-sample gradients ``[n, *param]`` (for parameters used by
        several calls in one forward pass, whose calls' per-sample gradients are summed)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no from_batch_grad, needed where a parameter is used "
            "by several calls in one forward pass (a module called twice, tied weights)."
        )


class BatchGrad(FirstOrderExtension):
    """Per-sample gradients ``grad_batch`` ``[N, *P]``; ``grad_batch.sum(0) == grad``.

    The previous pass's ``grad_batch`` is overwritten in place when nothing but the parameter
    references it (no other name, no view): large fresh buffers cost page faults, on CPU
    about as much as computing them.
    """

    savefield_default = "grad_batch"

    def compute(self, rule: Rule, module: Module, io: IO, g: Tensor, name: str) -> Tensor:
        """``rule.batch_grad``, written into the previous buffer when nothing else holds it."""
        param = module.get_parameter(name)
        n = _batch_size(rule, module, g)
        old = param.__dict__.get(self.savefield)
        reuse = (
            not torch.is_grad_enabled()  # backward(create_graph=True): a graph result
            and isinstance(old, Tensor)
            and old.shape == (n, *param.shape)
            and old.dtype == param.dtype
            and old.device == param.device
            and old.is_contiguous()
            and _tp.view_base(old) is None
            and _tp.refcount(old) == 3  # param.__dict__, ``old``, the call's argument
            and _tp.storage_use_count(old.untyped_storage()) <= 2
        )
        return rule.batch_grad(module, io, g, name, out=old if reuse else None)

    def from_batch_grad(self, grad_batch: Tensor) -> Tensor:
        """The per-sample gradients themselves."""
        return grad_batch


class BatchL2Grad(FirstOrderExtension):
    """Squared norms of the per-sample gradients ``batch_l2`` ``[N]``, per parameter tensor."""

    savefield_default = "batch_l2"

    def compute(self, rule: Rule, module: Module, io: IO, g: Tensor, name: str) -> Tensor:
        """``rule.batch_l2``."""
        return rule.batch_l2(module, io, g, name)

    def from_batch_grad(self, grad_batch: Tensor) -> Tensor:
        """``sum_P g_n**2`` per sample (a norm: no squared copy of the per-sample gradients)."""
        return torch.linalg.vector_norm(grad_batch.flatten(1), dim=1).square()


class SumGradSquared(FirstOrderExtension):
    """Second moment ``sum_grad_squared = sum_n g_n**2`` ``[*P]``."""

    savefield_default = "sum_grad_squared"

    def compute(self, rule: Rule, module: Module, io: IO, g: Tensor, name: str) -> Tensor:
        """``rule.sum_grad_squared``."""
        return rule.sum_grad_squared(module, io, g, name)

    def from_batch_grad(self, grad_batch: Tensor) -> Tensor:
        """``sum_n g_n**2``."""
        return grad_batch.square().sum(0)


class Variance(FirstOrderExtension):
    """Biased variance of the per-sample gradients: ``(1/N) sum g_n**2 - ((1/N) sum g_n)**2``."""

    savefield_default = "variance"

    def compute(self, rule: Rule, module: Module, io: IO, g: Tensor, name: str) -> Tensor:
        """Second moment minus squared mean, both over the batch."""
        n = _batch_size(rule, module, g)
        second = rule.sum_grad_squared(module, io, g, name) / n
        return second - (rule.grad(module, io, g, name) / n).square()

    def from_batch_grad(self, grad_batch: Tensor) -> Tensor:
        """The biased variance over the samples."""
        return grad_batch.var(0, unbiased=False)


def _batch_size(rule: Rule, module: Module, g: Tensor | tuple[Tensor, ...]) -> int:
    """Samples in the output gradient (the first one for modules with several outputs)."""
    return (g[0] if isinstance(g, tuple) else g).shape[rule.batch_axis(module)]

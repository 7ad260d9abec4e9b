"""Parameter-free linear maps (the linear-op family): Flatten, Unflatten, Permute, Upsample.

A linear op ``out = A(x)`` is its own Jacobian: ``J mat = A(mat)`` and ``J^T mat`` is the vjp of
``A`` at any point (taken at zero). Both act per sample, so the vector axis is folded into the
batch. Pooling and padding layers reuse this family (``pooling.py``, ``padding.py``).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.func import vjp
from torch.nn import Module

from backpack.custom_module.permute import Permute
from backpack.derivatives.base import IO, Request, Rule
from backpack.registry import register


class LinearOpRule(Rule):
    """``out = A(x)`` for a linear map ``A`` acting on each sample alike; its Hessian is zero."""

    needs_output = False
    fresh_jac_t = True

    def op(self, module: Module, x: Tensor) -> Tensor:
        """``A(x)`` on a batch; the module's forward (without hooks) unless overridden."""
        return module.forward(x)

    def jac_mat_prod(self, module: Module, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, *in] -> [v, n, *out]``: ``A(mat)``."""
        out = self.op(module, mat.flatten(0, 1))
        return out.reshape(*mat.shape[:2], *out.shape[1:])

    def jac_t_mat_prod(self, module: Module, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, *out] -> [v, n, *in]``: ``A^T mat``, the vjp of ``A`` at zero."""
        zero = mat.new_zeros(mat.shape[0] * mat.shape[1], *io.inputs[0].shape[1:])
        _, pullback = vjp(lambda x: self.op(module, x), zero)
        out = pullback(mat.flatten(0, 1))[0]
        return out.reshape(*mat.shape[:2], *out.shape[1:])


def _keeps_batch(module: Module, first: int, what: str) -> None:
    """Raise if the op's first affected axis (``first``, possibly negative) is the batch axis."""
    if first == 0:
        raise ValueError(
            f"{module}: {what} the batch axis (0), so the batch cannot be kept apart in "
            "backpropagation. Keep axis 0 out of it (e.g. nn.Flatten(start_dim=1))."
        )


class ReshapeRule(LinearOpRule):
    """A reshape within each sample; ``J^T`` reshapes back to the input shape."""

    def jac_t_mat_prod(self, module: Module, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, *out] -> [v, n, *in]``: a reshape."""
        return mat.reshape(*mat.shape[:2], *io.inputs[0].shape[1:])


@register(nn.Flatten)
class FlattenRule(ReshapeRule):
    """``nn.Flatten(start_dim, end_dim)``."""

    def check(self, module: nn.Flatten, io: IO, request: Request | None) -> None:
        _keeps_batch(module, module.start_dim % io.inputs[0].dim(), "flattens")


@register(nn.Unflatten)
class UnflattenRule(ReshapeRule):
    """``nn.Unflatten(dim, sizes)``."""

    def check(self, module: nn.Unflatten, io: IO, request: Request | None) -> None:
        _keeps_batch(module, module.dim % io.inputs[0].dim(), "unflattens")


@register(Permute)
class PermuteRule(LinearOpRule):
    """``Permute``: ``J^T`` applies the inverse permutation."""

    def jac_t_mat_prod(self, module: Permute, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, *out] -> [v, n, *in]``: the inverse permutation (batch axis stays first)."""
        dims = [d % (mat.dim() - 1) for d in module.dims]  # output axis j is input axis dims[j]
        inverse = sorted(range(len(dims)), key=lambda j: dims[j])
        return mat.permute(0, *(d + 1 for d in inverse))


@register(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
class UpsampleRule(LinearOpRule):
    """``nn.Upsample`` (nearest, linear, bilinear, bicubic, trilinear; size or scale factor):
    linear in the input for every mode."""

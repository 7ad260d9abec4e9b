"""Torch function calls between extended modules (``x + h``, ``x.view(...)``, ``torch.cat``,
``F.gelu``, ``torch.matmul``, ...), recorded in forward (``backpack.engine.ops``) as ``Op``
pseudo-modules, so that every rule-based quantity flows through them.

An ``Op`` replays one call: ``forward(*xs)`` is the function applied to the recorded arguments
with the tensors that flow in the graph (``xs``) put back, constants as recorded, and the
parameters it reads (its own ``p0, p1, ...``, so ``functional_call`` can differentiate them).
A tensor computed from parameters and constants alone without the batch axis (a position
embedding of ids ``[1, T]``, ``gamma.reshape(1, -1, 1, 1)``) is derived: its ``Call`` is
replayed from the parameters inside each call that consumes it, so that call's per-sample
quantities cover those parameters (autograd would sum their gradient over the batch before
any hook saw it).

``OpRule`` is the automatic ``torch.func`` rule without its warning (recorded calls are
expected to have none); ``MergeRule`` adds the exact backward of a view that merges the batch
with the axes after it (``logits.view(-1, C)`` of ``[N, T, C]``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module, Parameter
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_unflatten

from backpack._state import disable
from backpack.derivatives.automatic import AutogradRule
from backpack.derivatives.base import IO, Request, Rule
from backpack.registry import register

IN, CONST, PARAM, DERIVED = range(4)  # kinds of the tensor arguments of a recorded call


# functions affine in their tensor arguments jointly, and multilinear ones (affine in any one
# argument); division is affine in its numerator (by names: methods, dunders and functions)
_AFFINE = frozenset(
    ("add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "__isub__",
     "sub_", "neg", "__neg__", "negative", "view", "view_as", "reshape", "reshape_as", "flatten",
     "unflatten", "permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t",
     "contiguous", "expand", "expand_as", "__getitem__", "__setitem__", "cat", "concat",
     "concatenate", "stack", "hstack", "vstack", "chunk", "split", "tensor_split", "unbind",
     "squeeze", "unsqueeze", "mean", "sum", "pad", "roll", "flip", "narrow", "select",
     "index_select", "gather", "to", "type_as", "clone", "float", "double", "repeat", "tile",
     "repeat_interleave", "diagonal", "tril", "triu", "cumsum", "masked_fill", "where",
     "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
     "adaptive_avg_pool3d", "diag_embed", "unfold", "fold", "interpolate")
)  # fmt: skip
_MULTILINEAR = frozenset(
    ("mul", "__mul__", "__rmul__", "__imul__", "mul_", "multiply", "matmul", "__matmul__",
     "__rmatmul__", "bmm", "mm", "einsum", "linear", "conv1d", "conv2d", "conv3d",
     "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "outer", "dot", "baddbmm",
     "addmm", "addbmm")
)  # fmt: skip
_DIVISION = frozenset(("div", "__truediv__", "__itruediv__", "div_", "divide", "true_divide"))


_ADDITIONS = frozenset(("add", "__add__", "__radd__", "__iadd__", "add_"))


def _added(call: Call, p: Tensor) -> bool:
    """Whether ``call`` is ``x + p``: the parameter itself added to one input (no ``alpha``)."""
    kinds = [k for k, _ in call.slots]
    return (
        getattr(call.func, "__name__", "") in _ADDITIONS
        and sorted(kinds) == sorted([IN, PARAM])
        and any(k == PARAM and r is p for k, r in call.slots)
    )


def _affine_in(call: Call, positions: list[int]) -> bool:
    """Whether ``call`` is affine in the leaves at ``positions`` jointly (its second
    derivative w.r.t. them vanishes)."""
    name = getattr(call.func, "__name__", "")
    if call.module is not None:
        return False
    if name in _AFFINE:
        return True
    if name in _MULTILINEAR:
        return len(positions) <= 1
    return name in _DIVISION and positions in ([], [0])


def func_name(func: Any) -> str:
    """A readable name of a torch function (``torch.cat``, ``Tensor.view``)."""
    name = getattr(func, "__name__", repr(func))
    owner = getattr(func, "__objclass__", None) or getattr(func, "__self__", None)
    if owner is not None and hasattr(owner, "__name__"):
        return f"{owner.__name__}.{name}"
    module = getattr(func, "__module__", None) or ""
    return f"{module.replace('torch.nn.functional', 'F')}.{name}" if module else name


def is_inplace(func: Any) -> bool:
    """Whether ``func`` writes into its first argument (``add_``, ``__iadd__``, setitem)."""
    name = getattr(func, "__name__", "")
    if name.startswith("__"):
        return name.startswith("__i") and name != "__init__" or name == "__setitem__"
    return name.endswith("_")


class Call:
    """One call ``func(*args, **kwargs)`` (or of an extended ``module``, whose parameters it
    reads too) with its tensor arguments sorted by kind: the leaves of ``(args, kwargs)``,
    ``None`` where an input flows in (``IN``) or a parameter or derived tensor (a ``Call``
    itself) is put in at replay."""

    __slots__ = ("func", "spec", "leaves", "slots", "inplace", "out_index", "module")

    def __init__(
        self, func: Any, spec: Any, leaves: list, slots: list, out_index: int | None = None,
        module: Module | None = None,
    ):  # fmt: skip
        self.func, self.spec, self.leaves, self.slots = func, spec, leaves, slots
        self.inplace = is_inplace(func)
        self.out_index = out_index  # several outputs: which float output this call gives
        self.module = module

    def params(self) -> list[Parameter]:
        """The parameters read, directly or through derived tensors (in order, once each)."""
        found: dict[int, Parameter] = {}
        if self.module is not None:
            found.update((id(p), p) for p in self.module.parameters() if p.requires_grad)
        for kind, ref in self.slots:
            if kind == PARAM:
                found.setdefault(id(ref), ref)
            elif kind == DERIVED:
                for p in ref.params():
                    found.setdefault(id(p), p)
        return list(found.values())

    def replay(self, xs: tuple, lookup: Any) -> Tensor:
        """The call with inputs ``xs`` and each parameter ``p`` as ``lookup(p)``."""
        leaves, it = list(self.leaves), iter(xs)
        for pos, (kind, ref) in enumerate(self.slots):
            if kind == IN:
                leaves[pos] = next(it)
            elif kind == PARAM:
                leaves[pos] = lookup(ref)
            elif kind == DERIVED:
                leaves[pos] = ref.replay((), lookup)
        args, kwargs = tree_unflatten(leaves, self.spec)
        if self.module is not None:
            state = {k: lookup(p) for k, p in self.module.named_parameters()}
            with disable():
                return torch.func.functional_call(self.module, state, args, kwargs)
        if self.func is F.scaled_dot_product_attention:  # the fused kernels lack forward AD
            with sdpa_kernel(SDPBackend.MATH):
                return self.func(*args, **kwargs)
        if self.inplace:  # on a copy: the recorded input stays as it was
            args = (args[0].clone(memory_format=torch.contiguous_format), *args[1:])
            out = self.func(*args, **kwargs)
            out = args[0]
        else:
            out = self.func(*args, **kwargs)
        if self.out_index is None:
            return out
        return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)][self.out_index]


class Op(Module):
    """A recorded function call as a module: ``forward(*xs)`` replays it (module docstring).
    Its parameters ``p0, p1, ...`` are the parameters the call reads (the same objects: what
    extensions store on them lands on the model's parameters)."""

    def __init__(self, call: Call):
        super().__init__()
        self.call = call
        self._names: dict[int, str] = {}
        for i, p in enumerate(call.params()):
            self.register_parameter(f"p{i}", p)
            self._names[id(p)] = f"p{i}"

    def forward(self, *xs: Tensor) -> Tensor:
        return self.call.replay(xs, self._lookup)

    def _lookup(self, p: Tensor) -> Tensor:
        name = self._names.get(id(p))
        return p if name is None else getattr(self, name)  # functional_call swaps these

    def extra_repr(self) -> str:
        return func_name(self.call.func)


@register(Op)
class OpRule(AutogradRule):
    """A recorded call, differentiated by ``torch.func`` (``AutogradRule``) without a warning;
    the recorded inputs suffice (no output kept, no fingerprint: torch functions are pure)."""

    needs_output = False
    after_losses_ok = True  # ``loss_a + loss_b`` inside the model's forward

    def on_forward(self, module: Module, io: IO, output: Tensor) -> None:
        pass

    def check(self, module: Module, io: IO, request: Request | None) -> None:
        pass

    param_names = Rule.param_names  # its own parameters (AutogradRule's looks into children)

    kron_input_rows = True  # an added position embedding [1, P, *feat]: rows are positions

    def kron_factors(self, module: Module, io: IO, mat: Tensor, name: str) -> list | None:
        """A parameter ``[1, P, *feat]`` added to an input ``[n, P, *feat]`` (a ViT's position
        embedding) reads row ``p`` at position ``p``, as ``PositionalEmbedding``: one block
        ``(a [1, n, 1, P, P], b [v, n, 1, F, P])``, ``a`` the one-hot rows. Other parameters
        have no Kronecker structure: their exact block ``[G]`` (``AutogradRule``)."""
        p = module.get_parameter(name)
        if not (_added(module.call, p) and p.dim() > 1 and p.shape[0] == 1):
            return super().kron_factors(module, io, mat, name)
        if tuple(mat.shape[2:]) != tuple(p.shape[1:]):  # broadcast within a sample
            return super().kron_factors(module, io, mat, name)
        n, rows = mat.shape[1], p.shape[1]
        eye = torch.eye(rows, dtype=mat.dtype, device=mat.device)
        b = mat.flatten(3).transpose(2, 3)[:, :, None]
        return [(eye.expand(1, n, 1, rows, rows), b)]

    def residual_factors(self, module: Module, io: IO, g: Any) -> list[tuple[float, Any]]:
        """None for a call affine in its inputs jointly (most calls between modules: sums,
        reshapes, indexing, products with one input): skips ``D`` Hessian-vector products."""
        if _affine_in(module.call, [i for i, (k, _) in enumerate(module.call.slots) if k == IN]):
            return []
        return super().residual_factors(module, io, g)

    def param_residual_diag(
        self, module: Module, io: IO, g: Any, name: str, sum_batch: bool = True
    ) -> Tensor | None:
        if self._affine_in_param(module, name):
            return None
        return super().param_residual_diag(module, io, g, name, sum_batch)

    def param_residual_mat_prod(
        self, module: Module, io: IO, g: Any, name: str, mat: Tensor
    ) -> Tensor | None:
        if self._affine_in_param(module, name):
            return None
        return super().param_residual_mat_prod(module, io, g, name, mat)

    @staticmethod
    def _affine_in_param(module: Module, name: str) -> bool:
        p, call = module.get_parameter(name), module.call
        if any(k == DERIVED for k, _ in call.slots):
            return False  # replayed through any function of the parameters
        return _affine_in(call, [i for i, (k, r) in enumerate(call.slots) if k == PARAM and r is p])


class Merge(Op):
    """A view merging the batch with the ``k - 1`` axes after it: ``[N, a, ..., *rest] ->
    [N * k, *rest]`` (``k = a * ...``)."""

    def __init__(self, call: Call, k: int):
        super().__init__(call)
        self.k = k


@register(Merge)
class MergeRule(OpRule):
    """Each merged row is a sample of what follows (a token of a language model's loss): its
    columns stay on their own row, so ``[v, N * k, *rest]`` maps to ``[v * k, N, a, ...,
    *rest]`` with column ``(v, j)`` nonzero only at row ``j`` of its sample (``k`` times the
    columns; summing them instead would add the cross terms between rows)."""

    def jac_t_mat_prod(self, module: Module, io: IO, mat: Tensor) -> Tensor:
        return unmerge(mat, module.k, io.inputs[0].shape)

    def jac_t_sampled(self, module: Module, io: IO, mat: Tensor) -> Tensor:
        """Sampled columns (independent, zero mean across rows): the plain reshape sums the
        rows' draws of each sample, whose outer product has the same expectation (the cross
        terms vanish), ``k`` times fewer columns than ``unmerge``."""
        return mat.reshape(mat.shape[0], *io.inputs[0].shape)


def unmerge(mat: Tensor, k: int, in_shape: tuple) -> Tensor:
    """``[v, N * k, *rest] -> [v * k, *in_shape]``, column ``(v, j)`` on merged row ``j``."""
    v, n = mat.shape[0], in_shape[0]
    rows = mat.reshape(v, n, k, -1)
    out = rows.new_zeros(v, k, n, k, rows.shape[-1])
    idx = torch.arange(k, device=mat.device)
    out[:, idx, :, idx] = rows.permute(2, 0, 1, 3)
    return out.reshape(v * k, *in_shape)


def merged_rows(in_shape: tuple, out_shape: tuple) -> int | None:
    """``k`` if ``out_shape`` merges the first axes of ``in_shape`` (``[N, a, b, *rest] ->
    [N * a * b, *rest]``), else None."""
    for t in range(2, len(in_shape) + 1):
        if tuple(in_shape[t:]) == tuple(out_shape[1:]):
            k = math.prod(in_shape[1:t])
            if k > 1 and out_shape[0] == in_shape[0] * k:
                return k
    return None

"""Rules: the Jacobian-product math of one module type (``backpack.registry`` maps types to rules).

Shape letters, used in docstrings and einsum strings throughout the package:
    v  vector axis (columns of a backpropagated matrix; 1 for a plain gradient)
    n  batch
    i  / o  input / output features (per group)
    g  groups
    s  shared positions (spatial positions of a convolution, extra dims of a Linear input)
    c  classes (model outputs of a loss)

A rule is stateless. Its methods receive the module and ``io``, the record of one forward call
(``io.inputs``, ``io.output``, ``io.kwargs``, detached), plus what flows backward:
    jac_t_mat_prod(module, io, mat)                       [v, n, *out] -> [v, n, *in]
        (modules with several tensor inputs return a tuple, one entry per input, None where
        an input is not differentiated)
    jac_mat_prod(module, io, mat)                         [v, n, *in]  -> [v, n, *out]
    param_jac_t_mat_prod(module, io, mat, name, sum_batch) [v, n, *out] -> [v, (n,) *param]
    param_jac_mat_prod(module, io, mat, name)             [v, *param]  -> [v, n, *out]
First-order quantities (``batch_grad``, ``batch_l2``, ``sum_grad_squared``) default to reductions
of ``param_jac_t_mat_prod`` and are overridden where a contraction is cheaper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call
from torch.nn import Module


@dataclass(frozen=True)
class Request:
    """What a rule's ``check`` learns of the extension asking (rules never see extensions)."""

    name: str  # the extension's class name, for messages
    second_order: bool = False  # it backpropagates factors of the loss Hessian
    subsampled: bool = False  # it restricts per-sample quantities to some samples


@dataclass(slots=True)
class IO:
    """Detached inputs, output and keyword arguments of one forward call of a module.

    ``cache`` memoises, for one backward pass (the engine clears it after the call ran), what
    several methods or extensions need of this call. Every key, with producer -> consumers:

    Shared between a rule's methods (every extension asking gets the same tensor):
        ``("batch_grad", name)``: ``Rule.batch_grad`` (and overrides) -> ``grad``,
            ``batch_l2``, ``sum_grad_squared`` (``Variance`` asks for all of them)
        ``("grad", name)``: ``LinearFormRule.sum_grad_squared`` -> ``LinearFormRule.grad``
        ``("argmax",)``: ``MaxPoolRule.on_forward`` (what autograd saved) -> its products
    Private to one rule (forward quantities its products share):
        ``("df",)`` elementwise f'; ``("factors",)`` linear-form input/output factors;
        ``("unfolded_input",)`` conv patches; ``"stats"`` BatchNorm statistics; ``"norm"``
        normalisation layers; ``"layout"``, ``"segments"`` embeddings; ``"grads"``,
        ``"proj_inputs"``, ``("mat", id, shape)`` attention; ``"factors"``,
        ``("mat", id, shape)`` recurrent layers; ``"fingerprint"``, ``"vjp"`` automatic rule
    Written by extensions (shared by the Kronecker extensions of one backward pass):
        ``("kron_A", mode)``, ``("kron_A", name, block, mode)``: the input-side factor ``A``
    """

    inputs: tuple[Any, ...]
    output: Any
    kwargs: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)  # per-backward memo shared by extensions

    @property
    def input0(self) -> Tensor:
        """The first input."""
        return self.inputs[0]


class Rule:
    """Jacobian products of one module type (see the module docstring for shapes)."""

    needs_output = True  # store the module's output in forward (else only its inputs)
    # whether backward reads the input of an in-place call (a module with ``inplace=True``) as
    # it was before the call overwrote it: then the engine copies the input in a forward
    # pre-hook (what autograd does for such layers, e.g. ``hardswish_``). Rules that recover
    # their derivative from the overwritten input (ReLU: the output's sign is the input's)
    # set it False: no copy
    inplace_needs_input = True
    is_loss = False
    # first-order quantities are differentiable w.r.t. parameters and inputs when computed with
    # grad mode on (backward(create_graph=True)): plain tensor ops of the record and ``g``
    differentiable = True

    def on_forward(self, module: Module, io: IO, output: Tensor) -> None:
        """Called with the graph-attached output when the call is recorded: a place to keep
        what autograd saved anyway (into ``io.cache``) instead of recomputing it in backward."""

    def batch_axis(self, module: Module) -> int:
        """Axis of the batch in the module's input, output and output gradient."""
        return 0

    def subsample(self, module: Module, io: IO, g: Tensor, idx: list[int]) -> tuple[IO, Tensor]:
        """Restrict record and output gradient to the samples ``idx``."""
        ax = self.batch_axis(module)
        index = torch.tensor(idx, device=g.device)
        n = g.shape[ax]

        def pick(t: Any) -> Any:
            batched = isinstance(t, Tensor) and t.dim() > ax and t.shape[ax] == n
            return t.index_select(ax, index) if batched else t

        sub = IO(tuple(pick(t) for t in io.inputs), pick(io.output), io.kwargs)
        return sub, pick(g)

    def param_names(self, module: Module) -> list[str]:
        """Names of the module's own trainable parameters this rule differentiates."""
        return [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]

    # a loss whose factors carry this tag already hold the residual of the rule that names it
    # in ``closes_tag`` (NLLLoss after LogSoftmax: "nll"); None: untagged
    origin_tag: str | None = None
    # the tag of a loss right after this module that already holds this module's Hessian
    # residual: factors that all carry it pass untagged and without the residual
    closes_tag: str | None = None
    # Kronecker factors of a weight stored input side first ([A, G]: Embedding, positions)
    kron_input_rows = False

    def check(self, module: Module, io: IO, request: Request | None) -> None:
        """Raise a clear error if the extension ``request`` describes is undefined for this
        module's configuration (None: second-order extensions in general)."""

    def couples_samples(self, module: Module) -> bool:
        """Whether each output depends on every sample (BatchNorm with batch statistics)."""
        return False

    def refuse_coupled(self, module: Module, request: Request) -> None:
        """Raise for an extension that does not accept coupled samples (``couples_samples``)."""
        raise NotImplementedError(
            f"{request.name}: {module} couples the samples, so per-sample quantities are not "
            "defined."
        )

    def has_kron_factors(self) -> bool:
        """Whether the rule gives Kronecker factors (overrides ``kron_factors``)."""
        return type(self).kron_factors is not Rule.kron_factors

    def kron_factors(self, module: Module, io: IO, mat: Tensor, name: str) -> list | None:
        """Kronecker blocks ``[(a, b)]`` of parameter ``name`` in the Linear layout (see
        ``backpack.extensions.secondorder.kron``), or None where it has no Kronecker structure."""
        raise NotImplementedError(f"{type(self).__name__} has no Kronecker factors")

    # whether a call may receive no backpropagated quantity (a recorded function call on the
    # outputs of losses, which start the streams upstream of it)
    after_losses_ok = False

    # whether jac_t_mat_prod returns new tensors that nothing else references: then a stream
    # may hand them to jac_t_mat_prod_, which overwrites its argument
    fresh_jac_t = False

    def jac_t_mat_prod(self, module: Module, io: IO, mat: Tensor) -> Tensor:
        """``J^T mat``: ``[v, n, *out] -> [v, n, *in]`` (a tuple for several inputs)."""
        raise NotImplementedError(f"{type(self).__name__} has no jac_t_mat_prod")

    jac_t_mat_prod_: Any = None  # optional: jac_t_mat_prod computed in the memory of ``mat``

    def jac_t_sampled(self, module: Module, io: IO, mat: Tensor) -> Tensor | None:
        """``J^T`` of Monte-Carlo columns (independent, zero mean) where a cheaper map keeps
        their expected outer product (``MergeRule``: the tokens' draws of a sample summed);
        None: ``jac_t_mat_prod``.

        Returns:
            ``[v', n, *in]``, or None.
        """
        return None

    def jac_mat_prod(self, module: Module, io: IO, mat: Tensor) -> Tensor:
        """``J mat``: ``[v, n, *in] -> [v, n, *out]``."""
        raise NotImplementedError(f"{type(self).__name__} has no jac_mat_prod")

    def residual_diag(self, module: Module, io: IO, g: Tensor) -> Tensor | None:
        """Hessian residual ``d2out/din2 . g`` as a diagonal ``[n, *in]``, for an elementwise
        layer ``f``: ``f''(x) * g``. None where the layer is (piecewise) linear in its input.

        Returns:
            ``[n, *in]``, or None.
        """
        return None

    def residual_factors(self, module: Module, io: IO, g: Any) -> list[tuple[float, Any]]:
        """Signed factors ``[(sign, R [r, n, *in])]`` with ``sum sign R R^T`` the Hessian
        residual ``sum_k g_k d2out_k/din2`` (block-diagonal over samples); ``[]`` where the
        layer is linear in its input. Modules with several inputs give ``R`` as a tuple, one
        ``[r, n, *in_i]`` (or None) per input. Default: ``residual_diag`` split by sign;
        non-elementwise layers override it, e.g. with ``dense_factors``.

        Returns:
            The signed factors, ``[]`` for a layer linear in its input.
        """
        diag = self.residual_diag(module, io, g)
        if diag is None:
            return []
        parts = ((1.0, diag.clamp(min=0)), (-1.0, (-diag).clamp(min=0)))
        return [(sign, diag_columns(part.sqrt())) for sign, part in parts if part.any()]

    def param_residual_diag(
        self, module: Module, io: IO, g: Any, name: str, sum_batch: bool = True
    ) -> Tensor | None:
        """Diagonal of ``sum_k g_k d2out_k/dtheta2`` ``[(n,) *param]``, the parameter's own
        Hessian residual (DiagHessian adds it); None where the output is linear in it.

        Returns:
            ``[(n,) *param]``, or None.
        """
        return None

    def param_residual_mat_prod(
        self, module: Module, io: IO, g: Any, name: str, mat: Tensor
    ) -> Tensor | None:
        """``(sum_k g_k d2out_k/dtheta2) mat`` ``[V, *param]`` over the batch, the parameter's
        own Hessian residual times ``mat [V, *param]`` (HMP adds it); None where the output is
        linear in it.

        Returns:
            ``[V, *param]``, or None.
        """
        return None

    def param_jac_t_mat_prod(
        self, module: Module, io: IO, mat: Tensor, name: str, sum_batch: bool = True
    ) -> Tensor:
        """``J_theta^T mat``: ``[v, n, *out] -> [v, (n,) *param]`` for parameter ``name``."""
        raise NotImplementedError(f"{type(self).__name__} has no parameter Jacobian")

    def param_jac_mat_prod(self, module: Module, io: IO, mat: Tensor, name: str) -> Tensor:
        """``J_theta mat``: ``[v, *param] -> [v, n, *out]`` (first output of a tuple), generic:
        forward-mode AD of the recorded forward call, one tangent per ``v``.

        Returns:
            ``[v, n, *out]``.
        """
        param = getattr(module, name).detach()
        # copies: a forward pass in training mode updates running statistics in place
        buffers = {k: b.clone() for k, b in module.named_buffers(recurse=False)}

        def forward(p: Tensor) -> Tensor:
            out = functional_call(module, {**buffers, name: p}, io.inputs, io.kwargs)
            return out[0] if isinstance(out, tuple) else out

        def tangent(v: Tensor) -> Tensor:
            return torch.func.jvp(forward, (param,), (v,))[1]

        with torch.no_grad():  # no graph, and the forward hook records nothing without grad
            return torch.func.vmap(tangent)(mat)

    def param_diag(
        self, module: Module, io: IO, mat: Tensor, name: str, sum_batch: bool = True
    ) -> Tensor:
        """``sum_v (J^T mat)_v ** 2``: ``[v, n, *out] -> [(n,) *param]``, a GGN diagonal block."""
        out = self.param_jac_t_mat_prod(module, io, mat, name, sum_batch=False).square().sum(0)
        return out.sum(0) if sum_batch else out

    # first-order quantities; ``g`` is the gradient w.r.t. the output, [n, *out]
    def batch_grad(
        self, module: Module, io: IO, g: Tensor, name: str, out: Tensor | None = None
    ) -> Tensor:
        """Per-sample gradients ``[n, *param]``; rules may write them into ``out`` (a free
        buffer of that shape) instead of fresh memory.

        Returns:
            ``[n, *param]`` (``out`` itself where given).
        """
        key = ("batch_grad", name)
        if key not in io.cache:
            io.cache[key] = self.param_jac_t_mat_prod(
                module, io, g.unsqueeze(0), name, sum_batch=False
            )[0]
        return io.cache[key]

    def add_batch_grad(
        self, module: Module, io: IO, g: Tensor, name: str, acc: Tensor
    ) -> Tensor | None:
        """Add the per-sample gradients into ``acc`` ``[n, *param]`` in place, where a rule
        does that cheaper than computing them apart (an embedding: its rows); None: it does not.

        Returns:
            ``acc``, or None.
        """
        return None

    def grad(self, module: Module, io: IO, g: Tensor, name: str) -> Tensor:
        """Gradient summed over the batch ``[*param]``."""
        key = ("batch_grad", name)
        if key in io.cache:
            return io.cache[key].sum(0)
        return self.param_jac_t_mat_prod(module, io, g.unsqueeze(0), name, sum_batch=True)[0]

    def batch_l2(self, module: Module, io: IO, g: Tensor, name: str) -> Tensor:
        """Squared norms of the per-sample gradients ``[n]``."""
        return self.batch_grad(module, io, g, name).flatten(1).square().sum(1)

    def sum_grad_squared(self, module: Module, io: IO, g: Tensor, name: str) -> Tensor:
        """Sum over samples of the squared per-sample gradients ``[*param]``."""
        return self.batch_grad(module, io, g, name).square().sum(0)


class LossRule(Rule):
    """Rule of a loss module (inputs: model output, target): roots of the second-order backward.

    ``S = sqrt_hessian(...)`` ``[c, n, *out]`` satisfies ``sum_c S_c S_c^T = d2 loss / d out2``
    (the reduction's normaliser included: each column carries ``1/sqrt(normaliser)``).
    """

    is_loss = True

    def sqrt_hessian(self, module: Module, io: IO) -> Tensor:
        """Exact symmetric factor of the loss Hessian w.r.t. the model output ``[c, n, *out]``."""
        raise NotImplementedError

    def sqrt_hessian_sampled(self, module: Module, io: IO, mc_samples: int) -> Tensor:
        """Monte-Carlo factor ``[m, n, *out]`` (targets drawn from the model's likelihood,
        scaled by ``1/sqrt(m)``) whose outer product has the loss Hessian as expectation."""
        raise NotImplementedError

    def sqrt_hessian_lean(self, module: Module, io: IO) -> Tensor:
        """An exact factor with as few columns as the rule can give (same ``S S^T``; the
        columns need not be ``sqrt_hessian``'s): what flows when no extension stores them.

        Returns:
            ``[c', n, *out]``, ``c'`` at most ``sqrt_hessian``'s columns.
        """
        return self.sqrt_hessian(module, io)


def diag_columns(root: Tensor) -> Tensor:
    """``[n, *out] -> [d, n, *out]``, ``d = prod(out)``: column ``i`` is ``root`` at entry ``i``."""
    n, shape = root.shape[0], root.shape[1:]
    flat = root.reshape(n, -1)
    return torch.diag_embed(flat).permute(2, 0, 1).reshape(flat.shape[1], n, *shape)


def dense_factors(hess: Tensor, shape: tuple[int, ...]) -> list[tuple[float, Tensor]]:
    """Signed factors of per-sample symmetric matrices ``hess [n, D, D]`` by eigendecomposition:
    ``[(+1, R+), (-1, R-)]`` with ``R [D, n, *shape]`` and ``R+ R+^T - R- R-^T = hess``.

    Returns:
        ``[(sign, R)]``, only the signs whose part is nonzero.
    """
    evals, evecs = torch.linalg.eigh(hess)
    n = hess.shape[0]
    out = []
    for sign, lam in ((1.0, evals.clamp(min=0)), (-1.0, (-evals).clamp(min=0))):
        if lam.any():
            cols = (evecs * lam.sqrt().unsqueeze(1)).permute(2, 0, 1)  # [D (column), n, D]
            out.append((sign, cols.reshape(-1, n, *shape)))
    return out


def blockwise_factors(hess: Tensor, dim: int) -> list[tuple[float, Tensor]]:
    """Signed factors of a residual made of independent ``[c, c]`` blocks, one per sample and
    position, coupling the entries along axis ``dim`` of the input ``[n, *in]``.

    ``hess`` ``[n, *rest, c, c]``: the blocks, with ``rest`` the input's other axes in order.
    Returns ``[(sign, R [p * c, n, *in])]``, ``p = prod(rest)``: column ``(q, j)`` is eigenvector
    ``j`` of block ``q`` scaled by ``sqrt(|eigenvalue|)``, zero at every other position.

    Returns:
        ``[(sign, R)]``, only the signs whose part is nonzero.
    """
    n, rest, c = hess.shape[0], hess.shape[1:-2], hess.shape[-1]
    evals, evecs = torch.linalg.eigh(hess)
    p = math.prod(rest)
    eye = torch.eye(p, dtype=hess.dtype, device=hess.device)
    out = []
    for sign, lam in ((1.0, evals.clamp(min=0)), (-1.0, (-evals).clamp(min=0))):
        if lam.any():
            cols = (evecs * lam.sqrt().unsqueeze(-2)).reshape(n, p, c, c)  # [n, q, entry, j]
            r = torch.einsum("pq,nqcj->pjnqc", eye, cols).reshape(p * c, n, *rest, c)
            out.append((sign, r.movedim(-1, dim + 1)))
    return out


def chunks(n: int, per_sample: int, budget: int = 1 << 24) -> list[slice]:
    """Batch slices whose per-sample tensors of ``per_sample`` elements fit in ``budget``."""
    step = max(1, budget // max(per_sample, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]

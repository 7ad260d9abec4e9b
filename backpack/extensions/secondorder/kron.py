"""Kronecker factors ``[G, A]`` of the curvature of linear-form layers (Linear, ConvNd,
ConvTransposeNd): the machinery behind KFAC, KFLR and KFRA (``secondorder.hbp``).

Layout (row-major vec, as ``backpack.utils.kroneckers.kfacs_to_mat``): weight -> ``[G, A]`` with
``G ⊗ A`` approximating the weight's curvature block, bias -> ``[G]``. Linear ``[o, i]``: ``G
[o, o]``, ``A [i, i]``; ConvNd ``[o, i, *k]``: ``G [o, o]``, ``A [i k, i k]``; ConvTransposeNd:
the factors of ``weight.transpose(0, 1)`` ``[o, i, *k]`` (a UserWarning says so on every call).
Groups ``g > 1``: the factors of the equivalent dense weight ``[o, i, *k]`` (zero outside the
group blocks), ``G = blockdiag(G_1..G_g)``, ``A = blockdiag(A_1..A_g)``: restricted to the entries
the grouped weight has, ``G ⊗ A = blockdiag_g(G_g ⊗ A_g)``, and damped inverses of the factors
keep that structure.

Scale: ``b`` is what flows to the layer's output (square-root factor, carrying the reduction's
``1/sqrt(normaliser)``), ``a`` the input-side patches at the output positions ``s``:
``G_g = sum_{v,n} (sum_s b)(sum_s b)^T`` (conv: summed over positions before the outer product,
as BackPACK; the KFC paper differs by the number of positions), ``A = (1/N) sum_{n,s} a a^T``.
The bias's ``[G]`` is ``sum_{v,n} (sum_s b)(sum_s b)^T`` over all channels, its exact GGN block.
Linear inputs with extra dims ``[N, *, i]`` (``S`` positions), ``kfac_approx``:
    ``"expand"`` (default): positions are extra samples, ``G = sum_{v,n,s} b b^T``,
        ``A = 1/(N S) sum_{n,s} a a^T`` (exact on deep linear nets whose loss treats every
        position separately);
    ``"reduce"``: ``G = sum_{v,n} (sum_s b)(sum_s b)^T``, ``A = (1/N) sum_n abar abar^T`` with
        ``abar = mean_s a`` (exact where the positions are pooled before the loss).
KFRA replaces ``sum_{v,n} b b^T`` by the backpropagated dense ``[D, D]`` block (``DenseStream``,
branching included).

Other rules opt in with ``kron_factors(module, io, mat, name)``: the blocks ``[(a, b)]`` of a
weight in the Linear layout (``a [1, n, 1, i, s]``, ``b [v, n, 1, o, s]`` for ``mat``), or None
for a parameter without Kronecker structure, which gets ``[G]``, its exact GGN block (KFRA: the
batch-averaged one). ``kfac_approx`` applies as for Linear, ``b`` may differ per sample (KFRA
averages ``F_n G F_n^T`` over the samples). A weight of several row blocks (``nn.
MultiheadAttention``'s ``in_proj_weight`` ``[3E, E]``: q, k, v) keeps the curvature blocks of its
row blocks only: ``[blockdiag(G_1..G_k), A]`` if all blocks share ``A`` (self-attention,
``mha(x, x, x)``: one Kronecker product, ``kfacs_to_mat`` applies), else a list of pairs
``[[G_1, A_1], .., [G_k, A_k]]`` (different query/key/value inputs).

Rules whose weight ``W [in, out]`` has its rows on the input side (``kron_input_rows``:
Embedding ``[V, D]``, EmbeddingBag, PositionalEmbedding ``[P, *feat]``, ``a`` one-hot rows) give
``[A, G]`` instead, still row-major: ``A ⊗ G`` approximates the weight's block. Normalisation
layers (LayerNorm, RMSNorm, GroupNorm, InstanceNorm, eval-mode BatchNorm) return None: their
elementwise scale and shift get ``[G]``.

Samples coupled by a later BatchNorm with batch statistics (train mode) leave ``A`` without
meaning: every Kronecker extension raises there.

A weight used by several calls (a module called several times, or one Parameter owned by
several modules of the same layout: two Linear layers sharing a weight) treats the calls as
extra positions, as ``"expand"`` does: ``G`` summed over the calls, ``A`` averaged over them,
``(sum_c G_c) ⊗ (mean_c A_c)`` for the exact ``sum_c G_c ⊗ A_c`` plus cross terms (the common
choice, exact where every call has the same ``A``). Parameters with the exact block ``[G]``
(biases) stay exact. A weight tied between layouts with ``A`` on different sides (an embedding
``[A, G]`` and an output layer ``[G, A]``, GPT-2's ``lm_head.weight is wte.weight``) raises:
the sum ``A_e ⊗ G_e + G_l ⊗ A_l`` has no Kronecker form, and summing position by position would
add activation to gradient statistics (cross terms ``A_e ⊗ A_l`` with no curvature in them).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from backpack.derivatives.conv import ConvFamilyRule, ConvRule
from backpack.derivatives.conv_transpose import ConvTransposeRule, _full_size_gap
from backpack.derivatives.linear_form import LinearFormRule
from backpack.engine.call import Call
from backpack.engine.reuse import Pieces
from backpack.extensions.secondorder.base import SecondOrderExtension
from backpack.extensions.secondorder.dense import (
    Dense,
    DenseStream,
    columns,
    out_layout,
    sandwich,
)
from backpack.utils.conv import get_conv_transpose_function, patch_gram, unfolded_gram

KFAC_APPROX = ("expand", "reduce")


def _map_factors(factors: list, fn: Any, a_at: int = 1, at: tuple = ()) -> list:
    """``factors`` (``[G, A]``, ``[A, G]`` with ``a_at=0``, ``[G]`` or lists of these) with each
    factor ``f`` replaced by ``fn(position, f, is_a)``."""
    return [
        fn((*at, i), f, i == a_at) if isinstance(f, Tensor) else _map_factors(f, fn, a_at, (*at, i))
        for i, f in enumerate(factors)
    ]


def _a_at(rule: Any) -> int:
    """Position of ``A`` in a weight's factors: 0 where the weight's rows index the input side
    (``W [in, out]``: Embedding, positional embeddings; rule attribute ``kron_input_rows``)."""
    return 0 if rule.kron_input_rows else 1


def _group_blocks(mat: Tensor, groups: int) -> Tensor:
    """Diagonal blocks ``[g, B, B]`` of a ``[g B, g B]`` matrix."""
    b = mat.shape[0] // groups
    return mat.reshape(groups, b, groups, b).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def _blockdiag(blocks: Tensor) -> Tensor:
    return torch.block_diag(*blocks) if blocks.shape[0] > 1 else blocks[0]


def transposed_patches(module: Any, x: Tensor, out_size: Any) -> Tensor:
    """``[n, g, i/g * prod(k), T]``: the input entry each output position ``T`` of a transposed
    convolution reads per (input channel, kernel offset), by a transposed conv with a one-hot
    kernel; the weight of ``weight.transpose(0, 1)`` acts on these like a convolution's."""
    ks = module.kernel_size
    k = math.prod(ks)
    eye = torch.eye(k, dtype=x.dtype, device=x.device).reshape(1, k, *ks)
    gap = _full_size_gap(module, x.shape[2:], out_size)
    conv_t = get_conv_transpose_function(len(ks))
    flat = x.flatten(0, 1).unsqueeze(1)
    out = conv_t(flat, eye, None, module.stride, module.padding, gap, 1, module.dilation)
    return out.reshape(x.shape[0], module.groups, -1, out[0, 0].numel())


class KroneckerExtension(SecondOrderExtension):
    """Stores ``[G, A]`` per weight and ``[G]`` per bias of linear-form layers.

    Args:
        savefield: attribute on the parameters.
        stream: ``Stream`` (square-root factors: KFAC, KFLR) or ``DenseStream`` (KFRA).
        kfac_approx: ``"expand"`` or ``"reduce"``, for Linear inputs with extra dims.
    """

    def __init__(self, savefield: str, stream: Any, kfac_approx: str = "expand"):
        if kfac_approx not in KFAC_APPROX:
            raise ValueError(f"kfac_approx must be one of {KFAC_APPROX}, got {kfac_approx!r}")
        super().__init__(savefield)
        self.stream = stream
        self.kfac_approx = kfac_approx

    def store(self, call: Call, flowing: Any) -> None:
        params = call.params()
        if not params:
            return
        if isinstance(flowing, Dense):
            flowing = flowing.mat
        if isinstance(flowing, dict) and any(o.coupled for o in flowing):
            raise NotImplementedError(
                f"{type(self).__name__} on {call.module}: a later layer normalises with batch "
                "statistics (BatchNorm in training mode), which couples the samples; Kronecker "
                "factors assume independent samples (A is a second moment over the batch) and "
                "are not defined. Call model.eval() or use DiagGGNExact/SqrtGGNExact."
            )
        kron = call.rule.has_kron_factors()
        if not kron and not isinstance(call.rule, LinearFormRule):
            raise NotImplementedError(
                f"{type(self).__name__}: no Kronecker factorisation for {call.module} (parameters "
                f"{[n for n, _ in params]}): Kronecker factors exist for weights acting as a "
                "matrix on the input (Linear, ConvNd, ConvTransposeNd, MultiheadAttention, "
                "Embedding, EmbeddingBag, PositionalEmbedding, RNN/LSTM/GRU) and for "
                "normalisation layers. "
                "Freeze these parameters (requires_grad=False) or use a diagonal extension "
                "(DiagGGNExact) for them."
            )
        self.check_module(call)
        if kron:  # KFRA: G's columns on every sample, shared by all parameters
            cols = None
            if isinstance(self.stream, DenseStream):
                cols = columns(call, flowing, out_layout(call)[1])
            for name, param in params:
                setattr(param, self.savefield, self._rule_factors(call, flowing, name, cols))
            return
        if isinstance(call.rule, ConvTransposeRule):
            warnings.warn(
                f"{type(self).__name__}: the Kronecker factors of {call.module} approximate the "
                "curvature of weight.transpose(0, 1) [out, in/groups, *kernel], not of weight.",
                UserWarning,
                stacklevel=2,
            )
        mode = "conv" if isinstance(call.rule, ConvFamilyRule) else self.kfac_approx
        bias_g = self._bias_g(call, flowing)
        for name, param in params:
            if name == "bias":
                setattr(param, self.savefield, [bias_g])
                continue
            groups = getattr(call.module, "groups", 1)
            if mode == "expand":
                g_blocks = self._expand_g(call, flowing)
            else:
                g_blocks = _group_blocks(bias_g, groups)
            setattr(param, self.savefield, [_blockdiag(g_blocks), _blockdiag(_a(call, mode))])

    def collect(self, call: Call, pieces: Pieces, flowing: Any) -> None:
        """A parameter used by several calls (a module called several times, or tied
        weights of modules with the same layout): its calls are extra positions
        (``"expand"``), each call's ``G`` is summed and its ``A`` averaged over the calls using
        the parameter. A parameter with the exact block ``[G]`` (a bias) keeps it exact: ``V^T
        V`` with ``V = sum_c J_c^T S_c`` (KFRA: the calls' blocks summed). ``store`` computes
        the call's factors (it sets them on the parameters; ``finish`` replaces them).

        Raises:
            NotImplementedError: for a parameter tied between modules whose factors have
                ``A`` on different sides (an embedding tied to an output layer: ``[A, G]``
                and ``[G, A]``): summing them would add activation to gradient statistics;
                and where one use has Kronecker factors and another only an exact block.
        """
        self.store(call, flowing)
        for name, param in call.params():
            factors, pid = getattr(param, self.savefield), id(param)
            layout = (factors, _a_at(call.rule), call.module)
            old = pieces.sums.setdefault(("kron_layout", self.savefield, pid), layout)
            if self._exact_block(factors) != self._exact_block(old[0]):
                raise NotImplementedError(
                    f"{type(self).__name__}: parameter '{name}' of {call.module} is tied to "
                    f"{old[2]}; one use has Kronecker factors, the other only its exact block "
                    "(no Kronecker structure), and their sum has neither. Use "
                    "DiagGGNExact/SqrtGGNExact for this parameter, freeze it "
                    "(requires_grad=False), or untie the weights."
                )
            if len(factors) > 1 and old[1] != layout[1]:
                raise NotImplementedError(
                    f"{type(self).__name__}: parameter '{name}' of {call.module} is tied to "
                    f"{old[2]}, whose Kronecker factors have the input-side factor A on the "
                    "other side ([A, G] of an embedding vs [G, A] of a linear layer): their "
                    "sum is no Kronecker product, and summing factor by factor would add "
                    "activation to gradient statistics. Use DiagGGNExact/SqrtGGNExact for "
                    "this parameter, freeze it (requires_grad=False), or untie the weights."
                )
            if self._exact_block(factors):
                self.add_pieces(call, call.io, flowing, name, pieces)
                continue
            key = (self.savefield, pid)
            _map_factors(factors, lambda at, f, _, key=key: pieces.add((*key, at), lambda: f))

    def finish(self, pieces: Pieces) -> None:
        for pid, param in pieces.params.items():
            layout, a_at, _ = pieces.sums[("kron_layout", self.savefield, pid)]
            if self._exact_block(layout):
                terms = pieces.terms(self._jac_t_key(pid)).values()
                cols = [(sign, v.flatten(2).flatten(0, 1)) for sign, v in terms]  # [v n, P]
                setattr(param, self.savefield, [_gram(cols)])
                continue
            uses = pieces.uses[pid]

            def total(at: tuple, _: Tensor, is_a: bool, pid: int = pid, uses: int = uses):
                return pieces.sums[(self.savefield, pid, at)] / (uses if is_a else 1)

            setattr(param, self.savefield, _map_factors(layout, total, a_at))

    def _exact_block(self, factors: list) -> bool:
        exact = len(factors) == 1 and isinstance(factors[0], Tensor)
        return exact and not isinstance(self.stream, DenseStream)

    def _bias_g(self, call: Call, flowing: Any) -> Tensor:
        """``sum_{v,n} (sum_s b)(sum_s b)^T`` ``[o, o]``."""
        bias_jac_t = call.rule.bias_jac_t
        if isinstance(self.stream, DenseStream):  # sum both sides of G over the positions
            out = call.grads[0].shape[1:]
            half = bias_jac_t(call.module, flowing.reshape(-1, 1, *out))[:, 0]
            return bias_jac_t(call.module, half.T.reshape(-1, 1, *out))[:, 0].T
        return _gram(
            [(sign, bias_jac_t(call.module, m).flatten(0, 1)) for sign, m in flowing.values()]
        )

    def _expand_g(self, call: Call, flowing: Any) -> Tensor:
        """``sum_{v,n,s} b b^T`` ``[g, B, B]``, positions as samples."""
        factors, module, io = call.rule.factors, call.module, call.io
        if isinstance(self.stream, DenseStream):  # G[(g,b,s), (g',c,s')] in the rule's layout
            d, out = flowing.shape[0], call.grads[0].shape[1:]
            half = factors(module, io, flowing.reshape(d, 1, *out))[1].reshape(d, -1)
            full = factors(module, io, half.T.reshape(-1, 1, *out))[1]
            groups, dim_b, s = full.shape[2:]
            full = full.reshape(groups, dim_b, s, groups, dim_b, s).diagonal(dim1=0, dim2=3)
            return torch.einsum("bscsg->gbc", full)
        return sum(
            sign * _g_of(factors(module, io, m)[1], "expand") for sign, m in flowing.values()
        )

    def _rule_factors(self, call: Call, flowing: Any, name: str, cols: Tensor | None) -> list:
        """From the rule's ``kron_factors`` blocks: ``[G, A]``, ``[blockdiag(G_1..G_k), A]`` if
        all blocks share ``A``, else ``[[G_1, A_1], .., [G_k, A_k]]``; ``[G]``, the exact GGN
        block, for parameters without Kronecker structure. KFRA: ``cols``, the columns of
        ``G`` on every sample, give ``(1/N) sum_n F_n G F_n^T`` for each sample's map ``F_n``."""
        rule, module, io, mode = call.rule, call.module, call.io, self.kfac_approx
        dense, n = cols is not None, out_layout(call)[1]
        terms = [] if dense else list(flowing.values())
        # the blocks of each term's factor (KFRA: of G's columns), computed once
        term_blocks = [(sign, rule.kron_factors(module, io, m, name)) for sign, m in terms]
        blocks = rule.kron_factors(module, io, cols, name) if dense else term_blocks[0][1]
        if blocks is None:

            def exact(mat: Tensor) -> Tensor:  # [v, n, P]
                out = rule.param_jac_t_mat_prod(module, io, mat, name, sum_batch=False)
                return out.flatten(2)

            if dense:
                return [sandwich(call, exact(cols), exact) / n]
            return [_gram([(sign, exact(m).flatten(0, 1)) for sign, m in terms])]
        pairs = []
        for i, (a, b) in enumerate(blocks):
            if dense:  # the whole (B s) x (B s) block, then over positions as in the mode

                def f(mat: Tensor, i: int = i) -> Tensor:
                    return rule.kron_factors(module, io, mat, name)[i][1].flatten(2)

                dim_b, s = b.shape[-2:]
                full = (sandwich(call, f(cols), f) / n).reshape(dim_b, s, dim_b, s)
                g = full.diagonal(dim1=1, dim2=3).sum(-1) if mode == "expand" else full.sum((1, 3))
            else:
                g = sum(sign * _g_of(bl[i][1], mode)[0] for sign, bl in term_blocks)
            key = ("kron_A", name, i, mode)
            if key not in io.cache:
                io.cache[key] = _a_of(a[0], mode)[0]
            pairs.append([g, io.cache[key]])
        if len(pairs) == 1:
            g, a = pairs[0]
            return [a, g] if _a_at(rule) == 0 else [g, a]
        if all(torch.equal(p[1], pairs[0][1]) for p in pairs[1:]):
            return [torch.block_diag(*(p[0] for p in pairs)), pairs[0][1]]
        return pairs


def _a(call: Call, mode: str) -> Tensor:
    """``A`` ``[g, A, A]`` of the input-side patches, shared by all Kronecker extensions."""
    key = ("kron_A", mode)
    if key not in call.io.cache:
        module, x, g = call.module, call.io.input0, call.grads[0]
        if isinstance(call.rule, ConvRule):
            call.io.cache[key] = patch_gram(module, x) / x.shape[0]
        elif isinstance(call.rule, ConvTransposeRule):
            call.io.cache[key] = _a_of(transposed_patches(module, x, g.shape[2:]), mode)
        else:
            call.io.cache[key] = _a_of(call.rule.factors(module, call.io, g[None])[0][0], mode)
    return call.io.cache[key]


def _a_of(a: Tensor, mode: str) -> Tensor:
    """``A`` ``[g, A, A]`` of input-side patches ``a [n, g, A, s]``: ``(1/N) sum_{n,s} a a^T``
    (``"conv"``), over ``N S`` instead (``"expand"``), of ``mean_s a`` (``"reduce"``)."""
    scale = 1.0 / a.shape[0]
    if mode == "reduce":
        a = a.mean(-1, keepdim=True)
    elif mode == "expand":
        scale /= a.shape[-1]
    return unfolded_gram(a) * scale


def _gram(cols: list[tuple[float, Tensor]]) -> Tensor:
    """``sum_k sign_k C_k^T C_k`` ``[P, P]`` of signed columns ``C_k [c, P]``: the exact block
    of a parameter whose ``C_k`` are ``J^T S_k`` (flattened over columns and samples)."""
    return sum(sign * c.T @ c for sign, c in cols)


def _g_of(b: Tensor, mode: str) -> Tensor:
    """``sum_{v,n,s} b b^T`` ``[g, B, B]`` of output-side matrices ``b [v, n, g, B, s]``:
    positions as samples (``"expand"``), else summed over positions first."""
    if mode != "expand":
        b = b.sum(-1, keepdim=True)
    return torch.einsum("vngbs,vngcs->gbc", b, b)

"""Second-order machinery: quantities that flow backward from the loss through every module.

A *stream* says what flows (a square root of the loss Hessian, exact or sampled; for the
Hessian also the residual terms of curved layers), how it starts at a loss and how it passes a
module. Extensions that need the same stream share one backpropagation of it. Flowing values are
keyed by the autograd identity ``(node, output index)`` of the tensor they belong to.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from backpack.engine.call import Call, Extension
from backpack.engine.factors import LOSS, RESIDUAL, Factor, Origin, couple
from backpack.engine.reuse import Pieces, start_mixed
from backpack.engine.watch import watch_gradients


@dataclass(frozen=True)
class Stream:
    """What flows backward: ``Factors`` (``backpack.engine.factors``), ``sum sign S S^T`` the
    curvature w.r.t. a module's output.

    Each loss is an origin with its exact (or, with ``mc_samples``, sampled) factor. Factors of one
    origin that reach a tensor along several paths are summed; different origins stay separate
    (their columns are unrelated). With ``residuals`` (the Hessian instead of the GGN) each curved
    layer adds its residual ``sum_k g_k d2out_k/din2`` as signed factors (for an elementwise layer
    ``diag(f'' g)`` split into positive and negative parts).

    A factor's column lives on one sample (block-diagonal curvature) until a module whose rule
    ``couples_samples`` (BatchNorm with batch statistics): there its origin becomes ``coupled``
    and its factor is expanded to ``[v * n, n, *out]`` so every column may span all samples;
    rules map it unchanged (their ``v`` is arbitrary).
    """

    mc_samples: int | None = None
    residuals: bool = False
    # MC: independent sets of ``mc_samples`` columns drawn at the loss, one per repetition of
    # a sample in ``subsampling`` (``[0, 0]``: two), so each entry gets its own draw
    draws: int = 1
    # whether an extension stores the loss's own columns (SqrtGGNExact): streams differing in
    # this alone are one stream; it flows the rule's columns if one of its extensions stores
    # them, else the fewest the rule can give (cross-entropy: C - 1 per position)
    stores_columns: bool = field(default=False, compare=False)

    def start(self, call: Call, scale: float, lean: bool = False) -> dict:
        if self.mc_samples is None and lean:
            root = call.rule.sqrt_hessian_lean(call.module, call.io)
        elif self.mc_samples is None:
            root = call.rule.sqrt_hessian(call.module, call.io)
        else:
            sampled = call.rule.sqrt_hessian_sampled
            roots = [sampled(call.module, call.io, self.mc_samples) for _ in range(self.draws)]
            root = roots[0] if self.draws == 1 else torch.cat(roots)  # [draws * m, n, *out]
        origin = Origin(id(call.io), tag=call.rule.origin_tag)
        return {origin: Factor(1.0, root if scale == 1.0 else root * scale**0.5)}

    def propagate(self, call: Call, terms: dict) -> list[dict]:
        """The signed factors w.r.t. each input of the module (one dict per input)."""
        outs: list[dict] = [{} for _ in range(max(len(call.in_keys), 1))]

        def put(origin: Any, sign: float, mats: Any) -> None:
            for i, m in enumerate(mats if isinstance(mats, tuple) else (mats,)):
                if m is not None:
                    outs[i][origin] = Factor(sign, m)

        couples = call.rule.couples_samples(call.module)
        for o, (s, m) in terms.items():
            if couples and not o.coupled:
                o, m = couple(o, m)
            out = None
            if self.mc_samples is not None and o.kind == LOSS:  # sampled columns
                out = call.rule.jac_t_sampled(call.module, call.io, m)
            put(o, s, _jac_t(call, m) if out is None else out)
        tag = call.rule.closes_tag
        if tag and all(o.tag == tag and not o.coupled for o in outs[0]):
            return [{o.untagged(): t for o, t in outs[0].items()}]  # the loss holds the residual
        for i, (sign, r) in enumerate(self.residual_factors(call)):
            put(Origin(id(call.io), i, RESIDUAL, coupled=couples), sign, r)
        return [o or None for o in outs]

    def end(self, value: Any) -> None:
        """A path reached the model's input with ``value`` (nothing to do here)."""

    def residual_factors(self, call: Call) -> list[tuple[float, Any]]:
        """The module's Hessian residual as signed factors (none for the GGN)."""
        if not self.residuals:
            return []
        return call.rule.residual_factors(call.module, call.io, call.g)

    @staticmethod
    def accumulate(old: dict, new: dict) -> dict:
        merged = dict(old)
        for o, (s, m) in new.items():
            merged[o] = (s, merged[o][1] + m) if o in merged else (s, m)
        for o in [o for o in merged if o.has_coupled_form_in(merged)]:  # both forms: couple
            s, m = merged.pop(o)
            key, m = couple(o, m)
            merged[key] = (s, merged[key][1] + m)
        return merged


_OWNER = "_backpack_owner"  # tensor attribute: the key of the tensor it is the factor for


def _jac_t(call: Call, mat: Tensor) -> Any:
    """``J^T mat`` to each input. A rule's fresh result is tagged with the input it flows to;
    reaching that tensor's module untouched (no extension saw it: it has no parameters),
    it is overwritten where the rule can."""
    rule, module, io = call.rule, call.module, call.io
    mine = getattr(mat, _OWNER, None) == call.out_key
    if mine and rule.jac_t_mat_prod_ and not call.params():
        return rule.jac_t_mat_prod_(module, io, mat)
    out = rule.jac_t_mat_prod(module, io, mat)
    if rule.fresh_jac_t:
        outs = out if isinstance(out, tuple) else (out,)
        ptrs = [t.untyped_storage().data_ptr() for t in (mat, *outs) if t is not None]
        for t, key in zip(outs, call.in_keys):
            fresh = t is not None and ptrs.count(t.untyped_storage().data_ptr()) == 1
            if fresh and t.is_contiguous():  # not a view of mat or of another input's factor
                setattr(t, _OWNER, key)
    return out


def mc_draws(mc_samples: int | None, subsampling: list[int] | None) -> int:
    """MC streams: how often the most repeated sample occurs in ``subsampling`` (else 1)."""
    if mc_samples is None or not subsampling:
        return 1
    return max(Counter(subsampling).values())


def _subsample(call: Call, flowing: Any, idx: list[int] | None, stream: Any) -> tuple[Any, Any]:
    """Restrict record and flowing matrices ``[v, n, ...]`` to the samples ``idx``. With
    ``stream.draws > 1`` (MC, repeated samples) the flowing matrices hold ``draws`` sets of
    columns ``[draws * m, n, ...]``; the ``k``-th repetition of a sample takes set ``k``."""
    if idx is None:
        return call.io, flowing
    device = call.grads[0].device
    io, _ = call.rule.subsample(call.module, call.io, call.grads[0], idx)
    index = torch.tensor(idx, device=device)
    draws = stream.draws
    if draws == 1:
        return io, {o: (s, m.index_select(1, index)) for o, (s, m) in flowing.items()}
    seen: Counter = Counter()
    sets = []  # the repetition number of each entry
    for i in idx:
        sets.append(seen[i])
        seen[i] += 1
    sets = torch.tensor(sets, device=device)
    return io, {
        o: (s, m.unflatten(0, (draws, -1))[sets, :, index].movedim(0, 1))
        for o, (s, m) in flowing.items()
    }


def _missing(call: Call, exts: list[Extension]) -> RuntimeError:
    names = ", ".join(type(e).__name__ for e in exts)
    return RuntimeError(
        f"{names}: module {call.module} received no backpropagated quantity. Either the loss is "
        "not extended (call extend(lossfunc)), the backward pass did not start at an extended "
        "loss, or a function call (x.view, +, torch.relu, ...) between extended modules ran "
        "outside the forward pass of a model passed to extend: extend the model itself "
        "(extend(model) records the function calls of its forward pass), or replace the call "
        "by a module (nn.Flatten, nn.ReLU, ...), or use extend(model, use_converter=True)."
    )


def _only_first_output(call: Call, stream: Any, flowing: dict, exts: list) -> None:
    """Raise where second-order quantities reach another output of a module with several
    (an RNN's final states): the rules pass the first output's only."""
    node, nr = call.out_key
    others = [k[2] for k in flowing if k[0] == stream and k[1] is node and k[2] != nr]
    if others:
        names = ", ".join(type(e).__name__ for e in exts)
        raise NotImplementedError(
            f"{names}: output {others[0]} of {call.module} (one of its {len(call.grads)} "
            "outputs) feeds the loss; second-order quantities pass the first output of a "
            "module with several only. Use its first output downstream (an RNN's sequence "
            "output holds the last step's hidden state), or a first-order extension."
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


def run_streams(
    call: Call, exts: tuple[Extension, ...], flowing: dict, pieces: Pieces | None = None
) -> None:
    """At one module: fetch (or, at a loss, start) each stream, store results (or, for a
    module called several times, add the call's ``pieces``), pass it on."""
    groups: dict[Any, list[Extension]] = {}
    for ext in exts:
        if ext.stream is not None:
            groups.setdefault(ext.stream, []).append(ext)
    if not call.rule.is_loss:
        watch_gradients(call)
    for stream, group in groups.items():
        if call.rule.is_loss:  # the root: what flows into the loss's input
            call.rule.check(call.module, call.io, group[0].request)
            # the loss's own columns where they are stored, or handed to set_module_extension
            # handlers (BackPACK 1.7's [C, N, *out] for cross-entropy); else the fewest
            lean = not any(e.stream.stores_columns or e.module_exts for e in group)
            new = [stream.start(call, _loss_scale(call), lean)]
        else:
            value = flowing.pop((stream, *call.out_key), None)
            if len(call.grads) > 1:
                _only_first_output(call, stream, flowing, group)
            if value is None and call.rule.after_losses_ok:
                continue  # a call on the losses' outputs (their sum): the losses start streams
            if value is None:
                raise _missing(call, group)
            mine = value
            if stream.residuals and any(o.mixed for o in value):
                # mixed second derivatives of a reused module belong to its calls only
                mine = {o: t for o, t in value.items() if not o.mixed or o.source == id(pieces)}
            for ext in group:
                if pieces is None:
                    ext.store(call, mine)
                else:
                    ext.collect(call, pieces, mine)
            if not any(call.in_keys):  # the path ends here (the model's input)
                stream.end(value)
                continue
            new = stream.propagate(call, value)
            new = new if isinstance(new, list) else [new]
            if pieces is not None and stream.residuals:
                start_mixed(call, pieces, new)
        send(flowing, stream, call.in_keys, new)


def send(flowing: dict, stream: Any, in_keys: tuple, values: list) -> None:
    """Hand what flows to each input (None: nothing) to the module producing it, accumulated
    where one tensor feeds several modules."""
    for key, value in zip(in_keys, values):
        if key is not None and value is not None:
            old = flowing.get((stream, *key))
            flowing[(stream, *key)] = value if old is None else stream.accumulate(old, value)

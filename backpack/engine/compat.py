"""Dispatch to BackPACK's per-extension handlers (``ext.set_module_extension(cls, handler)``).

The handlers' call convention is described in ``backpack.extensions.module_extension``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.loss import _Loss

from backpack.engine.call import HANDLED_TYPES, Call, Extension
from backpack.engine.factors import Factor, Origin
from backpack.engine.streams import _missing, send


def run_module_extensions(
    call: Call, exts: tuple[Extension, ...], flowing: dict
) -> tuple[Extension, ...]:
    """Run the extensions that have a handler for ``call.module``; return the others.

    A second-order stream is passed on by the first handler's ``backpropagate``, unless one of
    the others needs the same stream (then their rule passes it on, once).
    """
    if type(call.module) not in HANDLED_TYPES:
        return exts
    handlers = {e: h for e in exts if (h := e.module_extension_for(call.module)) is not None}
    if not handlers:
        return exts
    rest = tuple(e for e in exts if e not in handlers)
    groups: dict[Any, list[tuple[Extension, Any]]] = {}
    with _exposed(call):
        for ext, handler in handlers.items():
            handler.check_hyperparameters_module_extension(ext, call.module, None, call.grads)
            if ext.stream is None:
                _store(call, ext, handler, None)
            else:
                groups.setdefault(ext.stream, []).append((ext, handler))
        shared = {e.stream for e in rest}
        for stream, group in groups.items():
            _run_stream(call, stream, group, flowing, pass_on=stream not in shared)
    return rest


def _run_stream(call: Call, stream: Any, group: list, flowing: dict, pass_on: bool) -> None:
    """Store each extension of ``group`` from the factors flowing to the module's output and,
    with ``pass_on``, map them to the inputs by the first handler's ``backpropagate``."""
    key = (stream, *call.out_key)
    value = flowing.pop(key, None) if pass_on else flowing.get(key)
    ext, handler = group[0]
    if value is None:
        if not pass_on:
            return  # the rule of the others starts the stream, or reports it missing
        if not isinstance(call.module, _Loss):
            raise _missing(call, [e for e, _ in group])
        root = handler.backpropagate(ext, call.module, None, call.grads, None)
        new = _per_input(call, {Origin(id(call.io)): Factor(1.0, root)})
    else:
        for e, h in group:
            _store(call, e, h, value)
        if not pass_on:
            return
        terms = {}
        for origin, (sign, mat) in value.items():
            mapped = handler.backpropagate(ext, call.module, None, call.grads, mat)
            if mapped is None:
                raise NotImplementedError(
                    f"{type(ext).__name__}: the handler {type(handler).__name__} of "
                    f"{type(call.module).__name__} returned None from backpropagate; a "
                    "second-order extension needs the matrix for the module's input."
                )
            terms[origin] = (sign, mapped)
        new = _per_input(call, terms)
    send(flowing, stream, call.in_keys, new)


def _per_input(call: Call, terms: dict) -> list[dict | None]:
    """``{origin: (sign, mats)}``, ``mats`` one matrix or a tuple (one per input, None where
    an input is not differentiated) -> one ``{origin: (sign, mat)}`` per input (None: none)."""
    outs: list[dict] = [{} for _ in call.in_keys]
    for origin, (sign, mats) in terms.items():
        for i, mat in enumerate(mats if isinstance(mats, tuple) else (mats,)):
            if mat is not None:
                outs[i][origin] = (sign, mat)
    return [out or None for out in outs]


def _store(call: Call, ext: Extension, handler: Any, value: Any) -> None:
    """``ext``'s value of each parameter in ``handler.params``: the handler's function applied to
    the output gradient alone (``value`` None, first order) or to the flowing factors, summed
    with their signs (factors of one sign concatenated along ``v``: one call per sign)."""
    module = call.module
    params = [(n, getattr(module, n, None)) for n in handler.params]
    params = [(n, p) for n, p in params if isinstance(p, Tensor) and p.requires_grad]
    if not params:
        return
    factors = [(1.0, None)] if value is None else _by_sign(call, ext, value)
    for name, param in params:
        fn = getattr(handler, name)
        parts = [(sign, fn(ext, module, None, call.grads, mat)) for sign, mat in factors]
        single = len(parts) == 1 and parts[0][0] == 1.0
        setattr(param, ext.savefield, parts[0][1] if single else sum(s * v for s, v in parts))


def _by_sign(call: Call, ext: Extension, value: dict) -> list[tuple[float, Tensor]]:
    """Flowing factors ``{origin: (sign, S [v, n, *out])}`` concatenated along ``v`` per sign."""
    if any(origin.coupled for origin in value):
        raise NotImplementedError(
            f"{type(ext).__name__}: a layer after {call.module} couples the samples (BatchNorm "
            "with batch statistics); its module extension gets per-sample factors only. Use "
            "model.eval(), or register a Rule for the module instead."
        )
    by_sign: dict[float, list[Tensor]] = {}
    for sign, mat in value.values():
        by_sign.setdefault(sign, []).append(mat)
    return [(s, mats[0] if len(mats) == 1 else torch.cat(mats)) for s, mats in by_sign.items()]


@contextmanager
def _exposed(call: Call) -> Iterator[None]:
    """``module.input0``, ``input1``, ..., ``module.output`` during the handlers' calls (names
    the module already uses are left alone)."""
    module = call.module
    attrs = {f"input{i}": t for i, t in enumerate(call.io.inputs)}
    attrs["output"] = call.io.output
    attrs = {k: v for k, v in attrs.items() if not hasattr(module, k)}
    for k, v in attrs.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k in attrs:
            delattr(module, k)

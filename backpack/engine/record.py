"""The per-call record: what the backward driver needs of one forward call of a module.

It is referenced only from the hook on the autograd node that produced the call's output, so it
lives exactly as long as the autograd graph; the driver frees it after use.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from functools import partial
from typing import Any
from weakref import WeakSet, ref

import torch
from torch import Tensor
from torch.nn import Module, Parameter
from torch.utils._pytree import tree_flatten, tree_map

from backpack._state import current_state
from backpack.derivatives.base import IO
from backpack.engine.call import HANDLED_TYPES
from backpack.registry import rule_for

_HOLDING: WeakSet = WeakSet()  # records holding their node, a C++ node (``_drop_dead_nodes``)


def _drop_dead_nodes() -> None:
    """Free the records whose retained graph the user dropped.

    A record holding the C++ node whose hook holds it is a cycle the collector sees only once
    nothing else holds the node, so a dropped graph would be freed one node per collection
    (upstream nodes are held by downstream ones). Exactly then the node's referents (its hook
    dicts) become visible: dropping the node frees the record, and its upstream nodes in turn.
    """
    while dead := [r for r in _HOLDING if gc.get_referents(r.node)]:
        for r in dead:
            _HOLDING.discard(r)
            r.node = None


class _LiveRecords(WeakSet):
    """The unreleased forward records of one module, or of a group of modules that own a
    common Parameter object (``tie``); the group's key in ``STATE.shared`` (identity).
    Copied and pickled empty with the module (records belong to the autograd graph of one
    forward pass); modules of a group keep one set in a copy (``deepcopy`` memo, pickle)."""

    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other

    def __reduce__(self) -> tuple:
        return (type(self), ())


# id of a Parameter -> (weak reference to it, the hooked modules whose rule owns it), for
# ``tie`` (by id: a WeakKeyDictionary compares tensor keys with ==)
_OWNERS: dict[int, tuple[ref, WeakSet]] = {}


def owned(module: Module) -> list[Parameter]:
    """The Parameter objects of ``module``'s rule (frozen ones included: they may thaw)."""
    rule = rule_for(module)
    params = {id(p): p for p in module.parameters(recurse=False)}
    for name in rule.param_names(module) if rule is not None else ():
        p = module.get_parameter(name)
        params[id(p)] = p
    return list(params.values())


def tie(modules: Iterable[Module]) -> None:
    """Give hooked modules whose rules own a common Parameter object (a tied embedding and
    output layer, a shared projection) one set of live records: a call of either is then
    ``shared`` while a call of another is live, and its pieces go to the group's ``Pieces``
    (summed per Parameter object). Runs at ``extend`` (nothing per forward call); any caller
    that records calls of modules of its own (functional calls) may call it for them.
    """
    modules = list(modules)
    for m in modules:
        for p in owned(m):
            if id(p) not in _OWNERS:  # the entry leaves with its parameter
                _OWNERS[id(p)] = (ref(p, partial(_forget, id(p))), WeakSet())
            _OWNERS[id(p)][1].add(m)
    done: set[int] = set()
    for m in modules:
        if id(m) in done:
            continue
        group, stack = {id(m): m}, [m]
        while stack:  # the modules reached through common parameters
            for p in owned(stack.pop()):
                for peer in _OWNERS.get(id(p), (None, ()))[1]:
                    # a peer that no longer owns it (weights untied since) is no peer
                    if id(peer) not in group and any(q is p for q in owned(peer)):
                        group[id(peer)] = peer
                        stack.append(peer)
        done.update(group)
        _join(list(group.values()))


def _forget(key: int, dead: ref) -> None:
    if key in _OWNERS and _OWNERS[key][0] is dead:
        del _OWNERS[key]


def _join(group: list[Module]) -> None:
    """One set of live records for exactly the modules of ``group`` (their live records kept;
    a module untied from its former group gets a set of its own)."""
    sets = {id(s): s for m in group if (s := m.__dict__.get("_backpack_calls")) is not None}
    old = next(iter(sets.values()), None)
    members = getattr(old, "members", None)
    if len(group) == 1 and (members is None or len(members) <= 1):
        return  # an untied module with its own set (or none yet): the common case
    mine = all(m.__dict__.get("_backpack_calls") is old for m in group)
    if mine and members is not None and set(map(id, members)) == set(map(id, group)):
        return  # already exactly this group
    live = _LiveRecords()
    for s in sets.values():
        moved = [r for r in s if any(r.module is m for m in group)]
        live.update(moved)
        for r in moved:
            s.discard(r)
        for m in group:
            getattr(s, "members", WeakSet()).discard(m)
    if len(live) > 1:
        for r in live:
            r.shared = True
    live.members = WeakSet(group)
    for m in group:
        m.__dict__["_backpack_calls"] = live


class _Record:
    """What the backward driver needs of one forward call.

    ``shared``: another call of the module (or of a module owning one of its Parameter
    objects, ``tie``) was recorded while this one was alive, so both may be reached in one
    backward pass and must sum their contributions (``_collect``); it takes
    that path only if they may (``_reached_twice``), as a live record of an earlier, retained
    graph marks the calls after it too. ``node``: the autograd node that runs this record, kept
    once it ran in a retained graph (for ``_reached_twice``; see ``_drop_dead_nodes``).
    """

    __slots__ = (
        "module", "rule", "io", "graph_inputs", "node", "in_keys", "out_nr", "shared", "state",
        "lowp", "__weakref__",
    )  # fmt: skip

    def __init__(self, module: Module, args: tuple, kwargs: dict, output: Any, in_keys: tuple):
        self.module = module
        # the module's unreleased records (they leave it when released or with their graph);
        # once two are live all are marked, so marking one other suffices
        if _HOLDING:
            _drop_dead_nodes()
        live = module.__dict__.get("_backpack_calls")
        if live is None:
            live = module.__dict__["_backpack_calls"] = _LiveRecords()
        self.shared = bool(live)  # cheap when empty, the common case
        if self.shared:
            next(iter(live)).shared = True
        live.add(self)
        self.out_nr = output.output_nr if isinstance(output, Tensor) else 0
        self.rule = rule_for(module)  # hooked modules always have one (_wants_hook)
        self.state = current_state()  # the backward hooks may run on another thread
        keep_out = self.rule.needs_output or type(module) in HANDLED_TYPES
        # under autocast, what ran in low precision is kept in float32 (the parameters' dtype
        # of a model autocast applies to) so that every product in backward has one dtype
        self.lowp = _autocast_dtype(output)
        # detached: a hook whose closure reaches its own node through a stored tensor (the
        # output, or an input that a later in-place op ties to this call) is a leaking cycle
        inputs = tuple(_detach(a, self.lowp) for a in args)
        out = _detach(output, self.lowp) if keep_out else None
        self.io = IO(inputs, out, kwargs and _detach(kwargs, self.lowp))
        # the inputs as given, for quantities differentiated after backward(create_graph=True):
        # their nodes lie upstream of this call's, so no cycle (parametrised modules are never
        # in place, whose input is their output)
        self.graph_inputs = args if module._parameters or module._modules else None
        if isinstance(output, Tensor):
            self.rule.on_forward(module, self.io, output)
        self.in_keys = in_keys
        self.node = None  # the node running this record, once it ran in a retained graph

    def release(self) -> None:
        self.io = self.graph_inputs = self.node = None
        self.module.__dict__["_backpack_calls"].discard(self)


def _detach(obj: Any, lowp: torch.dtype | None = None) -> Any:
    """``obj``'s tensors detached, those of dtype ``lowp`` (autocast's) cast to float32."""

    def one(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        return t.detach() if t.dtype != lowp else t.detach().float()

    return one(obj) if isinstance(obj, Tensor) else tree_map(one, obj)


def _autocast_dtype(output: Any) -> torch.dtype | None:
    """The low-precision dtype of an autocast region active on ``output``'s device, or None."""
    t = output if isinstance(output, Tensor) else None
    if t is None:
        t = next((x for x in tree_flatten(output)[0] if isinstance(x, Tensor)), None)
    if t is None or not torch.is_autocast_enabled(t.device.type):
        return None
    return torch.get_autocast_dtype(t.device.type)

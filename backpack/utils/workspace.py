"""Reusable memory for the largest tensors of a backward pass (CPU).

Allocations above the C allocator's mmap threshold (glibc: at most 32 MB) get fresh pages from
the system and return them when freed, so a tensor of that size page-faults afresh in every
backward pass, and writing fresh pages costs several times writing mapped ones. The curvature
streams make such tensors (``c`` columns per sample behind the first layers). ``empty`` serves
them from buffers kept here, one per size, reused once no tensor uses them (the storage's use
count is this module's reference alone).

Bounds: a request drops the buffers no tensor uses that the last ``KEEP_PASSES`` backward passes
asking for memory did not use, so what is kept is what the recent passes needed at once (several
passes: a loop alternating extensions keeps each one's buffers); ``clear()`` drops all. CUDA
tensors and tensors under ``MIN_BYTES`` (and tensor subclasses, ``torch.func``'s wrapped
tensors, and results that join a graph, as under ``backward(create_graph=True)``) are plain
allocations (CUDA's caching allocator keeps memory itself).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

import backpack._torch_private as _tp

MIN_BYTES = 16 << 20
CHUNK_BYTES = 8 << 20  # chunks of ``chunked``: below glibc's largest threshold for fresh mmaps
_BUFFERS: list[list] = []  # [storage, backward pass that last used it]
KEEP_PASSES = 8
_PASSES: list[int] = []  # the ids of the last KEEP_PASSES backward passes that asked for memory


def _kept(nbytes: int, like: Tensor) -> bool:
    """Whether a tensor of ``nbytes`` like ``like`` comes from a kept buffer."""
    plain = type(like) is Tensor and not _tp.is_functorch_wrapped(like)
    kept = plain and like.device.type == "cpu" and nbytes >= MIN_BYTES
    # a result in a graph (backward(create_graph=True)) must not share a buffer reused later
    return kept and not (like.requires_grad and torch.is_grad_enabled())


def empty(shape: Sequence[int], like: Tensor) -> Tensor:
    """An uninitialised tensor of ``shape`` with ``like``'s dtype and device."""
    nbytes = math.prod(shape) * like.element_size()
    if not _kept(nbytes, like):
        return like.new_empty(shape)
    task = _tp.graph_task_id()
    if task not in _PASSES:
        _PASSES[:] = [*_PASSES[1 - KEEP_PASSES :], task]
    free = {id(b) for b in _BUFFERS if _tp.storage_use_count(b[0]) == 1}  # no tensor uses them
    _BUFFERS[:] = [b for b in _BUFFERS if b[1] in _PASSES or id(b) not in free]
    match = next((b for b in _BUFFERS if id(b) in free and b[0].nbytes() == nbytes), None)
    if match is None:
        match = [torch.UntypedStorage(nbytes), task]
        _BUFFERS.append(match)
    match[1] = task
    return like.new_empty(0).set_(match[0], 0, tuple(shape))


def chunked(fn: Callable[[Tensor], Tensor], x: Tensor, shape: Sequence[int]) -> Tensor:
    """``fn(x)`` of ``shape``, for ``fn`` acting on each entry of the leading axis alike (an op
    without ``out=``, as a transposed convolution): a result that ``empty`` keeps is written
    into its buffer chunk by chunk, each chunk's own result small enough to be reused memory.

    Returns:
        ``fn(x)``, of ``shape``.
    """
    per_entry = math.prod(shape[1:]) * x.element_size()
    if not _kept(shape[0] * per_entry, x):
        return fn(x)
    out = empty(shape, x)
    step = max(1, CHUNK_BYTES // per_entry)
    for i in range(0, shape[0], step):
        out[i : i + step] = fn(x[i : i + step])
    return out


def clear() -> None:
    """Drop the kept buffers (those still in use stay alive with their tensors)."""
    _BUFFERS.clear()

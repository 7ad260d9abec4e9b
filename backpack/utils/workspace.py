"""Memory for the largest tensors of a backward pass, kept for the next pass (CPU).

On Linux, glibc serves every allocation over 32 MB by a fresh ``mmap`` and returns it to the
system when it is freed, so each step page-faults such tensors afresh: on this project's 2-core
machine, writing new memory costs about 0.5 ms per MB, several times writing kept memory. The
curvature streams make tensors of ``c`` columns per sample (3C3D, DiagGGNExact: 231 MB behind the
first conv). ``empty`` serves those from buffers kept here, one per size, reused once no tensor
uses them any more (the storage's use count is this module's reference alone).

Bounds: a buffer unused in the last two backward passes is dropped when a new one is made, so
what is kept is what the recent passes needed at once; ``clear()`` drops all. CUDA tensors and
tensors under ``MIN_BYTES`` (and tensor subclasses, ``torch.func``'s wrapped tensors) are plain
allocations (CUDA's caching allocator keeps memory itself).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

MIN_BYTES = 16 << 20
_BUFFERS: list[list] = []  # [storage, backward pass that last used it]
_PASSES: list[int] = []  # the ids of the last two backward passes that asked for memory
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def empty(shape: Sequence[int], like: Tensor) -> Tensor:
    """An uninitialised tensor of ``shape`` with ``like``'s dtype and device."""
    nbytes = math.prod(shape) * like.element_size()
    plain = type(like) is Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(like)
    if not plain or like.device.type != "cpu" or nbytes < MIN_BYTES or _use_count is None:
        return like.new_empty(shape)
    task = torch._C._current_graph_task_id()
    if task not in _PASSES:
        _PASSES[:] = [*_PASSES[-1:], task]
    free = [b for b in _BUFFERS if _use_count(b[0]._cdata) == 1]
    match = next((b for b in free if b[0].nbytes() == nbytes), None)
    if match is None:
        _BUFFERS[:] = [b for b in _BUFFERS if b not in free or b[1] in _PASSES]
        match = [torch.UntypedStorage(nbytes), task]
        _BUFFERS.append(match)
    match[1] = task
    return like.new_empty(0).set_(match[0], 0, tuple(shape))


def clear() -> None:
    """Drop the kept buffers (those still in use stay alive with their tensors)."""
    _BUFFERS.clear()

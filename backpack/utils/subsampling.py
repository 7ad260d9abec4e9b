"""``subsample``: BackPACK's selection of samples along one axis."""

from __future__ import annotations

import torch
from torch import Tensor


def subsample(tensor: Tensor, dim: int = 0, subsampling: list[int] | None = None) -> Tensor:
    """``tensor`` restricted to the indices ``subsampling`` (any order, repeats allowed) along
    ``dim``; the tensor itself if ``subsampling`` is None.

    Returns:
        The restricted tensor (``tensor`` itself without ``subsampling``).
    """
    if subsampling is None:
        return tensor
    index = torch.as_tensor(subsampling, dtype=torch.long, device=tensor.device)
    return tensor.index_select(dim, index)

"""``Permute``: a module version of ``Tensor.permute`` that keeps the batch axis first."""

from __future__ import annotations

from torch import Tensor, nn


class Permute(nn.Module):
    """``input.permute(*dims)``; with ``init_transpose=True`` ``dims`` is a pair to swap.

    Raises:
        ValueError: if the permutation moves the batch axis (axis 0).
    """

    def __init__(self, *dims: int, init_transpose: bool = False):
        super().__init__()
        self.dims = dims
        self.init_transpose = init_transpose
        if not init_transpose:
            self._check(dims)

    @staticmethod
    def _check(dims: tuple[int, ...]) -> None:
        if dims and dims[0] != 0:
            raise ValueError("Permute: Batch axis must be left unchanged!")

    def forward(self, input: Tensor) -> Tensor:
        if self.init_transpose:
            dims = list(range(input.dim()))
            a, b = (d % input.dim() for d in self.dims)
            dims[a], dims[b] = dims[b], dims[a]
            self.dims, self.init_transpose = tuple(dims), False
            self._check(self.dims)
        return input.permute(*self.dims)

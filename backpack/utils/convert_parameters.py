"""Conversion between a flat parameter vector and a list of parameter-shaped tensors."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor
from torch.nn.utils import parameters_to_vector as parameter_list_to_vector

__all__ = ["parameter_list_to_vector", "vector_to_parameter_list"]


def vector_to_parameter_list(vec: Tensor, parameters: Iterable[Tensor]) -> list[Tensor]:
    """Split ``vec`` ``[sum_i P_i]`` into views ``[*P_1], [*P_2], ...`` shaped like ``parameters``.

    Inverse of ``parameter_list_to_vector`` (``torch.nn.utils.parameters_to_vector``): the
    pieces are taken in order and share memory with ``vec`` (unlike torch's
    ``vector_to_parameters``, which copies into the parameters).

    Args:
        vec: one-dimensional tensor with as many entries as all parameters together.
        parameters: the tensors whose shapes the pieces take, in order.

    Returns:
        Views of ``vec``, one per parameter, with the parameter's shape.

    Raises:
        TypeError: if ``vec`` is not a tensor.
        ValueError: if ``vec`` is not one-dimensional or its length differs from the total
            number of parameter entries.
    """
    if not isinstance(vec, Tensor):
        raise TypeError(f"expected vec to be a torch.Tensor, got {type(vec).__name__}")
    parameters = list(parameters)
    numels = [p.numel() for p in parameters]
    if vec.dim() != 1 or vec.numel() != sum(numels):
        raise ValueError(
            f"vec must be one-dimensional with {sum(numels)} entries (the total number of "
            f"entries of the {len(parameters)} parameters), got shape {tuple(vec.shape)}"
        )
    return [piece.view_as(p) for piece, p in zip(vec.split(numels), parameters, strict=True)]

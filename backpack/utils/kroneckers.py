"""Kronecker products ``K = A_1 ⊗ A_2 ⊗ ...`` of matrices and (square factors) their damped
inverses.

Conventions (row-major, as ``torch.kron``): for factors ``[r_k, c_k]`` the product is
``[R, C]``, ``R = r_1 r_2 ...``, ``C = c_1 c_2 ...``, and index ``(i_1, i_2, ...)`` of
``[r_1, r_2, ...]`` is row ``i_1 r_2 r_3 ... + i_2 r_3 ... + ...`` of ``K`` (columns alike).
Matrices ``mat`` multiplied by ``K`` have shape ``[C, V]`` (or ``[C]`` for a single vector).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import reduce
from numbers import Real

import torch
from torch import Tensor

_MAX_INV_EIGVAL = 1e8  # clamp bound for 1 / (eigenvalue + shift) of nearly singular factors


def is_matrix(t: Tensor) -> bool:
    """Whether ``t`` has two dimensions."""
    return t.dim() == 2


def is_vector(t: Tensor) -> bool:
    """Whether ``t`` has one dimension."""
    return t.dim() == 1


def kfacs_to_mat(factors: Sequence[Tensor]) -> Tensor:
    """Dense Kronecker product ``A_1 ⊗ A_2 ⊗ ...`` of ``[r_k, c_k]`` factors: ``[R, C]``.

    Args:
        factors: one or more matrices.

    Returns:
        ``[R, C]`` with ``R = prod(r_k)``, ``C = prod(c_k)``.
    """
    _check_factors(factors)
    return reduce(two_kfacs_to_mat, factors)


def two_kfacs_to_mat(A: Tensor, B: Tensor) -> Tensor:
    """Dense Kronecker product ``A ⊗ B`` of ``[a, a']`` and ``[b, b']``: ``[a b, a' b']``."""
    return torch.kron(A, B)


def kfac_mat_prod(factors: Sequence[Tensor]) -> Callable[[Tensor], Tensor]:
    """Return ``mat ↦ (A_1 ⊗ A_2 ⊗ ...) mat`` for ``mat`` ``[C, V]`` (or ``[C]``): ``[R, V]``.

    The Kronecker product is never formed: ``mat`` is viewed as ``[c_1, c_2, ..., V]`` and each
    factor is contracted with its own axis, costing ``O(C V sum_k r_k)`` (square factors)
    instead of ``O(R C V)``.

    Args:
        factors: one or more matrices ``[r_k, c_k]``.
    """
    _check_factors(factors)
    cols = [A.shape[1] for A in factors]
    C, R = math.prod(cols), math.prod(A.shape[0] for A in factors)

    def mat_prod(mat: Tensor) -> Tensor:
        if mat.dim() not in (1, 2) or mat.shape[0] != C:
            raise ValueError(
                f"expected mat of shape [{C}, V] or [{C}] for Kronecker factors of shapes "
                f"{[tuple(A.shape) for A in factors]}, got {tuple(mat.shape)}"
            )
        result = mat.reshape(*cols, *mat.shape[1:])
        for axis, A in enumerate(factors):
            # contract A's columns with axis `axis`; tensordot puts A's row axis first
            result = torch.tensordot(A, result, dims=([1], [axis])).movedim(0, axis)
        return result.reshape(R, *mat.shape[1:])

    return mat_prod


def apply_kfac_mat_prod(factors: Sequence[Tensor], mat: Tensor) -> Tensor:
    """``(A_1 ⊗ A_2 ⊗ ...) mat`` for ``mat`` ``[D, V]`` (or ``[D]``); see ``kfac_mat_prod``."""
    return kfac_mat_prod(factors)(mat)


def inv_kfac_mat_prod(
    factors: Sequence[Tensor], shift: float | Sequence[float] | None = None
) -> Callable[[Tensor], Tensor]:
    """Return ``mat ↦ ((A_1 + λ_1 I)⁻¹ ⊗ (A_2 + λ_2 I)⁻¹ ⊗ ...) mat`` for ``mat`` ``[D, V]``.

    Uses ``(A ⊗ B)⁻¹ = A⁻¹ ⊗ B⁻¹``; the factor inverses come from ``inv_kfacs``.

    Args:
        factors: one or more symmetric square matrices ``[d_k, d_k]``.
        shift: damping ``λ_k`` added to each factor's diagonal; see ``inv_kfacs``.
    """
    return kfac_mat_prod(inv_kfacs(factors, shift))


def apply_inv_kfac_mat_prod(
    factors: Sequence[Tensor], mat: Tensor, shift: float | Sequence[float] | None = None
) -> Tensor:
    """``((A_1 + λ_1 I)⁻¹ ⊗ ...) mat`` for ``mat`` ``[D, V]``; see ``inv_kfac_mat_prod``."""
    return inv_kfac_mat_prod(factors, shift)(mat)


def inv_kfacs(
    factors: Sequence[Tensor], shift: float | Sequence[float] | None = None
) -> list[Tensor]:
    """Damped inverses ``(A_k + λ_k I)⁻¹`` ``[d_k, d_k]`` of symmetric factors, via ``eigh``.

    With ``A_k + λ_k I = Q diag(e) Qᵀ`` the inverse is ``Q diag(1 / e) Qᵀ`` where ``1 / e`` is
    clamped to ``[-1e8, 1e8]``, so (nearly) singular factors give large but finite results.

    Args:
        factors: one or more symmetric square matrices.
        shift: ``None`` (no damping), one number for all factors, or one number per factor.

    Raises:
        ValueError: if ``factors`` is empty or not square matrices, or a list of shifts does not
            have one entry per factor.

    Returns:
        The damped inverses, one per factor.
    """
    _check_factors(factors, square=True)
    if shift is None:
        shifts = [0.0] * len(factors)
    elif isinstance(shift, Real):
        shifts = [float(shift)] * len(factors)
    else:
        shifts = list(shift)
        if len(shifts) != len(factors):
            raise ValueError(
                f"got {len(shifts)} shifts for {len(factors)} Kronecker factors; pass one "
                "number for all factors or one per factor"
            )
    return [_damped_inverse(A, s) for A, s in zip(factors, shifts, strict=True)]


def _damped_inverse(A: Tensor, shift: float) -> Tensor:
    """``(A + shift I)⁻¹`` of a symmetric ``[d, d]`` matrix with clamped inverse eigenvalues."""
    evals, evecs = torch.linalg.eigh(A)
    inv_evals = (evals + shift).reciprocal().clamp(min=-_MAX_INV_EIGVAL, max=_MAX_INV_EIGVAL)
    return (evecs * inv_evals) @ evecs.T


def _check_factors(factors: Sequence[Tensor], square: bool = False) -> None:
    """Raise ``ValueError`` unless ``factors`` is a non-empty sequence of (square) matrices."""
    if len(factors) == 0:
        raise ValueError("expected at least one Kronecker factor, got none")
    for k, A in enumerate(factors):
        if not is_matrix(A) or (square and A.shape[0] != A.shape[1]):
            kind = "a square matrix (to invert it)" if square else "a matrix"
            raise ValueError(f"Kronecker factor {k} must be {kind}, got {tuple(A.shape)}")

"""backpack.utils: parameter-vector conversion, Kronecker-factor products and conv patch Grams,
against dense torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from backpack.utils.conv import patch_gram
from backpack.utils.convert_parameters import parameter_list_to_vector, vector_to_parameter_list
from backpack.utils.kroneckers import (
    apply_inv_kfac_mat_prod,
    apply_kfac_mat_prod,
    inv_kfac_mat_prod,
    inv_kfacs,
    is_matrix,
    is_vector,
    kfac_mat_prod,
    kfacs_to_mat,
    two_kfacs_to_mat,
)

SIZES = {"1": [4], "2": [3, 2], "3": [2, 3, 2]}
SHIFTS = {"none": None, "float": 0.3, "list": "per-factor"}


def _spd_factors(sizes: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Symmetric positive-definite factors (well-conditioned, so dense inverses are accurate)."""
    gen = torch.Generator().manual_seed(seed)
    factors = []
    for d in sizes:
        B = torch.randn(d, d, dtype=torch.float64, generator=gen)
        factors.append(B @ B.T + 0.5 * torch.eye(d, dtype=torch.float64))
    return factors


def _shifts(kind: str, n: int):
    shift = SHIFTS[kind]
    return [0.1 * (k + 1) for k in range(n)] if shift == "per-factor" else shift


def _dense(factors: list[torch.Tensor]) -> torch.Tensor:
    K = factors[0]
    for A in factors[1:]:
        K = torch.kron(K, A)
    return K


def _damped(factors, shift) -> list[torch.Tensor]:
    """``A_k + shift_k I`` with ``shift`` as ``inv_kfacs`` takes it (None, float, or list)."""
    shifts = shift if isinstance(shift, list) else [shift or 0.0] * len(factors)
    return [A + s * torch.eye(A.shape[0], dtype=A.dtype) for A, s in zip(factors, shifts)]


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
def test_kfacs_to_mat_and_products(sizes):
    factors = _spd_factors(sizes)
    K = _dense(factors)
    torch.testing.assert_close(kfacs_to_mat(factors), K)
    D = K.shape[0]
    mat = torch.randn(D, 5, dtype=torch.float64)
    torch.testing.assert_close(kfac_mat_prod(factors)(mat), K @ mat)
    torch.testing.assert_close(apply_kfac_mat_prod(factors, mat), K @ mat)
    vec = mat[:, 0]
    torch.testing.assert_close(apply_kfac_mat_prod(factors, vec), K @ vec)


def test_kfac_mat_prod_nonsymmetric_factors():
    """Row-major order and no implicit transpose: checked with non-symmetric factors."""
    gen = torch.Generator().manual_seed(3)
    factors = [torch.randn(d, d, dtype=torch.float64, generator=gen) for d in (2, 3, 4)]
    mat = torch.randn(24, 3, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(apply_kfac_mat_prod(factors, mat), _dense(factors) @ mat)


def test_two_kfacs_to_mat():
    A, B = _spd_factors([3, 2])
    torch.testing.assert_close(two_kfacs_to_mat(A, B), torch.kron(A, B))


@pytest.mark.parametrize("shift_kind", SHIFTS.keys())
@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
def test_inverse_products(sizes, shift_kind):
    factors = _spd_factors(sizes, seed=1)
    shift = _shifts(shift_kind, len(factors))
    damped = _damped(factors, shift)
    K_inv = torch.linalg.inv(_dense(damped))
    mat = torch.randn(K_inv.shape[0], 4, dtype=torch.float64)

    for inv, A in zip(inv_kfacs(factors, shift), damped):
        torch.testing.assert_close(inv, torch.linalg.inv(A))
    torch.testing.assert_close(inv_kfac_mat_prod(factors, shift)(mat), K_inv @ mat)
    torch.testing.assert_close(apply_inv_kfac_mat_prod(factors, mat, shift), K_inv @ mat)


def test_inv_kfacs_clamps_inverse_eigenvalues():
    """A singular factor gives a finite inverse whose largest eigenvalue is the clamp bound."""
    v = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    (inv,) = inv_kfacs([v @ v.T])
    assert torch.isfinite(inv).all()
    assert torch.linalg.eigvalsh(inv).abs().max().item() == pytest.approx(1e8)


def test_rectangular_factors():
    """``(A ⊗ B) mat`` for ``A [2, 3]``, ``B [4, 1]``: ``[8, 3] @ [3, V]``."""
    torch.manual_seed(0)
    A, B = torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    K = kfacs_to_mat([A, B])
    torch.testing.assert_close(K, torch.kron(A, B))
    assert K.shape == (8, 3) and is_matrix(K) and not is_vector(K) and is_vector(K[0])
    mat = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(apply_kfac_mat_prod([A, B], mat), K @ mat)
    torch.testing.assert_close(kfac_mat_prod([A, B])(mat[:, 0]), K @ mat[:, 0])


def test_kronecker_errors():
    A = torch.eye(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least one"):
        kfacs_to_mat([])
    with pytest.raises(ValueError, match="square"):
        inv_kfacs([A, torch.ones(2, 3)])
    with pytest.raises(ValueError, match="must be a matrix"):
        kfac_mat_prod([A, torch.ones(2)])
    with pytest.raises(ValueError, match="2 shifts for 3"):
        inv_kfacs([A, A, A], shift=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"\[4, V\]"):
        apply_kfac_mat_prod([A, A], torch.ones(5, 2))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten(), nn.Linear(12, 2)).double()


def test_vector_to_parameter_list_round_trip():
    params = list(_model().parameters())
    vec = parameters_to_vector(params)
    pieces = vector_to_parameter_list(vec, params)
    assert len(pieces) == len(params)
    for piece, p in zip(pieces, params):
        assert piece.shape == p.shape
        torch.testing.assert_close(piece, p.detach())
    torch.testing.assert_close(parameter_list_to_vector(pieces), vec)

    # the pieces are views of vec, and a generator of parameters is accepted
    vec = torch.zeros_like(vec)
    pieces = vector_to_parameter_list(vec, (p for p in params))
    pieces[-1].fill_(1.0)
    assert vec[-params[-1].numel() :].eq(1.0).all() and vec[: -params[-1].numel()].eq(0.0).all()


def test_vector_to_parameter_list_errors():
    params = list(_model().parameters())
    vec = parameters_to_vector(params)
    with pytest.raises(TypeError, match="torch.Tensor"):
        vector_to_parameter_list(vec.tolist(), params)
    with pytest.raises(ValueError, match="entries"):
        vector_to_parameter_list(vec[:-1], params)
    with pytest.raises(ValueError, match="entries"):
        vector_to_parameter_list(vec.view(1, -1), params)


PATCH_CONVS = [
    (nn.Conv1d(2, 3, 3, padding=1), (2, 9)),
    (
        nn.Conv1d(4, 2, 2, stride=3, dilation=2, groups=2, padding_mode="circular", padding=2),
        (4, 11),
    ),
    (nn.Conv2d(3, 4, 5), (3, 12, 12)),
    (nn.Conv2d(4, 3, 3, padding=1), (4, 5, 5)),
    (nn.Conv2d(2, 3, (2, 3), stride=(2, 1), dilation=(1, 2), padding="valid"), (2, 7, 9)),
    (nn.Conv2d(4, 6, 3, groups=2, padding="same", padding_mode="reflect"), (4, 6, 5)),
    (nn.Conv2d(2, 3, 1, stride=2), (2, 6, 6)),  # cheaper unfolded: the fallback
    (nn.Conv3d(2, 3, 2, padding=(1, 0, 1)), (2, 3, 4, 3)),
]


@pytest.mark.parametrize("budget", [1 << 22, 7], ids=["whole", "position-chunks"])
@pytest.mark.parametrize("conv,shape", PATCH_CONVS, ids=lambda c: str(c)[:50])
def test_patch_gram(conv, shape, budget):
    """``sum_{n,s} a a^T`` per group, ``a`` the patches, read off the module's own forward with
    one-hot kernels (output channel ``(c, tap)`` of group ``g`` copies input ``c`` at ``tap``)."""
    torch.manual_seed(0)
    conv = conv.double()
    x = torch.randn(3, *shape, dtype=torch.float64)
    groups, cg, taps = conv.groups, conv.in_channels // conv.groups, conv.weight[0, 0].numel()
    eye = torch.eye(cg * taps, dtype=x.dtype).reshape(cg * taps, cg, *conv.kernel_size)
    patches = conv._conv_forward(x, eye.repeat(groups, *[1] * (eye.dim() - 1)), None)
    a = patches.reshape(3, groups, cg * taps, -1)
    expected = torch.einsum("ngas,ngbs->gab", a, a)
    torch.testing.assert_close(patch_gram(conv, x, budget=budget), expected)

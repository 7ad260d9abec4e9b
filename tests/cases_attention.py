"""Layer cases of one family, appended to `tests.cases.LAYER_CASES` (same helpers, same gaps)."""

from __future__ import annotations

from tests.cases import LayerCase

CASES: list[LayerCase] = []
GAPS: dict[str, str] = {}  # case-name substring -> reason, for every extension
HESSIAN_GAPS: dict[str, str] = {}  # ... for DiagHessian/BatchDiagHessian only

"""BackPACK's import path for the block curvature-matrix products (re-exported)."""

from backpack.extensions.secondorder.curvmatprod import GGNMP, HMP, PCHMP

__all__ = ["GGNMP", "HMP", "PCHMP"]

"""Rules (Jacobian products) per module type; importing this package registers them all."""

from backpack.derivatives import linear  # noqa: F401

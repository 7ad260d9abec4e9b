"""Rules (Jacobian products) per module type; importing this package registers them all."""

from backpack.derivatives import (
    attention,  # noqa: F401
    automatic,  # noqa: F401  (installs the fallback rule)
    batchnorm,  # noqa: F401
    conv,  # noqa: F401
    conv_transpose,  # noqa: F401
    custom,  # noqa: F401
    elementwise,  # noqa: F401
    embedding,  # noqa: F401
    linear,  # noqa: F401
    losses,  # noqa: F401
    losses_extra,  # noqa: F401
    normalization,  # noqa: F401
    ops,  # noqa: F401
    padding,  # noqa: F401
    pooling,  # noqa: F401
    position,  # noqa: F401
    rnn,  # noqa: F401
    shape_ops,  # noqa: F401
    softmax,  # noqa: F401
)

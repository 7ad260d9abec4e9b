"""Second-order extensions: curvature from matrices backpropagated from the loss."""

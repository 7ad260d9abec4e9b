"""The engine: runs the extensions during a backward pass (see ``docs/ARCHITECTURE.md``).

``hooks`` (``extend``: forward hooks, a ``record`` per call, a hook on its output's autograd
node) -> ``driver`` (at each module reached in backward: ``compat`` handlers, first-order
extensions, ``streams`` of second-order factors, ``reuse`` for modules called several times,
``watch`` for gradient paths the curvature misses). ``call.Call`` and ``factors`` are the
vocabulary extensions are written in. The engine never names an extension class.
"""

"""The dspex-trio worker process: ``python -m bridge_child``.

Importing this package does not import dspy; the DSPy methods import it lazily, and the zygote imports it
once before forking workers. Its public modules import neither dspy nor trio: :mod:`bridge_child.wire`
(the protocol), :mod:`bridge_child.spec` (the program-spec layer, which the runtime's mock backend and
fake LM share with the workers), :mod:`bridge_child.netaddr` (which addresses are public) and
:mod:`bridge_child.registry` (the operator's program modules: their decorators, and the loading and
describing that the workers and the mock share; what it loads may import dspy). The rest is private
to the worker process (map: docs/worker.md).
"""

__version__ = "0.1.0"

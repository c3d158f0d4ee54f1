"""The dspex-trio worker process: ``python -m bridge_child``.

Importing this package (or :mod:`bridge_child.wire`) does not import dspy; the DSPy methods import it
lazily, and the zygote imports it once before forking workers.
"""

__version__ = "0.1.0"

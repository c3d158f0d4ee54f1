"""``python -m bridge_child``: a worker on stdio.

Stdout hygiene comes first, before anything else is imported: a private duplicate of fd 1 carries the
frames, and fd 1 is pointed at stderr, so ``print()`` from user code, DSPy or a C extension can never
corrupt the frame stream.
"""

import os

FRAME_FD = os.dup(1)  # non-inheritable by default
os.dup2(2, 1)

import sys  # noqa: E402

from bridge_child._server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], read_fd=0, write_fd=FRAME_FD))

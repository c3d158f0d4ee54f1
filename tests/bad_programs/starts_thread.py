"""A program module that starts a thread at import (refused by the zygote template, which forks)."""

import threading

_stop = threading.Event()
threading.Thread(target=_stop.wait, name="import-time-thread", daemon=True).start()

TOOLS = {"noop": lambda key: key}

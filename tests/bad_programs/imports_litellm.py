"""A program module that imports litellm (simulated: the real import takes seconds)."""

import sys
import types

sys.modules.setdefault("litellm", types.ModuleType("litellm"))

TOOLS = {"noop": lambda key: key}

"""A program module that registers a tool tests.program_module registers too."""


def lookup(key: str) -> str:
    """Another lookup."""
    return key


TOOLS = {"lookup": lookup}

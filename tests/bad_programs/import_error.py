"""A program module that does not import."""

import no_such_dependency_anywhere  # noqa: F401

PROGRAMS: dict[str, object] = {}

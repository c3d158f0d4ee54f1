"""How the public surface is made (as trio makes its own, ``trio/_util.py``).

- :func:`fixup_module_metadata`: ``dspex_trio/__init__.py`` re-exports each public name from the private
  module that defines it, then calls this, so that ``__module__`` (and ``__name__``, ``__qualname__``)
  read ``dspex_trio.PoolUnavailable``, not ``dspex_trio._errors.PoolUnavailable``, in tracebacks, reprs
  and pickles; the methods of a public class are fixed up with it. An attrs class's field types are
  resolved first, in the module that wrote them, so cattrs (and ``attrs.fields(...).type``) still see
  real types once ``__module__`` points elsewhere (a class whose annotations never resolved at runtime
  is left as it was).
- :class:`NoPublicConstructor`: the metaclass of a public class that users receive but never build
  (a :class:`~dspex_trio.Pool` comes from ``open_pool``): calling the class raises ``TypeError``, and its
  own module builds one with ``Class._create(...)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn, TypeVar

import attrs

T = TypeVar("T")


class NoPublicConstructor(type):
    """Metaclass: ``Class(...)`` raises ``TypeError``; ``Class._create(...)`` builds one (for the module
    that owns the class)."""

    def __call__(cls, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} has no public constructor")

    def _create(cls: type[T], *args: Any, **kwargs: Any) -> T:
        return super().__call__(*args, **kwargs)  # type: ignore[misc]


def fixup_module_metadata(module_name: str, namespace: Mapping[str, object]) -> None:
    """Give every public object of ``namespace`` that comes from a private submodule of ``module_name``
    the public ``__module__``, and its public name (objects re-exported under another name keep none of
    the private one's)."""
    private_prefix = module_name + "."
    seen: set[int] = set()

    def fix_one(qualname: str, name: str, obj: object) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        module = getattr(obj, "__module__", None)
        if not isinstance(module, str) or not module.startswith(private_prefix):
            return
        if isinstance(obj, type) and attrs.has(obj):
            try:  # while __module__ still names the module its annotations live in
                attrs.resolve_types(obj)
            except (NameError, TypeError):
                pass  # annotations that never resolved at runtime (``itertools.count[int]``): as before
        obj.__module__ = module_name
        # A module's __name__ is its dotted path: only rename what has a plain name.
        if hasattr(obj, "__name__") and "." not in obj.__name__:
            obj.__name__ = name
            if hasattr(obj, "__qualname__"):
                obj.__qualname__ = qualname
        if isinstance(obj, type):
            for attr_name, attr_value in list(obj.__dict__.items()):
                fix_one(f"{qualname}.{attr_name}", attr_name, attr_value)

    for name, obj in namespace.items():
        if not name.startswith("_"):
            fix_one(name, name, obj)

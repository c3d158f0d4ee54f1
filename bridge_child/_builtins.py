"""Building the DSPy module a parsed spec describes: a built-in from its signature (with the registered
tools and metrics it names), or a registered program from its factory. Imports dspy.

The built-ins are DSPy's own classes, used as DSPy documents them; the one composition made here is
``multi_chain_comparison`` (:class:`MultiChain`): ``dspy.MultiChainComparison`` compares completions it
is given, so the served program makes ``n`` chain-of-thought attempts first, then compares them.
"""

from __future__ import annotations

import functools
from typing import Any

from bridge_child._tools import guarded
from bridge_child.registry import ProgramFactoryError, Registry, instantiate
from bridge_child.spec import InvalidSignature, ProgramSpec, SignatureSpec


def build_signature(spec: SignatureSpec) -> Any:
    """The dspy ``Signature`` class for ``spec`` (imports dspy)."""
    import dspy

    reserved = [f.name for f in (*spec.inputs, *spec.outputs) if hasattr(dspy.Signature, f.name)]
    if reserved:
        raise InvalidSignature(f"field name {reserved[0]!r} is reserved by dspy.Signature; rename it")
    fields: dict[str, Any] = {}
    for f in spec.inputs:
        field = dspy.InputField(desc=f.desc) if f.desc else dspy.InputField()
        fields[f.name] = (f.type.to_python(), field)
    for f in spec.outputs:
        field = dspy.OutputField(desc=f.desc) if f.desc else dspy.OutputField()
        fields[f.name] = (f.type.to_python(), field)
    try:
        return dspy.make_signature(fields, spec.instructions)
    except Exception as exc:  # pydantic may still refuse a name
        raise InvalidSignature(f"dspy refused the signature: {exc}") from exc


def _make_multi_chain() -> type:
    import dspy

    class MultiChain(dspy.Module):
        """``n`` chain-of-thought attempts (``generate``), compared by ``dspy.MultiChainComparison``
        (``compare``) into one answer with its ``rationale``."""

        def __init__(self, signature: Any, n: int) -> None:
            super().__init__()
            self.n = n
            self.generate = dspy.ChainOfThought(signature)
            self.compare = dspy.MultiChainComparison(signature, M=n)

        def forward(self, **inputs: Any) -> Any:
            completions = [
                self.generate(**inputs, config={"rollout_id": i, "temperature": 1.0}) for i in range(self.n)
            ]
            return self.compare(completions, **inputs)

    return MultiChain


@functools.cache
def multi_chain_class() -> type:
    return _make_multi_chain()


def reward_from_metric(metric: Any) -> Any:
    """DSPy's ``reward_fn(args, prediction)`` from a registered ``metric(example, prediction, trace=None)``
    (the example holds the call's inputs). Keeps the metric's name and source for ``dspy.Refine``,
    which shows the reward's code to the LM."""
    import dspy

    @functools.wraps(metric)
    def reward(args: dict[str, Any], prediction: Any) -> float:
        example = dspy.Example(**args).with_inputs(*args)
        return float(metric(example, prediction))

    return reward


def _simple(module: str, signature: SignatureSpec) -> Any:
    import dspy

    built = build_signature(signature)
    return dspy.ChainOfThought(built) if module == "chain_of_thought" else dspy.Predict(built)


def build_module(parsed: ProgramSpec, registry: Registry) -> Any:
    """The DSPy module for ``parsed``. Raises :class:`InvalidSignature` (a spec DSPy refuses) or
    :class:`~bridge_child.registry.ProgramFactoryError` (a registered factory failed)."""
    import dspy

    if parsed.registered:
        return instantiate(registry, parsed.module)
    module, options = parsed.module, parsed.options
    if module in ("best_of_n", "refine"):
        base = options["base"]
        if base in registry.programs:
            inner = instantiate(registry, base)
        else:
            assert parsed.signature is not None
            inner = _simple(base, parsed.signature)
        cls = dspy.BestOfN if module == "best_of_n" else dspy.Refine
        try:
            return cls(
                module=inner,
                N=options["n"],
                reward_fn=reward_from_metric(registry.metrics[options["reward"]]),
                threshold=options["threshold"],
            )
        except (OSError, TypeError) as exc:  # Refine reads the source of the module and of the metric
            raise ProgramFactoryError(f"{module} cannot be built: {type(exc).__name__}: {exc}") from exc
    assert parsed.signature is not None
    if module in ("predict", "chain_of_thought"):
        return _simple(module, parsed.signature)
    signature = build_signature(parsed.signature)
    try:
        if module == "react":
            tools = [dspy.Tool(guarded(name, registry.tools[name]), name=name) for name in options["tools"]]
            return dspy.ReAct(signature, tools=tools, max_iters=options["max_iters"])
        if module == "multi_chain_comparison":
            return multi_chain_class()(signature, options["n"])
    except ValueError as exc:  # DSPy refusing a combination (e.g. a field name it uses itself)
        raise InvalidSignature(f"dspy refused the {module} program: {exc}") from exc
    raise AssertionError(module)  # pragma: no cover - parse_spec admits no other

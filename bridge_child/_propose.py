"""MIPROv2's instruction proposal, in the worker: DSPy's own ``GroundedProposer`` run with the worker's LM.

``propose_instructions {"program": ref, "trainset": [{"inputs", "labels"}, ...], "demo_candidates":
[[[demo, ...], ...], ...], "n": int, "rng": state, "options": {...}, "lm": optional}`` does what
``MIPROv2._propose_instructions`` does: a ``GroundedProposer`` over the program (its source when it is
not a bare Predict or ChainOfThought), the trainset (a dataset summary) and the demo candidates (one list
of demo sets per predictor, in ``named_predictors`` order), proposing ``n`` instructions per predictor
with the LM; the first of each is the predictor's own instruction, as MIPROv2 sets it. The optimizer's
random generator travels with the call (``random.Random.getstate()`` as JSON): the proposer draws its
tips and rollout ids from it, and the answer returns its state, so the host's loop goes on with DSPy's
draws. The answer is ``{"instructions": [[str, ...], ...], "rng": state}``.

The options are DSPy's (``view_data_batch_size``, ``program_aware_proposer``, ``data_aware_proposer``,
``tip_aware_proposer``, ``fewshot_aware_proposer``, ``init_temperature``), checked by the host; the
worker checks their types again (a malformed call is ``InvalidParams``).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Final

from bridge_child._context import CallContext, Method, invalid_params
from bridge_child._jobs import STAGE_PROGRAM, _example, _failed, _lm
from bridge_child._programs import _import_dspy, on_cpu_lane, resolve
from bridge_child.spec import SpecError

if TYPE_CHECKING:
    from bridge_child._server import Worker

MAX_INSTRUCTIONS: Final = 64
"""Most instructions proposed per predictor (``n``)."""
MAX_TRAINSET: Final = 1000
"""Most examples of one proposal's trainset (DSPy's dataset summary reads at most ten batches)."""
BOOTSTRAPPED_IN_CONTEXT: Final = 3
"""Demos the proposer shows the LM (MIPROv2's ``BOOTSTRAPPED_FEWSHOT_EXAMPLES_IN_CONTEXT``)."""

_FLAGS: Final = (
    "program_aware_proposer",
    "data_aware_proposer",
    "tip_aware_proposer",
    "fewshot_aware_proposer",
)


def _rng(raw: Any) -> random.Random:
    """A ``random.Random`` in the state ``raw`` (``getstate()`` as JSON: ``[version, [ints], gauss]``)."""
    try:
        version, internal, gauss = raw
        rng = random.Random()
        rng.setstate((int(version), tuple(int(x) for x in internal), gauss))
    except (TypeError, ValueError) as exc:
        raise invalid_params(f"propose_instructions: rng is not a random state ({exc})") from None
    return rng


def rng_state(rng: random.Random) -> list[Any]:
    """``rng.getstate()`` as JSON."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def propose_instructions(worker: Worker, ctx: CallContext) -> Any:
    """``MIPROv2._propose_instructions`` for the program, with the worker's LM as the prompt model."""
    program = resolve(worker, ctx)
    n = ctx.param("n", int)
    if not 1 <= n <= MAX_INSTRUCTIONS:
        raise invalid_params(f"propose_instructions: n must be within [1, {MAX_INSTRUCTIONS}]")
    raw_trainset = ctx.param("trainset", list)
    if not 1 <= len(raw_trainset) <= MAX_TRAINSET:
        raise invalid_params(f"propose_instructions: 1 to {MAX_TRAINSET} trainset examples")
    raw_demos = ctx.param("demo_candidates", list, None)
    options = ctx.param("options", dict)
    flags = {name: options.get(name, True) for name in _FLAGS}
    view = options.get("view_data_batch_size", 10)
    temperature = options.get("init_temperature", 1.0)
    if (
        not all(isinstance(v, bool) for v in flags.values())
        or not isinstance(view, int)
        or isinstance(view, bool)
        or view < 1
        or not isinstance(temperature, int | float)
    ):
        raise invalid_params("propose_instructions: malformed options")
    rng = _rng(ctx.param("rng", list))
    try:
        trainset = [_example(ctx, program, raw)[0] for raw in raw_trainset]
    except SpecError as exc:
        raise invalid_params(str(exc)) from None
    dspy = _import_dspy()
    from dspy.propose import GroundedProposer

    from bridge_child._lmguard import current_call

    predictors = [p for _, p in program.module.named_predictors()]
    demo_candidates = None
    if raw_demos:
        if len(raw_demos) != len(predictors) or not all(isinstance(sets, list) for sets in raw_demos):
            raise invalid_params("propose_instructions: one list of demo sets per predictor")
        demo_candidates = {
            i: [[dspy.Example(**demo) for demo in demos] for demos in sets]
            for i, sets in enumerate(raw_demos)
        }
    lm, config = _lm(worker, ctx)
    with current_call(ctx) as call:
        try:
            with dspy.context(lm=lm, adapter=dspy.ChatAdapter(), disable_history=True):
                proposer = GroundedProposer(
                    program=program.module,
                    trainset=trainset,
                    prompt_model=lm,
                    view_data_batch_size=view,
                    program_aware=flags["program_aware_proposer"],
                    use_dataset_summary=flags["data_aware_proposer"],
                    use_task_demos=flags["fewshot_aware_proposer"],
                    num_demos_in_context=BOOTSTRAPPED_IN_CONTEXT,
                    use_tip=flags["tip_aware_proposer"],
                    set_tip_randomly=flags["tip_aware_proposer"],
                    use_instruct_history=False,
                    set_history_randomly=False,
                    verbose=False,
                    rng=rng,
                    init_temperature=temperature,
                )
                proposed = proposer.propose_instructions_for_program(
                    trainset=trainset,
                    program=program.module,
                    demo_candidates=demo_candidates,
                    N=n,
                    trial_logs={},
                )
        except Exception as exc:
            raise _failed(STAGE_PROGRAM, call.refusal or exc, config) from exc
    instructions = []
    for i, predictor in enumerate(predictors):  # as MIPROv2: the first is the predictor's own
        found = [str(text) for text in proposed[i]]
        found[0] = predictor.signature.instructions
        instructions.append(found)
    if ctx.cancelled.is_set():
        return None
    return {"instructions": instructions, "rng": rng_state(rng)}


METHODS: Final = {
    "propose_instructions": Method(propose_instructions, lane=on_cpu_lane),
}
"""The proposal method, for the worker's registry (``_methods.build_registry``)."""

"""Observing the per-token log-probabilities GRPO's loss computes, without a second forward pass.

Three parts of the trainer need the (B, C) log-probs of the policy being scored, from the very forward that GRPO's
`_compute_loss` runs: the cooperative-gain meter (`bridge_trl.gain`), θ̂'s importance ratio π(θ̂, w)/μ
(`bridge_trl.shadow_is`) and LUFFY's off-policy term (`bridge_trl.luffy`). Each wraps
`GRPOTrainer._get_per_token_logps_and_entropies` for the duration of one block with this context manager.

With shared rollouts the joint RL pass runs first: the gain meter captures its per-token log-probs of π(θ, w)
(detached, this rank's rows), which are both the meter's sampling density and, under HF generation, θ̂'s μ. Nothing
is gathered: each rank reads the log-probs of its own rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

_NAME = "_get_per_token_logps_and_entropies"


@contextmanager
def observe_logps(trainer, callback: Callable[..., None], entropies: bool = False) -> Iterator[None]:
    """Call `callback(per_token_logps)` ((B, C), with its graph) on every log-prob forward inside the block; with
    `entropies`, `callback(per_token_logps, per_token_entropies)` ((B, C) each, entropies None if not computed)."""
    original = getattr(trainer, _NAME)
    shadowed = _NAME in vars(trainer)  # an instance attribute already (e.g. an enclosing observer)

    def observed(*args, **kwargs):
        out = original(*args, **kwargs)
        callback(*out[:2]) if entropies else callback(out[0])
        return out

    setattr(trainer, _NAME, observed)
    try:
        yield
    finally:
        if shadowed:
            setattr(trainer, _NAME, original)
        else:
            delattr(trainer, _NAME)  # back to the class's method

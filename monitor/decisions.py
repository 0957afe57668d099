"""Policy as decisions: a pure function from a request's rules and one token's scores to what
happens next. The model thread applies a decision's effect on the model (stop, steer) before the
next step; the servicer turns the same decisions into stream events, records and metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from monitor.domain import Action
from monitor.snapshot import Rule
from monitor.steering import Steering


@dataclass(frozen=True)
class Decision:
    """A rule fired at a token: its action, and the steering switched on from the next token."""

    rule: Rule
    score: float
    token_index: int
    steering: tuple[Steering, ...] = ()

    @property
    def action(self) -> Action:
        return self.rule.act


@dataclass
class Reaction:
    """What the model thread does after a token: stop the request, and/or switch steering on."""

    block: bool = False
    steer: list[Steering] = field(default_factory=list)


def decide(rules: Sequence[Rule], aggregate: np.ndarray, fired: frozenset[str], token_index: int,
           triggered: Mapping[str, Sequence[Steering]] | None = None) -> list[Decision]:
    """Rules whose aggregate score reached their threshold for the first time at this token.

    `fired` holds the ids that fired before (each rule fires once per request); `triggered` is
    steering the client asked to start when a given detector fires. A score that is not finite
    (packs are checked when they load, but activations can still overflow) fails closed: the
    rule fires with score 1.0, so a broken detector can never go quiet.
    """
    out, triggered = [], triggered or {}
    for r in rules:
        if r.id in fired:
            continue
        score = float(aggregate[r.slot])
        if not np.isfinite(score):
            score = 1.0
        if score >= r.threshold:
            own = (r.steering,) if r.act.steers and r.steering is not None else ()
            out.append(Decision(r, score, token_index, own + tuple(triggered.get(r.id, ()))))
    return out


def reaction(decisions: Sequence[Decision]) -> Reaction:
    if any(d.action.stops for d in decisions):
        return Reaction(block=True)
    return Reaction(steer=[s for d in decisions for s in d.steering])


__all__ = ["Decision", "Reaction", "decide", "reaction"]

"""Policy as decisions: a pure function from a request's rules and one token's scores to what
happens next. The model thread applies a decision's effect on the model (stop, steer) before the
next step; the servicer turns the same decisions into stream events, records and metrics (and
asks an escalation's second opinion, whose verdict comes back as a `Reaction`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from monitor.domain import Action
from monitor.escalation import Verdict
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

    def merge(self, other: Reaction) -> Reaction:
        return Reaction(self.block or other.block, self.steer + other.steer)


def scored_tokens(rule: Rule, prompt_tokens: int, token_index: int) -> int | None:
    """How many tokens of the rule's `where` its aggregate has read at event `token_index` (event 0
    follows the prompt; event i has read i generated tokens), or None when it is not decided there."""
    if rule.where == "prompt":
        return prompt_tokens if token_index == 0 else None
    if rule.where == "completion":
        return token_index or None
    return prompt_tokens + token_index


def decide(rules: Sequence[Rule], aggregate: np.ndarray, fired: frozenset[str], token_index: int,
           prompt_tokens: int) -> list[Decision]:
    """Rules whose condition holds for the first time at this token (each fires once per request;
    `fired` holds the ids that fired before).

    A score that is not finite (packs are checked when they load, but activations can still
    overflow) fails closed: every rule on it fires, recording 1.0 (a band rule too, whose band a
    NaN is in no more than out of), so a broken detector can never go quiet.
    """
    out = []
    for r in rules:
        if r.id in fired:
            continue
        n = scored_tokens(r, prompt_tokens, token_index)
        if n is None or n < r.min_tokens:
            continue
        score = float(aggregate[r.slot])
        broken = not np.isfinite(score)
        if broken or r.holds(score):
            score = 1.0 if broken else score
            out.append(Decision(r, score, token_index, r.steering if r.act.steers else ()))
    return out


def verdict_effect(rule: Rule, verdict: Verdict) -> tuple[str | None, str | None]:
    """(action, outcome) an escalation's verdict leads to: the rule's on_flagged / on_clear, or for a
    failed check nothing ("failed_open"), or a block with `fail_closed` ("failed_closed")."""
    esc = rule.escalate
    if verdict.failed:
        return ("block", "failed_closed") if esc.fail_closed else (None, "failed_open")
    return (esc.on_flagged if verdict.flagged else esc.on_clear), None


def reaction(decisions: Sequence[Decision]) -> Reaction:
    """Shadow rules never act; an escalation acts only once its verdict is in."""
    if any(d.action.stops for d in decisions):
        return Reaction(block=True)
    return Reaction(steer=[s for d in decisions for s in d.steering])


__all__ = ["Decision", "Reaction", "decide", "reaction", "scored_tokens", "verdict_effect"]

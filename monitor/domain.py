"""The vocabulary every layer shares, defined once.

Config, the proto mapping, storage, metrics, the policy and the client all import these names;
none of them spells an action, aggregation, hook point, request kind, outcome or role on its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

# ----------------------------------------------------------------------------- hook points

SITES = ("resid_pre", "attn_out", "mlp_out", "resid_post")
_HOOK_NAME = re.compile(r"^blocks\.(\d+)\.([a-z_]+)$")


class HookPointError(ValueError):
    """A hook point name that does not exist (in the grammar, or on this model)."""


@dataclass(frozen=True, order=True)
class HookPoint:
    """``blocks.{layer}.{site}`` (TransformerLens style); orders by depth (layer, then site)."""

    layer: int
    site_rank: int

    @property
    def site(self) -> str:
        return SITES[self.site_rank]

    @classmethod
    def parse(cls, name: str) -> HookPoint:
        m = _HOOK_NAME.match(name.strip()) if isinstance(name, str) else None
        if not m or m.group(2) not in SITES:
            shown = name[:80] + "..." if isinstance(name, str) and len(name) > 80 else name
            raise HookPointError(
                f"unknown hook point {shown!r}: expected 'blocks.<layer>.<site>' with site one of "
                f"{', '.join(SITES)} (e.g. 'blocks.14.resid_post')"
            )
        return cls(int(m.group(1)), SITES.index(m.group(2)))

    def __str__(self) -> str:
        return f"blocks.{self.layer}.{self.site}"


# ------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Action:
    """What a rule does when its condition holds (monitor.policy).

    `strength` orders actions by how much they constrain the model: a request may never swap a
    rule's action for a weaker one unless the server config allows it explicitly.
    """

    name: str
    strength: int
    records_alert: bool  # writes an alert record
    stops: bool = False  # ends the generation (finish reason `blocked`)
    steers: bool = False  # switches the rule's steering on for the rest of the request
    acts: bool = True  # False: shadow, which records what it would have done and nothing else


ACTIONS: dict[str, Action] = {
    a.name: a
    for a in (
        Action("shadow", 0, records_alert=False, acts=False),
        Action("log", 0, records_alert=False),
        Action("alert", 1, records_alert=True),
        Action("escalate", 2, records_alert=False),  # the verdict's own action raises the alert
        Action("steer", 2, records_alert=True, steers=True),
        Action("block", 3, records_alert=True, stops=True),
    )
}
RuleActionName = Literal["shadow", "log", "alert", "escalate", "steer", "block"]
assert set(get_args(RuleActionName)) == set(ACTIONS)
# What `detectors:` settings and per-request overrides may set: actions that need nothing but a detector.
ActionName = Literal["alert", "steer", "block"]
OVERRIDE_ACTIONS: tuple[str, ...] = get_args(ActionName)
# What an escalation verdict may lead to.
VerdictActionName = Literal["log", "alert", "steer", "block"]

# What a decision-trail record says the monitor did (InterventionRecord.outcome).
DECISION_OUTCOMES = ("logged", "alerted", "blocked", "steered", "shadowed", "overridden", "failed_open",
                     "failed_closed")
OUTCOME_OF_ACTION = {"log": "logged", "alert": "alerted", "block": "blocked", "steer": "steered",
                     "shadow": "shadowed"}

# Where a policy rule reads its detector's aggregate: the prompt (decided once, when it is
# read), the generated tokens only, or both as one running aggregate.
RuleWhere = Literal["prompt", "completion", "both"]

# ---------------------------------------------------------------------------- aggregations

# `rolling_max`: max of the last `window` token logits. `max_rolling_mean`: max over positions of
# the mean of the last `window` logits (the mean of all of them while fewer have been seen), so a
# few hot tokens cannot fire it and a long or repetitive input cannot drift into it.
AGGREGATIONS = ("last", "mean", "max", "ema", "rolling_max", "max_rolling_mean")
AggregationName = Literal["last", "mean", "max", "ema", "rolling_max", "max_rolling_mean"]
assert get_args(AggregationName) == AGGREGATIONS
WINDOWED_AGGREGATIONS = ("rolling_max", "max_rolling_mean")  # the ones that take `window`

# --------------------------------------------------------------------- requests and records

RequestKind = Literal["generate", "score"]
REQUEST_KINDS: tuple[str, ...] = get_args(RequestKind)

FINISH_REASONS = ("stop", "length", "blocked")  # a generation that ended normally
END_REASONS = (*FINISH_REASONS, "cancelled", "deadline_exceeded", "error")  # and every other end

# The decision trail: every rule that fired writes one record of its action's kind (steer: one per
# steering it switched on); client steering writes `steer`, per-request overrides `override`.
InterventionKind = Literal["log", "alert", "block", "steer", "escalate", "shadow", "override"]
INTERVENTION_KINDS: tuple[str, ...] = get_args(InterventionKind)
SteeringKind = Literal["add", "ablate", "clamp"]  # clamp: set an SAE latent (monitor.steering)
STEERING_KINDS: tuple[str, ...] = get_args(SteeringKind)
SteeringPositions = Literal["prompt", "generated", "all"]
STEERING_POSITIONS: tuple[str, ...] = get_args(SteeringPositions)

TextPolicy = Literal["always", "alerts_only", "never"]
TEXT_POLICIES: tuple[str, ...] = get_args(TextPolicy)

# Bounds of an alert's explanation (monitor/explain.py), so a stored alert stays small.
EXPLAIN_MAX_TOKENS = 32  # tokens listed (setting explain_tokens)
EXPLAIN_MAX_LATENTS = 64  # latents listed, over every SAE at the detector's hook point
EXPLAIN_MAX_TEXT = 64  # characters kept of a token's text

# ------------------------------------------------------------------------- authentication

# What a bearer token may do (monitor/auth.py): `generate` = Generate and Score; `audit` =
# GetAlerts for its own client id, `audit:*` = for every client id; `admin` = ReloadDetectors,
# policy overrides and client steering. (Not `ROLES`: monitor.enums.ROLES are chat roles.)
AUTH_ROLES = ("generate", "audit", "audit:*", "admin")

# Outcome labels of finished RPCs (metrics, logs): a bounded set.
OUTCOMES = (
    "ok",
    "blocked",
    "cancelled",
    "deadline_exceeded",
    "invalid_argument",
    "not_found",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "unavailable",
    "unauthenticated",
    "internal",
)
# How a generation's end reason reads as an RPC outcome.
END_OUTCOME = {
    "stop": "ok",
    "length": "ok",
    "blocked": "blocked",
    "cancelled": "cancelled",
    "deadline_exceeded": "deadline_exceeded",
    "error": "internal",
}

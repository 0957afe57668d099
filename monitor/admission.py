"""Who may change monitoring: a request's policy overrides and steering, checked at admission.

Nothing a request asks for may lower its own monitoring below the server policy unless the
server config grants it to that client id: overrides need `policy_overrides`, weakening ones
(a higher threshold, a milder action) also `weaken_monitoring`; steering needs `steering`, and
a vector with |cosine| >= `steering_max_detector_cosine` against a detector's direction at or
before that detector's hook point (it would push the detector's reading around) also
`steer_detector_directions`; a latent clamp writes along the latent's decoder row, so that row
is its vector here. With authentication on, overrides and steering also need the
caller's token to hold the `admin` role.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from monitor.auth import require
from monitor.domain import ACTIONS
from monitor.errors import RequestError, clip
from monitor.snapshot import Rule, Snapshot, with_action
from monitor.steering import Steering


@dataclass(frozen=True)
class Override:
    """One request's change to one detector's policy (None = keep)."""

    detector_id: str
    threshold: float | None = None
    action: str | None = None


@dataclass(frozen=True)
class ClientSteering:
    """Steering a request asked for; `trigger` = detector id that switches it on, or None."""

    steering: Steering
    trigger: str | None = None


def _denied(field: str, client_id: str, need: str, why: str) -> RequestError:
    who = f"client {clip(client_id)}" if client_id else "an anonymous client"
    return RequestError("PERMISSION_DENIED", f"{field}: {why}; {who} lacks the {need!r} permission in this "
                                             "server's config (permissions.<client_id>)")


def apply_overrides(snapshot: Snapshot, client_id: str, overrides: list[Override]) -> list[Rule]:
    """The snapshot's rules with the request's overrides applied, after checking it may. An
    override of a detector changes every acting rule on it (a band keeps its bounds)."""
    rules = list(snapshot.rules)
    if not overrides:
        return rules
    require("admin", "policy_overrides")
    perms = snapshot.permissions_for(client_id)
    if not perms.policy_overrides:
        raise _denied("policy_overrides", client_id, "policy_overrides", "overrides are not allowed")
    for i, o in enumerate(overrides):
        where = f"policy_overrides[{i}]"
        if o.detector_id not in snapshot.by_id:
            raise RequestError("NOT_FOUND", f"{where}.detector_id: unknown detector id {clip(o.detector_id)}")
        if o.threshold is not None and not 0 < o.threshold <= 1:
            raise RequestError("INVALID_ARGUMENT", f"{where}.threshold: must be in (0, 1], got {o.threshold}")
        for j, base in enumerate(rules):
            if base.detector == o.detector_id and base.act.acts:
                rules[j] = _override(snapshot, client_id, perms, where, base, o)
    return rules


def _override(snapshot: Snapshot, client_id: str, perms, where: str, base: Rule, o: Override) -> Rule:
    rule = base
    if o.threshold is not None and base.high is None:
        if o.threshold > base.threshold and not perms.weaken_monitoring:
            raise _denied(f"{where}.threshold", client_id, "weaken_monitoring",
                          f"{o.threshold} is above the server's threshold {base.threshold:.4g}")
        rule = replace(rule, threshold=float(o.threshold))
    if o.action is not None and o.action != base.action:
        if ACTIONS[o.action].strength < base.act.strength and not perms.weaken_monitoring:
            raise _denied(f"{where}.action", client_id, "weaken_monitoring",
                          f"{o.action!r} is milder than the server's {base.action!r}")
        try:
            rule = with_action(snapshot.bank, rule, o.action)
        except ValueError as e:
            raise RequestError("INVALID_ARGUMENT", f"{where}.action: {e}") from None
    return rule


def check_steering(snapshot: Snapshot, client_id: str, steering: list[ClientSteering]) -> None:
    """Refuse client steering unless granted, and steering that would blind a detector."""
    if not steering:
        return
    require("admin", "steering")
    perms = snapshot.permissions_for(client_id)
    if not perms.steering:
        raise _denied("steering", client_id, "steering", "client steering is not allowed")
    if perms.steer_detector_directions or snapshot.bank is None:
        return
    limit = snapshot.steering_max_cosine
    for i, item in enumerate(steering):
        s = item.steering
        u, field = s.unit, "latent" if s.kind == "clamp" else "vector"
        for rule in snapshot.views:
            det = snapshot.bank.detectors[rule.slot]
            if s.hook_point > det.hook_point:
                continue  # steering after a detector's hook point cannot change what it reads
            dirs = snapshot.bank.directions(rule.slot)
            cos = float((u.to(dirs.device) @ torch.nn.functional.normalize(dirs, dim=0)).abs().max())
            if cos >= limit:
                raise _denied(f"steering[{i}].{field}", client_id, "steer_detector_directions",
                              f"|cosine| {cos:.2f} with detector {rule.detector!r}'s direction at {det.hook_point} "
                              f"reaches the limit {limit:g} (steering_max_detector_cosine)")

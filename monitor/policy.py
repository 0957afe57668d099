"""Detector policies: which aggregate crossing raises an alert, and what the alert does.

Each detector has a threshold (the pack's calibrated one unless configured) and an action:
`alert` records it, `block` stops the generation, `steer` ablates the detector's own direction
at its hook point from the next token on. A request may override threshold and action per
detector. Alerts fire once per detector per request, on the first crossing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from monitor.bank import DetectorBank
from monitor.config import DetectorPolicyConfig
from monitor.steering import Steering

ACTIONS = ("alert", "block", "steer")


class RequestError(Exception):
    """A bad request; `code` is a grpc.StatusCode name, the message names the field."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Rule:
    slot: int  # index of the detector in the bank
    id: str
    version: str
    hook_point: str
    threshold: float
    action: str
    steering: Steering | None = None  # for action "steer"


def direction(bank: DetectorBank, slot: int) -> torch.Tensor | None:
    """The detector's linear direction in activation space, or None for non-linear heads."""
    head = bank.detectors[slot].head
    if head.w2 is not None or head.w1.shape[1] != 1:
        return None
    return head.w1[:, 0].detach().float().clone()


class Policy:
    """The configured rules for one bank; immutable, rebuilt on reload."""

    def __init__(self, bank: DetectorBank | None, config: dict[str, DetectorPolicyConfig] | None = None):
        self.bank = bank
        config = config or {}
        self.rules: list[Rule] = []
        for slot, det in enumerate(bank.detectors if bank is not None else []):
            cfg = config.get(det.id, DetectorPolicyConfig())
            rule = Rule(slot, det.id, det.version, str(det.hook_point),
                        cfg.threshold if cfg.threshold is not None else float(det.threshold), cfg.action)
            self.rules.append(self._with_steering(rule, cfg.steer_coefficient))
        self.by_id = {r.id: r for r in self.rules}

    def _with_steering(self, rule: Rule, coefficient: float = 1.0) -> Rule:
        if rule.action != "steer":
            return rule
        vec = direction(self.bank, rule.slot)
        if vec is None:
            raise ValueError(
                f"detector {rule.id!r}: action 'steer' needs a linear detector (its direction is ablated); "
                "use 'alert' or 'block'"
            )
        s = Steering(self.bank.detectors[rule.slot].hook_point, "ablate", vec, coefficient, "generated",
                     id=f"{rule.id}:direction")
        return replace(rule, steering=s)

    def select(self, ids: list[str], field: str = "detectors") -> list[Rule]:
        """Rules for the requested detector ids (empty = all); unknown ids are NOT_FOUND."""
        if not ids:
            return list(self.rules)
        out = []
        for i, d in enumerate(ids):
            if d not in self.by_id:
                raise RequestError(
                    "NOT_FOUND", f"{field}[{i}]: unknown detector id {d!r}; loaded: {sorted(self.by_id)}"
                )
            if self.by_id[d] not in out:
                out.append(self.by_id[d])
        return out

    def override(self, rules: list[Rule], overrides, field: str = "policy_overrides") -> list[Rule]:
        """Apply per-request (detector_id, threshold?, action) overrides to the selected rules."""
        rules = list(rules)
        for i, o in enumerate(overrides):
            where = f"{field}[{i}]"
            idx = next((k for k, r in enumerate(rules) if r.id == o.detector_id), None)
            if idx is None:
                if o.detector_id not in self.by_id:
                    raise RequestError("NOT_FOUND", f"{where}.detector_id: unknown detector id {o.detector_id!r}")
                raise RequestError("INVALID_ARGUMENT", f"{where}.detector_id: {o.detector_id!r} is not in detectors")
            rule = rules[idx]
            if o.threshold is not None:
                if not (np.isfinite(o.threshold) and 0 <= o.threshold <= 1):
                    raise RequestError("INVALID_ARGUMENT", f"{where}.threshold: must be in [0, 1], got {o.threshold}")
                rule = replace(rule, threshold=float(o.threshold))
            if o.action is not None:
                if o.action not in ACTIONS:
                    raise RequestError("INVALID_ARGUMENT", f"{where}.action: must be one of {ACTIONS}")
                rule = self._with_steering(replace(rule, action=o.action, steering=None))
            rules[idx] = rule
        return rules


@dataclass
class Crossing:
    rule: Rule
    score: float


def crossings(rules: list[Rule], aggregate: np.ndarray, fired: set[str]) -> list[Crossing]:
    """Rules whose aggregate score reached the threshold for the first time (marks them fired)."""
    out = []
    for r in rules:
        if r.id in fired:
            continue
        score = float(aggregate[r.slot])
        if score >= r.threshold:
            fired.add(r.id)
            out.append(Crossing(r, score))
    return out

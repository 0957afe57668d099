"""Detector snapshots: the detectors and policy a request is monitored with, fixed at admission.

A snapshot is immutable. `ReloadDetectors` builds a new one off the model thread (packs and the
detector policy re-read from the configuration) and swaps it in with one assignment; requests
already admitted keep theirs, so a reload never changes how a request in flight is monitored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType

import torch

from monitor.bank import Detector, DetectorBank
from monitor.config import ClientPermissions, DetectorPolicyConfig, Settings
from monitor.domain import ACTIONS, Action
from monitor.errors import RequestError, clip
from monitor.sae import SAE
from monitor.sae.store import open_sae
from monitor.steering import Steering
from probes.pack import default_pack_dirs, load_packs

WILDCARD = "*"


@dataclass(frozen=True)
class Rule:
    """One detector's policy in a snapshot: threshold and action (and the steering it applies)."""

    slot: int  # index of the detector in the bank
    id: str
    version: str
    hook_point: str
    threshold: float
    action: str
    steering: Steering | None = None  # for actions that steer

    @property
    def act(self) -> Action:
        return ACTIONS[self.action]


@dataclass(frozen=True)
class Snapshot:
    version: str
    bank: DetectorBank | None
    rules: tuple[Rule, ...]
    permissions: Mapping[str, ClientPermissions] = field(default_factory=dict)
    steering_max_cosine: float = 0.2
    # SAEs by id, on the model's device: the configured ones and those feature detectors read
    saes: Mapping[str, SAE] = field(default_factory=dict)
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def by_id(self) -> Mapping[str, Rule]:
        return MappingProxyType({r.id: r for r in self.rules})

    @property
    def input_format(self) -> str:
        return self.bank.input_format if self.bank is not None else "chat"

    def select(self, ids: list[str], where: str = "detectors") -> list[Rule]:
        """The rules whose results a request asked to see (empty = all); unknown ids are NOT_FOUND."""
        if not ids:
            return list(self.rules)
        by_id, out = self.by_id, []
        for i, d in enumerate(ids):
            if d not in by_id:
                raise RequestError("NOT_FOUND", f"{where}[{i}]: unknown detector id {clip(d)}; "
                                                f"loaded: {sorted(by_id)}")
            if by_id[d] not in out:
                out.append(by_id[d])
        return out

    def permissions_for(self, client_id: str) -> ClientPermissions:
        return self.permissions.get(client_id) or self.permissions.get(WILDCARD) or ClientPermissions()


def pack_dirs(settings: Settings) -> list[Path]:
    """`packs` when set, else the shipped defaults plus shipped packs with a configured policy;
    then `extra_packs`."""
    base = list(settings.packs) if settings.packs is not None else default_pack_dirs(also=settings.detectors)
    return base + [p for p in settings.extra_packs if p not in base]


def build_snapshot(settings: Settings, runner) -> Snapshot:
    """Load and validate the configured packs for this model; PackError / ValueError when they are bad."""
    packs = load_packs(pack_dirs(settings), expect=runner.fingerprint)
    unknown = set(settings.detectors) - {p.manifest.id for p in packs}
    if unknown:
        raise ValueError(f"detectors: policy configured for detectors that are not loaded: {sorted(unknown)}")
    saes = _saes(settings, runner, packs)
    bank = DetectorBank([Detector.from_pack(p) for p in packs], device=runner.device, saes=saes,
                        explain_tokens=settings.explain_tokens,
                        explain_latents=settings.explain_latents) if packs else None
    rules = tuple(_rule(bank, slot, settings.detectors.get(d.id, DetectorPolicyConfig()))
                  for slot, d in enumerate(bank.detectors if bank else []))
    perms = {k: v.model_dump() for k, v in sorted(settings.permissions.items())}
    policy = [perms, settings.steering_max_detector_cosine, sorted((i, s.source) for i, s in saes.items())]
    return Snapshot(_version(bank, rules, policy), bank, rules, MappingProxyType(dict(settings.permissions)),
                    settings.steering_max_detector_cosine, MappingProxyType(saes))


def _saes(settings: Settings, runner, packs) -> dict[str, SAE]:
    """The configured SAEs and those of feature detectors, by id, moved to the model's device once."""
    found: dict[str, SAE] = {}
    for ref in settings.saes:
        sae = open_sae(ref, expect=runner.fingerprint, d_model=runner.d_model)
        found.setdefault(sae.id, sae)
    for pack in packs:
        sae = getattr(pack.probe, "sae", None)
        if sae is not None:
            found.setdefault(sae.id, sae)
    return {i: s.to(runner.device) for i, s in found.items()}


def with_action(bank: DetectorBank, rule: Rule, action: str, coefficient: float = 1.0) -> Rule:
    """The rule with another action; steering actions ablate the detector's own direction."""
    rule = replace(rule, action=action, steering=None)
    if not ACTIONS[action].steers:
        return rule
    directions = bank.directions(rule.slot)
    if directions.shape[1] != 1:
        raise ValueError(f"detector {rule.id!r}: action {action!r} needs a linear detector (its direction is "
                         "ablated); use 'alert' or 'block'")
    s = Steering(bank.detectors[rule.slot].hook_point, "ablate", directions[:, 0].clone(), coefficient,
                 "generated", id=f"{rule.id}:direction")
    return replace(rule, steering=s)


def _rule(bank: DetectorBank, slot: int, cfg: DetectorPolicyConfig) -> Rule:
    d = bank.detectors[slot]
    threshold = cfg.threshold if cfg.threshold is not None else float(d.threshold)
    rule = Rule(slot, d.id, d.version, str(d.hook_point), threshold, "alert")
    return with_action(bank, rule, cfg.action, cfg.steer_coefficient)


def _version(bank: DetectorBank | None, rules: tuple[Rule, ...], policy: list) -> str:
    """Content hash of the detectors' weights and the policy: equal snapshots share a version."""
    h = hashlib.sha256()
    for d in bank.detectors if bank else []:
        h.update(f"{d.id}\0{d.version}\0{d.hook_point}\0{d.aggregation}\0{d.alpha}\0{d.window}\0".encode())
        for name in ("w1", "b1", "w2", "latents", "weights", "bias"):  # ScoringHead, LatentHead
            t = getattr(d.head, name, None)
            if t is not None:
                h.update(torch.as_tensor(t).detach().cpu().float().numpy().tobytes())
        if (sae := getattr(d.head, "sae", None)) is not None:
            h.update(f"{sae.id}\0{sae.source}\0".encode())
    h.update(json.dumps([(r.id, r.threshold, r.action, r.steering.coefficient if r.steering else None)
                         for r in rules] + policy).encode())
    return h.hexdigest()[:12]

"""Detector snapshots: the detectors and policy a request is monitored with, fixed at admission.

A snapshot is immutable. `ReloadDetectors` (and a policy file change, or SIGHUP) builds a new one
off the model thread (packs and the policy re-read from the configuration) and swaps it in with
one assignment; requests already admitted keep theirs, so a reload never changes how a request
in flight is monitored, and a bad file never replaces a good snapshot.
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
from monitor.domain import ACTIONS, Action, HookPoint
from monitor.errors import RequestError, clip
from monitor.escalation import EndpointConfig
from monitor.policy import DEFAULT_REFUSAL, Escalate, Policy, RuleSpec, Steer, When, load_policy
from monitor.sae import SAE
from monitor.sae.store import open_sae
from monitor.steering import Steering
from probes.pack import default_pack_dirs, load_packs

WILDCARD = "*"


@dataclass(frozen=True)
class Rule:
    """One compiled policy rule: when its detector's aggregate (bank slot `slot`) fires it, and
    what it does then. Without a policy file each detector has one rule, with the detector's id."""

    slot: int  # the bank slot it reads (a completion-scoped copy of the detector for where=completion)
    id: str  # rule id
    version: str  # detector version
    hook_point: str
    threshold: float  # fires when the score >= threshold (and < high, for a band)
    action: str
    steering: tuple[Steering, ...] = ()  # for actions (and verdicts, shadow `would`) that steer
    detector: str = ""  # detector id (default: the rule id)
    high: float | None = None
    min_tokens: int = 1
    where: str = "both"  # monitor.domain.RuleWhere
    clients: frozenset[str] = frozenset()  # empty: every client
    tags: tuple[tuple[str, str], ...] = ()
    refusal: str = DEFAULT_REFUSAL
    escalate: Escalate | None = None
    would: str | None = None  # shadow: the action it would take

    def __post_init__(self):
        if not self.detector:
            object.__setattr__(self, "detector", self.id)

    @property
    def act(self) -> Action:
        return ACTIONS[self.action]

    def holds(self, score: float) -> bool:
        return score >= self.threshold and (self.high is None or score < self.high)

    def applies_to(self, client_id: str, tags: Mapping[str, str]) -> bool:
        return (not self.clients or client_id in self.clients) and all(tags.get(k) == v for k, v in self.tags)


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
    policy_version: str = ""
    escalations: Mapping[str, EndpointConfig] = field(default_factory=dict)
    # what clients see per live detector (ListDetectors, scores): its first acting rule, at its live slot
    views: tuple[Rule, ...] = ()

    def __post_init__(self):
        if not self.views:
            object.__setattr__(self, "views", detector_views(self.rules))

    @property
    def by_id(self) -> Mapping[str, Rule]:
        """Detector id -> its view."""
        return MappingProxyType({r.detector: r for r in self.views})

    @property
    def input_format(self) -> str:
        return self.bank.input_format if self.bank is not None else "chat"

    def select(self, ids: list[str], where: str = "detectors") -> list[Rule]:
        """The detectors whose results a request asked to see (empty = all); unknown ids are NOT_FOUND."""
        if not ids:
            return list(self.views)
        by_id, out = self.by_id, []
        for i, d in enumerate(ids):
            if d not in by_id:
                raise RequestError("NOT_FOUND", f"{where}[{i}]: unknown detector id {clip(d)}; "
                                                f"loaded: {sorted(by_id)}")
            if by_id[d] not in out:
                out.append(by_id[d])
        return out

    def rules_for(self, client_id: str, tags: Mapping[str, str]) -> list[Rule]:
        return [r for r in self.rules if r.applies_to(client_id, tags)]

    def permissions_for(self, client_id: str) -> ClientPermissions:
        return self.permissions.get(client_id) or self.permissions.get(WILDCARD) or ClientPermissions()


def detector_views(rules) -> tuple[Rule, ...]:
    """Per live detector, its first acting rule read at the detector's own slot (completion-scoped
    and shadow copies are not detectors clients see)."""
    live = {r.detector: r.slot for r in rules if r.act.acts and r.where != "completion"}
    seen: dict[str, Rule] = {}
    for r in rules:
        if r.act.acts and r.detector not in seen and r.detector in live:
            seen[r.detector] = replace(r, slot=live[r.detector])
    return tuple(seen.values())


def pack_dirs(settings: Settings, policy: Policy | None = None) -> list[Path]:
    """`packs` when set, else the shipped defaults plus shipped packs named by a configured policy;
    then `extra_packs`."""
    named = set(settings.detectors) | ({r.detector for r in policy.rules} if policy is not None else set())
    base = list(settings.packs) if settings.packs is not None else default_pack_dirs(also=named)
    return base + [p for p in settings.extra_packs if p not in base]


def read_policy(settings: Settings) -> Policy | None:
    """The configured policy file, or the one `detectors` settings spell (PolicyError when bad)."""
    if settings.policy is None:
        return None
    if settings.detectors:
        raise ValueError("detectors: per-detector policy is set in the policy file when `policy` is given; "
                         f"move {sorted(settings.detectors)} into {settings.policy}")
    return load_policy(settings.policy)


def build_snapshot(settings: Settings, runner) -> Snapshot:
    """Load and validate the configured packs and policy for this model; PackError / PolicyError /
    ValueError (naming the pack, rule or setting) when they are bad."""
    policy = read_policy(settings)
    packs = load_packs(pack_dirs(settings, policy), expect=runner.fingerprint)
    named = set(settings.detectors) if policy is None else {r.detector for r in policy.rules}
    unknown = named - {p.manifest.id for p in packs}
    if unknown:
        where = "detectors" if policy is None else f"policy {settings.policy}"
        raise ValueError(f"{where}: names detectors that are not loaded: {sorted(unknown)} "
                         f"(loaded: {sorted(p.manifest.id for p in packs)})")
    saes = _saes(settings, runner, packs)
    compiler = _Compiler(settings, runner, policy, packs, saes)
    bank, rules = compiler.compile()
    perms = {k: v.model_dump() for k, v in sorted(settings.permissions.items())}
    policy_version = policy.version if policy is not None else ""
    version_of = [perms, settings.steering_max_detector_cosine, sorted((i, s.source) for i, s in saes.items()),
                  policy_version]
    escalations = dict(policy.spec.escalations) if policy is not None else {}
    return Snapshot(_version(bank, rules, version_of), bank, rules, MappingProxyType(dict(settings.permissions)),
                    settings.steering_max_detector_cosine, MappingProxyType(saes), policy_version=policy_version,
                    escalations=MappingProxyType(escalations))


def reads(d: Detector) -> str:
    """What a rule that does not say reads of this detector (its pack's `reads`)."""
    return d.manifest.reads if d.manifest is not None else "both"


class _Compiler:
    """Policy rules against loaded packs: the bank (live detectors, shadow packs, completion-scoped
    copies) and the compiled rules, in the policy's order, then implicit alert rules."""

    def __init__(self, settings: Settings, runner, policy: Policy | None, packs, saes: dict[str, SAE]):
        self.settings, self.runner, self.policy, self.saes = settings, runner, policy, saes
        self.detectors = [Detector.from_pack(p) for p in packs]
        self.slots = {d.id: i for i, d in enumerate(self.detectors)}

    def compile(self) -> tuple[DetectorBank | None, tuple[Rule, ...]]:
        specs = self._specs()
        placed = [(i, spec, self._slot(i, spec)) for i, spec in enumerate(specs)]
        if not self.detectors:
            return None, ()
        # every detector no acting rule names alerts at its threshold, reading what its pack reads
        acting = {spec.detector for spec in specs if ACTIONS[spec.action].acts}
        implicit = [(self._read_slot(slot, reads(d)), d) for slot, d in enumerate(self.detectors[:len(self.slots)])
                    if d.id not in acting]
        s = self.settings
        bank = DetectorBank(self.detectors, device=self.runner.device, saes=self.saes,
                            explain_tokens=s.explain_tokens, explain_latents=s.explain_latents)
        rules = [self._rule(bank, i, spec, slot) for i, spec, slot in placed]
        rules += [Rule(slot, d.id, d.version, str(d.hook_point), float(d.threshold), "alert", where=reads(d))
                  for slot, d in implicit]
        return bank, tuple(rules)

    def _specs(self) -> list[RuleSpec]:
        if self.policy is not None:
            return self.policy.rules
        out = []
        for d in self.detectors:  # `detectors` settings: one rule per detector, named after it
            cfg = self.settings.detectors.get(d.id, DetectorPolicyConfig())
            steer = Steer(direction=True, coefficient=cfg.steer_coefficient) if cfg.action == "steer" else None
            # (built unvalidated: these thresholds were checked as settings, where 0 and 1 are allowed)
            out.append(RuleSpec(id=d.id, detector=d.id, when=When.model_construct(threshold=cfg.threshold),
                                action=cfg.action, steer=steer))
        return out

    def _where(self, i: int) -> str:
        return f"rules[{i}]" if self.policy is not None else f"detectors.{self.detectors[i].id}"

    def _slot(self, i: int, spec: RuleSpec) -> int:
        """The bank slot the rule reads, adding a shadow pack or a completion-scoped copy as needed."""
        if spec.shadow is not None and spec.shadow.pack is not None:
            path = spec.shadow.pack if spec.shadow.pack.is_absolute() else self.policy.base / spec.shadow.pack
            (pack,) = load_packs([path], expect=self.runner.fingerprint)
            if pack.manifest.id != spec.detector:
                raise ValueError(f"{self._where(i)}.shadow.pack: {path} holds detector {pack.manifest.id!r}, not "
                                 f"{spec.detector!r}; a shadow pack is another version of the rule's detector")
            base = self._add(replace(Detector.from_pack(pack), id=f"{spec.detector}@shadow:{spec.id}"))
        else:
            base = self.slots[spec.detector]
        return self._read_slot(base, spec.when.where or reads(self.detectors[base]))

    def _read_slot(self, base: int, where: str) -> int:
        """`base`, or for `where: completion` its completion-scoped copy (added once)."""
        if where != "completion":
            return base
        d = self.detectors[base]
        return self._add(replace(d, id=f"{d.id}@completion", scope="completion"))

    def _add(self, det: Detector) -> int:
        if det.id not in {d.id for d in self.detectors}:
            self.detectors.append(det)
        return next(i for i, d in enumerate(self.detectors) if d.id == det.id)

    def _rule(self, bank: DetectorBank, i: int, spec: RuleSpec, slot: int) -> Rule:
        d = bank.detectors[slot]
        w = spec.when
        low, high = (w.band if w.band is not None else (w.threshold, None))
        refusal = spec.refusal or (self.policy.spec.refusal if self.policy is not None else DEFAULT_REFUSAL)
        steering = self._steering(bank, i, spec, slot) if spec.steer is not None else ()
        return Rule(slot, spec.id, d.version, str(d.hook_point), float(d.threshold if low is None else low),
                    spec.action, steering, detector=spec.detector, high=high, min_tokens=w.min_tokens,
                    where=w.where or reads(d), clients=frozenset(spec.match.clients),
                    tags=tuple(sorted(spec.match.tags.items())),
                    refusal=refusal, escalate=spec.escalate, would=spec.shadow.would if spec.shadow else None)

    def _steering(self, bank: DetectorBank, i: int, spec: RuleSpec, slot: int) -> tuple[Steering, ...]:
        st, where = spec.steer, f"{self._where(i)}.steer"
        if st.direction:
            directions = bank.directions(slot)
            if directions.shape[1] != 1:
                raise ValueError(f"{where}.direction: detector {spec.detector!r} is not linear (it reads "
                                 f"{directions.shape[1]} directions); steer with a vector or a clamp")
            coefficient = 1.0 if st.coefficient is None else st.coefficient
            return (Steering(bank.detectors[slot].hook_point, "ablate", directions[:, 0].clone(), coefficient,
                             "generated", id=f"{spec.detector}:direction"),)
        if st.clamp is not None:
            try:
                sae = open_sae(st.clamp.sae, base=self.policy.base if self.policy else None,
                               expect=self.runner.fingerprint, d_model=self.runner.d_model)
                sae = self.saes.get(sae.id) or sae.to(self.runner.device)
                return (Steering.clamp(sae, st.clamp.latent, st.clamp.value, "generated"),)
            except ValueError as e:
                raise ValueError(f"{where}.clamp: {e}") from None
        from probes.vectors import open_vector_pack

        try:
            pack = open_vector_pack(st.vector, self.policy.base if self.policy else None,
                                    expect=self.runner.fingerprint)
            points = [HookPoint.parse(p) for p in st.hook_points] if st.hook_points is not None else None
            return tuple(pack.steering(st.coefficient, st.kind, "generated", points))
        except ValueError as e:
            raise ValueError(f"{where}.vector: {e}") from None


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
    """The rule with another action (a per-request override); steering ablates the detector's own direction."""
    rule = replace(rule, action=action, steering=(), escalate=None)
    if not ACTIONS[action].steers:
        return rule
    directions = bank.directions(rule.slot)
    if directions.shape[1] != 1:
        raise ValueError(f"detector {rule.detector!r}: action {action!r} needs a linear detector (its direction is "
                         "ablated); use 'alert' or 'block'")
    s = Steering(bank.detectors[rule.slot].hook_point, "ablate", directions[:, 0].clone(), coefficient,
                 "generated", id=f"{rule.detector}:direction")
    return replace(rule, steering=(s,))


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
    h.update(json.dumps([(r.id, r.detector, r.slot, r.threshold, r.high, r.action,
                          [(st.id, str(st.hook_point), st.kind, st.coefficient) for st in r.steering])
                         for r in rules] + policy).encode())
    return h.hexdigest()[:12]

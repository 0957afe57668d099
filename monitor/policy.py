"""The policy file: rules from a detector's score to an action, in one pydantic schema.

`latentwatch serve --policy FILE` and `latentwatch policy check FILE` read it with `load_policy`;
every error names its path (``rules[2].when.threshold: must be in (0, 1)``). A rule names a
detector (a probe or a latent detector pack), a condition on its aggregate score, who it applies
to, and one action (monitor.domain.ACTIONS). `monitor.snapshot` compiles the file against the
loaded packs into the rules a request is decided by; the policy's version (a content hash) is
part of the snapshot version and of every record.

Monitoring cannot be switched off by omission: a loaded detector that no acting rule names keeps
the rule it has without a policy file (alert at its calibrated threshold).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from monitor.domain import RuleActionName, RuleWhere, VerdictActionName
from monitor.escalation import EndpointConfig

DEFAULT_REFUSAL = "I can't help with that."
RULE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"


class PolicyError(ValueError):
    """A policy file that cannot be used; `errors` lists each problem as ``path: message``."""

    def __init__(self, source: str, errors: list[str]):
        self.source, self.errors = source, errors
        shown = "; ".join(errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
        super().__init__(f"policy {source}: {shown}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class When(_Strict):
    """When a rule fires: its detector's aggregate score so far reaches `threshold` (the pack's
    calibrated one unless set), or lies in `band` [low, high); after `min_tokens` scored tokens
    of `where` (prompt: decided once, on the prompt; completion: generated tokens only; both; left
    out: what the detector's pack says it reads, `Manifest.reads`)."""

    threshold: float | None = Field(None, description="'calibrated' (default) or a score in (0, 1).")
    band: tuple[float, float] | None = Field(None, description="[low, high): fire when low <= score < high.")
    min_tokens: int = Field(1, ge=1, le=1_000_000, description="Scored tokens (of `where`) before the rule may fire.")
    where: RuleWhere | None = None

    @field_validator("threshold", mode="before")
    @classmethod
    def _calibrated(cls, v: Any) -> Any:
        if v == "calibrated":
            return None
        if isinstance(v, str) or isinstance(v, bool):
            raise ValueError("must be 'calibrated' or a number in (0, 1)")
        return v

    @field_validator("threshold")
    @classmethod
    def _in_unit_interval(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v < 1:
            raise ValueError("must be in (0, 1)")
        return v

    @field_validator("band")
    @classmethod
    def _band(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 <= v[0] < v[1] <= 1:
            raise ValueError("must be [low, high) with 0 <= low < high <= 1")
        return v

    @model_validator(mode="after")
    def _one_condition(self) -> When:
        if self.band is not None and self.threshold is not None:
            raise ValueError("set threshold or band, not both")
        return self


class Match(_Strict):
    """Which requests a rule applies to: any client id in `clients` (empty: every client) whose
    request tags include every `tags` entry."""

    clients: list[str] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)


class Clamp(_Strict):
    sae: str = Field(description="SAE folder or shipped id (probes/saes).")
    latent: int = Field(ge=0)
    value: float


class Steer(_Strict):
    """What a `steer` rule switches on from the token after it fires, for the rest of the request:
    a steering vector pack (added or ablated), the detector's own direction (ablated), or a
    latent clamp."""

    vector: str | None = Field(None, description="Steering vector pack: folder (relative to the policy file) or id.")
    direction: bool = Field(False, description="Ablate the rule's detector's own direction (linear detectors).")
    clamp: Clamp | None = None
    kind: Literal["add", "ablate"] | None = Field(None, description="For `vector`; default: the pack's suggestion.")
    coefficient: float | None = Field(None, description="Default: the pack's (direction: 1 = remove all of it).")
    hook_points: list[str] | None = Field(None, description="For `vector`: a subset of the pack's hook points.")

    @model_validator(mode="after")
    def _one_source(self) -> Steer:
        given = [n for n, v in (("vector", self.vector), ("direction", self.direction), ("clamp", self.clamp)) if v]
        if len(given) != 1:
            raise ValueError("set exactly one of vector, direction or clamp")
        if self.vector is None and (self.kind is not None or self.hook_points is not None):
            raise ValueError("kind and hook_points only apply to a vector")
        if self.clamp is not None and self.coefficient is not None:
            raise ValueError("a clamp sets its latent to clamp.value; coefficient does not apply")
        if self.direction and self.coefficient is not None and not 0 <= self.coefficient <= 1:
            raise ValueError("coefficient of an ablated direction must be in [0, 1]")
        return self


class Escalate(_Strict):
    """Ask the named second opinion (`escalations`), then act on its verdict. A failed check
    (timeout, error, endpoint down) serves on and is recorded, unless `fail_closed`."""

    endpoint: str
    include_completion: bool = Field(True, description="Send the completion so far with the request.")
    on_flagged: VerdictActionName = "block"
    on_clear: VerdictActionName = "log"
    fail_closed: bool = Field(False, description="Block when the check fails.")


class Shadow(_Strict):
    """Evaluate without acting: record the would-be decision only. `pack` is a second version of
    the detector (a folder, relative to the policy file), scored beside the live one."""

    pack: Path | None = None
    would: Literal["log", "alert", "steer", "block"] = "block"


class RuleSpec(_Strict):
    id: str = Field(pattern=RULE_ID_PATTERN, description="Unique; recorded with every decision.")
    detector: str = Field(min_length=1)
    when: When = Field(default_factory=When)
    match: Match = Field(default_factory=Match)
    action: RuleActionName
    refusal: str | None = Field(None, min_length=1, max_length=4000, description="block: the refusal returned.")
    steer: Steer | None = None
    escalate: Escalate | None = None
    shadow: Shadow | None = None

    @model_validator(mode="before")
    @classmethod
    def _shadow_default(cls, data: Any) -> Any:
        """A shadow rule without a `shadow` block would block."""
        if isinstance(data, dict) and data.get("action") == "shadow" and data.get("shadow") is None:
            return {**data, "shadow": {}}
        return data

    @model_validator(mode="after")
    def _action_settings(self) -> RuleSpec:
        esc = self.escalate
        verdicts = {esc.on_flagged, esc.on_clear} if esc is not None else set()
        would_steer = self.shadow is not None and self.shadow.would == "steer"
        needs = {"steer": self.action == "steer" or "steer" in verdicts or would_steer,
                 "escalate": self.action == "escalate", "shadow": self.action == "shadow"}
        for name, needed in needs.items():
            if needed and getattr(self, name) is None:
                raise ValueError(f"action {self.action!r} needs `{name}`" + (" (what it would switch on)"
                                                                            if would_steer else ""))
            if not needed and getattr(self, name) is not None:
                raise ValueError(f"`{name}` does not apply to action {self.action!r}")
        if self.refusal is not None and self.action not in ("block", "escalate"):
            raise ValueError(f"`refusal` applies to block and escalate, not {self.action!r}")
        return self


class PolicyFile(_Strict):
    """The file's top level."""

    version: str | None = Field(None, max_length=64, description="A label for people; recorded beside the hash.")
    refusal: str = Field(DEFAULT_REFUSAL, min_length=1, max_length=4000, description="Default refusal of block.")
    escalations: dict[str, EndpointConfig] = Field(default_factory=dict, description="Second opinions, by name.")
    rules: list[RuleSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> PolicyFile:
        seen: set[str] = set()
        for i, r in enumerate(self.rules):
            if r.id in seen:
                raise ValueError(f"rules[{i}].id: {r.id!r} is used by an earlier rule; rule ids are unique")
            seen.add(r.id)
            if r.escalate is not None and r.escalate.endpoint not in self.escalations:
                raise ValueError(f"rules[{i}].escalate.endpoint: {r.escalate.endpoint!r} is not under `escalations` "
                                 f"(defined: {sorted(self.escalations) or 'none'})")
        return self


class Policy:
    """A validated policy file, its version and where it came from (relative paths in it)."""

    def __init__(self, spec: PolicyFile, source: Path | None = None):
        self.spec, self.source = spec, source
        digest = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()
        self.version = f"{spec.version}@{digest[:8]}" if spec.version else digest[:12]

    @property
    def base(self) -> Path:
        return self.source.parent if self.source is not None else Path.cwd()

    @property
    def rules(self) -> list[RuleSpec]:
        return self.spec.rules


def error_lines(e: ValidationError) -> list[str]:
    """pydantic's errors as ``rules[2].when.threshold: must be in (0, 1)``."""
    out = []
    for err in e.errors():
        path = ""
        for part in err["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        msg = err["msg"].removeprefix("Value error, ")
        out.append(f"{path}: {msg}" if path else msg)
    return out


def parse_policy(data: Any, source: str = "<policy>", path: Path | None = None) -> Policy:
    try:
        return Policy(PolicyFile.model_validate(data), path)
    except ValidationError as e:
        raise PolicyError(source, error_lines(e)) from None


def load_policy(path: str | Path) -> Policy:
    """Read and validate a YAML (or JSON) policy file; PolicyError names every problem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PolicyError(str(path), ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(str(path), [f"cannot read it ({type(e).__name__})"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise PolicyError(str(path), [f"{where}not valid YAML ({getattr(e, 'problem', None) or 'parse error'})"]) \
            from None
    if not isinstance(data, dict):
        raise PolicyError(str(path), ["the file must hold a mapping with `rules` (a list)"])
    return parse_policy(data, str(path), path.resolve())




def check_references(policy: Policy, pack_ids: set[str]) -> list[str]:
    """What the schema cannot see, checked without the model: escalation endpoints that can be made
    (API key variables set), detectors among `pack_ids` (the packs a server would load, plus shipped
    ones a rule names), shadow packs, vector packs and SAEs that load. Each problem as
    ``rules[i].field: message``; model fingerprints wait for the model."""
    from monitor.escalation import endpoint
    from monitor.sae import SAEError
    from monitor.sae.store import open_sae
    from probes.pack import PackError, ProbePack
    from probes.vectors import open_vector_pack

    errors = []
    for name, cfg in policy.spec.escalations.items():
        try:
            endpoint(name, cfg)  # reads its API key variable and CA file; connects only when asked
        except ValueError as e:
            errors.append(f"escalations.{name}: {e}")
    for i, r in enumerate(policy.rules):
        where = f"rules[{i}]"
        if r.detector not in pack_ids:
            errors.append(f"{where}.detector: {r.detector!r} is not loaded (loaded: {sorted(pack_ids) or 'none'})")
        if r.shadow is not None and r.shadow.pack is not None:
            path = r.shadow.pack if r.shadow.pack.is_absolute() else policy.base / r.shadow.pack
            try:
                if (found := ProbePack.load(path).manifest.id) != r.detector:
                    errors.append(f"{where}.shadow.pack: {path} holds detector {found!r}, not {r.detector!r}")
            except PackError as e:
                errors.append(f"{where}.shadow.pack: {e}")
        st = r.steer
        try:
            if st is not None and st.vector is not None:
                open_vector_pack(st.vector, policy.base)
            if st is not None and st.clamp is not None:
                open_sae(st.clamp.sae, base=policy.base)
        except (SAEError, ValueError) as e:
            errors.append(f"{where}.steer.{'vector' if st.vector is not None else 'clamp'}: {e}")
    return errors


__all__ = ["DEFAULT_REFUSAL", "Clamp", "Escalate", "Match", "Policy", "PolicyError", "PolicyFile", "RuleSpec",
           "Shadow", "Steer", "When", "check_references", "error_lines", "load_policy", "parse_policy"]

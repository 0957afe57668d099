"""Probe packs: a folder with manifest.json and weights.safetensors, refused loudly when unsafe.

latentwatch never unpickles: weights are safetensors only, hashed in the manifest, and checked
against the model they were trained on before any score reaches a user.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from monitor.domain import WINDOWED_AGGREGATIONS, AggregationName, RuleWhere
from probes.fingerprint import ModelFingerprint
from probes.kinds import Probe, ScoringHead, probe_kind

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle")
HOOK_POINT = r"^blocks\.(\d+)\.(resid_pre|resid_post|attn_out|mlp_out)$"
# The load-time health check scores every head on seeded Gaussian activations at about the norm of
# a small model's residual stream (SmolLM2's pooled activations: ~150), plus the zero vector.
CHECK_INPUTS, CHECK_NORM, CHECK_SEED = 64, 100.0, 0


class PackError(ValueError):
    """A pack latentwatch refuses to load; the message names the folder and the fix."""

    def __init__(self, folder: Path, problem: str, fix: str):
        super().__init__(f"probe pack {folder}: {problem}; {fix}")


class Aggregation(BaseModel):
    """How per-token scores become one score per sequence."""

    model_config = ConfigDict(extra="forbid")

    kind: AggregationName
    alpha: float | None = None
    window: int | None = None

    @model_validator(mode="after")
    def _params_match_kind(self) -> Aggregation:
        if self.kind == "ema":
            if self.alpha is None or not 0 < self.alpha <= 1:
                raise ValueError("ema needs alpha with 0 < alpha <= 1")
        elif self.alpha is not None:
            raise ValueError(f"alpha is only for ema, not {self.kind}")
        if self.kind in WINDOWED_AGGREGATIONS:
            if self.window is None or self.window < 1:
                raise ValueError(f"{self.kind} needs window >= 1")
        elif self.window is not None:
            raise ValueError(f"window is only for {' and '.join(WINDOWED_AGGREGATIONS)}, not {self.kind}")
        return self


class Calibration(BaseModel):
    """How the threshold was chosen: a target false-positive rate on a named benign set.

    `target_fpr_out_of_fold`: the benign rows were also training rows, each scored by the
    cross-validation model that held it out.
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["target_fpr", "target_fpr_out_of_fold"]
    target_fpr: float = Field(gt=0, lt=1)
    benign_set: str
    n_benign: int = Field(ge=1)
    achieved_fpr: float = Field(ge=0, le=1)


class Platt(BaseModel):
    """Scores as probabilities: sigmoid(a * logit + b), a and b fitted on aggregate logits of rows
    each scored by a model that never saw their source. Every aggregation commutes with it (a > 0),
    so it is folded into the head: rankings, AUROC and recall at any FPR are what they were without it.
    """

    model_config = ConfigDict(extra="forbid")

    a: float = Field(gt=0)
    b: float
    fitted_on: str
    n: int = Field(ge=2)


class Manifest(BaseModel):
    """Everything about a pack except its tensors; the bank reads hook, aggregation, threshold."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1]
    id: str = Field(pattern=r"^[a-z0-9_\-]+$")
    version: str
    kind: str
    kind_config: dict[str, Any]
    hook_point: str = Field(pattern=HOOK_POINT)
    d_model: int = Field(ge=1)
    aggregation: Aggregation
    input_format: Literal["chat", "raw"]
    threshold: float = Field(ge=0, le=1)
    calibration: Calibration | None = None
    platt: Platt | None = None  # probe heads only (an SAE latent kind scales its own)
    metrics: dict[str, dict[str, float]]
    model: ModelFingerprint
    provenance: dict[str, Any]
    weights_sha256: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")
    description: str = ""
    # Shipped packs below their quality target stay off unless asked for by id or path.
    enabled_by_default: bool = True
    # What a rule that does not say (`when.where`) reads: "prompt" for a request detector (decided on
    # the prompt it was trained on), "completion" for one trained on answers, "both" otherwise.
    reads: RuleWhere = "both"

    @property
    def layer(self) -> int:
        return int(self.hook_point.split(".")[1])

    @model_validator(mode="after")
    def _layer_in_model(self) -> Manifest:
        if self.layer >= self.model.num_layers:
            raise ValueError(
                f"hook_point {self.hook_point} is past the last block of a "
                f"{self.model.num_layers}-layer model"
            )
        return self


@dataclass
class ProbePack:
    """A probe plus the manifest that says where it reads, how it aggregates, and when it fires."""

    manifest: Manifest
    probe: Probe

    def head(self):
        """What the bank scores: a ScoringHead (Platt scaling folded in), or a LatentHead for SAE-feature kinds."""
        head, platt = self.probe.head(), self.manifest.platt
        return head if platt is None else head.scaled(platt.a, platt.b)

    def save(self, folder: Path | str) -> None:
        """Write weights, then a manifest that records their sha256, kind and kind_config."""
        folder = Path(folder)
        tensors = self.probe.tensors()
        _check_finite(folder, tensors)
        _check_head(folder, self.probe)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / WEIGHTS)
        self.manifest = self.manifest.model_copy(
            update={
                "kind": self.probe.kind,
                "kind_config": self.probe.config.model_dump(),
                "weights_sha256": hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest(),
            }
        )
        (folder / MANIFEST).write_text(self.manifest.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path | str, expect: ModelFingerprint | None = None) -> ProbePack:
        """Load and verify a pack; `expect` is the fingerprint of the model it will run on."""
        folder = Path(folder)
        weights_path = folder / WEIGHTS
        if not weights_path.is_file() and folder.is_dir():
            pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickled:
                raise PackError(
                    folder,
                    f"found {', '.join(pickled)} but no {WEIGHTS}",
                    "latentwatch never unpickles user files; re-export as safetensors",
                )
        manifest = _read_manifest(folder)
        try:
            kind = probe_kind(manifest.kind)
        except ValueError as e:
            raise PackError(folder, str(e), "upgrade latentwatch or re-export the pack") from None
        try:
            config = kind.config_cls.model_validate(manifest.kind_config)
        except ValidationError as e:
            raise PackError(
                folder,
                f"kind_config is not valid for kind '{manifest.kind}': {_summarise(e)}",
                "fix kind_config in manifest.json or re-export the pack",
            ) from None
        tensors = _read_weights(folder, manifest)
        _check_finite(folder, tensors)
        if manifest.d_model != manifest.model.d_model:
            raise PackError(
                folder,
                f"wrong shape: manifest d_model {manifest.d_model} disagrees with its model "
                f"fingerprint's d_model {manifest.model.d_model}",
                "re-export the pack",
            )
        try:
            probe = kind.from_tensors(config, tensors)
        except ValueError as e:
            raise PackError(folder, f"wrong shape: {e}", "re-export the pack") from None
        try:
            probe.attach(folder, expect, manifest.d_model)
        except ValueError as e:  # SAEError names the SAE's folder and what is wrong with it
            raise PackError(folder, f"cannot load the SAE it reads: {e}", "copy that SAE beside the pack, or "
                            "retrain the detector on an SAE you have") from None
        sae = getattr(probe, "sae", None)
        if sae is not None and str(sae.hook_point) != manifest.hook_point:
            raise PackError(folder, f"the manifest says hook_point {manifest.hook_point}, but its SAE "
                            f"({sae.source}) reads {sae.hook_point}", "fix hook_point in manifest.json")
        d_weights = _folded_head(probe).d_in
        if d_weights != manifest.d_model:
            raise PackError(
                folder,
                f"wrong shape: weights have d_model {d_weights}, manifest says {manifest.d_model}",
                "re-export the pack",
            )
        if manifest.platt is not None and not isinstance(_folded_head(probe), ScoringHead):
            raise PackError(folder, f"platt scaling is for probe heads; kind {manifest.kind} scales its own scores",
                            "remove `platt` from manifest.json")
        _check_head(folder, probe)
        if expect is not None and (why := manifest.model.mismatch(expect)):
            raise PackError(
                folder,
                f"made for a different model: {why}",
                "load the model this pack was trained on, or retrain the probe for this model",
            )
        return cls(manifest, probe)


def load_packs(paths: list[Path], expect: ModelFingerprint | None = None) -> list[ProbePack]:
    packs, seen = [], {}
    for path in paths:
        pack = ProbePack.load(path, expect)
        if (other := seen.get(pack.manifest.id)) is not None:
            raise PackError(
                Path(path),
                f"duplicate pack id '{pack.manifest.id}', also used by {other}",
                "load only one of them or give one a new id",
            )
        seen[pack.manifest.id] = Path(path)
        packs.append(pack)
    return packs


def shipped_packs_dir() -> Path:
    """The default packs installed with latentwatch, one subfolder per pack id."""
    return Path(__file__).parent / "packs"


def shipped_packs() -> dict[str, tuple[Path, bool]]:
    """Shipped pack id -> (folder, enabled_by_default)."""
    root = shipped_packs_dir()
    found = {}
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if (folder / MANIFEST).is_file():
            m = _read_manifest(folder)
            found[m.id] = (folder, m.enabled_by_default)
    return found


def default_pack_dirs(also: Iterable[str] = ()) -> list[Path]:
    """The shipped packs a server loads unless told otherwise: those enabled by default, plus the
    shipped ones named in `also` (detector ids with a configured policy)."""
    wanted = set(also)
    return [folder for pid, (folder, on) in shipped_packs().items() if on or pid in wanted]


def _read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST
    if not path.is_file():
        raise PackError(
            folder,
            f"no {MANIFEST} found",
            f"a probe pack is a folder with {MANIFEST} and {WEIGHTS}; check the path",
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackError(
            folder, f"{MANIFEST} is not valid JSON ({e})", "fix or re-export it"
        ) from None
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        raise PackError(
            folder,
            f"{MANIFEST} does not match the manifest schema: {_summarise(e)}",
            "fix those fields or re-export the pack with this latentwatch version",
        ) from None


def _read_weights(folder: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Hash and parse the same bytes, so what is verified is what is loaded."""
    path = folder / WEIGHTS
    if not path.is_file():
        raise PackError(folder, f"{WEIGHTS} is missing", "copy the whole pack folder")
    data = path.read_bytes()
    if _looks_pickled(data):
        raise PackError(
            folder,
            f"{WEIGHTS} is a pickle or torch.save file, not safetensors",
            "latentwatch never unpickles user files; re-export as safetensors",
        )
    if not manifest.weights_sha256:
        raise PackError(
            folder, "manifest.json has no weights_sha256", "write packs with ProbePack.save"
        )
    sha = hashlib.sha256(data).hexdigest()
    if sha != manifest.weights_sha256:
        raise PackError(
            folder,
            f"{WEIGHTS} is truncated or modified (sha256 {sha[:12]}…, manifest says "
            f"{manifest.weights_sha256[:12]}…)",
            "copy the pack again or re-export it",
        )
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError) as e:
        raise PackError(
            folder,
            f"{WEIGHTS} is truncated or modified: it does not parse ({e})",
            "copy the pack again or re-export it",
        ) from None


def _looks_pickled(data: bytes) -> bool:
    """Pickle (protocol 2+) or torch.save's zip; a real safetensors header can start with 0x80."""
    header_len = int.from_bytes(data[:8], "little")
    if len(data) >= 9 and 8 + header_len <= len(data) and data[8:9] == b"{":
        return False
    pickle = data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    return pickle or data[:4] == b"PK\x03\x04"


def _check_finite(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise PackError(
                folder,
                f"tensor '{name}' has non-finite values (NaN or inf)",
                "the probe diverged while training; retrain it",
            )


def check_inputs(d_model: int) -> torch.Tensor:
    """The fixed float32 batch every head is scored on before it is trusted: [CHECK_INPUTS + 1, d_model]."""
    gen = torch.Generator().manual_seed(CHECK_SEED)
    x = torch.randn(CHECK_INPUTS, d_model, generator=gen) * (CHECK_NORM / d_model**0.5)
    return torch.cat([x, torch.zeros(1, d_model)])


def head_problem(head) -> str | None:
    """Why this head would silently disable its detector, or None.

    NaN scores never cross a threshold and a constant score cannot tell inputs apart, so both pass
    every schema check and still leave the detector unable to flag anything.
    """
    if isinstance(head, ScoringHead):
        parts = {"w1": head.w1, "b1": head.b1, "w2": head.w2, "b2": torch.tensor(head.b2)}
    else:  # a LatentHead
        parts = {"weights": head.weights, "bias": torch.tensor(head.bias)}
    overflow = [name for name, t in parts.items() if t is not None and not torch.isfinite(t).all()]
    if overflow:
        return (
            f"its folded scoring weights ({', '.join(overflow)}) overflow float32, e.g. a std of 0 "
            "or a weight near float32's limit"
        )
    inputs = check_inputs(head.d_in)
    if hasattr(head, "firing_inputs"):  # random activations rarely make a given SAE latent fire
        inputs = torch.cat([inputs, head.firing_inputs(CHECK_NORM)])
    with torch.no_grad():
        logits = head.logits(inputs)
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).sum())
        return f"its scoring head gives NaN or inf on {bad} of {len(logits)} check inputs"
    if logits.max() - logits.min() <= 1e-6 * logits.abs().max():
        return f"its scoring head gives the same logit ({logits[0].item():.6g}) for every check input"
    return None


def _folded_head(probe: Probe) -> ScoringHead:
    """The head the bank would get; overflow while folding is for `head_problem` to report."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        return probe.head()


def _check_head(folder: Path, probe: Probe) -> None:
    if problem := head_problem(_folded_head(probe)):
        raise PackError(
            folder,
            f"{problem}: the detector would be blind, flagging nothing (or everything)",
            "retrain the probe (check the training data has signal) or fix the exported weights",
        )


def _summarise(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in error.errors()
    )


__all__ = [
    "Aggregation",
    "Calibration",
    "Manifest",
    "Platt",
    "ModelFingerprint",
    "PackError",
    "ProbePack",
    "check_inputs",
    "head_problem",
    "load_packs",
    "shipped_packs_dir",
]

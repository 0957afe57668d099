"""Steering-vector packs: a folder with manifest.json and vectors.safetensors, plus repeng's GGUF layout.

A pack holds one float32 vector per hook point (safetensors key = hook point name), hashed in the
manifest and checked against the model it was made on, like probe packs: a vector added to the
wrong residual stream steers noise. Nothing here unpickles.

A pack's coefficient scales the stored vector as it is (h += coefficient * v, the way repeng's
`set_control` and llama.cpp's `--control-vector-scaled` apply theirs), so a vector imported from
repeng steers at coefficient c as repeng does at c. Built vectors keep their natural scale (a
difference of means is the shift from the negatives' mean to the positives'), so coefficient 1
moves activations by one class separation whatever the method.

Layer indices in repeng's GGUF files (`controlvector.model_hint`, `controlvector.layer_count`,
tensors `direction.<layer>`) count decoder blocks from 0 and name each block's OUTPUT:
`ControlModel` wraps `model_layer_list(model)[i]` (`model.model.layers[i]`, GPT-2's
`transformer.h[i]`) and adds `coeff * direction` to what that module returns, and training reads
`hidden_states[i + 1]`, the same tensor. So `direction.<i>` is our `blocks.<i>.resid_post`; other
sites have no repeng equivalent and are refused on export. (repeng trains layers n-1 .. 1 by
default, in that order; for layer n-1 it reads `hidden_states[n]`, which Hugging Face returns after
the final norm, while its control adds before that norm.)

llama.cpp (`--control-vector FILE`, `--control-vector-scaled FILE S`, `--control-vector-layer-range
START END`) reads the same files in `common_control_vector_load_one`: only tensors named
`direction.<k>` (metadata is ignored; any other tensor name fails the file), each 1-D F32 of one
common length; `direction.0` is rejected ("invalid (zero) direction tensor layer index"), because
its buffer stores layers 1 .. n_layer-1 only. `build_cvec(cur, il)` adds tensor k to the output of
block k after its last residual add, at every position, prompt included. So `direction.<k>` is
`blocks.<k>.resid_post` there too, and block 0's output cannot be steered by llama.cpp.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from monitor.domain import HookPoint, HookPointError
from probes.fingerprint import ModelFingerprint
from probes.pack import HOOK_POINT, PICKLE_SUFFIXES, _looks_pickled, _summarise

if TYPE_CHECKING:
    from monitor.steering import Positions, Steering

MANIFEST = "manifest.json"
VECTORS = "vectors.safetensors"
METHODS = ("diff_means", "pca", "probe", "repeng")
PACK_ID = r"^[a-z0-9_\-]+$"
GGUF_ARCH = "controlvector"
_DIRECTION = re.compile(r"^direction\.(\d+)$")


class VectorPackError(ValueError):
    """A steering-vector pack or control-vector file latentwatch refuses; names the file and the fix."""

    def __init__(self, path: Path | str, problem: str, fix: str):
        super().__init__(f"{path}: {problem}; {fix}")


class DataFile(BaseModel):
    """A file a vector was derived from, pinned by the sha256 of its bytes."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["positive", "negative", "source"]
    path: str
    rows: int | None = Field(default=None, ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Provenance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: list[DataFile] = Field(default_factory=list)
    commit: str = "unknown"
    params: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))


class HookVector(BaseModel):
    """One hook point's vector as `show` reports it; the tensor itself is in vectors.safetensors."""

    model_config = ConfigDict(extra="forbid")

    hook_point: str = Field(pattern=HOOK_POINT)
    norm: float = Field(ge=0)
    # (mean projection of positives - of negatives) / pooled std, on the unit vector, over the build data
    separation: float | None = None
    cosine_diff_means: float | None = None  # how far another method's vector is from the plain difference of means


class VectorManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    id: str = Field(pattern=PACK_ID)
    description: str = ""
    # None for imported files, which only carry repeng's model_hint (a model_type): then the
    # loader can check d_model and the hint, not the checkpoint.
    model: ModelFingerprint | None = None
    model_hint: str = ""
    d_model: int = Field(ge=1)
    method: Literal["diff_means", "pca", "probe", "repeng"]
    hook_points: list[HookVector] = Field(min_length=1)
    default_coefficient: float = 1.0
    kind: Literal["add", "ablate"] = "add"
    vectors_sha256: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")
    provenance: Provenance = Field(default_factory=Provenance)
    evaluation: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> VectorManifest:
        if not math.isfinite(self.default_coefficient):
            raise ValueError("default_coefficient must be finite")
        if self.kind == "ablate" and not 0 <= self.default_coefficient <= 1:
            raise ValueError("an ablation's default_coefficient is the share removed: it must be in [0, 1]")
        names = [h.hook_point for h in self.hook_points]
        if len(set(names)) != len(names):
            raise ValueError(f"hook_points lists a hook point twice: {names}")
        if self.model is not None:
            if self.model.d_model != self.d_model:
                raise ValueError(f"d_model {self.d_model} disagrees with the model fingerprint's {self.model.d_model}")
            past = [n for n in names if HookPoint.parse(n).layer >= self.model.num_layers]
            if past:
                raise ValueError(f"{', '.join(past)} is past the last block of a {self.model.num_layers}-layer model")
        return self


@dataclass(frozen=True)
class VectorPack:
    """A loaded pack; `directions` follows the manifest's order (a repeng file's own order)."""

    manifest: VectorManifest
    directions: dict[HookPoint, torch.Tensor]
    source: Path | None = None  # the folder or file it came from, for messages

    @property
    def id(self) -> str:
        return self.manifest.id

    @classmethod
    def create(
        cls,
        pack_id: str,
        directions: dict[HookPoint, torch.Tensor],
        *,
        method: str,
        stats: dict[HookPoint, dict[str, float | None]] | None = None,
        source: Path | None = None,
        **manifest,
    ) -> VectorPack:
        """A pack not yet saved: norms and d_model from the tensors, `stats` per hook point (separation,
        cosine_diff_means), the other manifest fields as given."""
        tensors = {p: v.detach().float().cpu().contiguous() for p, v in directions.items()}
        stats = stats or {}
        entries = [HookVector(hook_point=str(p), norm=float(v.norm()), **stats.get(p, {})) for p, v in tensors.items()]
        d_model = next(iter(tensors.values())).numel() if tensors else 0
        try:
            m = VectorManifest(id=pack_id, method=method, hook_points=entries, d_model=d_model, **manifest)
        except ValidationError as e:
            raise ValueError(f"steering vector pack {pack_id!r}: {_summarise(e)}") from None
        return cls(m, tensors, source)

    def steering(
        self,
        coefficient: float | None = None,
        kind: Literal["add", "ablate"] | None = None,
        positions: Positions = "generated",
        hook_points: list[HookPoint | str] | None = None,
    ) -> list[Steering]:
        """One `Steering` per hook point, id `<pack id>@<hook point>`. For `add`, `coefficient` scales the
        stored vector (monitor.steering adds coefficient * unit vector, so the norm moves into it); for
        `ablate` it is the share of the projection removed. Default: the manifest's coefficient for its
        own kind, 1.0 for the other."""
        from monitor.steering import Steering  # the engine's type; loading a pack needs none of the engine

        kind = kind or self.manifest.kind
        if coefficient is None:
            coefficient = self.manifest.default_coefficient if kind == self.manifest.kind else 1.0
        points = list(self.directions) if hook_points is None else [_point(self, p) for p in hook_points]
        out = []
        for p in points:
            v = self.directions[p]
            c = coefficient * float(v.norm()) if kind == "add" else coefficient
            out.append(Steering(p, kind, v, c, positions, id=f"{self.id}@{p}"))
        return out


def _point(pack: VectorPack, name: HookPoint | str) -> HookPoint:
    point = name if isinstance(name, HookPoint) else HookPoint.parse(name)
    if point not in pack.directions:
        raise VectorPackError(
            pack.source or pack.id,
            f"no vector at {point}",
            f"use one of its hook points: {', '.join(map(str, pack.directions))}",
        )
    return point


# --------------------------------------------------------------------------------------- packs


def save_vector_pack(pack: VectorPack, folder: Path | str) -> VectorPack:
    """Write vectors, then a manifest that pins their sha256; returns the pack as it would load."""
    folder = Path(folder)
    tensors = {str(p): v.detach().float().cpu().contiguous() for p, v in pack.directions.items()}
    _check_tensors(folder / VECTORS, tensors, pack.manifest.d_model)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / VECTORS)
    entries = [h.model_copy(update={"norm": float(tensors[h.hook_point].norm())}) for h in pack.manifest.hook_points]
    manifest = pack.manifest.model_copy(
        update={"hook_points": entries, "vectors_sha256": _sha256((folder / VECTORS).read_bytes())}
    )
    (folder / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    return replace(pack, manifest=manifest, source=folder)


def load_vector_pack(path: Path | str, expect: ModelFingerprint | None = None) -> VectorPack:
    """Load and verify a pack folder; `expect` is the fingerprint of the model it will steer."""
    folder = Path(path)
    if folder.suffix == ".gguf" and folder.is_file():
        raise VectorPackError(
            folder,
            "is a GGUF control vector, not a pack folder",
            "convert it with `latentwatch steer import FILE.gguf --out DIR`",
        )
    if not folder.is_dir():
        raise VectorPackError(
            folder,
            "is a file, not a pack folder" if folder.exists() else "no such folder",
            f"a steering vector pack is a folder with {MANIFEST} and {VECTORS}; check the path",
        )
    vectors_path = folder / VECTORS
    if not vectors_path.is_file():
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise VectorPackError(
                vectors_path,
                f"missing, but the folder holds {', '.join(pickled)}",
                "latentwatch never unpickles user files; re-export the vectors as safetensors",
            )
    manifest = _read_manifest(folder / MANIFEST)
    tensors = _read_vectors(vectors_path, manifest)
    _check_tensors(vectors_path, tensors, manifest.d_model)
    listed = [h.hook_point for h in manifest.hook_points]
    unknown = sorted(set(tensors) - set(listed))
    missing = [n for n in listed if n not in tensors]
    if unknown or missing:
        what = "; ".join(
            s
            for s in (
                unknown and f"tensors for hook points the manifest does not list: {unknown}",
                missing and f"no tensor for {missing}",
            )
            if s
        )
        raise VectorPackError(vectors_path, what, f"re-export the pack so {MANIFEST} and {VECTORS} agree")
    directions = {HookPoint.parse(n): tensors[n] for n in listed}
    if expect is not None:
        _check_model(folder / MANIFEST, manifest, list(directions), expect)
    return VectorPack(manifest, directions, folder)


def shipped_vectors_dir() -> Path:
    """The packs installed with latentwatch (`probes/vectors/<id>/`), found without importing `probes`."""
    spec = importlib.util.find_spec("probes")
    return Path(spec.origin).parent / "vectors"


def shipped_vectors() -> list[str]:
    root = shipped_vectors_dir()
    return sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file()) if root.is_dir() else []


def resolve_vector(ref: str | Path, base: Path | None = None) -> Path:
    """The folder `ref` names: a path (relative to `base`, e.g. a policy file's folder, then the working
    directory), else the id of a shipped pack."""
    path = Path(ref)
    candidates = (
        [path] if path.is_absolute() else [*([base / path] if base else []), path, shipped_vectors_dir() / path]
    )
    for c in candidates:
        if c.exists():
            return c.absolute()
    where = f" (nor under {base})" if base and not path.is_absolute() else ""
    shipped = (
        ""
        if path.is_absolute()
        else f", and no shipped vector has that id (shipped: {', '.join(shipped_vectors()) or 'none'})"
    )
    raise VectorPackError(ref, f"no such file or folder{where}{shipped}", "give a pack folder or a shipped vector id")


def open_vector_pack(ref: str | Path, base: Path | None = None, expect: ModelFingerprint | None = None) -> VectorPack:
    """`resolve_vector` then `load_vector_pack`: how commands and policies name a vector."""
    return load_vector_pack(resolve_vector(ref, base), expect)


def _read_manifest(path: Path) -> VectorManifest:
    if not path.is_file():
        raise VectorPackError(
            path,
            "missing",
            f"a steering vector pack is a folder with {MANIFEST} and {VECTORS}; copy the whole pack folder",
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VectorPackError(path, f"not valid JSON ({e})", "fix it or re-export the pack") from None
    try:
        return VectorManifest.model_validate(raw)
    except ValidationError as e:
        raise VectorPackError(
            path,
            f"does not match the manifest schema: {_summarise(e)}",
            "fix those fields or re-export the pack with this latentwatch version",
        ) from None


def _read_vectors(path: Path, manifest: VectorManifest) -> dict[str, torch.Tensor]:
    """Hash and parse the same bytes, so what is verified is what is loaded."""
    if not path.is_file():
        raise VectorPackError(path, "missing", "copy the whole pack folder")
    data = path.read_bytes()
    if _looks_pickled(data):
        raise VectorPackError(
            path,
            "is a pickle or torch.save file, not safetensors",
            "latentwatch never unpickles user files; re-export the vectors as safetensors",
        )
    if not manifest.vectors_sha256:
        raise VectorPackError(path.parent / MANIFEST, "has no vectors_sha256", "write packs with save_vector_pack")
    sha = _sha256(data)
    if sha != manifest.vectors_sha256:
        raise VectorPackError(
            path,
            f"truncated or modified (sha256 {sha[:12]}..., the manifest says {manifest.vectors_sha256[:12]}...)",
            "copy the pack again or re-export it",
        )
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError) as e:
        raise VectorPackError(
            path, f"does not parse as safetensors ({e})", "copy the pack again or re-export it"
        ) from None


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], d_model: int) -> None:
    for name, t in tensors.items():
        try:
            HookPoint.parse(name)
        except HookPointError as e:
            raise VectorPackError(path, str(e), "name each vector by the hook point it steers") from None
        if t.dtype != torch.float32 or t.shape != (d_model,):
            raise VectorPackError(
                path,
                f"vector {name} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, not "
                f"float32 [{d_model}] (the pack's d_model)",
                "build the vector on the model the pack is for, or fix d_model in the manifest",
            )
        if not torch.isfinite(t).all():
            raise VectorPackError(
                path,
                f"vector {name} has non-finite values (NaN or inf)",
                "rebuild it: the activations it came from were not finite",
            )


def _check_model(manifest_path: Path, m: VectorManifest, points: list[HookPoint], expect: ModelFingerprint) -> None:
    fix = "load the model this vector was made for, or rebuild it on this one"
    if m.model is not None:
        if why := m.model.mismatch(expect):
            raise VectorPackError(manifest_path, f"made for a different model: {why.replace('pack', 'vector', 1)}", fix)
    else:
        if m.d_model != expect.d_model:
            raise VectorPackError(
                manifest_path, f"vectors have d_model {m.d_model}, this model's is {expect.d_model}", fix
            )
        if m.model_hint and m.model_hint != expect.model_type:
            raise VectorPackError(
                manifest_path, f"made for model type {m.model_hint!r}, this model is {expect.model_type!r}", fix
            )
    past = [str(p) for p in points if p.layer >= expect.num_layers]
    if past:
        raise VectorPackError(
            manifest_path,
            f"unknown hook point {', '.join(past)}: this model has blocks 0..{expect.num_layers - 1}",
            fix,
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -------------------------------------------------------------------------------------- repeng


def import_repeng_gguf(
    path: Path | str, *, pack_id: str | None = None, model: ModelFingerprint | None = None, description: str = ""
) -> VectorPack:
    """A repeng (or llama.cpp cvector-generator) control vector as a pack, directions unchanged and in
    the file's order; `model`, when given, is checked and recorded as the pack's fingerprint."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise VectorPackError(path, "no such file", "give the .gguf file repeng's export_gguf wrote")
    try:
        reader = gguf.GGUFReader(path)
        arch, hint = _gguf_string(reader, "general.architecture"), _gguf_string(reader, f"{GGUF_ARCH}.model_hint")
        tensors = [(t.name, t.tensor_type, np.array(t.data), [int(n) for n in t.shape]) for t in reader.tensors]
    except Exception as e:  # the gguf reader raises whatever numpy and struct do on a bad file
        raise VectorPackError(
            path,
            f"does not parse as GGUF ({type(e).__name__}: {e})",
            "give a GGUF file written by repeng's ControlVector.export_gguf",
        ) from None
    fix = "give a control vector written by repeng's ControlVector.export_gguf"
    if arch != GGUF_ARCH:
        raise VectorPackError(
            path, f"is a GGUF file of architecture {arch!r}, not a control vector ({GGUF_ARCH!r})", fix
        )
    if not hint:
        raise VectorPackError(path, f"has no {GGUF_ARCH}.model_hint", fix)
    if not tensors:
        raise VectorPackError(path, "holds no direction tensors", fix)
    directions: dict[HookPoint, torch.Tensor] = {}
    floats = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F64)
    for name, ttype, data, shape in tensors:
        m = _DIRECTION.match(name)
        if m is None:
            raise VectorPackError(path, f"unknown tensor {name!r}: a control vector holds only direction.<layer>", fix)
        if ttype not in floats or len(shape) != 1:
            raise VectorPackError(
                path, f"tensor {name} is {ttype.name} {shape}; a direction is a 1-D float vector", fix
            )
        point = HookPoint.parse(f"blocks.{int(m.group(1))}.resid_post")
        if point in directions:
            raise VectorPackError(path, f"holds two tensors for layer {point.layer}", fix)
        directions[point] = torch.from_numpy(data.astype(np.float32).reshape(-1))
    widths = {v.numel() for v in directions.values()}
    if len(widths) > 1:
        raise VectorPackError(path, f"directions of different lengths {sorted(widths)}", fix)
    width = widths.pop()
    if model is not None:
        if width != model.d_model or hint != model.model_type:
            raise VectorPackError(
                path,
                f"made for a {hint} model with d_model {width}, this model is a "
                f"{model.model_type} with d_model {model.d_model}",
                "import it for the model it was trained on",
            )
        past = [str(p) for p in directions if p.layer >= model.num_layers]
        if past:
            raise VectorPackError(
                path,
                f"unknown hook point {', '.join(past)}: the model has blocks 0..{model.num_layers - 1}",
                "import it for the model it was trained on",
            )
    _check_tensors(path, {str(p): v for p, v in directions.items()}, width)
    origin = DataFile(role="source", path=path.name, sha256=_sha256(path.read_bytes()))
    pack_id = pack_id or re.sub(r"[^a-z0-9_\-]+", "-", path.stem.lower()).strip("-") or "repeng"
    return VectorPack.create(
        pack_id,
        directions,
        method="repeng",
        model=model,
        model_hint=hint,
        description=description or f"imported from repeng control vector {path.name}",
        provenance=Provenance(data=[origin], params={"format": "repeng gguf"}),
        source=path,
    )


def export_repeng_gguf(pack: VectorPack, path: Path | str) -> Path:
    """Write `pack` as repeng's `export_gguf` does (same calls, same order: a pack imported from repeng
    comes out byte for byte as repeng wrote it, with the same gguf version)."""
    import gguf

    path = Path(path)
    off = [str(p) for p in pack.directions if p.site != "resid_post"]
    if off:
        raise VectorPackError(
            pack.source or pack.id,
            f"steers {', '.join(off)}; a repeng layer is a block's output, blocks.<i>.resid_post",
            "build the vector at resid_post hook points to export it",
        )
    hint = pack.manifest.model_hint or (pack.manifest.model.model_type if pack.manifest.model else "")
    if not hint:
        raise VectorPackError(
            pack.source or pack.id,
            "records no model type for controlvector.model_hint",
            "set model_hint in its manifest",
        )
    writer = gguf.GGUFWriter(path, GGUF_ARCH)
    writer.add_string(f"{GGUF_ARCH}.model_hint", hint)
    writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(pack.directions))
    for point, v in pack.directions.items():
        writer.add_tensor(f"direction.{point.layer}", v.detach().float().cpu().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gguf_string(reader, key: str) -> str:
    field = reader.get_field(key)
    if field is None or not len(field.parts):
        return ""
    return str(bytes(field.parts[-1]), encoding="utf-8", errors="replace")


__all__ = [
    "METHODS",
    "DataFile",
    "HookVector",
    "Provenance",
    "VectorManifest",
    "VectorPack",
    "VectorPackError",
    "export_repeng_gguf",
    "import_repeng_gguf",
    "load_vector_pack",
    "open_vector_pack",
    "resolve_vector",
    "save_vector_pack",
    "shipped_vectors",
    "shipped_vectors_dir",
]

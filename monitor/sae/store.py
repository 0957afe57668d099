"""How serving names and finds SAEs: a reference resolved to a folder, verified, loaded once.

Feature-detector packs and the server's `saes` setting name an SAE the same way: a folder (relative
to the pack that names it, or absolute) or the id of an SAE shipped in `probes/saes/`. The SAE's
id is its pack id for latentwatch SAE packs, else its folder's name; requests (latent clamping)
and stored records use that id. An SAE loaded once is shared by every pack that names it while
any of them holds it, so the scorer runs its encoder once however many detectors read it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import weakref
from pathlib import Path

from monitor.sae.base import SAE, SAEError
from monitor.sae.loaders import detect_format, latentwatch_fingerprint, latentwatch_manifest, load_sae

_LOADED: weakref.WeakValueDictionary[tuple[str, str], SAE] = weakref.WeakValueDictionary()


def shipped_saes_dir() -> Path:
    """The SAEs installed with latentwatch (`probes/saes/<id>/`), found without importing `probes`."""
    spec = importlib.util.find_spec("probes")
    return Path(spec.origin).parent / "saes"


def resolve(ref: str | Path, base: Path | None = None) -> Path:
    """The folder (or file) `ref` names: a path (relative to `base`, the pack naming it), else a shipped SAE id."""
    path = Path(ref)
    candidates = [path] if path.is_absolute() else [*([base / path] if base else []), path,
                                                     shipped_saes_dir() / path]
    for c in candidates:
        if c.exists():
            return c.absolute()
    if path.is_absolute():
        raise SAEError(f"{ref}: no such file or folder")
    root = shipped_saes_dir()
    shipped = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    raise SAEError(f"{ref}: no such file or folder{f' (nor under {base})' if base else ''}, and no shipped SAE "
                   f"has that id (shipped: {', '.join(shipped) or 'none'})")


def files_sha256(folder: Path) -> str:
    """sha256 over the files that make up the SAE in `folder` (its format's files, in order)."""
    h = hashlib.sha256()
    for f in detect_format(folder).files:
        h.update(f.encode() + b"\0" + (folder / f).read_bytes())
    return h.hexdigest()


def sae_id(folder: Path) -> str:
    try:
        return latentwatch_manifest(folder)["id"]
    except SAEError:
        return folder.name


def open_sae(ref: str | Path, base: Path | None = None, *, sha256: str | None = None, expect=None,
             d_model: int | None = None) -> SAE:
    """The SAE `ref` names, with its `id` set; `sha256` (of `files_sha256`) pins the exact files,
    `expect` (a model fingerprint) is checked against a latentwatch SAE pack's, `d_model` against d_in."""
    folder = resolve(ref, base)
    folder = folder.parent if folder.is_file() else folder
    digest = files_sha256(folder)
    if sha256 is not None and digest != sha256:
        raise SAEError(f"{folder}: these SAE files (sha256 {digest[:12]}...) are not the ones the pack was made "
                       f"with ({sha256[:12]}...); use that SAE or retrain the detector on this one")
    if expect is not None and (folder / "manifest.json").is_file():
        if why := latentwatch_fingerprint(folder).mismatch(expect):
            raise SAEError(f"{folder}: trained on a different model: {why}")
    sae = _LOADED.get((str(folder), digest))
    if sae is None:
        sae = load_sae(folder, d_model=d_model)
        sae.id = sae_id(folder)
        _LOADED[(str(folder), digest)] = sae
    elif d_model is not None and sae.d_in != d_model:
        raise SAEError(f"{sae.source}: the SAE reads d_in={sae.d_in} activations, but the model's d_model is {d_model}")
    return sae

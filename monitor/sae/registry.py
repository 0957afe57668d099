"""Registries of SAE architectures and of the on-disk formats they come in.

A format's loader reads its files into one of the architectures; `load_sae` recognises a format
by the files it needs. Registrations live in `monitor/sae/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from monitor.sae.base import SAE, SAEError

SAE_KINDS: dict[str, type[SAE]] = {}
FORMATS: dict[str, SAEFormat] = {}


@dataclass(frozen=True)
class SAEFormat:
    name: str
    files: tuple[str, ...]  # what a folder in this format holds; also how `load_sae` recognises it
    load: Callable[..., SAE]  # (each of `files` in the folder, in that order, hook_point=given or None)


def register(cls: type[SAE]) -> type[SAE]:
    """An architecture name may be claimed once."""
    if SAE_KINDS.get(cls.kind, cls) is not cls:
        raise ValueError(f"SAE kind {cls.kind!r} is already registered by {SAE_KINDS[cls.kind]}")
    SAE_KINDS[cls.kind] = cls
    return cls


def register_format(fmt: SAEFormat) -> SAEFormat:
    if FORMATS.get(fmt.name, fmt) is not fmt:
        raise ValueError(f"SAE format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def sae_kind(name: str, source: str) -> type[SAE]:
    try:
        return SAE_KINDS[name]
    except KeyError:
        raise SAEError(f"{source}: unknown SAE architecture {name!r}; latentwatch runs "
                       f"{', '.join(sorted(SAE_KINDS))}") from None


def sae_format(name: str) -> SAEFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise SAEError(f"unknown SAE format {name!r}; known: {', '.join(sorted(FORMATS))}") from None

"""Registry of probe kinds: packs name their kind as a string, and this maps it to a class."""

from __future__ import annotations

from probes.kinds.base import Probe

PROBE_KINDS: dict[str, type[Probe]] = {}


def register(cls: type[Probe]) -> type[Probe]:
    """A kind name is part of the pack format, so it may be claimed only once."""
    if PROBE_KINDS.get(cls.kind, cls) is not cls:
        raise ValueError(
            f"probe kind '{cls.kind}' is already registered by {PROBE_KINDS[cls.kind]}"
        )
    PROBE_KINDS[cls.kind] = cls
    return cls


def probe_kind(name: str) -> type[Probe]:
    try:
        return PROBE_KINDS[name]
    except KeyError:
        raise ValueError(
            f"unknown probe kind '{name}'; known kinds: {', '.join(sorted(PROBE_KINDS))}"
        ) from None

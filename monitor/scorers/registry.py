"""Registry of scorer kinds: how the heads of one kind at one hook point fuse on the device.

A head (what a pack hands the bank) names its scorer kind; the bank groups the heads of each
hook point by kind and builds one scorer per group, so N probes of one kind cost what that kind
says (affine: one matmul for all of them). Registrations live in `monitor/scorers/__init__.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

SCORERS: dict[str, type[Scorer]] = {}


class Scorer(ABC):
    """The fused scoring weights of every head of one kind at one hook point."""

    kind: ClassVar[str]

    @abstractmethod
    def __init__(self, heads: list[Any], device, dtype): ...

    @abstractmethod
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[tokens, d_model] -> [tokens, heads] in fp32."""

    @staticmethod
    @abstractmethod
    def directions(head: Any) -> torch.Tensor:
        """[d_model, k] directions the head reads in activation space (to spot blinding steering)."""


def register(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator; a kind name may be claimed once."""
    if SCORERS.get(cls.kind, cls) is not cls:
        raise ValueError(f"scorer kind {cls.kind!r} is already registered by {SCORERS[cls.kind]}")
    SCORERS[cls.kind] = cls
    return cls


def scorer_for(head: Any) -> type[Scorer]:
    try:
        return SCORERS[head.scorer_kind]
    except (AttributeError, KeyError):
        kind = getattr(head, "scorer_kind", None)
        raise ValueError(f"no scorer for head kind {kind!r}; known: {', '.join(sorted(SCORERS))}") from None

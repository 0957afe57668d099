"""Steering primitives applied inside the same forward hooks that score detectors.

Two kinds, per batch row and per position class:

* ``add``    - h += coefficient * v / |v|    (a zero vector is a no-op, bit for bit)
* ``ablate`` - h -= coefficient * (h . u) u  with u = v / |v|   (1 removes the component along v)

A `SteeringPlan` holds what each row asked for. Between generation steps rows can switch
steering on or off; the fused per-hook tensors are rebuilt only when the plan changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from monitor.domain import HookPoint

Positions = Literal["prompt", "generated", "all"]
Phase = Literal["prompt", "generated"]


@dataclass(frozen=True)
class Steering:
    hook_point: HookPoint
    kind: Literal["add", "ablate"]
    vector: torch.Tensor  # [d_model]
    coefficient: float = 1.0
    positions: Positions = "all"
    id: str = ""

    def __post_init__(self):
        if self.kind not in ("add", "ablate"):
            raise ValueError(f"steering kind must be 'add' or 'ablate', got {self.kind!r}")
        if self.positions not in ("prompt", "generated", "all"):
            raise ValueError(f"steering positions must be prompt, generated or all, got {self.positions!r}")
        if not math.isfinite(self.coefficient):
            raise ValueError(f"steering coefficient must be finite, got {self.coefficient!r}")
        if self.kind == "ablate" and not 0 <= self.coefficient <= 1:
            raise ValueError(f"ablation coefficient must be in [0, 1] (the share of the projection removed),"
                             f" got {self.coefficient!r}")
        v = self.vector
        if v.ndim != 1 or not torch.isfinite(v).all():
            raise ValueError(f"steering vector {self.id!r} must be a finite 1-D tensor")
        if self.kind == "ablate" and not v.abs().sum() > 0:
            raise ValueError(f"ablation direction {self.id!r} is the zero vector")

    @property
    def unit(self) -> torch.Tensor:
        v = self.vector.float()
        norm = v.norm()
        return v / norm if norm > 0 else v

    def applies(self, phase: Phase) -> bool:
        return self.positions in ("all", phase)


class SteeringPlan:
    """Which steering each row of a batch has switched on."""

    def __init__(self, rows: int, device, dtype):
        self.rows: list[list[Steering]] = [[] for _ in range(rows)]
        self.device, self.dtype = device, dtype
        self._fused: dict[tuple[HookPoint, Phase], tuple] = {}

    def add(self, row: int, steering: Steering) -> None:
        self.rows[row].append(steering)
        self._fused.clear()

    def clear(self, row: int) -> None:
        self.rows[row] = []
        self._fused.clear()

    def select(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        self._fused.clear()

    def extend(self, other: SteeringPlan) -> None:
        self.rows += other.rows
        self._fused.clear()

    @property
    def hook_points(self) -> set[HookPoint]:
        return {s.hook_point for row in self.rows for s in row}

    def _fuse(self, point: HookPoint, phase: Phase):
        """Stack this hook point's vectors: h += C @ V_add;  h -= ((h @ U^T) * A) @ U."""
        key = (point, phase)
        if key not in self._fused:
            add, ablate = [], []
            for r, row in enumerate(self.rows):
                for s in row:
                    if s.hook_point == point and s.applies(phase):
                        (add if s.kind == "add" else ablate).append((r, s))
            fused = []
            for items in (add, ablate):
                if not items:
                    fused.append(None)
                    continue
                vectors = torch.stack([s.unit for _, s in items])  # [k, d]
                coeff = torch.zeros(len(self.rows), len(items))
                for j, (r, s) in enumerate(items):
                    coeff[r, j] = s.coefficient
                fused.append((coeff.to(self.device, self.dtype), vectors.to(self.device, self.dtype)))
            self._fused[key] = tuple(fused)
        return self._fused[key]

    def apply(self, point: HookPoint, h: torch.Tensor, phase: Phase) -> torch.Tensor | None:
        """Steer h [rows, seq, d] in place of the hook's output; None when nothing applies."""
        add, ablate = self._fuse(point, phase)
        if add is None and ablate is None:
            return None
        if ablate is not None:
            coeff, u = ablate
            proj = (h @ u.T) * coeff[:, None, :]  # [rows, seq, k]
            h = h - proj @ u
        if add is not None:
            coeff, v = add
            h = h + (coeff @ v)[:, None, :]
        return h

"""Steering primitives applied inside the same forward hooks that score detectors.

Three kinds, per batch row and per position class:

* ``add``    - h += coefficient * v / |v|    (a zero vector is a no-op, bit for bit)
* ``ablate`` - h -= coefficient * (h . u) u  with u = v / |v|   (1 removes the component along v)
* ``clamp``  - h += (coefficient - a) * W_dec[latent]  with a = sae.encode(h)[latent]: sets one SAE
  latent to `coefficient` (scaled back through the SAE's run-time input normalisation, if any)

At one hook point ablations apply first, then additions, then clamps, so a clamped latent reads
its value whatever else steers there.

A `SteeringPlan` holds what each row asked for. Between generation steps rows can switch
steering on or off; the fused per-hook tensors are rebuilt only when the plan changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from monitor.domain import STEERING_KINDS, HookPoint, SteeringKind
from monitor.sae import SAE

Positions = Literal["prompt", "generated", "all"]
Phase = Literal["prompt", "generated"]


@dataclass(frozen=True)
class Steering:
    hook_point: HookPoint
    kind: SteeringKind
    vector: torch.Tensor  # [d_model]; for clamp the latent's decoder row, the direction it writes along
    coefficient: float = 1.0  # for clamp: the value the latent is set to
    positions: Positions = "all"
    id: str = ""
    sae: SAE | None = None  # clamp only (build clamps with `Steering.clamp`)
    latent: int | None = None

    @classmethod
    def clamp(cls, sae: SAE, latent: int, value: float, positions: Positions = "all") -> Steering:
        """Set `sae`'s latent `latent` to `value`; records name it ``<sae id>:<latent>``."""
        if not 0 <= latent < sae.d_sae:
            raise ValueError(f"latent {latent} is out of range: SAE {sae.id!r} has latents 0..{sae.d_sae - 1}")
        return cls(sae.hook_point, "clamp", sae.W_dec[latent], value, positions, id=f"{sae.id}:{latent}", sae=sae,
                   latent=latent)

    def __post_init__(self):
        if self.kind not in STEERING_KINDS:
            raise ValueError(f"steering kind must be one of {', '.join(STEERING_KINDS)}, got {self.kind!r}")
        if (self.kind == "clamp") != (self.sae is not None and self.latent is not None):
            raise ValueError("a clamp takes an SAE and a latent (Steering.clamp); add and ablate take neither")
        if self.kind == "clamp" and self.hook_point != self.sae.hook_point:
            raise ValueError(f"SAE {self.sae.id!r} reads {self.sae.hook_point}, not {self.hook_point}")
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
        """This hook point's steering stacked across rows: h -= ((h @ U^T) * A) @ U;  h += C @ V;
        then one `_Clamps` per SAE."""
        key = (point, phase)
        if key not in self._fused:
            items: dict[str, list[tuple[int, Steering]]] = {kind: [] for kind in STEERING_KINDS}
            for r, row in enumerate(self.rows):
                for s in row:
                    if s.hook_point == point and s.applies(phase):
                        items[s.kind].append((r, s))
            by_sae: dict[tuple, list[tuple[int, Steering]]] = {}
            for r, s in items["clamp"]:
                by_sae.setdefault(s.sae.key(), []).append((r, s))
            self._fused[key] = (self._stack(items["add"]), self._stack(items["ablate"]),
                                [_Clamps(group, len(self.rows)) for group in by_sae.values()])
        return self._fused[key]

    def _stack(self, items: list[tuple[int, Steering]]):
        """(coefficients [rows, k], unit vectors [k, d]) on the device, or None without any."""
        if not items:
            return None
        vectors = torch.stack([s.unit for _, s in items])  # [k, d]
        coeff = torch.zeros(len(self.rows), len(items))
        for j, (r, s) in enumerate(items):
            coeff[r, j] = s.coefficient
        return coeff.to(self.device, self.dtype), vectors.to(self.device, self.dtype)

    def apply(self, point: HookPoint, h: torch.Tensor, phase: Phase) -> torch.Tensor | None:
        """Steer h [rows, seq, d] in place of the hook's output; None when nothing applies."""
        add, ablate, clamps = self._fuse(point, phase)
        if add is None and ablate is None and not clamps:
            return None
        if ablate is not None:
            coeff, u = ablate
            proj = (h @ u.T) * coeff[:, None, :]  # [rows, seq, k]
            h = h - proj @ u
        if add is not None:
            coeff, v = add
            h = h + (coeff @ v)[:, None, :]
        for c in clamps:
            h = c.apply(h)
        return h


class _Clamps:
    """One SAE's clamps at one hook point, fused across rows: one encoder pass over the clamped
    latents (only their columns where latents are independent; TopK needs every pre-activation),
    then one matmul writes every row's deltas. Rows that clamp nothing get exact zeros."""

    def __init__(self, items: list[tuple[int, Steering]], rows: int):
        sae = self.sae = items[0][1].sae
        latents = sorted({s.latent for _, s in items})
        column = {latent: j for j, latent in enumerate(latents)}
        values, mask = torch.zeros(rows, len(latents)), torch.zeros(rows, len(latents))
        for r, s in items:  # a later clamp of the same latent in a row replaces the earlier one
            values[r, column[s.latent]] = s.coefficient
            mask[r, column[s.latent]] = 1.0
        device, dtype = sae.W_dec.device, sae.W_dec.dtype
        self.idx = torch.tensor(latents, device=device)
        self.encoder = sae.restrict(self.idx) if sae.per_latent else None
        self.values, self.mask = values.to(device, dtype), mask.to(device, dtype)
        self.decoder = sae.W_dec[self.idx]  # [m, d_in]

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        a = self.encoder.encode(h) if self.encoder is not None else self.sae.encode_latents(h, self.idx)
        delta = ((self.values[:, None, :] - a) * self.mask[:, None, :]) @ self.decoder  # [rows, seq, d]
        scale = self.sae.input_scale(h)
        return h + (delta if scale is None else delta * scale).to(h.dtype)

"""A detector that reads SAE latents: logit = sum_j w_j * act(latent_j) + b."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from monitor.sae.base import SAE


@dataclass(eq=False)
class LatentHead:
    """Some latents of one SAE, weighted: the `sae` scorer kind (monitor/scorers/sae.py) fuses them.

    One form covers a single-latent detector (one latent, w = scale, b = -scale * threshold) and an
    SAE probe (sparse logistic regression over a few latents).
    """

    sae: SAE
    latents: torch.Tensor  # [k] indices into the SAE's latents
    weights: torch.Tensor  # [k]
    bias: float = 0.0
    scorer_kind: ClassVar[str] = "sae"

    def __post_init__(self):
        self.latents = torch.as_tensor(self.latents, dtype=torch.long)
        self.weights = torch.as_tensor(self.weights, dtype=torch.float32)
        self.bias = float(self.bias)
        k = len(self.latents) if self.latents.ndim == 1 else 0
        if k == 0 or self.weights.shape != (k,):
            raise ValueError(f"latent head on {self.sae.source}: needs 1-D latents and weights of one length, got "
                             f"{list(self.latents.shape)} and {list(self.weights.shape)}")
        if self.latents.min() < 0 or self.latents.max() >= self.sae.d_sae:
            raise ValueError(f"latent head on {self.sae.source}: latents must lie in [0, {self.sae.d_sae})")
        if not (torch.isfinite(self.weights).all() and torch.isfinite(torch.tensor(self.bias))):
            raise ValueError(f"latent head on {self.sae.source}: weights and bias must be finite")

    @classmethod
    def single(cls, sae: SAE, latent: int, *, scale: float = 1.0, threshold: float = 0.0) -> LatentHead:
        """Fires (logit > 0) where the latent's activation exceeds `threshold`; `scale` sets how sharply."""
        return cls(sae, [latent], [scale], -scale * threshold)

    @property
    def d_in(self) -> int:
        return self.sae.d_in

    def firing_inputs(self, norm: float) -> torch.Tensor:
        """[k, d_in] activations that make each watched latent fire: b_dec plus its decoder row scaled to
        `norm`, for the load-time check that the head is not blind (random inputs rarely reach a latent)."""
        rows = self.sae.W_dec[self.latents].float()
        return self.sae.b_dec.float() + norm * rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Reference scoring, for tests and offline use; the scorer fuses many heads instead."""
        return self.sae.encode_latents(x, self.latents) @ self.weights.to(self.sae.W_enc.dtype) + self.bias

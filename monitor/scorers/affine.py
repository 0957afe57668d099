"""Affine heads (logit = x @ w + b): every one at a hook point in one matmul."""

from __future__ import annotations

import torch

from monitor.scorers.registry import Scorer


class AffineScorer(Scorer):
    kind = "affine"

    def __init__(self, heads, device, dtype):
        self.w = torch.cat([h.w1 for h in heads], dim=1).to(device=device, dtype=dtype)
        self.b = torch.cat([h.b1 for h in heads]).to(device=device, dtype=dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b, h.to(self.w.dtype), self.w).float()

    @staticmethod
    def directions(head) -> torch.Tensor:
        return head.w1.float()

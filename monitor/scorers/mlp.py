"""Small MLP heads (logit = relu(x @ w1 + b1) @ w2 + b2): hidden layers side by side, then a
block-diagonal output matmul, so any number of them costs two matmuls."""

from __future__ import annotations

import torch

from monitor.scorers.registry import Scorer


class MLPScorer(Scorer):
    kind = "mlp"

    def __init__(self, heads, device, dtype):
        self.w1 = torch.cat([h.w1 for h in heads], dim=1).to(device=device, dtype=dtype)
        self.b1 = torch.cat([h.b1 for h in heads]).to(device=device, dtype=dtype)
        w2 = torch.zeros(self.w1.shape[1], len(heads))
        col = 0
        for j, h in enumerate(heads):
            w2[col : col + h.width, j] = h.w2
            col += h.width
        self.w2 = w2.to(device=device, dtype=dtype)
        self.b2 = torch.tensor([float(h.b2) for h in heads]).to(device=device, dtype=dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        hidden = torch.addmm(self.b1, h.to(self.w1.dtype), self.w1).relu()
        return torch.addmm(self.b2, hidden, self.w2).float()

    @staticmethod
    def directions(head) -> torch.Tensor:
        return head.w1.float()

"""SAE latent heads (monitor.sae.LatentHead): one encoder pass per SAE at a hook point, shared by its heads.

Heads are grouped by SAE (the same weights). ReLU and JumpReLU latents are independent of each
other, so only the union of the watched latents' encoder columns is computed; TopK ranks every
latent, so its full encoder runs once. One matmul then maps every watched latent of every SAE to
the heads' logits. All of it stays on the device: no host sync, no loop over tokens.
"""

from __future__ import annotations

import torch

from monitor.scorers.registry import Scorer


class SAEScorer(Scorer):
    kind = "sae"

    def __init__(self, heads, device, dtype):
        points = sorted({h.sae.hook_point for h in heads})
        if len(points) > 1:
            raise ValueError(f"SAE heads scored at one hook point read SAEs trained at {', '.join(map(str, points))}")
        by_sae: dict[tuple, list[int]] = {}
        for i, head in enumerate(heads):
            by_sae.setdefault(head.sae.key(), []).append(i)
        self.encoders = []  # (SAE on the device, latent columns to pick, or None when already cut down)
        blocks = []
        for idx in by_sae.values():
            union, where = torch.unique(torch.cat([heads[i].latents for i in idx]), return_inverse=True)
            block = torch.zeros(len(union), len(heads))
            start = 0
            for i in idx:
                n = len(heads[i].latents)
                block[:, i].index_add_(0, where[start : start + n], heads[i].weights.float())
                start += n
            blocks.append(block)
            sae = heads[idx[0]].sae
            if sae.per_latent:
                self.encoders.append((sae.restrict(union).to(device, dtype), None))
            else:
                self.encoders.append((sae.to(device, dtype), union.to(device)))
        self.w = torch.cat(blocks).to(device=device, dtype=dtype)
        self.b = torch.tensor([h.bias for h in heads]).to(device=device, dtype=dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        acts = [sae.encode(h) if cols is None else sae.encode_latents(h, cols) for sae, cols in self.encoders]
        return torch.addmm(self.b, acts[0] if len(acts) == 1 else torch.cat(acts, dim=1), self.w).float()

    @staticmethod
    def directions(head) -> torch.Tensor:
        """The encoder columns the head's latents read and the decoder rows they write: steering along
        either moves the score, so both count for the blinding check."""
        sae = head.sae
        return torch.cat([sae.W_enc[:, head.latents], sae.W_dec[head.latents].T], dim=1).float()

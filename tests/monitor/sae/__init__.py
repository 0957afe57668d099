"""SAE tests; `random_sae` builds a small SAE of any kind with latents that do fire."""

from __future__ import annotations

import torch

from monitor.domain import HookPoint
from monitor.sae import SAE, SAE_KINDS


def random_sae(kind: str, *, d_in: int = 16, d_sae: int = 48, seed: int = 0, point: str = "blocks.1.resid_post",
               **config) -> SAE:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        "b_enc": torch.randn(d_sae, generator=g) * 0.2,
        "W_dec": torch.randn(d_sae, d_in, generator=g) / d_sae**0.5,
        "b_dec": torch.randn(d_in, generator=g) * 0.2,
        "threshold": torch.rand(d_sae, generator=g) * 0.4,
    }
    cls = SAE_KINDS[kind]
    tensors = {k: v for k, v in tensors.items() if k in cls.shapes()}
    return cls(cls.config_cls(d_in=d_in, d_sae=d_sae, hook_point=HookPoint.parse(point), **config), tensors)

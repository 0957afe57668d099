"""One-hidden-layer MLP on standardised activations, for concepts a hyperplane misses."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from probes.kinds.base import (
    ProbeConfig,
    ScoringHead,
    Shape,
    TensorProbe,
    check_xy,
    fold,
    standardisation,
)


class MlpConfig(ProbeConfig):
    hidden: int = 64
    epochs: int = 100
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 256


class MlpProbe(TensorProbe):
    kind = "mlp"
    config_cls = MlpConfig
    shapes: ClassVar[dict[str, Shape]] = {
        "mean": ("d_model",),
        "std": ("d_model",),
        "w1": ("d_model", "hidden"),
        "b1": ("hidden",),
        "w2": ("hidden",),
        "b2": (1,),
    }
    config: MlpConfig

    def axes(self) -> dict[str, int]:
        return {"hidden": self.config.hidden}

    def fit(self, x: np.ndarray, y: np.ndarray) -> None:
        """AdamW with BCE-with-logits; a private generator makes init and batch order seeded."""
        x, y = check_xy(x, y)
        mean, std = standardisation(x)
        xs = torch.from_numpy((x - mean) / std).float()
        yt = torch.from_numpy(y).float()
        cfg, d = self.config, x.shape[1]
        gen = torch.Generator().manual_seed(cfg.seed)
        layer1, layer2 = torch.nn.Linear(d, cfg.hidden), torch.nn.Linear(cfg.hidden, 1)
        for layer in (layer1, layer2):
            bound = layer.in_features**-0.5
            torch.nn.init.uniform_(layer.weight, -bound, bound, generator=gen)
            torch.nn.init.uniform_(layer.bias, -bound, bound, generator=gen)
        net = torch.nn.Sequential(layer1, torch.nn.ReLU(), layer2)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        for _ in range(cfg.epochs):
            for batch in torch.randperm(len(xs), generator=gen).split(cfg.batch_size):
                opt.zero_grad()
                loss_fn(net(xs[batch])[:, 0], yt[batch]).backward()
                opt.step()
        self._set(
            {
                "mean": mean,
                "std": std,
                "w1": layer1.weight.detach().T,
                "b1": layer1.bias.detach(),
                "w2": layer2.weight.detach()[0],
                "b2": layer2.bias.detach(),
            }
        )

    def head(self) -> ScoringHead:
        p = self.params64()
        w1, b1 = fold(p["w1"], p["b1"], p["mean"], p["std"])
        return ScoringHead(w1, b1, self.params["w2"].clone(), float(p["b2"][0]))

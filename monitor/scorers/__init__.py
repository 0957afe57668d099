"""Scorer kinds, every registration in one place."""

from monitor.scorers.affine import AffineScorer
from monitor.scorers.mlp import MLPScorer
from monitor.scorers.registry import SCORERS, Scorer, register, scorer_for
from monitor.scorers.sae import SAEScorer

for _kind in (AffineScorer, MLPScorer, SAEScorer):
    register(_kind)

__all__ = ["SCORERS", "AffineScorer", "MLPScorer", "Scorer", "register", "scorer_for"]

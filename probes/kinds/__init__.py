"""Probe kinds, every registration in one place."""

from probes.kinds.base import Probe, ProbeConfig, ScoringHead
from probes.kinds.diff_means import DiffMeansProbe
from probes.kinds.lat import LatProbe
from probes.kinds.logistic import LogisticProbe
from probes.kinds.mlp import MlpProbe
from probes.kinds.registry import PROBE_KINDS, probe_kind, register
from probes.kinds.sae_latent import SAELatentProbe
from probes.kinds.sae_probe import SAEProbe

for _kind in (DiffMeansProbe, LatProbe, LogisticProbe, MlpProbe, SAEProbe, SAELatentProbe):
    register(_kind)

__all__ = [
    "PROBE_KINDS",
    "DiffMeansProbe",
    "LatProbe",
    "LogisticProbe",
    "MlpProbe",
    "Probe",
    "ProbeConfig",
    "SAELatentProbe",
    "SAEProbe",
    "ScoringHead",
    "probe_kind",
    "register",
]

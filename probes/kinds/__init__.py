"""Probe kinds, every registration in one place."""

from probes.kinds.base import Probe, ProbeConfig, ScoringHead
from probes.kinds.diff_means import DiffMeansProbe
from probes.kinds.lat import LatProbe
from probes.kinds.logistic import LogisticProbe
from probes.kinds.mlp import MlpProbe
from probes.kinds.registry import PROBE_KINDS, probe_kind, register

for _kind in (DiffMeansProbe, LatProbe, LogisticProbe, MlpProbe):
    register(_kind)

__all__ = [
    "PROBE_KINDS",
    "DiffMeansProbe",
    "LatProbe",
    "LogisticProbe",
    "MlpProbe",
    "Probe",
    "ProbeConfig",
    "ScoringHead",
    "probe_kind",
    "register",
]

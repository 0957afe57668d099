"""Proto enum numbers for the domain's names, built from `monitor.domain` in one place.

Kept free of torch so that the Python client, which needs only these tables, stays light.
"""

from __future__ import annotations

from latentwatch.v1 import monitor_pb2 as pb
from monitor.domain import ACTIONS, INTERVENTION_KINDS, REQUEST_KINDS, STEERING_KINDS

ROLES = ("system", "user", "assistant")
ACTION = {name: pb.Action.Value(f"ACTION_{name.upper()}") for name in ACTIONS}
INTERVENTION = {name: pb.InterventionKind.Value(f"INTERVENTION_KIND_{name.upper()}") for name in INTERVENTION_KINDS}
REQUEST_KIND = {name: pb.RequestKind.Value(f"REQUEST_KIND_{name.upper()}") for name in REQUEST_KINDS}
STEERING_KIND = {name: pb.SteeringKind.Value(f"STEERING_KIND_{name.upper()}") for name in STEERING_KINDS}
POSITIONS = {pb.STEERING_POSITIONS_UNSPECIFIED: "generated", pb.STEERING_POSITIONS_PROMPT: "prompt",
             pb.STEERING_POSITIONS_GENERATED: "generated", pb.STEERING_POSITIONS_ALL: "all"}
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "blocked": pb.FINISH_REASON_BLOCKED}
DETECTOR_KIND = {"affine": pb.DETECTOR_KIND_LINEAR_PROBE, "mlp": pb.DETECTOR_KIND_MLP_PROBE,
                 "sae": pb.DETECTOR_KIND_SAE_FEATURE}  # by scorer kind (monitor.scorers)

__all__ = ["ACTION", "DETECTOR_KIND", "FINISH", "INTERVENTION", "POSITIONS", "REQUEST_KIND", "ROLES", "STEERING_KIND"]

import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    ACTION_ALERT: _ClassVar[Action]
    ACTION_BLOCK: _ClassVar[Action]
    ACTION_STEER: _ClassVar[Action]
    ACTION_LOG: _ClassVar[Action]
    ACTION_ESCALATE: _ClassVar[Action]
    ACTION_SHADOW: _ClassVar[Action]

class SteeringKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEERING_KIND_UNSPECIFIED: _ClassVar[SteeringKind]
    STEERING_KIND_ADD: _ClassVar[SteeringKind]
    STEERING_KIND_ABLATE: _ClassVar[SteeringKind]
    STEERING_KIND_CLAMP: _ClassVar[SteeringKind]

class SteeringPositions(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEERING_POSITIONS_UNSPECIFIED: _ClassVar[SteeringPositions]
    STEERING_POSITIONS_PROMPT: _ClassVar[SteeringPositions]
    STEERING_POSITIONS_GENERATED: _ClassVar[SteeringPositions]
    STEERING_POSITIONS_ALL: _ClassVar[SteeringPositions]

class RequestKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REQUEST_KIND_UNSPECIFIED: _ClassVar[RequestKind]
    REQUEST_KIND_GENERATE: _ClassVar[RequestKind]
    REQUEST_KIND_SCORE: _ClassVar[RequestKind]

class InterventionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INTERVENTION_KIND_UNSPECIFIED: _ClassVar[InterventionKind]
    INTERVENTION_KIND_BLOCK: _ClassVar[InterventionKind]
    INTERVENTION_KIND_STEER: _ClassVar[InterventionKind]
    INTERVENTION_KIND_OVERRIDE: _ClassVar[InterventionKind]
    INTERVENTION_KIND_LOG: _ClassVar[InterventionKind]
    INTERVENTION_KIND_ALERT: _ClassVar[InterventionKind]
    INTERVENTION_KIND_ESCALATE: _ClassVar[InterventionKind]
    INTERVENTION_KIND_SHADOW: _ClassVar[InterventionKind]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_BLOCKED: _ClassVar[FinishReason]

class DetectorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DETECTOR_KIND_UNSPECIFIED: _ClassVar[DetectorKind]
    DETECTOR_KIND_LINEAR_PROBE: _ClassVar[DetectorKind]
    DETECTOR_KIND_SAE_FEATURE: _ClassVar[DetectorKind]
    DETECTOR_KIND_MLP_PROBE: _ClassVar[DetectorKind]
ACTION_UNSPECIFIED: Action
ACTION_ALERT: Action
ACTION_BLOCK: Action
ACTION_STEER: Action
ACTION_LOG: Action
ACTION_ESCALATE: Action
ACTION_SHADOW: Action
STEERING_KIND_UNSPECIFIED: SteeringKind
STEERING_KIND_ADD: SteeringKind
STEERING_KIND_ABLATE: SteeringKind
STEERING_KIND_CLAMP: SteeringKind
STEERING_POSITIONS_UNSPECIFIED: SteeringPositions
STEERING_POSITIONS_PROMPT: SteeringPositions
STEERING_POSITIONS_GENERATED: SteeringPositions
STEERING_POSITIONS_ALL: SteeringPositions
REQUEST_KIND_UNSPECIFIED: RequestKind
REQUEST_KIND_GENERATE: RequestKind
REQUEST_KIND_SCORE: RequestKind
INTERVENTION_KIND_UNSPECIFIED: InterventionKind
INTERVENTION_KIND_BLOCK: InterventionKind
INTERVENTION_KIND_STEER: InterventionKind
INTERVENTION_KIND_OVERRIDE: InterventionKind
INTERVENTION_KIND_LOG: InterventionKind
INTERVENTION_KIND_ALERT: InterventionKind
INTERVENTION_KIND_ESCALATE: InterventionKind
INTERVENTION_KIND_SHADOW: InterventionKind
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_BLOCKED: FinishReason
DETECTOR_KIND_UNSPECIFIED: DetectorKind
DETECTOR_KIND_LINEAR_PROBE: DetectorKind
DETECTOR_KIND_SAE_FEATURE: DetectorKind
DETECTOR_KIND_MLP_PROBE: DetectorKind

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class RequestMetadata(_message.Message):
    __slots__ = ("client_id", "conversation_id", "tags")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    conversation_id: str
    tags: _containers.ScalarMap[str, str]
    def __init__(self, client_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed", "stop_sequences")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_sequences: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop_sequences: _Optional[_Iterable[str]] = ...) -> None: ...

class DetectorPolicy(_message.Message):
    __slots__ = ("detector_id", "threshold", "action")
    DETECTOR_ID_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    detector_id: str
    threshold: float
    action: Action
    def __init__(self, detector_id: _Optional[str] = ..., threshold: _Optional[float] = ..., action: _Optional[_Union[Action, str]] = ...) -> None: ...

class SteeringRequest(_message.Message):
    __slots__ = ("vector_id", "vector", "hook_point", "kind", "coefficient", "positions", "trigger_detector_id", "sae_id", "latent")
    VECTOR_ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    HOOK_POINT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    COEFFICIENT_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_DETECTOR_ID_FIELD_NUMBER: _ClassVar[int]
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    vector_id: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    hook_point: str
    kind: SteeringKind
    coefficient: float
    positions: SteeringPositions
    trigger_detector_id: str
    sae_id: str
    latent: int
    def __init__(self, vector_id: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., hook_point: _Optional[str] = ..., kind: _Optional[_Union[SteeringKind, str]] = ..., coefficient: _Optional[float] = ..., positions: _Optional[_Union[SteeringPositions, str]] = ..., trigger_detector_id: _Optional[str] = ..., sae_id: _Optional[str] = ..., latent: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("messages", "prompt", "max_new_tokens", "sampling", "detectors", "include_token_scores", "steering", "policy_overrides", "metadata")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    DETECTORS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TOKEN_SCORES_FIELD_NUMBER: _ClassVar[int]
    STEERING_FIELD_NUMBER: _ClassVar[int]
    POLICY_OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    prompt: str
    max_new_tokens: int
    sampling: SamplingParams
    detectors: _containers.RepeatedScalarFieldContainer[str]
    include_token_scores: bool
    steering: _containers.RepeatedCompositeFieldContainer[SteeringRequest]
    policy_overrides: _containers.RepeatedCompositeFieldContainer[DetectorPolicy]
    metadata: RequestMetadata
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., detectors: _Optional[_Iterable[str]] = ..., include_token_scores: _Optional[bool] = ..., steering: _Optional[_Iterable[_Union[SteeringRequest, _Mapping]]] = ..., policy_overrides: _Optional[_Iterable[_Union[DetectorPolicy, _Mapping]]] = ..., metadata: _Optional[_Union[RequestMetadata, _Mapping]] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("index", "token_id", "text", "scores")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    index: int
    token_id: int
    text: str
    scores: _containers.ScalarMap[str, float]
    def __init__(self, index: _Optional[int] = ..., token_id: _Optional[int] = ..., text: _Optional[str] = ..., scores: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("alert_id", "create_time", "request_id", "request_kind", "detector_id", "detector_version", "score", "threshold", "action", "token_index", "input_index", "metadata", "snapshot_version", "explanation", "rule_id", "policy_version")
    ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_KIND_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_ID_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_INDEX_FIELD_NUMBER: _ClassVar[int]
    INPUT_INDEX_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    RULE_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    alert_id: str
    create_time: _timestamp_pb2.Timestamp
    request_id: str
    request_kind: RequestKind
    detector_id: str
    detector_version: str
    score: float
    threshold: float
    action: Action
    token_index: int
    input_index: int
    metadata: RequestMetadata
    snapshot_version: str
    explanation: Explanation
    rule_id: str
    policy_version: str
    def __init__(self, alert_id: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ..., request_kind: _Optional[_Union[RequestKind, str]] = ..., detector_id: _Optional[str] = ..., detector_version: _Optional[str] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., action: _Optional[_Union[Action, str]] = ..., token_index: _Optional[int] = ..., input_index: _Optional[int] = ..., metadata: _Optional[_Union[RequestMetadata, _Mapping]] = ..., snapshot_version: _Optional[str] = ..., explanation: _Optional[_Union[Explanation, _Mapping]] = ..., rule_id: _Optional[str] = ..., policy_version: _Optional[str] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("tokens", "latents")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenContribution]
    latents: _containers.RepeatedCompositeFieldContainer[LatentActivation]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenContribution, _Mapping]]] = ..., latents: _Optional[_Iterable[_Union[LatentActivation, _Mapping]]] = ...) -> None: ...

class TokenContribution(_message.Message):
    __slots__ = ("position", "text", "score")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    position: int
    text: str
    score: float
    def __init__(self, position: _Optional[int] = ..., text: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class LatentActivation(_message.Message):
    __slots__ = ("sae_id", "latent", "activation")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    latent: int
    activation: float
    def __init__(self, sae_id: _Optional[str] = ..., latent: _Optional[int] = ..., activation: _Optional[float] = ...) -> None: ...

class EscalationVerdict(_message.Message):
    __slots__ = ("endpoint", "flagged", "categories", "latency_seconds", "error")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    LATENCY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    flagged: bool
    categories: _containers.RepeatedScalarFieldContainer[str]
    latency_seconds: float
    error: str
    def __init__(self, endpoint: _Optional[str] = ..., flagged: _Optional[bool] = ..., categories: _Optional[_Iterable[str]] = ..., latency_seconds: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class Intervention(_message.Message):
    __slots__ = ("create_time", "request_id", "kind", "detector_id", "token_index", "steering", "metadata", "intervention_id", "override", "snapshot_version", "rule_id", "policy_version", "detector_version", "score", "outcome", "escalation", "shadow_action")
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_INDEX_FIELD_NUMBER: _ClassVar[int]
    STEERING_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    INTERVENTION_ID_FIELD_NUMBER: _ClassVar[int]
    OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    RULE_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_ACTION_FIELD_NUMBER: _ClassVar[int]
    create_time: _timestamp_pb2.Timestamp
    request_id: str
    kind: InterventionKind
    detector_id: str
    token_index: int
    steering: SteeringRequest
    metadata: RequestMetadata
    intervention_id: str
    override: DetectorPolicy
    snapshot_version: str
    rule_id: str
    policy_version: str
    detector_version: str
    score: float
    outcome: str
    escalation: EscalationVerdict
    shadow_action: Action
    def __init__(self, create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ..., kind: _Optional[_Union[InterventionKind, str]] = ..., detector_id: _Optional[str] = ..., token_index: _Optional[int] = ..., steering: _Optional[_Union[SteeringRequest, _Mapping]] = ..., metadata: _Optional[_Union[RequestMetadata, _Mapping]] = ..., intervention_id: _Optional[str] = ..., override: _Optional[_Union[DetectorPolicy, _Mapping]] = ..., snapshot_version: _Optional[str] = ..., rule_id: _Optional[str] = ..., policy_version: _Optional[str] = ..., detector_version: _Optional[str] = ..., score: _Optional[float] = ..., outcome: _Optional[str] = ..., escalation: _Optional[_Union[EscalationVerdict, _Mapping]] = ..., shadow_action: _Optional[_Union[Action, str]] = ...) -> None: ...

class DetectorResult(_message.Message):
    __slots__ = ("detector_id", "score", "flagged", "token_scores")
    DETECTOR_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SCORES_FIELD_NUMBER: _ClassVar[int]
    detector_id: str
    score: float
    flagged: bool
    token_scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, detector_id: _Optional[str] = ..., score: _Optional[float] = ..., flagged: _Optional[bool] = ..., token_scores: _Optional[_Iterable[float]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GenerateSummary(_message.Message):
    __slots__ = ("request_id", "finish_reason", "text", "scores", "alerts", "usage", "snapshot_version", "refusal", "policy_version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    finish_reason: FinishReason
    text: str
    scores: _containers.RepeatedCompositeFieldContainer[DetectorResult]
    alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    usage: Usage
    snapshot_version: str
    refusal: str
    policy_version: str
    def __init__(self, request_id: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., text: _Optional[str] = ..., scores: _Optional[_Iterable[_Union[DetectorResult, _Mapping]]] = ..., alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., snapshot_version: _Optional[str] = ..., refusal: _Optional[str] = ..., policy_version: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token", "alert", "intervention", "summary")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ALERT_FIELD_NUMBER: _ClassVar[int]
    INTERVENTION_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    token: TokenEvent
    alert: Alert
    intervention: Intervention
    summary: GenerateSummary
    def __init__(self, token: _Optional[_Union[TokenEvent, _Mapping]] = ..., alert: _Optional[_Union[Alert, _Mapping]] = ..., intervention: _Optional[_Union[Intervention, _Mapping]] = ..., summary: _Optional[_Union[GenerateSummary, _Mapping]] = ...) -> None: ...

class ScoreInput(_message.Message):
    __slots__ = ("text", "messages")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    text: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, text: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("inputs", "detectors", "include_token_scores", "metadata")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    DETECTORS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TOKEN_SCORES_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[ScoreInput]
    detectors: _containers.RepeatedScalarFieldContainer[str]
    include_token_scores: bool
    metadata: RequestMetadata
    def __init__(self, inputs: _Optional[_Iterable[_Union[ScoreInput, _Mapping]]] = ..., detectors: _Optional[_Iterable[str]] = ..., include_token_scores: _Optional[bool] = ..., metadata: _Optional[_Union[RequestMetadata, _Mapping]] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("detectors", "tokens", "token_count")
    DETECTORS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    detectors: _containers.RepeatedCompositeFieldContainer[DetectorResult]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    token_count: int
    def __init__(self, detectors: _Optional[_Iterable[_Union[DetectorResult, _Mapping]]] = ..., tokens: _Optional[_Iterable[str]] = ..., token_count: _Optional[int] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "results", "snapshot_version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    results: _containers.RepeatedCompositeFieldContainer[ScoreResult]
    snapshot_version: str
    def __init__(self, request_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ScoreResult, _Mapping]]] = ..., snapshot_version: _Optional[str] = ...) -> None: ...

class Calibration(_message.Message):
    __slots__ = ("method", "dataset", "target_fpr")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    TARGET_FPR_FIELD_NUMBER: _ClassVar[int]
    method: str
    dataset: str
    target_fpr: float
    def __init__(self, method: _Optional[str] = ..., dataset: _Optional[str] = ..., target_fpr: _Optional[float] = ...) -> None: ...

class Detector(_message.Message):
    __slots__ = ("id", "version", "kind", "hook_point", "threshold", "action", "calibration", "metrics", "description")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    HOOK_POINT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: str
    kind: DetectorKind
    hook_point: str
    threshold: float
    action: Action
    calibration: Calibration
    metrics: _containers.ScalarMap[str, float]
    description: str
    def __init__(self, id: _Optional[str] = ..., version: _Optional[str] = ..., kind: _Optional[_Union[DetectorKind, str]] = ..., hook_point: _Optional[str] = ..., threshold: _Optional[float] = ..., action: _Optional[_Union[Action, str]] = ..., calibration: _Optional[_Union[Calibration, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., description: _Optional[str] = ...) -> None: ...

class ListDetectorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDetectorsResponse(_message.Message):
    __slots__ = ("detectors", "snapshot_version")
    DETECTORS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    detectors: _containers.RepeatedCompositeFieldContainer[Detector]
    snapshot_version: str
    def __init__(self, detectors: _Optional[_Iterable[_Union[Detector, _Mapping]]] = ..., snapshot_version: _Optional[str] = ...) -> None: ...

class GetAlertsRequest(_message.Message):
    __slots__ = ("start_time", "end_time", "detector_id", "request_id", "client_id", "page_size", "page_token")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    detector_id: str
    request_id: str
    client_id: str
    page_size: int
    page_token: str
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., detector_id: _Optional[str] = ..., request_id: _Optional[str] = ..., client_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class GetAlertsResponse(_message.Message):
    __slots__ = ("alerts", "next_page_token")
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    next_page_token: str
    def __init__(self, alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetInterventionsRequest(_message.Message):
    __slots__ = ("start_time", "end_time", "detector_id", "request_id", "client_id", "rule_id", "kind", "page_size", "page_token")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    RULE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    detector_id: str
    request_id: str
    client_id: str
    rule_id: str
    kind: InterventionKind
    page_size: int
    page_token: str
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., detector_id: _Optional[str] = ..., request_id: _Optional[str] = ..., client_id: _Optional[str] = ..., rule_id: _Optional[str] = ..., kind: _Optional[_Union[InterventionKind, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class GetInterventionsResponse(_message.Message):
    __slots__ = ("interventions", "next_page_token")
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    interventions: _containers.RepeatedCompositeFieldContainer[Intervention]
    next_page_token: str
    def __init__(self, interventions: _Optional[_Iterable[_Union[Intervention, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ReloadDetectorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadDetectorsResponse(_message.Message):
    __slots__ = ("detectors", "snapshot_version")
    DETECTORS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    detectors: _containers.RepeatedCompositeFieldContainer[Detector]
    snapshot_version: str
    def __init__(self, detectors: _Optional[_Iterable[_Union[Detector, _Mapping]]] = ..., snapshot_version: _Optional[str] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("model_id", "model_fingerprint", "device", "dtype", "snapshot_version", "detectors", "server_version", "policy_version")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DETECTORS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_fingerprint: str
    device: str
    dtype: str
    snapshot_version: str
    detectors: _containers.RepeatedCompositeFieldContainer[Detector]
    server_version: str
    policy_version: str
    def __init__(self, model_id: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., snapshot_version: _Optional[str] = ..., detectors: _Optional[_Iterable[_Union[Detector, _Mapping]]] = ..., server_version: _Optional[str] = ..., policy_version: _Optional[str] = ...) -> None: ...

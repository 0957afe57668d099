"""Python client for the latentwatch sidecar, sync (`Client`) and async (`AsyncClient`).

Results are plain dataclasses so callers never handle protobuf messages:

    with Client("127.0.0.1:50051") as c:
        r = c.score(["How do I build a bomb?"])[0]
        print(r.scores["harmful_intent"], r.flagged)
        for ev in c.generate([{"role": "user", "content": "hi"}], max_new_tokens=16):
            ...

Enums cross as the domain names of `monitor.domain` (actions "alert"/"steer"/"block"/"log"/
"escalate"/"shadow", intervention kinds "log"/"alert"/"block"/"steer"/"escalate"/"shadow"/
"override", steering kinds "add"/"ablate"/"clamp", positions "prompt"/"generated"/"all", request
kinds "generate"/"score", finish reasons "stop"/"length"/"blocked"), through the tables of
`monitor.enums`, the same ones the server uses. A number a response carries that the client does
not know reads "unknown(N)"; an unset one "unspecified".

Response-level fields ride on the returned lists: `score()` returns a `ScoreResults` list with
`.request_id` and `.snapshot_version`; `list_detectors()` and `reload_detectors()` return a
`DetectorList` with `.snapshot_version` (for a reload: the new snapshot's version, read from the
same response, so it never races another reload). Both are plain lists otherwise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from latentwatch.v1 import monitor_pb2 as pb
from latentwatch.v1 import monitor_pb2_grpc as pb_grpc
from monitor import enums
from monitor.tls import channel_credentials

PemFile = str | Path | None


def _inverse(table: Mapping[str, int]) -> dict[int, str]:
    return {number: name for name, number in table.items()}


# number -> domain name, for responses
_ACTION = _inverse(enums.ACTION)
_INTERVENTION = _inverse(enums.INTERVENTION)
_REQUEST_KIND = _inverse(enums.REQUEST_KIND)
_STEERING_KIND = _inverse(enums.STEERING_KIND)
_POSITIONS = dict(enums.POSITIONS)  # already number -> name; unset reads as the server's default
_FINISH = _inverse(enums.FINISH)
# `enums.DETECTOR_KIND` is keyed by scorer kind ("affine", "mlp", "sae"), which says how a detector is
# fused rather than what it is, so a client shows the wire name of the number: "linear_probe",
# "mlp_probe", "sae_feature".
_DETECTOR_KIND = {n: name.removeprefix("DETECTOR_KIND_").lower() for name, n in pb.DetectorKind.items() if n}
# domain name -> number, for requests (positions: every name but the unset number's alias)
_POSITIONS_IN = {name: n for n, name in enums.POSITIONS.items() if n}


def _name(table: Mapping[int, str], number: int) -> str:
    if number in table:
        return table[number]
    return "unspecified" if number == 0 else f"unknown({number})"


def _number(where: str, table: Mapping[str, int], name) -> int:
    if name not in table:
        raise ValueError(f"{where}: unknown value {name!r}, expected one of {', '.join(table)}")
    return table[name]


def _time(msg, name: str) -> datetime | None:
    return getattr(msg, name).ToDatetime(UTC) if msg.HasField(name) else None


# ------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class TokenContribution:
    """Score: index among the input's scored tokens; Generate: prompt tokens first, then generated token
    i at prompt_tokens + i. `text` is "" where the server keeps no text."""

    position: int
    text: str
    score: float


@dataclass(frozen=True)
class LatentActivation:
    sae_id: str
    latent: int
    activation: float


@dataclass(frozen=True)
class Explanation:
    """What drove an alert: its detector's highest-scoring tokens, the SAE latents active where it fired."""

    tokens: list[TokenContribution]
    latents: list[LatentActivation]

    @classmethod
    def from_proto(cls, e: pb.Explanation) -> Explanation:
        return cls([TokenContribution(t.position, t.text, t.score) for t in e.tokens],
                   [LatentActivation(la.sae_id, la.latent, la.activation) for la in e.latents])


@dataclass(frozen=True)
class Alert:
    alert_id: str
    request_id: str
    detector_id: str
    detector_version: str
    score: float
    threshold: float
    action: str  # monitor.domain.ACTIONS
    token_index: int
    create_time: datetime | None
    client_id: str = ""
    request_kind: str = "unspecified"  # generate | score
    input_index: int = 0  # for Score: which input raised it
    conversation_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    snapshot_version: str = ""
    explanation: Explanation | None = None
    rule_id: str = ""  # the policy rule that raised it (the detector id without a policy file)
    policy_version: str = ""

    @classmethod
    def from_proto(cls, a: pb.Alert) -> Alert:
        md = a.metadata
        return cls(a.alert_id, a.request_id, a.detector_id, a.detector_version, a.score, a.threshold,
                   _name(_ACTION, a.action), a.token_index, _time(a, "create_time"), md.client_id,
                   _name(_REQUEST_KIND, a.request_kind), a.input_index, md.conversation_id, dict(md.tags),
                   a.snapshot_version,
                   Explanation.from_proto(a.explanation) if a.HasField("explanation") else None,
                   a.rule_id, a.policy_version)


@dataclass(frozen=True)
class ScoreResult:
    scores: dict[str, float]
    flagged: dict[str, bool]
    token_count: int
    tokens: list[str] = field(default_factory=list)
    token_scores: dict[str, list[float]] = field(default_factory=dict)

    @property
    def any_flagged(self) -> bool:
        return any(self.flagged.values())


class ScoreResults(list[ScoreResult]):
    """What `score()` returns: one `ScoreResult` per input, in input order, plus the response's
    `request_id` and `snapshot_version` (the detector snapshot that scored the inputs)."""

    def __init__(self, results=(), *, request_id: str = "", snapshot_version: str = ""):
        super().__init__(results)
        self.request_id = request_id
        self.snapshot_version = snapshot_version


@dataclass(frozen=True)
class Token:
    index: int
    token_id: int
    text: str
    scores: dict[str, float]


@dataclass(frozen=True)
class SteeringInfo:
    """The steering an intervention switched on (an inline vector is not echoed by the server)."""

    kind: str  # add | ablate | clamp
    hook_point: str
    coefficient: float  # for clamp: the value the latent is set to
    vector_id: str
    positions: str  # prompt | generated | all
    trigger_detector_id: str = ""
    sae_id: str = ""  # for clamp: the SAE and the latent clamped
    latent: int = 0


@dataclass(frozen=True)
class OverrideInfo:
    """A request's policy override of one detector; None = the detector's own value kept."""

    detector_id: str
    threshold: float | None
    action: str | None  # alert | steer | block


@dataclass(frozen=True)
class EscalationVerdict:
    """What a second-opinion check answered (an intervention of kind "escalate")."""

    endpoint: str
    flagged: bool
    categories: list[str]
    latency_seconds: float
    error: str = ""  # why the check failed; "" when it answered

    @classmethod
    def from_proto(cls, v: pb.EscalationVerdict) -> EscalationVerdict:
        return cls(v.endpoint, v.flagged, list(v.categories), v.latency_seconds, v.error)


@dataclass(frozen=True)
class Intervention:
    """One entry of the decision trail, streamed by Generate or read back with `get_interventions`."""

    kind: str  # log | alert | block | steer | escalate | shadow | override
    detector_id: str  # "" for steering requested to run from the start
    token_index: int
    intervention_id: str = ""
    request_id: str = ""
    create_time: datetime | None = None
    steering: SteeringInfo | None = None  # for kind "steer"
    override: OverrideInfo | None = None  # for kind "override"
    client_id: str = ""
    snapshot_version: str = ""
    rule_id: str = ""  # the policy rule that decided; "" for client steering and overrides
    policy_version: str = ""
    detector_version: str = ""
    score: float = 0.0  # the detector's aggregate when the rule fired
    outcome: str = ""  # logged | alerted | blocked | steered | shadowed | overridden | failed_open | failed_closed
    escalation: EscalationVerdict | None = None  # for kind "escalate"
    shadow_action: str | None = None  # for kind "shadow": what the rule would have done

    @classmethod
    def from_proto(cls, i: pb.Intervention) -> Intervention:
        steering = override = None
        if i.HasField("steering"):
            s = i.steering
            steering = SteeringInfo(_name(_STEERING_KIND, s.kind), s.hook_point, s.coefficient, s.vector_id,
                                    _name(_POSITIONS, s.positions), s.trigger_detector_id, s.sae_id, s.latent)
        if i.HasField("override"):
            o = i.override
            override = OverrideInfo(o.detector_id, o.threshold if o.HasField("threshold") else None,
                                    _name(_ACTION, o.action) if o.action else None)
        return cls(_name(_INTERVENTION, i.kind), i.detector_id, i.token_index, i.intervention_id, i.request_id,
                   _time(i, "create_time"), steering, override, i.metadata.client_id, i.snapshot_version, i.rule_id,
                   i.policy_version, i.detector_version, i.score, i.outcome,
                   EscalationVerdict.from_proto(i.escalation) if i.HasField("escalation") else None,
                   _name(_ACTION, i.shadow_action) if i.shadow_action else None)


@dataclass(frozen=True)
class Summary:
    request_id: str
    finish_reason: str  # stop | length | blocked
    text: str
    scores: dict[str, float]
    flagged: dict[str, bool]
    alerts: list[Alert]
    prompt_tokens: int
    completion_tokens: int
    snapshot_version: str = ""
    refusal: str = ""  # finish_reason "blocked": the blocking rule's refusal, to show in place of the text
    policy_version: str = ""


Event = Token | Alert | Intervention | Summary


@dataclass(frozen=True)
class Detector:
    id: str
    version: str
    hook_point: str
    threshold: float
    action: str  # alert | steer | block
    description: str
    metrics: dict[str, float]
    kind: str = "unspecified"  # linear_probe | mlp_probe | sae_feature

    @classmethod
    def from_proto(cls, d: pb.Detector) -> Detector:
        return cls(d.id, d.version, d.hook_point, d.threshold, _name(_ACTION, d.action), d.description,
                   dict(d.metrics), _name(_DETECTOR_KIND, d.kind))


class DetectorList(list[Detector]):
    """What `list_detectors()` and `reload_detectors()` return: the detectors, plus the
    `snapshot_version` of the snapshot they belong to."""

    def __init__(self, detectors=(), *, snapshot_version: str = ""):
        super().__init__(detectors)
        self.snapshot_version = snapshot_version


@dataclass(frozen=True)
class ServerInfo:
    model_id: str
    model_fingerprint: str
    device: str
    dtype: str
    snapshot_version: str
    detectors: list[Detector]
    server_version: str


# ------------------------------------------------------------------------------ requests


def _messages(messages) -> list[pb.ChatMessage]:
    return [m if isinstance(m, pb.ChatMessage) else pb.ChatMessage(role=m["role"], content=m["content"])
            for m in messages]


def _metadata(client_id: str, conversation_id: str, tags: dict | None) -> pb.RequestMetadata:
    return pb.RequestMetadata(client_id=client_id, conversation_id=conversation_id, tags=tags or {})


def _check_keys(where: str, d, allowed: tuple[str, ...]) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(d).__name__}")
    for key in d:
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r}, expected some of {', '.join(allowed)}")


_OVERRIDE_KEYS = ("detector_id", "threshold", "action")
_STEERING_KEYS = ("vector_id", "vector", "hook_point", "kind", "coefficient", "value", "positions",
                  "trigger_detector_id", "sae_id", "latent")


def _override(i: int, o) -> pb.DetectorPolicy:
    """{"detector_id": ..., "threshold": 0.3, "action": "block"}; threshold and action optional."""
    if isinstance(o, pb.DetectorPolicy):
        return o
    where = f"policy_overrides[{i}]"
    _check_keys(where, o, _OVERRIDE_KEYS)
    if "detector_id" not in o:
        raise ValueError(f"{where}: missing key 'detector_id'")
    msg = pb.DetectorPolicy(detector_id=o["detector_id"])
    if o.get("threshold") is not None:
        msg.threshold = o["threshold"]
    if o.get("action") is not None:
        msg.action = _number(f"{where}.action", enums.ACTION, o["action"])
    return msg


def _steering(i: int, s) -> pb.SteeringRequest:
    """{"vector": [...] or "vector_id": ..., "hook_point": ..., "kind": "add" | "ablate",
    "coefficient": ..., "positions": "prompt" | "generated" | "all", "trigger_detector_id": ...},
    or a latent clamp {"kind": "clamp", "sae_id": ..., "latent": ..., "value" (or "coefficient"): ...}."""
    if isinstance(s, pb.SteeringRequest):
        return s
    where = f"steering[{i}]"
    _check_keys(where, s, _STEERING_KEYS)
    if "value" in s and "coefficient" in s:
        raise ValueError(f"{where}: give value or coefficient, not both (value is a clamp's name for it)")
    latent = int(s.get("latent") or 0)
    if latent < 0:
        raise ValueError(f"{where}.latent: must be >= 0, got {latent}")
    msg = pb.SteeringRequest(vector_id=s.get("vector_id") or "", hook_point=s.get("hook_point") or "",
                             coefficient=float(s.get("value", s.get("coefficient")) or 0.0),
                             trigger_detector_id=s.get("trigger_detector_id") or "", sae_id=s.get("sae_id") or "",
                             latent=latent)
    if s.get("vector") is not None:
        msg.vector.extend(float(v) for v in s["vector"])
    if s.get("kind") is not None:
        msg.kind = _number(f"{where}.kind", enums.STEERING_KIND, s["kind"])
    if s.get("positions") is not None:
        msg.positions = _number(f"{where}.positions", _POSITIONS_IN, s["positions"])
    return msg


def score_request(inputs: Sequence, detectors=(), include_token_scores=False, client_id="", conversation_id="",
                  tags=None) -> pb.ScoreRequest:
    """Inputs are strings (raw text) or lists of {"role", "content"} dicts (conversations)."""
    req = pb.ScoreRequest(detectors=list(detectors), include_token_scores=include_token_scores,
                          metadata=_metadata(client_id, conversation_id, tags))
    for x in inputs:
        req.inputs.append(pb.ScoreInput(text=x) if isinstance(x, str) else pb.ScoreInput(messages=_messages(x)))
    return req


def generate_request(messages_or_prompt, *, max_new_tokens=0, temperature=None, top_p=None, top_k=None, seed=None,
                     stop=(), detectors=(), include_token_scores=False, client_id="", conversation_id="",
                     tags=None, policy_overrides=(), steering=()) -> pb.GenerateRequest:
    """A string is a raw prompt; a list of {"role", "content"} dicts is a chat.

    `policy_overrides`: dicts {"detector_id", "threshold", "action"} (action a domain name).
    `steering`: dicts with the keys of `SteeringRequest` (kind and positions as domain names; a
    clamp may call its coefficient `value`).
    Both need permissions for `client_id` in the server's config. An unknown key or enum name
    raises ValueError naming it, before anything is sent.
    """
    sampling = pb.SamplingParams(stop_sequences=list(stop))
    for name, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if v is not None:
            setattr(sampling, name, v)
    req = pb.GenerateRequest(max_new_tokens=max_new_tokens, sampling=sampling, detectors=list(detectors),
                             include_token_scores=include_token_scores,
                             metadata=_metadata(client_id, conversation_id, tags),
                             policy_overrides=[_override(i, o) for i, o in enumerate(policy_overrides)],
                             steering=[_steering(i, s) for i, s in enumerate(steering)])
    if isinstance(messages_or_prompt, str):
        req.prompt = messages_or_prompt
    else:
        req.messages.extend(_messages(messages_or_prompt))
    return req


def _alerts_request(detector_id="", request_id="", client_id="", page_size=0, page_token="", since=None, until=None):
    req = pb.GetAlertsRequest(detector_id=detector_id, request_id=request_id, client_id=client_id,
                              page_size=page_size, page_token=page_token)
    return _times(req, since, until)


def _interventions_request(detector_id="", request_id="", client_id="", rule_id="", kind=None, page_size=0,
                           page_token="", since=None, until=None):
    """`kind`: a domain name (log, alert, block, steer, escalate, shadow, override); None = every kind."""
    req = pb.GetInterventionsRequest(detector_id=detector_id, request_id=request_id, client_id=client_id,
                                     rule_id=rule_id, page_size=page_size, page_token=page_token)
    if kind is not None:
        req.kind = _number("kind", enums.INTERVENTION, kind)
    return _times(req, since, until)


def _times(req, since: datetime | None, until: datetime | None):
    if since is not None:
        req.start_time.FromDatetime(since)
    if until is not None:
        req.end_time.FromDatetime(until)
    return req


# ------------------------------------------------------------------------------ responses


def _score_results(resp: pb.ScoreResponse) -> ScoreResults:
    return ScoreResults(
        (ScoreResult({d.detector_id: d.score for d in r.detectors}, {d.detector_id: d.flagged for d in r.detectors},
                     r.token_count, list(r.tokens),
                     {d.detector_id: list(d.token_scores) for d in r.detectors if d.token_scores})
         for r in resp.results),
        request_id=resp.request_id, snapshot_version=resp.snapshot_version)


def _event(msg: pb.GenerateResponse) -> Event:
    which = msg.WhichOneof("event")
    if which == "token":
        t = msg.token
        return Token(t.index, t.token_id, t.text, dict(t.scores))
    if which == "alert":
        return Alert.from_proto(msg.alert)
    if which == "intervention":
        return Intervention.from_proto(msg.intervention)
    s = msg.summary
    return Summary(s.request_id, _name(_FINISH, s.finish_reason), s.text,
                   {d.detector_id: d.score for d in s.scores}, {d.detector_id: d.flagged for d in s.scores},
                   [Alert.from_proto(a) for a in s.alerts], s.usage.prompt_tokens, s.usage.completion_tokens,
                   s.snapshot_version, s.refusal, s.policy_version)


def _detectors(resp) -> DetectorList:
    return DetectorList((Detector.from_proto(d) for d in resp.detectors), snapshot_version=resp.snapshot_version)


def _server_info(resp: pb.GetServerInfoResponse) -> ServerInfo:
    return ServerInfo(resp.model_id, resp.model_fingerprint, resp.device, resp.dtype, resp.snapshot_version,
                      [Detector.from_proto(d) for d in resp.detectors], resp.server_version)


def _last_summary(events) -> Summary:
    return [e for e in events if isinstance(e, Summary)][-1]


# ------------------------------------------------------------------------------ clients


def _channel(api, target: str, ca: PemFile, cert: PemFile, key: PemFile):
    """A channel from `api` (grpc or grpc.aio): TLS when any of the files is given, else plain text."""
    if ca is None and cert is None and key is None:
        return api.insecure_channel(target)
    return api.secure_channel(target, channel_credentials(ca, cert, key))


def _stub(channel, token: str | None) -> pb_grpc.MonitorStub:
    """The service stub; with a token, each of its calls sends `authorization: Bearer <token>`."""
    stub = pb_grpc.MonitorStub(channel)
    if token:
        bearer = (("authorization", f"Bearer {token}"),)
        for name in pb.DESCRIPTOR.services_by_name["Monitor"].methods_by_name:
            setattr(stub, name, _with_metadata(getattr(stub, name), bearer))
    return stub


def _with_metadata(method, extra):
    def call(request, *, metadata=(), **kw):
        return method(request, metadata=(*extra, *(metadata or ())), **kw)

    return call


class Client:
    """Blocking client. Errors surface as `grpc.RpcError` with the server's status and message;
    malformed `policy_overrides` / `steering` arguments as ValueError before any call.
    `token`: for a server with `auth_tokens`, sent as a bearer token on every call.
    `tls_ca`, `tls_cert`, `tls_key`: PEM files; any of them makes the channel TLS, trusting `tls_ca`
    (unset: the system's roots) and presenting `tls_cert` with `tls_key` to an mTLS server."""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = 60.0, channel=None,
                 token: str | None = None, tls_ca: PemFile = None, tls_cert: PemFile = None,
                 tls_key: PemFile = None):
        self.channel = channel or _channel(grpc, target, tls_ca, tls_cert, tls_key)
        self.stub = _stub(self.channel, token)
        self.timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def score(self, inputs: Sequence, **kw) -> ScoreResults:
        """One `ScoreResult` per input; the list also has `.request_id` and `.snapshot_version`."""
        return _score_results(self.stub.Score(score_request(inputs, **kw), timeout=self.timeout))

    def generate(self, messages_or_prompt, **kw) -> Iterator[Event]:
        """Stream events; the last one is a `Summary`. Breaking out of the loop cancels the RPC.
        Keyword arguments are those of `generate_request`; a bad one raises here, at the call."""
        return self._stream(generate_request(messages_or_prompt, **kw))

    def _stream(self, req: pb.GenerateRequest) -> Iterator[Event]:
        call = self.stub.Generate(req, timeout=self.timeout)
        try:
            for msg in call:
                yield _event(msg)
        finally:
            call.cancel()

    def generate_text(self, messages_or_prompt, **kw) -> Summary:
        return _last_summary(self.generate(messages_or_prompt, **kw))

    def list_detectors(self) -> DetectorList:
        """The loaded detectors; `.snapshot_version` is the snapshot now admitting requests."""
        return _detectors(self.stub.ListDetectors(pb.ListDetectorsRequest(), timeout=self.timeout))

    def reload_detectors(self) -> DetectorList:
        """The detectors after the reload; `.snapshot_version` is the new snapshot's version."""
        return _detectors(self.stub.ReloadDetectors(pb.ReloadDetectorsRequest(), timeout=self.timeout))

    def get_alerts(self, **kw) -> tuple[list[Alert], str]:
        resp = self.stub.GetAlerts(_alerts_request(**kw), timeout=self.timeout)
        return [Alert.from_proto(a) for a in resp.alerts], resp.next_page_token

    def get_interventions(self, **kw) -> tuple[list[Intervention], str]:
        """One page of the decision trail, oldest first, and the token of the next ("" on the last).
        Filters: detector_id, request_id, client_id, rule_id, kind (a domain name), since, until;
        page_size, page_token. An unknown kind raises ValueError before any call."""
        resp = self.stub.GetInterventions(_interventions_request(**kw), timeout=self.timeout)
        return [Intervention.from_proto(i) for i in resp.interventions], resp.next_page_token

    def get_server_info(self) -> ServerInfo:
        return _server_info(self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self.timeout))


class AsyncClient:
    """grpc.aio client with the same methods, awaitable (`generate` is an async iterator)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = 60.0, channel=None,
                 token: str | None = None, tls_ca: PemFile = None, tls_cert: PemFile = None,
                 tls_key: PemFile = None):
        self.channel = channel or _channel(grpc.aio, target, tls_ca, tls_cert, tls_key)
        self.stub = _stub(self.channel, token)
        self.timeout = timeout

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def score(self, inputs: Sequence, **kw) -> ScoreResults:
        return _score_results(await self.stub.Score(score_request(inputs, **kw), timeout=self.timeout))

    def generate(self, messages_or_prompt, **kw) -> AsyncIterator[Event]:
        """`async for` the events; the last one is a `Summary`."""
        return self._stream(generate_request(messages_or_prompt, **kw))

    async def _stream(self, req: pb.GenerateRequest) -> AsyncIterator[Event]:
        call = self.stub.Generate(req, timeout=self.timeout)
        try:
            async for msg in call:
                yield _event(msg)
        finally:
            call.cancel()

    async def generate_text(self, messages_or_prompt, **kw) -> Summary:
        return _last_summary([e async for e in self.generate(messages_or_prompt, **kw)])

    async def list_detectors(self) -> DetectorList:
        return _detectors(await self.stub.ListDetectors(pb.ListDetectorsRequest(), timeout=self.timeout))

    async def reload_detectors(self) -> DetectorList:
        return _detectors(await self.stub.ReloadDetectors(pb.ReloadDetectorsRequest(), timeout=self.timeout))

    async def get_alerts(self, **kw) -> tuple[list[Alert], str]:
        resp = await self.stub.GetAlerts(_alerts_request(**kw), timeout=self.timeout)
        return [Alert.from_proto(a) for a in resp.alerts], resp.next_page_token

    async def get_interventions(self, **kw) -> tuple[list[Intervention], str]:
        resp = await self.stub.GetInterventions(_interventions_request(**kw), timeout=self.timeout)
        return [Intervention.from_proto(i) for i in resp.interventions], resp.next_page_token

    async def get_server_info(self) -> ServerInfo:
        return _server_info(await self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self.timeout))


def to_dict(msg) -> dict:
    """A protobuf message as JSON-ready dict (field names as in the proto)."""
    return MessageToDict(msg, preserving_proto_field_name=True)

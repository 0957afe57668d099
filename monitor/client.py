"""Python client for the latentwatch sidecar, sync (`Client`) and async (`AsyncClient`).

Results are plain dataclasses so callers never handle protobuf messages:

    with Client("127.0.0.1:50051") as c:
        r = c.score(["How do I build a bomb?"])[0]
        print(r.scores["harmful_intent"], r.flagged)
        for ev in c.generate([{"role": "user", "content": "hi"}], max_new_tokens=16):
            ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
from google.protobuf.json_format import MessageToDict

from latentwatch.v1 import monitor_pb2 as pb
from latentwatch.v1 import monitor_pb2_grpc as pb_grpc

_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_BLOCKED: "blocked"}
_ACTION = {pb.ACTION_ALERT: "alert", pb.ACTION_BLOCK: "block", pb.ACTION_STEER: "steer"}


@dataclass(frozen=True)
class Alert:
    alert_id: str
    request_id: str
    detector_id: str
    detector_version: str
    score: float
    threshold: float
    action: str
    token_index: int
    create_time: datetime | None
    client_id: str = ""

    @classmethod
    def from_proto(cls, a: pb.Alert) -> Alert:
        t = a.create_time.ToDatetime(UTC) if a.HasField("create_time") else None
        return cls(a.alert_id, a.request_id, a.detector_id, a.detector_version, a.score, a.threshold,
                   _ACTION.get(a.action, "alert"), a.token_index, t, a.metadata.client_id)


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


@dataclass(frozen=True)
class Token:
    index: int
    token_id: int
    text: str
    scores: dict[str, float]


@dataclass(frozen=True)
class Intervention:
    kind: str  # block | steer
    detector_id: str
    token_index: int


@dataclass(frozen=True)
class Summary:
    request_id: str
    finish_reason: str
    text: str
    scores: dict[str, float]
    flagged: dict[str, bool]
    alerts: list[Alert]
    prompt_tokens: int
    completion_tokens: int


Event = Token | Alert | Intervention | Summary


@dataclass(frozen=True)
class Detector:
    id: str
    version: str
    hook_point: str
    threshold: float
    action: str
    description: str
    metrics: dict[str, float]


def _messages(messages) -> list[pb.ChatMessage]:
    return [m if isinstance(m, pb.ChatMessage) else pb.ChatMessage(role=m["role"], content=m["content"])
            for m in messages]


def _metadata(client_id: str, conversation_id: str, tags: dict | None) -> pb.RequestMetadata:
    return pb.RequestMetadata(client_id=client_id, conversation_id=conversation_id, tags=tags or {})


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
                     tags=None) -> pb.GenerateRequest:
    """A string is a raw prompt; a list of {"role", "content"} dicts is a chat."""
    sampling = pb.SamplingParams(stop_sequences=list(stop))
    for name, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if v is not None:
            setattr(sampling, name, v)
    req = pb.GenerateRequest(max_new_tokens=max_new_tokens, sampling=sampling, detectors=list(detectors),
                             include_token_scores=include_token_scores,
                             metadata=_metadata(client_id, conversation_id, tags))
    if isinstance(messages_or_prompt, str):
        req.prompt = messages_or_prompt
    else:
        req.messages.extend(_messages(messages_or_prompt))
    return req


def _score_results(resp: pb.ScoreResponse) -> list[ScoreResult]:
    return [ScoreResult({d.detector_id: d.score for d in r.detectors}, {d.detector_id: d.flagged for d in r.detectors},
                        r.token_count, list(r.tokens),
                        {d.detector_id: list(d.token_scores) for d in r.detectors if d.token_scores})
            for r in resp.results]


def _event(msg: pb.GenerateResponse) -> Event:
    which = msg.WhichOneof("event")
    if which == "token":
        t = msg.token
        return Token(t.index, t.token_id, t.text, dict(t.scores))
    if which == "alert":
        return Alert.from_proto(msg.alert)
    if which == "intervention":
        i = msg.intervention
        return Intervention("block" if i.kind == pb.INTERVENTION_KIND_BLOCK else "steer", i.detector_id, i.token_index)
    s = msg.summary
    return Summary(s.request_id, _FINISH.get(s.finish_reason, "unspecified"), s.text,
                   {d.detector_id: d.score for d in s.scores}, {d.detector_id: d.flagged for d in s.scores},
                   [Alert.from_proto(a) for a in s.alerts], s.usage.prompt_tokens, s.usage.completion_tokens)


def _detectors(resp) -> list[Detector]:
    return [Detector(d.id, d.version, d.hook_point, d.threshold, _ACTION.get(d.action, "alert"), d.description,
                     dict(d.metrics)) for d in resp.detectors]


def _alerts_request(detector_id="", request_id="", client_id="", page_size=0, page_token="", since=None, until=None):
    req = pb.GetAlertsRequest(detector_id=detector_id, request_id=request_id, client_id=client_id,
                              page_size=page_size, page_token=page_token)
    if since is not None:
        req.start_time.FromDatetime(since)
    if until is not None:
        req.end_time.FromDatetime(until)
    return req


class Client:
    """Blocking client. Errors surface as `grpc.RpcError` with the server's status and message."""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = 60.0, channel=None):
        self.channel = channel or grpc.insecure_channel(target)
        self.stub = pb_grpc.MonitorStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def score(self, inputs: Sequence, **kw) -> list[ScoreResult]:
        return _score_results(self.stub.Score(score_request(inputs, **kw), timeout=self.timeout))

    def generate(self, messages_or_prompt, **kw) -> Iterator[Event]:
        """Stream events; the last one is a `Summary`. Breaking out of the loop cancels the RPC."""
        call = self.stub.Generate(generate_request(messages_or_prompt, **kw), timeout=self.timeout)
        try:
            for msg in call:
                yield _event(msg)
        finally:
            call.cancel()

    def generate_text(self, messages_or_prompt, **kw) -> Summary:
        return [e for e in self.generate(messages_or_prompt, **kw) if isinstance(e, Summary)][-1]

    def list_detectors(self) -> list[Detector]:
        return _detectors(self.stub.ListDetectors(pb.ListDetectorsRequest(), timeout=self.timeout))

    def reload_detectors(self) -> list[Detector]:
        return _detectors(self.stub.ReloadDetectors(pb.ReloadDetectorsRequest(), timeout=self.timeout))

    def get_alerts(self, **kw) -> tuple[list[Alert], str]:
        resp = self.stub.GetAlerts(_alerts_request(**kw), timeout=self.timeout)
        return [Alert.from_proto(a) for a in resp.alerts], resp.next_page_token


class AsyncClient:
    """grpc.aio client with the same methods, awaitable."""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = 60.0, channel=None):
        self.channel = channel or grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.MonitorStub(self.channel)
        self.timeout = timeout

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def score(self, inputs: Sequence, **kw) -> list[ScoreResult]:
        return _score_results(await self.stub.Score(score_request(inputs, **kw), timeout=self.timeout))

    async def generate(self, messages_or_prompt, **kw) -> AsyncIterator[Event]:
        call = self.stub.Generate(generate_request(messages_or_prompt, **kw), timeout=self.timeout)
        try:
            async for msg in call:
                yield _event(msg)
        finally:
            call.cancel()

    async def list_detectors(self) -> list[Detector]:
        return _detectors(await self.stub.ListDetectors(pb.ListDetectorsRequest(), timeout=self.timeout))

    async def reload_detectors(self) -> list[Detector]:
        return _detectors(await self.stub.ReloadDetectors(pb.ReloadDetectorsRequest(), timeout=self.timeout))

    async def get_alerts(self, **kw) -> tuple[list[Alert], str]:
        resp = await self.stub.GetAlerts(_alerts_request(**kw), timeout=self.timeout)
        return [Alert.from_proto(a) for a in resp.alerts], resp.next_page_token


def to_dict(msg) -> dict:
    """A protobuf message as JSON-ready dict (field names as in the proto)."""
    return MessageToDict(msg, preserving_proto_field_name=True)

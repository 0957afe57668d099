"""The gRPC sidecar: `latentwatch.v1.Monitor` on grpc.aio, plus health and reflection.

The event loop only validates, encodes (on one tokenizer thread) and streams; all model work
runs on the scheduler thread. Bad requests are answered with INVALID_ARGUMENT / NOT_FOUND /
RESOURCE_EXHAUSTED and a message naming the field; unexpected errors become INTERNAL for that
request only. Shutdown: health goes NOT_SERVING, new work is refused during a short drain, then
in-flight streams get the grace period, then the scheduler stops and storage is flushed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from latentwatch.v1 import monitor_pb2 as pb
from monitor.bank import Detector, DetectorBank
from monitor.config import Settings
from monitor.generation import Sampling, TokenEvent
from monitor.hooks import HookPoint
from monitor.metrics import Metrics
from monitor.policy import Policy, RequestError, Rule, crossings
from monitor.runner import Encoded, InputError, InputTooLong, ModelRunner
from monitor.scheduler import GenJob, Reaction, Scheduler
from monitor.steering import Steering
from monitor.storage import AlertRecord, DetectorRecord, InterventionRecord, RequestRecord, StorageWriter, get_alerts
from probes.pack import default_pack_dirs, load_packs

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Monitor"].full_name
ROLES = ("system", "user", "assistant")
ACTION_NAMES = {pb.ACTION_ALERT: "alert", pb.ACTION_BLOCK: "block", pb.ACTION_STEER: "steer"}
ACTION_ENUM = {v: k for k, v in ACTION_NAMES.items()}
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "blocked": pb.FINISH_REASON_BLOCKED}
POSITIONS = {0: "generated", pb.STEERING_POSITIONS_PROMPT: "prompt", pb.STEERING_POSITIONS_GENERATED: "generated",
             pb.STEERING_POSITIONS_ALL: "all"}
OUTCOME = {"stop": "ok", "length": "ok", "blocked": "blocked", "cancelled": "cancelled",
           "deadline_exceeded": "deadline_exceeded", "error": "internal"}
DEFAULT_PAGE_SIZE = 100


def pack_dirs(settings: Settings) -> list[Path]:
    """The pack folders a server loads: `packs` when set, else the shipped defaults plus the
    shipped packs that have a configured policy."""
    return list(settings.packs) if settings.packs is not None else default_pack_dirs(also=settings.detectors)


def _now_ts() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


# ------------------------------------------------------------------------------ wire checks


class _BadRequest:
    """What the deserializer hands over instead of a message it could not parse."""

    def __init__(self, message: str):
        self.message = message


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = data[i]
        result |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return result, i
        shift += 7


def bad_utf8_field(desc, data: bytes, prefix: str = "") -> str | None:
    """Path (e.g. `inputs[0].text`) of the first string field holding invalid UTF-8."""
    counts: dict[int, int] = {}
    i = 0
    try:
        while i < len(data):
            key, i = _varint(data, i)
            num, wire = key >> 3, key & 7
            if wire == 0:
                _, i = _varint(data, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == 2:
                n, i = _varint(data, i)
                chunk, i = data[i : i + n], i + n
                f = desc.fields_by_number.get(num)
                if f is None:
                    continue
                k = counts[num] = counts.get(num, -1) + 1
                is_map = f.type == f.TYPE_MESSAGE and f.message_type.GetOptions().map_entry
                path = prefix + f.name + (f"[{k}]" if f.is_repeated and not is_map else "")
                if f.type == f.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return path
                elif f.type == f.TYPE_MESSAGE:
                    found = bad_utf8_field(f.message_type, chunk, path + ".")
                    if found:
                        return found
            else:
                return None
    except IndexError:
        return None
    return None


def _deserializer(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError as e:
            path = bad_utf8_field(cls.DESCRIPTOR, data)
            if path:
                return _BadRequest(f"{path}: invalid UTF-8 in a string field")
            return _BadRequest(f"request is not a valid {cls.DESCRIPTOR.full_name}: {e}")

    return parse


# ------------------------------------------------------------------------- request objects


@dataclass
class _Override:
    detector_id: str
    threshold: float | None
    action: str | None


def _metadata(md: pb.RequestMetadata) -> dict:
    return {"client_id": md.client_id or None, "conversation_id": md.conversation_id or None, "tags": dict(md.tags)}


class _GenRequest(GenJob):
    """A Generate stream: turns token events into proto events, alerts, records and metrics."""

    def __init__(self, service: Service, loop, *, encoded, sampling, steering, rules: list[Rule], policy: Policy,
                 triggered: dict[str, list[Steering]], include_scores: bool, metadata: pb.RequestMetadata,
                 deadline: float | None, prompt_text: str):
        super().__init__(encoded, sampling, steering, deadline)
        self.service, self.loop = service, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.rules, self.policy, self.triggered = rules, policy, triggered
        self.include_scores, self.md, self.prompt_text = include_scores, metadata, prompt_text
        self.request_id = uuid.uuid4().hex
        self.created = datetime.now(UTC)
        self.fired: set[str] = set()
        self.alerts: list[pb.Alert] = []
        self.text = ""
        self.completion_tokens = 0
        self.last_token_time: float | None = None
        self.aggregate: np.ndarray | None = None
        self.reason: str | None = None

    # model thread ----------------------------------------------------------------
    def on_start(self, bank) -> None:
        if bank is not self.policy.bank:  # detectors were reloaded while this request queued
            current = self.service.policy
            ids = [r.id for r in self.rules if r.id in current.by_id]
            self.rules = [current.by_id[i] for i in ids] if current.bank is bank else []

    def _alert(self, rule: Rule, score: float, index: int) -> pb.Alert:
        a = pb.Alert(alert_id=uuid.uuid4().hex, create_time=_now_ts(), request_id=self.request_id,
                     request_kind=pb.REQUEST_KIND_GENERATE, detector_id=rule.id, detector_version=rule.version,
                     score=score, threshold=rule.threshold, action=ACTION_ENUM[rule.action], token_index=index,
                     metadata=self.md)
        self.alerts.append(a)
        self.service.record(AlertRecord(self.request_id, rule.id, rule.version, score, rule.threshold, rule.action,
                                        token_index=index, client_id=self.md.client_id or None))
        self.service.metrics.record_alert(rule.id, rule.action)
        return a

    def _intervention(self, kind: int, rule: Rule | None, index: int, steering: Steering | None) -> pb.Intervention:
        det = rule.id if rule else ""
        msg = pb.Intervention(create_time=_now_ts(), request_id=self.request_id, kind=kind, detector_id=det,
                              token_index=index, metadata=self.md)
        if steering is not None:
            msg.steering.CopyFrom(pb.SteeringRequest(
                vector_id=steering.id, hook_point=str(steering.hook_point), coefficient=steering.coefficient,
                kind=pb.STEERING_KIND_ABLATE if steering.kind == "ablate" else pb.STEERING_KIND_ADD,
                trigger_detector_id=det))
            self.service.record(InterventionRecord(self.request_id, steering.kind, str(steering.hook_point),
                                                   steering.id or "inline", steering.coefficient, det or "request",
                                                   token_start=index))
        kind_name = "block" if kind == pb.INTERVENTION_KIND_BLOCK else "steer"
        self.service.metrics.record_intervention(det or None, kind_name)
        return msg

    def on_token(self, ev: TokenEvent) -> Reaction:
        m = self.service.metrics
        now = time.monotonic()
        if self.last_token_time is None:
            m.observe_time_to_first_token(now - self.arrived)
        else:
            m.observe_inter_token_latency(now - self.last_token_time)
        self.last_token_time = now
        out: list[pb.GenerateResponse] = []
        reaction = Reaction()
        if len(ev.aggregate):
            self.aggregate = ev.aggregate
            for r in self.rules:
                m.observe_score(r.id, float(ev.token_probs[r.slot]))
            for c in crossings(self.rules, ev.aggregate, self.fired):
                out.append(pb.GenerateResponse(alert=self._alert(c.rule, c.score, ev.index)))
                if c.rule.action == "block":
                    reaction.block = True
                elif c.rule.action == "steer":
                    reaction.steer.append(c.rule.steering)
                    out.append(pb.GenerateResponse(intervention=self._intervention(
                        pb.INTERVENTION_KIND_STEER, c.rule, ev.index + 1, c.rule.steering)))
                for s in self.triggered.pop(c.rule.id, []):
                    reaction.steer.append(s)
                    out.append(pb.GenerateResponse(intervention=self._intervention(
                        pb.INTERVENTION_KIND_STEER, c.rule, ev.index + 1, s)))
        if reaction.block:
            rule = next(r for r in self.rules if r.id in self.fired and r.action == "block")
            out.append(pb.GenerateResponse(intervention=self._intervention(pb.INTERVENTION_KIND_BLOCK, rule, ev.index,
                                                                           None)))
            reaction.steer = []
        else:
            tok = pb.TokenEvent(index=ev.index, token_id=ev.token_id, text=ev.text)
            if self.include_scores:
                for r in self.rules:
                    tok.scores[r.id] = float(ev.token_probs[r.slot])
            out.append(pb.GenerateResponse(token=tok))
            self.text += ev.text
            self.completion_tokens += 1
        self._push(out)
        return reaction

    def on_end(self, reason: str, error: BaseException | None = None) -> None:
        self.reason = reason
        m = self.service.metrics
        outcome = OUTCOME.get(reason, "internal")
        m.add_tokens("prompt", len(self.encoded), outcome)
        m.add_tokens("completion", self.completion_tokens, outcome)
        if reason in FINISH:
            summary = pb.GenerateSummary(request_id=self.request_id, finish_reason=FINISH[reason], text=self.text,
                                         alerts=self.alerts,
                                         usage=pb.Usage(prompt_tokens=len(self.encoded),
                                                        completion_tokens=self.completion_tokens))
            if self.aggregate is not None:
                for r in self.rules:
                    score = float(self.aggregate[r.slot])
                    summary.scores.append(
                        pb.DetectorResult(detector_id=r.id, score=score, flagged=score >= r.threshold))
            self._push([pb.GenerateResponse(summary=summary)])
        elif reason == "error":
            self._push(RequestError("INTERNAL", f"generation failed: {error}"))
        elif reason == "deadline_exceeded":
            self._push(RequestError("DEADLINE_EXCEEDED", "deadline exceeded during generation"))
        self._push(None)
        self.service.record(RequestRecord(
            self.request_id, "generate", self.service.runner.model_id, created_at=self.created,
            finished_at=datetime.now(UTC), **_metadata(self.md), finish_reason=reason,
            prompt_tokens=len(self.encoded), completion_tokens=self.completion_tokens, prompt_text=self.prompt_text,
            completion_text=self.text, alerted=bool(self.alerts)))

    def _push(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass


# ---------------------------------------------------------------------------------- service


class Service:
    """The servicer plus everything it owns: runner, detectors, scheduler, storage, metrics."""

    def __init__(self, settings: Settings, runner: ModelRunner, *, metrics: Metrics | None = None,
                 writer: StorageWriter | None = None):
        self.settings, self.runner = settings, runner
        self.metrics = metrics or Metrics()
        self.writer = writer
        self.bank, self.policy = self._load_detectors()
        self.metrics.set_detectors(self.bank.ids if self.bank else [])
        self.scheduler = Scheduler(runner, self.bank, self.metrics, score_batch=settings.score.max_batch,
                                   score_wait_ms=settings.score.max_wait_ms, gen_batch=settings.generate.max_batch,
                                   gen_wait_ms=settings.generate.max_wait_ms)
        self.tokenizer_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="latentwatch-tokenize")
        self.draining = False

    # detectors -------------------------------------------------------------------
    def _load_detectors(self) -> tuple[DetectorBank | None, Policy]:
        packs = load_packs(pack_dirs(self.settings), expect=self.runner.fingerprint)
        bank = DetectorBank([Detector.from_pack(p) for p in packs], device=self.runner.device) if packs else None
        unknown = set(self.settings.detectors) - {p.manifest.id for p in packs}
        if unknown:
            log.warning("policy configured for detectors that are not loaded: %s", sorted(unknown))
        policy = Policy(bank, self.settings.detectors)
        for d in bank.detectors if bank else []:
            self.record(_detector_record(d))
        return bank, policy

    def record(self, rec) -> None:
        if self.writer is not None:
            self.writer.submit(rec)
            self.metrics.set_storage_queue_depth(self.writer.queue_depth)

    def detectors_proto(self) -> list[pb.Detector]:
        out = []
        for r in self.policy.rules:
            man = self.bank.detectors[r.slot].manifest
            d = pb.Detector(id=r.id, version=r.version, kind=pb.DETECTOR_KIND_LINEAR_PROBE, hook_point=r.hook_point,
                            threshold=r.threshold, action=ACTION_ENUM[r.action],
                            description=getattr(man, "description", "") or "")
            cal = getattr(man, "calibration", None)
            if cal is not None:
                d.calibration.CopyFrom(pb.Calibration(method=cal.method, dataset=cal.benign_set,
                                                      target_fpr=cal.target_fpr))
            for split, values in (getattr(man, "metrics", None) or {}).items():
                for name, v in values.items():
                    d.metrics[name if split == "test" else f"{split}.{name}"] = float(v)
            out.append(d)
        return out

    # validation --------------------------------------------------------------------
    async def _encode(self, field: str, *, text=None, messages=None, chat=False) -> Encoded:
        if messages is not None:
            msgs = []
            for j, m in enumerate(messages):
                if m.role not in ROLES:
                    raise RequestError("INVALID_ARGUMENT",
                                       f"{field}.messages[{j}].role: must be one of {ROLES}, got {m.role!r}")
                msgs.append({"role": m.role, "content": m.content})
            messages = msgs
        loop = asyncio.get_running_loop()
        try:
            enc = await loop.run_in_executor(self.tokenizer_pool,
                                             lambda: self.runner.encode(text=text, messages=messages, chat=chat))
        except InputTooLong as e:
            raise RequestError("RESOURCE_EXHAUSTED", f"{field}: {e}") from None
        except InputError as e:
            raise RequestError("INVALID_ARGUMENT", f"{field}: {e}") from None
        if len(enc) > self.settings.max_input_tokens:
            raise RequestError("RESOURCE_EXHAUSTED",
                               f"{field}: {len(enc)} tokens exceeds max_input_tokens={self.settings.max_input_tokens}")
        return enc

    def _sampling(self, request: pb.GenerateRequest) -> Sampling:
        limit = self.settings.max_new_tokens
        n = request.max_new_tokens or self.settings.default_max_new_tokens
        if n > limit:
            raise RequestError("INVALID_ARGUMENT", f"max_new_tokens: {n} exceeds this server's limit of {limit}")
        s = request.sampling
        for i, stop in enumerate(s.stop_sequences):
            if not stop:
                raise RequestError("INVALID_ARGUMENT", f"sampling.stop_sequences[{i}]: must not be empty")
        try:
            return Sampling(max_new_tokens=n,
                            temperature=s.temperature if s.HasField("temperature") else 0.0,
                            top_p=s.top_p if s.HasField("top_p") else 1.0,
                            top_k=s.top_k if s.HasField("top_k") else 0,
                            seed=s.seed if s.HasField("seed") else None,
                            stop=tuple(s.stop_sequences))
        except ValueError as e:
            name = str(e).split("value ", 1)[-1].split("=", 1)[0]
            raise RequestError("INVALID_ARGUMENT", f"sampling.{name}: {e}") from None

    def _steering(self, request: pb.GenerateRequest, policy: Policy):
        start, triggered = [], {}
        for i, s in enumerate(request.steering):
            f = f"steering[{i}]"
            if s.vector_id:
                raise RequestError("NOT_FOUND", f"{f}.vector_id: no steering vector {s.vector_id!r} is registered")
            if not s.vector:
                raise RequestError("INVALID_ARGUMENT", f"{f}: set vector_id or vector")
            if len(s.vector) != self.runner.d_model:
                raise RequestError("INVALID_ARGUMENT", f"{f}.vector: has {len(s.vector)} values, "
                                                       f"the model's hidden size is {self.runner.d_model}")
            if not all(math.isfinite(v) for v in s.vector):
                raise RequestError("INVALID_ARGUMENT", f"{f}.vector: values must be finite")
            try:
                point = self.runner.hooks.resolve(s.hook_point)
            except ValueError as e:
                raise RequestError("INVALID_ARGUMENT", f"{f}.hook_point: {e}") from None
            if s.kind == pb.STEERING_KIND_UNSPECIFIED:
                raise RequestError("INVALID_ARGUMENT", f"{f}.kind: must be STEERING_KIND_ADD or STEERING_KIND_ABLATE")
            if not math.isfinite(s.coefficient):
                raise RequestError("INVALID_ARGUMENT", f"{f}.coefficient: must be finite")
            import torch

            try:
                steering = Steering(point, "add" if s.kind == pb.STEERING_KIND_ADD else "ablate",
                                    torch.tensor(list(s.vector)), s.coefficient,
                                    POSITIONS.get(s.positions, "generated"),
                                    id="inline")
            except ValueError as e:
                raise RequestError("INVALID_ARGUMENT", f"{f}: {e}") from None
            if s.trigger_detector_id:
                if s.trigger_detector_id not in policy.by_id:
                    raise RequestError("NOT_FOUND",
                                       f"{f}.trigger_detector_id: unknown detector id {s.trigger_detector_id!r}")
                triggered.setdefault(s.trigger_detector_id, []).append(steering)
            else:
                start.append(steering)
        return start, triggered

    # RPCs --------------------------------------------------------------------------
    async def _unary(self, kind: str, fn: Callable, request, context):
        t0, outcome = time.monotonic(), "ok"
        try:
            if isinstance(request, _BadRequest):
                raise RequestError("INVALID_ARGUMENT", request.message)
            return await fn(request, context)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as e:
            outcome, code, message = _failure(kind, e)
            await context.abort(code, message)
        finally:
            self.metrics.observe_request(kind, outcome, time.monotonic() - t0)

    def _refuse_if_draining(self) -> None:
        if self.draining:
            raise RequestError("UNAVAILABLE", "server is shutting down; retry on another replica")

    async def Score(self, request, context):
        return await self._unary("score", self._score, request, context)

    async def _score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        self._refuse_if_draining()
        policy = self.policy
        rules = policy.select(list(request.detectors))
        if not request.inputs:
            raise RequestError("INVALID_ARGUMENT", "inputs: at least one input is required")
        if len(request.inputs) > self.settings.max_score_inputs:
            raise RequestError("RESOURCE_EXHAUSTED", f"inputs: {len(request.inputs)} inputs exceeds "
                                                     f"max_score_inputs={self.settings.max_score_inputs}")
        if policy.bank is None:
            raise RequestError("FAILED_PRECONDITION", "detectors: no detectors are loaded on this server")
        items = []
        for i, inp in enumerate(request.inputs):
            if bool(inp.text) == bool(inp.messages):
                raise RequestError("INVALID_ARGUMENT", f"inputs[{i}]: set exactly one of text or messages")
            if inp.text:
                # plain text is encoded the way the loaded probes were trained (usually a user turn)
                items.append(await self._encode(f"inputs[{i}].text", text=inp.text,
                                                chat=policy.bank.input_format == "chat"))
            else:
                items.append(await self._encode(f"inputs[{i}]", messages=list(inp.messages)))
        bank, results = await asyncio.wrap_future(self.scheduler.submit_score(items))
        if bank is not policy.bank:
            raise RequestError("UNAVAILABLE", "detectors were reloaded while scoring; retry")
        request_id = uuid.uuid4().hex
        md = request.metadata
        resp = pb.ScoreResponse(request_id=request_id)
        alerted = False
        for enc, res in zip(items, results):
            out = pb.ScoreResult(token_count=len(enc))
            for r in rules:
                score = float(res.probs[r.slot])
                flagged = score >= r.threshold
                dr = pb.DetectorResult(detector_id=r.id, score=score, flagged=flagged)
                if request.include_token_scores and res.token_probs is not None:
                    dr.token_scores.extend(res.token_probs[:, r.slot].tolist())
                out.detectors.append(dr)
                self.metrics.observe_score(r.id, score)
                if flagged:
                    alerted = True
                    tok = int(np.argmax(res.token_probs[:, r.slot])) if res.token_probs is not None else None
                    span = res.token_offsets[tok] if tok is not None and res.token_offsets else (None, None)
                    self.record(AlertRecord(request_id, r.id, r.version, score, r.threshold, "alert", token_index=tok,
                                            span_start=span[0], span_end=span[1],
                                            span_text=enc.text[span[0]:span[1]] if span[0] is not None else None,
                                            client_id=md.client_id or None))
                    self.metrics.record_alert(r.id, "alert")
            if request.include_token_scores:
                out.tokens.extend(enc.text[a:b] for a, b in enc.offsets[enc.score_from:])
            resp.results.append(out)
        n_tokens = sum(len(e) for e in items)
        self.metrics.add_tokens("prompt", n_tokens)
        self.record(RequestRecord(request_id, "score", self.runner.model_id, finished_at=datetime.now(UTC),
                                  **_metadata(md), prompt_tokens=n_tokens,
                                  prompt_text="\n\n".join(e.text for e in items), alerted=alerted))
        return resp

    async def Generate(self, request, context):
        t0, outcome = time.monotonic(), "ok"
        job, ended = None, False  # ended: the model thread said its last word for this request
        try:
            if isinstance(request, _BadRequest):
                raise RequestError("INVALID_ARGUMENT", request.message)
            self._refuse_if_draining()
            job = await self._generate_job(request, context)
            self.scheduler.submit_generate(job)
            while True:
                item = await job.queue.get()
                ended = item is None or isinstance(item, RequestError)
                if item is None:
                    break
                if isinstance(item, RequestError):
                    raise item
                for msg in item:
                    yield msg
            outcome = OUTCOME.get(job.reason, "internal")
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as e:
            outcome, code, message = _failure("generate", e)
            await context.abort(code, message)
        finally:
            # The stream can end before the model thread marks the job finished; only a request
            # that stopped listening before its end is a cancellation.
            if job is not None and not ended:
                job.cancel()  # client gone or deadline: the row leaves the batch before the next step
                outcome = "cancelled"
            self.metrics.observe_request("generate", outcome, time.monotonic() - t0)

    async def _generate_job(self, request: pb.GenerateRequest, context) -> _GenRequest:
        if bool(request.messages) == bool(request.prompt):
            raise RequestError("INVALID_ARGUMENT", "messages: set exactly one of messages or prompt")
        policy = self.policy
        rules = policy.override(policy.select(list(request.detectors)), [
            _Override(o.detector_id, o.threshold if o.HasField("threshold") else None, ACTION_NAMES.get(o.action))
            for o in request.policy_overrides])
        sampling = self._sampling(request)
        start, triggered = self._steering(request, policy)
        if request.prompt:
            enc = await self._encode("prompt", text=request.prompt)
        else:
            enc = await self._encode("messages", messages=list(request.messages))
        if len(enc) + sampling.max_new_tokens > self.runner.max_length:
            raise RequestError("RESOURCE_EXHAUSTED",
                               f"max_new_tokens: prompt ({len(enc)} tokens) + max_new_tokens "
                               f"({sampling.max_new_tokens})"
                               f" exceeds the model's context of {self.runner.max_length} tokens")
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        return _GenRequest(self, asyncio.get_running_loop(), encoded=enc, sampling=sampling, steering=start,
                           rules=rules, policy=policy, triggered=triggered, include_scores=request.include_token_scores,
                           metadata=request.metadata, deadline=deadline, prompt_text=enc.text)

    async def ListDetectors(self, request, context):
        async def run(req, ctx):
            return pb.ListDetectorsResponse(detectors=self.detectors_proto())

        return await self._unary("list_detectors", run, request, context)

    async def ReloadDetectors(self, request, context):
        return await self._unary("reload_detectors", self._reload, request, context)

    async def _reload(self, request, context):
        try:
            bank, policy = await asyncio.to_thread(self._load_detectors)
        except ValueError as e:  # PackError, policy errors: keep serving the old detectors
            raise RequestError("FAILED_PRECONDITION", f"reload failed, previous detectors kept: {e}") from None

        def swap():
            self.scheduler.bank, self.bank, self.policy = bank, bank, policy

        await asyncio.wrap_future(self.scheduler.call(swap))
        self.metrics.set_detectors(bank.ids if bank else [])
        return pb.ReloadDetectorsResponse(detectors=self.detectors_proto())

    async def GetAlerts(self, request, context):
        return await self._unary("get_alerts", self._get_alerts, request, context)

    async def _get_alerts(self, request: pb.GetAlertsRequest, context):
        if self.writer is None:
            raise RequestError("FAILED_PRECONDITION", "no database is configured")
        if request.page_size < 0:
            raise RequestError("INVALID_ARGUMENT", f"page_size: must be >= 0, got {request.page_size}")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, self.settings.max_page_size)
        since = request.start_time.ToDatetime(UTC) if request.HasField("start_time") else None
        until = request.end_time.ToDatetime(UTC) if request.HasField("end_time") else None
        if since and until and until <= since:
            raise RequestError("INVALID_ARGUMENT", "end_time: must be after start_time")

        def query():
            self.writer.flush(5.0)  # read your own writes
            return get_alerts(self.writer.engine, since=since, until=until,
                              detector_id=request.detector_id or None, request_id=request.request_id or None,
                              client_id=request.client_id or None, page_size=size,
                              page_token=request.page_token or None)

        try:
            rows, token = await asyncio.to_thread(query)
        except ValueError as e:
            raise RequestError("INVALID_ARGUMENT", f"page_token: {e}") from None
        resp = pb.GetAlertsResponse(next_page_token=token or "")
        for r in rows:
            ts = Timestamp()
            ts.FromDatetime(r.created_at if r.created_at.tzinfo else r.created_at.replace(tzinfo=UTC))
            resp.alerts.append(pb.Alert(alert_id=str(r.id), create_time=ts, request_id=r.request_id,
                                        detector_id=r.detector_id, detector_version=r.detector_version, score=r.score,
                                        threshold=r.threshold, action=ACTION_ENUM.get(r.action, 0),
                                        token_index=r.token_index or 0,
                                        metadata=pb.RequestMetadata(client_id=r.client_id or "")))
        return resp

    # plumbing ----------------------------------------------------------------------
    def handler(self) -> grpc.GenericRpcHandler:
        def unary(fn, req, resp):
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=_deserializer(req),
                                                       response_serializer=resp.SerializeToString)

        return grpc.method_handlers_generic_handler(SERVICE, {
            "Generate": grpc.unary_stream_rpc_method_handler(self.Generate,
                                                             request_deserializer=_deserializer(pb.GenerateRequest),
                                                             response_serializer=pb.GenerateResponse.SerializeToString),
            "Score": unary(self.Score, pb.ScoreRequest, pb.ScoreResponse),
            "ListDetectors": unary(self.ListDetectors, pb.ListDetectorsRequest, pb.ListDetectorsResponse),
            "GetAlerts": unary(self.GetAlerts, pb.GetAlertsRequest, pb.GetAlertsResponse),
            "ReloadDetectors": unary(self.ReloadDetectors, pb.ReloadDetectorsRequest, pb.ReloadDetectorsResponse),
        })


def _failure(kind: str, e: Exception) -> tuple[str, grpc.StatusCode, str]:
    """(outcome label, status, message) for an RPC that failed: the request's fault or ours."""
    if isinstance(e, RequestError):
        return e.code.lower(), getattr(grpc.StatusCode, e.code), e.message
    log.exception("%s failed", kind)
    return "internal", grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"


def _detector_record(d: Detector) -> DetectorRecord:
    man = d.manifest
    cal = getattr(man, "calibration", None)
    return DetectorRecord(d.id, d.version, getattr(man, "kind", "linear"), str(d.hook_point), float(d.threshold),
                          calibration=cal.model_dump() if cal is not None else {},
                          metrics=dict(getattr(man, "metrics", {}) or {}))


class Server:
    """A running sidecar: gRPC server + health + reflection + metrics endpoint + storage."""

    def __init__(self, settings: Settings, runner: ModelRunner, *, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.writer = StorageWriter(settings.db, text_policy=settings.text_policy,
                                    on_failure=lambda exc, n: self.metrics.record_storage_write_failure(n))
        self.writer.start()
        self.service = Service(settings, runner, metrics=self.metrics, writer=self.writer)
        opts = [("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0)]
        self.grpc = grpc.aio.server(options=opts)
        self.grpc.add_generic_rpc_handlers((self.service.handler(),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc)
        self.port = self.grpc.add_insecure_port(settings.bind)
        if self.port == 0:
            raise RuntimeError(f"could not bind gRPC to {settings.bind}")
        self.metrics_port: int | None = None
        self._http = None
        self._stopped = asyncio.Event()

    async def start(self) -> Server:
        self.service.scheduler.start()
        await self.grpc.start()
        if self.settings.metrics_port is not None:
            self._http, _ = self.metrics.start_http_server(self.settings.metrics_port,
                                                           addr=self.settings.metrics_host or self.settings.host)
            self.metrics_port = self._http.server_address[1]
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self

    async def stop(self, grace: float | None = None, drain: float = 0.0) -> None:
        """NOT_SERVING, refuse new work for `drain` s, let in-flight RPCs run `grace` s, flush storage."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.grace_period_s if grace is None else grace
        self.service.draining = True
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if drain:
            await asyncio.sleep(drain)
        await self.grpc.stop(grace)
        await asyncio.to_thread(self.service.scheduler.stop, 30.0)
        self.service.tokenizer_pool.shutdown(wait=False)
        await asyncio.to_thread(self.writer.close, 30.0)
        if self._http is not None:
            self._http.shutdown()

    async def wait(self) -> None:
        await self.grpc.wait_for_termination()


async def serve(settings: Settings, *, on_ready: Callable[[Server], None] | None = None,
                runner: ModelRunner | None = None) -> None:
    """Load the model, serve until SIGTERM/SIGINT, then shut down gracefully."""
    if runner is None:
        runner = await asyncio.to_thread(ModelRunner.load, settings.model, device=settings.device,
                                         dtype=settings.dtype)
    server = await Server(settings, runner).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(server)
    await stop.wait()
    log.info("shutting down: draining, then up to %.1f s for in-flight requests", settings.grace_period_s)
    await server.stop(drain=min(1.0, settings.grace_period_s))


__all__ = ["HookPoint", "Server", "Service", "serve", "bad_utf8_field", "pack_dirs"]

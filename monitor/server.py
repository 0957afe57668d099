"""The gRPC sidecar: `latentwatch.v1.Monitor` on grpc.aio, plus health and reflection.

Each RPC is thin: map the request to domain objects (`mapping`), check what the caller may
change (`admission`), bind the current detector snapshot, hand model work to the one model
thread (`scheduler`), and map results back. Errors become status codes in one place
(`interceptor`); records and metrics go through the decision trail (`trail`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import hashlib
import importlib.metadata
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

import grpc
from grpc_health.v1 import health_pb2
from pydantic import ValidationError

from latentwatch.v1 import monitor_pb2 as pb
from latentwatch.v1 import monitor_pb2_grpc as pb_grpc
from monitor import escalation, http, mapping, tls
from monitor.admission import apply_overrides, check_steering
from monitor.auth import Auth, alerts_client
from monitor.config import Settings, file_signature
from monitor.decisions import decide, verdict_effect
from monitor.domain import ACTIONS, END_OUTCOME
from monitor.enums import INTERVENTION
from monitor.errors import RequestError
from monitor.escalation import Verdict
from monitor.explain import explanation
from monitor.grpc_services import add_health_and_reflection
from monitor.interceptor import ErrorInterceptor, current
from monitor.limits import Admission
from monitor.metrics import Metrics
from monitor.runner import Encoded, InputError, InputTooLong, ModelRunner
from monitor.scheduler import Scheduler, pin_mmap_threshold
from monitor.snapshot import Snapshot, build_snapshot, detector_views
from monitor.storage import StorageUnavailable, StorageWriter, get_alerts, get_interventions
from monitor.streams import GenerateJob, GenerateStream
from monitor.trail import Trail, open_writer
from monitor.wire import add_service

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Monitor"]
DEFAULT_PAGE_SIZE = 100
_INTERVENTION_KIND = {number: name for name, number in INTERVENTION.items()}  # GetInterventions.kind


class MonitorService(pb_grpc.MonitorServicer):
    """The servicer plus what it owns: the current snapshot, the scheduler, the trail."""

    def __init__(self, settings: Settings, runner: ModelRunner, *, metrics: Metrics | None = None,
                 writer: StorageWriter | None = None, reload_settings: Callable[[], Settings] | None = None):
        self.settings, self.runner, self.writer = settings, runner, writer
        self.metrics = metrics or Metrics()
        self.trail = Trail(writer, self.metrics, runner.model_id)
        self.reload_settings = reload_settings or (lambda: settings)
        self.endpoints: dict[tuple[str, str], escalation.Endpoint] = {}  # second opinions, by (name, config)
        self.snapshot: Snapshot = build_snapshot(settings, runner)
        self._prepare(self.snapshot)
        self._install(self.snapshot)
        self.scheduler = Scheduler(runner, self.metrics, score_batch=settings.score.max_batch,
                                   score_wait_ms=settings.score.max_wait_ms, gen_batch=settings.generate.max_batch,
                                   gen_wait_ms=settings.generate.max_wait_ms,
                                   nice=settings.model_thread_nice)
        self.tokenizer_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="latentwatch-tokenize")
        self.draining = False
        self.admission = Admission(settings, self.metrics)
        self.streams: set[GenerateStream] = set()  # Generate requests in flight
        self._reloading = asyncio.Lock()
        self.policy_path, self._policy_seen = settings.policy, file_signature(settings.policy)

    def _install(self, snapshot: Snapshot) -> None:
        """Admit new requests with this snapshot; those in flight keep the one they were admitted with."""
        self.snapshot = snapshot
        self.metrics.set_detectors(snapshot.by_id)
        self.metrics.set_snapshot(snapshot.version)
        self.trail.detectors(snapshot)

    # RPCs ---------------------------------------------------------------------------
    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        self.gate("score", context)
        with self.admission.slot("score", mapping.client_id(request.metadata), context):
            return await self._score(request, context)

    async def _score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        snap = self.snapshot
        reported = snap.select(list(request.detectors))
        if not request.inputs:
            raise RequestError("INVALID_ARGUMENT", "inputs: at least one input is required")
        if len(request.inputs) > self.settings.max_score_inputs:
            raise RequestError("RESOURCE_EXHAUSTED", f"inputs: {len(request.inputs)} inputs exceeds "
                                                     f"max_score_inputs={self.settings.max_score_inputs}")
        if snap.bank is None:
            raise RequestError("FAILED_PRECONDITION", "detectors: no detectors are loaded on this server")
        items = [await self._score_input(i, inp, snap) for i, inp in enumerate(request.inputs)]
        ctx = mapping.context("score", request.metadata, snap)
        current.get().request_id = ctx.request_id
        rules = snap.rules_for(ctx.client_id or "", ctx.tags)
        self.trail.request(ctx)
        results = await asyncio.wrap_future(self.scheduler.submit_score(items, snap.bank))
        resp = pb.ScoreResponse(request_id=ctx.request_id, snapshot_version=snap.version)
        alerted: list[str] = []
        for i, (enc, res) in enumerate(zip(items, results)):
            # every rule, reported or not; Score reads no completion, and cannot block or steer: those alert
            decisions = decide(rules, res.probs, frozenset(), 0, len(enc) - enc.score_from)
            for d in decisions:
                tok = int(res.token_probs[:, d.rule.slot].argmax())
                a, b = res.token_offsets[tok] if res.token_offsets else (None, None)
                why = explanation(snap.bank, d.rule.slot, res.token_probs, 0,
                                  lambda j, e=enc: e.token_text(e.score_from + j), res.latents)
                effect, kw = d.rule.action, {}
                if effect == "escalate":
                    verdict = await self.escalate(snap, d.rule, mapping.input_text(request.inputs[i]))
                    effect, outcome = verdict_effect(d.rule, verdict)
                    kw = {"verdict": verdict, "outcome": outcome}
                effect = "alert" if effect in ("block", "steer") else effect
                self.trail.decision(ctx, replace(d, token_index=tok, steering=()), why, effect=effect, input_index=i,
                                    span=(a, b, enc.text[a:b] if a is not None else None), **kw)
                alerted += [enc.text] if effect is not None and ACTIONS[effect].records_alert else []
            for r in reported:
                self.metrics.observe_score(r.id, float(res.probs[r.slot]))
            resp.results.append(mapping.score_result(enc, res, reported, request.include_token_scores))
        n_tokens = sum(len(e) for e in items)
        self.metrics.add_tokens("prompt", n_tokens)
        texts = alerted if self.settings.text_policy == "alerts_only" else [e.text for e in items]
        self.trail.request(ctx, finished_at=datetime.now(UTC), prompt_tokens=n_tokens,
                           prompt_text="\n\n".join(texts) or None, alerted=bool(alerted))
        return resp

    async def Generate(self, request: pb.GenerateRequest, context):
        self.gate("generate", context)
        with self.admission.slot("generate", mapping.client_id(request.metadata), context):
            async for msg in self._generate(request, context):
                yield msg

    async def _generate(self, request: pb.GenerateRequest, context):
        if bool(request.messages) == bool(request.prompt):
            raise RequestError("INVALID_ARGUMENT", "messages: set exactly one of messages or prompt")
        snap = self.snapshot
        if snap.bank is None and not self.settings.serve_unmonitored:
            raise RequestError("FAILED_PRECONDITION", "detectors: none are loaded, and this server does not generate "
                                                      "unmonitored; load a pack (serve_unmonitored is for benchmarks)")
        shown = {r.detector for r in snap.select(list(request.detectors))}
        client = mapping.client_id(request.metadata)
        overrides = mapping.overrides(request)
        tags = dict(request.metadata.tags)
        rules = [r for r in apply_overrides(snap, client, overrides) if r.applies_to(client, tags)]
        sampling = mapping.sampling(request, self.settings)
        steering = mapping.client_steering(request, self.runner, snap)
        check_steering(snap, client, steering)
        if request.prompt:
            enc = await self._encode("prompt", text=request.prompt)
        else:
            enc = await self._encode("messages", messages=mapping.messages(request.messages, "messages"))
        if len(enc) + sampling.max_new_tokens > self.runner.max_length:
            raise RequestError("RESOURCE_EXHAUSTED", f"max_new_tokens: prompt ({len(enc)} tokens) + max_new_tokens "
                                                     f"({sampling.max_new_tokens}) exceeds the model's context of "
                                                     f"{self.runner.max_length} tokens")
        remaining = context.time_remaining()
        self.admission.check_deadline("generate", remaining)
        ctx = mapping.context("generate", request.metadata, snap)
        current.get().request_id = ctx.request_id
        reported = [r for r in detector_views(rules) if r.detector in shown]
        stream = GenerateStream(ctx, self.trail, encoded=enc, reported=reported,
                                include_scores=request.include_token_scores, loop=asyncio.get_running_loop(),
                                bank=snap.bank, decode=self.runner.tokenizer.decode,
                                request_text=request.prompt or mapping.transcript(request.messages),
                                escalate=lambda rule, text: self.escalate(snap, rule, text),
                                resubmit=self.scheduler.submit_generate)
        job = GenerateJob(enc, sampling, snap, rules, steering,
                          time.monotonic() + remaining if remaining is not None else None, stream.deliver)
        stream.job = job
        self.trail.request(ctx, prompt_tokens=len(enc), prompt_text=enc.text)  # the row exists from admission
        admitted = self.trail.overrides(ctx, overrides) + self.trail.client_steering(ctx, steering)
        self.scheduler.submit_generate(job)
        self.streams.add(stream)
        try:
            for rec in admitted:
                yield pb.GenerateResponse(intervention=mapping.intervention(rec, stream.md))
            while (item := await stream.queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                for msg in item:
                    yield msg
            current.get().outcome = END_OUTCOME.get(stream.reason, "internal")
        finally:
            self.streams.discard(stream)
            stream.close()

    async def ListDetectors(self, request, context) -> pb.ListDetectorsResponse:
        snap = self.snapshot
        return pb.ListDetectorsResponse(detectors=mapping.detectors(snap), snapshot_version=snap.version)

    async def ReloadDetectors(self, request, context) -> pb.ReloadDetectorsResponse:
        snap = await self.reload("ReloadDetectors")
        return pb.ReloadDetectorsResponse(detectors=mapping.detectors(snap), snapshot_version=snap.version)

    async def reload(self, why: str) -> Snapshot:
        """Re-read the configuration, packs and policy file into a new snapshot and swap it in; when
        anything is bad, the running snapshot stays (FAILED_PRECONDITION naming the problem)."""
        async with self._reloading:
            try:
                settings = await asyncio.to_thread(self.reload_settings)
                snap = await asyncio.to_thread(build_snapshot, settings, self.runner)
                self._prepare(snap)
            except (ValidationError, ValueError) as e:
                self.metrics.record_policy_reload(False)
                if isinstance(e, ValidationError):  # the settings themselves
                    loc = ".".join(map(str, e.errors()[0]["loc"]))
                    e = f"configuration has {e.error_count()} error(s), first at {loc}"
                log.warning("reload (%s) failed, the running snapshot %s stays in force: %s", why,
                            self.snapshot.version, e)
                raise RequestError("FAILED_PRECONDITION", f"reload failed, previous detectors kept: {e}") from None
            self.metrics.record_policy_reload(True)
            if snap.version != self.snapshot.version:
                log.info("reload (%s): snapshot %s (policy %s)", why, snap.version, snap.policy_version or "none")
            self._install(snap)
            self.policy_path, self._policy_seen = settings.policy, file_signature(settings.policy)
            return snap

    async def watch_policy(self, every_s: float = 1.0) -> None:
        """Reload when the policy file changes (its inode, size or mtime); a bad version is logged,
        counted and leaves the running policy in force until the file changes again."""
        while True:
            await asyncio.sleep(every_s)
            path = self.policy_path
            if path is not None and file_signature(path) != self._policy_seen:
                self._policy_seen = file_signature(path)
                with contextlib.suppress(RequestError):
                    await self.reload(f"{path} changed")

    def _prepare(self, snap: Snapshot) -> None:
        """Make the snapshot's escalation endpoints before it admits anything: a missing API key
        variable or a bad CA file fails the load, not a request. Endpoints are kept per (name,
        config), so requests admitted under an older snapshot still reach theirs."""
        for name, cfg in snap.escalations.items():
            key = (name, cfg.model_dump_json())
            if key not in self.endpoints:
                try:
                    self.endpoints[key] = escalation.endpoint(name, cfg)
                except ValueError as e:
                    raise ValueError(f"policy escalations.{name}: {e}") from None

    async def escalate(self, snap: Snapshot, rule, text: str) -> Verdict:
        """Ask `rule`'s second opinion (its endpoint is made when its snapshot was installed)."""
        name = rule.escalate.endpoint
        verdict = await self.endpoints[(name, snap.escalations[name].model_dump_json())].check(text)
        self.metrics.record_escalation(name, verdict.flagged, verdict.latency_s)
        return verdict

    async def GetAlerts(self, request: pb.GetAlertsRequest, context) -> pb.GetAlertsResponse:
        rows, token = await self._page(request, get_alerts, "alert")
        return pb.GetAlertsResponse(alerts=[mapping.alert(r) for r in rows], next_page_token=token or "")

    async def GetInterventions(self, request: pb.GetInterventionsRequest, context) -> pb.GetInterventionsResponse:
        if request.kind and request.kind not in _INTERVENTION_KIND:
            raise RequestError("INVALID_ARGUMENT", f"kind: unknown enum value {request.kind}")
        rows, token = await self._page(request, get_interventions, "decision trail", rule_id=request.rule_id or None,
                                       kind=_INTERVENTION_KIND.get(request.kind))
        return pb.GetInterventionsResponse(
            interventions=[mapping.intervention(r, pb.RequestMetadata(client_id=r.client_id or "")) for r in rows],
            next_page_token=token or "")

    async def GetServerInfo(self, request, context) -> pb.GetServerInfoResponse:
        snap, r = self.snapshot, self.runner
        fp = hashlib.sha256(r.fingerprint.model_dump_json().encode()).hexdigest()
        return pb.GetServerInfoResponse(model_id=r.model_id, model_fingerprint=fp, device=str(r.device),
                                        dtype=str(r.dtype).removeprefix("torch."), snapshot_version=snap.version,
                                        detectors=mapping.detectors(snap),
                                        server_version=importlib.metadata.version("latentwatch"))

    # helpers ------------------------------------------------------------------------
    def cut_streams(self) -> None:
        """Shutdown: cancel every generation still running; each ends UNAVAILABLE with its records written."""
        for stream in list(self.streams):
            stream.cut_by_shutdown = True
            stream.job.cancel()

    def gate(self, kind: str, context) -> None:
        """Refuse new work of `kind` that this server cannot take now: shutting down, the alert
        journal full (fail_closed: no alert that is not kept), or the kind's queue full. The
        interceptor asks before the request is read; Score and Generate ask again."""
        if self.draining:
            raise RequestError("UNAVAILABLE", "server is shutting down; retry on another replica")
        if self.writer is not None and not self.writer.accepting:
            raise RequestError("UNAVAILABLE", self.writer.refusal)
        self.admission.check(kind, context)

    async def _page(self, request, query: Callable[..., tuple[list, str | None]], what: str, **filters):
        """One page of GetAlerts or GetInterventions: check the page size and time range, narrow the
        client id (an `audit` token sees its own client's records only), then run `query` after a
        flush (read your own writes), off the event loop."""
        if self.writer is None:
            raise RequestError("FAILED_PRECONDITION", "no database is configured")
        if request.page_size < 0:
            raise RequestError("INVALID_ARGUMENT", f"page_size: must be >= 0, got {request.page_size}")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, self.settings.max_page_size)
        since = mapping.when(request.start_time, "start_time") if request.HasField("start_time") else None
        until = mapping.when(request.end_time, "end_time") if request.HasField("end_time") else None
        if since and until and until <= since:
            raise RequestError("INVALID_ARGUMENT", "end_time: must be after start_time")
        client = alerts_client(request.client_id)

        def run():
            self.writer.flush(5.0)
            return query(self.writer.engine, since=since, until=until, detector_id=request.detector_id or None,
                         request_id=request.request_id or None, client_id=client or None, page_size=size,
                         page_token=request.page_token or None, **filters)

        try:
            return await asyncio.to_thread(run)
        except ValueError as e:  # the query's own short messages (page_token, time range)
            raise RequestError("INVALID_ARGUMENT", str(e)) from None
        except StorageUnavailable:
            raise RequestError("UNAVAILABLE", f"the {what} database is unavailable; retry later") from None

    async def _score_input(self, i: int, inp: pb.ScoreInput, snap: Snapshot) -> Encoded:
        if bool(inp.text) == bool(inp.messages):
            raise RequestError("INVALID_ARGUMENT", f"inputs[{i}]: set exactly one of text or messages")
        if inp.text:  # plain text is encoded the way the snapshot's probes were trained (usually a user turn)
            return await self._encode(f"inputs[{i}].text", text=inp.text, chat=snap.input_format == "chat")
        return await self._encode(f"inputs[{i}]", messages=mapping.messages(inp.messages, f"inputs[{i}].messages"))

    async def _encode(self, field: str, *, text=None, messages=None, chat=False) -> Encoded:
        size = len(text.encode()) if text is not None else sum(len(m["content"].encode()) for m in messages)
        if size > self.settings.max_input_bytes:  # before tokenizing: a huge input never holds up small ones
            raise RequestError("RESOURCE_EXHAUSTED",
                               f"{field}: {size} bytes exceeds max_input_bytes={self.settings.max_input_bytes}")
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


class Server:
    """A running sidecar: gRPC server + health + reflection + metrics endpoint + storage."""

    def __init__(self, settings: Settings, runner: ModelRunner, *, metrics: Metrics | None = None,
                 reload_settings: Callable[[], Settings] | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.auth = Auth(settings.auth_tokens, self.metrics) if settings.auth_tokens is not None else None
        self.writer = open_writer(settings, self.metrics)  # replays what the journal holds first
        self.service = MonitorService(settings, runner, metrics=self.metrics, writer=self.writer,
                                      reload_settings=reload_settings)
        opts = [("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0)]
        interceptor = ErrorInterceptor(self.metrics, (SERVICE.full_name,), self.auth.check if self.auth else None,
                                       gate=self.service.gate, gated=("generate", "score"))
        self.grpc = grpc.aio.server(options=opts, interceptors=[interceptor])
        add_service(self.service, self.grpc, SERVICE)
        self.health = add_health_and_reflection(self.grpc, [SERVICE.full_name])
        self.port = tls.add_port(self.grpc, settings)  # TLS (mTLS) when settings.tls_cert is set
        if self.port == 0:
            raise RuntimeError(f"could not bind gRPC to {settings.bind}")
        self.metrics_port: int | None = None
        self._http = None
        self._stopped = asyncio.Event()
        self._tasks: set[asyncio.Future] = set()  # the policy watcher, SIGHUP reloads

    async def start(self) -> Server:
        self.service.scheduler.start()
        await self.grpc.start()
        if self.settings.metrics_port is not None:
            self._http = http.start(self.metrics, self.settings.metrics_host or self.settings.host,
                                    self.settings.metrics_port, self.not_ready)
            self.metrics_port = self._http.server_address[1]
        for name in ("", SERVICE.full_name):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        loop = asyncio.get_running_loop()
        self.writer.on_accepting = lambda _: loop.call_soon_threadsafe(asyncio.ensure_future, self._follow_journal())
        if self.settings.policy is not None:
            self._tasks.add(asyncio.ensure_future(self.service.watch_policy()))
        return self

    def on_sighup(self) -> None:
        """Certificates (with TLS) and the packs and policy are re-read; a bad policy keeps the running one."""
        if self.settings.tls_cert is not None:
            tls.reload_certificates()
        task = asyncio.ensure_future(self.service.reload("SIGHUP"))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # failures are logged and counted
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow_journal(self) -> None:
        """Health follows the alert journal: NOT_SERVING while it is full (fail_closed), SERVING
        once it has room again, unless shutting down."""
        status = health_pb2.HealthCheckResponse.SERVING if self.writer.accepting else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE.full_name):
            if not self._stopped.is_set():
                await self.health.set(name, status)

    async def stop(self, drain: float | None = None, linger: float = 0.0) -> None:
        """Shut down without losing work: NOT_SERVING and refuse new requests at once; let requests
        in flight finish for up to `drain` s (default `drain_seconds`), staying NOT_SERVING at
        least `linger` s so load balancers notice; cancel what is left (each stream ends
        UNAVAILABLE, its records written); then stop the model thread and flush storage."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        for task in self._tasks:
            task.cancel()
        drain = self.settings.drain_seconds if drain is None else drain
        service, t0 = self.service, time.monotonic()
        service.draining = True
        for name in ("", SERVICE.full_name):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        while service.admission.total and time.monotonic() < t0 + drain:
            await asyncio.sleep(0.02)
        if service.admission.total:
            log.warning("drain of %.1f s over: cancelling %d requests in flight", drain, service.admission.total)
            service.cut_streams()
            while service.admission.total and time.monotonic() < t0 + drain + 10:
                await asyncio.sleep(0.02)
        await asyncio.sleep(max(0.0, t0 + linger - time.monotonic()))
        await self.grpc.stop(1.0)
        await asyncio.to_thread(service.scheduler.stop, 30.0)
        await asyncio.sleep(0)  # let the model thread's last deliveries run on this loop
        service.tokenizer_pool.shutdown(wait=False)
        await asyncio.to_thread(self.writer.close, 30.0)
        await asyncio.gather(*(ep.close() for ep in service.endpoints.values()))
        if self._http is not None:
            self._http.shutdown()

    def not_ready(self) -> str | None:
        """Why this replica should get no traffic now, or None (`/readyz`)."""
        if self._stopped.is_set() or self.service.draining:
            return "shutting down"
        if not self.writer.accepting:
            return "the alert journal is full"
        if self.service.snapshot.bank is None:
            return "no detectors are loaded"
        return None

    async def wait(self) -> None:
        await self.grpc.wait_for_termination()


async def serve(settings: Settings, *, on_ready: Callable[[Server], None] | None = None,
                runner: ModelRunner | None = None, reload_settings: Callable[[], Settings] | None = None) -> None:
    """Load the model, serve until SIGTERM/SIGINT, then shut down gracefully."""
    pin_mmap_threshold()  # before the model's tensors are allocated
    if runner is None:
        runner = await asyncio.to_thread(ModelRunner.load, settings.model, device=settings.device,
                                         dtype=settings.dtype)
    server = await Server(settings, runner, reload_settings=reload_settings).start()
    # What startup made (model, modules: ~400k objects for SmolLM2) lives as long as the process:
    # out of the collector's reach, a full collection no longer stalls the event loop ~150 ms. The
    # second collection counts the (now empty) old generation afresh: CPython runs a full one only
    # once a quarter as many objects as that count have aged into it, and with the stale count of
    # ~400k a few cycles per RPC (grpc's own) would pile up for an hour before one ran.
    gc.collect()
    gc.freeze()
    gc.collect()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: server.on_sighup())
    if on_ready is not None:
        on_ready(server)
    await stop.wait()
    log.info("shutting down: up to %.1f s for requests in flight", settings.drain_seconds)
    await server.stop(linger=min(1.0, settings.drain_seconds))


__all__ = ["MonitorService", "Server", "serve"]

"""A Generate request in flight: decided on the model thread, recorded and streamed on the loop.

`GenerateJob` is what the scheduler runs: after each token it asks `decide` what the request's
rules say and returns the effect on the model (stop, steer) at once. Everything else — alert
and intervention records, metrics, stream events — happens in `GenerateStream` on the event
loop, through callbacks that run whether or not the client is still listening, so no alert is
lost to a client that went away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np

from latentwatch.v1 import monitor_pb2 as pb
from monitor import mapping
from monitor.admission import ClientSteering
from monitor.bank import DetectorBank
from monitor.decisions import Decision, Reaction, decide, reaction
from monitor.domain import END_OUTCOME, FINISH_REASONS
from monitor.enums import FINISH
from monitor.errors import RequestError
from monitor.explain import explanation
from monitor.generation import Sampling, TokenEvent
from monitor.runner import Encoded
from monitor.scheduler import GenJob
from monitor.snapshot import Rule, Snapshot
from monitor.trail import RequestContext, Trail

log = logging.getLogger(__name__)


class GenerateJob(GenJob):
    """The model thread's side of a request: hooks called between forward steps."""

    def __init__(self, encoded: Encoded, sampling: Sampling, snapshot: Snapshot, rules: list[Rule],
                 steering: list[ClientSteering], deadline: float | None, deliver: Callable[[tuple], None]):
        super().__init__(encoded, sampling, [c.steering for c in steering if c.trigger is None], deadline,
                         snapshot.bank)
        self.rules = rules if self.bank is not None else []
        self.triggered: dict[str, list] = {}
        for c in steering:
            if c.trigger is not None:
                self.triggered.setdefault(c.trigger, []).append(c.steering)
        self.fired: frozenset[str] = frozenset()
        self.deliver = deliver

    def on_token(self, ev: TokenEvent) -> Reaction:
        decisions = decide(self.rules, ev.aggregate, self.fired, ev.index, self.triggered) if self.rules else []
        self.fired |= {d.rule.id for d in decisions}
        self.deliver(("token", ev, decisions))
        return reaction(decisions)

    def on_end(self, reason: str, error: BaseException | None = None) -> None:
        self.deliver(("end", reason, error))


class GenerateStream:
    """The event loop's side: turns what the model thread delivers into records and stream events.

    For alert explanations it keeps every scored token's probabilities (with the bank's
    `explain_tokens`) and the generated token ids; `decode` gives a token id list's text.
    """

    def __init__(self, ctx: RequestContext, trail: Trail, *, encoded: Encoded, reported: list[Rule],
                 include_scores: bool, loop: asyncio.AbstractEventLoop, bank: DetectorBank | None,
                 decode: Callable[[list[int]], str]):
        self.ctx, self.trail, self.encoded, self.loop = ctx, trail, encoded, loop
        self.reported, self.include_scores = reported, include_scores
        self.bank, self.decode = bank, decode
        self.scores: list[np.ndarray] = []  # [tokens, detectors] blocks, from the first scored prompt token on
        self.ids: list[int] = []  # generated token ids
        self.md = mapping.metadata(ctx)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.alerts: list[pb.Alert] = []
        self.text, self.completion_tokens = "", 0
        self.aggregate: np.ndarray | None = None
        self.reason: str | None = None
        self.started = time.monotonic()
        self.last_token: float | None = None
        self.cut_by_shutdown = False  # set when shutdown cancels the request

    def deliver(self, item: tuple) -> None:
        """Called on the model thread; the work happens on the loop."""
        try:
            self.loop.call_soon_threadsafe(self._handle, item)
        except RuntimeError:  # the loop is closed: the process is exiting
            pass

    def _handle(self, item: tuple) -> None:
        try:
            if item[0] == "token":
                self._token(item[1], item[2])
            else:
                self._end(item[1], item[2])
        except RequestError as e:  # the alert journal is full: no event the trail could not keep
            self.queue.put_nowait(e)
            self.queue.put_nowait(None)
        except Exception:  # noqa: BLE001 - the stream must end, not hang until its deadline
            log.exception("generate stream failed")
            self.queue.put_nowait(RuntimeError("generate stream failed"))
            self.queue.put_nowait(None)

    def push_admission(self, messages: list[pb.GenerateResponse]) -> None:
        self.queue.put_nowait(messages)

    def _token(self, ev: TokenEvent, decisions: list[Decision]) -> None:
        m = self.trail.metrics
        now = time.monotonic()
        if self.last_token is None:
            m.observe_time_to_first_token(now - self.started)
        else:
            m.observe_inter_token_latency(now - self.last_token)
        self.last_token = now
        out: list[pb.GenerateResponse] = []
        if len(ev.aggregate):
            self.aggregate = ev.aggregate
            for r in self.reported:
                m.observe_score(r.id, mapping.finite(ev.token_probs[r.slot]))
        self.ids.append(ev.token_id)
        if ev.prompt_probs is not None:  # the first token: the prompt's scored tokens, the last one read
            self.scores.append(ev.prompt_probs.copy())  # (copies: views would keep the whole step's array)
        elif self.scores:  # later ones: the token this step read (the one before ev's)
            self.scores.append(ev.token_probs[None].copy())
        blocked = False
        scores = np.concatenate(self.scores) if decisions and self.scores else None
        for d in decisions:
            why = explanation(self.bank, d.rule.slot, scores, self.encoded.score_from, self._token_text, ev.latents)
            alert, interventions = self.trail.decision(self.ctx, d, why)
            msg = mapping.alert(alert, self.md)
            self.alerts.append(msg)
            out.append(pb.GenerateResponse(alert=msg))
            out += [pb.GenerateResponse(intervention=mapping.intervention(i, self.md)) for i in interventions]
            blocked = blocked or d.action.stops
        if not blocked:
            tok = pb.TokenEvent(index=ev.index, token_id=ev.token_id, text=ev.text)
            if self.include_scores:
                for r in self.reported:
                    tok.scores[r.id] = mapping.finite(ev.token_probs[r.slot])
            out.append(pb.GenerateResponse(token=tok))
            self.text += ev.text
            self.completion_tokens += 1
        self.queue.put_nowait(out)

    def _token_text(self, position: int) -> str:
        """Positions count the prompt's tokens first, then the generated ones."""
        n = len(self.encoded)
        return self.encoded.token_text(position) if position < n else self.decode([self.ids[position - n]])

    def _end(self, reason: str, error: BaseException | None) -> None:
        self.reason = reason
        m, outcome = self.trail.metrics, END_OUTCOME.get(reason, "internal")
        m.add_tokens("prompt", len(self.encoded), outcome)
        m.add_tokens("completion", self.completion_tokens, outcome)
        self.trail.request(self.ctx, finished_at=datetime.now(UTC), finish_reason=reason,
                           prompt_tokens=len(self.encoded), completion_tokens=self.completion_tokens,
                           prompt_text=self.encoded.text, completion_text=self.text, alerted=bool(self.alerts))
        if reason in FINISH_REASONS:
            summary = pb.GenerateSummary(
                request_id=self.ctx.request_id, finish_reason=FINISH[reason], text=self.text,
                alerts=self.alerts, snapshot_version=self.ctx.snapshot_version,
                usage=pb.Usage(prompt_tokens=len(self.encoded), completion_tokens=self.completion_tokens))
            if self.aggregate is not None:
                for r in self.reported:
                    score = mapping.finite(self.aggregate[r.slot])
                    summary.scores.append(pb.DetectorResult(detector_id=r.id, score=score,
                                                            flagged=score >= r.threshold))
            self.queue.put_nowait([pb.GenerateResponse(summary=summary)])
        elif reason == "error":
            self.queue.put_nowait(RuntimeError("generation failed"))
        elif reason == "cancelled" and self.cut_by_shutdown:
            self.queue.put_nowait(RequestError(
                "UNAVAILABLE", f"server shut down before this generation finished ({self.completion_tokens} tokens "
                               "streamed); retry on another replica"))
        elif reason == "deadline_exceeded":
            self.queue.put_nowait(RequestError("DEADLINE_EXCEEDED", "deadline exceeded during generation"))
        self.queue.put_nowait(None)

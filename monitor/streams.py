"""A Generate request in flight: decided on the model thread, recorded and streamed on the loop.

`GenerateJob` is what the scheduler runs: after each token it asks `decide` what the request's
rules say and returns the effect on the model (stop, steer) at once. Everything else — alert
and intervention records, metrics, stream events — happens in `GenerateStream` on the event
loop, through callbacks that run whether or not the client is still listening, so no alert is
lost to a client that went away.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np

from latentwatch.v1 import monitor_pb2 as pb
from monitor import mapping
from monitor.admission import ClientSteering
from monitor.bank import DetectorBank
from monitor.decisions import Decision, Reaction, decide, reaction, verdict_effect
from monitor.domain import END_OUTCOME, FINISH_REASONS
from monitor.enums import FINISH
from monitor.errors import RequestError
from monitor.escalation import Verdict
from monitor.explain import explanation
from monitor.generation import Sampling, TokenEvent
from monitor.runner import Encoded
from monitor.scheduler import GenJob
from monitor.snapshot import Rule, Snapshot
from monitor.steering import Steering
from monitor.trail import RequestContext, Trail

log = logging.getLogger(__name__)


class GenerateJob(GenJob):
    """The model thread's side of a request: hooks called between forward steps.

    `act` (any thread) queues a reaction that arrived later, an escalation's verdict: it takes
    effect after the next token, as a decision's own would have.

    Steering that a decision on the prompt switches on (event 0) must shape the first token too,
    which the prompt's own pass has already sampled: the job then ends at once with `restart` set,
    and `again()` is the same request run anew with that steering on (`from_first_token`), its
    fired rules carried over. The stream never shows the discarded token.
    """

    def __init__(self, encoded: Encoded, sampling: Sampling, snapshot: Snapshot, rules: list[Rule],
                 steering: list[ClientSteering], deadline: float | None, deliver: Callable[[tuple], None],
                 fired: frozenset[str] = frozenset()):
        super().__init__(encoded, sampling, [c.steering for c in steering if c.trigger is None], deadline,
                         snapshot.bank)
        self.snapshot, self.client_steering = snapshot, steering
        self.restart: list[Steering] | None = None
        self.rules = rules if self.bank is not None else []
        self.prompt_tokens = len(encoded) - encoded.score_from
        self.triggered: dict[str, list] = {}  # detector id -> client steering it switches on
        for c in steering:
            if c.trigger is not None:
                self.triggered.setdefault(c.trigger, []).append(c.steering)
        self.fired = fired
        self.deliver = deliver
        self.later: collections.deque[Reaction] = collections.deque()

    def act(self, r: Reaction) -> None:
        self.later.append(r)

    def on_token(self, ev: TokenEvent) -> Reaction:
        decisions = decide(self.rules, ev.aggregate, self.fired, ev.index, self.prompt_tokens) if self.rules else []
        self.fired |= {d.rule.id for d in decisions}
        for i, d in enumerate(decisions):  # client steering starts when an acting rule on its detector fires
            if d.action.acts and (extra := self.triggered.pop(d.rule.detector, None)):
                decisions[i] = replace(d, steering=d.steering + tuple(extra))
        out = reaction(decisions)
        while self.later:
            out = out.merge(self.later.popleft())
        if ev.index == 0 and out.steer and not out.block:
            self.restart = [from_first_token(st) for st in out.steer]
            out = Reaction(block=True)
        self.deliver(("token", ev, decisions))
        return out

    def again(self) -> GenerateJob:
        """The request run anew with the steering `restart` holds (see the class docstring)."""
        steering = [c for c in self.client_steering if c.trigger is None]
        steering += [ClientSteering(st) for st in self.restart]
        steering += [ClientSteering(st, trigger) for trigger, items in self.triggered.items() for st in items]
        return GenerateJob(self.encoded, self.sampling, self.snapshot, self.rules, steering, self.deadline,
                           self.deliver, self.fired)

    def on_end(self, reason: str, error: BaseException | None = None) -> None:
        self.deliver(("end", reason, error))


def from_first_token(st: Steering) -> Steering:
    """Steering for the generated tokens, moved to every position: the first generated token is
    sampled at the prompt's last one. Steering asked for the prompt (or all of it) stays as it is."""
    return replace(st, positions="all") if st.positions == "generated" else st


class GenerateStream:
    """The event loop's side: turns what the model thread delivers into records and stream events.

    For alert explanations it keeps every scored token's probabilities (with the bank's
    `explain_tokens`) and the generated token ids; `decode` gives a token id list's text.

    An escalation holds the stream: what the model thread delivers meanwhile waits until the
    verdict is in (at most the endpoint's timeout), then is streamed, or dropped when the verdict
    blocks. `escalate(rule, text)` asks the rule's endpoint; `job` receives verdict reactions.
    """

    def __init__(self, ctx: RequestContext, trail: Trail, *, encoded: Encoded, reported: list[Rule],
                 include_scores: bool, loop: asyncio.AbstractEventLoop, bank: DetectorBank | None,
                 decode: Callable[[list[int]], str], request_text: str = "",
                 escalate: Callable[[Rule, str], Awaitable[Verdict]] | None = None,
                 resubmit: Callable[[GenerateJob], None] | None = None):
        self.ctx, self.trail, self.encoded, self.loop = ctx, trail, encoded, loop
        self.reported, self.include_scores = reported, include_scores
        self.bank, self.decode = bank, decode
        self.request_text, self.escalate, self.resubmit = request_text, escalate, resubmit
        self.job: GenerateJob | None = None  # the job now running the request (a restart replaces it)
        self.closed = False  # the RPC is over: nothing is restarted
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
        self.pending = 0  # escalations awaiting a verdict
        self.held: list[tuple] = []  # deliveries held meanwhile
        self.blocked_by: Rule | None = None  # the rule whose block ended the stream (its refusal is returned)

    def close(self) -> None:
        """The RPC is over: its job leaves the batch before the next step (a no-op once it ended), and
        the two let go of each other. The job calls back into the stream, so without this every request
        would be a reference cycle that only the cyclic GC frees, and in a large process that runs
        rarely: the server's memory grew by megabytes a minute under steady load."""
        self.closed = True
        if self.job is not None:
            self.job.cancel()
            self.job = None

    def deliver(self, item: tuple) -> None:
        """Called on the model thread; the work happens on the loop."""
        try:
            self.loop.call_soon_threadsafe(self._handle, item)
        except RuntimeError:  # the loop is closed: the process is exiting
            pass

    def _handle(self, item: tuple) -> None:
        if self.pending:
            self.held.append(item)
            return
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
        if self.blocked_by is not None:  # a verdict blocked: the model thread has not stopped yet
            return
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
                m.observe_score(r.detector, mapping.finite(ev.token_probs[r.slot]))
        self.ids.append(ev.token_id)
        if ev.prompt_probs is not None:  # the first token: the prompt's scored tokens, the last one read
            self.scores.append(ev.prompt_probs.copy())  # (copies: views would keep the whole step's array)
        elif self.scores:  # later ones: the token this step read (the one before ev's)
            self.scores.append(ev.token_probs[None].copy())
        blocked = False
        scores = np.concatenate(self.scores) if decisions and self.scores else None
        restart = self.job is not None and self.job.restart is not None
        for d in decisions:
            if d.rule.action == "escalate":
                self._ask(d, ev.latents, scores)
                continue
            why = explanation(self.bank, d.rule.slot, scores, self.encoded.score_from, self._token_text, ev.latents)
            if restart:  # its steering runs from the first token
                d = replace(d, steering=tuple(from_first_token(st) for st in d.steering))
            out += self._decided(d, why, steer_from=0 if restart else None)
            if d.action.stops:
                blocked, self.blocked_by = True, d.rule
        if restart:  # the token is discarded; the run that replaces it delivers the prompt's scores again
            self.scores, self.ids = [], []
        elif not blocked:
            tok = pb.TokenEvent(index=ev.index, token_id=ev.token_id, text=ev.text)
            if self.include_scores:
                for r in self.reported:
                    tok.scores[r.detector] = mapping.finite(ev.token_probs[r.slot])
            out.append(pb.GenerateResponse(token=tok))
            self.text += ev.text
            self.completion_tokens += 1
        self.queue.put_nowait(out)

    def _decided(self, d: Decision, why, **kw) -> list[pb.GenerateResponse]:
        """Record a decision; the events it streams (none for a shadow rule)."""
        alert, records = self.trail.decision(self.ctx, d, why, **kw)
        if d.rule.action == "shadow":
            return []
        out = []
        if alert is not None:
            msg = mapping.alert(alert, self.md)
            self.alerts.append(msg)
            out.append(pb.GenerateResponse(alert=msg))
        return out + [pb.GenerateResponse(intervention=mapping.intervention(i, self.md)) for i in records]

    def _ask(self, d: Decision, latents, scores) -> None:
        """Hold the stream and ask the rule's second opinion on the request (and the completion so far)."""
        why = explanation(self.bank, d.rule.slot, scores, self.encoded.score_from, self._token_text, latents)
        text = self.request_text
        if d.rule.escalate.include_completion and self.text:
            text += f"\n\n{self.text}"
        self.pending += 1
        task = self.loop.create_task(self.escalate(d.rule, text))
        task.add_done_callback(lambda t: self._verdict(d, why, t))

    def _verdict(self, d: Decision, why, task: asyncio.Task) -> None:
        """Act on the verdict as the rule says, then release (or drop) what was held."""
        self.pending -= 1
        try:
            verdict = task.result()
            effect, outcome = verdict_effect(d.rule, verdict)
            steering = d.rule.steering if effect == "steer" else ()
            out = self._decided(replace(d, steering=steering), why, effect=effect, verdict=verdict, outcome=outcome)
            if effect == "block":
                self.blocked_by = d.rule
            if effect in ("block", "steer") and self.job is not None:
                self.job.act(Reaction(block=effect == "block", steer=list(steering)))
            self.queue.put_nowait(out)
        except RequestError as e:  # as in _handle: the journal is full
            self.held.clear()
            self.queue.put_nowait(e)
            self.queue.put_nowait(None)
            return
        except Exception:  # noqa: BLE001 - as in _handle: end the stream, never hang it
            log.exception("escalation verdict failed")
            self.held.clear()
            self.queue.put_nowait(RuntimeError("generate stream failed"))
            self.queue.put_nowait(None)
            return
        held, self.held = self.held, []
        for item in held:
            if item[0] == "end" and self.blocked_by is not None:
                item = ("end", "blocked", None)
            self._handle(item)

    def _token_text(self, position: int) -> str:
        """Positions count the prompt's tokens first, then the generated ones."""
        n = len(self.encoded)
        return self.encoded.token_text(position) if position < n else self.decode([self.ids[position - n]])

    def _end(self, reason: str, error: BaseException | None) -> None:
        if self.job is not None and self.job.restart is not None and reason == "blocked" and not self.closed:
            self.job = self.job.again()
            try:
                self.resubmit(self.job)
                return
            except Exception:  # noqa: BLE001 - the scheduler closed (shutdown): the request ends here
                log.warning("request %s: could not restart with steering; it ends cancelled", self.ctx.request_id)
                reason = "cancelled"
                self.cut_by_shutdown = True
        if self.blocked_by is not None:  # a verdict's block, whatever the model thread saw last
            reason = "blocked"
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
                policy_version=self.ctx.policy_version,
                usage=pb.Usage(prompt_tokens=len(self.encoded), completion_tokens=self.completion_tokens))
            if self.aggregate is not None:
                for r in self.reported:
                    score = mapping.finite(self.aggregate[r.slot])
                    summary.scores.append(pb.DetectorResult(detector_id=r.detector, score=score,
                                                            flagged=score >= r.threshold))
            if reason == "blocked" and self.blocked_by is not None:
                summary.refusal = self.blocked_by.refusal
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

"""The scheduler batches concurrent work onto one model thread and drops cancelled rows at once."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

from monitor.bank import Detector, DetectorBank
from monitor.decisions import Reaction
from monitor.domain import HookPoint
from monitor.generation import Sampling
from monitor.metrics import Metrics
from monitor.scheduler import GenJob, Scheduler
from probes.kinds.base import ScoringHead
from tests.tiny import tiny_runner


def make(**kw):
    r = tiny_runner("llama")
    head = ScoringHead(torch.randn(r.d_model, 1) * 0.1, torch.zeros(1))
    bank = DetectorBank([Detector("d", "1", HookPoint.parse("blocks.1.resid_post"), head, aggregation="max")])
    m = Metrics(["d"])
    return r, bank, m, Scheduler(r, m, **kw).start()


def test_queued_score_jobs_are_merged_into_one_forward():
    r, bank, m, s = make(score_batch=8, score_wait_ms=500)
    futs = [s.submit_score([r.encode(f"text {i}")], bank) for i in range(6)]
    results = [f.result(30) for f in futs]
    s.stop(10)
    assert all(len(res) == 1 for res in results)
    assert m.value("latentwatch_forward_passes_total", {"kind": "score"}) == 1


class Counting(GenJob):
    def __init__(self, *a, cancel_after=None, **k):
        super().__init__(*a, **k)
        self.tokens, self.cancel_after, self.reason = 0, cancel_after, None

    def on_token(self, ev):
        self.tokens += 1
        if self.cancel_after is not None and self.tokens == self.cancel_after:
            self.cancel()
        return Reaction()

    def on_end(self, reason, error=None):
        self.reason = reason


def test_generations_share_steps_and_cancel_takes_effect_before_the_next_step():
    r, bank, m, s = make(gen_batch=4, gen_wait_ms=500)
    jobs = [Counting(r.encode("hello"), Sampling(max_new_tokens=10)) for _ in range(3)]
    jobs.append(Counting(r.encode("bye"), Sampling(max_new_tokens=10), cancel_after=2))
    for j in jobs:
        s.submit_generate(j)
    for j in jobs:
        assert j.finished.wait(30)
    s.stop(10)
    assert [j.reason for j in jobs] == ["length"] * 3 + ["cancelled"]
    assert jobs[-1].tokens == 2 and jobs[-1].steps == 2
    assert m.value("latentwatch_forward_passes_total", {"kind": "prefill"}) == 1
    assert m.value("latentwatch_forward_passes_total", {"kind": "decode"}) == 9


class Submitting(Counting):
    """Submits another request from inside the decode loop, i.e. strictly mid-decode."""

    def __init__(self, *a, scheduler=None, late=None, at=3, **k):
        super().__init__(*a, **k)
        self.scheduler, self.late, self.at = scheduler, late, at

    def on_token(self, ev):
        reaction = super().on_token(ev)
        if self.tokens == self.at:
            self.scheduler.submit_generate(self.late)
        return reaction


def test_a_request_arriving_mid_decode_joins_at_the_next_step_boundary():
    r, bank, m, s = make(gen_batch=4, gen_wait_ms=0)
    late = Counting(r.encode("late"), Sampling(max_new_tokens=4))
    long = Submitting(r.encode("first"), Sampling(max_new_tokens=30), scheduler=s, late=late, at=3)
    s.submit_generate(long)
    assert long.finished.wait(60) and late.finished.wait(60)
    s.stop(10)
    assert (long.reason, late.reason) == ("length", "length") and late.tokens == 4
    # the late request was prefilled on its own and then shared the long one's decode steps
    assert m.value("latentwatch_forward_passes_total", {"kind": "prefill"}) == 2
    assert m.value("latentwatch_forward_passes_total", {"kind": "decode"}) == 29
    assert late.steps == 4 and long.steps == 30


@pytest.mark.skipif(sys.platform != "linux", reason="thread priorities are per process elsewhere")
def test_the_model_thread_runs_at_a_lower_priority_than_the_event_loop():
    """So health checks and refusals are answered while the model saturates the CPU."""
    here = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    r, bank, m, s = make(nice=5)
    model = s.call(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result(30)
    s.stop(10)
    assert model == min(19, here + 5)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == here


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
@pytest.mark.parametrize("env, took", [({}, "True"), ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "False")])
def test_serving_pins_the_mmap_threshold_unless_the_operator_set_one(env, took):
    """Left to adjust itself, glibc serves big tensors from a fragmenting heap (bench/soak.py)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env
    out = subprocess.run([sys.executable, "-c", "from monitor.scheduler import pin_mmap_threshold as p; print(p())"],
                         env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == took


def test_the_model_thread_hands_freed_heap_back_between_steps():
    """glibc keeps freed tensor memory; without the trim a steady load grew RSS by MB a minute."""
    r, bank, m, s = make(score_wait_ms=0)
    trims = []
    s._trim.interval, s._trim.fn = 0.0, trims.append
    s.submit_score([r.encode("text")], bank).result(30)
    s.stop(10)
    assert trims and trims[0] == 0

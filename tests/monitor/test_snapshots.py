"""Every request is monitored by the snapshot it was admitted with, however often detectors reload."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import torch

from latentwatch.v1 import monitor_pb2 as pb
from monitor.bank import Detector, DetectorBank
from monitor.client import Client
from monitor.config import Settings
from monitor.domain import HookPoint
from monitor.generation import Sampling
from monitor.metrics import Metrics
from monitor.scheduler import GenJob, Scheduler
from monitor.storage import open_readonly
from monitor.storage.queries import get_alerts
from probes.kinds.base import ScoringHead
from tests.monitor.server_fixtures import RunningServer, make_pack, runner
from tests.tiny import tiny_model, tiny_runner, tiny_tokenizer


def test_reloads_under_traffic_never_leave_a_request_unscored_or_scored_by_another_snapshot(tmp_path):
    r = runner()
    folder = tmp_path / "pack"
    make_pack(r, folder, id="always", threshold=0.0, seed=0)
    db = f"sqlite:///{tmp_path}/db.sqlite"
    settings = Settings(packs=[folder], port=0, metrics_port=None, db=db, max_new_tokens=40, default_max_new_tokens=12,
                        generate={"max_batch": 8, "max_wait_ms": 5}, score={"max_batch": 8, "max_wait_ms": 5})
    srv = RunningServer(settings, r)
    reloads: list[tuple[float, float, str]] = []  # (sent, answered, new version)
    seen: list[tuple[str, float, float, str, str, int]] = []  # (kind, sent, answered, request id, version, scores)
    errors: list[BaseException] = []
    stop = threading.Event()

    def traffic(kind: str, client: Client):
        while not stop.is_set():
            sent = time.monotonic()
            try:
                if kind == "score":
                    resp = client.stub.Score(pb.ScoreRequest(inputs=[pb.ScoreInput(text="hello there")]), timeout=60)
                    seen.append((kind, sent, time.monotonic(), resp.request_id, resp.snapshot_version,
                                 len(resp.results[0].detectors)))
                else:
                    *_, last = client.stub.Generate(pb.GenerateRequest(prompt="count with me", max_new_tokens=12),
                                                    timeout=60)
                    s = last.summary
                    seen.append((kind, sent, time.monotonic(), s.request_id, s.snapshot_version, len(s.scores)))
            except BaseException as e:  # noqa: BLE001 - every failure is a test failure
                errors.append(e)

    with Client(srv.target, timeout=60) as c:
        versions = [c.stub.ListDetectors(pb.ListDetectorsRequest()).snapshot_version]
        workers = [threading.Thread(target=traffic, args=(k, c)) for k in ("generate", "generate", "score", "score")]
        for w in workers:
            w.start()
        for seed in range(1, 5):
            time.sleep(1.0)
            make_pack(r, folder, id="always", threshold=0.0, seed=seed)  # new weights on disk
            sent = time.monotonic()
            version = c.stub.ReloadDetectors(pb.ReloadDetectorsRequest(), timeout=60).snapshot_version
            reloads.append((sent, time.monotonic(), version))
            versions.append(version)
        time.sleep(1.0)
        stop.set()
        for w in workers:
            w.join(120)
    srv.stop()

    assert not errors, errors[:3]
    assert len(set(versions)) == len(versions), "different weights give different snapshot versions"
    assert {k for k, *_ in seen} == {"generate", "score"} and len(seen) >= 8
    assert len({v for *_, v, _ in seen}) >= 3, "traffic spanned several snapshots"
    order = {v: i for i, v in enumerate(versions)}
    for kind, sent, answered, request_id, version, n_scores in seen:
        assert n_scores == 1, f"{kind} {request_id} came back unscored"
        # admitted after reload k answered: at least version k; answered before reload k was sent: older
        newest_before = max([i + 1 for i, (_, done, _) in enumerate(reloads) if done < sent], default=0)
        oldest_after = min([i + 1 for i, (s, _, _) in enumerate(reloads) if s > answered], default=len(versions))
        assert newest_before <= order[version] < oldest_after, (kind, request_id, version)
    # the stored records carry the version each response reported
    engine = open_readonly(db)
    for kind, *_, request_id, version, _ in seen[::5]:
        rows, _ = get_alerts(engine, request_id=request_id, page_size=10)
        assert rows and {a.snapshot_version for a in rows} == {version}, (kind, request_id)


def test_one_addmm_per_hook_point_while_score_runs_between_decode_steps():
    """A Score served mid-generation reuses the generation's hooks instead of stacking its own."""
    r = tiny_runner("llama")
    torch.manual_seed(0)
    heads = [ScoringHead(torch.randn(r.d_model, 1), torch.zeros(1)) for _ in range(4)]
    points = ["blocks.0.resid_post", "blocks.0.resid_post", "blocks.1.resid_post", "blocks.1.resid_post"]
    bank = DetectorBank([Detector(f"d{i}", "1", HookPoint.parse(p), h, aggregation="mean")
                         for i, (p, h) in enumerate(zip(points, heads))])
    sched = Scheduler(r, Metrics(bank.ids), gen_batch=2, gen_wait_ms=0, score_wait_ms=0).start()
    calls, per_forward, scores = [], [], []
    real_addmm, real_forward = torch.addmm, r.forward

    def forward(*a, **k):
        before = len(calls)
        out = real_forward(*a, **k)
        per_forward.append(len(calls) - before)
        return out

    class ScoresMidDecode(GenJob):
        def on_token(self, ev):
            if ev.index in (2, 5):
                scores.append(sched.submit_score([r.encode("score me now")], bank))
            return super().on_token(ev)

    job = ScoresMidDecode(r.encode("generate"), Sampling(max_new_tokens=10), bank=bank)
    try:
        torch.addmm = lambda *a, **k: calls.append(1) or real_addmm(*a, **k)
        r.forward = forward
        sched.submit_generate(job)
        assert job.finished.wait(60)
        results = [f.result(60) for f in scores]
    finally:
        torch.addmm, r.forward = real_addmm, real_forward
        sched.stop(10)
    assert len(results) == 2 and len(per_forward) == 10 + 2
    assert per_forward == [2] * len(per_forward)  # one matmul per hook point, both hook points, every pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_imports_no_training_or_plotting_code(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    from monitor.runner import ModelRunner

    make_pack(ModelRunner.load(str(model_dir), device="cpu"), tmp_path / "pack", id="toy")
    port = _free_port()
    script = f"""
import os, signal, sys, threading, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

def probe():
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel("127.0.0.1:{port}"))
    for _ in range(600):
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                break
        except grpc.RpcError:
            time.sleep(0.1)
    from monitor.client import Client
    with Client("127.0.0.1:{port}") as c:
        c.score(["is this scored?"])
    print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in ("sklearn", "matplotlib", "probes")))
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=probe, daemon=True).start()
from monitor.cli import app
app(["serve", "--model", "{model_dir}", "--pack", "{tmp_path / 'pack'}", "--port", "{port}",
     "--metrics-port", "0", "--db", "sqlite:///{tmp_path}/db.sqlite"])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("LOADED")), None)
    assert line is not None, out.stdout[-2000:] + out.stderr[-2000:]
    loaded = eval(line.removeprefix("LOADED "))  # noqa: S307 - our own print of a list of names
    assert not [m for m in loaded if m.startswith(("sklearn", "matplotlib", "probes.report", "probes.train"))]
    assert "probes.pack" in loaded  # the check saw a server that really loaded a pack

"""Tiny model + tiny probe pack + an in-process server on loopback, shared by the server tests."""

from __future__ import annotations

import numpy as np

from probes.fingerprint import fingerprint
from probes.kinds.logistic import LogisticProbe
from probes.pack import Aggregation, Manifest, ProbePack
from tests.tiny import tiny_runner


def make_pack(runner, folder, *, id="toy", threshold=0.5, hook_point="blocks.1.resid_post", seed=0):
    """A logistic probe fitted on random activations, saved as a real pack for this runner."""
    rng = np.random.default_rng(seed)
    d = runner.d_model
    y = rng.integers(0, 2, 200)
    x = (rng.normal(size=(200, d)) + np.outer(y, np.ones(d))).astype(np.float32)
    probe = LogisticProbe()
    probe.fit(x, y)
    manifest = Manifest(
        schema_version=1, id=id, version="0.0.1", kind="logistic", kind_config={}, hook_point=hook_point,
        d_model=d, aggregation=Aggregation(kind="max"), input_format="chat", threshold=threshold,
        metrics={"test": {"auroc": 0.5}}, model=fingerprint(runner.model, runner.tokenizer),
        provenance={"seed": seed}, description=f"toy detector {id}",
    )
    ProbePack(manifest, probe).save(folder)
    return folder


def steady_pack(runner, folder, *, id="steady", p=0.6, threshold=0.5, hook_point="blocks.1.resid_post"):
    """A probe that scores (almost exactly) `p` on every token: a direction of norm 1e-6 and the
    bias that gives p, so rules on it fire (or not) by their condition alone, never by chance."""
    d = runner.d_model
    direction = np.zeros(d, np.float32)
    direction[0] = 1e-6
    probe = LogisticProbe.from_tensors(
        LogisticProbe.config_cls(),
        {
            "mean": np.zeros(d, np.float32),
            "std": np.ones(d, np.float32),
            "coef": direction,
            "intercept": np.array([np.log(p / (1 - p))], np.float32),
        },
    )
    manifest = Manifest(
        schema_version=1,
        id=id,
        version="0.0.1",
        kind="logistic",
        kind_config={},
        hook_point=hook_point,
        d_model=d,
        aggregation=Aggregation(kind="mean"),
        input_format="chat",
        threshold=threshold,
        metrics={"test": {"auroc": 0.5}},
        model=fingerprint(runner.model, runner.tokenizer),
        provenance={"p": p},
        description=f"scores {p} everywhere",
    )
    ProbePack(manifest, probe).save(folder)
    return folder


def runner():
    return tiny_runner("llama")


class RunningServer:
    """A `monitor.server.Server` on its own event-loop thread, for blocking tests."""

    def __init__(self, settings, runner):
        import asyncio
        import threading

        from monitor.server import Server

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make():
            return await Server(settings, runner).start()

        self.server = self.run(make())
        self.target = f"127.0.0.1:{self.server.port}"

    def run(self, coro, timeout=60):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, drain=5.0, linger=0.0):
        self.run(self.server.stop(drain, linger), timeout=120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def tiny_model_folder(folder):
    """A tiny llama saved like a real model folder, for `latentwatch serve --model FOLDER` subprocesses."""
    from tests.tiny import tiny_model, tiny_tokenizer

    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`latentwatch serve` in a subprocess, SERVING when the constructor returns."""

    def __init__(self, *args: str, env: dict | None = None, timeout: float = 180):
        import os
        import subprocess
        import sys
        import time

        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        entry = os.path.join(os.path.dirname(sys.executable), "latentwatch")  # the installed entry point
        cmd = [entry, "serve", "--port", str(self.port), "--metrics-port", "0", *args]
        # a file, not a pipe: a long run's log lines would fill a pipe nobody reads and stall the server
        import tempfile

        self.log = tempfile.NamedTemporaryFile("w+", prefix="latentwatch-serve-", suffix=".log")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(self.target))
        deadline = time.monotonic() + timeout
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"latentwatch serve did not come up: {self.output()[-3000:]}")
            time.sleep(0.2)

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """Make sure no server outlives its test, whatever the test did."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait(self, timeout: float = 120) -> tuple[int, str]:
        self.proc.wait(timeout)
        return self.proc.returncode, self.output()

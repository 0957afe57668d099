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

    def stop(self, grace=5.0, drain=0.0):
        self.run(self.server.stop(grace, drain))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

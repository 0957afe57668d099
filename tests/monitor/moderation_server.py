"""A real HTTP server on loopback speaking the OpenAI moderation API's shape, for escalation tests.

    with moderation_server() as mod:  # flags inputs containing "bomb", "poison" or "kill"
        cfg = EndpointConfig(http=mod.url)
        mod.delay = 2.0          # answer each request 2 s late (timeouts)
        mod.status = 503         # answer with this status and a JSON error body
        mod.body = b"{oops"      # answer 200 with exactly these bytes (malformed responses)
        mod.requests             # every request received: Received(body, authorization)
        mod.stop()               # the port now refuses connections (the endpoint is down)

The switches can be set at any time, from any thread; each request reads them when it arrives.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# the omni-moderation-latest categories, all of them in every answer as the real API does
CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
KEYWORDS = {"bomb": "illicit/violent", "poison": "illicit/violent", "kill": "violence"}
FLAGGED_SCORE, CLEAN_SCORE = 0.93, 0.0012


@dataclass(frozen=True)
class Received:
    """One request: its JSON body (the raw text when it was not JSON) and its Authorization header."""

    body: Any
    authorization: str | None


class ModerationServer:
    """`url` is the endpoint (`http://127.0.0.1:PORT/v1/moderations`); see the module docstring."""

    def __init__(
        self, keywords: Mapping[str, str] = KEYWORDS, delay: float = 0.0, status: int = 200, body: bytes | None = None
    ):
        self.keywords = dict(keywords)  # lower-case keyword -> the category it flags
        self.delay = delay
        self.status = status
        self.body = body
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._ids = itertools.count(1)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.block_on_close = False  # stop() must not wait for a handler sleeping out its delay
        self.url = f"http://127.0.0.1:{self._httpd.server_port}/v1/moderations"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the listening socket: new connections are refused. Idempotent."""
        if not self._stopped.is_set():
            self._stopped.set()  # wakes handlers waiting out a delay
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(10)

    def _verdict(self, doc: Any) -> tuple[int, dict]:
        """(status, JSON answer) for a request body, as the OpenAI API answers it."""
        inputs = doc.get("input") if isinstance(doc, dict) else None
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
            return 400, {"error": {"message": "input must be a string or a list of strings", "type": "invalid"}}
        return 200, {
            "id": f"modr-{next(self._ids)}",
            "model": doc.get("model") or "omni-moderation-latest",
            "results": [self._result(text) for text in inputs],
        }

    def _result(self, text: str) -> dict:
        hits = {category for word, category in self.keywords.items() if word in text.lower()}
        return {
            "flagged": bool(hits),
            "categories": {c: c in hits for c in CATEGORIES},
            "category_scores": {c: FLAGGED_SCORE if c in hits else CLEAN_SCORE for c in CATEGORIES},
            "category_applied_input_types": {c: ["text"] for c in CATEGORIES},
        }

    def _record(self, received: Received) -> None:
        with self._lock:
            self.requests.append(received)


def _handler(server: ModerationServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = raw.decode("utf-8", "replace")
            server._record(Received(doc, self.headers.get("Authorization")))
            if server._stopped.wait(server.delay):
                return  # taken down while waiting: no answer
            if server.status != 200:
                self._send(
                    server.status,
                    json.dumps(
                        {"error": {"message": "remote says: overloaded, try later", "type": "server_error"}}
                    ).encode(),
                )
            elif server.body is not None:
                self._send(200, server.body)
            else:
                status, answer = server._verdict(doc)
                self._send(status, json.dumps(answer).encode())

        def _send(self, status: int, payload: bytes) -> None:
            with contextlib.suppress(OSError):  # the client may have given up (timeouts)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        def log_message(self, *args):  # keep test output clean
            pass

    return Handler


@contextlib.contextmanager
def moderation_server(**opts) -> Iterator[ModerationServer]:
    """A running `ModerationServer(**opts)`, stopped on exit."""
    server = ModerationServer(**opts)
    try:
        yield server
    finally:
        server.stop()

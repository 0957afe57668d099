"""Operator logs: plain text by default, or one JSON object per line (`log_format = "json"`).

Every RPC writes one access line (`latentwatch.access`: rpc, outcome, request id, client id,
latency); no log line carries prompt text, tokens or credentials. Lines are written by a
background thread, so the event loop never waits on a slow stderr (a pipe drained late).
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import queue
import sys
from datetime import UTC, datetime
from logging.handlers import QueueHandler, QueueListener

FIELDS = ("request_id", "client_id", "rpc", "outcome", "latency_ms")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        out.update({k: getattr(record, k) for k in FIELDS if getattr(record, k, None) not in (None, "")})
        if record.exc_text or record.exc_info:
            out["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes, not the one at configuration time
    (a CLI run inside a test runner gets a stream that is closed afterwards)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _Enqueue(QueueHandler):
    """Hands records to the writer thread with their message and traceback already rendered (the
    stdlib's version flattens the traceback into the message, which the JSON format keeps apart)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text, record.exc_info = logging.Formatter().formatException(record.exc_info), None
        return record


_writer: QueueListener | None = None


def configure(level: str, fmt: str) -> None:
    global _writer
    stop()
    handler = _Stderr()
    handler.setFormatter(JsonFormatter() if fmt == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    records: queue.SimpleQueue = queue.SimpleQueue()
    _writer = QueueListener(records, handler)
    _writer.start()
    root = logging.getLogger()
    root.handlers[:] = [_Enqueue(records)]
    root.setLevel(level.upper())
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))  # migrations: only problems


@atexit.register
def stop() -> None:
    """Write out every queued line and end the writer thread (at exit, or before reconfiguring)."""
    global _writer
    if _writer is not None:
        _writer.stop()
        _writer = None

"""Operator logs: plain text by default, or one JSON object per line (`log_format = "json"`).

Every RPC writes one access line (`latentwatch.access`: rpc, outcome, request id, client id,
latency); no log line carries prompt text, tokens or credentials.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

FIELDS = ("request_id", "client_id", "rpc", "outcome", "latency_ms")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        out.update({k: getattr(record, k) for k in FIELDS if getattr(record, k, None) not in (None, "")})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
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


def configure(level: str, fmt: str) -> None:
    handler = _Stderr()
    handler.setFormatter(JsonFormatter() if fmt == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))  # migrations: only problems

"""Second opinions for the `escalate` policy action: an OpenAI-moderation-shaped HTTP endpoint, or
another latentwatch server's Score RPC.

A second opinion is advice, not a dependency: one that times out, is refused or answers nonsense must
not take serving down with it. So `Endpoint.check` never raises for a remote or network problem; it
returns a `Verdict` whose `error` says in a few fixed words what went wrong ("timeout after 1000 ms",
"HTTP 503", "connection refused", "UNAVAILABLE"), and the rule decides what a failure means (fail open
unless it says `fail_closed`). One attempt, no retries: the timeout is the whole budget. Errors never
quote the remote's body or an exception's text, so a verdict is safe to store and stream, and the API
key cannot leak through one.
"""

from __future__ import annotations

import abc
import asyncio
import http.client
import json
import logging
import math
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from latentwatch.v1 import monitor_pb2 as pb
from latentwatch.v1 import monitor_pb2_grpc as pb_grpc
from monitor.tls import channel_credentials

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # a moderation answer is a few KiB; more is a misbehaving endpoint
HTTP_WORKERS = 16  # checks in flight per HTTP endpoint; more wait their turn, within their own timeout

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]@]+):(\d{1,5})")
_ONLY_FOR = {"detectors": "grpc", "tls_ca": "grpc", "model": "http"}

Answer = tuple[bool, tuple[str, ...], dict[str, float]]  # flagged, flagged categories, scores


class EndpointConfig(BaseModel):
    """One second-opinion endpoint; the policy file names it (the key it is written under)."""

    # a key pasted where its variable's name belongs must not be echoed back by str(ValidationError)
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    http: str | None = Field(
        None, description="URL of an OpenAI-moderation-shaped endpoint, e.g. http://127.0.0.1:8080/v1/moderations."
    )
    grpc: str | None = Field(None, description="host:port of another latentwatch server; its Score RPC answers.")
    detectors: tuple[str, ...] = Field((), description="grpc: the detectors whose flag counts; empty: all.")
    timeout_ms: int = Field(1000, gt=0, le=60_000, description="Past this the check fails (and the rule decides).")
    model: str | None = Field(None, description="http: the moderation request's `model`.")
    api_key_env: str | None = Field(None, description="Name of the environment variable holding a bearer token.")
    tls_ca: Path | None = Field(None, description="grpc: use TLS, trusting this CA file (unset: plain text).")

    @field_validator("http")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        try:
            ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
        except ValueError:  # a port that is not a number in 0-65535
            ok = False
        if not ok:
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:8080/v1/moderations")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials: name the key's variable in api_key_env")
        return v

    @field_validator("grpc")
    @classmethod
    def _target(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = _HOST_PORT.fullmatch(v)
        if not m or not 0 < int(m[2]) < 65536:
            raise ValueError("must be host:port, e.g. 127.0.0.1:50051")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.fullmatch(v):
            raise ValueError("must be the name of an environment variable (not the key itself), e.g. MODERATION_KEY")
        return v

    @field_validator(*_ONLY_FOR)
    @classmethod
    def _for_kind(cls, v, info: ValidationInfo):
        kind = _ONLY_FOR[info.field_name]
        if v and info.data.get("http" if kind == "grpc" else "grpc") is not None:  # null and [] mean unset
            raise ValueError(f"only for {kind} endpoints")
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> EndpointConfig:
        if (self.http is None) == (self.grpc is None):
            raise ValueError("set exactly one of http (a moderation URL) and grpc (a host:port)")
        return self


@dataclass(frozen=True)
class Verdict:
    """What one check answered. `flagged` is None when it failed, and `error` then says why."""

    endpoint: str
    flagged: bool | None
    categories: tuple[str, ...] = ()
    scores: Mapping[str, float] = field(default_factory=dict)
    latency_s: float = 0.0
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def to_record(self) -> dict[str, Any]:
        """Plain JSON-safe values, for the decision trail."""
        return {
            "endpoint": self.endpoint,
            "flagged": self.flagged,
            "categories": list(self.categories),
            "scores": dict(self.scores),
            "latency_s": self.latency_s,
            "error": self.error,
        }


class _Failure(Exception):
    """A check that got no usable answer; the message is the verdict's error."""


class Endpoint(abc.ABC):
    """A second-opinion check, called from the event loop. `check` bounds the whole call by the timeout
    and turns every remote or network problem into a failed Verdict."""

    def __init__(self, name: str, cfg: EndpointConfig):
        self.name = name
        self.timeout_s = cfg.timeout_ms / 1000
        self._timeout_error = f"timeout after {cfg.timeout_ms} ms"
        self._token = _api_key(cfg.api_key_env)
        self._closed = False
        self._in_flight = 0
        self._idle = asyncio.Event()  # set once closed with no check in flight

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    async def check(self, text: str) -> Verdict:
        start = time.perf_counter()
        if self._closed:
            return self._failed("endpoint closed", start)
        self._in_flight += 1
        try:
            flagged, categories, scores = await asyncio.wait_for(self._ask(text), self.timeout_s)
        except TimeoutError:
            return self._failed(self._timeout_error, start)
        except _Failure as e:
            return self._failed(str(e), start)
        except Exception:  # a bug here must not fail the request either; the log has it
            log.exception("escalation endpoint %s: unexpected error", self.name)
            return self._failed("internal error", start)
        finally:
            self._in_flight -= 1
            if self._closed and not self._in_flight:
                self._idle.set()
        return Verdict(self.name, flagged, categories, scores, time.perf_counter() - start)

    def _failed(self, error: str, start: float) -> Verdict:
        return Verdict(self.name, None, latency_s=time.perf_counter() - start, error=error)

    @abc.abstractmethod
    async def _ask(self, text: str) -> Answer:
        """The answer; raises _Failure (or TimeoutError) when there is none."""

    async def close(self) -> None:
        """Stop taking checks ("endpoint closed"), wait for those in flight (at most the timeout), then
        release connections and threads. Checks in flight end as they would have, never cancelled: a
        policy reload closes the old endpoints while requests admitted under it are still checking."""
        self._closed = True
        if self._in_flight:
            await self._idle.wait()
        await self._release()

    @abc.abstractmethod
    async def _release(self) -> None:
        """Free what the endpoint holds; no check is in flight."""


def _api_key(env: str | None) -> str | None:
    """Read once, when the endpoint is made: a missing key is a configuration error, not a failed check."""
    if env is None:
        return None
    value = os.environ.get(env, "")
    if not value:
        raise ValueError(f"api_key_env: environment variable {env} is not set or empty")
    return value


class HttpModeration(Endpoint):
    """POST `{"input": text, "model": ...}` to an OpenAI-moderation-shaped URL; `results[0]` answers.

    urllib runs in the endpoint's own threads: a hung endpoint ties up those, never the event loop's
    default executor, which the rest of the server shares.
    """

    def __init__(self, name: str, cfg: EndpointConfig):
        super().__init__(name, cfg)
        self.url = cfg.http
        self.model = cfg.model
        self._headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "latentwatch"}
        if self._token:
            self._headers["Authorization"] = f"Bearer {self._token}"
        self._pool = ThreadPoolExecutor(HTTP_WORKERS, thread_name_prefix=f"escalation-{name}")

    async def _ask(self, text: str) -> Answer:
        body = {"input": text} if self.model is None else {"input": text, "model": self.model}
        data = await asyncio.get_running_loop().run_in_executor(self._pool, self._post, json.dumps(body).encode())
        return _moderation(data)

    def _post(self, body: bytes) -> bytes:
        """The body of a 2xx answer (blocking, on a pool thread)."""
        deadline = time.monotonic() + self.timeout_s
        request = urllib.request.Request(self.url, body, self._headers, method="POST")
        try:
            with _OPENER.open(request, timeout=self.timeout_s) as response:
                return _read(response, deadline)
        except urllib.error.HTTPError as e:
            e.close()
            raise _Failure(f"HTTP {e.code}") from None
        except urllib.error.URLError as e:
            raise _network(e.reason) from None
        except (OSError, http.client.HTTPException) as e:
            raise _network(e) from None

    async def _release(self) -> None:
        self._pool.shutdown(wait=False)  # a thread still reading a timed-out answer exits when done


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect fails the check as its status: following it would send the API key to another URL,
    and urllib would turn the POST into a GET."""

    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_RefuseRedirects)


def _read(response, deadline: float) -> bytes:
    """At most MAX_BODY bytes, by the deadline: an endpoint that drips must not hold a thread for long."""
    data = bytearray()
    while chunk := response.read1(65536):
        data += chunk
        if len(data) > MAX_BODY:
            raise _Failure("malformed response: body over 1 MiB")
        if time.monotonic() > deadline:
            raise TimeoutError
    return bytes(data)


def _network(e: object) -> Exception:
    """The few words for a connection problem; the exception's own text is not kept."""
    if isinstance(e, TimeoutError):
        return TimeoutError()
    if isinstance(e, ConnectionRefusedError):
        return _Failure("connection refused")
    if isinstance(e, ssl.SSLError):
        return _Failure("TLS error")
    if isinstance(e, socket.gaierror):
        return _Failure("host not found")
    if isinstance(e, ConnectionError):
        return _Failure("connection closed")
    if isinstance(e, http.client.HTTPException):
        return _Failure("bad HTTP response")
    return _Failure("connection failed")


def _moderation(data: bytes) -> Answer:
    """`results[0]` of an OpenAI moderation response: flagged, the categories set true, category_scores."""
    try:
        doc = json.loads(data)
    except ValueError:
        raise _Failure("malformed response: not JSON") from None
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, list) or not results or not isinstance(results[0], dict):
        raise _Failure("malformed response: no results")
    result = results[0]
    flagged, categories, scores = result.get("flagged"), result.get("categories", {}), result.get("category_scores", {})
    if not isinstance(flagged, bool):
        raise _Failure("malformed response: no flagged")
    if not isinstance(categories, dict) or not all(isinstance(v, bool) for v in categories.values()):
        raise _Failure("malformed response: bad categories")
    if not isinstance(scores, dict) or not all(_finite(v) for v in scores.values()):
        raise _Failure("malformed response: bad category_scores")
    return flagged, tuple(c for c, on in categories.items() if on), {c: float(s) for c, s in scores.items()}


def _finite(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


class GrpcScore(Endpoint):
    """Another latentwatch server's Score RPC: flagged when any of `detectors` (empty: any of its detectors)
    is; the categories are the flagged detector ids and the scores every reported detector's.

    One channel per endpoint, made on the first check (a grpc.aio channel belongs to the event loop that
    made it) and reused after, so checks share one HTTP/2 connection.
    """

    def __init__(self, name: str, cfg: EndpointConfig):
        super().__init__(name, cfg)
        self.target = cfg.grpc
        self.detectors = cfg.detectors
        self._credentials = channel_credentials(cfg.tls_ca) if cfg.tls_ca else None  # TlsError names the file
        self._metadata = (("authorization", f"Bearer {self._token}"),) if self._token else ()
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.MonitorStub | None = None

    async def _ask(self, text: str) -> Answer:
        if self._stub is None:
            self._channel = (
                grpc.aio.secure_channel(self.target, self._credentials)
                if self._credentials
                else grpc.aio.insecure_channel(self.target)
            )
            self._stub = pb_grpc.MonitorStub(self._channel)
        request = pb.ScoreRequest(inputs=[pb.ScoreInput(text=text)], detectors=self.detectors)
        try:
            response = await self._stub.Score(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError from None
            raise _Failure(e.code().name) from None
        reported = response.results[0].detectors if response.results else ()
        if not reported:  # a server with no detectors would never flag: that is no second opinion
            raise _Failure("malformed response: no detectors")
        categories = tuple(d.detector_id for d in reported if d.flagged)
        return bool(categories), categories, {d.detector_id: d.score for d in reported}

    async def _release(self) -> None:
        if self._channel is not None:
            await self._channel.close()


def endpoint(name: str, cfg: EndpointConfig) -> Endpoint:
    """The endpoint `cfg` describes. Raises ValueError when its api_key_env variable is unset, and
    `monitor.tls.TlsError` (a ValueError) when its tls_ca file cannot be used."""
    return HttpModeration(name, cfg) if cfg.http is not None else GrpcScore(name, cfg)

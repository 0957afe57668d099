"""Bearer tokens and roles for `latentwatch.v1.Monitor`: who may call what, and as which client.

Clients send `authorization: Bearer <token>`. The token file (`auth_tokens`, a YAML list) holds
one entry per token: the token's sha256, never the token, the client id it speaks for and its
roles (`monitor.domain.AUTH_ROLES`). A presented token is hashed and compared with every entry
in constant time. The file is re-read when it changes; a new version that does not validate is
logged and the tokens loaded before stay in force, so one bad edit never locks everyone out.

With authentication on, the token says who a request is from: a request's own
`RequestMetadata.client_id` is overwritten by the token's, in records, permissions and alert
queries alike. Health and reflection stay open: load balancers probe health without
credentials, and reflection only describes the API, every method of which still needs a token.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from monitor.config import file_signature
from monitor.domain import AUTH_ROLES
from monitor.errors import RequestError, clip
from monitor.metrics import Metrics

log = logging.getLogger(__name__)
UNAUTHENTICATED = "missing or invalid bearer token"  # the same for both: it never says which
# RPC kind -> (method, the role it needs; None = any valid token). An RPC not listed needs admin.
RPCS: dict[str, tuple[str, str | None]] = {
    "generate": ("Generate", "generate"),
    "score": ("Score", "generate"),
    "get_alerts": ("GetAlerts", "audit"),
    "get_interventions": ("GetInterventions", "audit"),
    "reload_detectors": ("ReloadDetectors", "admin"),
    "list_detectors": ("ListDetectors", None),
    "get_server_info": ("GetServerInfo", None),
}


class TokenFileError(ValueError):
    """A token file that cannot be used; the message names the file and the entry."""


class TokenEntry(BaseModel):
    """One token of the file: `{sha256: <hex>, client_id: app, roles: [generate, audit]}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str
    client_id: str = Field(min_length=1, max_length=128)
    roles: tuple[str, ...] = ()

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, v: str) -> str:
        if len(v) != 64 or any(c not in "0123456789abcdefABCDEF" for c in v):
            raise ValueError("must be the 64 hex digits of the token's sha256 (latentwatch token hash)")
        return v.lower()

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for role in v:
            if role not in AUTH_ROLES:
                raise ValueError(f"unknown role {clip(role)} (roles: {', '.join(AUTH_ROLES)})")
        return v


_ENTRIES = TypeAdapter(list[TokenEntry])


def digest(token: str) -> str:
    """What the token file holds for a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def read_tokens(path: Path) -> tuple[TokenEntry, ...]:
    """The file's entries, validated; TokenFileError naming the file and the first bad entry.

    No message quotes the file's text: whatever was pasted there (a token?) stays out of logs."""
    where = f"auth tokens file {path}"
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise TokenFileError(f"{where}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise TokenFileError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or 'parse error'}") from None
    if not isinstance(data, list):
        raise TokenFileError(f"{where}: expected a YAML list of {{sha256, client_id, roles}} entries, "
                             f"got {type(data).__name__}")
    try:
        entries = _ENTRIES.validate_python(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = "entries" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise TokenFileError(f"{where}: {loc}: {first['msg'].removeprefix('Value error, ')}{more}") from None
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if entry.sha256 in seen:
            raise TokenFileError(f"{where}: entries[{i}].sha256: the same token as entries[{seen[entry.sha256]}]")
        seen[entry.sha256] = i
    return tuple(entries)


@dataclass(frozen=True)
class Identity:
    """Who an RPC's caller is, as its token says."""

    client_id: str
    roles: frozenset[str]

    def has(self, role: str) -> bool:
        return role in self.roles or (role == "audit" and "audit:*" in self.roles)


_current: contextvars.ContextVar[tuple[Identity, Auth] | None] = contextvars.ContextVar("identity", default=None)


def identity() -> Identity | None:
    """The caller of the RPC being served; None when authentication is off."""
    cur = _current.get()
    return cur[0] if cur is not None else None


def require(role: str, what: str) -> None:
    """PERMISSION_DENIED for `what` unless the caller has `role` (nothing to check with authentication off)."""
    cur = _current.get()
    if cur is None or cur[0].has(role):
        return
    who, auth = cur
    auth.metrics.record_auth_failure("forbidden")
    held = ", ".join(r for r in AUTH_ROLES if r in who.roles) or "no roles"
    raise RequestError("PERMISSION_DENIED", f"{what} needs the {role!r} role; client {clip(who.client_id)} has {held}")


def alerts_client(client_id: str) -> str:
    """The client id a GetAlerts or GetInterventions query is limited to: the caller's own unless it
    has `audit:*` (or authentication is off); asking for another client's records is PERMISSION_DENIED."""
    who = identity()
    if who is None or who.has("audit:*"):
        return client_id
    if client_id and client_id != who.client_id:
        require("audit:*", f"client_id {clip(client_id)}")
    return who.client_id


class Auth:
    """The tokens in force, re-read from `path` when it changes, and the check every RPC passes first."""

    def __init__(self, path: Path, metrics: Metrics):
        self.path, self.metrics = Path(path), metrics
        self._seen = file_signature(self.path)
        self._entries = read_tokens(self.path)  # at startup a bad file is an error, not "no tokens"
        log.info("authentication on: %d token(s) from %s", len(self._entries), self.path)

    def check(self, kind: str, context) -> str:
        """Authenticate the caller of RPC `kind` and check its role; returns its client id.

        Raises RequestError (UNAUTHENTICATED, PERMISSION_DENIED); sets `identity()` for the RPC."""
        self.refresh()
        method, role = RPCS.get(kind, (kind, "admin"))
        values = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
        who = self._identify(values)
        if who is None:
            reason = "invalid" if values else "missing"
            self.metrics.record_auth_failure(reason)
            log.debug("%s refused: %s bearer token from %s", method, reason, context.peer())
            raise RequestError("UNAUTHENTICATED", UNAUTHENTICATED)
        _current.set((who, self))
        if role is not None:
            require(role, method)
        return who.client_id

    def refresh(self) -> None:
        """Re-read the file if it changed; a version that does not validate keeps the tokens in force."""
        signature = file_signature(self.path)
        if signature == self._seen:
            return
        self._seen = signature
        try:
            self._entries = read_tokens(self.path)
        except TokenFileError as e:
            log.warning("%s; the %d token(s) loaded before stay in force", e, len(self._entries))
            return
        log.info("auth tokens file %s reloaded: %d token(s)", self.path, len(self._entries))

    def _identify(self, values: list[str]) -> Identity | None:
        if len(values) != 1:
            return None
        scheme, _, token = values[0].partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        presented, found = digest(token), None
        for entry in self._entries:  # every entry, so the time taken does not tell which one matched
            if hmac.compare_digest(presented, entry.sha256) and found is None:
                found = entry
        return Identity(found.client_id, frozenset(found.roles)) if found is not None else None

__all__ = ["Auth", "Identity", "TokenEntry", "TokenFileError", "alerts_client", "digest", "identity", "read_tokens",
           "require"]

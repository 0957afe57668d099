"""`latentwatch serve`, `alerts`, `interventions` and `info`; `register(app)` adds them to the main typer app."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from monitor import logs
from monitor.cli_common import console, fail, out
from monitor.config import Settings
from monitor.domain import INTERVENTION_KINDS


def _default(field: str):
    return Settings.model_fields[field].default


def summarise(error) -> str:
    """A pydantic ValidationError as `field.path: message; ...`."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in error.errors())


def check_port(flag: str, host: str, port: int | None) -> None:
    """Fail unless host:port can be bound now (port 0 picks a free one, None is off)."""
    if not port:
        return
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
            s.bind(addr)
    except OSError as e:
        fail(f"cannot listen on {host}:{port} ({e.strerror or e}): stop what holds it or pick another {flag}")


def serve(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", help="TOML/YAML/JSON settings file.")] = None,
    port: Annotated[int, typer.Option(help="gRPC port (0 = a free one).", show_default=True)] = _default("port"),
    metrics_port: Annotated[int, typer.Option(help="Prometheus /metrics port (0 = a free one).",
                                              show_default=True)] = _default("metrics_port"),
    db: Annotated[str, typer.Option("--db", help="Database URL: sqlite:///path.db or postgresql://...",
                                    show_default=True)] = _default("db"),
    host: Annotated[str, typer.Option(help="Bind address; beyond loopback needs TLS and client authentication.",
                                      show_default=True)] = _default("host"),
    model: Annotated[str | None, typer.Option(help="Model: HF id, local folder or GGUF file.",
                                              show_default="SmolLM2-135M-Instruct")] = None,
    packs: Annotated[list[Path] | None, typer.Option(
        "--pack", "--packs", help="Probe pack folder to serve INSTEAD of the shipped packs (repeatable).",
        show_default="the shipped packs that are on by default")] = None,
    add_packs: Annotated[list[Path] | None, typer.Option(
        "--add-pack", help="Probe pack folder to serve IN ADDITION to the shipped (or --pack) packs "
        "(repeatable).")] = None,
    saes: Annotated[list[str] | None, typer.Option(
        "--sae", help="SAE to load for latent clamping and alert explanations: a folder or a shipped SAE id "
        "(repeatable; feature detectors load theirs).")] = None,
    policy: Annotated[Path | None, typer.Option(
        "--policy", help="Policy file (YAML): rules to log, alert, block, steer, escalate or shadow; re-read on "
        "change and SIGHUP (see deploy/policies/).", show_default="one alert rule per detector")] = None,
    device: Annotated[str | None, typer.Option(help="torch device.", show_default="cuda if available, else cpu")
                      ] = None,
    text_policy: Annotated[str, typer.Option(help="Texts stored: always | alerts_only | never.",
                                             show_default=True)] = _default("text_policy"),
    log_format: Annotated[str, typer.Option(help="Log lines: text | json (one object per line).",
                                            show_default=True)] = _default("log_format"),
    drain_seconds: Annotated[float, typer.Option(help="On SIGTERM: how long requests in flight may finish.",
                                                 show_default=True)] = _default("drain_seconds"),
    auth_tokens: Annotated[Path | None, typer.Option(
        "--auth-tokens", help="YAML token file: callers need a bearer token listed there (see `latentwatch token`).",
        show_default="no authentication")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate chain: serve TLS only (with --tls-key); "
                                                  "re-read on change and on SIGHUP.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
    tls_client_ca: Annotated[Path | None, typer.Option(help="PEM CA bundle: require client certificates it "
                                                       "signed (mTLS).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow a --host beyond loopback without TLS and "
                                           "client authentication.")] = False,
) -> None:
    """Start the gRPC sidecar. Settings: defaults < config file < LATENTWATCH_* env < flags given."""
    from pydantic import ValidationError

    from monitor.config import load_settings

    flags = {"port": port, "metrics_port": metrics_port, "db": db, "host": host, "model": model, "packs": packs,
             "extra_packs": add_packs, "saes": saes, "policy": policy, "device": device, "text_policy": text_policy,
             "log_format": log_format, "drain_seconds": drain_seconds, "auth_tokens": auth_tokens,
             "tls_cert": tls_cert, "tls_key": tls_key, "tls_client_ca": tls_client_ca, "insecure": insecure}
    param = {"extra_packs": "add_packs"}  # where the setting's name differs from the parameter's
    given = {k: v for k, v in flags.items() if ctx.get_parameter_source(param.get(k, k)).name == "COMMANDLINE"}
    try:
        settings = load_settings(config, **given)
    except ValidationError as e:
        fail(f"invalid configuration: {summarise(e)}")
    except ValueError as e:
        fail(f"invalid configuration: {e}")
    folders = check_before_loading(settings)

    from monitor.server import serve as run_server
    from monitor.storage import mask_url

    logs.configure(settings.log_level, settings.log_format)
    console.print(f"[bold]latentwatch[/bold]: loading model [cyan]{settings.model or 'SmolLM2-135M-Instruct (default)'}"
                  f"[/cyan] with {len(folders)} probe pack(s) ...")

    def ready(server) -> None:
        dets = ", ".join(r.detector for r in server.service.snapshot.views) or "none"
        metrics = f"http://{settings.metrics_host or settings.host}:{server.metrics_port}/metrics" \
            if server.metrics_port is not None else "off"
        console.print(
            f"[green]serving[/green] gRPC on [bold]{settings.host}:{server.port}[/bold] "
            f"(health + reflection)\n  metrics   {metrics}\n  database  {mask_url(settings.db)}\n"
            f"  detectors {dets}\n  Ctrl-C or SIGTERM to stop (drain {settings.drain_seconds:g} s)",
            highlight=False,
        )

    try:
        # ReloadDetectors re-reads the file and environment, under the same flags
        asyncio.run(run_server(settings, on_ready=ready, reload_settings=lambda: load_settings(config, **given)))
    except Exception as e:  # startup failures: say what and exit non-zero, no traceback wall
        fail(f"latentwatch serve failed: {type(e).__name__}: {str(e).splitlines()[0]}", code=1)
    console.print("stopped cleanly")


def policy_errors(e) -> str:
    """A PolicyError as one line per problem, under the file's name."""
    return f"policy {e.source} is invalid:\n" + "\n".join(f"  {line}" for line in e.errors)


def check_before_loading(settings: Settings) -> list[Path]:
    """What can be wrong without the model, checked before it loads: exposure, packs, SAEs, database,
    tokens, TLS files, ports.

    Returns the pack folders to serve. Only the packs' model fingerprints wait for the model.
    """
    from monitor.auth import TokenFileError, read_tokens
    from monitor.policy import PolicyError, check_references
    from monitor.sae import SAEError
    from monitor.sae.store import open_sae
    from monitor.snapshot import pack_dirs, read_policy
    from monitor.storage import StorageError, check_journal_dir, check_url
    from monitor.tls import TlsError, server_credentials
    from probes.pack import PackError, load_packs

    if settings.unprotected:
        fail(f"refusing to serve {settings.bind} without TLS and client authentication: set --tls-cert/--tls-key "
             "and --auth-tokens (or --tls-client-ca for mTLS), or pass --insecure to accept the risk")
    try:
        policy = read_policy(settings)
    except PolicyError as e:
        fail(policy_errors(e))
    except ValueError as e:
        fail(str(e))
    try:
        folders = pack_dirs(settings, policy)
        packs = load_packs(folders)
    except PackError as e:
        fail(str(e))
    if policy is not None and (problems := check_references(policy, {p.manifest.id for p in packs})):
        fail(policy_errors(PolicyError(str(settings.policy), problems)))
    for ref in settings.saes:
        try:
            open_sae(ref)
        except SAEError as e:
            fail(f"saes: {e}")
    try:
        check_url(settings.db)
        check_journal_dir(settings.journal_path)
    except StorageError as e:
        fail(str(e))
    try:
        if settings.auth_tokens is not None:
            read_tokens(settings.auth_tokens)
    except TokenFileError as e:
        fail(str(e))
    try:
        server_credentials(settings)
    except TlsError as e:
        fail(str(e))
    metrics_host = settings.metrics_host or settings.host
    if settings.port and settings.port == settings.metrics_port and metrics_host == settings.host:
        fail(f"port and metrics_port are both {settings.port}: give them different ports")
    check_port("--port", settings.host, settings.port)
    check_port("--metrics-port", metrics_host, settings.metrics_port)
    return folders


def alerts(
    db: Annotated[str, typer.Option("--db", help="Database URL (the server's `db`).")] = _default("db"),
    format: Annotated[str, typer.Option("--format", help="table | json")] = "table",
    detector: Annotated[str | None, typer.Option(help="Only this detector id.")] = None,
    request: Annotated[str | None, typer.Option(help="Only this request id.")] = None,
    client: Annotated[str | None, typer.Option(help="Only this client id.")] = None,
    since: Annotated[datetime | None, typer.Option(help="Only alerts at/after this time (UTC if no zone).")] = None,
    until: Annotated[datetime | None, typer.Option(help="Only alerts before this time.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Most alerts to print.")] = 100,
) -> None:
    """Query recorded alerts, oldest first."""
    from monitor.storage import StorageError, get_alerts, open_readonly

    if format not in ("table", "json"):
        fail(f"--format must be table or json, got {format!r}")
    try:
        engine = open_readonly(db)
        rows, _ = get_alerts(engine, since=_utc(since), until=_utc(until), detector_id=detector, request_id=request,
                             client_id=client, page_size=limit)
    except (StorageError, ValueError) as e:
        fail(str(e))
    if format == "json":
        typer.echo(json.dumps([{**r.__dict__, "created_at": r.created_at.isoformat()} for r in rows], indent=2))
        return
    if not rows:
        console.print("no alerts match")
        return
    table = Table("time", "detector", "score", "threshold", "action", "request", "client", "token", "span",
                  "top tokens", "top latents")
    for r in rows:
        table.add_row(r.created_at.strftime("%Y-%m-%d %H:%M:%S"), f"{r.detector_id}@{r.detector_version}",
                      f"{r.score:.3f}", f"{r.threshold:.3f}", r.action, r.request_id[:12], r.client_id or "",
                      "" if r.token_index is None else str(r.token_index), (r.span_text or "")[:40],
                      *_explained(r.explanation))
    out.print(table)


def interventions(
    ctx: typer.Context,
    db: Annotated[str, typer.Option("--db", help="Database URL (the server's `db`), read directly.")] = _default("db"),
    target: Annotated[str | None, typer.Option(
        help="host:port of a running server: ask it (GetInterventions, `audit` role) instead of reading --db.")] = None,
    format: Annotated[str, typer.Option("--format", help="table | json")] = "table",
    request: Annotated[str | None, typer.Option(help="Only this request id.")] = None,
    client: Annotated[str | None, typer.Option(help="Only this client id.")] = None,
    detector: Annotated[str | None, typer.Option(help="Only this detector id.")] = None,
    rule: Annotated[str | None, typer.Option(help="Only this policy rule id.")] = None,
    kind: Annotated[str | None, typer.Option(help=f"Only this kind: {' | '.join(INTERVENTION_KINDS)}.")] = None,
    since: Annotated[datetime | None, typer.Option(help="Only records at/after this time (UTC if no zone).")] = None,
    until: Annotated[datetime | None, typer.Option(help="Only records before this time.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Most records to print.")] = 100,
    tls_ca: Annotated[Path | None, typer.Option(help="With --target: CA certificate to verify the server by "
                                                "(enables TLS).")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="With --target: client certificate, for mTLS.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="With --target: client key, for mTLS.")] = None,
    token_file: Annotated[Path | None, typer.Option(
        help="With --target: file holding the bearer token (or set LATENTWATCH_TOKEN).")] = None,
    timeout: Annotated[float, typer.Option(help="With --target: seconds to wait for the server.")] = 10.0,
) -> None:
    """Query the decision trail (every rule that fired, block, steering, escalation, shadow decision and
    override), oldest first."""
    if format not in ("table", "json"):
        fail(f"--format must be table or json, got {format!r}")
    if kind is not None and kind not in INTERVENTION_KINDS:
        fail(f"unknown --kind {kind!r}: expected one of {', '.join(INTERVENTION_KINDS)}")
    since, until = _utc(since), _utc(until)
    if since is not None and until is not None and until <= since:
        fail("--until must be after --since")
    filters = {"request_id": request, "client_id": client, "detector_id": detector, "rule_id": rule, "kind": kind,
               "since": since, "until": until}
    if target is None:
        got = _trail_from_db(db, limit, filters)
    elif ctx.get_parameter_source("db").name == "COMMANDLINE":
        fail("give --db (read the database) or --target (ask a server), not both")
    else:
        got = _trail_from_server(target, limit, filters, tls_ca, tls_cert, tls_key, token_file, timeout)
    if format == "json":
        typer.echo(json.dumps([{**asdict(i), "create_time": i.create_time.isoformat() if i.create_time else None}
                               for i in got], indent=2))
        return
    if not got:
        console.print("no interventions match")
        return
    # 120 columns: fixed-width cells never wrap, ids fold onto a second line rather than lose characters;
    # one `detail` column, as a record has at most one of steering (steer), verdict (escalate), would-be action (shadow)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for name in ("time", "request", "kind", "rule", "detector", "score", "outcome", "token", "detail"):
        table.add_column(name, no_wrap=name not in ("rule", "detector", "detail"), overflow="fold",
                         justify="right" if name in ("score", "token") else "left")
    for i in got:
        table.add_row(i.create_time.strftime("%Y-%m-%d %H:%M:%S") if i.create_time else "", i.request_id[:8],
                      i.kind, i.rule_id, i.detector_id, f"{i.score:.3f}" if i.rule_id or i.score else "", i.outcome,
                      str(i.token_index), _detail(i))
    out.print(table)


def _trail_from_db(db: str, limit: int, filters: dict) -> list:
    from monitor.storage import StorageError, StorageUnavailable, get_interventions, mask_url, open_readonly

    try:
        rows, _ = get_interventions(open_readonly(db), page_size=limit, **filters)
    except StorageUnavailable as e:
        fail(f"{mask_url(db)}: {e}")
    except (StorageError, ValueError) as e:  # the driver's own message may run over lines: its first says why
        fail(str(e).splitlines()[0])
    return [_from_row(r) for r in rows]


def _trail_from_server(target: str, limit: int, filters: dict, tls_ca, tls_cert, tls_key, token_file, timeout):
    """Pages of GetInterventions until `limit` records or the last page."""
    import os

    import grpc

    from monitor.client import Client

    got, token = [], ""
    req = {k: v for k, v in filters.items() if v is not None}
    try:
        bearer = token_file.read_text().strip() if token_file else os.environ.get("LATENTWATCH_TOKEN") or None
        with Client(target, timeout=timeout, token=bearer, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key) as c:
            while True:
                page, token = c.get_interventions(page_size=limit - len(got), page_token=token, **req)
                got += page
                if not token or len(got) >= limit:
                    return got
    except OSError as e:
        fail(f"cannot read {e.filename}: {e.strerror}")
    except grpc.RpcError as e:
        why = f"{e.code().name}: {next(iter((e.details() or '').splitlines()), '')}"
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            fail(f"cannot reach a latentwatch server at {target}: {why}")
        fail(f"{target}: {why}")


def _from_row(r):
    """A stored trail row as `monitor.client.Intervention`, the shape GetInterventions returns (as
    `monitor.mapping.intervention` maps it), so --db and --target print the same."""
    from monitor.client import EscalationVerdict, Intervention, OverrideInfo, SteeringInfo

    d, steering, override, verdict = r.details or {}, None, None, None
    if r.kind == "steer":
        clamp = r.steering_kind == "clamp"
        steering = SteeringInfo(r.steering_kind, r.hook_point or "", r.coefficient or 0.0,
                                "" if clamp else r.vector_id or "", d.get("positions") or "generated",
                                r.detector_id or "", d.get("sae_id", ""), d.get("latent", 0))
    elif r.kind == "override":
        override = OverrideInfo(r.detector_id or "", d.get("threshold"), d.get("action") or None)
    if r.escalation is not None:
        v = r.escalation
        verdict = EscalationVerdict(v.get("endpoint", ""), bool(v.get("flagged")), list(v.get("categories", [])),
                                    v.get("latency_s", 0.0), v.get("error") or "")
    return Intervention(r.kind, r.detector_id or "", r.token_start, r.intervention_id, r.request_id,
                        _utc(r.created_at), steering, override, r.client_id or "", r.snapshot_version, r.rule_id,
                        r.policy_version, r.detector_version, r.score or 0.0, r.outcome, verdict, r.shadow_action)


def _detail(i) -> str:
    """What a record did beyond its kind, as one short cell: a steering's `vector +coefficient` (a clamp's
    `sae:latent=value`), an escalation's verdict and latency (or why it failed), a shadow rule's would-be action."""
    s, v = i.steering, i.escalation
    if s is not None:
        return f"{s.sae_id}:{s.latent}={s.coefficient:g}" if s.kind == "clamp" else f"{s.vector_id} {s.coefficient:+g}"
    if v is not None:
        if v.error:
            return f"failed: {v.error[:32]}"
        return " ".join(filter(None, ("flagged" if v.flagged else "clear", ",".join(v.categories[:2]),
                                      f"{v.latency_seconds:.2f}s")))
    return f"would {i.shadow_action}" if i.shadow_action else ""


def _explained(explanation: dict | None, n: int = 3) -> tuple[str, str]:
    """The first `n` tokens ('text'@position; the position alone where no text is kept) and latents
    (sae:latent) of an alert's explanation, for one table row."""
    if explanation is None:
        return "", ""
    tokens = (f"{t['text']!r}@{t['position']}" if t["text"] is not None else f"@{t['position']}"
              for t in explanation["tokens"][:n])
    latents = (f"{la['sae_id']}:{la['latent']}" for la in explanation["latents"][:n])
    return " ".join(tokens), " ".join(latents)


def info(
    target: Annotated[str, typer.Option(help="host:port of a running latentwatch server.")] = "127.0.0.1:50051",
    tls_ca: Annotated[Path | None, typer.Option(help="CA certificate to verify the server by (enables TLS).")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Client certificate, for mTLS.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Client key, for mTLS.")] = None,
    token_file: Annotated[Path | None, typer.Option(
        help="File holding the bearer token (or set LATENTWATCH_TOKEN); never pass a token as an argument.")] = None,
    format: Annotated[str, typer.Option("--format", help="table | json")] = "table",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the server.")] = 10.0,
) -> None:
    """Ask a running server what it serves: model, device, snapshot version and detectors."""
    import os

    import grpc

    from monitor.client import Client

    if format not in ("table", "json"):
        fail(f"--format must be table or json, got {format!r}")
    try:
        token = token_file.read_text().strip() if token_file else os.environ.get("LATENTWATCH_TOKEN") or None
        with Client(target, timeout=timeout, token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key) as c:
            got = c.get_server_info()
    except OSError as e:
        fail(f"cannot read {e.filename}: {e.strerror}")
    except grpc.RpcError as e:
        fail(f"{target}: {e.code().name}: {e.details()}")
    if format == "json":
        typer.echo(json.dumps({**got.__dict__, "detectors": [d.__dict__ for d in got.detectors]}, indent=2,
                              default=str))
        return
    out.print(f"{got.model_id} on {got.device} ({got.dtype}), latentwatch {got.server_version}, "
              f"snapshot {got.snapshot_version}")
    table = Table("detector", "version", "kind", "hook point", "threshold", "action")
    for d in got.detectors:
        table.add_row(d.id, d.version, d.kind, d.hook_point, f"{d.threshold:.3f}", d.action)
    out.print(table)


def _utc(t: datetime | None) -> datetime | None:
    return t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(alerts)
    app.command()(interventions)
    app.command()(info)

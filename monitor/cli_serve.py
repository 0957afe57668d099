"""`latentwatch serve` and `latentwatch alerts`; `register(app)` adds both to the main typer app."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)
out = Console() if sys.stdout.isatty() else Console(width=200)  # piped tables keep full ids


def serve(
    config: Annotated[Path | None, typer.Option("--config", help="TOML/YAML/JSON settings file.")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port [default 50051].")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus /metrics port [default 9464].")] = None,
    db: Annotated[str | None, typer.Option("--db", help="Database URL [default: sqlite, data/].")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address [default 127.0.0.1; 0.0.0.0 in k8s].")] = None,
    model: Annotated[str | None, typer.Option(help="Model id/folder/GGUF [default SmolLM2-135M-Instruct].")] = None,
    packs: Annotated[list[Path] | None, typer.Option("--packs", help="Probe pack folder (repeatable).")] = None,
    device: Annotated[str | None, typer.Option(help="torch device.")] = None,
    text_policy: Annotated[str | None, typer.Option(help="always | alerts_only | never.")] = None,
) -> None:
    """Start the gRPC sidecar (file < LATENTWATCH_* env < flags)."""
    from pydantic import ValidationError

    from monitor.config import load_settings
    from monitor.server import pack_dirs
    from monitor.server import serve as run_server
    from monitor.storage import mask_url

    try:
        settings = load_settings(config, port=port, metrics_port=metrics_port, db=db, host=host, model=model,
                                 packs=packs or None, device=device, text_policy=text_policy)
    except (ValidationError, ValueError) as e:
        console.print(f"[red]invalid configuration:[/red] {e}")
        raise typer.Exit(2) from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    folders = pack_dirs(settings)
    console.print(f"[bold]latentwatch[/bold]: loading model [cyan]{settings.model or 'SmolLM2-135M-Instruct (default)'}"
                  f"[/cyan] with {len(folders)} probe pack(s) ...")

    def ready(server) -> None:
        dets = ", ".join(server.service.bank.ids) if server.service.bank else "none"
        metrics = f"http://{settings.metrics_host or settings.host}:{server.metrics_port}/metrics" \
            if server.metrics_port is not None else "off"
        console.print(
            f"[green]serving[/green] gRPC on [bold]{settings.host}:{server.port}[/bold] "
            f"(health + reflection)\n  metrics   {metrics}\n  database  {mask_url(settings.db)}\n"
            f"  detectors {dets}\n  Ctrl-C or SIGTERM to stop (grace {settings.grace_period_s:g} s)",
            highlight=False,
        )

    try:
        asyncio.run(run_server(settings, on_ready=ready))
    except Exception as e:  # startup failures: say what and exit non-zero, no traceback wall
        console.print(f"[red]latentwatch serve failed:[/red] {type(e).__name__}: {e}")
        raise typer.Exit(1) from None
    console.print("stopped cleanly")


def alerts(
    db: Annotated[str, typer.Option("--db", help="Database URL.")] = "sqlite:///data/latentwatch.db",
    format: Annotated[str, typer.Option("--format", help="table | json")] = "table",
    detector: Annotated[str | None, typer.Option(help="Only this detector id.")] = None,
    request: Annotated[str | None, typer.Option(help="Only this request id.")] = None,
    client: Annotated[str | None, typer.Option(help="Only this client id.")] = None,
    since: Annotated[datetime | None, typer.Option(help="Only alerts at/after this time (UTC if no zone).")] = None,
    until: Annotated[datetime | None, typer.Option(help="Only alerts before this time.")] = None,
    limit: Annotated[int, typer.Option(help="Most alerts to print (1..1000).")] = 100,
) -> None:
    """Query recorded alerts, oldest first."""
    from monitor.storage import StorageError, get_alerts, open_database

    if format not in ("table", "json"):
        console.print(f"[red]--format must be table or json, got {format!r}[/red]")
        raise typer.Exit(2)
    try:
        engine = open_database(db)
        rows, _ = get_alerts(engine, since=_utc(since), until=_utc(until), detector_id=detector, request_id=request,
                             client_id=client, page_size=limit)
    except (StorageError, ValueError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    if format == "json":
        out = [{**r.__dict__, "created_at": r.created_at.isoformat()} for r in rows]
        typer.echo(json.dumps(out, indent=2))
        return
    table = Table("time", "detector", "score", "threshold", "action", "request", "client", "token", "span")
    for r in rows:
        table.add_row(r.created_at.strftime("%Y-%m-%d %H:%M:%S"), f"{r.detector_id}@{r.detector_version}",
                      f"{r.score:.3f}", f"{r.threshold:.3f}", r.action, r.request_id[:12], r.client_id or "",
                      "" if r.token_index is None else str(r.token_index), (r.span_text or "")[:40])
    out.print(table)


def _utc(t: datetime | None) -> datetime | None:
    return t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(alerts)

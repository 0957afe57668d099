"""`latentwatch policy check FILE`: validate a policy file the way `serve --policy` will read it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from monitor.cli_common import fail, out

app = typer.Typer(no_args_is_help=True, add_completion=False)


@app.callback()
def policy() -> None:
    """Policy files: rules from detector scores to actions."""


@app.command()
def check(
    file: Annotated[Path, typer.Argument(help="policy file (YAML)")],
    packs: Annotated[list[Path] | None, typer.Option(
        "--pack", help="probe pack folders the server will load (default: the shipped packs)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the rules as JSON")] = False,
) -> None:
    """Check a policy file: its schema, then that its detectors, vectors, SAEs and shadow packs load.

    Prints every problem with its path (``rules[2].when.threshold: must be in (0, 1)``) and exits 1,
    or the rules as they will run.
    """
    from monitor.cli_serve import policy_errors
    from monitor.policy import PolicyError, check_references, load_policy
    from probes.pack import PackError, ProbePack, shipped_packs

    try:
        pol = load_policy(file)
    except PolicyError as e:
        fail(policy_errors(e))
    try:
        ids = {ProbePack.load(p).manifest.id for p in packs} if packs else set(shipped_packs())
    except PackError as e:
        fail(f"--pack: {e}")
    if problems := check_references(pol, ids):
        fail(policy_errors(PolicyError(str(file), problems)))
    rows = [{"id": r.id, "detector": r.detector, "when": _when(r.when), "match": _match(r.match),
             "action": r.action + _detail(r)} for r in pol.rules]
    if as_json:
        out.print_json(json.dumps({"file": str(file), "version": pol.version, "rules": rows}))
        return
    table = Table(title=f"{file}: valid, version {pol.version}, {len(rows)} rule(s)", title_justify="left")
    for col in ("id", "detector", "when", "match", "action"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(row[c] for c in ("id", "detector", "when", "match", "action")))
    out.print(table)


def _when(w) -> str:
    cond = f"score in [{w.band[0]:g}, {w.band[1]:g})" if w.band else \
        f"score >= {'calibrated' if w.threshold is None else format(w.threshold, 'g')}"
    where = w.where or "the detector reads"
    extra = [f"where {where}"] + ([f"after {w.min_tokens} tokens"] if w.min_tokens > 1 else [])
    return ", ".join([cond, *extra])


def _match(m) -> str:
    parts = ([f"clients {', '.join(m.clients)}"] if m.clients else []) + \
        [f"{k}={v}" for k, v in sorted(m.tags.items())]
    return "; ".join(parts) or "every request"


def _detail(r) -> str:
    if r.escalate is not None:
        e = r.escalate
        return (f" to {e.endpoint}: flagged -> {e.on_flagged}, clear -> {e.on_clear}, "
                f"failure -> {'block' if e.fail_closed else 'serve on'}")
    if r.shadow is not None:
        return f" (would {r.shadow.would}{', pack ' + str(r.shadow.pack) if r.shadow.pack else ''})"
    st = r.steer
    if st is not None:
        clamp = st.clamp
        what = st.vector or ("own direction" if st.direction else f"{clamp.sae}:{clamp.latent}={clamp.value:g}")
        return f" {what}" + (f" x{st.coefficient:g}" if st.coefficient is not None else "")
    return ""


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="policy")

"""`latentwatch steer build | import | export | show`: steering vectors as packs, and repeng's GGUF files.

Only typer and rich load with this module; torch, the model and the pack code load inside the
commands, so `latentwatch --help` stays fast.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from monitor.cli_common import DeviceOpt, ModelOpt, console, encode_rows, fail, load_runner, out, read_examples

app = typer.Typer(no_args_is_help=True, add_completion=False)
PackArg = Annotated[str, typer.Argument(help="a vector pack folder, or the id of a shipped one (e.g. refusal)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the manifest as JSON instead of a table")]


@app.callback()
def steer() -> None:
    """Steering vectors: build one from contrasting examples, import / export repeng control vectors, show one."""


@app.command()
def build(
    positive: Annotated[Path, typer.Option("--positive", help="JSONL of examples to steer towards: {text|messages}")],
    negative: Annotated[Path, typer.Option("--negative", help="JSONL of examples to steer away from")],
    hook_point: Annotated[
        list[str] | None,
        typer.Option(
            "--hook-point",
            help="where to steer, e.g. blocks.12.resid_post (repeatable; --method probe: "
            "the probe's own hook point, the default)",
        ),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="diff_means (CAA), pca (RepE: rows paired by line when "
            "the files are as long), or probe (--probe's weight direction)",
        ),
    ] = "diff_means",
    probe: Annotated[
        str | None, typer.Option("--probe", help="with --method probe: a probe pack folder or shipped detector id")
    ] = None,
    pool: Annotated[
        str, typer.Option("--pool", help="last (the last prompt token, as CAA) or mean (over the scored tokens)")
    ] = "last",
    coefficient: Annotated[
        float,
        typer.Option(
            "--coefficient",
            help="default coefficient recorded in the pack (add: multiple of the vector; ablate: share removed)",
        ),
    ] = 1.0,
    kind: Annotated[str, typer.Option("--kind", help="suggested steering kind: add or ablate")] = "add",
    out_dir: Annotated[Path | None, typer.Option("--out", help="folder to write the pack to (default: ./<id>)")] = None,
    pack_id: Annotated[
        str | None,
        typer.Option("--id", help="pack id (default: the --out folder's name, else <positive>-vs-<negative>)"),
    ] = None,
    description: Annotated[str, typer.Option("--description", help="what the vector steers towards")] = "",
    raw: Annotated[bool, typer.Option("--raw", help="read examples as raw text, not as a user chat turn")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="inputs per forward pass")] = 16,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
):
    """Derive a vector per hook point from two example files; write manifest.json + vectors.safetensors."""
    from monitor.domain import HookPoint, HookPointError
    from probes.steer_build import BUILD_METHODS, POOLS
    from probes.vectors import PACK_ID, DataFile

    if method not in BUILD_METHODS:
        fail(f"--method {method!r}: use one of {', '.join(BUILD_METHODS)}")
    if (method == "probe") != (probe is not None):
        fail(
            "--probe PACK goes with --method probe"
            if probe
            else "--method probe needs --probe PACK (a probe pack folder or shipped detector id)"
        )
    if not hook_point and method != "probe":
        fail("--hook-point: give at least one, e.g. --hook-point blocks.12.resid_post")
    if pool not in POOLS:
        fail(f"--pool {pool!r}: use one of {', '.join(POOLS)}")
    if kind not in ("add", "ablate"):
        fail(f"--kind {kind!r}: use add or ablate")
    if not math.isfinite(coefficient) or (kind == "ablate" and not 0 <= coefficient <= 1):
        fail(
            f"--coefficient {coefficient}: "
            + (
                "an ablation removes a share of the projection: give 0..1"
                if kind == "ablate"
                else "give a finite number"
            )
        )
    if batch_size < 1:
        fail(f"--batch-size {batch_size}: give a positive number")
    points = []
    for name in hook_point or []:
        try:
            points.append(HookPoint.parse(name))
        except HookPointError as e:
            fail(f"--hook-point: {e}")
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        fail(f"--out {out_dir} is a file; give a folder")
    default_id = out_dir.name if out_dir is not None else f"{positive.stem}-vs-{negative.stem}"
    pack_id = pack_id or re.sub(r"[^a-z0-9_\-]+", "-", default_id.lower()).strip("-")
    if not re.fullmatch(PACK_ID, pack_id):
        fail(f"--id {pack_id!r}: use only a-z, 0-9, '_' and '-'")
    out_dir = out_dir or Path(pack_id)
    pos_rows, neg_rows = read_examples(positive, labelled=False), read_examples(negative, labelled=False)
    probe_folder = _probe_folder(probe) if probe else None
    if probe_folder is not None:
        at = _load_probe(probe_folder).manifest.hook_point  # everything but the model checked before it loads
        if points and [str(p) for p in points] != [at]:
            fail(f"--hook-point: probe {probe!r} reads {at}; leave --hook-point out or give {at}")
        points = [HookPoint.parse(at)]
    runner = load_runner(model, device)
    for p in points:
        try:
            runner.hooks.resolve(p)
        except HookPointError as e:
            fail(f"--hook-point: {e}")
    probe_pack = _load_probe(probe_folder, runner.fingerprint) if probe_folder is not None else None
    pos_items = encode_rows(runner, pos_rows, chat=not raw, source=positive)
    neg_items = encode_rows(runner, neg_rows, chat=not raw, source=negative)
    data = [
        DataFile(role=role, path=str(path), rows=len(rows), sha256=hashlib.sha256(path.read_bytes()).hexdigest())
        for role, path, rows in (("positive", positive, pos_rows), ("negative", negative, neg_rows))
    ]
    from probes.steer_build import build_vector
    from probes.vectors import save_vector_pack

    try:
        pack = build_vector(
            runner,
            pos_items,
            neg_items,
            points,
            pack_id=pack_id,
            method=method,
            pool=pool,
            probe=probe_pack,
            data=data,
            input_format="raw" if raw else "chat",
            default_coefficient=coefficient,
            kind=kind,
            description=description,
            batch_size=batch_size,
            progress=True,
        )
        pack = save_vector_pack(pack, out_dir)
    except (ValueError, OSError) as e:  # VectorPackError is a ValueError
        fail(str(e))
    _print_pack(pack, as_json)
    console.print(f"[green]wrote[/] {out_dir}  ({len(pos_rows)} positive, {len(neg_rows)} negative examples)")


@app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="a repeng control vector (.gguf, from ControlVector.export_gguf)")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="folder to write the pack to (default: ./<id>)")] = None,
    pack_id: Annotated[str | None, typer.Option("--id", help="pack id (default: the file's name)")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="check the vector against this model (HF id, folder, "
            "GGUF) and record its fingerprint; without it no model loads and a "
            "use checks only d_model and the model type",
        ),
    ] = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
):
    """Convert a repeng GGUF control vector into a pack: direction.<i> becomes blocks.<i>.resid_post."""
    from probes.vectors import PACK_ID, import_repeng_gguf, save_vector_pack

    if pack_id is not None and not re.fullmatch(PACK_ID, pack_id):
        fail(f"--id {pack_id!r}: use only a-z, 0-9, '_' and '-'")
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        fail(f"--out {out_dir} is a file; give a folder")
    try:
        import_repeng_gguf(file, pack_id=pack_id)  # a bad file fails before any model loads
    except ValueError as e:
        fail(str(e))
    fingerprint = load_runner(model, device).fingerprint if model is not None else None
    try:
        pack = import_repeng_gguf(file, pack_id=pack_id, model=fingerprint)
        pack = save_vector_pack(pack, out_dir or Path(pack.id))
    except (ValueError, OSError) as e:
        fail(str(e))
    _print_pack(pack, as_json)
    console.print(f"[green]wrote[/] {pack.source}")


@app.command()
def export(
    pack_ref: PackArg,
    out_file: Annotated[
        Path,
        typer.Option(
            "--out", help="the .gguf file to write (repeng's layout; llama.cpp's --control-vector reads it too)"
        ),
    ],
):
    """Write a pack as a repeng control vector: blocks.<i>.resid_post becomes direction.<i>."""
    from probes.vectors import export_repeng_gguf, open_vector_pack

    if out_file.is_dir():
        fail(f"--out {out_file} is a folder; give the .gguf file to write")
    if not out_file.parent.is_dir():
        fail(f"--out {out_file}: folder {out_file.parent} does not exist")
    try:
        pack = open_vector_pack(pack_ref)
        export_repeng_gguf(pack, out_file)
    except (ValueError, OSError) as e:
        fail(str(e))
    layers = [p.layer for p in pack.directions]
    console.print(f"[green]wrote[/] {out_file}  ({len(layers)} directions, layers {', '.join(map(str, layers))})")
    if 0 in layers:
        console.print(
            "[yellow]note:[/] llama.cpp's loader rejects direction.0 (it cannot steer block 0's output); "
            "repeng reads it"
        )


@app.command()
def show(pack_ref: PackArg, as_json: JsonOpt = False):
    """A pack's vectors: hook point, norm, class separation, cosine with the difference of means."""
    from probes.vectors import open_vector_pack

    try:
        pack = open_vector_pack(pack_ref)
    except ValueError as e:
        fail(str(e))
    _print_pack(pack, as_json)


def _probe_folder(ref: str) -> Path:
    from probes.pack import PackError, shipped_packs

    try:
        shipped = shipped_packs()
    except PackError as e:
        fail(f"--probe: {e}")
    return shipped[ref][0] if ref in shipped else Path(ref)


def _load_probe(folder: Path, expect=None):
    from probes.pack import ProbePack

    try:
        return ProbePack.load(folder, expect)
    except ValueError as e:
        fail(f"--probe: {e}")


def _print_pack(pack, as_json: bool) -> None:
    m = pack.manifest
    if as_json:
        print(json.dumps(m.model_dump(mode="json"), indent=2))
        return
    model = f"{m.model.architecture}, {m.model.num_layers} blocks" if m.model else f"model type {m.model_hint}"
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    out.print(
        f"[bold]{m.id}[/]: {m.method}, {m.kind} x {m.default_coefficient:g}, d_model {m.d_model} ({model})",
        highlight=False,
    )
    table = Table("hook point", "norm", "separation (d)", "cosine vs diff_means")
    for h in m.hook_points:
        table.add_row(h.hook_point, f"{h.norm:.3f}", fmt(h.separation), fmt(h.cosine_diff_means))
    out.print(table)
    if refusal := m.evaluation.get("refusal"):  # what bench/refusal_vector.py measured, when it was recorded
        out.print(
            f"refusal rate ({refusal['positions']} positions, {refusal['decoding']}, "
            f"{refusal['max_new_tokens']} tokens): {refusal['harmful']} / {refusal['benign']}",
            highlight=False,
        )
        table = Table("coefficient", "harmful refused", "benign refused", "benign perplexity")
        for r in refusal["rows"]:
            table.add_row(
                f"{r['coefficient']:g}",
                f"{r['harmful_refusal']:.0%}",
                f"{r['benign_refusal']:.0%}",
                f"{r['benign_perplexity']:.2f}",
            )
        out.print(table)


def register(main: typer.Typer) -> None:
    main.add_typer(app, name="steer")

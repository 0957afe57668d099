"""`latentwatch features search`: the SAE latents that tell a positive from a negative example set.

Everything that can be wrong without the model (options, data files, the SAE's files) is checked
before the model loads; every error is one line naming what to fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from monitor.cli_common import DeviceOpt, ModelOpt, console, encode_rows, fail, load_runner, locate, out, read_examples

app = typer.Typer(no_args_is_help=True, add_completion=False)
FORMATS = ("table", "json", "html")
DEFAULT_HTML = Path("features.html")


@app.callback()  # a group even with one command, so `search` keeps its name standalone and when registered
def features() -> None:
    """Find SAE latents that fire differently on two example sets."""


def top_tokens_text(latent, width: int = 48) -> str:
    """The distinct texts of a latent's top tokens, most frequent first, quoted and cut to `width`."""
    counts: dict[str, int] = {}
    for t in latent.top_tokens:
        counts[t.text] = counts.get(t.text, 0) + 1
    shown = " ".join(json.dumps(s, ensure_ascii=False) + (f"×{n}" if n > 1 else "")
                     for s, n in sorted(counts.items(), key=lambda sn: -sn[1]))
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def print_table(search) -> None:
    table = Table("latent", "AUROC", "Cohen's d", "ex+ fire", "ex- fire", "tok+ fire", "tok- fire", "mean max+",
                  "mean max-", "top tokens",
                  title=f"{search.sae} @ {search.hook_point}: {search.positive} vs {search.negative}")
    for latent in search.latents:
        table.add_row(str(latent.latent), f"{latent.auroc:.3f}", f"{latent.cohens_d:.2f}",
                      f"{latent.fire_rate_pos:.1%}", f"{latent.fire_rate_neg:.1%}", f"{latent.token_rate_pos:.2%}",
                      f"{latent.token_rate_neg:.2%}", f"{latent.mean_max_pos:.3g}", f"{latent.mean_max_neg:.3g}",
                      Text(top_tokens_text(latent)))
    out.print(table)


@app.command()
def search(
    positive: Annotated[Path, typer.Option("--positive", help="JSONL examples the latents should fire on: "
                                           "{text|messages} per line")],
    negative: Annotated[Path, typer.Option("--negative", help="JSONL examples to contrast them with")],
    sae: Annotated[str, typer.Option("--sae", help="SAE folder (SAELens, Gemma Scope params.npz, sparsify or "
                                    "latentwatch) or the id of a shipped SAE, e.g. topk-18-resid-post-4096")],
    hook_point: Annotated[str | None, typer.Option("--hook-point", help="where the SAE reads, for a folder whose "
                                                   "files do not say (e.g. blocks.6.resid_post)")] = None,
    top: Annotated[int, typer.Option("--top", help="latents to report")] = 20,
    contexts: Annotated[int, typer.Option("--contexts", help="top-activating tokens kept per latent")] = 8,
    window: Annotated[int, typer.Option("--window", help="tokens of context each side of a top token")] = 8,
    sort: Annotated[str, typer.Option("--sort", help="auroc: |AUROC - 0.5|; d: |Cohen's d| (both of per-example "
                                      "max activation)")] = "auroc",
    fmt: Annotated[str, typer.Option("--format", help="table, json (to stdout or --out) or html "
                                     f"(to --out, default {DEFAULT_HTML})")] = "table",
    out_file: Annotated[Path | None, typer.Option("--out", help="file for json or html output")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="read text as raw text, not as a user chat turn")] = False,
    batch_size: int = 16,
    model: ModelOpt = None,
    device: DeviceOpt = None,
):
    """Rank SAE latents by how well their per-example max activation separates --positive from --negative."""
    from monitor.sae import SAEError, load_sae
    from monitor.sae.store import resolve
    from probes.features import SORTS, NoReadableTokens, search_features, write_html

    if fmt not in FORMATS:
        fail(f"unknown --format {fmt!r}; use {', '.join(FORMATS)}")
    if sort not in SORTS:
        fail(f"unknown --sort {sort!r}; use {' or '.join(SORTS)}")
    for flag, value, least in (("--top", top, 1), ("--contexts", contexts, 0), ("--window", window, 0),
                               ("--batch-size", batch_size, 1)):
        if value < least:
            fail(f"{flag} must be at least {least}, got {value}")
    if out_file is not None and fmt == "table":
        fail("--out writes json or html: add --format json or --format html")
    sets = {"positive": (positive, read_examples(positive, labelled=False)),
            "negative": (negative, read_examples(negative, labelled=False))}
    try:
        loaded = load_sae(resolve(sae), hook_point=hook_point)
    except SAEError as e:
        fail(str(e))
    runner = load_runner(model, device)
    items = [encode_rows(runner, rows, chat=not raw, source=path) for path, rows in sets.values()]
    try:
        result = search_features(runner, loaded, *items, top=top, contexts=contexts, window=window, sort=sort,
                                 batch_size=batch_size, names=(str(positive), str(negative)), progress=True)
    except NoReadableTokens as e:
        path, rows = sets[e.side]
        fail(f"{locate(path, e.index, rows[e.index])}: {e}")
    except ValueError as e:
        fail(str(e))
    if fmt == "table":
        print_table(result)
        return
    listing = json.dumps([latent.to_dict() for latent in result.latents], indent=2)
    if fmt == "json" and out_file is None:
        print(listing)
        return
    path = out_file or DEFAULT_HTML
    try:
        if fmt == "html":
            write_html(path, result)
        else:
            path.write_text(listing + "\n", encoding="utf-8")
    except OSError as e:
        fail(f"cannot write {path}: {e}")
    console.print(f"[green]wrote[/] {path}  ({len(result.latents)} latents)")


def register(main: typer.Typer) -> None:
    main.add_typer(app, name="features")

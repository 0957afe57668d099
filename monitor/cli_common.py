"""What every `latentwatch` command shares: the consoles, `fail()`, the model options, and loading
the model and example files with one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)
# Tables go to stdout; when piped, rich would squeeze them to 80 columns and cut ids short.
out = Console() if sys.stdout.isatty() else Console(width=200)


def fail(message: str, code: int = 2) -> None:
    """One line on stderr that says what to fix, then exit (never a traceback)."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


ModelOpt = Annotated[str | None, typer.Option("--model", help="HF id, local folder, GGUF file; default SmolLM2-135M")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cuda / cpu (default: cuda when available)")]


def load_runner(model: str | None, device: str | None):
    from monitor.runner import ModelRunner

    with console.status(f"loading model {model or 'SmolLM2-135M-Instruct (default)'}..."):
        try:
            return ModelRunner.load(model, device=device)
        except (OSError, ValueError) as e:
            fail(f"cannot load model {model!r}: {e}")


def read_examples(path: Path, *, labelled: bool):
    from probes.data import DataError, read_jsonl

    try:
        return read_jsonl(path, labelled=labelled)
    except (DataError, OSError) as e:
        fail(str(e))


def locate(source: Path | str, i: int, example) -> str:
    """`file:line (id ...)` of the i-th example read from `source`, a JSONL file or a named set."""
    if isinstance(source, Path):
        with source.open(encoding="utf-8-sig") as f:  # as read_jsonl reads it: blank lines hold no example
            where = f"{source}:{[n for n, line in enumerate(f, 1) if line.strip()][i]}"
    else:
        where = f"{source} row {i + 1}"
    return where + (f" (id {example.id})" if example.id is not None else "")


def encode_rows(runner, examples, *, chat: bool, source: Path | str) -> list:
    """Encode every example; one the model cannot take is an error naming it and what to fix."""
    from monitor.runner import InputError, InputTooLong

    items = []
    for i, ex in enumerate(examples):
        try:
            items.append(runner.encode(text=ex.text, messages=ex.messages, chat=chat, score_suffix=ex.score_suffix))
        except InputError as e:
            fail(f"{locate(source, i, ex)}: {e}" + ("; shorten or split it" if isinstance(e, InputTooLong) else ""))
    return items

"""How the CLI tests call `latentwatch` in-process and read what it said."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from monitor import cli


def run(*args, env=None):
    return CliRunner().invoke(cli.app, [str(a) for a in args], env=env)


def error_line(result, code=2) -> str:
    """The one `error:` line a failed command prints; never a traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def write_jsonl(path, rows):
    """One JSON object per line (None: an empty line)."""
    path.write_text("".join(json.dumps(r) + "\n" if r is not None else "\n" for r in rows))
    return path

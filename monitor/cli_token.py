"""`latentwatch token new` and `latentwatch token hash`: bearer tokens for `serve --auth-tokens`.

The token file holds only each token's sha256, so these print the entry to add; a token itself
is shown once (`new`) or read from stdin (`hash`), never taken from the command line, where
`ps` and the shell history would keep it.
"""

from __future__ import annotations

import getpass
import json
import secrets
import sys
from typing import Annotated

import typer

from monitor.cli_common import console, fail
from monitor.cli_serve import summarise
from monitor.domain import AUTH_ROLES

app = typer.Typer(no_args_is_help=True, help="Bearer tokens for `serve --auth-tokens`.")
ClientOpt = Annotated[str, typer.Option("--client-id", help="The client id the token speaks for.")]
RolesOpt = Annotated[str, typer.Option("--roles", help=f"Comma-separated, of: {', '.join(AUTH_ROLES)}.")]
MIN_LENGTH = 16


def entry(token: str, client_id: str, roles: str) -> str:
    """The token file entry for `token`, validated as the server will (one line of YAML)."""
    from pydantic import ValidationError

    from monitor.auth import TokenEntry, digest

    names = [r.strip() for r in roles.split(",") if r.strip()]
    try:
        e = TokenEntry(sha256=digest(token), client_id=client_id, roles=names)
    except ValidationError as err:
        fail(summarise(err).replace("Value error, ", ""))
    return "- " + json.dumps({"sha256": e.sha256, "client_id": e.client_id, "roles": list(e.roles)})


@app.command()
def new(client_id: ClientOpt, roles: RolesOpt = "generate") -> None:
    """Print a fresh random token on stdout, once; the entry to add to the token file goes to stderr."""
    token = "lw_" + secrets.token_urlsafe(32)
    line = entry(token, client_id, roles)
    typer.echo(token)
    console.print(f"add to the --auth-tokens file (the token is not shown again):\n{line}", markup=False,
                  highlight=False, soft_wrap=True)


@app.command("hash")
def hash_token(client_id: ClientOpt, roles: RolesOpt = "generate") -> None:
    """Print the token file entry for a token read from stdin (typed without echo on a terminal)."""
    token = getpass.getpass("token: ") if sys.stdin.isatty() else sys.stdin.read().strip()
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        fail("the token must be printable ASCII without spaces (it travels in an HTTP/2 header)")
    if len(token) < MIN_LENGTH:
        fail(f"the token has {len(token)} characters: at least {MIN_LENGTH}, or use `latentwatch token new`")
    typer.echo(entry(token, client_id, roles))


def register(main: typer.Typer) -> None:
    main.add_typer(app, name="token")

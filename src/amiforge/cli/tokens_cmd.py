"""amiforge tokens create|list|revoke: who may use the web console and API (`amiforge serve`)."""

from __future__ import annotations

import typer
from rich.markup import escape

from amiforge.cli.common import JsonOption, open_registry
from amiforge.cli.output import console, emit_json, err_console
from amiforge.cli.tables import Col, fit_table

app = typer.Typer(help="Tokens of the web console and API (read, operate, admin).", no_args_is_help=True)


@app.command("create")
def create(
    name: str = typer.Argument(..., help="A name for it: events name its requests' actor token:NAME."),
    role: str = typer.Option("read", "--role", help="read (sees), operate (promotes, rolls out) or admin (tokens)."),
    as_json: bool = JsonOption,
) -> None:
    """Make a token and print its secret, once: the registry keeps only its hash."""
    from amiforge.lifecycle.documents import TokenRow
    from amiforge.lifecycle.tokens import create_token

    settings, store = open_registry()
    created = create_token(name, role, store=store, settings=settings)
    if as_json:
        emit_json({"token": TokenRow.of(created.token), "secret": created.secret})
        return
    err_console.print(f"token {escape(name)} ({escape(role)}) created; its secret, shown only this once:")
    typer.echo(created.secret)


@app.command("list")
def list_tokens(as_json: bool = JsonOption) -> None:
    """Every token with its role, who made it, when it was last used, and whether it is revoked."""
    from amiforge.lifecycle.documents import TokenRow
    from amiforge.lifecycle.tokens import list_tokens

    _, store = open_registry()
    rows = [TokenRow.of(t) for t in list_tokens(store)]
    if as_json:
        emit_json(rows)
        return
    if not rows:
        console.print("no tokens yet: `amiforge tokens create NAME --role read` (or start `amiforge serve`)")
        return
    stamp = "%Y-%m-%d %H:%M"
    fit_table(
        [Col("name", whole=True), Col("role", whole=True), Col("created", drop=3), Col("by", drop=2),
         Col("last used", drop=1), Col("revoked", whole=True)],
        [[escape(r.name), r.role, f"{r.created_at:{stamp}}", escape(r.created_by),
          f"{r.last_used_at:{stamp}}" if r.last_used_at else "-", f"{r.revoked_at:{stamp}}" if r.revoked_at else "-"]
         for r in rows],
    )  # fmt: skip


@app.command("revoke")
def revoke(name: str = typer.Argument(..., help="The token's name."), as_json: bool = JsonOption) -> None:
    """Revoke a token: its requests and browser sessions are refused from the next request on."""
    from amiforge.lifecycle.documents import TokenRow
    from amiforge.lifecycle.tokens import revoke_token

    settings, store = open_registry()
    revoked = revoke_token(name, store=store, settings=settings)
    if as_json:
        emit_json({"token": TokenRow.of(revoked.token), "changed": revoked.changed})
        return
    console.print(f"token {escape(name)} " + ("revoked" if revoked.changed else "was already revoked"))

"""``pacs-ai users``: the people who log in to the worklist (add, list, disable, enable)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from pacs_ai.cli.common import JsonOption, console, index_sessions, print_rows, settings_of
from pacs_ai.index.audit import record_audit
from pacs_ai.index.db import session_scope
from pacs_ai.index.reports import Role
from pacs_ai.worklist.users import UserError, add_user, list_users, set_active

users_app = typer.Typer(help="Worklist users and their roles.", no_args_is_help=True)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            console.print("[red]no password on standard input[/red]")
            raise typer.Exit(2)
        return password
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


@users_app.command("add")
def users_add(
    ctx: typer.Context,
    username: Annotated[str, typer.Argument(help="Login name.")],
    role: Annotated[Role, typer.Option("--role", help="radiologist (reads and signs) or admin.")],
    display_name: Annotated[
        str | None,
        typer.Option("--name", help='Name as written into signed reports, DICOM style "Family^Given".'),
    ] = None,
    password_stdin: Annotated[
        bool,
        typer.Option("--password-stdin", help="Read the password from the first line of standard input."),
    ] = False,
) -> None:
    """Create a user; the password is prompted for (twice) unless --password-stdin."""
    sessions = index_sessions(settings_of(ctx))
    password = _read_password(password_stdin)
    try:
        with session_scope(sessions) as session:
            user = add_user(session, username, password, role, display_name)
            record_audit(
                session,
                actor="cli",
                action="user.added",
                object_type="user",
                detail={"username": user.username, "role": user.role.value},
            )
    except UserError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(f"user {username} ({role.value}) added")


@users_app.command("list")
def users_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Users with role, state and last login."""
    with session_scope(index_sessions(settings_of(ctx))) as session:
        rows = [
            {
                "username": u.username,
                "name": u.display_name,
                "role": u.role.value,
                "active": u.active,
                "last_login_at": u.last_login_at.isoformat() if u.last_login_at else None,
            }
            for u in list_users(session)
        ]
    print_rows(rows, ["username", "name", "role", "active", "last_login_at"], "Users", as_json)


def _set_active(ctx: typer.Context, username: str, active: bool) -> None:
    try:
        with session_scope(index_sessions(settings_of(ctx))) as session:
            set_active(session, username, active)
            record_audit(
                session,
                actor="cli",
                action="user.enabled" if active else "user.disabled",
                object_type="user",
                detail={"username": username},
            )
    except UserError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(f"user {username} {'enabled' if active else 'disabled'}")


@users_app.command("disable")
def users_disable(ctx: typer.Context, username: Annotated[str, typer.Argument(help="Login name.")]) -> None:
    """Stop a user from logging in; their open sessions end at the next request."""
    _set_active(ctx, username, False)


@users_app.command("enable")
def users_enable(ctx: typer.Context, username: Annotated[str, typer.Argument(help="Login name.")]) -> None:
    """Allow a disabled user to log in again."""
    _set_active(ctx, username, True)

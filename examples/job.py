"""A command-line job on the notes service's own container: one request scope per unit of work.

Run it on the notes app's database, with a CSV of email,name,note lines on stdin:

    printf 'ada@example.com,Ada,buy milk\\nbob@example.com,Bob,\\n' | python -m examples.job import-notes -
    python -m examples.job list

Each user's notes are one unit of work, run by a function decorated with
`@request_scope()`: it gets its own Session, committed when the function returns
and rolled back when it raises. So Bob's blank note fails Bob's import only (his
registration included), while Ada's notes are saved. Outside HTTP nothing opens
the scope or starts the engine for us: the decorator opens the scope, and `main()`
initialises the container's resources and shuts them down (`engine.dispose()`).

The scoped functions take the container and resolve what they need inside the
scope. `Provide[...]` parameters work too, with `@request_scope()` above `@inject`,
so that injection happens inside the scope.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Iterable
from typing import TextIO

from sqlalchemy import select

from di_request_scope import request_scope

from .notes_app.containers import Container
from .notes_app.models import User
from .notes_app.services import InvalidNoteError

DEFAULT_DATABASE_URL = "sqlite:///notes.sqlite3"  # the notes app's default


@request_scope()
def import_user_notes(container: Container, email: str, name: str, texts: list[str]) -> int:
    """One unit of work: register the user if new, add the notes; all of it or nothing."""
    # Resolved inside the scope: the service and the repository share its one Session.
    service, users = container.service(), container.users()
    user = users.by_email(email) or service.register(email, name)
    return len(service.add_notes(user.id, texts))


@request_scope()
def list_notes(container: Container) -> None:
    session = container.session()
    for user in session.scalars(select(User).order_by(User.id)):
        print(f"{user.email} ({user.name}): {', '.join(note.text for note in user.notes) or '-'}")


def import_notes(container: Container, lines: Iterable[list[str]]) -> int:
    """Import every user's notes in a unit of work of its own; 1 if any of them failed."""
    batches: dict[str, tuple[str, list[str]]] = {}
    for number, line in enumerate(lines, start=1):
        if len(line) != 3:
            print(f"line {number}: expected email,name,note, got {line}", file=sys.stderr)
            return 2
        email, name, text = line
        batches.setdefault(email, (name, []))[1].append(text)

    failed = 0
    for email, (name, texts) in batches.items():
        try:
            count = import_user_notes(container, email, name, texts)
        except InvalidNoteError as exc:
            failed += 1
            print(f"{email}: failed ({exc}), nothing of it was saved")
        else:
            print(f"{email}: imported {count} note(s)")
    return 1 if failed else 0


def read_csv(path: str) -> list[list[str]]:
    def rows(file: TextIO) -> list[list[str]]:
        return [line for line in csv.reader(file) if line]

    if path == "-":
        return rows(sys.stdin)
    with open(path, newline="", encoding="utf-8") as file:
        return rows(file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.job", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("NOTES_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="SQLAlchemy URL (default: $NOTES_DATABASE_URL, else %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    importing = commands.add_parser("import-notes", help="import email,name,note lines from a CSV file")
    importing.add_argument("file", help='the CSV file, or "-" for stdin')
    commands.add_parser("list", help="print every user and their notes")
    args = parser.parse_args(argv)

    container = Container()
    container.config.database_url.from_value(args.database_url)
    container.init_resources()  # the engine and the tables; under HTTP, the app's lifespan does it
    try:
        if args.command == "import-notes":
            return import_notes(container, read_csv(args.file))
        list_notes(container)
        return 0
    finally:
        container.shutdown_resources()  # engine.dispose()


if __name__ == "__main__":
    sys.exit(main())

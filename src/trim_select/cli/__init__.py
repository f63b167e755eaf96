"""Command line: a thin layer that parses arguments into configs and calls the library.

Each command group lives in its own module and registers itself on ``app``.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="trim-select",
    help="TRIM targeted data selection: pick the pool examples that match a few target examples.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# registers select, fingerprint, score; then the commands of later stages present in this build
from . import core, extras  # noqa: E402,F401


def main() -> None:
    app()

"""Where the commands write: results to stdout, errors and warnings to stderr."""
from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["out", "err", "fail"]

out = Console()
err = Console(stderr=True)


def fail(exc: BaseException) -> typer.Exit:
    """Print a user error as one paragraph on stderr; return the Exit to raise."""
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)

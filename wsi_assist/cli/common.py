"""What the commands share: the --debug state and turning library errors into one line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import typer

from wsi_assist.errors import WsiAssistError


@dataclass
class _State:
    debug: bool = False


state = _State()


@contextlib.contextmanager
def user_errors(code: int = 2) -> Iterator[None]:
    """Print a WsiAssistError as one line and exit with ``code`` (traceback with --debug)."""
    try:
        yield
    except WsiAssistError as e:
        if state.debug:
            raise
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code) from None

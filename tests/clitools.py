"""Running the CLI in-process (typer's CliRunner) and checking its one-paragraph errors."""
from __future__ import annotations

from typing import Any

from typer.testing import CliRunner

from cli.app import app

runner = CliRunner()


def run_cli(*args: str) -> Any:
    """``fxreplay ARGS`` in this process; the result has ``exit_code`` and ``output``."""
    return runner.invoke(app, list(args))


def assert_user_error(result: Any, *needles: str) -> str:
    """The command failed as a user error should: exit code 1, one paragraph naming every
    needle (whitespace-normalised, so rich's line wrapping does not matter), no traceback.
    Returns the normalised message."""
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.output.strip().count("\n\n") == 0, f"more than one paragraph:\n{result.output}"
    for needle in needles:
        assert needle in text, text
    return text

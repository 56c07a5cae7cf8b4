"""The ``fxreplay`` command line (a thin typer shell over the library).

Ctrl-C while the command is still starting -- importing torch takes seconds, before any
command code runs to catch it -- ends it with one line and status 130, instead of a
KeyboardInterrupt traceback (or, inside torch's C++ start-up, an abort): this package is
imported first, and when it is the ``fxreplay`` command that runs, SIGINT quits at once until
:func:`cli.app.main` hands it back to Python (KeyboardInterrupt, which the commands handle).
"""
from __future__ import annotations

import os
import signal
import sys
from types import FrameType

STARTING = b"interrupted while fxreplay was starting: nothing was run or written.\n"


def _quit_while_starting(signum: int, frame: FrameType | None) -> None:
    # No exception: raised inside an import that runs C++ (torch's), one aborts the process.
    os.write(2, STARTING)
    os._exit(128 + signum)


def _is_the_command() -> bool:
    """The ``fxreplay`` console script or ``python -m fxreplay`` (not a program importing ``cli``)."""
    first = sys.argv[0] if sys.argv else ""
    return os.path.basename(first) == "fxreplay" or first.endswith(os.path.join("fxreplay", "__main__.py"))


if _is_the_command() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _quit_while_starting)

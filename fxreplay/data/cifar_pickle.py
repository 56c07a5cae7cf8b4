"""Reading CIFAR's pickled batch files without letting a file run code.

The official CIFAR-10/100 "python version" files are pickles of a dict: ``data`` a uint8
numpy array, ``labels`` / ``fine_labels`` lists of ints, ``filenames`` and ``batch_label``
strings, ``label_names`` a list of strings. ``pickle.load`` on such a file calls whatever
global the file names -- ``os.system`` as easily as ``numpy.ndarray`` -- so a crafted file
runs code when read. torchvision does just that; with ``verify: true`` its md5 check first
makes sure the files are the official ones, with ``verify: false`` (a re-packed copy) nothing
does. :func:`load` reads them with an unpickler that knows only the globals a CIFAR file
needs to rebuild those values (numpy's array and dtype reconstructors, and the ``_codecs``
call Python 3 pickles use for bytes) and refuses any other, naming it.

>>> entry = load("data/cifar-10-batches-py/data_batch_1")   # doctest: +SKIP
>>> entry["data"].shape                                       # doctest: +SKIP
(10000, 3072)
"""
from __future__ import annotations

import codecs
import os
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np

from fxreplay.errors import DataError

__all__ = ["load", "CifarUnpickler"]


class _Refused(pickle.UnpicklingError):
    """A file asked for something no CIFAR file holds."""


def _latin1(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 pickles of bytes call it (protocol < 3): latin-1 only."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise _Refused(f"it calls _codecs.encode with encoding {encoding!r} (a CIFAR file encodes bytes as latin-1)")
    return codecs.encode(text, "latin-1", errors)


def _dtype(*args: Any) -> np.dtype[Any]:
    """``numpy.dtype`` for arrays of numbers; an object dtype would hold Python objects, which no CIFAR file has."""
    made = np.dtype(*args)
    if made.hasobject:
        raise _Refused(f"it holds a numpy array of Python objects (dtype {made}); CIFAR arrays hold numbers")
    return made


def _allowed() -> dict[tuple[str, str], Callable[..., Any]]:
    try:  # numpy >= 2 names its internals numpy._core; files written with numpy 1 say numpy.core
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    table: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _dtype,
        ("_codecs", "encode"): _latin1,
    }
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{core}.multiarray", "scalar")] = multiarray.scalar  # numpy ints as labels
        table[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer  # arrays in protocol 5
    return table


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds dicts, lists, tuples, strings, bytes, numbers and numpy
    arrays of numbers, and refuses every other global a file names."""

    ALLOWED = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        found = self.ALLOWED.get((module, name))
        if found is None:
            raise _Refused(f"it names {module}.{name}, which no CIFAR file holds")
        return found


def load(path: str | os.PathLike[str]) -> Any:
    """One CIFAR batch or meta file, read with :class:`CifarUnpickler` (latin-1 strings, as
    torchvision reads them).

    Raises:
        DataError: the file would call something CIFAR files never do (a crafted file: its
            code does not run), naming the file and the call.
        pickle.UnpicklingError, EOFError, ValueError: the file is damaged (the caller says
            that the files are unreadable).
    """
    with open(path, "rb") as f:
        try:
            return CifarUnpickler(f, encoding="latin1").load()
        except _Refused as exc:
            raise DataError(
                f"refused to read {os.fspath(path)}: {exc}. A CIFAR file holds only dicts, lists, strings and numpy "
                "arrays; one that names anything else was made to run code when read (pickle runs what a file names), "
                "and fxreplay did not run it. Replace the file with the official one (`download: true` on a machine "
                "with internet) or a re-packed copy you made yourself."
            ) from None

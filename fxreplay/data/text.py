"""Byte-level language modelling data (``text:PATH``, ``text:`` for the built-in corpus)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

from fxreplay.errors import DataError


# ------------------------------------------------------------------------ text:PATH

TEXT_VOCAB = 256
"""Byte-level language modelling: a token is a byte."""

VALIDATION_SHARE = 10
"""The last 1/10 of a text's byte stream is its validation split, the rest its training split."""

DEFAULT_CORPUS_BYTES = 2**20
"""The built-in corpus's size: 1 MiB, an epoch of gpt_tiny (batch 32, block 64) in a few minutes on 2 CPU cores."""


class TextBytes(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Next-byte prediction on a byte stream, in blocks of ``block_size``: example i is
    ``(stream[i*B : i*B+B], stream[i*B+1 : i*B+B+1])`` as int64 tensors (B = block_size), so
    there are ``(len(stream) - 1) // B`` examples and the target is the input shifted by one.

    Attributes:
        num_classes: 256, the vocabulary: what the model is built with.
        source: where the bytes came from (for messages).
    """

    num_classes = TEXT_VOCAB

    def __init__(self, stream: torch.Tensor, block_size: int, source: str) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.stream, self.block_size, self.source = stream, block_size, source

    def __len__(self) -> int:
        return max(0, (len(self.stream) - 1) // self.block_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"example {index} of {n}")
        start = (int(index) % n) * self.block_size
        chunk = self.stream[start : start + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]

    @property
    def targets(self) -> torch.Tensor:
        """Every example's target bytes, ``(len(self), block_size)`` uint8 (a view: no copy):
        what :func:`check_labels` and :func:`labels_only` read instead of slicing examples."""
        n, b = len(self), self.block_size
        return self.stream[1 : 1 + n * b].view(n, b)


def default_corpus(limit: int = DEFAULT_CORPUS_BYTES) -> bytes:
    """The built-in text (``text:``): the first ``limit`` bytes of the Python standard
    library's own source -- every ``*.py`` file directly in ``os.path.dirname(os.__file__)``
    (not its subfolders), in file-name order (code points), each file's bytes as they are,
    concatenated. Every Python installation has it, offline; another Python version gives
    another corpus (the same version, the same bytes)."""
    folder = Path(os.path.dirname(os.__file__))
    chunks, size = [], 0
    for path in sorted((p for p in folder.glob("*.py") if p.is_file()), key=lambda p: p.name):
        if size >= limit:
            break
        chunks.append(path.read_bytes())
        size += len(chunks[-1])
    return b"".join(chunks)[:limit]


def _text_bytes(path: str) -> tuple[bytes, str]:
    if path in ("", "default"):
        corpus = default_corpus()
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        return corpus, f"the built-in corpus (Python {version}'s standard library source, {len(corpus)} bytes)"
    where = Path(path)
    try:
        if where.is_file():
            return where.read_bytes(), str(where)
        if where.is_dir():
            files = sorted((f for f in where.rglob("*") if f.is_file()
                            and not any(part.startswith(".") for part in f.relative_to(where).parts)),
                           key=lambda f: f.relative_to(where).as_posix())
            if not files:
                raise DataError(f"text:{path}: the directory holds no files (hidden ones are skipped). Put text files "
                                "in it, or give a file.")
            return b"".join(f.read_bytes() for f in files), f"{len(files)} files under {where}"
    except OSError as exc:
        raise DataError(f"text:{path}: cannot read it: {exc}") from exc
    raise DataError(f"text:{path}: no such file or directory (relative to {os.getcwd()}). Give a text file or a "
                    "directory of text files, or text: for the built-in corpus (the Python standard library's source).")


def text_datasets(path: str, block_size: int) -> tuple[TextBytes, TextBytes]:
    """``(train, validation)`` for byte-level language modelling on ``path``: a file, a
    directory (every file under it, hidden ones skipped, in the order of their relative paths,
    concatenated) or ``""`` / ``"default"`` (:func:`default_corpus`). The last tenth of the
    byte stream (``len // 10`` bytes) is the validation split, the rest the training split;
    each is cut into :class:`TextBytes` blocks. Deterministic: the same bytes, the same examples.

    Raises:
        DataError: the path is missing or unreadable, or too short for one block in each split.
    """
    data, source = _text_bytes(path)
    n_val = len(data) // VALIDATION_SHARE
    need = block_size + 1
    if n_val < need:
        raise DataError(
            f"text:{path} has {len(data)} bytes; its validation split (the last tenth, {n_val} bytes) needs at least "
            f"data.block_size + 1 = {need} bytes for one example. Use at least {need * VALIDATION_SHARE} bytes of text, "
            "or a smaller data.block_size."
        )
    stream = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    split = len(data) - n_val
    return (TextBytes(stream[:split], block_size, f"{source}, training split"),
            TextBytes(stream[split:], block_size, f"{source}, validation split"))

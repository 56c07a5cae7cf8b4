"""MNIST-family files as they come: IDX files, gzip-compressed (``*.gz``) or not, in
torchvision's folder (``ROOT/FashionMNIST/raw/``) or directly in ``ROOT`` (a Debian
package's ``/usr/share/datasets/fashion-mnist/``, a download folder).

torchvision reads only the unpacked files in its own folder; where those are missing but
this finds the four files, :func:`idx_dataset` gives torchvision's own data set class with its
arrays read from them — the same images, labels and classes, nothing unpacked or written.

>>> folder = idx_folder(FashionMNIST, "/usr/share/datasets/fashion-mnist")  # doctest: +SKIP
>>> test = idx_dataset(FashionMNIST, folder, train=False, transform=None)    # doctest: +SKIP
"""
from __future__ import annotations

import gzip
import os
from typing import Any

import numpy as np
import torch
from torchvision.datasets import MNIST, VisionDataset

from fxreplay.errors import DataError

__all__ = ["read_idx", "idx_files", "idx_folder", "idx_dataset"]

_GZIP_MAGIC = b"\x1f\x8b"
_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
          0x0E: np.dtype(">f8")}  # the IDX format's type codes (LeCun's MNIST page)


def read_idx(path: str) -> torch.Tensor:
    """An IDX file (gzip-compressed or not, told by its first bytes) as a tensor.

    Raises:
        DataError: not gzip or IDX, a truncated file, or a size that does not match its header.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
        data = gzip.decompress(raw) if raw[:2] == _GZIP_MAGIC else raw
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read {path}: {exc}. Replace it with the data set's original file.") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _TYPES or not 1 <= data[3] <= 4:
        raise DataError(f"{path} is not an IDX file (its header is {data[:4].hex() or 'empty'}, expected 0000 08 0N for "
                        "unsigned bytes in N dimensions). Replace it with the data set's original file.")
    ndim, dtype = data[3], np.dtype(_TYPES[data[2]])
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = data[4 + 4 * ndim:]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(body) != expected:
        raise DataError(f"{path} holds {len(body)} bytes of data but its header says {'x'.join(map(str, shape))} "
                        f"values ({expected} bytes): the file is cut short or damaged. Replace it with the original file.")
    array = np.frombuffer(body, dtype=dtype).reshape(shape)
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("=")).copy())


def idx_files(cls: type[MNIST]) -> list[str]:
    """The unpacked names of the class's four files (``train-images-idx3-ubyte``, ...)."""
    return [os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]


def _standard(cls: type[MNIST]) -> bool:
    """Whether the class reads the four standard files (MNIST, FashionMNIST, KMNIST; not QMNIST or EMNIST)."""
    names = idx_files(cls) if isinstance(getattr(cls, "resources", None), list) else []
    return sorted(names) == sorted(f"{split}-{kind}" for split in ("train", "t10k")
                                   for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))


def _found(folder: str, name: str) -> str | None:
    for candidate in (name, name + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def idx_folder(cls: type[MNIST], root: str) -> str | None:
    """The folder under ``root`` holding all four of the class's files, plain or ``.gz``:
    torchvision's ``ROOT/<Class>/raw``, else ``ROOT`` itself; None if neither does, or if the
    class reads other files."""
    if not _standard(cls):
        return None
    for folder in (os.path.join(root, cls.__name__, "raw"), root):
        if all(_found(folder, name) is not None for name in idx_files(cls)):
            return folder
    return None


def idx_dataset(cls: type[MNIST], folder: str, train: bool, transform: Any) -> MNIST:
    """torchvision's ``cls`` with its arrays read by :func:`read_idx` from ``folder``.

    Raises:
        DataError: a file is unreadable (see :func:`read_idx`), or images and labels disagree in number.
    """
    split = "train" if train else "t10k"
    images = read_idx(_found(folder, f"{split}-images-idx3-ubyte") or "")
    labels = read_idx(_found(folder, f"{split}-labels-idx1-ubyte") or "")
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels) or images.dtype != torch.uint8:
        raise DataError(f"{cls.__name__} in {folder}: {split} images {tuple(images.shape)} ({images.dtype}) and labels "
                        f"{tuple(labels.shape)} do not fit (expected N x H x W bytes and N labels). Replace them with "
                        "the original files.")

    # torchvision's own class, built as its __init__ would be from files it cannot read (a
    # genuine instance, so it pickles like one: DataLoader workers, spawn).
    dataset = cls.__new__(cls)
    VisionDataset.__init__(dataset, os.path.dirname(folder), transform=transform)
    dataset.train = train
    dataset.data, dataset.targets = images, labels.long()
    return dataset

"""Data sets and reproducible loaders.

A data set is named by ``data.name`` (``--data``), the way models are named:

==============================  ===========================================================
``digits``                      sklearn's 8x8 handwritten digits (ships with scikit-learn)
``cifar10``, ``cifar100``       torchvision's CIFAR read from ``data.root``, the paper's
                                augmentation and normalisation
``torchvision:NAME``            any torchvision data set class taking ``root / train /
                                download / transform`` (``torchvision:FashionMNIST``)
``imagefolder:DIR``             torchvision's ``ImageFolder`` on ``DIR/train`` and ``DIR/val``
``text:PATH`` / ``text:``       byte-level language modelling on a file or a directory
                                (``text:`` alone: the built-in corpus, :func:`default_corpus`)
``file.py:fn``, ``pkg.mod:fn``  a function returning ``(train, test)`` data sets
==============================  ===========================================================

The class count a model is built with comes from the data set (:func:`num_classes_of`),
the example batch it is compiled with from its first examples (:func:`example_batch`).
``make_loader`` gives batches that are a pure function of (seed, epoch), augmentation
included, with ``skip`` to resume in the middle of an epoch on exactly the same batches.

Nothing here downloads unless the user sets ``download=True``.

Example:
    >>> train, test = build_datasets(DataConfig(name="digits"))
    >>> loader = make_loader(train, batch_size=64, shuffle=True, seed=0, epoch=3, skip=5)
"""
from __future__ import annotations

import difflib
import inspect
import os
import pickle
import sys
from collections.abc import Iterator, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset, default_collate
from torchvision import transforms
from torchvision.datasets import CIFAR10, CIFAR100, MNIST, ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from fxreplay.errors import DataError, FxReplayError, ModelLoadError

if TYPE_CHECKING:
    from fxreplay.config import DataConfig

__all__ = [
    "NUM_CLASSES",
    "INPUT_SHAPE",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "TEXT_VOCAB",
    "DEFAULT_CORPUS_BYTES",
    "parse_spec",
    "cifar",
    "cifar_transform",
    "UnverifiedCIFAR10",
    "UnverifiedCIFAR100",
    "digits",
    "torchvision_dataset",
    "image_transform",
    "image_folders",
    "TextBytes",
    "default_corpus",
    "text_datasets",
    "user_datasets",
    "make_loader",
    "SeededBatchSampler",
    "build_datasets",
    "num_classes_of",
    "example_batch",
    "check_labels",
    "subset_indices",
    "labels_only",
    "LabelsOnly",
    "replica_shard",
    "ReplicaShard",
]

NUM_CLASSES: dict[str, int] = {"digits": 10, "cifar10": 10, "cifar100": 100}
"""Classes of the data sets named without a prefix (:func:`num_classes_of` reads any set's)."""

INPUT_SHAPE: dict[str, tuple[int, ...]] = {
    "digits": (1, 8, 8),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
}
"""Shape of one example (no batch dimension) of the data sets named without a prefix."""

# Per-channel statistics of each training set (pixels in [0, 1]); the values everyone uses.
_CIFAR_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

_PREFIXED = ("torchvision", "imagefolder", "text")
_FORMS = (
    "digits, cifar10, cifar100, torchvision:NAME (e.g. torchvision:FashionMNIST), imagefolder:DIR, "
    "text:PATH (text: for the built-in corpus), or file.py:fn / pkg.module:fn (a function returning "
    "(train, test) data sets)"
)


def parse_spec(name: str) -> tuple[str, str]:
    """``data.name`` as ``(kind, argument)``: ``("digits", "")``, ``("torchvision", "MNIST")``,
    ``("imagefolder", "DIR")``, ``("text", "PATH")`` (``""`` or ``"default"``: the built-in
    corpus), ``("function", "file.py:fn")``.

    Raises:
        DataError: a name of none of these forms, or a prefix without its argument.
    """
    if name in NUM_CLASSES:
        return name, ""
    prefix, colon, rest = name.partition(":")
    if colon and prefix == "text":
        return "text", rest
    if colon and prefix in _PREFIXED:
        if not rest:
            example = "torchvision:FashionMNIST" if prefix == "torchvision" else "imagefolder:data/pets"
            raise DataError(f"data set {name!r} names no {'class' if prefix == 'torchvision' else 'directory'} after "
                            f"the colon; write it as e.g. {example} (data.name, --data).")
        return prefix, rest
    if colon and prefix and rest:
        return "function", name
    close = [f"torchvision:{n}" for n in _torchvision_datasets() if n.lower() == name.lower()]
    close = close or difflib.get_close_matches(name, list(NUM_CLASSES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise DataError(f"unknown data set {name!r}{hint} in data.name / --data. Expected {_FORMS}.")


# --------------------------------------------------------------------------- CIFAR


class UnverifiedCIFAR10(CIFAR10):
    """CIFAR-10 that checks its files exist but not their md5s (``verify: false``)."""

    # _load_meta checks batches.meta against this md5; None means "exists" only.
    meta = {**CIFAR10.meta, "md5": None}

    def _check_integrity(self) -> bool:
        folder = os.path.join(self.root, self.base_folder)
        names = [name for name, _md5 in self.train_list + self.test_list]
        return all(os.path.isfile(os.path.join(folder, name)) for name in names)


class UnverifiedCIFAR100(CIFAR100):
    """CIFAR-100 that checks its files exist but not their md5s (``verify: false``)."""

    meta = {**CIFAR100.meta, "md5": None}

    def _check_integrity(self) -> bool:
        folder = os.path.join(self.root, self.base_folder)
        names = [name for name, _md5 in self.train_list + self.test_list]
        return all(os.path.isfile(os.path.join(folder, name)) for name in names)


# name -> (class that verifies md5s, class that does not)
_CIFAR_CLASSES: dict[str, tuple[type[CIFAR10], type[CIFAR10]]] = {
    "cifar10": (CIFAR10, UnverifiedCIFAR10),
    "cifar100": (CIFAR100, UnverifiedCIFAR100),
}


def _expected_files(name: str) -> tuple[str, list[str]]:
    if name == "cifar10":
        batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
        return "cifar-10-batches-py", batches
    return "cifar-100-python", ["train", "test", "meta"]


def _advice(name: str, root: str) -> str:
    advice = "To fix: set `download: true` on a machine with internet, or put a copy there"
    if name == "cifar10":
        return advice + (
            " (e.g. the offline one: `python ../shared/data/cifar10/build.py "
            f"{root}`) and set `verify: false` if it is a re-packed copy whose md5s differ."
        )
    return advice + " and set `verify: false` if it is a re-packed copy whose md5s differ."


def cifar_transform(name: str, train: bool, augment: bool) -> transforms.Compose:
    """The paper's transform: random 4-pixel-padded crop + flip for training, then normalise."""
    mean, std = _CIFAR_STATS[name]
    steps: list[Any] = []
    if train and augment:
        steps += [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def cifar(
    name: str = "cifar10",
    root: str | os.PathLike[str] = "data",
    train: bool = True,
    augment: bool = True,
    download: bool = False,
    verify: bool = True,
) -> Dataset[Any]:
    """torchvision's CIFAR-10 or CIFAR-100 read from ``root``.

    Args:
        name: "cifar10" or "cifar100".
        root: the folder that holds ``cifar-10-batches-py/`` (or ``cifar-100-python/``).
        train: the training split (50,000 images) or the test split (10,000).
        augment: random crop + flip on the training split (the test split never is).
        download: let torchvision fetch the official archive (needs internet).
        verify: check torchvision's md5s; False checks only that the files exist.

    Raises:
        DataError: unknown name, files missing, md5 mismatch, unreadable files or a
            failed download; the message says where it looked and what to do.
    """
    if name not in _CIFAR_STATS:
        raise DataError(f"unknown CIFAR data set {name!r}; expected 'cifar10' or 'cifar100'")
    root = os.fspath(root)
    folder, files = _expected_files(name)
    where = os.path.join(os.path.abspath(root), folder)
    expected = f"{os.path.join(root, folder)}/{{{', '.join(files)}}}"
    verified, unverified = _CIFAR_CLASSES[name]
    dataset_cls = verified if verify else unverified
    missing = [f for f in files if not os.path.isfile(os.path.join(where, f))]
    if missing and not download:
        found = (
            f"that folder lacks {', '.join(missing)}"
            if os.path.isdir(where)
            else "that folder does not exist"
        )
        raise DataError(
            f"{name} not found: looked in {where} and {found}. Expected {expected} "
            f"(torchvision's python layout). {_advice(name, root)}"
        )
    try:
        return dataset_cls(
            root, train=train, transform=cifar_transform(name, train, augment), download=download
        )
    except RuntimeError as exc:
        # torchvision says "not found or corrupted" for both; the files exist by now
        # unless a download failed silently, so this is an md5 mismatch.
        if all(os.path.isfile(os.path.join(where, f)) for f in files):
            raise DataError(
                f"{name} in {where} failed torchvision's md5 integrity check (verify: true): "
                "the files are not the official ones. If this is a re-packed copy you trust "
                "(e.g. the shared JPEG-degraded CIFAR-10), set `verify: false`; otherwise "
                "replace it with the official files (`download: true` with internet)."
            ) from exc
        raise DataError(
            f"{name} not found in {where} ({exc}). Expected {expected}. {_advice(name, root)}"
        ) from exc
    except OSError as exc:  # includes urllib's URLError: no network, DNS, disk full
        raise DataError(
            f"could not download or read {name} into {where}: {exc}. There may be no "
            f"internet here; copy the files to {expected} and set `download: false`. "
            f"{_advice(name, root)}"
        ) from exc
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as exc:
        raise DataError(
            f"{name} files in {where} are unreadable ({type(exc).__name__}: {exc}); they "
            f"should be pickled dicts as in the official archive. {_advice(name, root)}"
        ) from exc


# -------------------------------------------------------------------------- digits


def digits(train: bool = True, seed: int = 0) -> TensorDataset:
    """sklearn's 1,797 8x8 handwritten digits, split 80/20 stratified by class.

    Pixels (0..16) are scaled to [0, 1], then standardised with the training split's mean
    and std (so test data never leaks into the statistics). Inputs are float32 (N, 1, 8, 8),
    labels int64. The split depends only on ``seed``: keep it fixed across runs you compare.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=seed
    )
    mean, std = float(x_train.mean()), float(x_train.std())
    xs, ys = (x_train, y_train) if train else (x_test, y_test)
    inputs = torch.from_numpy((xs - mean) / std).reshape(-1, 1, 8, 8)
    return TensorDataset(inputs, torch.from_numpy(ys))


# ---------------------------------------------------------------- torchvision:NAME

IMAGE_MEAN = 0.5
IMAGE_STD = 0.5
"""Normalisation of ``torchvision:`` and ``imagefolder:`` images, the same in every channel:
pixels in [0, 1] become ``(p - 0.5) / 0.5``, in [-1, 1]. Fixed, not measured on the data:
no pass over the training set, and the same numbers on every machine, rank and subset."""


def image_transform(size: tuple[int, int] | None = None) -> transforms.Compose:
    """A PIL image -> a float tensor (C, H, W) normalised by IMAGE_MEAN / IMAGE_STD in every
    channel, first resized to ``size`` = (height, width) when given."""
    steps: list[Any] = [transforms.Resize(size)] if size is not None else []
    steps += [transforms.ToTensor(), transforms.Normalize((IMAGE_MEAN,), (IMAGE_STD,))]
    return transforms.Compose(steps)


def _torchvision_datasets() -> dict[str, type]:
    import torchvision.datasets as tvd

    found = {name: getattr(tvd, name, None) for name in tvd.__all__}
    return {name: cls for name, cls in found.items() if isinstance(cls, type) and issubclass(cls, Dataset)}


def _fits_signature(cls: type) -> bool:
    """``cls(root, train=..., transform=..., download=...)`` is how it is called, and nothing else is required."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    required = [n for n, p in params.items() if n != "root" and p.default is p.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return (list(params)[:1] == ["root"] and "train" in params and not required
            and all(n in params or var_kw for n in ("transform", "download")))


def _torchvision_files(cls: Any, root: str) -> tuple[str, list[str]] | None:
    """The folder and files torchvision checks for ``cls`` under ``root``, where its layout is known."""
    if issubclass(cls, MNIST) and isinstance(getattr(cls, "resources", None), list):  # MNIST, FashionMNIST, KMNIST
        return os.path.join(root, cls.__name__, "raw"), [os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]
    if issubclass(cls, CIFAR10):
        return os.path.join(root, cls.base_folder), [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return None


def torchvision_dataset(name: str, root: str | os.PathLike[str], train: bool, download: bool = False) -> Dataset[Any]:
    """torchvision's data set class ``name`` read from ``root``, its images as tensors
    (:func:`image_transform`; no augmentation).

    Any class called as ``cls(root, train=..., transform=..., download=...)`` fits: MNIST,
    FashionMNIST, KMNIST, QMNIST, USPS, CIFAR10, CIFAR100.

    Raises:
        DataError: no such class, a class with another signature (SVHN's ``split=``), files
            missing (naming the files torchvision looks for, and where) or unreadable.
    """
    classes = _torchvision_datasets()
    fitting = ", ".join(sorted(n for n, c in classes.items() if _fits_signature(c)))
    cls = classes.get(name)
    if cls is None:
        close = [n for n in classes if n.lower() == name.lower()] or difflib.get_close_matches(name, list(classes), n=1)
        hint = f" (did you mean 'torchvision:{close[0]}'?)" if close else ""
        raise DataError(f"torchvision has no data set {name!r}{hint}. Those fxreplay can load (root / train / "
                        f"download / transform): {fitting}.")
    if not _fits_signature(cls):
        raise DataError(
            f"torchvision:{name} is built as {name}{inspect.signature(cls)}, not with root / train / download / "
            f"transform (a train or test split chosen by train=True/False), so fxreplay cannot build its two splits. "
            f"Those that fit: {fitting}. For {name}, write a function that builds it and returns (train, test) data "
            "sets, and give that as data.name (--data my_data.py:fn)."
        )
    root = os.fspath(root)
    where = _torchvision_files(cls, root)
    if where is not None and not download:
        folder, files = where
        legacy = [os.path.join(root, name, "processed", f) for f in ("training.pt", "test.pt")]  # MNIST's old layout
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing and not (issubclass(cls, MNIST) and all(os.path.isfile(f) for f in legacy)):
            state = f"that folder lacks {', '.join(missing)}" if os.path.isdir(folder) else "that folder does not exist"
            raise DataError(
                f"torchvision:{name} not found: with data.root {root!r}, torchvision looks for "
                f"{os.path.abspath(folder)}/{{{', '.join(files)}}}, and {state}. Put the files there (uncompressed, as "
                "torchvision's download leaves them), set data.root (--data-root) to the folder that holds "
                f"{os.path.relpath(folder, root).split(os.sep)[0]}/, or set `download: true` on a machine with internet."
            )
    try:
        return cls(root, train=train, transform=image_transform(), download=download)  # type: ignore[call-arg]
    except FxReplayError:
        raise
    except RuntimeError as exc:  # torchvision: "Dataset not found", "... or corrupted", a bad file size
        if where is None:
            raise DataError(
                f"torchvision:{name} could not be loaded from data.root {root!r} ({os.path.abspath(root)}): torchvision "
                f"says {exc!s}. Put its files where torchvision's documentation of {name} says, set data.root "
                "(--data-root) to the folder they are under, or set `download: true` on a machine with internet."
            ) from exc
        raise _unreadable(name, where[0], exc, repacked=issubclass(cls, CIFAR10)) from exc
    except OSError as exc:  # includes urllib's URLError: no network, DNS, disk full
        raise DataError(
            f"could not download or read torchvision:{name} under {os.path.abspath(root)}: {exc}. There may be no "
            "internet here; copy the files there and set `download: false`."
        ) from exc
    except (AssertionError, ValueError, TypeError, IndexError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        raise _unreadable(name, where[0] if where else os.path.abspath(root), exc) from exc


def _unreadable(name: str, folder: str, exc: BaseException, repacked: bool = False) -> DataError:
    other = (f" For a re-packed copy you trust, use data.name {name.lower()} with `verify: false` (no md5 check)."
             if repacked else "")
    return DataError(
        f"torchvision:{name} files in {folder} are unreadable ({type(exc).__name__}: {exc}): they are not in "
        "torchvision's format (or, where torchvision checks md5s, not the official files). Replace them with the "
        f"official files (`download: true` on a machine with internet).{other}"
    )


# ----------------------------------------------------------------- imagefolder:DIR


class _ImageFolderOf(ImageFolder):
    """ImageFolder with the class indices given (the training split's), not read from its own
    subfolders: a validation split that lacks a class keeps every other class's index."""

    def __init__(self, root: str, classes: list[str]) -> None:
        self._given = list(classes)
        super().__init__(root, allow_empty=True)

    def find_classes(self, directory: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
        return self._given, {name: i for i, name in enumerate(self._given)}


def image_folders(directory: str) -> tuple[Dataset[Any], Dataset[Any]]:
    """``(train, test)`` from ``DIR/train/<class>/<image>`` and ``DIR/val/<class>/<image>``
    (torchvision's ImageFolder layout; classes are the training split's subfolders, sorted).

    Images are read as RGB, resized to the size of the first training image (the first file of
    the first class, in sorted order) so that batches stack, and normalised by
    :func:`image_transform`; no augmentation.

    Raises:
        DataError: a split folder is missing or has no images, or ``val`` has a class ``train`` lacks.
    """
    base = Path(directory)
    layout = f"{base}/train/<class>/<image> and {base}/val/<class>/<image> (torchvision's ImageFolder layout)"
    missing = [str(base / split) for split in ("train", "val") if not (base / split).is_dir()]
    if missing:
        raise DataError(f"imagefolder:{directory}: no directory {' or '.join(missing)} (relative to {os.getcwd()}). "
                        f"Expected {layout}.")
    try:
        train = ImageFolder(str(base / "train"))
    except OSError as exc:  # FileNotFoundError: no class folder, or a class without images
        raise DataError(f"imagefolder:{directory}: {exc!s} Expected {layout}; images end in one of "
                        f"{', '.join(IMG_EXTENSIONS)}.") from exc
    extra = sorted(e.name for e in os.scandir(base / "val") if e.is_dir() and e.name not in train.class_to_idx)
    if extra:
        raise DataError(f"imagefolder:{directory}: val has classes the training split lacks ({', '.join(extra)}); a "
                        "model cannot learn them. Add their images under train/, or remove them from val/.")
    test = _ImageFolderOf(str(base / "val"), train.classes)
    if len(test) == 0:
        raise DataError(f"imagefolder:{directory}: {base / 'val'} holds no images in class folders. Expected {layout}.")
    first = train.samples[0][0]
    try:
        from PIL import Image

        with Image.open(first) as image:
            width, height = image.size
    except OSError as exc:
        raise DataError(f"imagefolder:{directory}: cannot read image {first}: {exc}") from exc
    for split in (train, test):
        split.transform = image_transform((height, width))
    return train, test


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


# ----------------------------------------------------------- file.py:fn, pkg.module:fn


def user_datasets(spec: str, root: str) -> tuple[Dataset[Any], Dataset[Any]]:
    """``(train, test)`` from a user's function, ``file.py:fn`` or ``pkg.module:fn``, imported
    as model specs are (:mod:`fxreplay.compiler.loading`) and called with ``root=data.root``
    when it takes a ``root`` argument, else with none.

    Raises:
        DataError: the file, module or function is missing, the call fails, or it does not
            return two map-style data sets.
    """
    from fxreplay.compiler.loading import _accepts, _resolve, import_source, is_file_spec

    path_part, _, attr = spec.partition(":")
    if is_file_spec(path_part) and not Path(path_part).is_file():
        raise DataError(f"data set {spec!r}: there is no file {path_part!r} (relative to {os.getcwd()}). Give "
                        "file.py:fn or pkg.module:fn, a function that returns (train, test) data sets.")
    try:
        module = import_source(path_part)
    except ModelLoadError as exc:
        raise DataError(f"data set {spec!r}: {exc}") from exc
    try:
        fn = _resolve(module, attr, path_part)
    except ModelLoadError as exc:
        public = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise DataError(f"data set {spec!r}: {path_part} has no {attr!r} (its functions and classes: "
                        f"{', '.join(public[:20]) or 'none'}). Name a function that returns (train, test) data sets.") from exc
    if not callable(fn):
        raise DataError(f"data set {spec!r} is a {type(fn).__name__}, not a function that returns (train, test) data sets.")
    kwargs = {"root": root} if _accepts(fn, "root") else {}
    try:
        made = fn(**kwargs)
    except FxReplayError:
        raise
    except Exception as exc:
        call = f"{spec}(root={root!r})" if kwargs else f"{spec}()"
        raise DataError(f"{call} failed with {type(exc).__name__}: {exc}. It must return (train, test) data sets.") from exc
    pair = isinstance(made, (tuple, list)) and len(made) == 2
    if not pair or not all(isinstance(d, Sized) and hasattr(d, "__getitem__") for d in made):
        raise DataError(f"{spec} returned {type(made).__name__}{f' of {len(made)}' if isinstance(made, (tuple, list)) else ''}, "
                        "not (train, test): two map-style data sets (with __len__ and __getitem__, e.g. TensorDatasets) "
                        "whose examples are (input tensor, target) pairs.")
    return made[0], made[1]


# ------------------------------------------------------------------------- loaders


def _derive_seed(*words: int) -> int:
    """A 63-bit seed from non-negative integers; SeedSequence mixes them so (seed, epoch)
    pairs never collide (``seed * 1000 + epoch`` would for epoch >= 1000)."""
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SeededBatchSampler(Sampler[list[int]]):
    """Batches of indices that are a pure function of (seed, epoch); starts at batch ``skip``.

    ``len()`` is the number of batches still to come, so a resumed epoch reports its
    remaining length.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        epoch: int,
        drop_last: bool = False,
        skip: int = 0,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip}")
        self.num_items, self.batch_size = num_items, batch_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        self.drop_last, self.skip = drop_last, skip

    def batches_per_epoch(self) -> int:
        """Batches in a whole epoch, ignoring ``skip``."""
        if self.drop_last:
            return self.num_items // self.batch_size
        return -(-self.num_items // self.batch_size)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.skip)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(_derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            order = list(range(self.num_items))
        for b in range(self.skip, self.batches_per_epoch()):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]


class _SeededItems(Dataset[Any]):
    """Runs each item's random transforms under a seed derived from (seed, epoch, index).

    torchvision's random transforms draw from torch's global RNG; seeding it per item makes
    an epoch's augmentation independent of worker count, of skipped batches and of whatever
    else used the RNG, which is what makes a resumed run see the very same batches.
    """

    def __init__(self, dataset: Dataset[Any], seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        # Restore the global CPU RNG afterwards, so dropout masks etc. are unaffected. The
        # generator is used directly: torch.random.fork_rng + torch.manual_seed take ~20x
        # longer (they also visit CUDA), which adds seconds to every CIFAR epoch.
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(_derive_seed(self.seed, self.epoch, index))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    drop_last: bool = False,
    skip: int = 0,
    num_workers: int = 0,
) -> DataLoader[Any]:
    """A DataLoader for one epoch whose batches are a pure function of (seed, epoch).

    Both the order and the random augmentation depend only on (seed, epoch, index), so
    ``make_loader(..., skip=i)`` yields exactly batches i, i+1, ... of the full epoch.

    Args:
        dataset: a map-style data set.
        batch_size: examples per batch.
        shuffle: permute the order (seeded); False keeps the data set's order.
        seed: the run's seed.
        epoch: the epoch number; each epoch gets its own order.
        drop_last: drop a final partial batch.
        skip: start at this batch index of the epoch (for resuming).
        num_workers: loader processes; does not change the batches.
    """
    if not isinstance(dataset, Sized):
        raise TypeError(f"make_loader needs a map-style data set with len(), got {type(dataset)}")
    sampler = SeededBatchSampler(len(dataset), batch_size, shuffle, seed, epoch, drop_last, skip)
    # DataLoader draws its workers' base seed from this generator; without one it would
    # draw from the global RNG and shift every later dropout mask of a resumed run.
    # 2**62 stands apart from every item index, so this stream is not an item's.
    generator = torch.Generator().manual_seed(_derive_seed(seed, epoch, 2**62))
    if isinstance(dataset, ReplicaShard):
        return DataLoader(
            _ShardedBatches(_SeededItems(dataset.dataset, seed, epoch), dataset.labels, dataset.replica, dataset.replicas),
            batch_sampler=sampler, num_workers=num_workers, generator=generator, collate_fn=_ShardedBatches.collate,
        )
    return DataLoader(
        _SeededItems(dataset, seed, epoch),
        batch_sampler=sampler,
        num_workers=num_workers,
        generator=generator,
    )


class ReplicaShard(Dataset[Any]):
    """What stage 0 of data-parallel replica ``replica`` (of ``replicas``) reads: batched by
    :func:`make_loader`, the inputs of its shard of every batch only -- rows
    ``torch.tensor_split(batch, replicas)[replica]``, the very rows it would cut from the whole
    batch, augmented alike -- with the whole batch's labels (read without decoding an input),
    so D replicas decode each image once between them. Build it with :func:`replica_shard`."""

    def __init__(self, dataset: Dataset[Any], labels: Dataset[Any], replica: int, replicas: int) -> None:
        self.dataset, self.labels, self.replica, self.replicas = dataset, labels, replica, replicas

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]  # an example, unsharded (make_loader shards the batches)


class _ShardedBatches(Dataset[Any]):
    """The batch-level reader behind :class:`ReplicaShard` (DataLoader calls ``__getitems__``
    with a batch's indices)."""

    def __init__(self, items: Dataset[Any], labels: Dataset[Any], replica: int, replicas: int) -> None:
        self.items, self.labels, self.replica, self.replicas = items, labels, replica, replicas

    def __len__(self) -> int:
        return len(self.labels)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.items[index]

    def __getitems__(self, indices: list[int]) -> tuple[list[Any], list[Any]]:
        if len(indices) < self.replicas:
            raise DataError(
                f"a batch of {len(indices)} examples cannot give each of the D={self.replicas} data-parallel replicas a "
                f"row: use batches of at least {self.replicas} examples (data.batch_size), or fewer replicas"
            )
        mine = torch.tensor_split(torch.tensor(indices), self.replicas)[self.replica].tolist()
        return [self.items[i] for i in mine], [self.labels[i] for i in indices]

    @staticmethod
    def collate(batch: tuple[list[Any], list[Any]]) -> list[Any]:
        items, labels = batch
        return [*default_collate(items)[:-1], default_collate(labels)[-1]]


def replica_shard(dataset: Dataset[Any], replica: int, replicas: int) -> Dataset[Any]:
    """``dataset`` as stage 0 of data-parallel replica ``replica`` reads it
    (:class:`ReplicaShard`) when its labels can be read without its inputs (see
    :func:`labels_only`); else ``dataset`` itself (every replica decodes the whole batch and
    takes its shard)."""
    labels = _labels(dataset)
    if replicas == 1 or labels is None:
        return dataset
    return ReplicaShard(dataset, LabelsOnly(labels), replica, replicas)


def build_datasets(config: DataConfig) -> tuple[Dataset[Any], Dataset[Any]]:
    """The (train, test) data sets a ``DataConfig`` describes (``data.name``: see the module
    docstring), the training set cut to ``data.subset`` examples when it is set.

    Raises:
        DataError: an unknown name, or the data set cannot be found or read; the message says
            where it looked and what to do.
    """
    train: Dataset[Any]
    test: Dataset[Any]
    kind, arg = parse_spec(config.name)
    if kind == "digits":
        # Split seed fixed at 0, not the run's seed: runs compared with each other must
        # share one test set.
        train, test = digits(train=True), digits(train=False)
    elif kind in _CIFAR_STATS:
        train, test = (
            cifar(
                kind,
                config.root,
                train=is_train,
                augment=config.augment and is_train,
                download=config.download,
                verify=config.verify,
            )
            for is_train in (True, False)
        )
    elif kind == "torchvision":
        train, test = (torchvision_dataset(arg, config.root, train=is_train, download=config.download) for is_train in (True, False))
    elif kind == "imagefolder":
        train, test = image_folders(arg)
    elif kind == "text":
        train, test = text_datasets(arg, config.block_size)
    else:
        train, test = user_datasets(arg, config.root)
    if len(train) == 0:  # type: ignore[arg-type]
        raise DataError(f"data set {config.name!r} has no training examples.")
    if config.subset is not None:
        train = Subset(train, subset_indices(len(train), config.subset, config.subset_seed))  # type: ignore[arg-type]
    return train, test


def num_classes_of(dataset: Dataset[Any]) -> int | None:
    """How many classes a data set's targets range over: what ``model.num_classes`` defaults to.

    Its ``num_classes`` attribute (:class:`TextBytes`: 256; a user's data set may declare
    one), else the length of its ``classes`` (torchvision's sets, ImageFolder), else its
    labels' largest value + 1 where they can be read without loading examples (a
    TensorDataset, ``targets``); None when it cannot tell (the model keeps its own default).
    A Subset answers for the set it is drawn from: a subset may miss a class.
    """
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    declared = getattr(dataset, "num_classes", None)
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
        return declared
    classes = getattr(dataset, "classes", None)
    if isinstance(classes, (list, tuple)) and classes:
        return len(classes)
    labels = _labels(dataset)
    if labels is None or len(labels) == 0:
        return None
    values = torch.as_tensor(labels) if not isinstance(labels, torch.Tensor) else labels
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        return None
    return int(values.max()) + 1


def example_batch(dataset: Dataset[Any], size: int, name: str) -> tuple[torch.Tensor, Any]:
    """The first ``size`` examples stacked into ``(inputs, targets)``: the batch a model is
    compiled (traced and profiled) with, and checked against.

    Raises:
        DataError: the data set is empty, its examples are not (tensor, target) pairs, or its
            inputs differ in shape.
    """
    n = min(size, len(dataset))  # type: ignore[arg-type]
    if n < 1:
        raise DataError(f"data set {name!r} has no training examples.")
    inputs, targets = [], []
    for i in range(n):
        item = dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise DataError(f"data set {name!r}: example {i} is a {type(item).__name__}"
                            f"{f' of {len(item)}' if isinstance(item, (tuple, list)) else ''}, not an (input, target) pair.")
        if not isinstance(item[0], torch.Tensor):
            raise DataError(f"data set {name!r} gives inputs of type {type(item[0]).__name__}, not tensors: convert them "
                            "in the data set (e.g. with torchvision.transforms.ToTensor() for images).")
        inputs.append(item[0])
        targets.append(item[1])
    shapes = sorted({tuple(x.shape) for x in inputs})
    if len(shapes) > 1:
        raise DataError(f"data set {name!r} gives inputs of different shapes ({', '.join(map(str, shapes[:3]))}): a "
                        "batch needs one shape; resize, crop or pad them to one in the data set.")
    return torch.stack(inputs), default_collate(targets)


class LabelsOnly(Dataset[tuple[torch.Tensor, Any]]):
    """A data set's labels, each paired with an empty input: what a pipeline rank that never
    looks at the inputs (every rank but the first) loads instead of decoding and augmenting
    images. Batches keep the source's order and sizes (``x`` is ``(batch, 0)``); integer
    label tensors come as int64, as the source's examples give them (text targets are kept
    as bytes)."""

    def __init__(self, labels: Any) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        label = self.labels[index]
        if not isinstance(label, torch.Tensor):
            return torch.empty(0), int(label)
        return torch.empty(0), label if label.is_floating_point() else label.long()


def labels_only(dataset: Dataset[Any]) -> Dataset[Any]:
    """``dataset``'s labels without its inputs (:class:`LabelsOnly`) when they can be read
    without loading an example (torchvision's ``targets``, a TensorDataset's last tensor,
    :class:`TextBytes`, a Subset of any); else ``dataset`` itself."""
    labels = _labels(dataset)
    return dataset if labels is None else LabelsOnly(labels)


def _labels(dataset: Any) -> Any:
    if isinstance(dataset, Subset):
        inner = _labels(dataset.dataset)
        if inner is None:
            return None
        if isinstance(inner, torch.Tensor):
            return inner[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
        return [inner[i] for i in dataset.indices]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[-1]
    targets = getattr(dataset, "targets", None)
    return targets if targets is not None and len(targets) == len(dataset) else None


def check_labels(dataset: Dataset[Any], num_classes: int | None, which: str) -> None:
    """Every label of ``dataset`` is a class the model predicts (0..num_classes-1), checked
    before training starts (a label out of range would fail at some step deep in an epoch).
    Data sets whose labels cannot be read without loading every example are checked batch
    by batch instead (:func:`fxreplay.metrics.default_loss`).

    Raises:
        DataError: a label is negative or ``>= num_classes``.
    """
    labels = _labels(dataset)
    if labels is None or num_classes is None or len(labels) == 0:
        return
    values = torch.as_tensor(labels) if not isinstance(labels, torch.Tensor) else labels
    if values.is_floating_point() or values.is_complex():
        return  # not class labels: the model's loss decides
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= num_classes:
        raise DataError(
            f"the {which} set has labels {low}..{high}, but the model predicts {num_classes} classes (labels "
            f"0..{num_classes - 1}). Set model.num_classes to the data set's number of classes (at least "
            f"{high + 1}; a model file's builder gets it when it takes a num_classes argument), or use a data set whose "
            "labels count from 0."
        )


def subset_indices(n_total: int, n: int, seed: int) -> list[int]:
    """The fixed training subset of ``data.subset``: the first n of a permutation seeded by
    ``seed``, in data-set order.

    Raises:
        DataError: n is not in 1..n_total.
    """
    if not 0 < n <= n_total:
        raise DataError(f"data.subset is {n} but the training set has {n_total} examples; use 1..{n_total} (or null for all)")
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[:n].tolist())

"""Image data sets read with torchvision: CIFAR (the paper's augmentation), any torchvision data
set class (``torchvision:NAME``) and image folders (``imagefolder:DIR``).

Importing torchvision costs seconds (it loads ``torch._dynamo``), in every process of a run:
:mod:`fxreplay.data` imports this module only when such a data set is used (the offline
default, sklearn's digits, is in :mod:`fxreplay.data.digits`)."""
from __future__ import annotations

import difflib
import inspect
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import CIFAR10, CIFAR100, MNIST, ImageFolder, VisionDataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from fxreplay.errors import DataError, FxReplayError

from .cifar_pickle import load as load_cifar_file
from .catalog import _CIFAR_STATS




# --------------------------------------------------------------------------- CIFAR


class _FilesExist:
    """torchvision's CIFAR with its integrity check reduced to "every file exists" (``verify:
    false``), and its files read by :func:`fxreplay.data.cifar_pickle.load`, which cannot run
    code a crafted file names (torchvision's ``pickle.load`` would: with no md5 check nothing
    says the files are the official ones)."""

    root: str
    base_folder: str
    train_list: list[list[str]]
    test_list: list[list[str]]
    meta: dict[str, Any]
    train: bool

    def __init__(self, root: str | os.PathLike[str], train: bool = True, transform: Any = None,
                 target_transform: Any = None, download: bool = False) -> None:
        # torchvision's CIFAR10.__init__, with the safe reader in place of pickle.load
        VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)  # type: ignore[arg-type]
        self.train = train
        if download:
            self.download()  # type: ignore[attr-defined]
        if not self._check_integrity():
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        data, self.targets = [], []
        for name, _md5 in self.train_list if train else self.test_list:
            entry = load_cifar_file(os.path.join(self.root, self.base_folder, name))
            data.append(entry["data"])
            self.targets.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # HWC, as torchvision keeps it
        self._load_meta()

    def _check_integrity(self) -> bool:
        folder = os.path.join(self.root, self.base_folder)
        names = [name for name, _md5 in self.train_list + self.test_list]
        return all(os.path.isfile(os.path.join(folder, name)) for name in names)

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        if not os.path.isfile(path):
            raise RuntimeError("Dataset metadata file not found or corrupted. You can use download=True to download it")
        self.classes = load_cifar_file(path)[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class UnverifiedCIFAR10(_FilesExist, CIFAR10):
    """CIFAR-10 that checks its files exist but not their md5s (``verify: false``)."""

    # _load_meta checks batches.meta against this md5; None means "exists" only.
    meta = {**CIFAR10.meta, "md5": None}


class UnverifiedCIFAR100(_FilesExist, CIFAR100):
    """CIFAR-100 that checks its files exist but not their md5s (``verify: false``)."""

    meta = {**CIFAR100.meta, "md5": None}


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
    advice = "To fix: set `download: true` on a machine with internet (torchvision fetches the official archive), or put a copy there"
    archive = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}[name]
    return advice + (f" (the official {archive} unpacked: `tar xzf {archive} -C {root}`) and set `verify: false` if it "
                     "is a re-packed copy whose md5s differ.")


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
        verify: check torchvision's md5s (the official files, read by torchvision); False checks
            only that the files exist and reads them with a restricted unpickler that refuses
            anything but what CIFAR files hold (:mod:`fxreplay.data.cifar_pickle`): a crafted
            file cannot run code.

    Raises:
        DataError: unknown name, files missing, md5 mismatch, unreadable files, a file that
            would run code (``verify: false``) or a failed download; the message says where
            it looked and what to do.
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
        if missing and issubclass(cls, MNIST):
            from .idx import idx_dataset, idx_folder

            found = idx_folder(cls, root)  # the files as they come: *.gz, or directly in data.root
            if found is not None:
                return idx_dataset(cls, found, train, image_transform())
        if missing and not (issubclass(cls, MNIST) and all(os.path.isfile(f) for f in legacy)):
            state = f"that folder lacks {', '.join(missing)}" if os.path.isdir(folder) else "that folder does not exist"
            raise DataError(
                f"torchvision:{name} not found: with data.root {root!r}, torchvision looks for "
                f"{os.path.abspath(folder)}/{{{', '.join(files)}}}, and {state}. Put the files there (as torchvision's "
                "download leaves them, or as they come, *.gz; also read directly in data.root), set data.root "
                f"(--data-root) to the folder that holds {os.path.relpath(folder, root).split(os.sep)[0]}/, or set "
                "`download: true` on a machine with internet."
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

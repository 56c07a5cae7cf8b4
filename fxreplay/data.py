"""Data sets and reproducible loaders.

- ``cifar``: torchvision's CIFAR-10/100 with the paper's augmentation, and an explicit
  ``verify=False`` for re-packed copies whose md5s differ (the shared JPEG-degraded
  CIFAR-10, see ``../shared/data/README.md``).
- ``digits``: sklearn's 8x8 handwritten digits, shipped with scikit-learn, so the quick
  start needs no download.
- ``make_loader``: batches that are a pure function of (seed, epoch), augmentation
  included, with ``skip`` to resume in the middle of an epoch on exactly the same batches.

Nothing here downloads unless the user sets ``download=True``.

Example:
    >>> train, test = build_datasets(DataConfig(name="digits"))
    >>> loader = make_loader(train, batch_size=64, shuffle=True, seed=0, epoch=3, skip=5)
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Iterator, Sized
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset
from torchvision import transforms
from torchvision.datasets import CIFAR10, CIFAR100

from fxreplay.errors import DataError

if TYPE_CHECKING:
    from fxreplay.config import DataConfig

__all__ = [
    "NUM_CLASSES",
    "INPUT_SHAPE",
    "cifar",
    "cifar_transform",
    "UnverifiedCIFAR10",
    "UnverifiedCIFAR100",
    "digits",
    "make_loader",
    "SeededBatchSampler",
    "build_datasets",
    "subset_indices",
    "labels_only",
    "LabelsOnly",
]

NUM_CLASSES: dict[str, int] = {"digits": 10, "cifar10": 10, "cifar100": 100}
"""Classes per data set: the default for ``model.num_classes``."""

INPUT_SHAPE: dict[str, tuple[int, ...]] = {
    "digits": (1, 8, 8),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
}
"""Shape of one example (no batch dimension): the default for ``model.input_shape``."""

# Per-channel statistics of each training set (pixels in [0, 1]); the values everyone uses.
_CIFAR_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


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
    return DataLoader(
        _SeededItems(dataset, seed, epoch),
        batch_sampler=sampler,
        num_workers=num_workers,
        generator=generator,
    )


def build_datasets(config: DataConfig) -> tuple[Dataset[Any], Dataset[Any]]:
    """The (train, test) data sets a ``DataConfig`` describes.

    Raises:
        DataError: the data set cannot be found or read (see ``cifar``).
    """
    train: Dataset[Any]
    test: Dataset[Any]
    if config.name == "digits":
        # Split seed fixed at 0, not the run's seed: runs compared with each other must
        # share one test set.
        train, test = digits(train=True), digits(train=False)
    elif config.name in _CIFAR_STATS:
        train, test = (
            cifar(
                config.name,
                config.root,
                train=is_train,
                augment=config.augment and is_train,
                download=config.download,
                verify=config.verify,
            )
            for is_train in (True, False)
        )
    else:
        raise DataError(f"unknown data set {config.name!r}; expected one of {sorted(NUM_CLASSES)}")
    if config.subset is not None:
        train = Subset(train, subset_indices(len(train), config.subset, config.subset_seed))  # type: ignore[arg-type]
    return train, test


class LabelsOnly(Dataset[tuple[torch.Tensor, Any]]):
    """A data set's labels, each paired with an empty input: what a pipeline rank that never
    looks at the inputs (every rank but the first) loads instead of decoding and augmenting
    images. Batches keep the source's order and sizes (``x`` is ``(batch, 0)``)."""

    def __init__(self, labels: Any) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        label = self.labels[index]
        return torch.empty(0), int(label) if not isinstance(label, torch.Tensor) else label


def labels_only(dataset: Dataset[Any]) -> Dataset[Any]:
    """``dataset``'s labels without its inputs (:class:`LabelsOnly`) when they can be read
    without loading an example (torchvision's ``targets``, a TensorDataset's last tensor, a
    Subset of either); else ``dataset`` itself."""
    labels = _labels(dataset)
    return dataset if labels is None else LabelsOnly(labels)


def _labels(dataset: Any) -> Any:
    if isinstance(dataset, Subset):
        inner = _labels(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
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
            f"{high + 1}), or use a data set whose labels count from 0."
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

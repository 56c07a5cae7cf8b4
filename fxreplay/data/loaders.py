"""Reproducible loaders: batches that are a pure function of (seed, epoch), augmentation
included; what a pipeline rank reads (labels only; a data-parallel replica's shard)."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset, default_collate

from fxreplay.errors import DataError, FxReplayError


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

    def _order(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(_derive_seed(self.seed, self.epoch))
            return list(torch.randperm(self.num_items, generator=generator).tolist())
        return list(range(self.num_items))

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        for b in range(self.skip, self.batches_per_epoch()):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]

    def indices_of(self, batch: int) -> list[int]:
        """The data set indices of batch ``batch`` of the epoch (counted from its start, ``skip`` or not)."""
        return self._order()[batch * self.batch_size : (batch + 1) * self.batch_size]


class _SeededItems(Dataset[Any]):
    """Runs each item's random transforms under a seed derived from (seed, epoch, index).

    torchvision's random transforms draw from torch's global RNG; seeding it per item makes
    an epoch's augmentation independent of worker count, of skipped batches and of whatever
    else used the RNG, which is what makes a resumed run see the very same batches.
    """

    def __init__(self, dataset: Dataset[Any], seed: int, epoch: int, name: str = "the data set") -> None:
        self.dataset, self.seed, self.epoch, self.name = dataset, seed, epoch, name

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
        except FxReplayError:
            raise
        except Exception as exc:
            # The data set's own code or files (a __getitem__ that raises, an unreadable image):
            # say which example, so it can be reproduced with dataset[i] alone.
            which = source_index(self.dataset, index)
            raise DataError(
                f"reading example {which} of {self.name} failed: {type(exc).__name__}: {_first_line(exc)}. The error "
                f"is in the data set's code or files, not in fxreplay: fix it so that dataset[{which}] returns an "
                "(input, target) pair"
            ) from exc
        finally:
            generator.set_state(state)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "(no message)")[:500]


def source_index(dataset: Any, index: int) -> int:
    """The index in the underlying data set of example ``index`` of ``dataset`` (through
    ``Subset``s, e.g. ``data.subset``): what ``dataset[i]`` of the user's own set reproduces."""
    while isinstance(dataset, Subset):
        index, dataset = int(dataset.indices[index]), dataset.dataset
    return index


class _Loader(DataLoader[Any]):
    """A DataLoader whose errors are one paragraph: an example that fails to read (raised in a
    worker process, torch wraps it with the worker's traceback) or a batch whose examples do
    not stack."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return translated(super().__iter__(), _loader_error)


def _loader_error(exc: Exception) -> Exception | None:
    """A DataLoader's error as one paragraph (None: raise it as it is)."""
    if isinstance(exc, DataError):
        # Raised in a worker process, torch wraps it with the worker's traceback.
        return DataError(_unwrapped(str(exc))) if str(exc).startswith("Caught ") else None
    if isinstance(exc, (RuntimeError, TypeError)) and not isinstance(exc, FxReplayError):
        text = _unwrapped(str(exc))
        if any(w in text for w in ("stack expects", "equal size", "collate")):
            return DataError(
                f"the examples of a batch do not stack into one batch ({text}): every example of a data set must "
                "give an input of one shape and type, and a target of one shape and type"
            )
    return None


def translated(items: Iterable[Any], translate: Callable[[Exception], Exception | None]) -> Iterator[Any]:
    """The items of ``items``; an error raised while getting one is raised as ``translate(error)``
    (chained to it), or as it is when that is None. Errors of the consumer are not touched."""
    iterator = iter(items)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            other = translate(exc)
            if other is None:
                raise
            raise other from exc
        yield item


def _unwrapped(message: str) -> str:
    """An error's own message, from torch's "Caught DataError in DataLoader worker process 0.
    Original Traceback ... DataError: <message>" (the first line when not wrapped)."""
    if not message.startswith("Caught "):
        return message.strip().splitlines()[0] if message.strip() else message
    last = message.rstrip().splitlines()[-1]
    return last.split("Error: ", 1)[-1]


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    drop_last: bool = False,
    skip: int = 0,
    num_workers: int = 0,
    name: str = "the data set",
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
        name: what the data set is called in an error ("the training set of 'digits'").

    Raises:
        DataError: (while iterating) an example fails to read, naming it, or examples that do
            not stack into a batch.
    """
    if not isinstance(dataset, Sized):
        raise TypeError(f"make_loader needs a map-style data set with len(), got {type(dataset)}")
    sampler = SeededBatchSampler(len(dataset), batch_size, shuffle, seed, epoch, drop_last, skip)
    # DataLoader draws its workers' base seed from this generator; without one it would
    # draw from the global RNG and shift every later dropout mask of a resumed run.
    # 2**62 stands apart from every item index, so this stream is not an item's.
    generator = torch.Generator().manual_seed(_derive_seed(seed, epoch, 2**62))
    if isinstance(dataset, ReplicaShard):
        return _Loader(
            _ShardedBatches(_SeededItems(dataset.dataset, seed, epoch, name), dataset.labels, dataset.replica, dataset.replicas),
            batch_sampler=sampler, num_workers=num_workers, generator=generator, collate_fn=_ShardedBatches.collate,
        )
    return _Loader(
        _SeededItems(dataset, seed, epoch, name),
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

"""A data set by name (``data.name``): the spec forms, a user's function, the class count,
the example batch and the label check."""
from __future__ import annotations

import difflib
import os
from collections.abc import Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset, Subset, default_collate

from fxreplay.errors import DataError, FxReplayError, ModelLoadError

from .catalog import _CIFAR_STATS, NUM_CLASSES
from .digits import digits
from .loaders import _labels, source_index
from .text import text_datasets

if TYPE_CHECKING:
    from fxreplay.config import DataConfig




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
    from .images import _torchvision_datasets  # torchvision: only now, for the hint

    close = [f"torchvision:{n}" for n in _torchvision_datasets() if n.lower() == name.lower()]
    close = close or difflib.get_close_matches(name, list(NUM_CLASSES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise DataError(f"unknown data set {name!r}{hint} in data.name / --data. Expected {_FORMS}.")




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
        from .images import cifar  # torchvision is imported only for the data sets that need it

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
        from .images import torchvision_dataset

        train, test = (torchvision_dataset(arg, config.root, train=is_train, download=config.download) for is_train in (True, False))
    elif kind == "imagefolder":
        from .images import image_folders

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


def non_finite(dataset: Dataset[Any], indices: Any, limit: int = 3) -> list[str]:
    """The examples among ``indices`` of ``dataset`` whose input or target holds NaN or inf,
    each as "example 17 (NaN in its input)" under its index in the user's own data set
    (through ``data.subset``), at most ``limit`` of them.

    For when a loss turns out non-finite: one batch is read again (or, for the evaluation,
    the test set), so it costs nothing while the loss is finite.
    """
    found: list[str] = []
    for index in indices:
        example = dataset[int(index)]
        parts = example if isinstance(example, (tuple, list)) else (example,)
        bad = []
        for what, value in zip(("input", "target") if len(parts) == 2 else [f"field {i}" for i in range(len(parts))], parts):
            tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value) if isinstance(value, float) else None
            if tensor is None or not (tensor.is_floating_point() or tensor.is_complex()):
                continue
            nan, inf = bool(torch.isnan(tensor).any()), bool(torch.isinf(tensor).any())
            if nan or inf:
                bad.append(f"{' and '.join(k for k, v in (('NaN', nan), ('inf', inf)) if v)} in its {what}")
        if bad:
            found.append(f"example {source_index(dataset, int(index))} ({', '.join(bad)})")
            if len(found) >= limit:
                break
    return found


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

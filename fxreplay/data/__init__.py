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

from typing import Any

from .catalog import NUM_CLASSES, INPUT_SHAPE
from .sets import (
    parse_spec,
    user_datasets,
    build_datasets,
    num_classes_of,
    example_batch,
    check_labels,
    non_finite,
    subset_indices,
)
from .digits import digits
from .text import (
    TEXT_VOCAB,
    DEFAULT_CORPUS_BYTES,
    TextBytes,
    default_corpus,
    text_datasets,
)
from .loaders import (
    make_loader,
    SeededBatchSampler,
    labels_only,
    LabelsOnly,
    replica_shard,
    ReplicaShard,
    source_index,
    translated,
)

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
    "source_index",
    "translated",
    "non_finite",
]

# Read with torchvision, whose import costs seconds in every process of a run: loaded on first
# use (``fxreplay.data.cifar``, ``from fxreplay.data import cifar``), not with the package.
_FROM_IMAGES = {"IMAGE_MEAN", "IMAGE_STD", "cifar", "cifar_transform", "torchvision_dataset", "image_transform",
                "image_folders", "UnverifiedCIFAR10", "UnverifiedCIFAR100"}


def __getattr__(name: str) -> Any:
    if name in _FROM_IMAGES:
        from . import images

        return getattr(images, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

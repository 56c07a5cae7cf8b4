"""What is known of the data sets named without a prefix (``digits``, ``cifar10``, ``cifar100``):
their class counts, example shapes and CIFAR's normalisation. Imports nothing: the modules
that read the data sets (and need torchvision or sklearn) and the one that picks them both
read it."""
from __future__ import annotations

NUM_CLASSES: dict[str, int] = {"digits": 10, "cifar10": 10, "cifar100": 100}
"""Classes of the data sets named without a prefix (:func:`num_classes_of` reads any set's)."""

# Per-channel statistics of each training set (pixels in [0, 1]); the values everyone uses.
_CIFAR_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

INPUT_SHAPE: dict[str, tuple[int, ...]] = {
    "digits": (1, 8, 8),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
}
"""Shape of one example (no batch dimension) of the data sets named without a prefix."""

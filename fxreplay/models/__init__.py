"""The model zoo: the paper's CIFAR ResNets and small models for quick runs and tests.

``get(name, **kwargs)`` builds a zoo model by name; anything else (a file, ``pkg.mod:attr``,
a torchvision name) is resolved by the model-spec loader, not here.

Example:
    >>> model = get("resnet56", num_classes=100)
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from fxreplay.errors import ModelLoadError
from fxreplay.models.resnet_cifar import (
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet101,
    resnet110,
    resnet152,
    resnet164,
)
from fxreplay.models.gpt import gpt_tiny
from fxreplay.models.small import digits_cnn, mlp

__all__ = [
    "ZOO",
    "get",
    "INPUTS",
    "input_of",
    "digits_cnn",
    "gpt_tiny",
    "mlp",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet164",
    "resnet101",
    "resnet152",
]

ZOO: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": digits_cnn,
    "mlp": mlp,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet164": resnet164,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "gpt_tiny": gpt_tiny,
}

INPUTS: dict[str, tuple[tuple[int, ...], str]] = {
    "digits_cnn": ((1, 8, 8), "float32"),
    **{name: ((3, 32, 32), "float32") for name in ZOO if name.startswith("resnet")},
    "gpt_tiny": ((64,), "int64"),  # token ids, one block
}
"""What a zoo model takes, per example: ``(shape, dtype)`` (``mlp`` takes any flat size)."""


def input_of(name: str) -> tuple[tuple[int, ...] | None, str | None]:
    """The per-example input shape and dtype zoo model ``name`` is made for, if it has one."""
    shape, dtype = INPUTS.get(name, (None, None))
    return shape, dtype


def get(name: str, **kwargs: object) -> nn.Module:
    """Build the zoo model ``name`` with ``kwargs`` (e.g. ``num_classes=100``).

    Raises:
        ModelLoadError: ``name`` is not in the zoo, or ``kwargs`` do not fit its builder.
    """
    builder = ZOO.get(name)
    if builder is None:
        raise ModelLoadError(
            f"unknown model {name!r}; the zoo has: {', '.join(sorted(ZOO))}. "
            "For your own model give a file (model.py), 'package.module:attribute' "
            "or 'torchvision:NAME' instead."
        )
    # Check the arguments before calling, so a TypeError raised inside the builder (a
    # bug) is not mistaken for the user's bad argument.
    signature = inspect.signature(builder)
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise ModelLoadError(
            f"model {name!r} does not take the arguments {sorted(kwargs)} ({exc}); "
            f"its signature is {name}{signature}"
        ) from None
    return builder(**kwargs)

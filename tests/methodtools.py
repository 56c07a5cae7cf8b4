"""Building any registered method in tests that loop over the registry."""
from __future__ import annotations

from typing import Any

from fxreplay import methods


def method_options(method: str, num_classes: int = 16) -> dict[str, Any]:
    """The options a method needs beyond the common ones: cDNI's number of classes (any
    count >= the labels' largest + 1 works: unused classes only add unused code entries)."""
    return {"num_classes": num_classes} if "num_classes" in methods.get(method).worker.option_names else {}

"""Turn a model spec string into an ``nn.Module`` and example inputs.

Specs:
  ``path/to/model.py``           the file defines ``build_model()`` or ``model``, optionally ``example_inputs()``
  ``path/to/model.py:attr``      an attribute of the file: a module, or a callable that returns one
  ``pkg.module:attr``            the same, from an importable module
  ``torchvision:NAME``           a torchvision architecture, no weights (nothing is downloaded)
  ``zoo:NAME`` or ``NAME``       a model of ``fxreplay.models`` (e.g. ``resnet56``)
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from fxreplay.errors import ModelLoadError

__all__ = ["LoadedModel", "load_model", "make_example_inputs", "import_source", "is_file_spec"]


@dataclass
class LoadedModel:
    """A model and, when its source provides them, example inputs."""

    model: nn.Module
    example_inputs: tuple[Any, ...] | None
    spec: str
    input_shape: tuple[int, ...] | None = None  # per-example shape the model is made for, when known
    input_dtype: str | None = None  # and its dtype ("int64" for token ids), when known


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ModelLoadError(
            f"model file {str(path)!r} does not exist. Give the path of a Python file that "
            "defines build_model() or model, or a spec such as 'pkg.module:attr', "
            "'torchvision:resnet18' or a zoo name like 'resnet20'."
        )
    name = f"_fxreplay_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"cannot import {str(path)!r}: it is not a Python source file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # A model file may import its siblings (from blocks import Block), as when run as a script.
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ModelLoadError(
            f"importing {str(path)!r} failed with {type(exc).__name__}: {exc}. "
            "Fix the file so that `python {path}` runs without error."
        ) from exc
    finally:
        sys.path.remove(str(path.parent.resolve()))
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ModelLoadError(
            f"cannot import module {name!r} ({exc}). Install it, run from the directory that "
            "contains it, or give a file path instead (path/to/model.py:attr)."
        ) from exc


def _resolve(module: ModuleType, attr: str, where: str) -> Any:
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))
            raise ModelLoadError(
                f"{where} has no attribute {attr!r}. It defines: {', '.join(public[:20]) or 'nothing public'}. "
                "Name a module instance, or a function or class that builds one."
            )
        obj = getattr(obj, part)
    return obj


def _instantiate(obj: Any, where: str, kwargs: dict[str, Any]) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    if callable(obj):
        try:
            made = obj(**kwargs)
        except TypeError as exc:
            raise ModelLoadError(
                f"calling {where} with {kwargs or 'no arguments'} failed: {exc}. "
                "It must build the model without required arguments."
            ) from exc
        if isinstance(made, nn.Module):
            return made
        raise ModelLoadError(f"{where} returned {type(made).__name__}, not an nn.Module.")
    raise ModelLoadError(f"{where} is a {type(obj).__name__}, not an nn.Module or a callable that builds one.")


def _example_inputs_of(module: ModuleType) -> tuple[Any, ...] | None:
    fn = getattr(module, "example_inputs", None)
    if fn is None:
        return None
    value = fn() if callable(fn) else fn
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def is_file_spec(path_part: str) -> bool:
    """Whether the part of a spec before ``:`` names a file (``model.py``, ``dir/x``) rather
    than a module (``pkg.module``) or a zoo name."""
    return path_part.endswith(".py") or "/" in path_part


def import_source(path_part: str) -> ModuleType:
    """The Python file or importable module a spec's first part names (model and data specs).

    Raises:
        ModelLoadError: it does not exist or fails to import.
    """
    return _import_file(Path(path_part)) if is_file_spec(path_part) else _import_module(path_part)


def load_model(spec: str, num_classes: int | None = None, block_size: int | None = None) -> LoadedModel:
    """Load a model from a spec string (see the module docstring).

    Args:
        spec: where the model is.
        num_classes: passed to the builder when it accepts ``num_classes``.
        block_size: a token sequence's length (the data set's), passed to a builder that
            accepts ``block_size`` (a language model's context, e.g. ``gpt_tiny``).

    Raises:
        ModelLoadError: the file, module or attribute is missing, or does not give a module.
    """
    kwargs: dict[str, Any] = {}
    hints = {k: v for k, v in (("num_classes", num_classes), ("block_size", block_size)) if v}
    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        builders = torchvision.models.list_models(module=torchvision.models)
        if name not in builders:
            raise ModelLoadError(
                f"torchvision has no model {name!r}. Some it has: {', '.join(sorted(builders)[:15])}, ..."
            )
        extra = {"num_classes": num_classes} if num_classes else {}
        if name == "googlenet" or name.startswith("inception"):
            extra.update(aux_logits=False, init_weights=True)
        model = torchvision.models.get_model(name, weights=None, **extra)
        size = 299 if name.startswith("inception") else 224  # the size its weights were trained at
        return LoadedModel(model, None, spec, (3, size, size))

    path_part, _, attr = spec.partition(":")
    if path_part == "zoo" or (not attr and not is_file_spec(path_part)):
        from fxreplay import models

        name = attr if path_part == "zoo" else path_part
        shape, dtype = models.input_of(name)
        builder = models.ZOO.get(name)
        kw = {k: v for k, v in hints.items() if builder is not None and _accepts(builder, k)}
        return LoadedModel(models.get(name, **kw), None, spec, shape, dtype)

    module = import_source(path_part)
    where = path_part
    if attr:
        obj = _resolve(module, attr, where)
        where = f"{where}:{attr}"
    elif hasattr(module, "build_model"):
        obj, where = module.build_model, f"{where}:build_model"
    elif hasattr(module, "model"):
        obj, where = module.model, f"{where}:model"
    else:
        raise ModelLoadError(
            f"{where} defines neither build_model() nor model. Add one of them, or name the "
            f"attribute to use: '{path_part}:MyNet'."
        )
    if callable(obj) and not isinstance(obj, nn.Module):
        kwargs.update({k: v for k, v in hints.items() if _accepts(obj, k)})
    return LoadedModel(_instantiate(obj, where, kwargs), _example_inputs_of(module), spec)


def make_example_inputs(input_shape: Sequence[int], batch_size: int, seed: int = 0, dtype: str | None = None) -> tuple[torch.Tensor]:
    """One input of shape ``(batch_size, *input_shape)``: random floats reproducible by seed,
    or zeros for an integer ``dtype`` such as ``"int64"`` (token ids: index 0 is valid in
    every embedding)."""
    if not input_shape or any(int(s) <= 0 for s in input_shape) or batch_size <= 0:
        raise ModelLoadError(
            f"bad input shape {list(input_shape)} / batch size {batch_size}: give positive sizes, "
            "e.g. --input-shape 3,32,32 --batch-size 128."
        )
    shape = (batch_size, *[int(s) for s in input_shape])
    kind = getattr(torch, dtype or "float32", None)
    if not isinstance(kind, torch.dtype):
        raise ModelLoadError(f"unknown input dtype {dtype!r}: use a torch dtype name such as float32 or int64.")
    if not kind.is_floating_point:
        return (torch.zeros(shape, dtype=kind),)
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen).to(kind),)

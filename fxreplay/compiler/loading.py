"""Turn a model spec string into an ``nn.Module`` and example inputs.

Specs:
  ``path/to/model.py``           the file defines ``build_model()`` or ``model``, optionally ``example_inputs()``
                                 (a tuple of inputs, or ``(args, kwargs)`` for keyword inputs)
  ``path/to/model.py:attr``      an attribute of the file: a module, or a callable that returns one
  ``pkg.module:attr``            the same, from an importable module
  ``torchvision:NAME``           a torchvision architecture, no weights (nothing is downloaded)
  ``zoo:NAME`` or ``NAME``       a model of ``fxreplay.models`` (e.g. ``resnet56``)
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from fxreplay.compiler.plan import format_bytes
from fxreplay.errors import DeviceMemoryError, FxReplayError, ModelLoadError, allocation_detail, out_of_memory

__all__ = ["LoadedModel", "load_model", "make_example_inputs", "import_source", "is_file_spec", "code_inside"]


@dataclass
class LoadedModel:
    """A model and, when its source provides them, example inputs."""

    model: nn.Module
    example_inputs: tuple[Any, ...] | None
    spec: str
    input_shape: tuple[int, ...] | None = None  # per-example shape the model is made for, when known
    input_dtype: str | None = None  # and its dtype ("int64" for token ids), when known
    example_kwargs: dict[str, Any] | None = None  # keyword inputs, when example_inputs() returns (args, kwargs)


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
    except (Exception, SystemExit) as exc:
        sys.modules.pop(name, None)
        raise ModelLoadError(
            f"importing {str(path)!r} failed with {type(exc).__name__}: {_first_line(exc)}. "
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
            inspect.signature(obj).bind(**kwargs)
        except TypeError as exc:
            raise ModelLoadError(
                f"calling {where} with {kwargs or 'no arguments'} failed: {exc}. "
                "It must build the model without required arguments."
            ) from exc
        except ValueError:
            pass  # no signature to check (a builtin): calling it will tell
        made = _user_call(obj, kwargs, where)
        if isinstance(made, nn.Module):
            return made
        raise ModelLoadError(f"{where} returned {type(made).__name__}, not an nn.Module.")
    raise ModelLoadError(f"{where} is a {type(obj).__name__}, not an nn.Module or a callable that builds one.")


def _user_call(fn: Callable[..., Any], kwargs: dict[str, Any], where: str) -> Any:
    """``fn(**kwargs)``, a function of the user's: whatever it raises is theirs to fix, said in
    one paragraph (the traceback is the one of ``python -c`` running it)."""
    try:
        return fn(**kwargs)
    except (Exception, SystemExit) as exc:
        if isinstance(exc, FxReplayError):
            raise
        if out_of_memory(exc):
            raise ModelLoadError(
                f"{where} ran out of memory while building the model ({allocation_detail(exc)}): the model is too large "
                "for this machine's memory as configured. Build a smaller one (fewer or narrower layers)."
            ) from exc
        raise ModelLoadError(
            f"{where}() raised {type(exc).__name__}: {_first_line(exc)}. The error is in that code, not in fxreplay: "
            f"fix it so that calling {where.rsplit(':', 1)[-1]}() in Python works, then run the command again."
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "(no message)")[:500]


def _example_inputs_of(module: ModuleType, where: str) -> tuple[tuple[Any, ...] | None, dict[str, Any] | None]:
    """A model file's ``example_inputs()``: ``(positional inputs, keyword inputs)``. It may
    return one input, a tuple of inputs, ``(args, kwargs)`` (a tuple and a dict, as
    ``torch.export`` takes them) or a dict of keyword inputs."""
    fn = getattr(module, "example_inputs", None)
    if fn is None:
        return None, None
    value = _user_call(fn, {}, f"{where}:example_inputs") if callable(fn) else fn
    if isinstance(value, dict):
        return (), dict(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], (tuple, list)) and isinstance(value[1], dict):
        return tuple(value[0]), dict(value[1])
    return (tuple(value) if isinstance(value, (tuple, list)) else (value,)), None


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


def code_inside(spec: str, directory: str | os.PathLike[str]) -> Path | None:
    """The Python file that loading ``spec`` would run, when it lies inside ``directory``; else None.

    What a plan may rebuild its model from without asking (``fxreplay.load``): a zoo or
    torchvision name runs fxreplay's and torchvision's code; a file or an importable module
    elsewhere is code already on this machine -- typically the model the plan was partitioned
    from. A file inside the plan directory (or a module found there) came with the plan: code
    whoever sent it wrote. The path is checked as written and with links followed, and nothing
    is imported to find a module (``importlib.util.find_spec`` of its top-level package).
    """
    if spec.startswith("torchvision:"):
        return None
    path_part, _, attr = spec.partition(":")
    if path_part == "zoo" or (not attr and not is_file_spec(path_part)):
        return None
    if is_file_spec(path_part):
        files = [Path(path_part)]
    else:
        try:
            found = importlib.util.find_spec(path_part.split(".")[0])
        except (ImportError, ValueError):
            found = None
        if found is None:
            return None  # nothing to import: loading says so
        files = [Path(p) for p in [found.origin, *(found.submodule_search_locations or [])] if p]
    roots = {Path(os.path.abspath(directory)), Path(directory).resolve()}
    for file in files:
        for candidate in (Path(os.path.abspath(file)), file.resolve()):
            if any(candidate == root or candidate.is_relative_to(root) for root in roots):
                return file
    return None


def load_model(spec: str, num_classes: int | None = None, block_size: int | None = None) -> LoadedModel:
    """Load a model from a spec string (see the module docstring).

    Args:
        spec: where the model is.
        num_classes: passed to the builder when it accepts ``num_classes``.
        block_size: a token sequence's length (the data set's), passed to a builder that
            accepts ``block_size`` (a language model's context, e.g. ``gpt_tiny``).

    Raises:
        ModelLoadError: the file, module or attribute is missing, does not give a module, or
            the user's code (importing the file, ``build_model()``, ``example_inputs()``) raises.
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
    args, keywords = _example_inputs_of(module, path_part)
    return LoadedModel(_instantiate(obj, where, kwargs), args, spec, example_kwargs=keywords)


def make_example_inputs(input_shape: Sequence[int], batch_size: int, seed: int = 0, dtype: str | None = None) -> tuple[torch.Tensor]:
    """One input of shape ``(batch_size, *input_shape)``: random floats reproducible by seed,
    or zeros for an integer ``dtype`` such as ``"int64"`` (token ids: index 0 is valid in
    every embedding).

    Raises:
        ModelLoadError: a size that is not positive, or an unknown dtype.
        DeviceMemoryError: the input alone does not fit in memory (``--input-shape 1,100000,100000``).
    """
    if not input_shape or any(int(s) <= 0 for s in input_shape) or batch_size <= 0:
        raise ModelLoadError(
            f"bad input shape {list(input_shape)} / batch size {batch_size}: give positive sizes, "
            "e.g. --input-shape 3,32,32 --batch-size 128."
        )
    shape = (batch_size, *[int(s) for s in input_shape])
    kind = getattr(torch, dtype or "float32", None)
    if not isinstance(kind, torch.dtype):
        raise ModelLoadError(f"unknown input dtype {dtype!r}: use a torch dtype name such as float32 or int64.")
    size = math.prod(shape) * kind.itemsize
    too_large = DeviceMemoryError(
        f"the example input of shape {shape} ({str(kind).removeprefix('torch.')}) is too large for this machine's "
        f"memory: it alone takes {format_bytes(size)}. Check --input-shape (per example, without the batch: "
        f"{', '.join(map(str, shape[1:]))}) and lower --batch-size ({batch_size})."
    )
    available = _available_memory()
    if available is not None and size > available:
        raise too_large  # refused before the system's out-of-memory killer would end the process
    try:
        if not kind.is_floating_point:
            return (torch.zeros(shape, dtype=kind),)
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(shape, generator=gen).to(kind),)
    except RuntimeError as exc:
        if not out_of_memory(exc):
            raise
        raise too_large from None


def _available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (Linux's MemAvailable; None elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


"""What a checkpoint records of the run that wrote it, and the check that a resume is that run.

A resume continues exactly or not at all. The options given to ``--resume`` are checked
against the run's ``config.yaml`` (:mod:`fxreplay.rundir`); this module checks the *files*:
``checkpoint.pt`` records, under ``"run"``,

- ``config``: the settings that decide the computation (every config key but those in
  :data:`RESUME_MAY_CHANGE`: batch size, seed, method, K, D, model, data, optimizer, ...)
  and ``config_hash``, their SHA-256;
- ``data``: the data set's name, its sizes, and a digest of its labels and first test input;
- ``plan``: K, the model spec, each stage's device and a digest of its nodes, and its hash;
- ``versions``: torch's and fxreplay's.

A checkpoint that does not match the run directory it is resumed in (another run's
``checkpoint.pt`` or ``plan/``, other data at ``data.root``) is refused naming the difference.
A torch or fxreplay version that differs in its major or minor number is refused too (a new
release may compute the same step differently, so the run would not continue exactly); one
that differs only below (a patch release, a local build tag) is resumed with a warning.
A checkpoint written before these records existed is resumed with a warning: only its
method and K can be checked.

>>> run = record(cfg, data_identity("digits", train_set, test_set), pipe.plan)  # doctest: +SKIP
>>> check_config(run, cfg, Path("runs/a"))                                       # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

import fxreplay
from fxreplay.compiler.plan import Plan
from fxreplay.config import Config, to_dict
from fxreplay.data import example_batch, labels_only
from fxreplay.errors import CheckpointError

__all__ = ["RESUME_MAY_CHANGE", "flat", "settings", "data_identity", "plan_identity", "versions", "record",
           "check_config", "check_versions", "check_data", "check_plan"]

RESUME_MAY_CHANGE = frozenset({
    "train.max_steps", "train.epochs", "train.log_every", "train.out", "train.timeline", "train.timeout",
    "train.eval_every_epoch", "train.sigma_every", "train.tensorboard", "data.num_workers", "data.root", "data.download",
    "optim.lr",
})
"""Settings a ``--resume`` may change: when to stop, what to log and where things are, not
what is computed (``train.epochs`` extends a run; its lr milestones follow the new length) —
and the learning rate, the one deliberate change a diverged run's message advises (lower it
and resume). Every change is recorded in ``config.yaml``."""


def flat(cfg: Config) -> dict[str, Any]:
    """The config as dotted keys: ``{"data.batch_size": 64, ...}``."""
    return {f"{section}.{key}": value for section, part in to_dict(cfg).items() for key, value in part.items()}


def _json(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples become lists): what a record holds and is compared as."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def settings(cfg: Config) -> dict[str, Any]:
    """The settings that decide what a run computes: every dotted key but :data:`RESUME_MAY_CHANGE`."""
    return _json({k: v for k, v in flat(cfg).items() if k not in RESUME_MAY_CHANGE})


def _tensor_digest(value: Any) -> str | None:
    try:
        tensor = torch.as_tensor(value).detach().cpu().contiguous()
        return hashlib.sha256(str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode()
                              + tensor.numpy().tobytes()).hexdigest()
    except Exception:  # not numbers (a user's data set may hold anything): not compared
        return None


def data_identity(name: str, train_set: Any, test_set: Any) -> dict[str, Any]:
    """What tells one data set from another, cheaply: its name, sizes, a digest of the labels
    (where they can be read without loading the examples) and of the first test input (the
    test set is not augmented). A part that cannot be read is None and is not compared."""
    labels = []
    for dataset in (train_set, test_set):
        only = labels_only(dataset)
        labels.append(_tensor_digest(getattr(only, "labels")) if only is not dataset else None)
    try:
        first = _tensor_digest(example_batch(test_set, 1, name)[0])
    except Exception:  # an empty or odd test set: the run itself says what is wrong with it
        first = None
    return {"name": name, "train_examples": len(train_set), "test_examples": len(test_set),
            "train_labels": labels[0], "test_labels": labels[1], "first_test_input": first}


def plan_identity(plan: Plan) -> dict[str, Any]:
    """The parts of a plan that decide the computation (not its predicted costs): K, the model
    spec, and per stage its device and a digest of its nodes and replicated parameters."""
    model = _json({"spec": plan.model.spec, "input_shape": plan.model.input_shape, "input_dtype": plan.model.input_dtype,
                   "num_classes": plan.model.num_classes, "leaf_modules": plan.model.leaf_modules})
    stages = [_digest([list(s.nodes), list(s.replicas)]) for s in plan.stages]
    devices = [s.device for s in plan.stages]
    return {"K": plan.K, "model": model, "devices": devices, "stages": stages,
            "hash": _digest({"K": plan.K, "model": model, "devices": devices, "stages": stages})}


def versions() -> dict[str, str]:
    return {"torch": str(torch.__version__), "fxreplay": fxreplay.__version__}


def record(cfg: Config, data: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """What a checkpoint records of the run that writes it (see the module docstring)."""
    config = settings(cfg)
    return {"config": config, "config_hash": _digest(config), "data": data, "plan": plan_identity(plan),
            "versions": versions()}


_NEW_RUN = "or start a new run (--out DIR, or --overwrite to start afresh in this directory)."


def check_config(recorded: dict[str, Any], cfg: Config, where: Path) -> None:
    """The run is resumed under the settings the checkpoint was written with.

    Keys only one side has (added or removed by another fxreplay version) are not compared.

    Raises:
        CheckpointError: naming each setting, as recorded and as configured now.
    """
    then, now = recorded.get("config", {}), settings(cfg)
    if recorded.get("config_hash") == _digest(now):
        return
    diffs = [f"{key} {then[key]!r} in the checkpoint, {now[key]!r} in the config" for key in sorted(set(then) & set(now)) if then[key] != now[key]]
    if diffs:
        raise CheckpointError(
            f"the checkpoint in {where} is another run's: it was written under other settings than the config it would "
            f"continue under ({'; '.join(diffs)}); nothing was changed. A checkpoint continues only the run that wrote "
            f"it: resume that run's own directory, {_NEW_RUN}"
        )


def _release(version: str) -> tuple[int, ...] | str:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else version


def check_versions(recorded: dict[str, Any], where: Path) -> str | None:
    """torch and fxreplay are the releases that wrote the checkpoint: another major or minor
    release is refused, another patch release (or build) is resumed with a warning.

    Returns:
        The warning to show when only a patch release or build differs, else None.

    Raises:
        CheckpointError: a release that may compute the run's steps differently.
    """
    then, now = recorded.get("versions", {}), versions()
    changed = [(name, str(then[name]), now[name]) for name in now if then.get(name) and str(then[name]) != now[name]]
    releases = [(name, a, b) for name, a, b in changed if _release(a) != _release(b)]
    if releases:
        named = "; ".join(f"{name} {a} in the checkpoint, {b} installed now" for name, a, b in releases)
        wanted = ", ".join(f"{name}=={'.'.join(map(str, r)) if isinstance(r := _release(a), tuple) else a}.*"
                           for name, a, _ in releases)
        raise CheckpointError(
            f"the checkpoint in {where} was written with another release ({named}): a new release may compute the same "
            "steps differently (kernels, default algorithms, random streams), so the run would not continue exactly; "
            f"nothing was changed. Resume it where {wanted} is installed, or start a new run (--out DIR, or --overwrite)."
        )
    if not changed:
        return None
    named = "; ".join(f"{name} {a} in the checkpoint, {b} installed now" for name, a, b in changed)
    return (f"the checkpoint in {where} was written with another patch release or build ({named}); a patch release "
            "computes the same steps, so the run is resumed.")


_DATA_PARTS = {"name": "name", "train_examples": "training examples", "test_examples": "test examples",
               "train_labels": "training labels", "test_labels": "test labels", "first_test_input": "first test input"}


def check_data(recorded: dict[str, Any], data: dict[str, Any], where: Path) -> None:
    """The run is resumed on the data set the checkpoint was trained on.

    Raises:
        CheckpointError: naming what differs (sizes with both values; labels or inputs by digest).
    """
    then = recorded.get("data", {})
    diffs = []
    for key, label in _DATA_PARTS.items():
        a, b = then.get(key), data.get(key)
        if a is not None and b is not None and a != b:
            diffs.append(f"{label} {a} in the checkpoint, {b} now" if key in ("name", "train_examples", "test_examples")
                         else f"the {label} differ")
    if diffs:
        raise CheckpointError(
            f"the data set is not the one the checkpoint in {where} was trained on ({'; '.join(diffs)}); nothing was "
            f"changed. Point data.root (--data-root) at the data the run was trained on, {_NEW_RUN}"
        )


def check_plan(recorded: dict[str, Any], plan: Plan, source: str, where: Path) -> None:
    """The run is resumed on the plan the checkpoint was trained with.

    Args:
        source: where the plan comes from, for the message ("the plan in runs/a/plan").

    Raises:
        CheckpointError: naming what differs (K, model, devices, the stages whose nodes moved).
    """
    then, now = recorded.get("plan", {}), plan_identity(plan)
    if not then or then.get("hash") == now["hash"]:
        return
    diffs = []
    if then.get("K") != now["K"]:
        diffs.append(f"K {then.get('K')} in the checkpoint, {now['K']} in the plan")
    if then.get("model") != now["model"]:
        diffs.append(f"model {then.get('model', {}).get('spec')!r} in the checkpoint, {now['model']['spec']!r} in the plan")
    if then.get("devices") != now["devices"]:
        diffs.append(f"devices {','.join(then.get('devices', []))} in the checkpoint, {','.join(now['devices'])} in the plan")
    if then.get("K") == now["K"]:
        moved = [str(k) for k, (a, b) in enumerate(zip(then.get("stages", []), now["stages"])) if a != b]
        if moved:
            diffs.append(f"stage{'s' if len(moved) > 1 else ''} {', '.join(moved)} hold{'' if len(moved) > 1 else 's'} other nodes")
    raise CheckpointError(
        f"{source} is not the plan the checkpoint in {where} was trained with ({'; '.join(diffs or ['the plans differ'])}): "
        f"it was changed after the checkpoint, or comes from another run; nothing was changed. Restore the run's own "
        f"plan, {_NEW_RUN}"
    )

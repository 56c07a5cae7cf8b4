"""Run configuration: frozen dataclasses loaded from YAML, with dotted-key overrides.

A config file has five sections (``model``, ``data``, ``optim``, ``partition``, ``train``);
any key left out takes the default below, which is the paper's setting where the paper has
one (Huo, Gu & Huang 2018, Sec. 5: SGD, lr 0.01, momentum 0.9, weight decay 5e-4,
batch 128, 300 epochs, lr / 10 at 50% and 75%). ``load_config(None)`` is instead the
offline quick start (``DEFAULT_YAML``). YAML is read with ``yaml.safe_load``: a config is
data, never code. Unknown keys and wrong types raise ``ConfigError`` naming the dotted key.

Example:
    >>> cfg = load_config("configs/resnet20_cifar10.yaml")
    >>> cfg = apply_overrides(cfg, {"train.method": "fr", "partition.K": "3"})
    >>> yaml.safe_dump(to_dict(cfg))
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union

import yaml

from fxreplay import methods
from fxreplay.checkpoint import write_text_atomic
from fxreplay.errors import ConfigError, FxReplayError, not_utf8
from fxreplay.mesh import check_sync_batchnorm
from fxreplay.methods.compensation import parse as parse_compensation
from fxreplay.precision import Precision, check_precision

__all__ = [
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "PartitionConfig",
    "TrainConfig",
    "Config",
    "DEFAULT_YAML",
    "load_config",
    "from_dict",
    "apply_overrides",
    "to_dict",
    "save_config",
]

Cost = Literal["flops", "time", "auto", "params", "uniform"]
Executor = Literal["local", "distributed"]


def _fail(key: str, message: str) -> ConfigError:
    return ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class ModelConfig:
    """What to train."""

    section: ClassVar[str] = "model"

    # A zoo name ("resnet20"), a file ("examples/branchy_net.py"), "pkg.mod:attr" or
    # "torchvision:resnet18"; resolved by fxreplay.compiler.loading, kept as a string here.
    # digits_cnn because it is the one model the offline quick-start data fits.
    name: str = "digits_cnn"
    # None: the data set's class count (10 or 100), so one model line serves both CIFARs.
    num_classes: int | None = None
    # One example's shape *without* the batch dimension, e.g. [3, 32, 32]; None: the data
    # set's. Needed only for models that cannot infer it (tracing uses example inputs).
    input_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise _fail("model.name", "must not be empty")
        if self.num_classes is not None and self.num_classes < 1:
            raise _fail("model.num_classes", f"must be >= 1, got {self.num_classes}")
        if self.input_shape is not None and any(d < 1 for d in self.input_shape):
            raise _fail("model.input_shape", f"sizes must be >= 1, got {list(self.input_shape)}")


@dataclass(frozen=True)
class DataConfig:
    """Which data set, where it is, how it is batched."""

    section: ClassVar[str] = "data"

    # digits ships inside scikit-learn: the only data set guaranteed to be there offline (with
    # text:, the Python standard library's source). Also cifar10, cifar100, torchvision:NAME,
    # imagefolder:DIR, text:PATH, file.py:fn, pkg.module:fn; resolved by fxreplay.data.
    name: str = "digits"
    # Relative to the working directory; holds cifar-10-batches-py/ or cifar-100-python/, a
    # torchvision data set's folder (FashionMNIST/raw/...), or is passed to a file.py:fn as root=.
    root: str = "data"
    # Off: runs must not reach the network unless the user asks (most machines here have none).
    download: bool = False
    # On: torchvision's md5 check; turning it off must be an explicit choice (re-packed copies),
    # whose pickled files are then read by a restricted unpickler (fxreplay.data.cifar_pickle).
    verify: bool = True
    # The paper's batch size.
    batch_size: int = 128
    # The paper's augmentation (random crop with 4-pixel padding + horizontal flip; CIFAR only).
    augment: bool = True
    # 0 = load in the main process: deterministic and enough for CIFAR-sized images on CPU.
    num_workers: int = 0
    # Train on a fixed subset of this many training examples (None: all of them), the same
    # for every run: the first N of a permutation seeded by subset_seed, in data-set order.
    subset: int | None = None
    # The subset's permutation seed (independent of train.seed: compared runs share the subset).
    subset_seed: int = 0
    # text: bytes per example, the context a language model sees (gpt_tiny's position table is 64).
    block_size: int = 64

    def __post_init__(self) -> None:
        if not self.name:
            raise _fail("data.name", "must not be empty")
        if self.block_size < 1:
            raise _fail("data.block_size", f"must be >= 1, got {self.block_size}")
        if self.batch_size < 1:
            raise _fail("data.batch_size", f"must be >= 1, got {self.batch_size}")
        if self.subset is not None and self.subset < 1:
            raise _fail("data.subset", f"must be >= 1 (or null for the whole training set), got {self.subset}")
        if self.num_workers < 0:
            raise _fail("data.num_workers", f"must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer, its lr schedule and gradient clipping (the paper's SGD with a step
    schedule by default), plus the DNI synthesizers' optimizer."""

    section: ClassVar[str] = "optim"

    # The paper's optimizer; any torch.optim class by name, any case (adamw, adam, rmsprop, ...).
    name: str = "sgd"
    # The paper's initial learning rate.
    lr: float = 0.01
    # The paper's momentum; passed to the classes that take one (SGD, RMSprop), ignored by the
    # others (Adam's is args.betas), which refuse another value than this default.
    momentum: float = 0.9
    # The paper's weight decay.
    weight_decay: float = 5e-4
    # The class's other keyword arguments (betas, eps, nesterov, ...): none, its defaults.
    args: dict[str, Any] = field(default_factory=dict, hash=False)
    # Parameters not decayed: none, as in the paper; "auto" (biases, norms' weights -- fewer
    # than 2 dimensions -- and embeddings, as language models train), or fnmatch patterns of
    # the model's parameter names.
    no_decay: tuple[str, ...] = ()
    # The paper's step decay (fxreplay.lr_schedule: constant, step, cosine, linear, onecycle),
    # stepped every iteration over the horizon train.epochs x steps per epoch.
    schedule: str = "step"
    # Iterations of linear warm-up from 0 before the schedule; the paper has none.
    warmup_steps: int = 0
    # step: fractions of the epochs after which lr is multiplied by gamma; the paper divides by
    # 10 at 50% and 75% (epochs 150 and 225 of 300). Fractions keep short runs meaningful.
    milestones: tuple[float, ...] = (0.5, 0.75)
    # The paper's "divide by 10".
    gamma: float = 0.1
    # Largest global gradient norm (all stages' gradients together); None: no clipping, as the paper.
    clip_grad_norm: float | None = None
    # The official FR code doubles module 1's lr; a quirk, not the algorithm: off.
    double_first_stage_lr: bool = False
    # Adam's lr for DNI's synthesizers: SGD often fails to train them (DESIGN.md Sec. 3).
    synth_lr: float = 1e-4

    def __post_init__(self) -> None:
        from fxreplay.lr_schedule import SCHEDULES
        from fxreplay.optimizers import AUTO, check_args

        if self.schedule not in SCHEDULES:
            raise _fail("optim.schedule", f"expected one of {', '.join(SCHEDULES)}, got {_describe(self.schedule)}")
        if self.warmup_steps < 0:
            raise _fail("optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.clip_grad_norm is not None and not (math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0):
            raise _fail("optim.clip_grad_norm", f"must be a number > 0 (or null: no clipping), got {self.clip_grad_norm}")
        if AUTO in self.no_decay and len(self.no_decay) > 1:
            raise _fail("optim.no_decay", f"is either auto or a list of name patterns, got {list(self.no_decay)}")
        if not isinstance(self.args, dict):
            raise _fail("optim.args", f"expected a mapping of keyword arguments (e.g. {{betas: [0.9, 0.95]}}), got {_describe(self.args)}")
        momentum = self.class_momentum  # names optim.name or optim.momentum when wrong
        try:
            check_args(self.name, self.args, lr=1.0, weight_decay=self.weight_decay, momentum=momentum)
        except FxReplayError as exc:
            raise _fail("optim.args", str(exc)) from None
        for key in ("lr", "synth_lr", "gamma", "momentum", "weight_decay"):
            if not math.isfinite(getattr(self, key)):
                raise _fail(f"optim.{key}", f"must be a finite number, got {getattr(self, key)}")
        for key in ("lr", "synth_lr", "gamma"):
            if getattr(self, key) <= 0:
                raise _fail(f"optim.{key}", f"must be > 0, got {getattr(self, key)}")
        if not 0 <= self.momentum < 1:
            raise _fail("optim.momentum", f"must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise _fail("optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        ms = list(self.milestones)
        if any(not 0 < m <= 1 for m in ms) or ms != sorted(set(ms)):
            raise _fail(
                "optim.milestones",
                f"must be increasing fractions of the epochs in (0, 1], got {ms}",
            )

    @property
    def class_momentum(self) -> float | None:
        """``momentum`` as the optimizer class is given it: None for a class without one.

        Raises:
            ConfigError: a momentum other than the default for a class that has none.
        """
        from fxreplay.optimizers import optimizer_class

        try:
            cls = optimizer_class(self.name)
        except FxReplayError as exc:
            raise _fail("optim.name", str(exc)) from None
        if "momentum" in inspect.signature(cls.__init__).parameters:
            return self.momentum
        if self.momentum != OptimConfig.momentum:
            raise _fail("optim.momentum", f"{cls.__name__} has no momentum (Adam's β₁ is optim.args.betas): leave it out")
        return None


@dataclass(frozen=True)
class PartitionConfig:
    """How the model is cut into stages."""

    section: ClassVar[str] = "partition"

    # The paper's largest split (it reports K = 2, 3, 4).
    K: int = 4
    # FLOPs are deterministic (every method of a comparison gets the same split); "time" (or
    # "auto", time on a CPU plan) measures, and balances a CPU run better; "params"/"uniform" count.
    cost: Cost = "flops"
    # Module names at which a stage starts (e.g. ["layer2", "layer3.1"]); empty lets the solver choose.
    boundaries: tuple[str, ...] = ()
    # One device per stage ("cpu", "cuda:0", ...); None puts every stage on the default one.
    devices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.K < 1:
            raise _fail("partition.K", f"must be >= 1, got {self.K}")
        if len(self.boundaries) > self.K - 1:
            raise _fail(
                "partition.boundaries",
                f"{len(self.boundaries)} pinned boundaries need K >= {len(self.boundaries) + 1}, "
                f"got K = {self.K}",
            )


@dataclass(frozen=True)
class TrainConfig:
    """How long, with which method, where the outputs go."""

    section: ClassVar[str] = "train"

    # The method the paper proposes (features replay); the others are its baselines
    # (fxreplay.methods lists them).
    method: str = "fr"
    # The paper's schedule length.
    epochs: int = 300
    # Stop after this many iterations in total (smoke tests, benchmarks); None: no limit.
    max_steps: int | None = None
    # One seed for init, data order and dropout, so two runs differ only in what you change.
    seed: int = 0
    # Metrics, checkpoints, the plan and this config are written here.
    out: str = "runs/default"
    # local: one process, the deterministic reference; distributed: one rank per stage.
    executor: Executor = "local"
    # Iterations between log lines: frequent enough to watch, rare enough to be cheap.
    log_every: int = 50
    # Iterations between sufficient-direction (sigma) measurements; each costs one full
    # BP pass, so 0 (off) unless reproducing the paper's Fig. 3.
    sigma_every: int = 0
    # Test accuracy after every epoch, as the paper's curves plot it.
    eval_every_epoch: bool = True
    # Distributed runs: record per-rank compute / wait / send intervals and write
    # timeline.json + timeline.png (a few tuples per iteration: cheap).
    timeline: bool = True
    # Distributed runs: seconds a rank waits for a neighbour before the job is failed.
    timeout: float = 60.0
    # Methods torch's pipeline schedules run (GPipe, 1F1B): microbatches per step. 4 overlaps
    # 2-4 stages (1F1B needs >= K) and divides the usual batch sizes; others ignore it.
    microbatches: int = 4
    # Data-parallel replicas of the pipeline (K stages x D replicas, one rank each: K*D ranks).
    # Each replica trains on 1/D of every batch; stage k's gradients are averaged over its D
    # replicas before each update, so the weights are those of one pipeline on the whole batch.
    dp: int = 1
    # With dp > 1 on GPU stages: each stage's BatchNorm layers become torch's SyncBatchNorm over
    # its D replicas (statistics of the whole batch, as one pipeline would see). Off: it costs
    # collectives in every forward and backward, and per-replica statistics are the usual
    # data-parallel default (torch's DDP). torch synchronises only GPU inputs: refused on CPU.
    sync_batchnorm: bool = False
    # Staleness compensation of a delayed method (fr, ddg): none is the paper's Algorithm 1;
    # auto the recommended rules (fxreplay.methods.compensation; README, "Staleness compensation").
    compensation: str = "none"
    # Autocast dtype of the stages' forwards and the loss: fp32 (none, as the paper); bf16;
    # fp16 (CUDA only, loss scaled). Weights, gradients and optimizer state stay fp32.
    precision: Precision = "fp32"
    # Also write metrics.jsonl's scalars as TensorBoard events in OUT/tensorboard/: off, as it
    # needs the optional tensorboard package (pip install 'fxreplay[tensorboard]').
    tensorboard: bool = False

    def __post_init__(self) -> None:
        if self.method not in methods.names():
            raise _fail("train.method", f"expected one of {', '.join(repr(n) for n in methods.names())}, got {_describe(self.method)}")
        if self.epochs < 1:
            raise _fail("train.epochs", f"must be >= 1, got {self.epochs}")
        if self.seed < 0:
            raise _fail("train.seed", f"must be >= 0, got {self.seed}")
        if self.max_steps is not None and self.max_steps < 1:
            raise _fail("train.max_steps", f"must be >= 1 or null, got {self.max_steps}")
        if self.log_every < 1:
            raise _fail("train.log_every", f"must be >= 1, got {self.log_every}")
        if self.sigma_every < 0:
            raise _fail("train.sigma_every", f"must be >= 0 (0 = off), got {self.sigma_every}")
        if not self.out:
            raise _fail("train.out", "must not be empty")
        if not self.timeout > 0:
            raise _fail("train.timeout", f"must be > 0 seconds, got {self.timeout}")
        if self.microbatches < 1:
            raise _fail("train.microbatches", f"must be >= 1, got {self.microbatches}")
        if not isinstance(self.dp, int) or isinstance(self.dp, bool) or self.dp < 1:
            raise _fail("train.dp", f"must be an integer >= 1 (data-parallel replicas), got {_describe(self.dp)}")
        if self.sync_batchnorm:
            check_sync_batchnorm((), self.dp)
        if not isinstance(self.compensation, str):
            raise _fail("train.compensation", f"expected a rule name such as none, auto or predict+spike, got {_describe(self.compensation)}")
        try:
            comp = parse_compensation(self.compensation)
        except FxReplayError as exc:
            raise _fail("train.compensation", str(exc)) from None
        if not comp.is_none and "compensation" not in methods.get(self.method).worker.option_names:
            raise _fail("train.compensation", f"{comp.name!r} corrects delayed gradients; method {self.method!r} has none "
                        f"(it applies to {', '.join(n for n, m in methods.METHODS.items() if 'compensation' in m.worker.option_names)}): "
                        "set it to none or change train.method")


@dataclass(frozen=True)
class Config:
    """A whole run: model, data, optimizer, partition, training."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # Across sections: a method with microbatches needs M to fit K and each replica's
        # share of the batch (torch's microbatches are equal: D must divide the batch too).
        spec, D, B = methods.get(self.train.method), self.train.dp, self.data.batch_size
        if spec.pipelining is not None and D > 1 and B % D:
            raise _fail("train.dp", f"{self.train.method} splits each replica's share of the batch into equal microbatches, so "
                        f"D={D} replicas must divide data.batch_size ({B}): use a batch size that is a multiple of {D}")
        if spec.pipelining is not None and self.train.sync_batchnorm:
            raise _fail("train.sync_batchnorm", f"is not offered with {self.train.method} (torch's schedule runs the stages' "
                        "forwards): turn it off, or use one of " + ", ".join(methods.one_process_names()))
        try:
            spec.check_microbatches(self.train.microbatches, self.partition.K, B // D if spec.pipelining is not None else B)
        except FxReplayError as exc:
            raise _fail("train.microbatches", str(exc)) from None
        if self.train.sync_batchnorm and self.partition.devices is not None:
            # Without partition.devices a plan may still give GPUs: the launcher checks the plan's.
            check_sync_batchnorm(self.partition.devices, self.train.dp)
        if self.train.precision == "fp16" and self.partition.devices is not None:
            # Without partition.devices the plan's devices decide: the trainer checks them.
            try:
                check_precision("fp16", [d.split("@")[0].split("/")[0] for d in self.partition.devices])
            except FxReplayError as exc:
                raise _fail("train.precision", str(exc)) from None
        self._check_compensation_fits_optimizer()

    def _check_compensation_fits_optimizer(self) -> None:
        """A compensation rule that assumes an optimizer (spike: heavy-ball SGD) is refused here,
        before any data or model is loaded, as the stages would refuse it."""
        comp = parse_compensation(self.train.compensation)
        if comp.is_none:
            return
        from fxreplay.methods.compensation import resolve, validate
        from fxreplay.optimizers import check_args

        o = self.optim
        optimizer = check_args(o.name, o.args, lr=1.0, weight_decay=o.weight_decay, momentum=o.class_momentum)
        try:
            validate(resolve(comp, optimizer, self.train.method), optimizer, self.train.method)
        except FxReplayError as exc:
            raise _fail("train.compensation", str(exc)) from None


_SECTIONS: dict[str, type[Any]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "partition": PartitionConfig,
    "train": TrainConfig,
}

DEFAULT_YAML = """\
# The offline quick start: `fxreplay train` with no config. sklearn's digits need no
# download, and these settings finish in well under a minute on 2 CPU cores. With BP,
# seeds 0-3 reached 98-99% test accuracy after epoch 4 (>= 97% after epoch 3).
model:
  name: digits_cnn        # BatchNorm + residual + dropout: every FR pitfall, 38k params
data:
  name: digits            # ships with scikit-learn: works without a network
  batch_size: 64          # 1,437 training images: 23 iterations per epoch, enough steps
optim:
  lr: 0.05                # higher than the paper's 0.01: 4 epochs instead of 300
partition:
  K: 2                    # the smallest split that still exercises replay and delays
train:
  method: fr
  epochs: 4               # 2 at lr 0.05, then one each at /10 and /100 (milestones 0.5, 0.75)
  out: runs/quickstart
  log_every: 10           # an epoch is only 23 iterations
"""


# ------------------------------------------------------------------- type coercion

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "none", "~"}


def _describe(value: object) -> str:
    return repr(value) if isinstance(value, str) else f"{value!r} ({type(value).__name__})"


def _coerce(value: object, hint: Any, key: str) -> Any:
    """``value`` as type ``hint``, or a ConfigError naming ``key``.

    Strings are parsed for numeric, boolean, null and list fields, because CLI overrides
    arrive as strings and YAML 1.1 reads ``1e-4`` (no dot) as a string.
    """
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        is_null_text = isinstance(value, str) and value.lower() in _NULL and inner is not str
        if value is None or is_null_text:
            return None
        return _coerce(value, inner, key)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise _fail(key, f"expected one of {choices}, got {_describe(value)}")
        return value
    if origin is dict:
        if isinstance(value, str):  # a command line's {betas: [0.9, 0.95]}
            try:
                value = yaml.safe_load(value) if value.strip() else {}
            except yaml.YAMLError:
                pass
        if value is None:
            value = {}
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _fail(key, f"expected a mapping of names to values, e.g. {{betas: [0.9, 0.95]}}, got {_describe(value)}")
        return dict(value)
    if origin is tuple:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = yaml.safe_load(text)
            else:
                value = [part.strip() for part in text.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise _fail(key, f"expected a list, got {_describe(value)}")
        return tuple(_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise _fail(key, f"expected true or false, got {_describe(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise _fail(key, f"expected an integer, got {_describe(value)}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _fail(key, f"expected a number, got {_describe(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise _fail(key, f"expected a string, got {_describe(value)}")
    raise TypeError(f"config field {key} has an unsupported type {hint!r}")  # a bug here


_T = TypeVar("_T")


def _unknown(key: str, valid: list[str]) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return _fail(key, f"unknown key{hint}; valid keys: {', '.join(valid)}")


def _section_from_dict(cls: type[_T], data: object, prefix: str) -> _T:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise _fail(prefix, f"expected a mapping of keys to values, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = f"{prefix}.{raw_key}"
        if raw_key not in names:
            raise _unknown(key, names)
        values[raw_key] = _coerce(value, hints[raw_key], key)
    return cls(**values)


def from_dict(data: object) -> Config:
    """A Config from plain data (a parsed YAML document); missing keys take defaults.

    Raises:
        ConfigError: an unknown key, a wrong type or a bad value, named by its dotted key.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"a config must be a mapping with sections {', '.join(_SECTIONS)}; "
            f"got {_describe(data)}"
        )
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in _SECTIONS:
            raise _unknown(str(name), list(_SECTIONS))
        sections[name] = _section_from_dict(_SECTIONS[name], value, name)
    return Config(**sections)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """The Config in the YAML file ``path``, or the quick-start default (``DEFAULT_YAML``).

    Raises:
        ConfigError: the file is missing, is not valid YAML, or has a bad key or value.
    """
    if path is None:
        return from_dict(yaml.safe_load(DEFAULT_YAML))
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(not_utf8(os.fspath(path), exc)) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {os.fspath(path)!r}: {exc.strerror or exc}. "
            "Give the path of a YAML file such as configs/resnet20_cifar10.yaml."
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{os.fspath(path)} is not valid YAML: {exc}") from None
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{os.fspath(path)}: {exc}") from None


def apply_overrides(cfg: Config, overrides: Mapping[str, object]) -> Config:
    """A copy of ``cfg`` with dotted keys replaced, e.g. ``{"optim.lr": 0.1}``.

    Values may be typed or strings as typed on a command line ("0.1", "false", "null",
    "layer2,layer3"). Each section is re-validated.

    Raises:
        ConfigError: a key that is not ``section.field``, or a value of the wrong type.
    """
    changes: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in _SECTIONS:
            raise _unknown(section, list(_SECTIONS))
        cls = _SECTIONS[section]
        names = [f.name for f in dataclasses.fields(cls)]
        if name not in names:
            if not name:
                raise _fail(key, f"expected section.key, e.g. {section}.{names[0]}")
            raise _unknown(key, names)
        hint = typing.get_type_hints(cls)[name]
        changes.setdefault(section, {})[name] = _coerce(value, hint, key)
    replaced = {
        section: dataclasses.replace(getattr(cfg, section), **fields)
        for section, fields in changes.items()
    }
    return dataclasses.replace(cfg, **replaced)


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """``cfg`` as plain data (dicts, lists, scalars) for ``yaml.safe_dump``; loads back equal."""
    out: dict[str, dict[str, Any]] = {}
    for section in _SECTIONS:
        part = getattr(cfg, section)
        out[section] = {f.name: _plain(getattr(part, f.name)) for f in dataclasses.fields(part)}
    return out


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write ``cfg`` as YAML (e.g. next to a run, so it can be re-run with ``load_config``)."""
    write_text_atomic(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))

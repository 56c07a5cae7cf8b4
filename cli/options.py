"""Options that several commands take, declared once so their names and help agree."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fxreplay.methods import METHODS

__all__ = ["SeedOption", "SigmaEveryOption", "DpOption", "SyncBatchnormOption", "ModelOption", "DataOption", "DataRootOption", "LrOption", "WarmupStepsOption", "BatchSizeOption", "MicrobatchesOption", "TrustPlanCodeOption", "OverwriteOption", "data_overrides"]

ModelOption = Annotated[Optional[str], typer.Option(
    "--model", help="the model (overrides model.name): a zoo name (gpt_tiny), model.py, file.py:attr, pkg.module:attr "
                    "or torchvision:NAME")]
DataOption = Annotated[Optional[str], typer.Option(
    "--data", help="the data set (overrides data.name): digits | cifar10 | cifar100 | torchvision:NAME | imagefolder:DIR | "
                   "text:PATH (text: = the built-in corpus) | file.py:fn | pkg.module:fn")]
DataRootOption = Annotated[Optional[Path], typer.Option("--data-root", help="where the data set's files are (overrides data.root)")]
LrOption = Annotated[Optional[float], typer.Option(help="override optim.lr")]
WarmupStepsOption = Annotated[Optional[int], typer.Option(
    "--warmup-steps", help="a linear lr warm-up from 0 over the first N iterations, before the schedule (overrides "
                           "optim.warmup_steps; deep networks at a high rate start better with one, with or without "
                           "compensation: docs/compensation.md)")]
DpOption = Annotated[Optional[int], typer.Option(
    "--dp", help="data-parallel replicas of the pipeline: K*D ranks, each replica on 1/D of every batch (overrides train.dp)")]
SyncBatchnormOption = Annotated[Optional[bool], typer.Option(
    "--sync-batchnorm/--no-sync-batchnorm", help="with --dp D > 1 on GPU stages: BatchNorm normalises over the D replicas' "
                                                 "shards (torch's SyncBatchNorm; refused on CPU) (overrides train.sync_batchnorm)")]
BatchSizeOption = Annotated[Optional[int], typer.Option(help="override data.batch_size")]
SigmaEveryOption = Annotated[Optional[int], typer.Option(
    "--sigma-every", help="measure σ per module every N iterations, against a true BP gradient on the same batch (the "
                          "paper's Fig. 3; each costs a BP pass; one process only) (overrides train.sigma_every; 0: never)")]
SeedOption = Annotated[Optional[int], typer.Option(
    "--seed", help="seed of the initial weights, the data order and augmentation (overrides train.seed)")]
_PIPELINED = ", ".join(name for name, spec in METHODS.items() if spec.needs_ranks)
MicrobatchesOption = Annotated[Optional[int], typer.Option(
    "--microbatches", help=f"microbatches per step of the methods torch's pipeline schedules run ({_PIPELINED}); must divide "
                           "the batch size, and 1F1B needs >= K (overrides train.microbatches, default 4)")]

TrustPlanCodeOption = Annotated[bool, typer.Option(
    "--trust-plan-code", help="let the plan import the Python file its model.spec names inside the plan directory "
                              "(code that came with the plan; refused without this). Zoo, torchvision and importable "
                              "models, and model files elsewhere, need no trust")]

OverwriteOption = Annotated[bool, typer.Option(
    "--overwrite", help="write into --out even if it holds files that are not this command's (an earlier run or plan, "
                        "your own files): files of the names it writes are replaced, any other left as it is")]


def data_overrides(model: str | None, data: str | None, data_root: Path | None, lr: float | None,
                   batch_size: int | None, warmup_steps: int | None) -> dict[str, object]:
    """The config keys these options override (None: not given)."""
    return {"model.name": model, "data.name": data, "data.root": str(data_root) if data_root else None,
            "optim.lr": lr, "optim.warmup_steps": warmup_steps, "data.batch_size": batch_size}

"""Options that several commands take, declared once so their names and help agree."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fxreplay.methods import METHODS

__all__ = ["DpOption", "SyncBatchnormOption", "ModelOption", "DataOption", "DataRootOption", "LrOption", "BatchSizeOption", "MicrobatchesOption", "data_overrides"]

ModelOption = Annotated[Optional[str], typer.Option(
    "--model", help="the model (overrides model.name): a zoo name (gpt_tiny), model.py, file.py:attr, pkg.module:attr "
                    "or torchvision:NAME")]
DataOption = Annotated[Optional[str], typer.Option(
    "--data", help="the data set (overrides data.name): digits | cifar10 | cifar100 | torchvision:NAME | imagefolder:DIR | "
                   "text:PATH (text: = the built-in corpus) | file.py:fn | pkg.module:fn")]
DataRootOption = Annotated[Optional[Path], typer.Option("--data-root", help="where the data set's files are (overrides data.root)")]
LrOption = Annotated[Optional[float], typer.Option(help="override optim.lr")]
DpOption = Annotated[Optional[int], typer.Option(
    "--dp", help="data-parallel replicas of the pipeline: K*D ranks, each replica on 1/D of every batch (overrides train.dp)")]
SyncBatchnormOption = Annotated[Optional[bool], typer.Option(
    "--sync-batchnorm/--no-sync-batchnorm", help="with --dp D > 1 on GPU stages: BatchNorm normalises over the D replicas' "
                                                 "shards (torch's SyncBatchNorm; refused on CPU) (overrides train.sync_batchnorm)")]
BatchSizeOption = Annotated[Optional[int], typer.Option(help="override data.batch_size")]
_PIPELINED = ", ".join(name for name, spec in METHODS.items() if spec.needs_ranks)
MicrobatchesOption = Annotated[Optional[int], typer.Option(
    "--microbatches", help=f"microbatches per step of the methods torch's pipeline schedules run ({_PIPELINED}); must divide "
                           "the batch size, and 1F1B needs >= K (overrides train.microbatches, default 4)")]


def data_overrides(model: str | None, data: str | None, data_root: Path | None, lr: float | None,
                   batch_size: int | None) -> dict[str, object]:
    """The config keys these options override (None: not given)."""
    return {"model.name": model, "data.name": data, "data.root": str(data_root) if data_root else None,
            "optim.lr": lr, "data.batch_size": batch_size}

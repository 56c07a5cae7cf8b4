"""Is a run's test error in its weights or in its BatchNorm statistics? Evaluate a finished run's checkpoint
as it is, then with every BatchNorm's running statistics recomputed at the final weights.

FR's play (and with ``predict``, at predicted weights) gathers the running statistics while the weights move;
if those statistics, not the weights, were what a delayed method lost, recomputing them over the training set
at the final weights (a cumulative average, the model otherwise in eval mode: no dropout) would recover it:

    OMP_NUM_THREADS=1 python benchmarks/recalibrate_bn.py benchmarks/runs/converged-lr0.01/fr+auto-K4-s0 [RUN ...]

Each run is rebuilt as `fxreplay train --resume` rebuilds it (its config.yaml, plan/ and checkpoint.pt).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from fxreplay.data import make_loader  # noqa: E402
from fxreplay.data.sets import build_datasets  # noqa: E402
from fxreplay.errors import FxReplayError  # noqa: E402
from fxreplay.run import build_pipeline  # noqa: E402
from fxreplay.rundir import RunDir  # noqa: E402

NORMS = torch.nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d/3d, their lazy forms and SyncBatchNorm


def test_error(pipe, test_set, batch: int) -> float:
    """Test error (%) of the stages' plain forward in eval mode."""
    pipe.eval()
    wrong = seen = 0
    with torch.no_grad():
        for x, y in make_loader(test_set, batch, shuffle=False, seed=0, epoch=0):
            wrong += int((pipe(x).argmax(1) != y).sum())
            seen += len(y)
    return 100.0 * wrong / seen


def recalibrate(pipe, train_set, batch: int) -> int:
    """Recompute every BatchNorm's running statistics over one pass of ``train_set`` at the current weights
    (a cumulative average), everything else in eval mode. Returns the number of BatchNorm layers.

    torch.optim.swa_utils.update_bn does the same for an ``nn.Module`` but puts the whole model in train mode:
    dropout would then change the statistics it gathers."""
    norms = [m for stage in pipe.stages for m in stage.modules() if isinstance(m, NORMS)]
    momenta = [norm.momentum for norm in norms]
    pipe.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the pass
        norm.train()
    with torch.no_grad():
        for x, _ in make_loader(train_set, batch, shuffle=True, seed=0, epoch=0):
            pipe(x)
    pipe.eval()
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return len(norms)


def rebuilt(run: Path):
    """The run's stages with its checkpoint's weights and buffers, and its data sets: its config, checkpoint and
    plan as ``fxreplay train --resume`` takes them (the same checks: this run's checkpoint, this release)."""
    resumed = RunDir(run).resume(None)
    cfg = resumed.cfg
    train_set, test_set = build_datasets(cfg.data)
    pipe = build_pipeline(cfg, train_set, resumed.plan_dir)
    workers = resumed.checkpoint["trainer"]["executor"]["workers"]
    if len(workers) != len(pipe.stages):
        raise SystemExit(f"{run}: its checkpoint has {len(workers)} stages, its config builds {len(pipe.stages)}.")
    for stage, worker in zip(pipe.stages, workers):
        stage.load_state_dict(worker["module"])
    return cfg, pipe, train_set, test_set


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories with config.yaml and checkpoint.pt")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for i, run in enumerate(args.runs):
        try:
            cfg, pipe, train_set, test_set = rebuilt(run)
        except FxReplayError as exc:
            raise SystemExit(f"{run}: {exc}") from None
        if i == 0:
            print("| run | test error, stored statistics (%) | recomputed at the final weights (%) | BatchNorm layers |")
            print("|---|---:|---:|---:|")
        before = test_error(pipe, test_set, cfg.data.batch_size)
        count = recalibrate(pipe, train_set, cfg.data.batch_size)
        print(f"| {run.name} | {before:.2f} | {test_error(pipe, test_set, cfg.data.batch_size):.2f} | {count} |", flush=True)


if __name__ == "__main__":
    main()

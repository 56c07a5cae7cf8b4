"""How large each stage's weights ended up, run against run: the norm of a stage's convolution and linear weights
(every floating tensor of two or more dimensions) divided by the first run's (BP's).

Behind a BatchNorm the scale of a convolution's weights does not change what the network computes, only
how fast it learns: the effective learning rate of such a tensor is η/‖w‖². So two runs with the same
optimizer can train their lower stages at very different effective rates, and this table shows it::

    python benchmarks/stage_norms.py benchmarks/runs/deep10-lr0.1/bp-K8-s0 benchmarks/runs/deep10-lr0.1/fr-K8-s0 ...

Each RUN is a finished run directory: its model.pt (the trained model's state_dict) and its plan/. The stages
are the first run's, as its plan rebuilds them (which of the model's tensors each stage holds); every run must
hold the same tensors. model.pt is not among the files benchmarks/converged_summary.py keeps: the runs
themselves are needed.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from fxreplay.compiler import load  # noqa: E402
from fxreplay.errors import FxReplayError  # noqa: E402


def weights(run: Path) -> dict[str, torch.Tensor]:
    """The run's trained floating tensors of two or more dimensions, by their names in the model."""
    path = run / "model.pt"
    if not path.is_file():
        raise SystemExit(f"{run}: no model.pt — is it a finished run directory (fxreplay train / compare writes "
                         "model.pt when the run ends)?")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: t for name, t in state.items() if isinstance(t, torch.Tensor) and t.ndim >= 2 and t.is_floating_point()}


def stages_of(run: Path) -> list[list[str]]:
    """The names of the model's tensors each stage holds, from the run's plan/."""
    try:
        pipe = load(run / "plan")
    except FxReplayError as exc:
        raise SystemExit(f"{run}: its plan/ does not rebuild the stages: {exc}") from None
    return [list(stage.state_dict()) for stage in pipe.stages]


def stage_norms(state: dict[str, torch.Tensor], stages: list[list[str]]) -> list[float]:
    """The root-sum-square norm of each stage's tensors in ``state``."""
    return [math.sqrt(sum(float(state[n].double().square().sum()) for n in names if n in state)) for names in stages]


def table(runs: list[Path]) -> list[str]:
    """One line per run: the first run's stage norms, then each other run's over them."""
    stages = stages_of(runs[0])
    states = [weights(run) for run in runs]
    for run, state in zip(runs[1:], states[1:]):
        if sorted(state) != sorted(states[0]):
            raise SystemExit(f"{run} holds other tensors than {runs[0]}: compare runs of the same model.")
    reference = stage_norms(states[0], stages)
    names = [f"{run.parent.name}/{run.name}" for run in runs]
    width = max(len(name) for name in names)
    heads = [f"stage {k}" for k in range(len(stages))]
    lines = [f"{'run':<{width}}  " + "  ".join(heads),
             f"{names[0]:<{width}}  " + "  ".join(f"{v:>{len(h)}.2f}" for v, h in zip(reference, heads)) + "  (norm)"]
    for name, state in zip(names[1:], states[1:]):
        ratios = [v / r if r else float("nan") for v, r in zip(stage_norms(state, stages), reference)]
        lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>{len(h)}.2f}" for v, h in zip(ratios, heads)) + "  (x first run)")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run directories; the first is the reference (BP)")
    print("\n".join(table(ap.parse_args(argv).runs)))


if __name__ == "__main__":
    main(sys.argv[1:])

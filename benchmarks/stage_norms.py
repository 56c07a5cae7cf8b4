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

``--activity N`` prints instead what each stage's ReLUs do on the first N images of the run's test set (its
config.yaml's data), the trained model in eval mode: the share of their outputs above 0, and the share of
channels (dimension 1) that are 0 on every one of the N images, each ``nn.ReLU`` module's call counted on its
own (a ReLU called as a function, ``torch.relu`` or ``F.relu``, is not seen). A
start that overshoots can leave a stage's units off for the rest of a run while its weight norm looks normal::

    python benchmarks/stage_norms.py --activity 512 benchmarks/runs/deep10-lr0.1/bp-K8-s0 ...

``--sharpness N`` prints instead each stage's curvature: η·λ_max, λ_max the largest eigenvalue of the training
loss's Hessian restricted to the stage's parameters (the block of the Hessian the stage's own update sees; power
iteration on Hessian-vector products, benchmarks/compensation_signals.py's ``top_eigenvalue``), on one fixed batch:
the first N images of the run's training set in the order of seed 1000 (with its augmentation, which the loader
seeds: the same batch every time), the model in train mode (BatchNorm's batch
statistics, as training computes; the stored statistics are left as they were), η the config's peak rate. Whether a
delayed stage trained where BP's does, or somewhere sharper or flatter (a loop that cannot follow curvature above
its stable range flattens, a stage held at a smaller step can sharpen)::

    OMP_NUM_THREADS=1 python benchmarks/stage_norms.py --sharpness 256 benchmarks/runs/handoff-lr0.01/bp-s0 ...
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

from fxreplay.compiler import load  # noqa: E402
from fxreplay.config import load_config  # noqa: E402
from fxreplay.data import make_loader  # noqa: E402
from fxreplay.data.sets import build_datasets  # noqa: E402
from fxreplay.errors import FxReplayError  # noqa: E402


def trained(run: Path) -> dict[str, torch.Tensor]:
    """The run's model.pt: its trained state_dict, by the model's names."""
    path = run / "model.pt"
    if not path.is_file():
        raise SystemExit(f"{run}: no model.pt — is it a finished run directory (fxreplay train / compare writes "
                         "model.pt when the run ends)?")
    return torch.load(path, map_location="cpu", weights_only=True)


def weights(run: Path) -> dict[str, torch.Tensor]:
    """The run's trained floating tensors of two or more dimensions, by their names in the model."""
    return {name: t for name, t in trained(run).items()
            if isinstance(t, torch.Tensor) and t.ndim >= 2 and t.is_floating_point()}


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


def relu_activity(run: Path, images: int) -> tuple[list[tuple[float, float] | None], int]:
    """Per stage of ``run``: (share of its ReLUs' outputs above 0, share of their channels never above 0) over the
    first ``images`` images of the run's test set, or None for a stage without an ``nn.ReLU``; and how many images
    that was (the test set may hold fewer)."""
    pipe, data = _pipeline(run)
    pipe.eval()
    calls: list[int] = [0]
    seen: dict[tuple[int, int], list] = {}  # (stage, call within a forward) -> [positives, outputs, channel ever on]

    def hook(k: int) -> object:
        def record(_: nn.Module, __: object, out: torch.Tensor) -> None:
            calls[0] += 1
            on = out.detach() > 0
            ever = on.transpose(0, 1).reshape(on.shape[1], -1).any(1) if on.ndim >= 2 else on.reshape(-1).any(0, keepdim=True)
            row = seen.setdefault((k, calls[0]), [0, 0, torch.zeros_like(ever)])
            row[0] += int(on.sum())
            row[1] += on.numel()
            row[2] |= ever
        return record

    handles = [m.register_forward_hook(hook(k)) for k, stage in enumerate(pipe.stages)
               for m in stage.modules() if isinstance(m, nn.ReLU)]
    try:
        with torch.no_grad():
            _, test = build_datasets(data)
            done = 0
            for x, _ in make_loader(test, min(images, 256), shuffle=False, seed=0, epoch=0):
                x = x[: images - done]
                calls[0] = 0
                pipe(x)
                done += len(x)
                if done >= images:
                    break
    except FxReplayError as exc:
        raise SystemExit(f"{run}: {exc}") from None
    finally:
        for h in handles:
            h.remove()
    out: list[tuple[float, float] | None] = []
    for k in range(len(pipe.stages)):
        rows = [row for (stage, _), row in seen.items() if stage == k]
        if not rows:
            out.append(None)
            continue
        active = sum(r[0] for r in rows) / sum(r[1] for r in rows)
        dead = sum(int((~r[2]).sum()) for r in rows) / sum(r[2].numel() for r in rows)
        out.append((active, dead))
    return out, done


def activity_table(runs: list[Path], images: int) -> list[str]:
    """One line per run: each stage's ReLU activity and dead channels, in % (:func:`relu_activity`)."""
    names = [f"{run.parent.name}/{run.name}" for run in runs]
    width = max(len(name) for name in names)
    found = [relu_activity(run, images) for run in runs]
    rows = [r for r, _ in found]
    stages = max(len(r) for r in rows)
    heads = [f"stage {k}" for k in range(stages)]
    sizes = sorted({n for _, n in found})
    lines = [f"ReLU outputs above 0 / channels never above 0 on {' or '.join(map(str, sizes))} test images, % (eval mode)",
             f"{'run':<{width}}  " + "  ".join(f"{h:>11}" for h in heads)]
    for name, row in zip(names, rows):
        cells = ["—" if v is None else f"{100 * v[0]:.1f} / {100 * v[1]:.1f}" for v in row]
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c:>11}" for c in cells))
    return lines


def _pipeline(run: Path) -> tuple[Any, Any]:
    """The run's stages (its plan/) with its model.pt's weights and buffers, and its config's data settings."""
    try:
        pipe = load(run / "plan")
        data = load_config(run / "config.yaml").data
    except FxReplayError as exc:
        raise SystemExit(f"{run}: its plan/ or config.yaml does not rebuild the run: {exc}") from None
    state = trained(run)
    for stage in pipe.stages:
        missing = [name for name in stage.state_dict() if name not in state]
        if missing:
            raise SystemExit(f"{run}: its model.pt lacks {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}, "
                             "which its plan's stages hold: model.pt and plan/ are of different models.")
        stage.load_state_dict({name: state[name] for name in stage.state_dict()})
    return pipe, data


def stage_sharpness(run: Path, images: int) -> tuple[list[float], float]:
    """λ_max of the training loss's Hessian restricted to each stage's parameters, on the first ``images`` images
    of the run's training set (seed 1000's order), the model in train mode; and the run's peak rate η."""
    from compensation_signals import top_eigenvalue  # benchmarks/, beside this file

    pipe, data = _pipeline(run)
    try:
        lr = float(load_config(run / "config.yaml").optim.lr)
        train, _ = build_datasets(data)
        x, y = next(iter(make_loader(train, images, shuffle=True, seed=1000, epoch=0)))
    except FxReplayError as exc:
        raise SystemExit(f"{run}: {exc}") from None
    buffers = [b for stage in pipe.stages for b in stage.buffers()]
    kept = [b.detach().clone() for b in buffers]
    pipe.train()
    out = []
    for stage in pipe.stages:
        params = [p for p in stage.parameters() if p.requires_grad]
        if not params:
            out.append(float("nan"))
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same dropout masks for every stage and run
            grads = torch.autograd.grad(nn.functional.cross_entropy(pipe(x), y), params, create_graph=True)
        out.append(top_eigenvalue(lambda v: list(torch.autograd.grad(grads, params, v, retain_graph=True)),
                                  [p.shape for p in params]))
        with torch.no_grad():  # the forward in train mode moved BatchNorm's running statistics
            for b, k in zip(buffers, kept):
                b.copy_(k)
    return out, lr


def sharpness_table(runs: list[Path], images: int) -> list[str]:
    """One line per run: each stage's η·λ_max (:func:`stage_sharpness`)."""
    names = [f"{run.parent.name}/{run.name}" for run in runs]
    width = max(len(name) for name in names)
    lines: list[str] = []
    for i, (name, run) in enumerate(zip(names, runs)):
        values, lr = stage_sharpness(run, images)
        if i == 0:
            heads = [f"stage {k}" for k in range(len(values))]
            lines += [f"η·λ_max of each stage's block of the Hessian, on {images} training images (train mode; η the peak rate)",
                      f"{'run':<{width}}  " + "  ".join(f"{h:>8}" for h in heads)]
        lines.append(f"{name:<{width}}  " + "  ".join(f"{lr * v:>8.3f}" for v in values))
        print(lines[-1] if i else "\n".join(lines), flush=True)  # a line per run as it is measured (seconds each)
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run directories; the first is the reference (BP)")
    ap.add_argument("--activity", type=int, default=0, metavar="N",
                    help="each stage's ReLU activity on the first N test images instead of the weight norms")
    ap.add_argument("--sharpness", type=int, default=0, metavar="N",
                    help="each stage's η·λ_max on N training images instead of the weight norms")
    args = ap.parse_args(argv)
    if args.activity < 0:
        raise SystemExit(f"--activity takes a number of images >= 1 (without it: the weight norms), got {args.activity}")
    if args.sharpness < 0 or (args.sharpness and args.activity):
        raise SystemExit("--sharpness takes a number of images >= 1, and not with --activity (one table at a time).")
    if args.sharpness:
        sharpness_table(args.runs, args.sharpness)
        return
    print("\n".join(activity_table(args.runs, args.activity) if args.activity else table(args.runs)))


if __name__ == "__main__":
    main(sys.argv[1:])

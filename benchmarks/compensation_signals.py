"""What each delayed stage sees while it trains: ``adapt``'s alignment ā and strength σ, and the relative step.

Trains one model for a few hundred iterations with FR and a compensation and prints, per stage and
iteration window, the mean of ā (the average of cos(−g, Δw_prev) that ``adapt`` keeps), of σ = clip(1 − ā)
and of the relative step ‖Δw‖/‖w‖ of the stage's last update. The signals a rule could use to tell a
high learning rate (where a late gradient destabilises) from a low one (where it costs little):

    OMP_NUM_THREADS=1 python benchmarks/compensation_signals.py --model resnet20 --lr 0.01   # CIFAR-10 subset, K = 4
    OMP_NUM_THREADS=1 python benchmarks/compensation_signals.py --model relu_mlp --lr 0.1 --rules auto

``--model`` is ``resnet20`` (the converged benchmark's data, configs/resnet20_cifar10_5k.yaml, and its pinned
K = 4 split) or a family of benchmarks/compensation_generality.py (digits, K stages cut by FLOPs). Without
``adapt`` in the rules ā stays 0 (σ 1). The relative step needs a rule that records Δw (``predict``,
``lookahead`` or ``adapt``).

``--sharpness`` prints instead what a curvature gate would see: η·λ_max, the largest eigenvalue of the loss's
Hessian (power iteration with Hessian-vector products on a fixed batch of 256) times the learning rate, along
BP's own trajectory at chosen iterations, next to the largest η·λ a direction whose gradient is d iterations
late tolerates (benchmarks/delay_stability.py) without the stabilisers and with them:

    OMP_NUM_THREADS=1 python benchmarks/compensation_signals.py --sharpness --model relu_mlp --lr 0.1

``--losses`` prints the training loss of every one of the first ``--iterations`` iterations (default 12) for each
method in ``--rules`` (comma-separated: ``bp``, ``none`` for plain FR, or FR's compensation), from the same
initial weights and batches: how violent a method's start is. ``--model resnet56`` is the K = 8 benchmark
(configs/resnet56_cifar10_5k.yaml, its pinned split of 3-4 blocks a stage):

    OMP_NUM_THREADS=1 python benchmarks/compensation_signals.py --losses --model resnet56 --K 8 --rules bp,none,auto

With ``resnet20`` / ``resnet56`` the optimizer is their config's SGD, and the split the one benchmarks/compensation.sh
pins. ``--warmup-steps N`` starts ``--losses`` with a linear lr warm-up over N iterations, as ``fxreplay train
--warmup-steps N`` does (the first iteration at lr 0).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import math
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

import fxreplay  # noqa: E402
from fxreplay.data import digits, make_loader  # noqa: E402
from fxreplay.lr_schedule import scheduler_factory  # noqa: E402
from fxreplay.optimizers import optimizer_factory  # noqa: E402

WINDOWS = ((0, 20), (20, 60), (60, 120), (120, 200), (200, 400))
PROBES = (0, 5, 10, 20, 40, 80, 160, 220)  # BP iterations at which --sharpness measures


def endless(train: object, batch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``train``'s batches, epoch after epoch (each epoch its own seeded order)."""
    for epoch in itertools.count():
        yield from make_loader(train, batch, shuffle=True, seed=seed, epoch=epoch)


def top_eigenvalue(hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]], shapes: list[torch.Size],
                   tolerance: float = 1e-3, max_iterations: int = 300, seed: int = 0) -> float:
    """The largest eigenvalue of a symmetric operator given by its products ``hvp(v)`` with vectors shaped as
    ``shapes``: power iteration to a relative change of ``tolerance``. Power iteration finds the eigenvalue of
    largest magnitude; when that is negative, a second pass on H − λ_neg·I finds the largest."""
    generator = torch.Generator().manual_seed(seed)

    def dominant(shift: float) -> float:
        v = [torch.randn(shape, generator=generator) for shape in shapes]
        estimate = math.inf
        for _ in range(max_iterations):
            norm = math.sqrt(sum(float(t.square().sum()) for t in v))
            v = [t / norm for t in v]
            hv = [h - shift * t for h, t in zip(hvp(v), v)]
            previous, estimate = estimate, sum(float((a * b).sum()) for a, b in zip(hv, v))  # a Rayleigh quotient
            if abs(estimate - previous) <= tolerance * abs(estimate):
                break
            v = [t.detach() for t in hv]
        return estimate

    top = dominant(0.0)
    return top if top >= 0 else top + dominant(top)


def sharpness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **options: Any) -> float:
    """λ_max, the largest eigenvalue of the cross-entropy's Hessian on (x, y) (:func:`top_eigenvalue` with
    Hessian-vector products by double backward). The model's buffers (BatchNorm's running statistics) and the
    global random state (dropout) are left as they were, so a probe does not change the trajectory it probes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = [p for p in model.parameters() if p.requires_grad]
    buffers = [b.clone() for b in model.buffers()]
    with torch.random.fork_rng(devices=[]), sdpa_kernel(SDPBackend.MATH):  # fused CPU attention: no double backward
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params, create_graph=True)
    try:
        return top_eigenvalue(lambda v: list(torch.autograd.grad(grads, params, v, retain_graph=True)),
                              [p.shape for p in params], **options)
    finally:  # after the Hessian-vector products: the graph saved the buffers as they were in the forward
        with torch.no_grad():
            for kept, b in zip(buffers, model.buffers()):
                b.copy_(kept)


def sharpness_report(model: nn.Module, train: object, batch: int, lr: float, iterations: int, seed: int, K: int) -> None:
    """BP (SGD, momentum 0.9, weight decay 5e-4) for ``iterations`` steps; η·λ_max at :data:`PROBES`."""
    from delay_stability import largest_stable

    probe_x, probe_y = next(iter(make_loader(train, 256, shuffle=True, seed=seed + 1000, epoch=0)))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    seen = []
    for it, (x, y) in zip(range(iterations), endless(train, batch, seed)):
        if it in PROBES:
            seen.append(f"{it}: {lr * sharpness(model, probe_x, probe_y):.3f}")
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    print(f"BP, SGD lr {lr}, momentum 0.9: η·λ_max at iteration  " + "   ".join(seen))
    print("largest stable η·λ of a direction whose gradient is d late (momentum 0.9, benchmarks/delay_stability.py):")
    for d in range(1, K):
        bare = largest_stable(0.9, d, predict=True, lookahead=True)
        full = largest_stable(0.9, d, predict=True, lookahead=True, stretch=True)
        print(f"  d = {d}: BP 3.8   lookahead+predict {bare:.3f}   with stretch (auto after its warm-up) {full:.3f}")


PINNED = {"resnet20": ("resnet20_cifar10_5k.yaml", 4), "resnet56": ("resnet56_cifar10_5k.yaml", 8)}
"""The converged benchmarks' models: their config and K; the split is compensation.sh's (:func:`pinned_split`)."""


def pinned_split(K: int, script: Path = ROOT / "benchmarks" / "compensation.sh") -> list[str]:
    """The block split compensation.sh pins at K stages (its ``SPLIT<K>=<K>=a,b,...`` line): one source for both."""
    found = re.search(rf"^SPLIT{K}={K}=(\S+)", script.read_text(encoding="utf-8"), re.MULTILINE)
    if not found:
        raise SystemExit(f"{script} pins no split for K = {K} (no SPLIT{K}={K}=... line)")
    return found.group(1).split(",")


def _data(model: str, K: int) -> tuple[nn.Module, object, int, list[str] | None, Any]:
    """The model, its training set, the batch size, the pinned split (None: cut by FLOPs) and the optimizer's settings
    (the pinned config's ``optim``; None: the benchmarks' SGD, momentum 0.9, weight decay 5e-4)."""
    if model in PINNED:
        from fxreplay import models
        from fxreplay.config import load_config
        from fxreplay.data.sets import build_datasets

        config, stages = PINNED[model]
        if K != stages:
            raise SystemExit(f"--model {model} uses the converged benchmark's pinned split: --K {stages}")
        cfg = load_config(ROOT / "configs" / config)
        train, _ = build_datasets(cfg.data)
        return getattr(models, model)(), train, cfg.data.batch_size, pinned_split(K), cfg.optim
    from compensation_generality import MODELS

    if model not in MODELS:
        raise SystemExit(f"unknown model {model!r}: resnet20, resnet56 or one of {', '.join(MODELS)}")
    return MODELS[model](), digits(train=True), 64, None, None


def optim_settings(optim: Any) -> tuple[str, float, float, dict[str, Any]]:
    """(optimizer, momentum, weight decay, its other arguments): the pinned config's ``optim``, or the benchmarks'
    own SGD (``optim`` None)."""
    return ("sgd", 0.9, 5e-4, {}) if optim is None else (optim.name, optim.momentum, optim.weight_decay, dict(optim.args))


def sgd(lr: float, optim: Any) -> Callable[[Any], torch.optim.Optimizer]:
    """The optimizer of :func:`optim_settings` at ``lr``, built as fxreplay builds a config's."""
    name, momentum, decay, extra = optim_settings(optim)
    return optimizer_factory(name, lr, decay, extra, momentum)


def first_losses(model: nn.Module, train: object, batch: int, split: list[str] | None, method: str, K: int, lr: float,
                 iterations: int, seed: int, optim: Any = None, warmup: int = 0) -> list[float]:
    """The training loss of each of the first ``iterations`` iterations of ``method`` (``bp``, ``none``: plain FR, or
    FR's compensation) on a copy of ``model``, with the batches of ``seed``: SGD as :func:`sgd`, after a linear lr
    warm-up over ``warmup`` iterations (fxreplay's ``optim.warmup_steps``) when it is not 0."""
    torch.manual_seed(seed)  # any draw a method makes from torch's generator starts alike (the loader seeds its own)
    batches = endless(train, batch, seed)
    x0, _ = next(iter(make_loader(train, batch, shuffle=True, seed=seed, epoch=0)))
    pipe = fxreplay.compile(copy.deepcopy(model), (x0,), K=K, cost="flops", boundaries=split)
    trainer = fxreplay.Trainer(pipe, method="bp" if method == "bp" else "fr", loss_fn=nn.CrossEntropyLoss(),
                               compensation=None if method in ("bp", "none") else method, optimizer=sgd(lr, optim),
                               scheduler=scheduler_factory("constant", iterations, warmup) if warmup else None)
    return [trainer.step(x, y) for _, (x, y) in zip(range(iterations), batches)]


def losses_report(model: nn.Module, train: object, batch: int, split: list[str] | None, optim: Any,
                  args: argparse.Namespace) -> None:
    """Print :func:`first_losses` for each method in ``args.rules``, one row each, and its largest loss."""
    iterations = args.iterations or 12
    methods = [m.strip() for m in args.rules.split(",") if m.strip()]
    name, momentum, decay, extra = optim_settings(optim)
    start = f"a linear warm-up over {args.warmup_steps} iterations" if args.warmup_steps else "the first iteration"
    print(f"{args.model}, K = {args.K}, {name.upper() if name == 'sgd' else name} lr {args.lr} (momentum {momentum:g}, weight decay {decay:g}"
          f"{', ' + ', '.join(f'{k} {v}' for k, v in extra.items()) if extra else ''}) from {start}, "
          f"seed {args.seed}: training loss at iterations 0-{iterations - 1}")
    width = max(len(m) for m in methods)
    for method in methods:
        losses = first_losses(model, train, batch, split, method, args.K, args.lr, iterations, args.seed, optim,
                              args.warmup_steps)
        print(f"  {method:<{width}}  " + " ".join(f"{v:5.2f}" for v in losses) + f"   max {max(losses):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--rules", default="adapt+lookahead+lr+predict+stretch", help="FR's compensation")
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.1,
                    help="SGD, momentum 0.9, weight decay 5e-4 (resnet20 / resnet56: their config's, the same)")
    ap.add_argument("--warmup-steps", type=int, default=0, metavar="N",
                    help="--losses: a linear lr warm-up over the first N iterations, as fxreplay's --warmup-steps")
    ap.add_argument("--iterations", type=int, default=None, help="default: 120 (--sharpness: 221)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sharpness", action="store_true", help="η·λ_max along BP's trajectory instead (default: 221 iterations)")
    ap.add_argument("--losses", action="store_true",
                    help="each method's training loss at every one of the first iterations instead (default: 12); "
                         "--rules: comma-separated bp, none (plain FR) or FR's compensations")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    if args.warmup_steps < 0:
        raise SystemExit(f"--warmup-steps takes a number of iterations >= 0, got {args.warmup_steps}")
    if args.warmup_steps and not args.losses:
        raise SystemExit("--warmup-steps applies to --losses only (the other reports train at the rate from the first iteration)")
    model, train, batch, split, optim = _data(args.model, args.K)
    if args.sharpness:
        return sharpness_report(model, train, batch, args.lr, args.iterations or PROBES[-1] + 1, args.seed, args.K)
    if args.losses:
        return losses_report(model, train, batch, split, optim, args)
    args.iterations = args.iterations or 120
    x0, _ = next(iter(make_loader(train, batch, shuffle=True, seed=args.seed, epoch=0)))
    pipe = fxreplay.compile(model, (x0,), K=args.K, cost="flops", boundaries=split)
    trainer = fxreplay.Trainer(pipe, method="fr", compensation=args.rules, loss_fn=nn.CrossEntropyLoss(),
                               optimizer=sgd(args.lr, optim))
    comps = [w.compensator for w in trainer.executor.workers]
    seen: list[list[tuple[float, float, float]]] = [[] for _ in comps]
    for _, (x, y) in zip(range(args.iterations), endless(train, batch, args.seed)):
        trainer.step(x, y)
        for k, comp in enumerate(comps):
            if comp is None or comp.last_step is None:
                continue
            moved = math.sqrt(sum(float(s.square().sum()) for s in comp.last_step if s is not None))
            size = math.sqrt(sum(float(p.detach().square().sum()) for p in comp.params))
            seen[k].append((comp.alignment, comp.strength, moved / size if size else 0.0))
    print(f"FR + {args.rules}, {args.model}, K = {args.K}, SGD lr {args.lr}, {args.iterations} iterations; "
          "per stage and window of its updates: ā / σ / relative step ‖Δw‖/‖w‖")
    for k, rows in enumerate(seen):
        cells = []
        for lo, hi in WINDOWS:
            part = rows[lo:hi]
            if part:
                a, s, r = (sum(v) / len(part) for v in zip(*part))
                cells.append(f"{lo}-{lo + len(part)}: {a:+.2f} / {s:.2f} / {r:.5f}")
        print(f"  stage {k} (d = {args.K - 1 - k}): " + ("   ".join(cells) or "no updates recorded"))


if __name__ == "__main__":
    main()

"""Staleness compensation on models no rule was chosen on: BP, FR and FR + ``auto`` on six small families.

``auto``'s rules were chosen on ResNet-20 (CIFAR-10), a BN CNN and a tanh MLP (Fashion-MNIST). This screen
trains other families at a high learning rate on the offline digits (sklearn's 8x8, 1,437 / 360 images),
through the public API, and reports each method's test error and its gap to BP paired by seed:

- ``relu_mlp``: four ReLU layers of 128, no normalisation;
- ``tanh_mlp``: the same with tanh (the family the warm-up was added for, on other data);
- ``cnn_nobn``: four 3x3 convolutions with ReLU and a max-pool, no normalisation;
- ``bn_cnn``: the zoo's ``digits_cnn`` (convolutions with BatchNorm);
- ``ln_resmlp``: a pre-LayerNorm residual MLP (four blocks of 96);
- ``row_transformer``: the image's 8 rows as tokens, two pre-LN ``nn.TransformerEncoderLayer`` blocks.

Every run: K stages cut by FLOPs (deterministic), batch 64, the lr ÷10 for the last quarter of the epochs,
seeds paired across methods (initial weights and data order). A run that diverges (NaN) counts at chance
error (90 %) and is marked. Runs are appended to ``--out`` (JSON lines) as they finish; rerunning skips
those already there, so the screen resumes where it stopped.

    OMP_NUM_THREADS=1 python benchmarks/compensation_generality.py            # SGD momentum 0.9, lr 0.1, K = 4
    python benchmarks/compensation_generality.py --K 2 --out benchmarks/results/compensation/generality-K2.jsonl
    python benchmarks/compensation_generality.py --optim adam --lr 0.01 --out ...adam.jsonl
    python benchmarks/compensation_generality.py --table-only                 # the table from the kept runs
    python benchmarks/compensation_generality.py --table-only --seeds 0,1,2,3,4   # only those seeds: every method paired alike
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import fxreplay
from fxreplay.data import digits, make_loader
from fxreplay.errors import DivergenceError
from fxreplay.methods.compensation import parse, resolve
from fxreplay.models import digits_cnn

CHANCE_ERROR = 90.0  # ten classes: a diverged run predicts nothing


class _ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(torch.relu(self.norm(x)))


class RowTransformer(nn.Module):
    """An 8x8 image as 8 tokens (its rows) through pre-LN transformer blocks, mean-pooled."""

    def __init__(self, width: int = 32, blocks: int = 2) -> None:
        super().__init__()
        self.embed, self.pos = nn.Linear(8, width), nn.Parameter(torch.zeros(1, 8, width))
        self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True,
                                                                 norm_first=True) for _ in range(blocks)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.embed(x.reshape(-1, 8, 8)) + self.pos)
        return self.head(self.norm(h).mean(1))


def _mlp(act: type[nn.Module]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for width_in in (64, 128, 128, 128):
        layers += [nn.Linear(width_in, 128), act()]
    return nn.Sequential(*layers, nn.Linear(128, 10))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "relu_mlp": lambda: _mlp(nn.ReLU),
    "tanh_mlp": lambda: _mlp(nn.Tanh),
    "cnn_nobn": lambda: nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(32 * 16, 10)),
    "bn_cnn": digits_cnn,
    "ln_resmlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 96), *[_ResidualBlock(96) for _ in range(4)],
                                       nn.LayerNorm(96), nn.Linear(96, 10)),
    "row_transformer": RowTransformer,
}


def optimizer_factory(name: str, lr: float) -> Callable[[list], torch.optim.Optimizer]:
    if name == "sgd":
        return lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=5e-4)
    if name == "nesterov":
        return lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if name == "plain":
        return lambda ps: torch.optim.SGD(ps, lr=lr, weight_decay=5e-4)
    if name == "adam":
        return lambda ps: torch.optim.Adam(ps, lr=lr)
    raise SystemExit(f"--optim must be sgd, nesterov, plain or adam, not {name!r}")


def train_once(model_name: str, method: str, K: int, optim: str, lr: float, seed: int, epochs: int) -> dict:
    """One run; returns the test error (%), the mean training loss of the last 20 steps, whether it diverged and
    the rules ``auto`` resolved to (``rules``: what ran, whatever ``auto`` means in a later version)."""
    algorithm, _, compensation = method.partition("+")
    torch.manual_seed(seed)
    train, test = digits(train=True), digits(train=False)
    model = MODELS[model_name]()
    x0, _ = next(iter(make_loader(train, 64, shuffle=True, seed=seed, epoch=0)))
    pipe = fxreplay.compile(model, (x0,), K=K, cost="flops")
    options = {"compensation": compensation} if compensation else {}
    trainer = fxreplay.Trainer(pipe, method=algorithm, optimizer=optimizer_factory(optim, lr),
                               loss_fn=nn.CrossEntropyLoss(), **options)
    comp = trainer.executor.workers[0].compensator
    rules = {"rules": comp.comp.name} if comp is not None else {}
    losses: list[float] = []
    try:
        for epoch in range(epochs):
            trainer.set_lr_factor(0.1 if epoch >= math.ceil(0.75 * epochs) else 1.0)
            for x, y in make_loader(train, 64, shuffle=True, seed=seed, epoch=epoch):
                losses.append(float(trainer.step(x, y)))
    except DivergenceError:  # a NaN loss: the trainer stops before applying it
        return {"error": CHANCE_ERROR, "train_loss": float("nan"), "diverged": True, **rules}
    result = trainer.evaluate(make_loader(test, 256, shuffle=False, seed=0, epoch=0))
    return {"error": 100.0 * (1.0 - result["accuracy"]), "train_loss": statistics.fmean(losses[-20:]), "diverged": False,
            **rules}


def auto_rules(method: str, optim: str) -> str:
    """The rules ``auto`` stands for in ``method`` (``fr+auto``) with ``optim`` in this version of fxreplay."""
    optimizer = optimizer_factory(optim, 0.1)([nn.Parameter(torch.zeros(1))])
    return resolve(parse("auto"), optimizer, method.partition("+")[0]).name


def as_run_now(row: dict) -> dict:
    """A kept ``…+auto`` row whose ``auto`` meant other rules than it does now is that rule set's row
    (``fr+lr+predict+spike+stretch``): it is neither reused nor tabled as today's ``auto``. A row of
    today's ``auto``'s rules spelled out is ``auto``'s."""
    method, rules = row["method"], row.get("rules")
    algorithm, _, named = method.partition("+")
    now = auto_rules(method, row["optim"]) if named else None
    if named == "auto" and rules and rules != now:
        return {**row, "method": f"{algorithm}+{rules}"}
    if named and named != "auto" and parse(named).name == now:  # today's auto, spelled out: its runs count as auto's
        return {**row, "method": f"{algorithm}+auto", "rules": now}
    return row


def _key(row: dict) -> tuple:
    return row["model"], row["method"], row["K"], row["optim"], row["lr"], row["seed"], row["epochs"]


def table(rows: list[dict], methods: list[str]) -> str:
    """Markdown: per model, each method's mean test error and its gap to BP paired by seed (mean ± std)."""
    settings = sorted({(r["K"], r["optim"], r["lr"], r["epochs"]) for r in rows})
    out = []
    for K, optim, lr, epochs in settings:
        here = [r for r in rows if (r["K"], r["optim"], r["lr"], r["epochs"]) == (K, optim, lr, epochs)]
        shown = [m for m in methods if any(r["method"] == m for r in here)]
        out.append(f"K = {K}, {optim} lr {lr:g}, {epochs} epochs on digits; test error % (mean over seeds), "
                   "gap to BP paired by seed (mean ± std, n); † = runs that diverged (counted at 90 %)\n")
        out.append("| model | " + " | ".join(shown) + " |")
        out.append("|---|" + "---:|" * len(shown))
        for model in MODELS:
            by = {(r["method"], r["seed"]): r for r in here if r["model"] == model}
            if not by:
                continue
            cells = []
            for m in shown:
                runs = [r for (mm, _), r in by.items() if mm == m]
                if not runs:
                    cells.append("—")
                    continue
                err = statistics.fmean(r["error"] for r in runs)
                dag = "†" * sum(r["diverged"] for r in runs)
                gaps = [by[(m, r["seed"])]["error"] - by[("bp", r["seed"])]["error"]
                        for r in runs if ("bp", r["seed"]) in by]
                if m == "bp" or not gaps:
                    cells.append(f"{err:.2f}{dag}")
                else:
                    spread = f" ± {statistics.stdev(gaps):.2f}" if len(gaps) > 1 else ""
                    cells.append(f"{err:.2f}{dag} ({statistics.fmean(gaps):+.2f}{spread}, {len(gaps)})")
            out.append(f"| {model} | " + " | ".join(cells) + " |")
        means = []  # each method's paired gap averaged over the models (each model weighs the same)
        for m in shown:
            per_model = []
            for model in MODELS:
                by = {(r["method"], r["seed"]): r for r in here if r["model"] == model}
                gaps = [by[(m, seed)]["error"] - by[("bp", seed)]["error"]
                        for (mm, seed) in by if mm == m and ("bp", seed) in by]
                if gaps:
                    per_model.append(statistics.fmean(gaps))
            means.append("" if m == "bp" or not per_model else f"{statistics.fmean(per_model):+.2f} ({len(per_model)} models)")
        if any(means):
            out.append("| mean gap | " + " | ".join(means) + " |")
        for m in shown:
            if m.endswith("+auto"):
                ran = sorted({r.get("rules", "?") for r in here if r["method"] == m})
                out.append(f"\n{m} ran as {' / '.join(ran)}.")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    ap.add_argument("--methods", default="bp,fr,fr+auto", help="comma-separated: bp, fr, fr+RULES, ddg+RULES")
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--optim", default="sgd", help="sgd (momentum 0.9), nesterov, plain (no momentum) or adam")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2); with --table-only: table only these")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/compensation/generality.jsonl"))
    ap.add_argument("--table-only", action="store_true", help="print the table of the runs in --out and stop")
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(MODELS)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = [as_run_now(json.loads(line)) for line in args.out.read_text().splitlines() if line.strip()] if args.out.exists() else []
    if args.table_only and args.seeds:
        keep = {int(x) for x in args.seeds.split(",") if x.strip()}
        rows = [r for r in rows if r["seed"] in keep]
    args.seeds = args.seeds or "0,1,2"
    if not args.table_only:
        torch.set_num_threads(1)
        done = {_key(r) for r in rows}
        todo = [dict(model=m, method=meth, K=args.K, optim=args.optim, lr=args.lr, seed=int(s), epochs=args.epochs)
                for m in models for s in args.seeds.split(",") for meth in methods]
        todo = [t for t in todo if _key(t) not in done]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for i, spec in enumerate(todo, 1):
            start = time.perf_counter()
            row = {**spec, **train_once(spec["model"], spec["method"], spec["K"], spec["optim"], spec["lr"],
                                        spec["seed"], spec["epochs"])}
            with args.out.open("a") as f:  # one line per finished run: an interrupted screen resumes here
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            print(f"[{i}/{len(todo)}] {spec['model']} {spec['method']} seed {spec['seed']}: "
                  f"{row['error']:.2f} % {'(diverged) ' if row['diverged'] else ''}in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)
    print(table(rows, methods))


if __name__ == "__main__":
    main()

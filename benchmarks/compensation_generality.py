"""Staleness compensation on models no rule was chosen on: BP, FR and FR + ``auto`` on twelve small families.

``auto``'s rules were chosen on ResNet-20 (CIFAR-10), a BN CNN and a tanh MLP (Fashion-MNIST), and screened on
the digits families below. This screen trains other families at a high learning rate through the public API
and reports each method's test error and its gap to BP paired by seed. On the offline digits (``--data digits``,
the default: sklearn's 8x8, 1,437 / 360 images):

- ``relu_mlp``: four ReLU layers of 128, no normalisation;
- ``tanh_mlp``: the same with tanh (the family the warm-up was added for, on other data);
- ``cnn_nobn``: four 3x3 convolutions with ReLU and a max-pool, no normalisation;
- ``bn_cnn``: the zoo's ``digits_cnn`` (convolutions with BatchNorm);
- ``ln_resmlp``: a pre-LayerNorm residual MLP (four blocks of 96);
- ``row_transformer``: the image's 8 rows as tokens, two pre-LN ``nn.TransformerEncoderLayer`` blocks.

On Fashion-MNIST (``--data fashion``: its first 10,000 training images and all 10,000 test images, read by
torchvision's reader from ``--data-root``/FashionMNIST/raw; 3 epochs, all at the full rate: the lr drop below starts
at epoch ceil(0.75 · epochs)), six families that no rule was screened on either, each with something the digits
families lack:

- ``gelu_mlp``: 784-512-256-128 with GELU and dropout 0.1 (a mask the replay must repeat);
- ``mixer``: an MLP-Mixer (4x4 patches, two blocks of token and channel mixing, LayerNorm, GELU);
- ``vit``: a ViT with 7x7 patches and two *post*-LN ``nn.TransformerEncoderLayer`` blocks (PyTorch's default), dropout 0.1;
- ``gn_cnn``: four 3x3 convolutions with GroupNorm, global average pooling;
- ``small_resnet``: four BatchNorm basic blocks (identity shortcuts) of 32 channels;
- ``vgg_bn``: a VGG-style BN CNN with a 3,136-input fully connected layer.

Every run: K stages cut by FLOPs (deterministic), batch 64, the lr ÷10 for the last quarter of the epochs,
seeds paired across methods (initial weights and data order). A run that diverges (NaN) counts at chance
error (90 %) and is marked. Runs are appended to ``--out`` (JSON lines) as they finish; rerunning skips
those already there, so the screen resumes where it stopped.

    OMP_NUM_THREADS=1 python benchmarks/compensation_generality.py            # SGD momentum 0.9, lr 0.1, K = 4
    python benchmarks/compensation_generality.py --K 2 --out benchmarks/results/compensation/generality-K2.jsonl
    python benchmarks/compensation_generality.py --optim adam --lr 0.01 --out ...adam.jsonl
    python benchmarks/compensation_generality.py --table-only                 # the table from the kept runs
    python benchmarks/compensation_generality.py --table-only --seeds 0,1,2,3,4   # only those seeds: every method paired alike
    OMP_NUM_THREADS=1 python benchmarks/compensation_generality.py --data fashion  # → generality-fashion.jsonl
"""
from __future__ import annotations

import argparse
import functools
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
from fxreplay.data import digits, make_loader, torchvision_dataset
from fxreplay.errors import DivergenceError, FxReplayError
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


class Mixer(nn.Module):
    """MLP-Mixer: ``patch``-square patches as tokens; each block mixes across tokens, then across channels."""

    def __init__(self, width: int = 64, patch: int = 4, blocks: int = 2, side: int = 28) -> None:
        super().__init__()
        tokens = (side // patch) ** 2
        self.embed = nn.Conv2d(1, width, patch, patch)
        self.token_norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.token_mlps = nn.ModuleList(_gelu_mlp(tokens) for _ in range(blocks))
        self.channel_norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.channel_mlps = nn.ModuleList(_gelu_mlp(width) for _ in range(blocks))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).flatten(2).transpose(1, 2)  # (batch, tokens, width)
        for tn, tm, cn, cm in zip(self.token_norms, self.token_mlps, self.channel_norms, self.channel_mlps):
            h = h + tm(tn(h).transpose(1, 2)).transpose(1, 2)
            h = h + cm(cn(h))
        return self.head(self.norm(h).mean(1))


class ViT(nn.Module):
    """``patch``-square patches as tokens through post-LN transformer blocks (PyTorch's default), mean-pooled."""

    def __init__(self, width: int = 64, patch: int = 7, blocks: int = 2, side: int = 28) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, width, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (side // patch) ** 2, width))
        self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True)
                                      for _ in range(blocks)])
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x).flatten(2).transpose(1, 2) + self.pos).mean(1))


class _BasicBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def _gelu_mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))


def _convs(norm: Callable[[int], nn.Module]) -> list[nn.Module]:
    """3x3 convolutions 1-32-32 | pool | 32-64-64, each followed by ``norm`` and ReLU."""
    layers: list[nn.Module] = []
    for i, (cin, cout) in enumerate(((1, 32), (32, 32), (32, 64), (64, 64))):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), norm(cout), nn.ReLU()]
        if i == 1:
            layers.append(nn.MaxPool2d(2))
    return layers


FASHION_MODELS: dict[str, Callable[[], nn.Module]] = {
    "gelu_mlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.GELU(), nn.Dropout(0.1), nn.Linear(512, 256),
                                      nn.GELU(), nn.Dropout(0.1), nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 10)),
    "mixer": Mixer,
    "vit": ViT,
    "gn_cnn": lambda: nn.Sequential(*_convs(lambda c: nn.GroupNorm(8, c)), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                    nn.Linear(64, 10)),
    "small_resnet": lambda: nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), _BasicBlock(32), nn.MaxPool2d(2),
        _BasicBlock(32), _BasicBlock(32), nn.MaxPool2d(2), _BasicBlock(32), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10)),
    "vgg_bn": lambda: nn.Sequential(*_convs(nn.BatchNorm2d), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 7 * 7, 128),
                                    nn.ReLU(), nn.Linear(128, 10)),
}

FAMILIES: dict[str, dict[str, Callable[[], nn.Module]]] = {"digits": MODELS, "fashion": FASHION_MODELS}
"""The model families of each data set."""
DEFAULT_EPOCHS = {"digits": 10, "fashion": 3}
DATA_NAMES = {"digits": "digits", "fashion": "Fashion-MNIST"}
FASHION_TRAIN = 10_000  # the first 10,000 training images: a screen, not a benchmark of the data set
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # Fashion-MNIST's training-set pixel statistics


@functools.lru_cache(maxsize=4)
def fashion(root: str | Path, train: bool) -> torch.utils.data.TensorDataset:
    """Fashion-MNIST's first 10,000 training images (or the test set) from ``root``/FashionMNIST/raw, read by
    torchvision's reader (clear errors when the files are missing), standardised, as one tensor."""
    ds = torchvision_dataset("FashionMNIST", root, train=train)
    count = FASHION_TRAIN if train else len(ds.data)
    x = ds.data[:count].float().div(255).sub(FASHION_MEAN).div(FASHION_STD).unsqueeze(1)
    return torch.utils.data.TensorDataset(x, ds.targets[:count].long())


def load(data: str, root: str | Path, train: bool) -> torch.utils.data.TensorDataset:
    return digits(train=train) if data == "digits" else fashion(root, train)


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


def train_once(model_name: str, method: str, K: int, optim: str, lr: float, seed: int, epochs: int,
               data: str = "digits", root: str | Path = "data") -> dict:
    """One run; returns the test error (%), the mean training loss of the last 20 steps, whether it diverged and
    the rules ``auto`` resolved to (``rules``: what ran, whatever ``auto`` means in a later version)."""
    algorithm, _, compensation = method.partition("+")
    torch.manual_seed(seed)
    train, test = load(data, root, True), load(data, root, False)
    model = FAMILIES[data][model_name]()
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
    return (row.get("data", "digits"), row["model"], row["method"], row["K"], row["optim"], row["lr"], row["seed"],
            row["epochs"])


def _setting(row: dict) -> tuple:
    return row.get("data", "digits"), row["K"], row["optim"], row["lr"], row["epochs"]


def table(rows: list[dict], methods: list[str]) -> str:
    """Markdown: per model, each method's mean test error and its gap to BP paired by seed (mean ± std)."""
    settings = sorted({_setting(r) for r in rows})
    out = []
    for data, K, optim, lr, epochs in settings:
        here = [r for r in rows if _setting(r) == (data, K, optim, lr, epochs)]
        shown = [m for m in methods if any(r["method"] == m for r in here)]
        out.append(f"K = {K}, {optim} lr {lr:g}, {epochs} epochs on {DATA_NAMES[data]}; test error % (mean over seeds), "
                   "gap to BP paired by seed (mean ± std, n); † = runs that diverged (counted at 90 %)\n")
        out.append("| model | " + " | ".join(shown) + " |")
        out.append("|---|" + "---:|" * len(shown))
        for model in FAMILIES[data]:
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
            for model in FAMILIES[data]:
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
    ap.add_argument("--data", default="digits", choices=sorted(FAMILIES),
                    help="digits (offline, in scikit-learn) or fashion (Fashion-MNIST's files under --data-root)")
    ap.add_argument("--data-root", default="data", help="the folder that holds FashionMNIST/raw (--data fashion)")
    ap.add_argument("--models", default=None, help="comma-separated (default: all of the data set's), digits: "
                    + ", ".join(MODELS) + "; fashion: " + ", ".join(FASHION_MODELS))
    ap.add_argument("--methods", default="bp,fr,fr+auto", help="comma-separated: bp, fr, fr+RULES, ddg+RULES")
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--optim", default="sgd", help="sgd (momentum 0.9), nesterov, plain (no momentum) or adam")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2); with --table-only: table only these")
    ap.add_argument("--epochs", type=int, default=None, help="default: 10 on digits, 3 on fashion")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: benchmarks/results/compensation/generality.jsonl (digits), generality-fashion.jsonl")
    ap.add_argument("--table-only", action="store_true", help="print the table of the runs in --out and stop")
    args = ap.parse_args()
    families = FAMILIES[args.data]
    args.epochs = args.epochs or DEFAULT_EPOCHS[args.data]
    args.out = args.out or Path("benchmarks/results/compensation") / (
        "generality.jsonl" if args.data == "digits" else f"generality-{args.data}.jsonl")
    models = [m.strip() for m in (args.models or ",".join(families)).split(",") if m.strip()]
    unknown = sorted(set(models) - set(families))
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)} for --data {args.data}: choose from {', '.join(families)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = [as_run_now(json.loads(line)) for line in args.out.read_text().splitlines() if line.strip()] if args.out.exists() else []
    if args.table_only and args.seeds:
        keep = {int(x) for x in args.seeds.split(",") if x.strip()}
        rows = [r for r in rows if r["seed"] in keep]
    args.seeds = args.seeds or "0,1,2"
    if not args.table_only:
        torch.set_num_threads(1)
        done = {_key(r) for r in rows}
        todo = [dict(data=args.data, model=m, method=meth, K=args.K, optim=args.optim, lr=args.lr, seed=int(s),
                     epochs=args.epochs) for m in models for s in args.seeds.split(",") for meth in methods]
        todo = [t for t in todo if _key(t) not in done]
        if todo:
            try:  # the data once before the first run: missing or unreadable files stop the screen at once
                load(args.data, args.data_root, True), load(args.data, args.data_root, False)
            except FxReplayError as exc:  # the library's message says which files it looked for, and where
                raise SystemExit(f"{exc}\nHere: --data-root DIR (DIR/FashionMNIST/raw/, or the files directly in DIR; "
                                 "Debian's dataset-fashion-mnist package puts them in /usr/share/datasets/fashion-mnist).") from None
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for i, spec in enumerate(todo, 1):
            start = time.perf_counter()
            result = train_once(spec["model"], spec["method"], spec["K"], spec["optim"], spec["lr"], spec["seed"],
                                spec["epochs"], data=args.data, root=args.data_root)
            row = {**spec, **result}
            with args.out.open("a") as f:  # one line per finished run: an interrupted screen resumes here
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            print(f"[{i}/{len(todo)}] {spec['model']} {spec['method']} seed {spec['seed']}: "
                  f"{row['error']:.2f} % {'(diverged) ' if row['diverged'] else ''}in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)
    print(table(rows, methods))


if __name__ == "__main__":
    main()

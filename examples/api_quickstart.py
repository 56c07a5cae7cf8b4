"""Wrap an existing model in a few lines: compile it into K stages, train with FR, evaluate.

    python examples/api_quickstart.py [--steps 60] [--method fr] [--K 3]

Uses scikit-learn's handwritten digits (no download) and the zoo's small CNN; swap in your
own model and data loader.
"""
from __future__ import annotations

import argparse

import torch

import fxreplay
from fxreplay.data import digits, make_loader
from fxreplay.models import digits_cnn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--method", default="fr", choices=["bp", "fr", "ddg", "dni"])
    ap.add_argument("--K", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)

    train, test = digits(train=True), digits(train=False)
    model = digits_cnn()
    x0, _ = next(iter(make_loader(train, 64, shuffle=True, seed=0, epoch=0)))

    pipe = fxreplay.compile(model, (x0,), K=args.K)                      # trace, profile, cut
    trainer = fxreplay.Trainer(
        pipe, method=args.method,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4),
        loss_fn=torch.nn.CrossEntropyLoss(),
    )
    step, epoch = 0, 0
    while step < args.steps:
        for x, y in make_loader(train, 64, shuffle=True, seed=0, epoch=epoch):
            loss = trainer.step(x, y)
            step += 1
            if step % 20 == 0:
                print(f"step {step:4d}  loss {loss:.4f}")
            if step >= args.steps:
                break
        epoch += 1
    result = trainer.evaluate(make_loader(test, 256, shuffle=False, seed=0, epoch=0))
    print(f"{args.method} K={args.K}: test accuracy {result['accuracy']:.1%} after {step} steps")
    model.load_state_dict(trainer.model_state_dict())                   # the original model, trained


if __name__ == "__main__":
    main()

"""Why a late gradient hurts, on one quadratic direction: heavy-ball SGD with a d-step delay.

A direction of curvature λ (a = η·λ for the base learning rate η) under heavy-ball SGD
(v ← μv + g, w ← w − ηv) converges when the spectral radius ρ of its linear update is below 1.
BP is stable up to a = 2(1+μ) = 3.8 at μ = 0.9; a gradient d iterations late makes the same
optimizer unstable above a ≈ 0.1 (d = 1) and 0.034 (d = 3): curvatures that BP damps in ~19
iterations make the delayed stages oscillate. This script prints, for each compensation that
acts on the update (:mod:`fxreplay.methods.compensation`), the largest stable a and the
iterations to shrink an error by e (1/−ln ρ) across curvatures. It is the analysis behind
``auto``; the converged benchmark (docs/compensation.md) is what decides.

    python benchmarks/delay_stability.py [--momentum 0.9] [--delays 1 2 3]
    python benchmarks/delay_stability.py --release 0.1 --delays 1 3 7   # what ``release`` keeps stable after a decay

The model of each rule, for a gradient g evaluated d iterations late:
- ``predict``: g is taken at ŵ = w_{t−d} + d·(w_{t−d} − w_{t−d−1}) (the weights the update will meet);
- ``spike``: w ← w − η(μ^d·v + (1−μ^d)/(1−μ)·g);
- ``stretch``: the stage's momentum is 1 − (1−μ)/s and its learning rate η/s, s = (d+1)^p (p = 1.5,
  the default; the ``stretch=1`` and ``stretch=2`` rows show p = 1 and 2);
- ``lookahead``: the gradient is taken one update further ahead (with ``predict``: at d+1 updates), as FR's
  replay at w + Δw takes it (the model has one direction, so the δ's part and the stage's own part are one).
"""
from __future__ import annotations

import argparse

import numpy as np

CURVATURES = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)


def spectral_radius(a: float, mu: float, delay: int, spike: bool = False, predict: bool = False,
                    stretch: bool = False, power: float = 1.5, lookahead: bool = False) -> float:
    """ρ of the linear map (w_t, …, w_{t−d−1}, v_t) → next, for ∂f/∂w = λw and a = η·λ."""
    eta = 1.0
    if stretch and delay > 0:
        s = (delay + 1) ** power
        mu, eta = 1 - (1 - mu) / s, 1.0 / s
    n = delay + 3

    def step(state: np.ndarray) -> np.ndarray:
        w, v = state[:delay + 2], state[delay + 2]
        ahead = (delay + 1 if lookahead else delay) if predict else (1 if lookahead else 0)
        at = w[delay] + ahead * (w[delay] - w[delay + 1])
        g = a * at
        v_new = mu * v + g
        if spike and delay > 0:
            coef_v, coef_g = mu ** delay, (1 - mu ** delay) / (1 - mu)
            w_new = w[0] - eta * (coef_v * v_new + coef_g * g)
        else:
            w_new = w[0] - eta * v_new
        out = np.zeros(n)
        out[0], out[1:delay + 2], out[delay + 2] = w_new, w[:delay + 1], v_new
        return out

    matrix = np.stack([step(e) for e in np.eye(n)], axis=1)
    return float(max(abs(np.linalg.eigvals(matrix))))


def largest_stable(mu: float, delay: int, **rules: float) -> float:
    """The largest a on a fine log grid (1e-4 … 10) below which every a is stable."""
    last = 0.0
    for a in np.geomspace(1e-4, 10, 400):
        if spectral_radius(float(a), mu, delay, **rules) >= 1:
            return last
        last = float(a)
    return last


def release_table(mu: float, delays: list[int], decay: float, power: float = 1.5) -> None:
    """``release`` after a decay of the rate by R: a direction at the edge of what ``auto``'s rules keep stable
    before the decay (a = L at the old rate) sits at a = R·L after it; with the stabilisers' exponents times R the
    largest stable a is L_R. Their ratio is the margin the released rules keep (> 1: still stable)."""
    print(f"lookahead+predict+stretch (auto after its warm-up), μ = {mu}, after the rate decays by R = {decay:g}; a = η·λ "
          "at the rate of the moment\n")
    print("| delay | largest stable a, full stretch (L) | a of that direction after the decay (R·L) | "
          "largest stable a, released (L_R) | margin L_R / (R·L) |")
    print("|---|---:|---:|---:|---:|")
    for d in delays:
        full = largest_stable(mu, d, predict=True, stretch=True, lookahead=True, power=power)
        released = largest_stable(mu, d, predict=True, stretch=True, lookahead=True, power=power * decay)
        print(f"| {d} | {full:.3f} | {decay * full:.4f} | {released:.3f} | {released / (decay * full):.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--delays", type=int, nargs="+", default=[1, 2, 3, 7])
    ap.add_argument("--release", type=float, default=None, metavar="R",
                    help="instead: what release keeps stable after the rate decays by R (e.g. 0.1), auto's rules")
    args = ap.parse_args()
    mu = args.momentum
    if args.release is not None:
        if not 0 < args.release <= 1:
            raise SystemExit(f"--release takes the rate's decay factor R in (0, 1], got {args.release}")
        return release_table(mu, args.delays, args.release)
    variants = {
        "none": {}, "spike": {"spike": True}, "predict": {"predict": True},
        "predict+spike": {"spike": True, "predict": True},
        "predict+spike+stretch=1": {"spike": True, "predict": True, "stretch": True, "power": 1.0},
        "predict+spike+stretch": {"spike": True, "predict": True, "stretch": True},
        "predict+spike+stretch=2": {"spike": True, "predict": True, "stretch": True, "power": 2.0},
        "predict+stretch": {"predict": True, "stretch": True},
        "lookahead+predict+stretch": {"predict": True, "stretch": True, "lookahead": True},
    }
    header = "| delay | rule | largest stable a | " + " | ".join(f"a={a:g}" for a in CURVATURES) + " |"
    print(f"Heavy-ball SGD, μ = {mu}: iterations to shrink an error by e, per curvature a = η·λ ('—': diverges).\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))

    def row(delay: int, name: str, rules: dict[str, float]) -> str:
        cells = []
        for a in CURVATURES:
            r = spectral_radius(a, mu, delay, **rules)
            cells.append(f"{1 / -np.log(r):.0f}" if r < 1 else "—")
        return f"| {delay} | {name} | {largest_stable(mu, delay, **rules):.3f} | " + " | ".join(cells) + " |"

    print(row(0, "BP", {}))
    for d in args.delays:
        for name, rules in variants.items():
            print(row(d, name, rules))


if __name__ == "__main__":
    main()

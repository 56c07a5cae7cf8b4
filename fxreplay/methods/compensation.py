"""Staleness compensation for the delayed methods (FR, DDG): rules that act on the delay d_k.

Stage k (0-based) of K applies at iteration t the gradient of batch t-d_k, d_k = K-1-k.
FR's replay removes the weight mismatch *inside* a stage, not the delay of the δ it
backpropagates; the penalty grows with K and the step size (DESIGN.md Sec. 2). Each rule
acts in one place of a stage's iteration, is a pure function of (K, d_k, the iteration,
the optimizer's settings), and is the identity for d_k = 0 -- so K = 1 is BP and the last
stage is never touched -- except ``lookahead``, which acts on every stage that sends a δ down
(the last one included) and on none at K = 1 (``replayahead``: on those that are also late, none at K ≤ 2):

=========== ================================= =============================================
rule        where it acts                     formula (source)
=========== ================================= =============================================
``lr``      the size of the update            Δw ← m_k(t)·Δw, m_k(t) = (d_k+1)^-(1-min(t/T_k, 1)),
                                              T_k = 10(d_k+1)/(1-μ) iterations (PipeMare,
                                              Yang et al., MLSys 2021: lr/τ rising to lr)
``shrink``  the δ a stage sends down          δ_{k-1} ← β·δ_{k-1}, β = 0.5 (``shrink=β``): stage
                                              k's gradient carries β^{d_k} (FDG, Zhuang et
                                              al., TNNLS 2022)
``predict`` the weights of the forward that   ŵ_k = w_k + d_k·Δw_k, Δw_k the stage's last
            makes the delayed gradient's      update (= -η·v for SGD with momentum):
            features (FR's play, DDG's        the weights the update will have when the
            stored forward)                   gradient lands (SpecTrain, Chen et al. 2018;
                                              Kosson et al., MLSys 2021)
``spike``   the momentum step of a late       w ← w - η(a·v + b·g), a = μ^{d_k},
            gradient                          b = (1-μ^{d_k})/(1-μ): the d_k momentum terms
                                              the gradient missed, at once (spike
                                              compensation, Kosson et al., MLSys 2021)
``stretch`` the stage's momentum horizon      η_k = η/s_k, μ_k = 1-(1-μ)/s_k, s_k = (d_k+1)^p,
                                              p = 1.5 (``stretch=p``): every gradient still
                                              moves the weights by η/(1-μ) in total, spread
                                              over s_k times as many iterations (this
                                              project; the delayed heavy-ball analysis of
                                              benchmarks/delay_stability.py). Nesterov SGD:
                                              the same μ_k and η_k; Adam/AdamW: β₁_k =
                                              1-(1-β₁)/s_k at the same lr (its first moment
                                              is an average: the same total step)
``lookahead`` FR's replay: the forward and    w̃_k = w_k + Δw_k for stages k ≥ 1 (the ones that
            backward that make the stage's   send a δ down; with ``predict`` the play aims at
            gradient and the δ it sends      d_k + 1): the δ stage k-1 applies one iteration
            down                             later is taken at the weights stage k will have
                                             then, and the stage's own gradient one update
                                             ahead, as Nesterov momentum takes it (this
                                             project, from weight prediction; FR only)
``replayahead`` the replays of the delayed    ``lookahead`` on stages 0 < k < K-1 only: the last
            stages that send a δ down         stage trains at its own weights, as BP's. Its
                                              lookahead takes its *own* gradient at w − η·v,
                                              which is stable only to η·λ < 2(1+μ)/3 (1.27 at
                                              μ = 0.9; heavy-ball 3.8); this keeps its range
                                              and gives up the δ it sends being one update
                                              ahead (this project; FR only)
``adapt``   how strongly ``lr`` and           their exponents times σ_k = clip(1 − ā_k/A, 0, 1),
(``adapt=A``) ``stretch`` act                  A = 1: m_k(t)^σ, s_k = (d_k+1)^{pσ}; ā_k the
                                              average of cos(−g, Δw_prev) over the momentum
                                              horizon: ~1 in a consistent descent, where a late
                                              gradient costs little and the stabilisers only
                                              slow it, ≤ 0 in noise or an overshoot (this
                                              project; the velocity is rescaled when s_k moves)
``release`` how strongly ``lr`` and           their exponents times η(t)/η_peak, the lr schedule's
            ``stretch`` act                   rate over the highest it reached: a delayed loop's
                                              stability depends on η·λ, so after a decay by 10 a
                                              smaller margin is needed (in a warm-up or
                                              onecycle's rise σ grows with the rate); with
                                              ``adapt`` the two σ multiply (this project)
``official`` FR's published code              Nesterov momentum, stage 0's update doubled,
                                              BatchNorm statistics updated by the replay too
``sync``    the first T iterations            no delay: every stage's gradient of the current
(``sync=T``)                                  batch, in BP's order (the replay of batch t after
                                              the stage above has backpropagated it), and the
                                              other rules idle; from t = T the delayed pipeline
                                              starts as at t = 0. T = 10·K/(1-μ) (the warm-up
                                              horizon of ``lr``'s most delayed stage: 400 at
                                              K = 4, μ = 0.9); ``lr``'s warm-up starts at T. The
                                              stages wait for each other for T iterations (this
                                              project; FR only)
=========== ================================= =============================================

Rules compose with ``+`` (``predict+spike``); ``auto`` is the recommended combination for the
stage's optimizer (see :func:`resolve`); ``none`` is Algorithm 1 exactly. Where a rule assumes an optimizer it checks
it when the stage is built: ``spike`` and ``official`` need ``torch.optim.SGD`` (spike: with
momentum, no Nesterov, no dampening); ``stretch`` needs SGD with momentum (heavy-ball or Nesterov)
or Adam/AdamW; ``lr`` reads μ from SGD's momentum or Adam's β₁; ``predict`` and ``shrink`` work with
any optimizer. With ``spike`` and ``stretch`` together, spike's coefficients use the stretched μ_k.

A parameter held by several stages (a tied embedding) takes the *uncompensated* step in
every holder, so that its copies stay identical (its holders have different delays); the
prediction, which changes no weight, applies to it as to the others.

>>> parse("spike+predict").name
'predict+spike'
>>> round(spike_coefficients(0.9, 3)[1], 4)
2.71
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TrainingError

__all__ = ["Compensation", "Compensator", "RULES", "AUTO", "AUTO_DDG", "AUTO_OTHER", "parse",
           "resolve", "spike_coefficients", "stretch_coefficients", "lr_multiplier", "sync_steps", "with_sync", "validate", "describe",
           "divergence_hint"]

RULES: dict[str, str] = {
    "lr": "learning rate by delay, rising to the full rate (PipeMare)",
    "shrink": "δ sent down scaled by β (FDG's gradient shrinking)",
    "predict": "forward at the weights the delayed update will meet (weight prediction)",
    "spike": "a late gradient's missed momentum terms applied at once (spike compensation)",
    "stretch": "a late gradient spread over a momentum horizon (d+1)^p times longer, at the same total step (p = 1.5)",
    "lookahead": "FR's replay at the weights one update ahead: the δ sent down meets the weights of when it is used",
    "replayahead": "lookahead in the delayed stages' replays only: the last stage trains at its own weights, as BP's",
    "official": "the published FR code's recipe: Nesterov, stage 0's lr doubled, BN updated in the replay",
    "adapt": "lr's and stretch's strength follows the stage's gradient alignment: released while descent is consistent",
    "release": "lr's and stretch's strength follows the lr schedule, η(t)/η_peak: released as the rate decays",
    "sync": "the first T = 10·K/(1-μ) iterations without delay (BP's gradient, the stages waiting for each other)",
}
"""Every rule by name, with what it does (the module docstring has the formulas)."""

AUTO = "lookahead+predict+stretch+sync"
"""What ``auto`` means for features replay with SGD and momentum (heavy-ball or Nesterov) and with Adam/AdamW: the
recommended rules (docs/compensation.md has the analysis and the screening that chose them). Their constants depend
only on K, d_k and the optimizer's μ. ``sync`` trains the first T = 10·K/(1−μ) iterations without delay (BP's
gradient, the stages taking turns: BP's speed), where a late gradient costs most: the gap that ``auto`` left at lr
0.01, K = 4 on the converged benchmark was made there (BP's first 440 iterations trained on by the delayed rules end
+0.22 points from BP, against +2.04). After it ``stretch`` spreads each late gradient over a momentum horizon
(d+1)^1.5 times longer at the same total step, ``predict`` takes the play at the weights the update will meet, and
``lookahead`` takes every δ at the weights it meets. The synchronous start replaces the ``lr`` warm-up (whose horizon
T is): with both, the warm-up after the start slowed the delayed stages through the rest of the high-rate phase (lr
0.01, K = 4, seed 0: +1.32 points from BP against +0.19 without it). ``spike`` is left out: on six families no rule
was chosen on it was behind on five and made a CNN without normalisation diverge. A run shorter than T is BP's
computation (at BP's speed). (``auto`` was ``lr+predict+spike`` until the morning of 2026-12-06, then
``predict+spike+stretch`` with the horizon d+1 and, from the evening, (d+1)^1.5, then ``lr+predict+spike+stretch``
that night, ``lookahead+lr+predict+spike+stretch`` on 2026-12-07, ``lookahead+lr+predict+stretch`` until 2026-12-08;
a checkpoint records the rules its ``auto`` meant, and a resume under other rules is refused.)"""

AUTO_DDG = "lr+predict+stretch"
"""What ``auto`` means for DDG with SGD and momentum or Adam: it has no replay (no ``lookahead``) and no
synchronous schedule (no ``sync``), so the ``lr`` warm-up keeps its delayed stages stable early instead
(converged benchmark, lr 0.1, K = 4: DDG +7.57 points behind BP, these rules +2.81, three seeds)."""

AUTO_OTHER = "lookahead+lr"
"""What ``auto`` means with any other optimizer (SGD without momentum, RMSprop, ...): the warm-up (``lr``
reads μ from SGD's momentum, 0 here: the shortest warm-up) and ``lookahead``, without ``predict``.
Without momentum the last update Δw is one minibatch's step, and ``predict`` extrapolates its noise d
times: on the six unseen families with plain SGD at lr 0.3 (benchmarks/compensation_generality.py),
``lr+predict`` (``auto`` until 2026-12-07) was far behind plain FR (ReLU MLP +26.1 points behind BP
against +2.2, the transformer +25.9 against +15.4); ``lookahead+lr`` is level with plain FR there (mean
gap +3.6 against +3.6 where neither diverges: ahead on four families, behind on the ReLU MLP, +5.0). No
rule measured beats plain FR clearly without momentum."""

DEFAULT_ADAPT = 1.0
"""``adapt``'s A: σ = clip(1 − ā/A, 0, 1) -- with A = 1, the stabilisers' strength is one minus the average
alignment (no scale of its own). ``adapt=0.5`` releases them at half the alignment."""
DEFAULT_SHRINK = 0.5  # FDG's β; their best per-row values were 0.2-0.5
DEFAULT_STRETCH = 1.5
"""``stretch``'s power p: the horizon is s = (d+1)^p. With predict and spike, the largest stable η·λ of a
delayed heavy-ball direction at d = 1, 3, 7 is 0.66, 0.26, 0.12 for p = 1 (falling with the delay), 0.94,
0.53, 0.33 for p = 1.5 and 1.3, 1.0, 0.91 for p = 2 (near 1 whatever the delay). The price is slower damping
of middle and, at large delays, flat directions (benchmarks/delay_stability.py). Measured
(docs/compensation.md): on the converged benchmark at lr 0.1, K = 4, p = 1.5 was closest to BP (+3.8 points
over three seeds; p = 2 +4.4 and p = 1 +5.1); p = 2 was ahead at K = 8 on a proxy and p = 1 at lr 0.01."""


@dataclass(frozen=True)
class Compensation:
    """A parsed compensation: its rules and their parameters.

    Attributes:
        rules: rule names, sorted (the canonical order of :attr:`name`).
        beta: ``shrink``'s factor on δ.
        power: ``stretch``'s power p (horizon (d+1)^p).
        alignment: ``adapt``'s A (σ = clip(1 − ā/A, 0, 1)).
        sync: ``sync``'s T, the synchronous iterations; None: :func:`sync_steps` of K and μ.
    """

    rules: tuple[str, ...] = ()
    beta: float = DEFAULT_SHRINK
    power: float = DEFAULT_STRETCH
    alignment: float = DEFAULT_ADAPT
    sync: int | None = None
    auto: bool = False  # the rules are chosen for the optimizer (resolve); ``rules`` is empty until then

    @property
    def name(self) -> str:
        """The canonical spelling: ``none``, ``auto``, or the rules joined by ``+`` (``shrink=β``, ``stretch=p``
        when β, p are not the defaults)."""
        if self.auto:
            return "auto"
        if not self.rules:
            return "none"

        def spelled(rule: str) -> str:
            if rule == "shrink" and self.beta != DEFAULT_SHRINK:
                return f"shrink={self.beta:g}"
            if rule == "stretch" and self.power != DEFAULT_STRETCH:
                return f"stretch={self.power:g}"
            if rule == "adapt" and self.alignment != DEFAULT_ADAPT:
                return f"adapt={self.alignment:g}"
            if rule == "sync" and self.sync is not None:
                return f"sync={self.sync}"
            return rule

        return "+".join(spelled(r) for r in self.rules)

    def __contains__(self, rule: str) -> bool:
        return rule in self.rules

    @property
    def is_none(self) -> bool:
        return not self.rules and not self.auto


def parse(spec: str | Compensation | None) -> Compensation:
    """Parse ``none``, ``auto``, a rule or rules joined by ``+`` (``shrink=0.3`` sets β, ``stretch=1`` p,
    ``adapt=0.5`` A, ``sync=200`` T).

    Raises:
        TrainingError: an unknown rule, a rule given twice, or a bad β or p; the message lists the rules.
    """
    if isinstance(spec, Compensation):
        return spec
    text = "none" if spec is None else str(spec).strip().lower()
    if text in ("", "none"):
        return Compensation()
    if text == "auto":
        return Compensation(auto=True)
    rules: list[str] = []
    beta, power, alignment = DEFAULT_SHRINK, DEFAULT_STRETCH, DEFAULT_ADAPT
    sync: int | None = None
    for part in text.split("+"):
        name, _, value = part.strip().partition("=")
        if name not in RULES:
            listed = ", ".join(f"{r} ({what})" for r, what in RULES.items())
            raise TrainingError(
                f"unknown compensation rule {name!r} in {spec!r}: use none, auto, or rules joined by '+' from: {listed}."
            )
        if name in rules:
            raise TrainingError(f"compensation {spec!r} names {name!r} twice; give each rule once.")
        if value:
            if name not in ("shrink", "stretch", "adapt", "sync"):
                raise TrainingError(
                    f"compensation rule {name!r} takes no value (got {part!r}); only shrink=β, stretch=p, adapt=A and "
                    "sync=T do.")
            if name == "sync":
                if not value.isdigit() or int(value) == 0:
                    raise TrainingError(f"sync's T (the synchronous iterations) must be a whole number >= 1, got {value!r} "
                                        "(e.g. sync=400; plain sync: 10·K/(1-μ); without a synchronous start, drop sync).")
                sync = int(value)
                rules.append(name)
                continue
            try:
                number = float(value)
            except ValueError:
                number = float("nan")
            if name == "shrink":
                if not 0 < number <= 1:
                    raise TrainingError(f"shrink's β must be a number in (0, 1], got {value!r} (e.g. shrink=0.3).")
                beta = number
            elif name == "adapt":
                if not 0 < number <= 1:
                    raise TrainingError(f"adapt's alignment A must be a number in (0, 1], got {value!r} (e.g. adapt=0.5).")
                alignment = number
            else:
                if not 0 < number <= 4:
                    raise TrainingError(
                        f"stretch's power p (horizon (d+1)^p) must be a number in (0, 4], got {value!r} "
                        f"(the default is {DEFAULT_STRETCH:g}; stretch=1 is the horizon d+1).")
                power = number
        rules.append(name)
    if "lookahead" in rules and "replayahead" in rules:
        raise TrainingError(
            f"compensation {spec!r} names both lookahead (every stage that sends a δ down, the last one included) and "
            "replayahead (the delayed stages only): give one of them.")
    return Compensation(tuple(sorted(rules)), beta, power, alignment, sync=sync)


def resolve(comp: Compensation, optimizer: torch.optim.Optimizer, method: str = "fr") -> Compensation:
    """The rules ``comp`` stands for with this optimizer and method: ``auto`` is, for FR, :data:`AUTO` with SGD
    and momentum (heavy-ball without dampening, or Nesterov) and with Adam and AdamW, and :data:`AUTO_OTHER`
    otherwise; for DDG (no replay, no synchronous schedule) :data:`AUTO_DDG` with those optimizers and
    :data:`AUTO_OTHER` without ``lookahead`` otherwise. Any other compensation is itself."""
    if not comp.auto:
        return comp
    groups = [g for g in optimizer.param_groups if g["params"]] or optimizer.param_groups
    heavy_ball = isinstance(optimizer, torch.optim.SGD) and all(
        float(g.get("momentum", 0)) > 0 and not g.get("nesterov") and g.get("dampening", 0) == 0 and not g.get("maximize")
        for g in groups)
    momentum = heavy_ball or _nesterov(optimizer) or _adam(optimizer)
    if method == "fr":
        return parse(AUTO if momentum else AUTO_OTHER)
    # lookahead runs FR's replay ahead and sync FR's schedule without delay: DDG has neither
    return parse(AUTO_DDG if momentum else "+".join(r for r in AUTO_OTHER.split("+") if r != "lookahead"))


def spike_coefficients(momentum: float, delay: int) -> tuple[float, float]:
    """Spike compensation's ``(a, b)`` for a gradient ``delay`` iterations late.

    Without delay, SGD with momentum μ applies a gradient g with weight μ^i at the i-th update
    after it arrives. Arriving d late, it has missed the weights 1, μ, …, μ^{d-1}: the update
    ``w ← w − η(a·v + b·g)`` with ``a = μ^d`` and ``b = Σ_{i<d} μ^i = (1−μ^d)/(1−μ)`` applies
    them at once (b) and gives the rest of its life the weights a·μ^i = μ^{d+i} it would have
    had (Kosson et al., "Pipelined Backpropagation at Scale", MLSys 2021, Sec. 4). d = 0 gives
    (1, 0): plain SGD.
    """
    a = momentum ** delay
    b = float(delay) if momentum == 1 else (1 - a) / (1 - momentum)
    return a, b


def stretch_coefficients(momentum: float, delay: int, power: float = DEFAULT_STRETCH) -> tuple[float, float]:
    """``stretch``'s ``(lr factor, μ_k)`` for a stage whose gradients are ``delay`` late.

    Heavy-ball SGD moves the weights by η·g/(1−μ) in total for each gradient g, η·g at once
    and the rest over ~1/(1−μ) iterations. A gradient d iterations late feeds back into a
    loop that reacts faster than the delay allows: a curvature that BP damps in ~19
    iterations diverges (at μ = 0.9 the largest stable η·λ falls from 3.8 to 0.034 at d = 3).
    Stretching the stage's momentum horizon by s = (d+1)^p, μ_k = 1 − (1−μ)/s, at the learning
    rate η/s keeps every gradient's total step η/(1−μ) and spreads it over s times as many
    iterations. With ``predict`` and ``spike``, the largest stable η·λ at d = 3 goes from 0.072
    to 0.26 (p = 1), 0.53 (p = 1.5, the default) and 1.0 (p = 2)
    (``python benchmarks/delay_stability.py``). d = 0 gives (1, μ): plain SGD.

    >>> stretch_coefficients(0.9, 3)
    (0.125, 0.9875)
    >>> stretch_coefficients(0.9, 3, power=1)
    (0.25, 0.975)
    """
    if delay <= 0:
        return 1.0, momentum
    s = float(delay + 1) ** power
    return 1.0 / s, 1.0 - (1.0 - momentum) / s


def sync_steps(K: int, momentum: float) -> int:
    """``sync``'s T: ``round(10·K/(1-μ))`` iterations, the horizon of ``lr``'s warm-up on the most delayed stage
    (d = K-1; 400 at K = 4, μ = 0.9): the early iterations in which a late gradient costs most."""
    return round(10.0 * K / max(1.0 - momentum, 1e-3))


def with_sync(rules: str, length: int | str) -> str:
    """``rules`` (a resolved compensation's name) with ``sync``'s T set to ``length``: ``sync=1`` times the
    pipeline after a one-iteration start, ``sync=N`` tells a user how to spell a shorter one."""
    return "+".join(f"sync={length}" if r.partition("=")[0] == "sync" else r for r in rules.split("+"))


def lr_multiplier(delay: int, iteration: int, momentum: float) -> float:
    """``lr``'s factor on stage updates: ``(d+1)^-(1 - min(t/T, 1))``, ``T = 10(d+1)/(1-μ)``.

    PipeMare (Yang et al., MLSys 2021) starts a stage with delay τ at lr/τ and returns to lr
    over a warm-up; here τ = d+1 (FR's last stage, d = 0, is exact) and the horizon is ten
    times the iterations a momentum buffer needs to forget (1/(1-μ)) per unit of delay, so it
    depends on the delay and the optimizer only (400 iterations at d = 3, μ = 0.9).
    """
    if delay <= 0:
        return 1.0
    horizon = round(10.0 * (delay + 1) / max(1.0 - momentum, 1e-3))  # whole iterations
    if iteration >= horizon:
        return 1.0
    return float((delay + 1) ** -(1.0 - min(iteration / horizon, 1.0)))


def _adam(optimizer: torch.optim.Optimizer) -> bool:
    """Adam or AdamW: an EMA momentum (β₁) whose horizon ``stretch`` lengthens."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def _nesterov(optimizer: torch.optim.Optimizer) -> bool:
    """SGD with Nesterov momentum in every group."""
    groups = [g for g in optimizer.param_groups if g["params"]] or optimizer.param_groups
    return isinstance(optimizer, torch.optim.SGD) and bool(groups) and all(g.get("nesterov") for g in groups)


def _swaps(optimizer: torch.optim.Optimizer) -> bool:
    """``stretch`` runs the optimizer's own step at the stretched hyper-parameters (Adam's β₁; Nesterov
    SGD's momentum and lr) rather than rewriting a heavy-ball step (where it composes with ``spike``)."""
    return _adam(optimizer) or _nesterov(optimizer)


def _momentum(optimizer: torch.optim.Optimizer) -> float:
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    if "momentum" in group:
        return float(group["momentum"])
    if "betas" in group:
        return float(group["betas"][0])
    return 0.0


def validate(comp: Compensation, optimizer: torch.optim.Optimizer, method: str) -> None:
    """Refuse a rule whose assumptions the optimizer breaks (each rule's docstring says which).

    Raises:
        TrainingError: naming the rule, the optimizer and what to do.
    """
    sgd = isinstance(optimizer, torch.optim.SGD)
    groups = [g for g in optimizer.param_groups if g["params"]] or optimizer.param_groups
    for rule in ("spike", "stretch"):
        if rule not in comp:
            continue
        if rule == "stretch" and _adam(optimizer):
            continue  # Adam's horizon is β₁'s (stretch_coefficients)
        if not sgd:
            what, fits = (("lengthens the momentum horizon of SGD or Adam/AdamW", "torch.optim.SGD with momentum or Adam/AdamW")
                          if rule == "stretch" else ("corrects SGD's momentum step", "torch.optim.SGD with momentum"))
            raise TrainingError(
                f"compensation {rule!r} {what}, and this stage's optimizer is {type(optimizer).__name__}: use {fits}, "
                f"or drop {rule} (predict, lr and shrink work with any optimizer)."
            )
        if rule == "stretch" and _nesterov(optimizer):
            continue  # its step runs at μ_k and η/s_k (torch's SGD has refused Nesterov with dampening already)
        for g in groups:
            if g.get("nesterov") or g.get("dampening", 0) != 0 or g.get("maximize"):
                also = " (stretch also takes Nesterov momentum in every group)" if rule == "stretch" else ""
                raise TrainingError(
                    f"compensation {rule!r} assumes plain heavy-ball momentum (w ← w − η·v){also}, but the optimizer "
                    f"has nesterov={g.get('nesterov')} dampening={g.get('dampening')} maximize={g.get('maximize')}: set "
                    f"nesterov=False, dampening=0 and maximize=False, or drop {rule}."
                )
        if rule == "stretch" and any(float(g.get("momentum", 0)) <= 0 for g in groups):
            raise TrainingError(
                "compensation 'stretch' lengthens SGD's momentum horizon, and this optimizer has momentum 0: "
                "use SGD with momentum (e.g. 0.9), or drop stretch."
            )
    for rule in ("adapt", "release"):
        if rule in comp and "lr" not in comp and "stretch" not in comp:
            raise TrainingError(
                f"compensation {rule!r} sets how strongly lr and stretch act, and {comp.name!r} has neither: add lr or "
                f"stretch (e.g. {rule}+lookahead+lr+predict+stretch), or drop {rule}."
            )
    if "sync" in comp and method != "fr":
        raise TrainingError(
            f"compensation 'sync' runs features replay's first iterations without delay (its replay as BP's forward); "
            f"{method} has no such schedule: use it with fr, or drop it.")
    for rule in ("lookahead", "replayahead"):
        if rule in comp and method != "fr":
            raise TrainingError(
                f"compensation {rule!r} runs features replay's replay one update ahead; {method} has no replay: use it "
                "with fr, or drop it (predict, spike, stretch, lr and shrink work with ddg)."
            )
    if "official" in comp:
        if method != "fr":
            raise TrainingError(f"compensation 'official' is the published features-replay code's recipe; it does not apply to {method}.")
        if not sgd or any(float(g.get("momentum", 0)) <= 0 or g.get("dampening", 0) != 0 for g in groups):
            raise TrainingError(
                "compensation 'official' switches SGD to Nesterov momentum, which needs torch.optim.SGD with momentum > 0 "
                f"and dampening 0 (the optimizer is {type(optimizer).__name__}); use such an SGD or another rule."
            )
    mus = {float(g.get("momentum", g.get("betas", (0.0,))[0])) for g in groups}
    reading = [rule for rule in ("lr", "spike", "stretch") if rule in comp]
    if reading and len(mus) > 1:
        raise TrainingError(
            f"compensation {'+'.join(reading)} computes with the optimizer's momentum μ, and its parameter groups have "
            f"different ones ({', '.join(f'{m:g}' for m in sorted(mus))}): give every group the same momentum, or drop "
            f"{' and '.join(reading)}."
        )
    if "official" in comp and "sync" in comp:
        raise TrainingError("compensation 'official' switches the optimizer to Nesterov from the first step, which sync's "
                            "BP start would not be: use one of them.")
    for rule in ("spike", "stretch"):
        if "official" in comp and rule in comp:
            raise TrainingError(f"compensation 'official' uses Nesterov momentum, which {rule!r} does not model; use one of them.")


class Compensator:
    """One stage's compensation: the hooks a delayed worker calls.

    Args:
        comp: the parsed rules.
        stage: the stage index k; ``delay`` is d_k.
        params: the stage's parameters; ``shared`` those it shares with other stages.
        optimizer: the stage's optimizer (checked by :func:`validate`).
        method: the worker's method name (``fr`` / ``ddg``).
    """

    def __init__(self, comp: Compensation, stage: int, delay: int, params: Sequence[torch.Tensor],
                 shared: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, method: str) -> None:
        self.name = comp.name  # what the user asked for (``auto``): checkpoints record it
        comp = resolve(comp, optimizer, method)
        validate(comp, optimizer, method)
        self.comp, self.stage, self.delay = comp, stage, delay
        self.params = list(params)
        shared_ids = {id(p) for p in shared}
        self._own = [id(p) not in shared_ids for p in self.params]
        self.momentum = _momentum(optimizer)
        # sync: the first T iterations run without delay (the worker's schedule) and every rule idles through them
        T = comp.sync if comp.sync is not None else sync_steps(stage + delay + 1, self.momentum)
        self.sync_steps = T if "sync" in comp else 0
        self.iteration = 0  # the iteration the stage is running (set by the worker before each action)
        self._group_index: tuple[torch.optim.Optimizer, list[int | None]] | None = None  # see _groups_of
        # Δw of the last update, per parameter (``predict``); None until the stage first steps.
        self.last_step: list[torch.Tensor | None] | None = None
        # lookahead: stages that send a δ down replay one update ahead (none at K = 1: stage 0 sends nothing)
        # (replayahead: only the delayed ones, d_k > 0; the last stage trains at its own weights)
        self.ahead = 1 if stage > 0 and ("lookahead" in comp or ("replayahead" in comp and delay > 0)) else 0
        self._held: list[torch.Tensor] | None = None  # the weights under the lookahead (enter_ahead .. exit_ahead)
        self.alignment = 0.0  # adapt: ā, the average of cos(-g, Δw_prev); σ (strength) follows from it
        self.horizon: float | None = None  # stretch's s_k at the last step (adapt changes it: the velocity is rescaled)
        self.peak_lr: list[float] | None = None  # release: each of the stage's groups' peak learning rate
        self.released = 1.0  # release: η(t)/η_peak of the step being taken (its largest over the groups)
        if "official" in comp:
            for g in optimizer.param_groups:
                g["nesterov"] = True

    # -- where each rule acts ---------------------------------------------------------
    @property
    def in_sync(self) -> bool:
        """``sync``: the running iteration is one of the first T, trained without delay (BP's gradient)."""
        return self.iteration < self.sync_steps

    @property
    def freeze_norms_in_replay(self) -> bool:
        """Algorithm 1 updates BatchNorm statistics in the play only; the official code in the replay too."""
        return "official" not in self.comp

    @property
    def delta_scale(self) -> float:
        """``shrink``: the factor on the δ this stage sends down (1 without it)."""
        return self.comp.beta if "shrink" in self.comp and self.stage > 0 else 1.0

    def scale_deltas(self, deltas: tuple[Any, ...]) -> tuple[Any, ...]:
        s = self.delta_scale
        if s == 1.0 or self.in_sync:
            return deltas
        return tuple(d * s if isinstance(d, torch.Tensor) else d for d in deltas)

    def predicting(self) -> bool:
        return "predict" in self.comp and self.delay + self.ahead > 0 and self.last_step is not None and not self.in_sync

    def predicted(self, horizon: int | None = None) -> list[torch.Tensor]:
        """``predict``: ŵ = w + h·Δw for every parameter (detached copies); h = d (+1 under ``lookahead``, whose
        replay runs one update ahead) unless given."""
        assert self.last_step is not None
        h = self.delay + self.ahead if horizon is None else horizon
        return [p.detach() + h * s if s is not None else p.detach().clone() for p, s in zip(self.params, self.last_step)]

    def enter_ahead(self) -> None:
        """``lookahead``: the stage's parameters hold w̃ = w + Δw from here to :meth:`exit_ahead` -- FR's replay
        forward and its backward (the last stage: its training forward and backward). A no-op on stage 0,
        before the stage's first update and without the rule."""
        if not self.ahead or self.last_step is None or self._held is not None or self.in_sync:
            return
        self._held = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.last_step):
                if s is not None:
                    p.add_(s)  # w + Δw in place: no second copy of the weights

    def exit_ahead(self) -> None:
        """The parameters hold exactly their own weights again (idempotent)."""
        if self._held is None:
            return
        with torch.no_grad():
            for p, w in zip(self.params, self._held):
                p.copy_(w)
        self._held = None

    @contextlib.contextmanager
    def predicted_weights(self) -> Iterator[None]:
        """The stage's parameters hold ŵ inside the block and exactly their own values after it."""
        if not self.predicting():
            yield
            return
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, w in zip(self.params, self.predicted()):
                p.copy_(w)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, saved):
                    p.copy_(w)

    @property
    def strength(self) -> float:
        """How strongly ``lr`` and ``stretch`` act, σ_k in [0, 1] (1 without ``adapt`` and ``release``): ``adapt``'s
        clip(1 − ā_k/A, 0, 1), 1 until the stage has an alignment to average; times ``release``'s η(t)/η_peak."""
        sigma = min(max(1.0 - self.alignment / self.comp.alignment, 0.0), 1.0) if "adapt" in self.comp else 1.0
        return sigma * self.released if "release" in self.comp else sigma

    @property
    def _scaled(self) -> bool:
        """Whether :attr:`strength` can be below 1 (``adapt`` or ``release``)."""
        return "adapt" in self.comp or "release" in self.comp

    def _follow_schedule(self, groups: list[dict]) -> None:
        """``release``: this step's η(t)/η_peak, the largest over the stage's parameter groups: the stabilisers act on
        the whole stage, and a group still at its peak rate still needs them.

        A group's η_peak is the largest of its ``initial_lr`` (the base rate torch's schedulers record: the top of a
        warm-up, a step or a cosine decay), its ``max_lr`` (onecycle's top; CyclicLR keeps its own, so there σ stays
        1 through the first rise) and the highest rate seen at this
        stage's steps (no scheduler: a rate set by hand). So in a warm-up or onecycle's rise σ grows with the rate,
        and a stage whose first step comes after a decay still knows the rate it decayed from. The peaks are
        checkpointed: a resume that restarts the schedule at a lower rate counts it as decayed from the run's."""
        unique = list({id(g): g for g in groups if g and "lr" in g}.values())
        if not unique:
            return
        peaks = list(self.peak_lr or [0.0])
        if len(peaks) != len(unique):  # one peak recorded for the stage (an older checkpoint): it holds for every group
            peaks = [max(peaks)] * len(unique)
        ratios = []
        for i, g in enumerate(unique):
            rate = float(g["lr"])
            peaks[i] = max(peaks[i], float(g.get("initial_lr", 0.0)), float(g.get("max_lr", 0.0)), rate)
            ratios.append(min(rate / peaks[i], 1.0) if peaks[i] > 0 else 1.0)
        self.peak_lr, self.released = peaks, max(ratios)

    def _gradients(self, optimizer: torch.optim.Optimizer, groups: list[dict]) -> list[torch.Tensor | None]:
        """Each parameter's gradient with the optimizer's coupled weight decay (AdamW's is decoupled: not in it)."""
        coupled = not isinstance(optimizer, torch.optim.AdamW)
        return [None if p.grad is None else
                p.grad.detach() + float(g.get("weight_decay", 0.0)) * p.detach() if coupled and g.get("weight_decay")
                else p.grad.detach()
                for p, g in zip(self.params, groups)]

    def _observe(self, optimizer: torch.optim.Optimizer, groups: list[dict], grads: list[torch.Tensor | None]) -> None:
        """``adapt``: fold this step's alignment into ā_k, the average σ_k (:attr:`strength`) follows.

        The alignment is cos(−g, Δw) of the gradient about to be applied (``grads``: with the optimizer's coupled
        weight decay; with Adam and AdamW in their own metric, g/√v̂, v̂ before this step) and the stage's last
        update: near 1 while the stage descends along a consistent direction, near 0 where minibatch noise or
        an oscillation dominates (SGD near the edge of stability, the regime in which a late gradient
        destabilises), negative in an overshoot. ā_k is its exponential average over the optimizer's momentum
        horizon 1/(1−μ) (at most 100 iterations), from ā = 0 (σ = 1). Shared (tied) parameters are left out.
        Sums in the weights' precision (at least float32); one host sync a step.
        """
        assert self.last_step is not None
        adam = _adam(optimizer)
        sums: list[torch.Tensor] = []
        with torch.no_grad():
            for p, grad, step, g, own in zip(self.params, grads, self.last_step, groups, self._own):
                if grad is None or step is None or not own:
                    continue
                state = optimizer.state.get(p, {})
                if adam and state.get("exp_avg_sq") is not None and float(state.get("step", 0)) > 0:
                    # Adam's direction is g/√v̂: compare the step with the gradient in that metric
                    beta2, eps = float(g["betas"][1]), float(g["eps"])
                    second = state["exp_avg_sq"] / (1.0 - beta2 ** float(state["step"]))
                    grad = grad / (second.sqrt() + eps)
                wide = torch.promote_types(grad.dtype, torch.float32)  # no copy for float32 or float64 weights
                grad, step = grad.to(wide), step.to(wide)
                sums.append(torch.stack([-(grad * step).sum(), (grad * grad).sum(), (step * step).sum()]).double())
        if not sums:
            return
        dot, gg, ss = torch.stack([x.to(sums[0].device) for x in sums]).sum(0).tolist()
        align = dot / (gg * ss) ** 0.5 if gg > 0 and ss > 0 else 0.0
        beta = min(max(self.momentum, 0.0), 0.99)
        self.alignment = beta * self.alignment + (1.0 - beta) * align

    def _step_factor(self, iteration: int) -> float:
        m = lr_multiplier(self.delay, iteration - self.sync_steps, self.momentum) if "lr" in self.comp else 1.0
        if self._scaled and m != 1.0:
            m = m ** self.strength
        if "official" in self.comp and self.stage == 0:
            m *= 2.0  # the official code doubles module 1's learning rate
        return m

    def step(self, optimizer: torch.optim.Optimizer, iteration: int) -> None:
        """The stage's update at ``iteration`` (of the gradient d_k iterations late), compensated.

        The optimizer takes its own step; ``stretch`` then rewrites SGD's velocity as
        ``v ← μ_k·v + g`` (in the optimizer's own momentum buffer, so checkpoints carry it) and
        the step as ``−η_k·v``; ``spike`` turns ``−η·v`` into ``−η(a·v + b·g)`` (with μ_k and η_k
        under stretch); ``lr`` scales the displacement by m_k(t) (for SGD and Adam the
        displacement is proportional to lr, so this is the step at m_k(t)·lr). Parameters
        shared with other stages keep the plain step.
        """
        self.momentum = _momentum(optimizer)  # a scheduler may cycle it (onecycle): the step's own μ
        if iteration < self.sync_steps:  # sync: BP's step; the last one is recorded for predict and lookahead after it
            self._plain_step(optimizer, record=iteration == self.sync_steps - 1)
            return
        spike = "spike" in self.comp and self.delay > 0
        stretch = "stretch" in self.comp and self.delay > 0
        swapped = stretch and _swaps(optimizer)  # the step itself runs at the stretched horizon: nothing to rewrite
        stretch = stretch and not swapped
        groups = [optimizer.param_groups[j] if j is not None else {} for j in self._groups_of(optimizer)]
        observe = "adapt" in self.comp and self.delay > 0 and self.last_step is not None
        grads = self._gradients(optimizer, groups) if spike or stretch or observe else []
        if observe:  # σ for this step's lr factor and horizon
            self._observe(optimizer, groups, grads)
        if "release" in self.comp:
            self._follow_schedule(groups)
        factor = self._step_factor(iteration)
        record = "predict" in self.comp or self.ahead > 0 or "adapt" in self.comp
        rewrite = spike or stretch or factor != 1.0
        take_step = functools.partial(self._stretched_step, optimizer) if swapped else optimizer.step
        if not (rewrite or record):  # nothing to rewrite or record: no copies of the weights
            take_step()
            return
        before = [p.detach().clone() if p.grad is not None else None for p in self.params]
        velocity: list[torch.Tensor | None] = []  # stretch: each own parameter's velocity before the step
        if stretch:
            velocity = [self._buffer(optimizer, p, own) for p, own in zip(self.params, self._own)]
        lrs = [float(g.get("lr", 0.0)) for g in groups]  # before the step: a scheduler steps after it
        take_step()
        lr_scale, mu = stretch_coefficients(self.momentum, self.delay, self._power()) if stretch else (1.0, self.momentum)
        rescale = self._rescale(1.0 / lr_scale) if stretch else 1.0
        a, b = spike_coefficients(mu, self.delay) if spike else (1.0, 0.0)
        steps: list[torch.Tensor | None] = []
        with torch.no_grad():
            for i, (p, w0) in enumerate(zip(self.params, before)):
                if w0 is None:
                    steps.append(None)
                    continue
                if rewrite and self._own[i]:
                    d = p.detach() - w0
                    v = optimizer.state.get(p, {}).get("momentum_buffer") if stretch else None
                    if v is not None:  # stretch (a parameter outside the optimizer has no buffer: not stepped)
                        g = grads[i]
                        assert g is not None
                        old = velocity[i]
                        if old is not None:  # torch's first step sets v = g, as μ_k·0 + g would
                            v.copy_(mu * (old * rescale if rescale != 1.0 else old) + g)
                        d = -lrs[i] * lr_scale * (a * v + b * g)
                    elif spike:
                        g = grads[i]
                        assert g is not None
                        d = a * d - lrs[i] * b * g
                    if factor != 1.0:
                        d = d * factor
                    p.copy_(w0 + d)
                steps.append(p.detach() - w0)
        if record:
            self.last_step = steps

    def _plain_step(self, optimizer: torch.optim.Optimizer, record: bool) -> None:
        """The optimizer's own step; with ``record`` (the last synchronous one) its displacement is kept where a rule
        reads the last update -- no copy of the weights in the other synchronous steps. ``stretch``'s
        horizon starts from the velocity as it is: η/s·μ_k/(1−μ_k) = η·μ_k/(1−μ), so what the velocity still
        moves the weights changes by μ_k/μ (≤ 11 % at μ = 0.9), with no kick at the switch."""
        if "release" in self.comp:
            self._follow_schedule([optimizer.param_groups[j] if j is not None else {} for j in self._groups_of(optimizer)])
        if not (record and ("predict" in self.comp or self.ahead > 0 or "adapt" in self.comp)):
            optimizer.step()
            return
        before = [p.detach().clone() if p.grad is not None else None for p in self.params]
        optimizer.step()
        self.last_step = [None if w0 is None else p.detach() - w0 for p, w0 in zip(self.params, before)]

    def _stretched_step(self, optimizer: torch.optim.Optimizer) -> None:
        """``stretch`` with Adam/AdamW or Nesterov SGD: one step of the optimizer at the stretched horizon, the
        groups' own hyper-parameters restored after it.

        Adam/AdamW: β₁_k = 1 − (1−β₁)/s_k at the same lr. Adam's first moment is an average (weights
        (1−β₁)β₁^i summing to 1): every gradient moves the weights by lr·g/√v in total whatever β₁ is, so a
        longer horizon at the same lr is the heavy-ball stretch's η/s, 1 − (1−μ)/s. Nesterov SGD: momentum
        μ_k = 1 − (1−μ)/s_k at lr η/s_k, as heavy-ball (each gradient's total step stays η/(1−μ)).
        Parameters shared with other stages step separately at the groups' own hyper-parameters.
        """
        groups = [g for g in optimizer.param_groups if g["params"]]
        keys = ("betas",) if _adam(optimizer) else ("momentum", "lr")
        saved = [{key: g[key] for key in keys} for g in groups]
        shared = [(p, p.grad) for p, own in zip(self.params, self._own) if not own and p.grad is not None]
        for p, _ in shared:
            p.grad = None
        try:
            for g, own in zip(groups, saved):
                if "betas" in own:
                    _, beta1 = stretch_coefficients(float(own["betas"][0]), self.delay, self._power())
                    g["betas"] = (beta1, *tuple(own["betas"])[1:])
                else:
                    scale, g["momentum"] = stretch_coefficients(float(own["momentum"]), self.delay, self._power())
                    g["lr"] = own["lr"] * scale
            if saved and "betas" not in saved[0]:  # Nesterov's buffer is a sum, as heavy-ball's: rescaled when s_k changes
                ratio = self._rescale(1.0 / scale)
                if ratio != 1.0:
                    with torch.no_grad():
                        for p, own_param in zip(self.params, self._own):
                            buf = optimizer.state.get(p, {}).get("momentum_buffer") if own_param else None
                            if buf is not None:
                                buf.mul_(ratio)
            optimizer.step()
        finally:
            for g, own in zip(groups, saved):
                g.update(own)
            for p, grad in shared:
                p.grad = grad
        if shared:
            hidden = [(p, p.grad) for p, own in zip(self.params, self._own) if own and p.grad is not None]
            for p, _ in hidden:
                p.grad = None
            try:
                optimizer.step()
            finally:
                for p, grad in hidden:
                    p.grad = grad

    def _rescale(self, horizon: float) -> float:
        """The factor s_k(t)/s_k(t−1) on a momentum sum when ``adapt`` changes stretch's horizon (1 otherwise).

        Heavy-ball's velocity v = Σ μ_k^i g is a sum, whose size follows the horizon: v ≈ s·g/(1−μ) in a steady
        descent, and the step η/s·v is η·g/(1−μ) only while s stays what v was summed at. Rescaling v by
        s(t)/s(t−1) keeps the step what it would be had the whole sum been taken at s(t) -- the velocity
        η/s·v is continuous, not a spike of s(t−1)/s(t) when the stabilisers are released. (Adam's first
        moment is an average: nothing to rescale.)"""
        ratio = 1.0 if self.horizon is None else horizon / self.horizon
        self.horizon = horizon
        return ratio

    def _power(self) -> float:
        """stretch's power at this step: p, times σ under ``adapt`` and ``release``."""
        return self.comp.power * (self.strength if self._scaled else 1.0)

    @staticmethod
    def _buffer(optimizer: torch.optim.Optimizer, p: torch.Tensor, own: bool) -> torch.Tensor | None:
        """A copy of SGD's momentum buffer of ``p`` before the step (None before its first step)."""
        buf = optimizer.state.get(p, {}).get("momentum_buffer") if own else None
        return None if buf is None else buf.detach().clone()

    def _groups_of(self, optimizer: torch.optim.Optimizer) -> list[int | None]:
        """The index of each of ``self.params``' groups in ``optimizer`` (None: not in it), found once
        per optimizer: groups' hyper-parameters change, their parameters do not."""
        if self._group_index is None or self._group_index[0] is not optimizer:
            where = {id(p): j for j, g in enumerate(optimizer.param_groups) for p in g["params"]}
            self._group_index = (optimizer, [where.get(id(p)) for p in self.params])
        return self._group_index[1]

    # -- checkpointing ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        power = self.comp.power if "stretch" in self.comp else None
        return {"name": self.name, "rules": self.comp.name, "stretch_power": power, "last_step": self.last_step,
                "alignment": self.alignment, "horizon": self.horizon,  # adapt's σ follows from the alignment
                "peak_lr": self.peak_lr,  # release's η_peak per group (η(t) is the optimizer's own at each step)
                "sync_steps": self.sync_steps if "sync" in self.comp else None}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {"name": "none", "last_step": None}
        if state["name"] != self.name:
            raise TrainingError(
                f"the checkpoint was trained with compensation {state['name']!r}, this run asks for {self.name!r}: "
                "resume with the same compensation, or start a new run."
            )
        rules = state.get("rules")
        if rules is None and state["name"] == "auto":  # written before checkpoints recorded the rules
            rules = "lr+predict+spike"
        if rules is not None and rules != self.comp.name:  # ``auto`` resolved to other rules when the run started
            raise TrainingError(
                f"the checkpoint's compensation {state['name']!r} meant the rules {rules!r} when the run started, and "
                f"here it means {self.comp.name!r} (this version of fxreplay chose other rules for {state['name']!r}): "
                "resuming would change the algorithm mid-run. Finish the run with the fxreplay version that started it, "
                "or start a new run."
            )
        if "stretch" in self.comp:
            power = state.get("stretch_power") or 1.0  # checkpoints without it were written when the horizon was d+1
            if power != self.comp.power:
                raise TrainingError(
                    f"the checkpoint was trained with stretch's horizon (d+1)^{power:g}, and here {self.name!r} means "
                    f"(d+1)^{self.comp.power:g} (this version of fxreplay changed stretch's default power): resuming "
                    "would change the algorithm mid-run. Finish the run with the fxreplay version that started it, or "
                    "start a new run."
                )
        if "sync" in self.comp and state.get("sync_steps") != self.sync_steps:
            raise TrainingError(
                f"the checkpoint's synchronous start (sync) lasts {state.get('sync_steps')} iterations, and here "
                f"{self.sync_steps} (another momentum, or another version's default): resuming would change the algorithm "
                "mid-run. Resume with the optimizer settings (momentum) and fxreplay version the run started with, or start "
                "a new run (sync=N fixes the length whatever the momentum).")
        self.alignment = float(state.get("alignment", 0.0))
        self.horizon = state.get("horizon")
        peaks = state.get("peak_lr")  # a list per group; one number in checkpoints of release's first version
        self.peak_lr = None if peaks is None else [float(v) for v in (peaks if isinstance(peaks, (list, tuple)) else [peaks])]
        steps = state["last_step"]
        self.last_step = None if steps is None else [
            s.to(p.device) if isinstance(s, torch.Tensor) else None for s, p in zip(steps, self.params)
        ]


def describe(spec: str | Compensation | None) -> str:
    """A label suffix for tables and figures: ``""`` for none, else ``+rules``."""
    comp = parse(spec)
    return "" if comp.is_none else f"+{comp.name}"


def divergence_hint(workers: Sequence[Any], stages: int) -> str:
    """What a divergence message adds for a delayed method (FR, DDG) trained at ``stages`` > 1 without
    compensation: its gradients are up to K-1 iterations late, which lowers the largest stable learning rate
    far below BP's (``benchmarks/delay_stability.py``), and ``auto`` is the remedy. ``""`` otherwise."""
    delayed = [w for w in workers if "compensation" in getattr(w, "option_names", ())]
    stabilised = {"predict", "spike", "lr", "stretch", "shrink", "lookahead", "replayahead", "official"}
    if stages < 2 or not delayed or any(getattr(w, "compensator", None) is not None
                                        and set(w.compensator.comp.rules) & stabilised for w in delayed):
        return ""  # (sync alone: after its start the run is Algorithm 1, and the hint holds)
    return (f" ({delayed[0].method}'s gradients arrive up to {stages - 1} iterations late, which makes it diverge at "
            "learning rates BP trains at: try compensation=\"auto\" (--compensation auto), made to keep it stable there)")

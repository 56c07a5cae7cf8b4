"""Staleness compensation (fxreplay.methods.compensation) against a hand-written reference.

The reference is Algorithm 1 written from the text (as in test_methods.py) with heavy-ball
SGD written out by hand, and each rule written from its formula: nothing of the package's
compensation code is reused. Every rule: 6 steps, K = 3, float64, 1e-12.
"""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from fxreplay.errors import TrainingError
from fxreplay.executor import LocalExecutor
from fxreplay.methods.compensation import lr_multiplier, parse, spike_coefficients, stretch_coefficients
from test_methods import batches, mlp, split, weights

LR, MU, WD = 0.1, 0.9, 1e-3
loss_fn = nn.CrossEntropyLoss()


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MU, weight_decay=WD)


B1, B2, EPS = 0.9, 0.99, 1e-8


def adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=LR / 10, betas=(B1, B2), eps=EPS, weight_decay=WD)


def nesterov(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MU, weight_decay=WD, nesterov=True)


def reference(stages: list[nn.Module], data: list[tuple[torch.Tensor, torch.Tensor]], rules: set[str],
              beta: float = 0.5, power: float = 1.5, opt: str = "sgd", align: float = 1.0,
              decay_at: int | None = None) -> list[float]:
    """Algorithm 1 with heavy-ball SGD (``opt``: or Nesterov SGD, or Adam) by hand and each rule from its
    formula (stretch: horizon (d+1)^power; with Adam, β₁ = 1 − (1−β₁)/horizon at the same lr; adapt: the
    exponents of lr's factor and of stretch's horizon times σ = clip(1 − ā/align), ā the average of
    cos(−g, last step) at rate 1 − μ; release: those exponents times η(t)/η_peak). ``decay_at``: the learning
    rate is a tenth of itself from that iteration on (every stage's, as its scheduler steps each iteration)."""
    K = len(stages)
    params = [list(s.parameters()) for s in stages]
    velocity: list[list[torch.Tensor | None]] = [[None] * len(ps) for ps in params]
    second: list[list[torch.Tensor | None]] = [[None] * len(ps) for ps in params]  # Adam's v
    count = [0] * K
    average = [0.0] * K  # adapt's ā per stage
    previous: list[float | None] = [None] * K  # stretch's horizon at the stage's last update
    last: list[list[torch.Tensor] | None] = [None] * K
    memory: list[dict[int, torch.Tensor]] = [{} for _ in range(K)]
    delta: dict[tuple[int, int], torch.Tensor] = {}
    losses = []
    for t, (x, y) in enumerate(data):
        h = x
        for k in range(K):  # the play
            d = K - 1 - k
            # stages that send a δ down run one update ahead (replayahead: only the delayed ones, not the last)
            ahead = 1 if k > 0 and ("lookahead" in rules or ("replayahead" in rules and k < K - 1)) else 0
            horizon = (d + ahead if "predict" in rules else 0) if k < K - 1 else ahead  # the last: its training forward
            memory[k][t] = h
            with torch.no_grad():
                if horizon > 0 and last[k] is not None:
                    own = [p.clone() for p in params[k]]
                    for p, s in zip(params[k], last[k]):
                        p.copy_(p + horizon * s)
                    h = stages[k](h)
                    for p, w in zip(params[k], own):
                        p.copy_(w)
                else:
                    h = stages[k](h)
        losses.append(float(loss_fn(h, y)))
        sent = {}
        for k in range(K):  # replay, backward, update
            d = K - 1 - k
            b = t - d
            if b < 0:
                continue
            for p in params[k]:
                p.grad = None
            inp = memory[k].pop(b).clone().requires_grad_(True)
            own = [p.detach().clone() for p in params[k]]
            ahead = k > 0 and ("lookahead" in rules or ("replayahead" in rules and k < K - 1))
            if ahead and last[k] is not None:  # replay and backward at w + Δw
                with torch.no_grad():
                    for p, s in zip(params[k], last[k]):
                        p.add_(s)
            out = stages[k](inp)
            if k == K - 1:
                loss_fn(out, data[b][1]).backward()
            else:
                out.backward(delta[(k, b)])
            with torch.no_grad():
                for p, w in zip(params[k], own):
                    p.copy_(w)
            scale = 0.1 if decay_at is not None and t >= decay_at else 1.0  # η(t)/η_peak
            strength = scale if "release" in rules else 1.0
            if "adapt" in rules and d > 0 and last[k] is not None:
                g = [p.grad + WD * p.detach() for p in params[k]]
                if opt == "adam":  # Adam's metric: g/√v̂ with v̂ before this step
                    g = [x / ((sq / (1 - B2 ** count[k])).sqrt() + EPS) for x, sq in zip(g, second[k])]
                dot = -sum(float((x * s).sum()) for x, s in zip(g, last[k]))
                norm = (sum(float((x * x).sum()) for x in g) * sum(float((s * s).sum()) for s in last[k])) ** 0.5
                rate = 1 - (B1 if opt == "adam" else MU)
                average[k] = (1 - rate) * average[k] + rate * dot / norm
                strength *= min(max(1 - average[k] / align, 0.0), 1.0)
            horizon = (d + 1) ** (power * strength)
            mu, lr = (1 - (1 - MU) / horizon, scale * LR / horizon) if "stretch" in rules else (MU, scale * LR)
            ratio = horizon / previous[k] if previous[k] is not None and "stretch" in rules else 1.0  # v summed at s
            previous[k] = horizon
            a, c = (mu ** d, sum(mu ** i for i in range(d))) if "spike" in rules else (1.0, 0.0)
            m = (d + 1) ** -(strength * (1 - min(t / round(10 * (d + 1) / (1 - MU)), 1))) if "lr" in rules else 1.0
            steps = []
            count[k] += 1
            with torch.no_grad():
                for i, p in enumerate(params[k]):
                    g = p.grad + WD * p
                    if opt == "adam":
                        b1 = 1 - (1 - B1) / horizon if "stretch" in rules else B1
                        first = (1 - b1) * g if velocity[k][i] is None else b1 * velocity[k][i] + (1 - b1) * g
                        sq = (1 - B2) * g * g if second[k][i] is None else B2 * second[k][i] + (1 - B2) * g * g
                        velocity[k][i], second[k][i] = first, sq
                        unbiased = first / (1 - b1 ** count[k])
                        step = -(scale * LR / 10) * m * unbiased / ((sq / (1 - B2 ** count[k])).sqrt() + EPS)
                    else:
                        v = g.clone() if velocity[k][i] is None else mu * ratio * velocity[k][i] + g
                        velocity[k][i] = v
                        step = -lr * m * (g + mu * v) if opt == "nesterov" else -lr * m * (a * v + c * g)
                    p.add_(step)
                    steps.append(step)
            last[k] = steps
            sent[(k - 1, b)] = inp.grad * (beta if "shrink" in rules and k > 0 else 1.0)
        delta = sent
    return losses


@pytest.mark.parametrize("rules", ["predict", "spike", "lr", "shrink", "stretch", "predict+spike", "predict+spike+stretch",
                                   "lr+predict+shrink+spike+stretch", "predict+spike+stretch=1", "stretch=2", "lookahead",
                                   "lookahead+predict", "lookahead+lr+predict+stretch", "lookahead+lr+predict+spike+stretch",
                                   "adapt+lookahead+lr+predict+stretch", "adapt=0.3+lr", "adapt+spike+stretch=2",
                                   "replayahead", "lr+predict+replayahead+stretch"])
def test_fr_with_each_rule_equals_its_handwritten_reference(rules: str) -> None:
    data = batches(6)
    ref_stages = split(mlp(), 3)
    power = float(rules.partition("stretch=")[2].partition("+")[0] or 1.5)
    align = float(rules.partition("adapt=")[2].partition("+")[0] or 1.0)
    ref_losses = reference(ref_stages, data, {r.partition("=")[0] for r in rules.split("+")}, power=power, align=align)
    ex = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation=rules)
    losses = [ex.step(x, y) for x, y in data]
    assert losses == pytest.approx(ref_losses, abs=1e-12, rel=0)
    for a, b in zip(weights(ex.stages), weights(ref_stages)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("rules", ["release+lookahead+lr+predict+stretch", "release+lr", "release+stretch",
                                   "adapt+release+lookahead+lr+predict+stretch"])
@pytest.mark.parametrize("opt", ["sgd", "adam", "nesterov"])
def test_release_follows_the_lr_schedule_as_its_reference_does(rules: str, opt: str) -> None:
    """``release``: lr's and stretch's exponents times η(t)/η_peak. A step decay by 10 at iteration 3 (each stage's
    own MultiStepLR) against the reference with the same decay: the stages with gradients late at the decay get
    a stretch of (d+1)^(1.5 x 0.1), their velocity rescaled to it. Without the decay release changes nothing."""
    data = batches(7)
    names = {r.partition("=")[0] for r in rules.split("+")}
    optimizer = {"sgd": sgd, "adam": adam, "nesterov": nesterov}[opt]

    def run(decay: bool, comp: str = rules) -> tuple[list[float], LocalExecutor]:
        ex = LocalExecutor(split(mlp(), 3), "fr", optimizer=optimizer, loss_fn=loss_fn, compensation=comp)
        if decay:
            for w in ex.workers:
                w.scheduler = torch.optim.lr_scheduler.MultiStepLR(w.optimizer, milestones=[3], gamma=0.1)
        return [ex.step(x, y) for x, y in data], ex

    ref_stages = split(mlp(), 3)
    ref_losses = reference(ref_stages, data, names, opt=opt, decay_at=3)
    losses, ex = run(decay=True)
    assert losses == pytest.approx(ref_losses, abs=1e-12, rel=0)
    for a, b in zip(weights(ex.stages), weights(ref_stages)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    held = reference(split(mlp(), 3), data, names - {"release"}, opt=opt, decay_at=3)  # the stabilisers kept at full strength
    assert losses[5:] != pytest.approx(held[5:], abs=1e-6)
    without = "+".join(r for r in rules.split("+") if r != "release")
    assert run(decay=False)[0] == run(decay=False, comp=without)[0]  # no decay: bit for bit the rules without release
    assert ex.workers[0].compensator.state_dict()["peak_lr"] == pytest.approx([LR / 10 if opt == "adam" else LR])


def test_release_needs_a_stabiliser_and_resumes_exactly() -> None:
    with pytest.raises(TrainingError, match="'release' sets how strongly lr and stretch act"):
        LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="release+predict")
    data = batches(7)

    def executor() -> LocalExecutor:
        return LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="release+lr+stretch")

    def decay(ex: LocalExecutor) -> None:  # by hand, no scheduler: only the stages' peaks remember the rate before
        for w in ex.workers:
            for g in w.optimizer.param_groups:
                g["lr"] = LR / 10

    whole = executor()
    expected = []
    for t, (x, y) in enumerate(data):
        if t == 3:
            decay(whole)
        expected.append(whole.step(x, y))
    first = executor()
    for t, (x, y) in enumerate(data[:5]):
        if t == 3:
            decay(first)
        first.step(x, y)
    state = copy.deepcopy(first.state_dict())
    again = executor()
    decay(again)  # the resumed script sets the decayed rate again
    again.load_state_dict(copy.deepcopy(state))
    assert [again.step(x, y) for x, y in data[5:]] == expected[5:]  # bit for bit past the decay
    assert all(torch.equal(a, b) for a, b in zip(weights(again.stages), weights(whole.stages)))
    lost = executor()
    decay(lost)
    # without the peaks a stage takes its decayed rate for the peak: the stabilisers come back (the test can fail)
    fresh = copy.deepcopy(state)  # each executor loads its own copy (a loaded state may be aliased and stepped)
    lost.load_state_dict({**fresh, "workers": [{**w, "compensation": {**w["compensation"], "peak_lr": None}}
                                               for w in fresh["workers"]]})
    assert [lost.step(x, y) for x, y in data[5:]] != expected[5:]
    old = executor()  # release's first checkpoints held one peak per stage, a number: it holds for every group
    decay(old)
    fresh = copy.deepcopy(state)
    old.load_state_dict({**fresh, "workers": [{**w, "compensation": {**w["compensation"], "peak_lr": LR}}
                                              for w in fresh["workers"]]})
    assert [old.step(x, y) for x, y in data[5:]] == expected[5:]


def test_release_takes_the_group_that_decays_least() -> None:
    """Two parameter groups, one decayed by ten and one not: σ stays 1 (the stabilisers are the stage's)."""
    def two_groups(params: Any) -> torch.optim.Optimizer:
        params = list(params)
        return torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=LR, momentum=MU, weight_decay=WD)

    ex = LocalExecutor(split(mlp(), 3), "fr", optimizer=two_groups, loss_fn=loss_fn, compensation="release+stretch")
    for t, (x, y) in enumerate(batches(5)):
        if t == 3:  # after stage 0's first update (d = 2): it has seen its groups' rate before the decay
            ex.workers[0].optimizer.param_groups[0]["lr"] = LR / 10
        ex.step(x, y)
    comp = ex.workers[0].compensator
    assert comp.peak_lr == pytest.approx([LR, LR]) and comp.released == 1.0
    for g in ex.workers[0].optimizer.param_groups:
        g["lr"] = LR / 10
    ex.step(*batches(1)[0])
    assert comp.released == pytest.approx(0.1)


@pytest.mark.parametrize("rules", ["stretch", "predict+stretch", "stretch=2", "lr+predict+stretch=1",
                                   "adapt+lookahead+lr+predict+stretch"])
@pytest.mark.parametrize("opt", ["adam", "nesterov"])
def test_stretch_with_adam_or_nesterov_equals_its_handwritten_reference(rules: str, opt: str) -> None:
    """With Adam the horizon is β₁'s: β₁_k = 1 − (1−β₁)/(d_k+1)^p at the same lr (Adam's first moment is an
    average: every gradient's total step is lr·g/√v whatever β₁ is); with Nesterov SGD the momentum and lr
    are heavy-ball's μ_k and η/s_k. The optimizer's own hyper-parameters are left as they were."""
    data = batches(6)
    ref_stages = split(mlp(), 3)
    power = float(rules.partition("stretch=")[2].partition("+")[0] or 1.5)
    ref_losses = reference(ref_stages, data, {r.partition("=")[0] for r in rules.split("+")}, power=power, opt=opt)
    optimizer = adam if opt == "adam" else nesterov
    ex = LocalExecutor(split(mlp(), 3), "fr", optimizer=optimizer, loss_fn=loss_fn, compensation=rules)
    losses = [ex.step(x, y) for x, y in data]
    assert losses == pytest.approx(ref_losses, abs=1e-12, rel=0)
    for a, b in zip(weights(ex.stages), weights(ref_stages)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    own = {"betas": (B1, B2), "lr": LR / 10} if opt == "adam" else {"momentum": MU, "lr": LR}
    assert all({key: g[key] for key in own} == own for w in ex.workers for g in w.optimizer.param_groups)
    plain = reference(split(mlp(), 3), data, set(), opt=opt)
    assert losses[3:] != pytest.approx(plain[3:], abs=1e-6)  # the rule changes the run


def test_the_reference_without_rules_is_algorithm_1_and_so_is_none() -> None:
    data = batches(6)
    ref_stages = split(mlp(), 3)
    ref_losses = reference(ref_stages, data, set())
    plain = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn)
    none = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="none")
    for x, y in data:
        assert plain.step(x, y) == none.step(x, y)  # bit for bit
    assert all(torch.equal(a, b) for a, b in zip(weights(plain.stages), weights(none.stages)))
    for a, b in zip(weights(plain.stages), weights(ref_stages)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["fr", "ddg"])
@pytest.mark.parametrize("rules", ["predict", "spike", "lr", "shrink", "stretch", "auto"])
def test_one_stage_with_any_rule_is_bp_bit_for_bit(method: str, rules: str) -> None:
    data = batches(5)
    comp = LocalExecutor([mlp()], method, optimizer=sgd, loss_fn=loss_fn, compensation=rules)
    bp = LocalExecutor([mlp()], "bp", optimizer=sgd, loss_fn=loss_fn)
    for x, y in data:
        assert comp.step(x, y) == bp.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(weights(comp.stages), weights(bp.stages)))


def test_lookahead_is_bp_at_one_stage_and_acts_on_the_last_stage_otherwise() -> None:
    data = batches(5)
    comp = LocalExecutor([mlp()], "fr", optimizer=sgd, loss_fn=loss_fn, compensation="lookahead+predict")
    bp = LocalExecutor([mlp()], "bp", optimizer=sgd, loss_fn=loss_fn)
    for x, y in data:
        assert comp.step(x, y) == bp.step(x, y)  # stage 0 sends no δ down: nothing to look ahead for
    assert all(torch.equal(a, b) for a, b in zip(weights(comp.stages), weights(bp.stages)))
    ahead = LocalExecutor(split(mlp(), 2), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="lookahead")
    plain = LocalExecutor(split(mlp(), 2), "fr", optimizer=sgd, loss_fn=loss_fn)
    losses = [(ahead.step(x, y), plain.step(x, y)) for x, y in data]
    assert losses[0][0] == losses[0][1]  # the first forward: no update yet, nothing to look ahead with
    assert losses[1][0] != losses[1][1]  # the last stage updated at step 1: its training forward now runs at w + Δw


def test_replayahead_leaves_the_last_stage_at_its_own_weights() -> None:
    data = batches(6)
    for K in (1, 2):  # no delayed stage sends a δ down: nothing runs ahead (K = 1: BP; K = 2: predict alone)
        ahead = LocalExecutor(split(mlp(), K), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="predict+replayahead")
        plain = LocalExecutor(split(mlp(), K), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="predict")
        for x, y in data:
            assert ahead.step(x, y) == plain.step(x, y)
        assert all(torch.equal(a, b) for a, b in zip(weights(ahead.stages), weights(plain.stages)))
    middle = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="predict+replayahead")
    plain = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="predict")
    every = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="lookahead+predict")
    losses = [(middle.step(x, y), plain.step(x, y), every.step(x, y)) for x, y in data]
    assert losses[1][0] == losses[1][1] != losses[1][2]  # step 1: lookahead's last stage already runs at w + Δw
    assert losses[-1][0] != losses[-1][1]  # the middle stage's replay runs ahead: a different run
    assert [s.compensator.ahead for s in middle.workers] == [0, 1, 0]
    four = LocalExecutor(split(mlp(), 4), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="replayahead")
    assert [s.compensator.ahead for s in four.workers] == [0, 1, 1, 0]  # every middle stage, not only one
    with pytest.raises(TrainingError, match="both lookahead.*and replayahead"):
        parse("lookahead+replayahead")
    with pytest.raises(TrainingError, match="replayahead.*ddg has no replay"):
        LocalExecutor(split(mlp(), 3), "ddg", optimizer=sgd, loss_fn=loss_fn, compensation="replayahead")


def test_a_failure_inside_the_lookahead_leaves_every_weight_as_it_was() -> None:
    """The replay's weights are w + Δw from the replay to the end of the backward: an error in between
    (the backward of stage 1; the last stage's forward) must leave the stage holding its own weights, as
    before the step."""
    data = batches(5)
    ex = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="lookahead+predict")
    for x, y in data[:4]:
        ex.step(x, y)
    before = [w.clone() for w in weights(ex.stages)]
    worker = ex.workers[1]

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a backward that fails")

    worker.backprop = broken
    with pytest.raises(RuntimeError, match="fails"):
        ex.step(*data[4])
    assert all(torch.equal(a, b) for a, b in zip(weights(ex.stages), before))
    # the last stage's training forward runs at w + Δw too: a forward (here: its loss) that fails puts it back
    again = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="lookahead+predict")
    for x, y in data[:4]:
        again.step(x, y)
    before = [w.clone() for w in weights(again.stages)]
    again.workers[-1].graph_forward = broken
    with pytest.raises(RuntimeError, match="fails"):
        again.step(*data[4])
    assert all(torch.equal(a, b) for a, b in zip(weights(again.stages), before))


def test_ddg_with_prediction_takes_its_gradient_at_the_predicted_weights() -> None:
    """DDG + predict at K=2: stage 0's gradient of batch t is the gradient at w^t + Δw (its
    last step), the weights one update later; written out by hand for the first steps."""
    data = batches(5)
    ex = LocalExecutor(split(mlp(), 2), "ddg", optimizer=sgd, loss_fn=loss_fn, compensation="predict")
    ref = split(mlp(), 2)
    opts = [sgd(s.parameters()) for s in ref]
    last: list[torch.Tensor] | None = None
    pending: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]] = []  # stage 0's (input, output, snapshot)
    for t, (x, y) in enumerate(data):
        ex.step(x, y)
        names = [n for n, _ in ref[0].named_parameters()]
        live = list(ref[0].parameters())
        snap = [(p.detach() + s if last is not None else p.detach().clone()).requires_grad_(True) for p, s in zip(live, last or live)]
        h = torch.func.functional_call(ref[0], dict(zip(names, snap)), (x,))
        pending.append((x, h, snap))
        hin = h.detach().requires_grad_(True)
        opts[1].zero_grad()
        loss_fn(ref[1](hin), y).backward()
        opts[1].step()
        if t >= 1:
            _, out, used = pending.pop(0)
            out.backward(sent)
            before = [p.detach().clone() for p in live]
            for p, u in zip(live, used):
                p.grad = u.grad
            opts[0].step()
            last = [p.detach() - w for p, w in zip(live, before)]
        sent = hin.grad
    for a, b in zip(weights(ex.stages), weights(ref)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("rules", ["sync=3+lookahead+predict+stretch", "lookahead+lr+predict+stretch", "lr+predict+spike+stretch", "lookahead+lr+predict+spike+stretch", "adapt=0.5+lr+stretch",
                                   "sync=2+lookahead+lr+predict+stretch", "sync=6+lookahead+lr+predict+stretch"])
def test_resume_with_compensation_is_exact_and_a_changed_rule_is_refused(rules: str) -> None:
    data = batches(8)
    straight = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation=rules)
    for x, y in data:
        straight.step(x, y)
    first = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation=rules)
    for x, y in data[:4]:
        first.step(x, y)
    state = copy.deepcopy(first.job_state())
    second = LocalExecutor(split(mlp(1), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation=rules)
    second.load_job_state(state)
    for x, y in data[4:]:
        second.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(weights(straight.stages), weights(second.stages)))
    other = LocalExecutor(split(mlp(1), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="shrink")
    with pytest.raises(TrainingError, match="compensation"):
        other.load_job_state(copy.deepcopy(state))


def test_a_checkpoint_whose_auto_meant_other_rules_is_refused() -> None:
    """``auto`` is recorded with the rules it resolved to: a version whose ``auto`` means other
    rules refuses to resume the run rather than change its algorithm mid-run."""
    first = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="auto")
    for x, y in batches(3):
        first.step(x, y)
    state = copy.deepcopy(first.job_state())
    for worker in state["executor"]["workers"]:
        if worker.get("compensation"):
            worker["compensation"]["rules"] = "shrink+spike"  # what auto meant in another version
    again = LocalExecutor(split(mlp(1), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="auto")
    with pytest.raises(TrainingError, match="meant the rules 'shrink\\+spike'"):
        again.load_job_state(state)


def test_a_checkpoint_with_another_stretch_power_is_refused() -> None:
    """Checkpoints record stretch's power: one written under another power (or before the power was
    recorded, when the horizon was d+1) is refused, not resumed under a different rule."""
    first = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="auto")
    for x, y in batches(3):
        first.step(x, y)
    state = first.job_state()
    for change in ({"stretch_power": 1.0}, {"stretch_power": None}):
        old = copy.deepcopy(state)
        for worker in old["executor"]["workers"]:
            if worker.get("compensation"):
                worker["compensation"].update(change)
                if change["stretch_power"] is None:
                    del worker["compensation"]["stretch_power"]  # a checkpoint of the horizon d+1, before the record
        again = LocalExecutor(split(mlp(1), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="auto")
        with pytest.raises(TrainingError, match=r"horizon \(d\+1\)\^1, and here 'auto' means \(d\+1\)\^1.5"):
            again.load_job_state(old)
    same = LocalExecutor(split(mlp(1), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="auto")
    same.load_job_state(copy.deepcopy(state))  # its own power resumes


def test_stretch_takes_its_power_as_a_value() -> None:
    assert parse("stretch").power == 1.5 and parse("stretch").name == "stretch"
    assert parse("spike+stretch=1").name == "spike+stretch=1" and parse("stretch=2").power == 2.0
    assert parse("stretch=1.5").name == "stretch"
    for bad in ("stretch=0", "stretch=-1", "stretch=5", "stretch=x"):
        with pytest.raises(TrainingError, match="stretch's power"):
            parse(bad)
    with pytest.raises(TrainingError, match="only shrink=β, stretch=p, adapt=A and sync=T do"):
        parse("spike=2")
    assert parse("adapt=0.5+lr").alignment == 0.5 and parse("adapt=0.5+lr").name == "adapt=0.5+lr"
    assert parse("adapt=1+lr").name == "adapt+lr"
    for bad in ("adapt=0", "adapt=1.5", "adapt=x"):
        with pytest.raises(TrainingError, match="adapt's alignment A"):
            parse(bad)


def _lone_stage(rules: str, optimizer: Any) -> tuple[nn.Parameter, Any, torch.optim.Optimizer]:
    from fxreplay.methods.compensation import Compensator

    weight = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = optimizer([weight])
    return weight, Compensator(parse(rules), stage=0, delay=3, params=[weight], shared=[], optimizer=opt, method="fr"), opt


@pytest.mark.parametrize("optimizer", [sgd, adam, lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.5)])
def test_adapt_releases_the_stabilisers_along_a_consistent_descent_and_restores_them_in_an_overshoot(optimizer: Any) -> None:
    """ā averages cos(−g, Δw): a gradient that keeps its direction drives σ to 0 (lr and stretch off), one that
    turns against the last step drives it back to 1 (until the momentum has turned); the first step runs at
    σ = 1 (no Δw yet). AdamW's decay
    is decoupled: its gradient alone is compared with the step."""
    weight, comp, opt = _lone_stage("adapt+lr+stretch", optimizer)
    direction = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    seen = []
    for t in range(60):
        weight.grad = direction.clone()
        comp.step(opt, t)
        seen.append((comp.alignment, comp.strength))
    assert seen[0] == (0.0, 1.0)  # the first update: nothing to align with
    assert 0.0 < seen[1][1] < 1.0 and seen[-1][0] > 0.99 and seen[-1][1] < 0.01
    assert all(b[1] <= a[1] for a, b in zip(seen, seen[1:]))  # released step by step
    turned = []
    for t in range(60, 120):
        weight.grad = -direction.clone()  # the gradient now opposes the steps taken, until the momentum turns
        comp.step(opt, t)
        turned.append((comp.alignment, comp.strength))
    assert min(a for a, _ in turned) < 0 and max(s for _, s in turned) == 1.0
    assert comp.state_dict()["alignment"] == comp.alignment


@pytest.mark.parametrize("optimizer", [sgd, nesterov])
def test_adapt_resumes_exactly_while_its_strength_moves(optimizer: Any) -> None:
    """A steady gradient moves σ at every step: the average (σ follows from it) and the horizon the velocity
    was summed at both cross a checkpoint (a resume that forgot either steps differently)."""
    direction = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    weight, comp, opt = _lone_stage("adapt+lr+stretch", optimizer)
    for t in range(20):
        weight.grad = direction.clone()
        comp.step(opt, t)
        if t == 9:
            saved = copy.deepcopy((weight.detach().clone(), comp.state_dict(), opt.state_dict()))
    again, comp2, opt2 = _lone_stage("adapt+lr+stretch", optimizer)
    with torch.no_grad():
        again.copy_(saved[0])
    comp2.load_state_dict(saved[1])
    opt2.load_state_dict(saved[2])
    for t in range(10, 20):
        again.grad = direction.clone()
        comp2.step(opt2, t)
    assert torch.equal(again, weight) and comp2.alignment == comp.alignment and 0.0 < comp.strength < 1.0


def test_adapt_scales_the_lr_warm_up_and_the_stretched_horizon_by_the_strength() -> None:
    """At σ the stage steps as lr and stretch would with their exponents times σ: σ = 1 is the rules without
    adapt, σ = 0 plain SGD."""
    direction = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    runs = {}
    for rules in ("adapt+lr+stretch", "lr+stretch", None):  # None: plain SGD
        weight, comp, opt = _lone_stage(rules or "lr", sgd)
        path = []
        for t in range(40):
            weight.grad = direction.clone()
            comp.step(opt, t) if rules else opt.step()
            path.append(weight.detach().clone())
        runs[rules or "none"] = path
    first = lambda r: runs[r][0]  # noqa: E731
    torch.testing.assert_close(first("adapt+lr+stretch"), first("lr+stretch"), atol=1e-15, rtol=0)  # σ = 1 at first
    late = [(runs[r][-1] - runs[r][-2]).norm() for r in ("lr+stretch", "adapt+lr+stretch", "none")]
    assert late[0] < late[1] <= late[2] * (1 + 1e-9)  # released towards plain SGD's step


def test_bad_rules_and_unfit_optimizers_are_refused_clearly() -> None:
    with pytest.raises(TrainingError, match="unknown compensation rule 'predikt'"):
        parse("predikt")
    with pytest.raises(TrainingError, match="twice"):
        parse("spike+spike")
    with pytest.raises(TrainingError, match="β"):
        parse("shrink=2")
    assert parse("spike+predict").name == "predict+spike" and parse("auto").name == "auto"
    assert parse("shrink=0.3").beta == 0.3
    with pytest.raises(TrainingError, match="delayed gradients"):
        LocalExecutor(split(mlp(), 2), "bp", optimizer=sgd, loss_fn=loss_fn, compensation="predict")
    adam = lambda ps: torch.optim.Adam(ps, lr=1e-3)  # noqa: E731
    with pytest.raises(TrainingError, match="spike.*Adam"):
        LocalExecutor(split(mlp(), 2), "fr", optimizer=adam, loss_fn=loss_fn, compensation="spike")
    with pytest.raises(TrainingError, match="nesterov"):
        LocalExecutor(split(mlp(), 2), "fr", optimizer=nesterov, loss_fn=loss_fn, compensation="spike")
    rmsprop = lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9)  # noqa: E731
    with pytest.raises(TrainingError, match="stretch.*RMSprop.*Adam/AdamW"):
        LocalExecutor(split(mlp(), 2), "fr", optimizer=rmsprop, loss_fn=loss_fn, compensation="stretch")
    LocalExecutor(split(mlp(), 2), "fr", optimizer=adam, loss_fn=loss_fn, compensation="stretch")  # β₁'s horizon
    LocalExecutor(split(mlp(), 2), "fr", optimizer=nesterov, loss_fn=loss_fn, compensation="stretch")  # its μ and lr

    def half_nesterov(params: Any) -> torch.optim.Optimizer:  # two groups, one of them Nesterov
        params = list(params)
        return torch.optim.SGD([{"params": params[:1], "nesterov": True}, {"params": params[1:]}], lr=0.1, momentum=0.9)

    with pytest.raises(TrainingError, match="Nesterov momentum in every group"):
        LocalExecutor(split(mlp(), 2), "fr", optimizer=half_nesterov, loss_fn=loss_fn, compensation="stretch")
    plain = lambda ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    with pytest.raises(TrainingError, match="momentum 0"):
        LocalExecutor(split(mlp(), 2), "fr", optimizer=plain, loss_fn=loss_fn, compensation="stretch")
    def mixed(params: Any) -> torch.optim.Optimizer:  # two groups, two momenta
        params = list(params)
        return torch.optim.SGD([{"params": params[:1], "momentum": 0.5}, {"params": params[1:]}], lr=0.1, momentum=0.9)

    with pytest.raises(TrainingError, match="different ones"):
        LocalExecutor(split(mlp(), 2), "fr", optimizer=mixed, loss_fn=loss_fn, compensation="stretch")
    with pytest.raises(TrainingError, match="official.*stretch"):
        LocalExecutor(split(mlp(), 2), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="official+stretch")
    with pytest.raises(TrainingError, match="features-replay"):
        LocalExecutor(split(mlp(), 2), "ddg", optimizer=sgd, loss_fn=loss_fn, compensation="official")
    with pytest.raises(TrainingError, match="lookahead.*ddg has no replay"):
        LocalExecutor(split(mlp(), 2), "ddg", optimizer=sgd, loss_fn=loss_fn, compensation="lookahead+predict")
    LocalExecutor(split(mlp(), 2), "fr", optimizer=adam, loss_fn=loss_fn, compensation="predict+lr+shrink")  # any optimizer
    with pytest.raises(TrainingError, match="'adapt' sets how strongly lr and stretch act.*add lr or stretch"):
        LocalExecutor(split(mlp(), 2), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="adapt+predict")


def test_auto_is_chosen_for_the_optimizer_and_recorded_as_auto() -> None:
    from fxreplay.methods.compensation import AUTO, AUTO_DDG, AUTO_OTHER, resolve

    params = [nn.Parameter(torch.zeros(2))]
    heavy_ball = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    assert resolve(parse("auto"), heavy_ball).name == AUTO == "lookahead+predict+stretch+sync"
    assert resolve(parse("auto"), heavy_ball, "ddg").name == AUTO_DDG == "lr+predict+stretch"  # no replay, no sync
    nesterov_sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)
    assert resolve(parse("auto"), nesterov_sgd).name == AUTO
    damped = torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.5)  # stretch rewrites an undamped velocity
    assert resolve(parse("auto"), damped).name == AUTO_OTHER
    assert resolve(parse("auto"), torch.optim.AdamW(params, lr=1e-3)).name == AUTO
    assert resolve(parse("auto"), torch.optim.Adam(params, lr=1e-3)).name == AUTO
    assert resolve(parse("auto"), torch.optim.Adam(params, lr=1e-3), "ddg").name == "lr+predict+stretch"
    assert resolve(parse("auto"), torch.optim.RMSprop(params, lr=1e-3, momentum=0.9)).name == AUTO_OTHER == "lookahead+lr"
    assert resolve(parse("auto"), torch.optim.SGD(params, lr=0.1), "ddg").name == "lr"  # no momentum: no predict
    assert resolve(parse("auto"), torch.optim.SGD(params, lr=0.1)).name == AUTO_OTHER  # no momentum to stretch
    data = batches(6)
    auto = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="auto")
    same = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation=AUTO)
    for x, y in data:
        assert auto.step(x, y) == same.step(x, y)
    saved = auto.state_dict()["workers"][0]["compensation"]
    assert (saved["name"], saved["rules"]) == ("auto", AUTO)
    assert auto.compensation_rules == AUTO and LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn).compensation_rules == ""
    from fxreplay.methods.compensation import with_sync
    assert with_sync(AUTO, 1) == "lookahead+predict+stretch+sync=1" and with_sync("sync=40+lr", "N") == "sync=N+lr"
    assert with_sync("lr+predict", 5) == "lr+predict"  # no synchronous start: nothing to set
    adam = lambda ps: torch.optim.Adam(ps, lr=1e-2)  # noqa: E731
    trained = LocalExecutor(split(mlp(), 3), "fr", optimizer=adam, loss_fn=loss_fn, compensation="auto")
    for x, y in data:
        trained.step(x, y)  # auto adapts to Adam instead of refusing


def test_formulas() -> None:
    assert spike_coefficients(0.9, 0) == (1.0, 0.0)
    a, b = spike_coefficients(0.9, 3)
    assert a == pytest.approx(0.729) and b == pytest.approx(1 + 0.9 + 0.81)
    assert a + b * (1 - 0.9) == pytest.approx(1.0)  # total weight of a gradient unchanged: 1/(1-μ)
    assert lr_multiplier(0, 0, 0.9) == 1.0
    assert lr_multiplier(3, 0, 0.9) == pytest.approx(0.25)
    assert lr_multiplier(3, 400, 0.9) == 1.0 and 0.25 < lr_multiplier(3, 200, 0.9) < 1.0
    assert stretch_coefficients(0.9, 0) == (1.0, 0.9)
    scale, mu = stretch_coefficients(0.9, 3)  # the horizon (d+1)^1.5 = 8
    assert scale == 1 / 8 and mu == pytest.approx(1 - 0.1 / 8)
    assert scale / (1 - mu) == pytest.approx(1 / (1 - 0.9))  # a gradient's total step is unchanged: η/(1-μ)
    scale, mu = stretch_coefficients(0.9, 3, power=1)
    assert scale == 0.25 and mu == pytest.approx(0.975)
    assert stretch_coefficients(0.9, 0, power=3) == (1.0, 0.9)


# ----------------------------------------------------------- sync: a synchronous start
def _bp_then_fr(T: int, rules: str, steps: int, carry_last_step: bool = False) -> tuple[list[float], list[torch.Tensor]]:
    """The reference for ``sync=T+rules``: BP for T iterations, then a fresh FR pipeline with ``rules`` on the same
    weights and optimizer state (its warm-up and its lr warm-up start there); ``carry_last_step``: its compensators
    start from BP's last update (what predict and lookahead read)."""
    data = batches(steps)
    model = split(mlp(), 3)
    bp = LocalExecutor(model, "bp", optimizer=sgd, loss_fn=loss_fn)
    losses = []
    for x, y in data[:T]:
        before = weights(model)
        losses.append(bp.step(x, y))
    fr = LocalExecutor(model, "fr", optimizer=sgd, loss_fn=loss_fn, compensation=rules)
    after = weights(model)
    i = 0
    for wb, wf in zip(bp.workers, fr.workers):
        wf.optimizer.load_state_dict(wb.optimizer.state_dict())
        n = len(wf.params)
        if carry_last_step:
            wf.compensator.last_step = [a - b for a, b in zip(after[i:i + n], before[i:i + n])]
        i += n
    losses += [fr.step(x, y) for x, y in data[T:]]
    return losses, weights(model)


@pytest.mark.parametrize("rules,carry", [("", False), ("lr+stretch", False), ("lookahead+predict", True),
                                         ("lookahead+lr+predict+spike+stretch", True)])
def test_sync_is_bp_for_T_iterations_then_a_fresh_pipeline(rules: str, carry: bool) -> None:
    """Bit for bit: the other rules idle through the synchronous start (BP's step), the lr warm-up starts at T,
    stretch goes on from BP's velocity, and predict and lookahead read BP's last update."""
    T, steps = 4, 11
    spec = f"sync={T}" + (f"+{rules}" if rules else "")
    ex = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation=spec)
    losses = [ex.step(x, y) for x, y in batches(steps)]
    ref_losses, ref_weights = _bp_then_fr(T, rules or "none", steps, carry)
    assert losses == ref_losses
    assert all(torch.equal(a, b) for a, b in zip(weights(ex.stages), ref_weights))
    plain = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation=rules or None)
    plain_losses = [plain.step(x, y) for x, y in batches(steps)]
    assert plain_losses[1:T] != losses[1:T]  # the start is not the delayed pipeline's


def test_sigma_is_nan_while_the_pipeline_fills_after_sync() -> None:
    """From T to T + d_k − 1 stage k still holds the last synchronous gradient, which its update does not apply again:
    σ_k is NaN there, as in the warm-up at t = 0, and a number again once the stage applies a delayed gradient."""
    T = 3
    ex = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation=f"sync={T}")
    sigmas = [ex.sigma(x, y) for x, y in batches(T + 3)]
    for t, row in enumerate(sigmas):
        for k, value in enumerate(row):
            d = 2 - k
            filling = T <= t < T + d
            assert (value != value) == filling, (t, k, value)  # NaN exactly while filling
    assert sigmas[0] == pytest.approx([1.0, 1.0, 1.0])  # synchronous: BP's gradient


def test_sync_longer_than_the_run_is_bp_with_every_rule_idle() -> None:
    data = batches(6)
    ex = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn,
                       compensation="sync+lookahead+lr+predict+shrink+spike+stretch")
    bp = LocalExecutor(split(mlp(), 3), "bp", optimizer=sgd, loss_fn=loss_fn)
    assert ex.sync_steps == 300  # 10·K/(1−μ), K = 3, μ = 0.9
    for x, y in data:
        assert ex.step(x, y) == bp.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(weights(ex.stages), weights(bp.stages)))


def test_sync_is_bp_with_batchnorm_and_dropout_buffers_included() -> None:
    """The synchronous start's play updates BatchNorm's statistics once and its replay repeats the play's dropout
    mask: BP's forward, bit for bit, running statistics included."""
    def stages() -> list[nn.Module]:
        torch.manual_seed(0)
        return [nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3)),
                nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.2), nn.Tanh()), nn.Linear(8, 3)]

    a, b = stages(), stages()
    ex = LocalExecutor(a, "fr", optimizer=sgd, loss_fn=loss_fn, compensation="sync+lookahead+predict+stretch")
    bp = LocalExecutor(b, "bp", optimizer=sgd, loss_fn=loss_fn)
    for i, (x, y) in enumerate(batches(6)):
        torch.manual_seed(100 + i)
        first = ex.step(x.float(), y)
        torch.manual_seed(100 + i)
        assert first == bp.step(x.float(), y)
    assert all(torch.equal(p, q) for s, t in zip(a, b) for p, q in zip(s.state_dict().values(), t.state_dict().values()))


def test_sync_is_refused_where_it_cannot_apply_and_records_its_length() -> None:
    from fxreplay.methods.compensation import sync_steps

    assert sync_steps(4, 0.9) == 400 and sync_steps(8, 0.9) == 800 and sync_steps(2, 0.0) == 20
    assert parse("stretch+sync=40+predict").name == "predict+stretch+sync=40" and parse("sync").name == "sync"
    for bad in ("sync=-1", "sync=2.5", "sync=x", "sync=0"):
        with pytest.raises(TrainingError, match="sync's T"):
            parse(bad)
    with pytest.raises(TrainingError, match="'sync' runs features replay's first iterations"):
        LocalExecutor(split(mlp(), 3), "ddg", optimizer=sgd, loss_fn=loss_fn, compensation="sync+predict")
    with pytest.raises(TrainingError, match="official"):
        LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="official+sync")
    ex = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="sync+predict")
    for x, y in batches(3):
        ex.step(x, y)
    state = copy.deepcopy(ex.job_state())

    def slower(params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=LR, momentum=0.5, weight_decay=WD)

    other = LocalExecutor(split(mlp(1), 3), "fr", optimizer=slower, loss_fn=loss_fn, compensation="sync+predict")
    assert other.sync_steps == 60
    with pytest.raises(TrainingError, match="synchronous start"):
        other.load_job_state(state)


# ----------------------------------------------------------- tied weights, ranks, the CLI
@pytest.mark.parametrize("optimizer,rules", [(sgd, "lookahead+lr+predict+spike+stretch"), (adam, "lr+predict+stretch"),
                                             (nesterov, "lookahead+lr+predict+stretch")], ids=["sgd", "adam", "nesterov"])
def test_tied_copies_stay_identical_under_every_rule(optimizer: Any, rules: str) -> None:
    """The holders of a tied weight have different delays; its copies take the plain step
    in every holder and stay bit-identical, while the stage's own weights are compensated."""
    from test_shared import copies, small_data, tied_stages

    pipe = tied_stages()
    ex = LocalExecutor(pipe.stages, "fr", optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(), compensation=rules)
    plain = LocalExecutor(tied_stages().stages, "fr", optimizer=optimizer, loss_fn=nn.CrossEntropyLoss())
    (group,) = copies(pipe)
    for x, y in small_data(6):
        ex.step(x, y)
        plain.step(x, y)
        assert torch.equal(group[0], group[1])
    assert not all(torch.equal(a, b) for a, b in zip(weights(list(ex.stages)), weights(list(plain.stages))))


RULES = "lr+predict+shrink+spike+stretch"
CASES = {"fr": ("fr", sgd, "lookahead+" + RULES), "ddg": ("ddg", sgd, RULES),
         "fr, Adam": ("fr", adam, "lr+predict+shrink+stretch"),  # Adam: stretch runs the step at β₁_k
         "fr, adapt": ("fr", sgd, "adapt+lookahead+lr+predict+stretch"),  # adapt's state crosses the resume
         "fr, Nesterov, adapt": ("fr", nesterov, "adapt+lr+predict+stretch"),  # Nesterov's buffer rescaled
         "fr, sync before the resume": ("fr", sgd, "sync=2+lookahead+lr+predict+stretch"),  # the switch, then a resume
         "fr, sync just before the resume": ("fr", sgd, "sync=3+lookahead+lr+predict+stretch"),  # closed while filling
         "fr, sync across the resume": ("fr", sgd, "sync=5+lookahead+lr+predict+stretch")}  # resumed while synchronous


def _rank_compensated(K: int) -> dict[str, Any]:
    from fxreplay.executor import DistributedExecutor

    out: dict[str, Any] = {}
    data = batches(7)
    for case, (method, optimizer, rules) in CASES.items():
        ex = DistributedExecutor(split(mlp(), K), method, optimizer=optimizer, loss_fn=loss_fn, timeout=30.0,
                                 compensation=rules)
        for x, y in data[:4]:
            ex.step(x, y)
        state = ex.state_dict()
        ex.close()
        resumed = DistributedExecutor(split(mlp(1), K), method, optimizer=optimizer, loss_fn=loss_fn, timeout=30.0,
                                      compensation=rules)
        resumed.load_state_dict(state)
        losses = [resumed.step(x, y) for x, y in data[4:]]
        resumed.close()
        out[case] = (losses, {k: v.clone() for k, v in resumed.stages[resumed.rank].state_dict().items()})
    return out


def test_one_rank_per_stage_with_resume_equals_the_local_executor_bit_for_bit() -> None:
    from fxreplay.launch import run_distributed

    K = 3
    results = run_distributed(_rank_compensated, nproc=K, args=(K,), threads=1, timeout=60.0)
    torch.set_num_threads(1)
    for case, (method, optimizer, rules) in CASES.items():
        ex = LocalExecutor(split(mlp(), K), method, optimizer=optimizer, loss_fn=loss_fn, compensation=rules)
        losses = [ex.step(x, y) for x, y in batches(7)]
        assert results[K - 1][case][0] == losses[4:], case
        for k in range(K):
            assert all(torch.equal(results[k][case][1][n], v) for n, v in ex.stages[k].state_dict().items()), (case, k)


def test_config_cli_and_compare_carry_the_rule(tmp_path: Any) -> None:
    from fxreplay.compare import _pairs, run_config
    from fxreplay.config import Config, apply_overrides
    from fxreplay.errors import ConfigError
    from fxreplay.runlog import label

    cfg = apply_overrides(Config(), {"train.compensation": "auto"})
    assert cfg.train.compensation == "auto"
    with pytest.raises(ConfigError, match="train.compensation"):
        apply_overrides(Config(), {"train.method": "bp", "train.compensation": "auto"})
    with pytest.raises(ConfigError, match="train.compensation"):
        apply_overrides(Config(), {"train.compensation": "magic"})
    pairs = _pairs(["bp", "fr+auto", "fr", "ddg+spike+predict"], [4])
    assert pairs == [("bp", 4), ("ddg+predict+spike", 4), ("fr", 4), ("fr+auto", 4)]
    run = run_config(Config(), "fr+predict+spike", 4, tmp_path)
    assert (run.train.method, run.train.compensation) == ("fr", "predict+spike")
    assert run.train.out.endswith("fr+predict+spike-K4")
    assert label("fr+predict+spike") == "FR+predict+spike"
    with pytest.raises(ConfigError, match="bp"):
        _pairs(["bp+auto"], [2])


def test_cli_trains_with_a_rule_and_a_resume_cannot_change_it(tmp_path: Any) -> None:
    import yaml
    from clitools import assert_user_error, run_cli

    out = tmp_path / "run"
    result = run_cli("train", "--compensation", "auto", "--K", "3", "--max-steps", "4", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["compensation"] == "auto"
    assert_user_error(run_cli("train", "--resume", str(out), "--compensation", "none"), "compensation")
    again = run_cli("train", "--resume", str(out), "--max-steps", "6")
    assert again.exit_code == 0, again.output
    assert_user_error(run_cli("train", "--method", "bp", "--compensation", "auto", "--out", str(tmp_path / "bp")),
                      "train.compensation")


def test_a_run_says_when_its_start_is_synchronous_and_when_all_of_it_is(tmp_path: Any) -> None:
    """``sync`` (in FR's ``auto``) trains its first T iterations at BP's speed: a run says so at its start, says when
    it is shorter than T (all of it BP's computation) with the rules to shorten the start, and says nothing once past
    T or without ``sync``."""
    from clitools import run_cli

    def note(*args: str) -> str:
        result = run_cli("train", "--K", "3", *args)
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    text = note("--compensation", "auto", "--max-steps", "4", "--out", str(tmp_path / "auto"))
    assert "iterations 1-300 train synchronously" in text  # 10·K/(1-μ), K = 3, μ = 0.9
    assert "This run has 4 iterations, all of them synchronous" in text
    assert "--compensation lookahead+predict+stretch+sync=N" in text
    text = note("--compensation", "sync=3+lookahead", "--max-steps", "5", "--out", str(tmp_path / "short"))
    assert "iterations 1-3 train synchronously" in text and "delayed pipeline from iteration 4" in text
    assert "all of them synchronous" not in text
    assert "synchronously" not in note("--resume", str(tmp_path / "short"), "--max-steps", "7")  # past T
    text = note("--resume", str(tmp_path / "auto"), "--max-steps", "6")  # still inside T: from where it resumes
    assert "iterations 5-300 train synchronously" in text and "This run has 6 iterations" in text
    assert "--compensation" not in text  # a resume cannot change its compensation
    assert "synchronously" not in note("--compensation", "lookahead+lr+predict+stretch", "--max-steps", "2",
                                       "--out", str(tmp_path / "delayed"))


# ----------------------------------------------------------- the analysis behind auto
def test_the_analysis_behind_release(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/delay_stability.py --release R: a direction at the edge of auto's stability before a decay by ten
    is still stable after it with the exponents times R (margin > 1), and the margin shrinks with the delay; the
    released limit lies between the rules' without the stretch and with the full one."""
    from benchtools import benchmark

    module = benchmark("delay_stability")
    module.release_table(0.9, [1, 3, 7], 0.1)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and line[2].isdigit()]
    margins = {int(r[0]): float(r[4]) for r in rows}
    assert margins[1] > margins[3] > margins[7] > 1.0
    full = module.largest_stable(0.9, 7, predict=True, stretch=True, lookahead=True)
    bare = module.largest_stable(0.9, 7, predict=True, lookahead=True)
    released = module.largest_stable(0.9, 7, predict=True, stretch=True, lookahead=True, power=0.15)
    assert float(rows[2][1]) == pytest.approx(full, abs=5e-4) and float(rows[2][3]) == pytest.approx(released, abs=5e-4)
    assert bare < released < full


def test_the_delayed_heavy_ball_analysis_behind_stretch() -> None:
    """benchmarks/delay_stability.py: BP's limit is 2(1+μ); a delay shrinks it (momentum makes it
    worse than for plain SGD); predict+spike helps; stretch helps further at every delay."""
    from benchtools import benchmark

    module = benchmark("delay_stability")
    limit = module.largest_stable
    assert limit(0.9, 0) == pytest.approx(3.8, rel=0.05)
    assert limit(0.0, 1) == pytest.approx(1.0, rel=0.05)  # plain SGD, one step late: x' = x - a·x_{t-1}
    assert limit(0.9, 1) < 0.15 < limit(0.9, 1, predict=True, spike=True)
    for d in (1, 2, 3):
        assert limit(0.9, d) < limit(0.9, d, predict=True, spike=True) < limit(0.9, d, predict=True, spike=True, stretch=True)
    assert module.spectral_radius(0.01, 0.9, 3, stretch=True, power=1) < 1 < module.spectral_radius(0.3, 0.9, 3, stretch=True, power=1)
    # the last stage (d = 0) under lookahead: its own gradient at w − η·v, stable only to 2(1+μ)/3, a third of BP's
    assert limit(0.9, 0, predict=True, lookahead=True) == pytest.approx(limit(0.9, 0) / 3, rel=0.02)
    assert limit(0.9, 0, lookahead=True) == pytest.approx(limit(0.9, 0) / 3, rel=0.02)  # with predict or without
    for d in (1, 3, 7):  # a longer horizon is stable further at every delay: (d+1)^2 near 1 at every delay
        by_power = [limit(0.9, d, predict=True, spike=True, stretch=True, power=p) for p in (1, 1.5, 2)]
        assert by_power == sorted(by_power) and by_power[0] < 0.7 and 0.8 < by_power[2] < 1.5
    for d in (1, 3, 7):  # auto after its warm-up: lookahead (a prediction one update further) widens predict+stretch's range
        plain = limit(0.9, d, predict=True, stretch=True)
        ahead = limit(0.9, d, predict=True, stretch=True, lookahead=True)
        assert limit(0.9, d) < plain < ahead < limit(0.9, d, predict=True, spike=True, stretch=True)
    assert module.spectral_radius(0.3, 0.9, 3, predict=True, stretch=True) > 1 > module.spectral_radius(
        0.3, 0.9, 3, predict=True, stretch=True, lookahead=True)

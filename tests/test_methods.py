"""Each method against an independent reference: BP against the unsplit model, FR against a
hand-written Algorithm 1, DDG against a hand-written delayed-gradient loop, DNI against BP
with an oracle synthesizer; plus FR's pitfalls (warm-up, BatchNorm, dropout, tuples)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

from fxreplay.errors import DivergenceError, TrainingError
from fxreplay.executor import LocalExecutor
from fxreplay.methods import build_method, one_process_names
from methodtools import method_options

LR, MOMENTUM = 0.1, 0.9


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def mlp(seed: int = 0, widths: tuple[int, ...] = (4, 6, 5, 3)) -> nn.Sequential:
    """Linear+Tanh layers in float64: exact enough to compare to 1e-12."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).double()


def split(model: nn.Sequential, K: int) -> list[nn.Module]:
    """K stages of consecutive (Linear, Tanh) pairs; the last stage gets the rest."""
    n = len(model)
    bounds = [min(2 * k, n) for k in range(K)] + [n]
    return [model[bounds[k]:bounds[k + 1]] for k in range(K)]


def batches(n: int, seed: int = 1, width: int = 4, classes: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, width, generator=g, dtype=torch.float64), torch.randint(0, classes, (8,), generator=g)) for _ in range(n)]


def weights(modules: list[nn.Module]) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.parameters()]


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 1e-12) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


loss_fn = nn.CrossEntropyLoss()


# ---------------------------------------------------------------------------- BP
def test_bp_through_stages_equals_bp_on_the_unsplit_model() -> None:
    data = batches(5)
    whole = mlp()
    opt = sgd(whole.parameters())
    for x, y in data:
        opt.zero_grad()
        loss_fn(whole(x), y).backward()
        opt.step()
    ex = LocalExecutor(split(mlp(), 3), "bp", optimizer=sgd, loss_fn=loss_fn)
    for x, y in data:
        ex.step(x, y)
    assert_close(weights(ex.stages), weights([whole]), atol=1e-6)
    assert_close(weights(ex.stages), weights([whole]))  # float64: in fact to 1e-12


# ---------------------------------------------------------------------------- FR
def algorithm1(stages: list[nn.Module], data: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """Algorithm 1 of the paper, written straight from the text (0-based k, module k+1)."""
    K = len(stages)
    opts = [sgd(s.parameters()) for s in stages]
    memory: list[dict[int, torch.Tensor]] = [{} for _ in range(K)]
    delta: dict[tuple[int, int], torch.Tensor] = {}  # (receiving module, batch) -> δ sent at t-1
    losses = []
    for t, (x, y) in enumerate(data):
        h = x
        for k in range(K):                      # lines 4-8: play
            memory[k][t] = h                    # line 5
            with torch.no_grad():
                h = stages[k](h)                # line 6
        losses.append(float(loss_fn(h, y)))     # line 9
        sent = {}
        for k in range(K):                      # lines 10-15
            b = t + (k + 1) - K
            if b < 0:                           # nothing to replay yet
                continue
            for p in stages[k].parameters():
                p.grad = None
            inp = memory[k].pop(b).clone().requires_grad_(True)
            out = stages[k](inp)                # line 11: replay with w^t
            if k == K - 1:
                loss_fn(out, data[b][1]).backward()
            else:
                out.backward(delta[(k, b)])     # line 12, eq. (7)
            opts[k].step()                      # line 13
            sent[(k - 1, b)] = inp.grad         # line 14
        delta = sent
    return losses


def test_fr_equals_handwritten_algorithm_1() -> None:
    data = batches(8)
    ref_stages = split(mlp(), 3)
    ref_losses = algorithm1(ref_stages, data)
    ex = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn)
    losses = [ex.step(x, y) for x, y in data]
    assert losses == pytest.approx(ref_losses, abs=1e-12)
    assert_close(weights(ex.stages), weights(ref_stages))


def test_fr_with_one_stage_is_bp_step_for_step() -> None:
    data = batches(6)
    fr = LocalExecutor([mlp()], "fr", optimizer=sgd, loss_fn=loss_fn)
    bp = LocalExecutor([mlp()], "bp", optimizer=sgd, loss_fn=loss_fn)
    for x, y in data:
        assert fr.step(x, y) == bp.step(x, y)
        assert all(torch.equal(a, b) for a, b in zip(weights(fr.stages), weights(bp.stages)))


def test_fr_warm_up_leaves_gradients_none_and_skips_the_optimizer() -> None:
    # Weight decay: an optimizer step during warm-up would move the weights even with zero
    # gradients, so "weights unchanged" below really checks that the step is skipped.
    wd = lambda p: torch.optim.SGD(p, lr=LR, momentum=MOMENTUM, weight_decay=0.1)  # noqa: E731
    ex = LocalExecutor(split(mlp(), 3), "fr", optimizer=wd, loss_fn=loss_fn)
    data = batches(3)
    expected_ready = [[False, False, True], [False, True, True], [True, True, True]]
    for (x, y), ready in zip(data, expected_ready):
        before = [weights([s]) for s in ex.stages]
        ex.step(x, y)
        for stage, opt, is_ready, was in zip(ex.stages, ex.optimizers, ready, before):
            grads = [p.grad for p in stage.parameters()]
            assert all(g is not None for g in grads) if is_ready else all(g is None for g in grads)
            assert bool(opt.state) == is_ready  # no momentum buffer before the first real step
            moved = [not torch.equal(a, b) for a, b in zip(was, weights([stage]))]
            assert all(moved) if is_ready else not any(moved)  # stage k first moves at t = d_k


def test_fr_history_has_K_minus_k_entries_after_the_play() -> None:
    ex = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn)
    for x, y in batches(5):
        ex.step(x, y)
    # Between iterations stage k keeps d_k = K-1-k inputs (the play adds the K-k-th).
    assert [len(w.history) for w in ex.workers] == [2, 1, 0]
    assert [b for b, _, _ in ex.workers[0].history] == [3, 4]


def bn_dropout_stages(seed: int = 0, p: float = 0.3) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [
        nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(p)),
        nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(p)),
        nn.Sequential(nn.Linear(8, 3)),
    ]


@pytest.mark.parametrize("method", sorted(one_process_names()))
def test_batchnorm_running_stats_advance_once_per_step(method: str) -> None:
    stages = bn_dropout_stages()
    ex = LocalExecutor(stages, method, optimizer=sgd, loss_fn=nn.CrossEntropyLoss(), **method_options(method))
    data = batches(5, width=4)
    for i, (x, y) in enumerate(data, 1):
        ex.step(x.float(), y)
        counts = [int(m.num_batches_tracked) for s in stages for m in s.modules() if isinstance(m, nn.BatchNorm1d)]
        assert counts == [i, i]


def test_fr_running_stats_come_from_the_play_only() -> None:
    # lr=0: the weights never move, so the plays see exactly what a plain forward sees.
    stages = bn_dropout_stages(p=0.0)
    twin = copy.deepcopy(stages)
    ex = LocalExecutor(stages, "fr", optimizer=lambda p: torch.optim.SGD(p, lr=0.0), loss_fn=nn.CrossEntropyLoss())
    for x, y in batches(4):
        ex.step(x.float(), y)
        with torch.no_grad():
            h = x.float()
            for s in twin:
                h = s(h)
    for a, b in zip(stages, twin):
        for ba, bb in zip(a.buffers(), b.buffers()):
            assert torch.equal(ba, bb)


def test_fr_replayed_dropout_mask_equals_the_played_one() -> None:
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5)), nn.Linear(16, 3)]
    seen: list[torch.Tensor] = []
    stages[0].register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    ex = LocalExecutor(stages, "fr", optimizer=lambda p: torch.optim.SGD(p, lr=0.0), loss_fn=nn.CrossEntropyLoss())
    for x, y in batches(4):
        ex.step(x.float(), y)
    # Forwards of stage 0: play 0 | play 1, replay 0 | play 2, replay 1 | play 3, replay 2
    plays, replays = [seen[0], seen[1], seen[3], seen[5]], [seen[2], seen[4], seen[6]]
    assert (plays[0] == 0).any()  # dropout is really on
    for played, replayed in zip(plays, replays):
        assert torch.equal(played, replayed)
    assert not torch.equal(plays[0], plays[1])


def test_fr_replay_normalises_with_the_replayed_batchs_own_statistics() -> None:
    # DESIGN: the replay leaves the running buffers alone "while the replay still uses the
    # replayed batch's own statistics". lr=0: the replay must reproduce the play exactly;
    # a replay in eval mode (running stats) would not.
    stages = bn_dropout_stages(p=0.0)
    seen: list[torch.Tensor] = []
    stages[0].register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    ex = LocalExecutor(stages, "fr", optimizer=lambda p: torch.optim.SGD(p, lr=0.0), loss_fn=nn.CrossEntropyLoss())
    for x, y in batches(5):
        ex.step(x.float(), y)
    # K=3, stage 0 (delay 2): p0 | p1 | p2 r0 | p3 r1 | p4 r2
    assert len(seen) == 8
    plays, replays = [seen[0], seen[1], seen[2]], [seen[3], seen[5], seen[7]]
    for played, replayed in zip(plays, replays):
        assert torch.equal(played, replayed)
    # and the gradient that reaches stage 0 is that of the train-mode forward
    x0 = batches(1)[0][0].float()
    assert not torch.allclose(stages[0].eval()(x0), plays[0], atol=1e-3)


def test_fr_replay_does_not_perturb_the_global_rng_stream() -> None:
    def run(method: str) -> torch.Tensor:
        torch.manual_seed(0)
        stages = bn_dropout_stages()
        ex = LocalExecutor(stages, method, optimizer=sgd, loss_fn=nn.CrossEntropyLoss())
        for x, y in batches(4):
            ex.step(x.float(), y)
        return torch.rand(3)

    assert torch.equal(run("fr"), run("bp"))


class _Split(nn.Module):
    """Stage 0 of the tuple toy: returns (main, skip, width), an int crossing the cut."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return torch.tanh(self.a(x)), self.b(x), 5


class _Join(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Linear(6, 3)

    def forward(self, main: torch.Tensor, skip: torch.Tensor, width: int) -> torch.Tensor:
        assert isinstance(width, int)
        return self.c(main + skip[:, :width].sum(1, keepdim=True))


@pytest.mark.parametrize("method", sorted(one_process_names()))
def test_tuple_boundary_with_an_int(method: str) -> None:
    torch.manual_seed(0)
    stages = [_Split().double(), _Join().double()]
    before = weights(stages)
    ex = LocalExecutor(stages, method, optimizer=sgd, loss_fn=loss_fn,
                       **({"synth_optimizer": lambda p: torch.optim.Adam(p, lr=1e-2)} if "dni" in method else {}),
                       **method_options(method))
    for x, y in batches(4):
        ex.step(x, y)
    after = weights(stages)
    # Both tensors crossing the cut carried a gradient down to their own layer.
    assert not torch.equal(before[0], after[0]) and not torch.equal(before[2], after[2])
    if method in ("fr", "ddg"):
        assert len(ex._mailbox) == 1  # one δ in flight: a 3-tuple with None for the int
        (delta,) = ex._mailbox.values()
        assert delta[2] is None and delta[0].shape == delta[1].shape == (8, 6)


def test_tuple_boundary_bp_equals_unsplit() -> None:
    torch.manual_seed(0)
    stages = [_Split().double(), _Join().double()]
    whole = copy.deepcopy(stages)
    opt = sgd([p for s in whole for p in s.parameters()])
    ex = LocalExecutor(stages, "bp", optimizer=sgd, loss_fn=loss_fn)
    for x, y in batches(4):
        ex.step(x, y)
        opt.zero_grad()
        loss_fn(whole[1](*whole[0](x)), y).backward()
        opt.step()
    assert_close(weights(stages), weights(whole))


# ---------------------------------------------------------------------------- DDG
def delayed_gradients(stages: list[nn.Module], data: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """DDG written from the ICML 2018 paper: module k uses at t the δ of batch t-d_k and the
    weights that batch saw in its forward (recomputed here from a copy, not a stored graph)."""
    K = len(stages)
    opts = [sgd(s.parameters()) for s in stages]
    kept: dict[tuple[int, int], tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
    delta: dict[tuple[int, int], torch.Tensor] = {}
    losses = []
    for t, (x, y) in enumerate(data):
        h = x
        for k in range(K):
            kept[(k, t)] = (h, {n: p.detach().clone() for n, p in stages[k].named_parameters()})
            with torch.no_grad():
                h = stages[k](h)
        losses.append(float(loss_fn(h, y)))
        sent = {}
        for k in range(K):
            b = t - (K - 1 - k)
            if b < 0:
                continue
            inp, old = kept.pop((k, b))
            old = {n: w.requires_grad_(True) for n, w in old.items()}
            inp = inp.clone().requires_grad_(True)
            out = torch.func.functional_call(stages[k], old, (inp,))
            if k == K - 1:
                loss_fn(out, data[b][1]).backward()
            else:
                out.backward(delta[(k, b)])
            for n, p in stages[k].named_parameters():
                p.grad = old[n].grad  # the gradient at w^{t-d}, applied to w^t
            opts[k].step()
            sent[(k - 1, b)] = inp.grad
        delta = sent
    return losses


def test_ddg_equals_handwritten_delayed_gradients() -> None:
    data = batches(8)
    ref_stages = split(mlp(), 3)
    ref_losses = delayed_gradients(ref_stages, data)
    ex = LocalExecutor(split(mlp(), 3), "ddg", optimizer=sgd, loss_fn=loss_fn)
    losses = [ex.step(x, y) for x, y in data]
    assert losses == pytest.approx(ref_losses, abs=1e-12)
    assert_close(weights(ex.stages), weights(ref_stages))
    # DDG and FR differ only in where the gradient is taken: old weights vs current ones.
    fr = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn)
    for x, y in data:
        fr.step(x, y)
    assert not all(torch.equal(a, b) for a, b in zip(weights(fr.stages), weights(ex.stages)))


def test_ddg_keeps_K_minus_k_graphs_after_the_forward() -> None:
    ex = LocalExecutor(split(mlp(), 3), "ddg", optimizer=sgd, loss_fn=loss_fn)
    for x, y in batches(4):
        ex.step(x, y)
    assert [len(getattr(w, "graphs", ())) for w in ex.workers] == [2, 1, 0]


# ---------------------------------------------------------------------------- DNI
class _Oracle(nn.Module):
    """A perfect synthesizer: the true δ of the current batch through the stages above."""

    def __init__(self, above: list[nn.Module], target: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.above, self.target = above, target

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            leaf = h.detach().requires_grad_(True)
            out = leaf
            for s in self.above:
                out = s(out)
            (grad,) = torch.autograd.grad(loss_fn(out, self.target["y"]), leaf)
        return grad


def test_dni_with_a_perfect_synthesizer_is_bp() -> None:
    data = batches(5)
    stages = split(mlp(), 3)
    target: dict[str, torch.Tensor] = {}
    oracle: Callable[[int, torch.Tensor], nn.Module] = lambda k, example: _Oracle(stages[k + 1:], target)
    dni = LocalExecutor(stages, "dni", optimizer=sgd, loss_fn=loss_fn, synthesizer=oracle)
    bp = LocalExecutor(split(mlp(), 3), "bp", optimizer=sgd, loss_fn=loss_fn)
    for x, y in data:
        target["y"] = y
        assert dni.step(x, y) == pytest.approx(bp.step(x, y), abs=1e-12)
    assert_close(weights(dni.stages), weights(bp.stages))
    assert dni.workers[0].last_synth_loss == pytest.approx(0.0, abs=1e-20)


def test_dni_synthesizer_learns_the_true_gradient() -> None:
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(4, 16), nn.Tanh()), nn.Linear(16, 3)]
    # Stage weights frozen (lr 0): the true δ has a fixed distribution to learn.
    ex = LocalExecutor(stages, "dni", optimizer=lambda p: torch.optim.SGD(p, lr=0.0), loss_fn=nn.CrossEntropyLoss(),
                       synth_optimizer=lambda p: torch.optim.Adam(p, lr=3e-3), synth_hidden=32)
    # Labels a function of the input (a fixed teacher): the true δ is a function of h that
    # the synthesizer can learn (with random labels most of it would be noise it cannot see).
    teacher = torch.randn(4, 3, generator=torch.Generator().manual_seed(4))
    losses = []
    for x, _ in batches(50, width=4):
        ex.step(x.float(), (x.float() @ teacher).argmax(1))
        losses.append(ex.workers[0].last_synth_loss)
    # MSE in units of the true δ's RMS: a zero prediction scores 1
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert 0.8 < first < 1.2 and last < 0.5 * first, (first, last)


def test_dni_conv_synthesizer_starts_at_zero() -> None:
    from fxreplay.methods.synthesizer import ConvSynthesizer, make_synthesizer

    s = make_synthesizer(torch.zeros(2, 3, 5, 5))
    assert isinstance(s, ConvSynthesizer)
    assert torch.equal(s(torch.randn(2, 3, 5, 5)), torch.zeros(2, 3, 5, 5))


# ---------------------------------------------------------------------------- options, errors
def test_unknown_options_and_methods_are_rejected() -> None:
    stages = split(mlp(), 2)
    with pytest.raises(TrainingError, match=r"unknown option\(s\) synthesizer for method 'fr'"):
        build_method("fr", stages, sgd, loss_fn, synthesizer="mlp")
    with pytest.raises(TrainingError, match="synth_optimizer for method 'bp'"):
        LocalExecutor(stages, "bp", optimizer=sgd, loss_fn=loss_fn, synth_optimizer=sgd)
    with pytest.raises(TrainingError, match="unknown method 'pipedream'"):
        build_method("pipedream", stages, sgd, loss_fn)


@pytest.mark.parametrize("method", sorted(one_process_names()))
def test_divergence_raises_before_any_update(method: str) -> None:
    stages = split(mlp(), 3)
    ex = LocalExecutor(stages, method, optimizer=sgd, loss_fn=loss_fn, **method_options(method))
    data = batches(4)
    for x, y in data[:3]:
        ex.step(x, y)
    before = weights(stages)
    x, y = data[3]
    with pytest.raises(DivergenceError, match=rf"{method} diverged at step 4: .*No update of step 4.*last checkpoint is kept.*lower the learning rate") as info:
        ex.step(torch.full_like(x, float("nan")), y)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(stages)))
    delayed = method in ("fr", "ddg")  # only the methods with delayed gradients point to their remedy
    assert (f"{method}'s gradients arrive up to 2 iterations late" in str(info.value)) == delayed
    assert ('compensation="auto"' in str(info.value)) == delayed


@pytest.mark.parametrize("method", ["fr", "ddg"])
def test_a_compensated_divergence_does_not_point_to_compensation(method: str) -> None:
    ex = LocalExecutor(split(mlp(), 3), method, optimizer=sgd, loss_fn=loss_fn, compensation="auto")
    x, y = batches(1)[0]
    with pytest.raises(DivergenceError, match=rf"{method} diverged at step 1") as info:
        ex.step(torch.full_like(x, float("nan")), y)
    assert "compensation" not in str(info.value)


def test_a_divergence_after_a_synchronous_start_alone_points_to_compensation() -> None:
    """compensation sync alone: after its start the run is Algorithm 1, and the remedy still applies."""
    ex = LocalExecutor(split(mlp(), 3), "fr", optimizer=sgd, loss_fn=loss_fn, compensation="sync=1")
    data = batches(3)
    for x, y in data[:2]:
        ex.step(x, y)
    with pytest.raises(DivergenceError, match="arrive up to 2 iterations late.*compensation=\"auto\""):
        ex.step(torch.full_like(data[2][0], float("nan")), data[2][1])


def test_an_infinite_loss_is_a_divergence_too() -> None:
    ex = LocalExecutor(split(mlp(), 2), "bp", optimizer=sgd, loss_fn=lambda out, y: out.sum() * float("inf"))
    before = weights(ex.stages)
    x, y = batches(1)[0]
    with pytest.raises(DivergenceError, match=r"bp diverged at step 1: the loss is (-)?inf"):
        ex.step(x, y)
    assert_close(weights(ex.stages), before, atol=0)


def test_dni_divergence_leaves_the_synthesizers_untouched() -> None:
    stages = split(mlp(), 3)
    ex = LocalExecutor(stages, "dni", optimizer=sgd, loss_fn=loss_fn,
                       synth_optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    data = batches(4)
    for x, y in data[:3]:
        ex.step(x, y)
    synths = lambda: [p.detach().clone() for w in ex.workers for m in w.synths.values() for p in m.parameters()]  # noqa: E731
    before = synths()
    assert before
    x, y = data[3]
    with pytest.raises(DivergenceError):
        ex.step(torch.full_like(x, float("nan")), y)
    assert_close(synths(), before, atol=0)


def test_dni_synthetic_gradients_are_in_units_of_the_true_deltas_rms() -> None:
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(4, 16), nn.Tanh()), nn.Linear(16, 3)]
    ex = LocalExecutor(stages, "dni", optimizer=sgd, loss_fn=nn.CrossEntropyLoss(), synth_hidden=8)
    before = weights([stages[0]])
    x, y = batches(1, width=4)[0]
    seen: list[torch.Tensor] = []
    stages[1].register_full_backward_hook(lambda m, gin, gout: seen.append(gin[0].detach().clone()))
    ex.step(x.float(), y)
    worker = ex.workers[0]
    # no true δ had been seen at the first S: the synthetic gradient was zero, the stage did not move
    assert_close(weights([stages[0]]), before, atol=0)
    # ... and the scale is now the RMS of the true δ of that batch (the first average is the value)
    (true,) = seen
    assert worker.mean_square[0] == pytest.approx(float(true.double().pow(2).mean()), rel=1e-9)
    assert 1e-6 < worker.mean_square[0] < 1e-2  # a batch-mean loss's δ: small


def test_dni_learns_the_offline_default_within_5_points_of_bp(tmp_path: Path) -> None:
    from fxreplay.config import apply_overrides, load_config
    from fxreplay.run import train_run

    accuracy = {}
    for method in ("bp", "dni"):
        cfg = apply_overrides(load_config(None), {"train.method": method, "partition.K": 2, "train.out": str(tmp_path / method)})
        accuracy[method] = train_run(cfg).final["test_accuracy"]
    assert accuracy["bp"] > 0.95
    assert accuracy["dni"] > accuracy["bp"] - 0.05, accuracy

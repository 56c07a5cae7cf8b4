"""Parameters shared across stages (a GPT's tied embedding): replicated, gradients summed.

Semantics (README "Shared parameters"): each stage that uses a shared parameter holds a copy;
at iteration t each holder contributes the gradient its own schedule produces for its update
at t (none in warm-up) and every copy is updated with the sum, so the copies stay identical.
BP is then exactly BP on the original model.
"""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import fxreplay
from fxreplay.errors import TrainingError
from fxreplay.executor import LocalExecutor
from fxreplay.methods import one_process_names
from methodtools import method_options
from fxreplay.methods.base import replica_groups
from zoo_external import GPTConfig, NanoGPT

LR, MOMENTUM = 0.1, 0.9


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def gpt(layers: int = 4, seed: int = 0) -> NanoGPT:
    torch.manual_seed(seed)
    return NanoGPT(GPTConfig(n_layer=layers, dropout=0.0, tie=True))


def tokens(n: int, seed: int = 1, batch: int = 4, T: int = 16, vocab: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (batch, T), generator=g), torch.randint(0, vocab, (batch, T), generator=g)) for _ in range(n)]


def lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def copies(pipe: fxreplay.Pipeline) -> list[list[torch.Tensor]]:
    """For each shared parameter, its copy in every stage that holds one."""
    named = [dict(s.named_parameters(remove_duplicate=False)) for s in pipe.stages]
    return [[named[k][local] for k, local in members] for _, members in replica_groups(pipe.stages)]


@pytest.mark.parametrize("K", [2, 3])
def test_bp_through_tied_stages_equals_bp_on_the_model(K: int) -> None:
    data = tokens(10)
    whole = gpt()
    pipe = fxreplay.compile(copy.deepcopy(whole), (data[0][0],), K=K, cost="flops")
    # the embedding sits in the first stage, the head in the last: each holds a copy
    assert pipe.plan.stages[0].replicas == pipe.plan.stages[-1].replicas == ("transformer.wte.weight",)
    (group,) = copies(pipe)
    assert len(group) == 2 and group[0] is not group[1]
    opt = sgd(whole.parameters())
    trainer = fxreplay.Trainer(pipe, method="bp", optimizer=sgd, loss_fn=lm_loss)
    for x, y in data:
        opt.zero_grad()
        lm_loss(whole(x), y).backward()
        opt.step()
        trainer.step(x, y)
        assert torch.equal(group[0], group[1])
    trained = trainer.model_state_dict()
    assert set(trained) == set(whole.state_dict())  # one entry per original key
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(trained[name], value, atol=1e-6, rtol=0)


class TiedNet(nn.Module):
    """Token ids -> embedding -> two tanh layers -> logits by the embedding matrix (tied), in
    float64 so that the comparison with the reference holds to 1e-12."""

    def __init__(self, vocab: int = 5, d: int = 6) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(vocab, d)
        self.mid1, self.mid2 = nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.double()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mid1(self.emb(ids)))
        return self.head(torch.tanh(self.mid2(h)))


def small_data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randint(0, 5, (8,), generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def tied_stages() -> fxreplay.Pipeline:
    data = small_data(1)
    return fxreplay.compile(TiedNet(), (data[0][0],), K=3, cost="flops", boundaries=["mid1", "mid2"])


def reference(stages: list[nn.Module], data: list[tuple[torch.Tensor, torch.Tensor]], old_weights: bool) -> list[float]:
    """FR (``old_weights=False``: replay with the current weights) or DDG (the weights the
    batch saw in its forward), written from the algorithms with the shared-parameter rule:
    all backward passes of iteration t first, then every copy of the tied weight gets the
    sum of the gradients of the stages past warm-up, then every stage with a gradient steps."""
    K = len(stages)
    loss = nn.CrossEntropyLoss()
    opts = [sgd(s.parameters()) for s in stages]
    tied = [dict(s.named_parameters(remove_duplicate=False)) for s in stages]
    tied_copies = [tied[0]["emb.weight"], tied[K - 1]["head.weight"]]
    kept: dict[tuple[int, int], tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
    delta: dict[tuple[int, int], torch.Tensor] = {}
    losses = []
    for t, (x, y) in enumerate(data):
        h: torch.Tensor = x
        for k in range(K):  # the play
            kept[(k, t)] = (h, {n: p.detach().clone() for n, p in stages[k].named_parameters()})
            with torch.no_grad():
                h = stages[k](h)
        losses.append(float(loss(h, y)))
        sent, ready = {}, []
        for k in range(K):  # each stage's backward of batch t - d_k
            b = t - (K - 1 - k)
            for p in stages[k].parameters():
                p.grad = None
            if b < 0:
                continue  # warm-up
            inp, old = kept.pop((k, b))
            if inp.is_floating_point():
                inp = inp.clone().requires_grad_(True)
            if old_weights:
                params = {n: w.requires_grad_(True) for n, w in old.items()}
                out = torch.func.functional_call(stages[k], params, (inp,))
            else:
                out = stages[k](inp)
            if k == K - 1:
                loss(out, data[b][1]).backward()
            else:
                out.backward(delta[(k, b)])
            if old_weights:
                for n, p in stages[k].named_parameters():
                    p.grad = params[n].grad
            ready.append(k)
            if k > 0:
                sent[(k - 1, b)] = inp.grad
        delta = sent
        grads = [c.grad for c in tied_copies if c.grad is not None]
        total = sum(grads[1:], grads[0].clone()) if grads else None
        for c in tied_copies:
            c.grad = None if total is None else total.clone()
        for k in range(K):
            if k in ready or (total is not None and k in (0, K - 1)):
                opts[k].step()  # a holder in warm-up steps its copy alone (its other grads are None)
    return losses


@pytest.mark.parametrize("method, old_weights", [("fr", False), ("ddg", True)])
def test_fr_and_ddg_with_a_tied_weight_equal_the_handwritten_reference(method: str, old_weights: bool) -> None:
    data = small_data(8)
    pipe = tied_stages()
    assert pipe.plan.stages[0].replicas == pipe.plan.stages[2].replicas == ("emb.weight",) and pipe.plan.stages[1].replicas == ()
    ref_stages = [copy.deepcopy(s) for s in pipe.stages]
    ref_losses = reference(ref_stages, data, old_weights)
    ex = LocalExecutor(pipe.stages, method, optimizer=sgd, loss_fn=nn.CrossEntropyLoss())
    losses = [ex.step(x, y) for x, y in data]
    assert losses == pytest.approx(ref_losses, abs=1e-12)
    for ours, theirs in zip(pipe.stages, ref_stages):
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=name)
    # the warm-up matters: stage 0 stepped its copy from the first iteration on (stage 2's
    # gradient), its own layers only from the third
    assert not torch.equal(pipe.stages[0].emb.weight, TiedNet().emb.weight)


@pytest.mark.parametrize("method", sorted(one_process_names()))
def test_copies_stay_identical_after_every_step(method: str) -> None:
    pipe = tied_stages()
    ex = LocalExecutor(pipe.stages, method, optimizer=sgd, loss_fn=nn.CrossEntropyLoss(), **method_options(method, 64))
    (group,) = copies(pipe)
    start = group[0].detach().clone()
    for x, y in small_data(6):
        ex.step(x, y)
        assert torch.equal(group[0], group[1]), method
    assert not torch.equal(group[0], start)


def test_the_partitioner_balances_a_tied_gpt_and_shows_the_copies() -> None:
    x = tokens(1)[0][0]
    tied = fxreplay.compile(gpt(layers=4), (x,), K=4, cost="flops")
    torch.manual_seed(0)
    untied = fxreplay.compile(NanoGPT(GPTConfig(n_layer=4, dropout=0.0, tie=False)), (x,), K=4, cost="flops")
    assert tied.plan.balance <= 1.3 and tied.plan.balance <= untied.plan.balance + 1e-9, (tied.plan.balance, untied.plan.balance)
    holders = [s.index for s in tied.plan.stages if s.replicas]
    assert holders == [0, 3]
    # the last stage's parameters count its copy of the embedding
    head = tied.model.lm_head.weight
    assert tied.plan.stages[3].param_bytes >= head.numel() * head.element_size()


def test_one_copy_under_the_original_names_and_a_saved_plan_ties_again(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = tokens(3)
    model = gpt(layers=2)
    pipe = fxreplay.compile(model, (data[0][0],), K=2, cost="flops")
    trainer = fxreplay.Trainer(pipe, method="fr", optimizer=sgd, loss_fn=lm_loss)
    for x, y in data:
        trainer.step(x, y)
    state = trainer.model_state_dict()
    assert torch.equal(state["transformer.wte.weight"], state["lm_head.weight"])
    fresh = NanoGPT(GPTConfig(n_layer=2, dropout=0.0, tie=True))
    fresh.load_state_dict(state)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight  # still tied in the original model
    pipe.save(tmp_path / "plan")
    loaded = fxreplay.load(tmp_path / "plan", model=NanoGPT(GPTConfig(n_layer=2, dropout=0.0, tie=True)))
    (group,) = copies(loaded)
    assert group[0] is not group[1] and torch.equal(group[0], group[1])


def test_stages_sharing_a_weight_must_share_a_learning_rate_scale() -> None:
    pipe = tied_stages()
    with pytest.raises(TrainingError, match=r"emb.weight is shared by stages 0, 2.*scaled differently \(2, 1\)"):
        fxreplay.Trainer(pipe, method="fr", optimizer=sgd, lr_scales=[2.0, 1.0, 1.0])


def _rank_tied(steps: int) -> dict[str, Any]:
    import torch.distributed as dist

    from fxreplay.executor import DistributedExecutor

    out: dict[str, Any] = {}
    for method in sorted(one_process_names()):
        pipe = fxreplay.compile(gpt(layers=2), (tokens(1)[0][0],), K=2, cost="flops")
        ex = DistributedExecutor(pipe.stages, method, optimizer=sgd, loss_fn=lm_loss, timeout=30.0, record_timeline=True,
                                 **method_options(method, 64))
        torch.manual_seed(7)
        mine = []
        for x, y in tokens(steps):
            ex.step(x, y)
            (group,) = copies(pipe)
            mine.append(group[dist.get_rank()].detach().clone())  # this rank's copy after the step
        ex.close()
        out[method] = (mine, {k: v.clone() for k, v in pipe.stages[dist.get_rank()].state_dict().items()}, ex.timeline())
    return out


def test_one_rank_per_stage_sums_the_copies_like_the_local_executor() -> None:
    from fxreplay.launch import run_distributed

    steps = 6
    results = run_distributed(_rank_tied, nproc=2, args=(steps,), threads=1, timeout=60.0)
    torch.set_num_threads(1)
    for method in sorted(one_process_names()):
        pipe = fxreplay.compile(gpt(layers=2), (tokens(1)[0][0],), K=2, cost="flops")
        ex = LocalExecutor(pipe.stages, method, optimizer=sgd, loss_fn=lm_loss, **method_options(method, 64))
        torch.manual_seed(7)
        for t, (x, y) in enumerate(tokens(steps)):
            ex.step(x, y)
            # the two ranks' copies are the same tensor bit for bit after every step, and the
            # local executor's (DNI: its synthesizers train with Adam, so close, not equal)
            ranks = [results[r][method][0][t] for r in (0, 1)]
            assert torch.equal(ranks[0], ranks[1]), (method, t)
            torch.testing.assert_close(ranks[0], copies(pipe)[0][0], atol=0 if "dni" not in method else 1e-5, rtol=0)
        for k in (0, 1):
            for name, value in pipe.stages[k].state_dict().items():
                torch.testing.assert_close(results[k][method][1][name], value, atol=0 if "dni" not in method else 1e-5, rtol=0)
    # the sum is its own interval in the timeline, on both ranks, once per step
    timeline = results[1]["fr"][2]
    for events in timeline.ranks:
        assert sum(1 for e in events if e[0] == "reduce") == steps


def test_weights_loaded_into_the_model_after_compiling_are_refused_not_half_used() -> None:
    model = TiedNet()
    pipe = fxreplay.compile(model, (small_data(1)[0][0],), K=3, cost="flops", boundaries=["mid1", "mid2"])
    with torch.no_grad():
        model.emb.weight.add_(1.0)  # reaches stage 0 (the model's tensor), not stage 2's copy
    with pytest.raises(TrainingError, match=r"copies of emb.weight in stages 0 and 2 differ.*before fxreplay.compile"):
        LocalExecutor(pipe.stages, "bp", optimizer=sgd, loss_fn=nn.CrossEntropyLoss())

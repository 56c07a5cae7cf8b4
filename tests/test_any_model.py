"""The stages compute exactly what the model computes, in both modes, for models written
elsewhere: nanoGPT, an SDPA GPT, nn.TransformerEncoder, dict / dataclass / named-tuple
outputs, an EMA buffer, checkpointed blocks, torchvision's stochastic-depth models and
Hugging Face's GPT-2 and BERT; and they train with every method."""
from __future__ import annotations

import warnings
from typing import Any, Callable

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import fxreplay
import zoo_external as Z
from fxreplay.errors import ShapeGuardError
from fxreplay.metrics import default_loss


def assert_same(a: Any, b: Any) -> None:
    """Same structure and type, every tensor allclose (absolute and relative)."""
    assert type(a) is type(b), (type(a), type(b))
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        else:
            assert x == y


def buffers_of(model: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for b in model.buffers()]


def check_composes(model: nn.Module, inputs: tuple[Any, ...], pipe: fxreplay.Pipeline) -> None:
    """Both modes, same RNG seed, same buffers before: same outputs and same buffers after."""
    for mode in (True, False):
        model.train(mode)
        pipe.train(mode)
        before = buffers_of(model)
        torch.manual_seed(11)
        expected = model(*inputs)
        after = buffers_of(model)
        with torch.no_grad():
            for b, v in zip(model.buffers(), before):
                b.copy_(v)
        torch.manual_seed(11)
        got = pipe(*inputs)
        assert_same(got, expected)
        for b, v in zip(model.buffers(), after):
            assert torch.equal(b, v), "the stages updated a buffer differently from the model"


SMALL: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[Any, ...]]]] = {
    "nanogpt": (Z.NanoGPT, lambda: (torch.randint(0, 64, (3, 16)),)),
    "sdpa_gpt": (Z.SdpaGPT, lambda: (torch.randint(0, 64, (3, 16)),)),
    "encoder": (Z.EncoderClassifier, lambda: (torch.randint(0, 50, (3, 10)),)),
    "dict": (Z.DictNet, lambda: (torch.randn(5, 8),)),
    "dataclass": (Z.DataclassNet, lambda: (torch.randn(5, 8),)),
    "namedtuple": (Z.NamedTupleNet, lambda: (torch.randn(5, 8),)),
    "ema": (Z.EMANet, lambda: (torch.randn(5, 8),)),
    "checkpointed": (Z.CheckpointedNet, lambda: (torch.randn(5, 8),)),
    "size_loop": (Z.SizeLoop, lambda: (torch.randn(5, 4, 8),)),
}


@pytest.mark.parametrize("compiled_in_train_mode", [True, False])
@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_stages_equal_the_model_in_both_modes(name: str, K: int, compiled_in_train_mode: bool) -> None:
    build, make_inputs = SMALL[name]
    model = build().train(compiled_in_train_mode)
    inputs = make_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = fxreplay.compile(model, inputs, K=K, cost="flops")
    assert model.training == compiled_in_train_mode
    check_composes(model, inputs, pipe)
    check_composes(model, make_inputs(), pipe)  # other values of the same shape


def test_checkpointed_regions_warn_with_their_place() -> None:
    with pytest.warns(UserWarning, match=r"torch.utils.checkpoint regions are traced through.*zoo_external.py:\d+"):
        fxreplay.compile(Z.CheckpointedNet(), (torch.randn(4, 8),), K=2, cost="flops")


def test_four_block_gpt_balances_at_K4() -> None:
    pipe = fxreplay.compile(Z.NanoGPT(), (torch.randint(0, 64, (8, 16)),), K=4, cost="flops")
    assert pipe.plan.balance <= 1.3


def test_other_batch_sizes_work_and_other_sequence_shapes_are_refused() -> None:
    model = Z.SizeLoop().eval()
    pipe = fxreplay.compile(model, (torch.randn(8, 4, 8),), K=2, cost="flops").eval()
    x = torch.randn(3, 4, 8)
    assert_same(pipe(x), model(x))
    with pytest.raises(ShapeGuardError, match=r"range\(x.size\(1\)\).*gave 4.*give 5.*with example inputs of the shape you run"):
        pipe(torch.randn(3, 5, 8))


@pytest.mark.parametrize("name", ["swin_t", "efficientnet_b0", "convnext_tiny"])
def test_torchvision_stochastic_depth_models(name: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    from torchvision.ops import StochasticDepth

    model = getattr(torchvision.models, name)(num_classes=10)
    for m in model.modules():
        if isinstance(m, StochasticDepth):
            m.p = 0.5  # visible in one step
        if hasattr(m, "layer_scale"):
            m.layer_scale.data.fill_(1.0)  # a fresh layer scale of 1e-6 would hide a wrong branch
    x = torch.randn(2, 3, 32, 32)
    for K, mode in ((4, True), (2, False)):
        model.train(mode)
        pipe = fxreplay.compile(model, (x,), K=K, cost="flops")
        assert pipe.eval_graph_module is not None  # they read self.training
        check_composes(model, (x,), pipe)


@pytest.mark.parametrize("method", ["bp", "fr", "ddg", "dni"])
def test_structured_output_trains_with_every_method(method: str) -> None:
    torch.manual_seed(0)
    model = Z.DictNet()
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    pipe = fxreplay.compile(model, (x,), K=3, cost="flops")
    trainer = fxreplay.Trainer(pipe, method=method, loss_fn=lambda out, t: nn.functional.cross_entropy(out["logits"], t))
    losses = [trainer.step(x, y) for _ in range(8)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert isinstance(trainer.last_output, dict) and set(trainer.last_output) == {"logits", "features", "scale"}
    result = trainer.evaluate([(x, y)])
    pipe.eval()
    with torch.no_grad():
        expected = float((pipe(x)["logits"].argmax(1) == y).double().mean())  # the eval-mode stages, by hand
    pipe.train()
    assert result["accuracy"] == pytest.approx(expected, abs=1e-12) and result["samples"] == 16
    sd = trainer.model_state_dict()
    assert set(sd) == set(model.state_dict())


@pytest.mark.parametrize("method", ["bp", "fr", "ddg"])
def test_nanogpt_trains_and_reports_perplexity(method: str) -> None:
    torch.manual_seed(0)
    model = Z.NanoGPT(Z.GPTConfig(dropout=0.0))
    ids = torch.randint(0, 64, (8, 17))
    x, y = ids[:, :-1], ids[:, 1:]
    pipe = fxreplay.compile(model, (x,), K=4, cost="flops")
    trainer = fxreplay.Trainer(pipe, method=method, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    losses = [trainer.step(x, y) for _ in range(40)]
    assert losses[-1] < losses[0] - 0.5, losses  # it learns the batch
    result = trainer.evaluate([(x, y)])
    assert set(result) == {"loss", "samples", "accuracy", "perplexity"}
    assert result["perplexity"] == pytest.approx(torch.tensor(result["loss"]).exp().item())


def test_bp_through_stages_of_a_dropout_model_equals_bp_on_the_model() -> None:
    """Dropout included: the same RNG seed gives the same masks through the stages."""
    torch.manual_seed(0)
    reference = Z.SdpaGPT()
    model = Z.SdpaGPT()
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 64, (4, 16))
    pipe = fxreplay.compile(model.eval(), (ids,), K=3, cost="flops")  # compiled in eval mode
    trainer = fxreplay.Trainer(pipe, method="bp", optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference.train()
    for step in range(4):
        torch.manual_seed(100 + step)
        trainer.step(ids, ids)
        torch.manual_seed(100 + step)
        opt.zero_grad()
        default_loss(reference(ids), ids).backward()
        opt.step()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(trainer.model_state_dict()[key], value, rtol=1e-5, atol=1e-6)


class InputEMA(nn.Module):
    """A buffer updated from the input alone (weight-independent), so the expected value
    after T training steps is known in closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("ema", torch.zeros(8))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.ema.mul_(0.5).add_(x.mean(0) * 0.5)
            self.count.add_(1)
        h = torch.relu(self.a(x - self.ema))
        return self.c(torch.relu(self.b(h)))


@pytest.mark.parametrize("method", ["fr", "bp", "ddg", "dni"])
def test_buffer_written_in_forward_updates_once_per_step(method: str) -> None:
    model = InputEMA()
    batches = [(torch.randn(6, 8), torch.randint(0, 3, (6,))) for _ in range(6)]
    pipe = fxreplay.compile(model, (batches[0][0],), K=3, cost="flops")
    assert "ema" in pipe.stages[0].code  # the writing stage replays under FR
    trainer = fxreplay.Trainer(pipe, method=method)
    expected = torch.zeros(8)
    for x, y in batches:
        trainer.step(x, y)
        expected = expected * 0.5 + x.mean(0) * 0.5
        torch.testing.assert_close(model.ema, expected)
    assert int(model.count) == len(batches)
    trainer.evaluate([batches[0]])
    torch.testing.assert_close(model.ema, expected)  # eval mode writes nothing
    assert int(model.count) == len(batches)


class LeafModulesWriteBuffers(nn.Module):
    """torch.nn leaves whose forward writes their own buffers: spectral norm's power iteration (a parametrization's
    _u, _v) and InstanceNorm's running statistics; both in stage 0, which FR replays and DDG rebuilds."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3))
        self.norm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.b = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.Tanh())
        self.c = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(torch.relu(self.norm(self.a(x)))))


@pytest.mark.parametrize("method", ["fr", "ddg", "bp"])
def test_buffers_that_leaf_modules_write_update_once_per_step(method: str) -> None:
    """With the learning rate 0 the weights stay, so after T steps every buffer must be the model's after T training
    forwards (FR's replay ran spectral norm's power iteration and InstanceNorm's statistics a second time)."""
    torch.manual_seed(0)
    model, reference = LeafModulesWriteBuffers(), LeafModulesWriteBuffers()
    reference.load_state_dict(model.state_dict())
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))) for _ in range(4)]
    pipe = fxreplay.compile(model, (batches[0][0],), K=2, boundaries=["b"], cost="flops")
    trainer = fxreplay.Trainer(pipe, method=method, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    reference.train()
    for x, y in batches:
        trainer.step(x, y)
        with torch.no_grad():
            reference(x)
    got = trainer.model_state_dict()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(got[key], value, msg=lambda m, key=key: f"{key}: {m}")  # type: ignore[misc]


def test_hugging_face_models_compile_compose_and_train() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=4, n_head=2, use_cache=False, tie_word_embeddings=False))
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=3))
    ids = torch.randint(0, 64, (4, 16))
    for model, target in ((gpt2, ids), (bert, torch.randint(0, 3, (4,)))):
        for K in (2, 4):
            pipe = fxreplay.compile(model, (ids,), K=K, cost="flops")
            check_composes(model, (ids,), pipe)
        for method in ("bp", "fr"):
            pipe = fxreplay.compile(model, (ids,), K=2, cost="flops")
            trainer = fxreplay.Trainer(pipe, method=method)
            losses = [trainer.step(ids, target) for _ in range(3)]
            assert all(torch.isfinite(torch.tensor(losses)))
            assert type(trainer.last_output).__name__.endswith("Output") or "Output" in type(trainer.last_output).__name__


def _bp_equals_the_models(make: Callable[[], nn.Module], inputs: tuple[Any, ...], K: int) -> None:
    """Two SGD steps of BP through K stages equal two on the model (the same seed per step: the same dropout
    masks), every key of the model's state dict included."""

    def loss_fn(out: Any, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1))

    torch.manual_seed(0)
    reference = make().train()
    with torch.no_grad():
        logits = reference(*inputs).logits
    y = torch.randint(0, logits.shape[-1], logits.shape[:-1])
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(2):
        torch.manual_seed(10 + step)
        opt.zero_grad()
        loss_fn(reference(*inputs), y).backward()
        opt.step()
    torch.manual_seed(0)
    pipe = fxreplay.compile(make(), inputs, K=K, cost="flops")
    trainer = fxreplay.Trainer(pipe, method="bp", loss_fn=loss_fn, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    for step in range(2):
        torch.manual_seed(10 + step)
        trainer.step(inputs, y)
    got = trainer.model_state_dict()
    assert set(got) == set(reference.state_dict())  # T5's tied `shared.weight` was missing from model.pt
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)


def test_hugging_face_t5_distilbert_llama_compose_and_bp_equals_the_models() -> None:
    """T5 (encoder-decoder; `torch.finfo(x.dtype)` in its attention; one dropout module used at both ends of each
    stack; a tied embedding under three names) and DistilBERT (`nn.ReLU()(x)`: a module made inside forward) were
    refused by the tracer or the eval cut; Llama (rotary embeddings, grouped-query attention) beside them."""
    transformers = pytest.importorskip("transformers")

    def t5() -> nn.Module:
        return transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            use_cache=False, dropout_rate=0.1))

    def distilbert() -> nn.Module:
        return transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
            vocab_size=64, dim=32, n_layers=4, n_heads=4, hidden_dim=64, max_position_embeddings=32, num_labels=3))

    def llama() -> nn.Module:  # grouped-query attention, rotary embeddings
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, use_cache=False))

    torch.manual_seed(1)
    ids, mask, decoder_ids = torch.randint(0, 64, (2, 12)), torch.ones(2, 12, dtype=torch.long), torch.randint(0, 64, (2, 12))
    for make, inputs in ((t5, (ids, mask, decoder_ids)), (distilbert, (ids,)), (llama, (ids,))):
        for K in (2, 3):
            torch.manual_seed(0)
            model = make()
            check_composes(model, inputs, fxreplay.compile(model, inputs, K=K, cost="flops"))
        _bp_equals_the_models(make, inputs, K=3)


def test_a_dtype_is_a_constant_of_the_trace_and_checked() -> None:
    class MaskFill(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(h.masked_fill(h < 0, torch.finfo(h.dtype).min / 2).clamp(min=-1.0))

    torch.manual_seed(0)
    model, x = MaskFill(), torch.randn(4, 8)
    pipe = fxreplay.compile(model, (x,), K=2, cost="flops")
    check_composes(model, (x,), pipe)
    model.double()
    with pytest.raises(ShapeGuardError, match=r"gave torch.float32, but these inputs give torch.float64"):
        pipe(x.double())


class WriteAfterRead(nn.Module):
    """h is read (by a wide branch), then written in place (the write's result unused), then read again: an order
    chosen from the data edges alone may move the write before the first read (it did: a different function)."""

    def __init__(self, wide: int = 512) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d, self.e = nn.Linear(8, 8), nn.Linear(8, wide), nn.Linear(8, 8), nn.Linear(wide, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        y1 = self.d(self.b(h).relu())
        h.mul_(0.5)
        return self.e(y1 + self.c(h))


class ReadBeforeInplaceReLU(nn.Module):
    def __init__(self, wide: int = 64) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d, self.e = nn.Linear(8, 8), nn.Linear(8, wide), nn.Linear(8, 8), nn.Linear(wide, 8), nn.Linear(8, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        y2 = self.c(h)  # reads h before the in-place ReLU
        self.act(h)
        return self.e(self.d(self.b(h)) + y2)


class WritesThroughViews(nn.Module):
    """A write through a view, an item assignment (`h[:, 0] = ...`, which torch.fx cannot trace), a value that differs
    in eval mode (a separate eval graph) and `+=`. The read before the writes saves nothing of h for the backward,
    so the model trains (a Linear reading h there would make the model's own backward fail)."""

    def __init__(self, wide: int = 512) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d, self.e, self.f = (nn.Linear(8, 8), nn.Linear(8, wide), nn.Linear(8, 8),
                                                         nn.Linear(wide, 8), nn.Linear(8, 3), nn.Linear(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        v = h.view(-1, 2, 4)
        y1 = self.d(self.b(h + 1.0).relu())
        v.mul_(0.5)
        h[:, 0] = 1.0 if self.training else 2.0
        g = self.f(self.c(h))
        g += y1
        return self.e(g)


@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("model_class", [WriteAfterRead, ReadBeforeInplaceReLU, WritesThroughViews])
def test_in_place_writes_keep_their_place_among_the_reads(model_class: type[nn.Module], K: int) -> None:
    torch.manual_seed(0)
    model, x = model_class(), torch.randn(4, 8)
    pipe = fxreplay.compile(model, (x,), K=K, cost="flops")
    check_composes(model, (x,), pipe)


def test_bp_through_stages_with_in_place_writes_equals_bp_on_the_model() -> None:
    torch.manual_seed(0)
    reference, x, y = WritesThroughViews(), torch.randn(8, 8), torch.randint(0, 3, (8,))
    model = WritesThroughViews()
    model.load_state_dict(reference.state_dict())
    pipe = fxreplay.compile(model, (x,), K=3, cost="flops")
    trainer = fxreplay.Trainer(pipe, method="bp", optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(3):
        trainer.step(x, y)
        opt.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        opt.step()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(trainer.model_state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_a_plan_whose_order_moves_a_write_across_a_read_is_refused(tmp_path: Any) -> None:
    from fxreplay.compiler.costgraph import build_cost_graph
    from fxreplay.compiler.tracing import trace
    from fxreplay.errors import PlanError

    torch.manual_seed(0)
    gm = trace(WriteAfterRead(), (), (torch.randn(4, 8),)).gm
    names = [n.name for n in gm.graph.nodes if n.op != "output"]
    moved = [n for n in names if n != "mul_"]
    moved.insert(moved.index("b"), "mul_")  # the write before the first read: what the old order did
    with pytest.raises(PlanError, match=r"runs 'mul_' before 'b'.*Partition the model again"):
        build_cost_graph(gm, order=moved)
    assert [n.name for n in build_cost_graph(gm, order=names).order] == names


class CheckpointsWhenTraining(nn.Module):
    """DenseNet's memory-efficient layers: `if any(t.requires_grad ...)` checkpoints, else runs directly."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.requires_grad:
            h = torch.utils.checkpoint.checkpoint(self.b, h, use_reentrant=False)
        else:
            h = self.b(h)
        return self.c(h)


@pytest.mark.parametrize("method", ["bp", "fr", "ddg"])
def test_code_that_branches_on_requires_grad_traces_the_training_branch_and_trains(method: str) -> None:
    """Traced with autograd on in training mode (requires_grad reads True, as in the model's step; it read False and
    every training step raised), under no_grad in eval mode; FR's play without autograd does not trip the guard."""
    torch.manual_seed(0)
    reference, x, y = CheckpointsWhenTraining(), torch.randn(8, 8), torch.randint(0, 3, (8,))
    model = CheckpointsWhenTraining()
    model.load_state_dict(reference.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the checkpointed region is traced through (a warning says so)
        pipe = fxreplay.compile(model, (x,), K=2, cost="flops")
    assert "grad_guard" in pipe.stages[0].code
    trainer = fxreplay.Trainer(pipe, method=method, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    for _ in range(3):
        trainer.step(x, y)
    if method == "bp":  # BP through the stages is BP on the model
        opt = torch.optim.SGD(reference.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(reference(x), y).backward()
            opt.step()
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(trainer.model_state_dict()[key], value, rtol=1e-5, atol=1e-6)
    pipe.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(pipe(x), model(x))


def test_a_torch_compiled_model_is_partitioned_through_its_wrapper() -> None:
    """torch.compile(model) has no forward of its own to trace (torch.fx refused it): the module it wraps is
    partitioned (the same weights), with a warning that the stages run eagerly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(4, 8)
    from fxreplay.errors import FxReplayWarning

    with pytest.warns(FxReplayWarning, match=r"torch.compile wrapper: fxreplay partitions the Sequential"):
        pipe = fxreplay.compile(torch.compile(model), (x,), K=2, cost="flops")
    check_composes(model, (x,), pipe)
    assert set(pipe.model_state_dict()) == set(model.state_dict())


class TwoDropoutBranches(nn.Module):
    """Two branches with a dropout each; the narrow-cut order runs the narrow branch first (it did: the masks were
    drawn in the other order than the model's, so the stages were not the model under its seed)."""

    def __init__(self, wide: int = 1024) -> None:
        super().__init__()
        self.a, self.a1, self.a2 = nn.Linear(8, 8), nn.Linear(8, wide), nn.Linear(wide, 8)
        self.b1, self.b2, self.out = nn.Linear(8, 64), nn.Linear(64, 8), nn.Linear(8, 3)
        self.da, self.db = nn.Dropout(0.5), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        ya, yb = self.a1(h), self.b1(h)
        return self.out(self.a2(self.da(ya)) + self.b2(self.db(yb)))


@pytest.mark.parametrize("K", [1, 2, 3])
def test_random_draws_keep_the_models_order(K: int) -> None:
    from fxreplay.compiler.tracing import draws_random

    torch.manual_seed(0)
    model, x = TwoDropoutBranches(), torch.randn(4, 8)
    pipe = fxreplay.compile(model, (x,), K=K, cost="flops")
    check_composes(model, (x,), pipe)  # train mode under one seed: the same masks
    drawn = [n.target for stage in pipe.stages for n in stage.graph.nodes if draws_random(stage, n)]
    assert drawn == ["da", "db"]


@pytest.mark.parametrize("name,K,boundaries", [("deep_cnn", 8, None), ("tanh_mlp", 4, ["3", "5", "7"])])
def test_the_proxy_models_cut_into_stages_that_all_hold_weights_and_compose(name: str, K: int,
                                                                             boundaries: list[str] | None) -> None:
    """examples/deep_cnn.py (benchmarks/compensation.sh proxy8) is deep enough for K = 8, and
    examples/tanh_mlp.py for K = 4 at the split proxy-mlp pins (by FLOPs alone one stage is a lone tanh)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, inputs = module.build_model(), module.example_inputs()
    pipe = fxreplay.compile(model, inputs, K=K, cost="flops", boundaries=boundaries)
    assert len(pipe.stages) == K
    assert all(any(True for _ in s.parameters()) for s in pipe.stages)  # every stage has weights to compensate
    check_composes(model, inputs, pipe)

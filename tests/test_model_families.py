"""Model code as other projects write it, each in a small model written the same way: an eval-mode
model that reads self.training compiled with every cost (the measured refinement ran its stages in
train mode), tensor factories given sizes one by one, int()/float() of size arithmetic, per-block
torch.compile, keyword inputs, and a 0-d tensor or one-row features crossing a cut under DNI;
Hugging Face's OPT, BART, ViT-MAE and Mixtral on small random configs. Every model that compiles
keeps the promise: the stages equal the model in both modes and train with every method."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

import fxreplay
from clitools import run_cli
from fxreplay.compiler.plan import ModelSpec
from fxreplay.errors import FxReplayWarning, ShapeGuardError, TrainingError
from test_any_model import assert_same, check_composes

METHODS = ["bp", "fr", "ddg", "dni"]


# ------------------------------------------------------------------ eval-mode model, every cost
class LayerDrop(nn.Module):
    """Stochastic depth as torchvision writes it: the branch is dropped only in training."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.fc, self.norm = nn.Linear(d, d), nn.BatchNorm1d(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.norm(self.fc(x)).relu()
        if self.training:
            keep = (torch.rand(x.shape[0], 1) > 0.3).to(x.dtype)
            branch = branch * keep / 0.7
        return x + branch


class DropNet(nn.Module):
    def __init__(self, d: int = 16, blocks: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.blocks = nn.Sequential(*(LayerDrop(d) for _ in range(blocks)))
        self.out = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(x)))


@pytest.mark.parametrize("cost", ["auto", "time", "flops", "params", "uniform"])
def test_an_eval_mode_model_that_reads_self_training_compiles_with_every_cost(cost: str) -> None:
    """The README's path, fxreplay.compile(model.eval(), (x,), K=4): the measured refinement of the time cost ran the
    stages in train mode with the model's modules in eval mode ("stage Stage0 is in train mode but its module ...")."""
    model, x = DropNet().eval(), torch.randn(8, 8)
    pipe = fxreplay.compile(model, (x,), K=4, cost=cost, repeats=1, refine=2)
    assert pipe.eval_graph_module is not None  # it reads self.training
    assert not any(m.training for m in model.modules())  # the profile and the timing put every mode back
    with torch.no_grad():
        assert_same(pipe(x), model(x))  # the stages start in the model's mode
    check_composes(model, (x,), pipe)


# ------------------------------------------------------------------ sizes as Python values
class SizeArithmetic(nn.Module):
    """OPT/BART's `torch.ones(batch, seq_len, device=...)`, ViT-MAE's `int(seq_length * (1 - mask_ratio))`."""

    def __init__(self, mask_ratio: float = 0.25) -> None:
        super().__init__()
        self.mask_ratio = mask_ratio
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len = x.shape[:2]
        mask = torch.ones(batch, seq_len, device=x.device)
        bias = torch.zeros(batch, seq_len, 1, dtype=x.dtype) + torch.full((batch, 1, 1), 0.5)
        len_keep = int(seq_len * (1 - self.mask_ratio))
        scale = float(seq_len) / round(seq_len / 2)
        h = self.a(x) * mask[..., None] + bias
        return self.b(h[:, :len_keep]) * scale


def test_factories_given_sizes_one_by_one_and_int_of_size_arithmetic() -> None:
    model, x = SizeArithmetic(), torch.randn(4, 6, 8)
    pipe = fxreplay.compile(model, (x,), K=2, cost="flops")
    check_composes(model, (x,), pipe)
    check_composes(model, (torch.randn(3, 6, 8),), pipe)  # another batch size: the factories' sizes stay symbolic
    assert "torch.ones((" in pipe.stages[0].code
    with pytest.raises(ShapeGuardError, match=r"int\(seq_len \* \(1 - self.mask_ratio\)\).*gave 4.*give 3"):
        pipe(torch.randn(4, 4, 8))  # int(4 * 0.75) = 3, not the 4 compiled


# ------------------------------------------------------------------ per-block torch.compile
class Block(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(self.norm(x)).relu()


class CompiledBlocks(nn.Module):
    """torchtitan's pattern: every transformer block wrapped by torch.compile."""

    def __init__(self, compiled: bool = True) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(4, 8), nn.Linear(8, 3)
        self.blocks = nn.ModuleList(torch.compile(Block()) if compiled else Block() for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def test_torch_compiled_blocks_are_traced_through_with_a_warning() -> None:
    model, x = CompiledBlocks(), torch.randn(5, 4)
    with pytest.warns(FxReplayWarning, match=r"torch.compile wrappers \(blocks.0, blocks.1, blocks.2, blocks.3\).*stages run eagerly"):
        pipe = fxreplay.compile(model, (x,), K=3, cost="flops")
    assert set(pipe.model_state_dict()) == set(model.state_dict())
    eager = CompiledBlocks(compiled=False)  # the same weights, run without torch.compile (no inductor build here)
    eager.load_state_dict({k.replace("._orig_mod", ""): v for k, v in model.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(pipe(x), eager(x))
    trainer = fxreplay.Trainer(pipe, method="fr")
    assert all(torch.isfinite(torch.tensor([trainer.step(x, torch.randint(0, 3, (5,))) for _ in range(3)])))


# ------------------------------------------------------------------ keyword inputs
class EncoderDecoder(nn.Module):
    """BART's signature: attention_mask second, decoder_input_ids third; called by keyword."""

    def __init__(self, vocab: int = 32, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.enc, self.dec = nn.Linear(d, d), nn.Linear(d, d)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        memory = self.enc(self.embed(input_ids)).tanh()
        if attention_mask is not None:
            memory = memory * attention_mask[..., None].to(memory.dtype)
        context = memory.sum(1, keepdim=True) / memory.shape[1]
        h = self.drop(self.dec(self.embed(decoder_input_ids)) + context)
        return {"logits": self.head(h)}


def _kwargs() -> dict[str, torch.Tensor]:  # not in forward's order
    return {"input_ids": torch.randint(0, 32, (4, 7)), "decoder_input_ids": torch.randint(0, 32, (4, 5)),
            "attention_mask": torch.ones(4, 7, dtype=torch.long)}


def _token_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out["logits"].reshape(-1, out["logits"].shape[-1]), y.reshape(-1))


def test_keyword_inputs_compose_in_both_modes() -> None:
    model, kw = EncoderDecoder(), _kwargs()
    pipe = fxreplay.compile(model, (), K=3, cost="flops", example_kwargs=kw)
    assert pipe.keywords == ("input_ids", "decoder_input_ids", "attention_mask")
    for mode in (True, False):
        model.train(mode)
        pipe.train(mode)
        torch.manual_seed(3)
        expected = model(**kw)
        torch.manual_seed(3)
        assert_same(pipe(**kw), expected)
    mixed = fxreplay.compile(model, (kw["input_ids"],), K=2, cost="flops", example_kwargs={"decoder_input_ids": kw["decoder_input_ids"]})
    with torch.no_grad():
        mixed.eval()
        model.eval()
        assert_same(mixed(kw["input_ids"], decoder_input_ids=kw["decoder_input_ids"]), model(kw["input_ids"], decoder_input_ids=kw["decoder_input_ids"]))
    with pytest.raises(TrainingError, match=r"compiled with the keyword inputs input_ids, decoder_input_ids, attention_mask.*this call gives input_ids"):
        pipe(input_ids=kw["input_ids"])


@pytest.mark.parametrize("method", METHODS)
def test_keyword_inputs_train_with_every_method(method: str) -> None:
    model, kw = EncoderDecoder(), _kwargs()
    y = torch.randint(0, 32, (4, 5))
    pipe = fxreplay.compile(model, (), K=3, cost="flops", example_kwargs=kw)
    trainer = fxreplay.Trainer(pipe, method=method, loss_fn=_token_loss, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    losses = [trainer.step(((), kw), y) for _ in range(4)] + [trainer.step(kw, y) for _ in range(2)]  # (args, kwargs) or a dict
    assert all(torch.isfinite(torch.tensor(losses)))
    result = trainer.evaluate([(kw, y)])
    assert result["samples"] == 4
    with pytest.raises(TrainingError, match=r"compiled with keyword inputs .* give a batch's inputs as \(args, kwargs\)"):
        trainer.step(kw["input_ids"], y)


KEYWORD_MODEL = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.fc, self.head = nn.Embedding(32, 8), nn.Linear(8, 8), nn.Linear(8, 32)

    def forward(self, input_ids, attention_mask=None, labels_hint=None):
        h = self.fc(self.embed(input_ids)).relu()
        return self.head(h * attention_mask[..., None])

def build_model():
    return Net()

def example_inputs():
    ids = torch.randint(0, 32, (2, 6))
    return (ids,), {"attention_mask": torch.ones(2, 6)}
'''


def test_a_model_file_gives_keyword_inputs_as_args_and_kwargs(tmp_path: Path) -> None:
    path = tmp_path / "keyword_net.py"
    path.write_text(KEYWORD_MODEL)
    result = run_cli("partition", str(path), "--K", "2", "--cost", "flops", "--out", str(tmp_path / "plan"))
    assert result.exit_code == 0, result.output
    pipe = fxreplay.load(tmp_path / "plan")
    assert pipe.keywords == ("attention_mask",)
    ids, mask = torch.randint(0, 32, (2, 6)), torch.ones(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(pipe(ids, attention_mask=mask), pipe.model(ids, attention_mask=mask))


# ------------------------------------------------------------------ DNI: what crosses a cut
class AuxScalar(nn.Module):
    """Returns (logits, aux_scalar); the auxiliary loss is a 0-d tensor made in the first layers, so it crosses every cut."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.a(x).relu()
        aux = h.pow(2).mean()
        h = self.c(self.b(h).relu()).relu()
        return self.out(h), aux


class OneRow(nn.Module):
    """Features pooled over the batch (one row per batch) cross the cut beside the per-example ones."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).relu()
        pooled = self.b(h.mean(0, keepdim=True))  # (1, 16)
        h = self.c(h).relu()
        return self.out(h + pooled)


def _aux_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    logits, aux = out
    return F.cross_entropy(logits, y) + 0.1 * aux


@pytest.mark.parametrize("method", METHODS)
def test_a_0d_tensor_crossing_a_cut_trains_with_every_method(method: str) -> None:
    model, x, y = AuxScalar(), torch.randn(8, 8), torch.randint(0, 3, (8,))
    pipe = fxreplay.compile(model, (x,), K=3, cost="uniform", boundaries=["b", "c"])
    check_composes(model, (x,), pipe)
    trainer = fxreplay.Trainer(pipe, method=method, loss_fn=_aux_loss)
    losses = [trainer.step(x, y) for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    if method == "dni":
        for worker in trainer.executor.workers[:2]:
            assert () in {tuple(shape) for shape, _ in worker._spec.values()}  # the scalar got its own synthesizer


def test_one_row_features_train_with_dni() -> None:
    model, x, y = OneRow(), torch.randn(8, 8), torch.randint(0, 3, (8,))
    pipe = fxreplay.compile(model, (x,), K=2, cost="uniform", boundaries=["c"])
    check_composes(model, (x,), pipe)
    trainer = fxreplay.Trainer(pipe, method="dni", loss_fn=F.cross_entropy)
    losses = [trainer.step(x, y) for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert (1, 16) in {tuple(shape) for shape, _ in trainer.executor.workers[0]._spec.values()}


def test_cdni_refuses_a_0d_tensor_with_one_paragraph() -> None:
    model, x, y = AuxScalar(), torch.randn(8, 8), torch.randint(0, 3, (8,))
    pipe = fxreplay.compile(model, (x,), K=2, cost="uniform", spec=ModelSpec(num_classes=3))
    trainer = fxreplay.Trainer(pipe, method="cdni", loss_fn=_aux_loss)
    with pytest.raises(TrainingError, match=r"cDNI cannot condition a synthesizer of features \(\) on labels \(8,\).*--method dni"):
        trainer.step(x, y)


# ------------------------------------------------------------------ Hugging Face on small random configs
def _hf_check(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], K: int, loss_fn: Any, target: torch.Tensor,
              methods: tuple[str, ...] = ("bp", "fr")) -> fxreplay.Pipeline:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = fxreplay.compile(model, args, K=K, cost="flops", example_kwargs=kwargs)
    for mode in (True, False):
        model.train(mode)
        pipe.train(mode)
        torch.manual_seed(5)
        expected = model(*args, **kwargs)
        torch.manual_seed(5)
        got = pipe(*args, **kwargs)
        for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(expected)):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    batch = ((args, kwargs) if kwargs else args[0] if len(args) == 1 else args)
    for method in methods:
        trainer = fxreplay.Trainer(pipe, method=method, loss_fn=loss_fn)
        assert all(torch.isfinite(torch.tensor([trainer.step(batch, target) for _ in range(2)])))
    return pipe


def _lm_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1))


@pytest.mark.slow
def test_hugging_face_opt_bart_vitmae() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(3, 64, (2, 10))
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4, max_position_embeddings=32,
        word_embed_proj_dim=32, use_cache=False))
    _hf_check(opt, (ids,), {}, 3, _lm_loss, ids)
    bart = transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32, use_cache=False))
    decoder_ids = torch.randint(3, 64, (2, 9))
    kwargs = {"input_ids": ids, "decoder_input_ids": decoder_ids, "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    _hf_check(bart, (), kwargs, 3, _lm_loss, decoder_ids, methods=("bp", "fr", "ddg", "dni"))
    mae = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=4, decoder_intermediate_size=64))
    _hf_check(mae, (torch.randn(2, 3, 16, 16),), {}, 3, lambda out, y: out.loss, torch.zeros(2))


@pytest.mark.parametrize("experts", ["eager", "grouped_mm"])
def test_hugging_face_mixtral(experts: str) -> None:
    """The eager experts loop over the experts hit (kept opaque); grouped_mm traces, but its fake kernel refuses float32
    (the tracer takes the real value)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32, use_cache=False, experts_implementation=experts))
    ids = torch.randint(0, 64, (2, 12))
    pipe = _hf_check(model, (ids,), {}, 4, _lm_loss, ids)
    assert pipe.plan.balance <= 1.3
    assert len(pipe.plan.model.opaque) == (4 if experts == "eager" else 0)

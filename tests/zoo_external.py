"""Models written the way people write them outside this repository, for the compiler tests.

Each one exercises a way plain symbolic tracing goes wrong: ``NanoGPT`` is nanoGPT's model
code (Karpathy, MIT) as written — the causal mask sliced by a size read from ``x.size()``,
``assert t <= block_size``, dropout, weight tying — ``SdpaGPT`` reads ``self.training`` to
choose its attention dropout; ``EncoderClassifier`` is built from ``nn.TransformerEncoder``;
the others return dicts and dataclasses, keep an EMA in a buffer, or checkpoint a block.
"""
from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    block_size: int = 16  # longest sequence the mask covers
    vocab_size: int = 64  # bytes would be 256; small keeps the tests fast
    n_layer: int = 4
    n_head: int = 2
    n_embd: int = 32
    dropout: float = 0.1  # non-zero: train and eval must differ
    bias: bool = True
    tie: bool = False  # nanoGPT ties wte and lm_head; the tests turn it on where it matters


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention, manual path (mask buffer sliced by T)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.register_buffer(
            "bias", torch.tril(torch.ones(config.block_size, config.block_size)).view(1, 1, config.block_size, config.block_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class SdpaAttention(nn.Module):
    """nanoGPT's flash path: the dropout probability depends on ``self.training``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, sdpa: bool = False) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SdpaAttention(config) if sdpa else CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's GPT (forward returns logits for every position)."""

    def __init__(self, config: GPTConfig | None = None, sdpa: bool = False) -> None:
        super().__init__()
        config = config or GPTConfig()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, sdpa) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie:
            self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        device = idx.device
        b, t = idx.size()
        assert t <= self.config.block_size, f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=device)
        tok_emb = self.transformer.wte(idx)
        pos_emb = self.transformer.wpe(pos)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        return self.lm_head(x)


def SdpaGPT(config: GPTConfig | None = None) -> NanoGPT:
    return NanoGPT(config, sdpa=True)


class EncoderClassifier(nn.Module):
    """A classifier on ``nn.TransformerEncoder`` (a torch.nn container of 4 layers)."""

    def __init__(self, vocab: int = 50, d: int = 32, layers: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(dim=1))


class DictNet(nn.Module):
    """Returns a dict, as every Hugging Face model does."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"logits": self.head(h), "features": h, "scale": 2}


@dataclass
class NetOutput:
    logits: torch.Tensor
    aux: tuple[torch.Tensor, torch.Tensor]


Pair = namedtuple("Pair", ["logits", "hidden"])


class DataclassNet(nn.Module):
    """Returns a dataclass holding a tensor and a tuple of tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> NetOutput:
        h = torch.tanh(self.a(x))
        g = torch.tanh(self.b(h))
        return NetOutput(logits=self.c(g), aux=(h, g))


class NamedTupleNet(DataclassNet):
    def forward(self, x: torch.Tensor) -> Pair:  # type: ignore[override]
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return Pair(self.c(h), h)


class EMANet(nn.Module):
    """Keeps an exponential moving average of its features in a buffer, in train mode only,
    and normalises by it (BatchNorm-like state outside torch.nn.BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.register_buffer("ema", torch.ones(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if self.training:
            self.ema.mul_(0.9).add_(h.detach().abs().mean(0) * 0.1)
        h = h / (self.ema + 1.0)
        return self.c(torch.relu(self.b(h)))


class CheckpointedNet(nn.Module):
    """A block wrapped in non-reentrant activation checkpointing (two spellings)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
        self.block2 = nn.Sequential(nn.Linear(16, 16), nn.GELU())
        self.c = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = h + torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=False)
        h = h + checkpoint(self.block2, h, use_reentrant=False)
        return self.c(h)


class SizeLoop(nn.Module):
    """A Python loop over ``x.size(1)``: unrolled for the example's length, guarded."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros_like(x[:, 0])
        for i in range(x.size(1)):
            h = torch.tanh(self.cell(h) + x[:, i])
        return self.out(h)


class Scaled(nn.Module):
    """Three operations, with a bare parameter read (``get_attr``) between the first two."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) * self.scale)

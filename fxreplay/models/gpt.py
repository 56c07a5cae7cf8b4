"""A small GPT (nanoGPT's shape): token and position embeddings, pre-norm blocks of causal
self-attention and an MLP, a final LayerNorm and a language-model head tied to the token
embedding -- the structure GPT-2, nanoGPT and most language models share. The tie makes the
embedding a parameter of the first and the last stage (see
:func:`fxreplay.compiler.split.replicate_shared`).

``gpt_tiny()`` is sized for a CPU: with the defaults (4 blocks of width 128, 64-token blocks,
a 256-symbol byte vocabulary, 0.8 M parameters) a training step on a batch of 32 takes a
few tens of milliseconds here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "gpt_tiny"]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position i sees positions <= i."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """x + attention(LN(x)), then x + MLP(LN(x)) with a 4x wider GELU layer."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token ids ``(B, T)`` with ``T <= block_size`` -> next-token logits ``(B, T, vocab)``.

    Args:
        vocab: number of token ids (256 for bytes).
        block_size: the longest sequence (the position table's size).
        layers, heads, width: the transformer's shape.
        dropout: on embeddings, attention and residual branches (0: deterministic).
        tie: the output head uses the token embedding's matrix (GPT-2's weight tying).
    """

    def __init__(self, vocab: int = 256, block_size: int = 64, layers: int = 4, heads: int = 4, width: int = 128,
                 dropout: float = 0.0, tie: bool = True) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab, width)
        self.pos_emb = nn.Embedding(block_size, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(width, heads, dropout) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tie:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                # GPT-2: residual projections scaled down by the depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        positions = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))
        return self.head(self.ln_f(self.blocks(x)))


def gpt_tiny(num_classes: int = 256, block_size: int = 64, layers: int = 4, heads: int = 4, width: int = 128,
             dropout: float = 0.0) -> GPT:
    """The zoo's GPT: a byte-level language model (``num_classes`` = vocabulary size) with a
    tied embedding, CPU-sized (see the module docstring)."""
    return GPT(vocab=num_classes, block_size=block_size, layers=layers, heads=heads, width=width, dropout=dropout, tie=True)

"""A Hugging Face GPT-2 (small random config, nothing downloaded) for `fxreplay partition`.

    fxreplay partition examples/hf_gpt2.py --K 4

Needs `pip install transformers`. The key/value cache is off (training does not use it, and
a graph cannot return its cache object). The word embedding is untied from the output head:
a weight shared by the first and the last stage would keep the whole model in one stage.
"""
from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def build_model() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=4, n_head=4,
                        use_cache=False, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def example_inputs() -> tuple[torch.Tensor]:
    """Token ids: a batch of 8 sequences of 64 bytes."""
    return (torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0)),)

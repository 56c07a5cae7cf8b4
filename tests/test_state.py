"""fxreplay.state: RNG captured and replayed, streams and buffers left as they were."""
from __future__ import annotations

import torch

from fxreplay.state import capture_rng, forked_rng, kept_buffers, restored_rng


def test_restored_rng_replays_the_same_numbers_and_leaves_the_stream() -> None:
    cpu = torch.device("cpu")
    state = capture_rng(cpu)
    first = torch.rand(3)
    after = torch.get_rng_state()
    with restored_rng(state, cpu):
        assert torch.equal(torch.rand(3), first)
    assert torch.equal(torch.get_rng_state(), after)


def test_forked_rng_and_kept_buffers_undo_the_block() -> None:
    before = torch.get_rng_state()
    buf = torch.ones(3)
    with forked_rng(), kept_buffers([buf]):
        torch.rand(5)
        buf.mul_(7)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(buf, torch.ones(3))

"""Shared fixtures: a fixed seed and single-threaded, deterministic torch."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(autouse=True)
def seed() -> int:
    torch.manual_seed(0)
    return 0


@pytest.fixture
def examples_dir() -> Path:
    return ROOT / "examples"

# One intra-op thread: the tests' small tensors gain nothing from two, and results are then
# independent of what else runs on the machine.
torch.set_num_threads(1)

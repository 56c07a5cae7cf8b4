"""fxreplay.executor.channel: a message's spec travels as plain data, its types kept."""
from __future__ import annotations

import json

import pytest
import torch

from fxreplay.errors import TrainingError
from fxreplay.executor.channel import _spec_of, decode_spec, encode_spec


def test_spec_round_trips_as_json_with_types_kept() -> None:
    values = (torch.ones(2, 3), None, 7, True, 2.5, "x", torch.Size([4, 5]), (1, [2, 3]), torch.float16, torch.device("cpu"))
    spec = _spec_of(values)
    raw = encode_spec(spec)
    json.loads(raw)  # plain JSON: nothing to unpickle
    back = decode_spec(raw)
    assert back == spec
    assert type(back[3][1]) is bool and type(back[2][1]) is int and type(back[6][1]) is torch.Size
    assert encode_spec(_spec_of((True,))) != encode_spec(_spec_of((1,)))  # a spec change is noticed


def test_values_that_cannot_travel_are_a_clear_error() -> None:
    with pytest.raises(TrainingError, match="boundary carries a builtins.object value"):
        encode_spec(_spec_of((object(),)))
    with pytest.raises(TrainingError, match="unknown dtype"):
        decode_spec(json.dumps([["t", [1], "not_a_dtype"]]).encode())

"""fxreplay.metrics: predictions found in any output, losses and metrics by output shape."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fxreplay.errors import DataError
from fxreplay.metrics import Evaluation, correct_count, default_loss, predictions


def test_predictions_are_found_in_every_kind_of_output() -> None:
    t = torch.randn(2, 3)
    assert predictions(t) is t
    assert predictions({"logits": t, "hidden": torch.zeros(1)}) is t
    assert predictions({"only": t}) is t
    assert predictions({"a": t, "b": t}) is None  # ambiguous: loss only
    assert predictions((t, torch.zeros(1))) is t

    class Out:
        logits = t

    assert predictions(Out()) is t
    assert predictions([1, 2]) is None


def test_default_loss_is_cross_entropy_per_example_and_per_token() -> None:
    scores, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(default_loss(scores, y), F.cross_entropy(scores, y))
    seq, tokens = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    torch.testing.assert_close(default_loss({"logits": seq}, tokens), F.cross_entropy(seq.reshape(6, 7), tokens.reshape(6)))
    with pytest.raises(ValueError, match="pass loss_fn="):
        default_loss({"a": seq, "b": seq}, tokens)


def test_default_loss_refuses_targets_out_of_range_but_skips_the_ignore_index() -> None:
    scores = torch.randn(4, 5)
    for bad in ([0, 1, 5, 2], [0, -1, 2, 3]):
        with pytest.raises(DataError, match=rf"target\(s\) \[{bad[2] if bad[2] == 5 else -1}\].*predicts 5 classes.*model.num_classes"):
            default_loss(scores, torch.tensor(bad))
    seq, tokens = torch.randn(2, 3, 7), torch.tensor([[0, 1, -100], [6, -100, 2]])
    kept = tokens.reshape(-1) != -100
    torch.testing.assert_close(default_loss(seq, tokens), F.cross_entropy(seq.reshape(6, 7)[kept], tokens.reshape(-1)[kept]))
    soft = torch.softmax(torch.randn(4, 5), -1)  # probabilities as targets: no class check
    torch.testing.assert_close(default_loss(scores, soft), F.cross_entropy(scores, soft))


def test_accuracy_counts_examples_or_tokens() -> None:
    scores = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    assert correct_count(scores, torch.tensor([0, 1, 1])) == (2, 3)
    seq = torch.zeros(2, 2, 3)
    seq[..., 1] = 1.0
    assert correct_count(seq, torch.tensor([[1, 1], [1, 0]])) == (3, 4)
    assert correct_count(torch.randn(3), torch.tensor([0, 1, 2])) == (0, 0)  # not class scores


def test_evaluation_weights_batches_by_size_and_adds_perplexity_for_sequences() -> None:
    ev = Evaluation(metrics={"mean_logit": lambda out, y: float(out.mean())})
    ev.add(torch.ones(2, 2, 3), torch.zeros(2, 2, dtype=torch.long), loss=1.0)
    ev.add(torch.zeros(6, 2, 3), torch.zeros(6, 2, dtype=torch.long), loss=2.0)
    result = ev.result()
    assert result["samples"] == 8 and result["loss"] == pytest.approx((2 * 1.0 + 6 * 2.0) / 8)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["mean_logit"] == pytest.approx(2 / 8)
    classes = Evaluation()
    classes.add(torch.randn(3, 4), torch.tensor([0, 1, 2]), loss=0.5)
    assert set(classes.result()) == {"loss", "samples", "accuracy"}
    other = Evaluation()
    other.add(torch.randn(3), torch.randn(3), loss=0.5)
    assert set(other.result()) == {"loss", "samples"}

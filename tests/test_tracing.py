"""The tracer: concrete values with guards, buffers as graph values, both modes, containers
traced through, structured outputs, checkpointed regions, and errors that name the cause."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

import zoo_external as Z
from fxreplay.errors import ShapeGuardError, TraceError
from fxreplay.compiler.tracing import guard, trace, trace_modes


def _ops(gm: fx.GraphModule) -> list[str]:
    return [str(n.target) if n.op != "call_function" else getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes]


def test_sizes_read_as_values_trace_with_guards() -> None:
    model = Z.NanoGPT()
    traced = trace(model, example_inputs=(torch.randint(0, 64, (4, 16)),))
    guards = [n for n in traced.gm.graph.nodes if n.target is guard]
    assert len(guards) == 1 and "assert t <= self.config.block_size" in guards[0].args[2]
    # The mask is sliced by a symbolic size: a shorter sequence and another batch size work.
    for shape in [(3, 16), (2, 9)]:
        ids = torch.randint(0, 64, shape)
        model.eval()
        traced_eval = trace(model, example_inputs=(torch.randint(0, 64, (4, 16)),))
        torch.testing.assert_close(traced_eval.gm(ids), model(ids))
    with pytest.raises(ShapeGuardError, match=r"zoo_external.py:\d+: `assert t <= self.config.block_size.*gave True.*give False"):
        traced.gm(torch.randint(0, 64, (2, 17)))


def test_python_loop_over_a_size_is_unrolled_and_guarded() -> None:
    model = Z.SizeLoop()
    traced = trace(model, example_inputs=(torch.randn(3, 5, 8),))
    assert _ops(traced.gm).count("cell") == 5
    x = torch.randn(7, 5, 8)  # another batch size: fine
    torch.testing.assert_close(traced.gm(x), model(x))
    with pytest.raises(ShapeGuardError, match=r"range\(x.size\(1\)\).*gave 5.*give 6"):
        traced.gm(torch.randn(3, 6, 8))


class _DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


def test_branch_on_tensor_values_names_the_right_cause() -> None:
    with pytest.raises(TraceError, match=r"test_tracing.py:\d+: `if x.sum\(\) > 0:`: .*depends on a tensor's values \(data-dependent control flow\)"):
        trace(nn.Sequential(nn.Linear(2, 2), _DataDependent()), example_inputs=(torch.randn(3, 2),))


def test_buffer_written_in_forward_is_a_graph_node() -> None:
    model = Z.EMANet()
    train, evaluation = trace_modes(model, example_inputs=(torch.randn(4, 8),))
    assert {"mul_", "add_"} <= set(_ops(train.gm))
    assert evaluation is not None and "mul_" not in _ops(evaluation.gm)
    before = model.ema.clone()
    assert torch.equal(model.ema, before)  # tracing left the buffer as it was
    x = torch.randn(4, 8)
    train.gm(x)
    expected = before * 0.9 + torch.relu(model.a(x)).abs().mean(0) * 0.1
    torch.testing.assert_close(model.ema, expected)


def test_modes_differ_only_where_the_model_reads_self_training() -> None:
    assert trace_modes(Z.NanoGPT(), example_inputs=(torch.randint(0, 64, (2, 8)),))[1] is None  # nn.Dropout decides by itself
    train, evaluation = trace_modes(Z.SdpaGPT(), example_inputs=(torch.randint(0, 64, (2, 8)),))
    assert evaluation is not None
    p = [n.kwargs.get("dropout_p") for n in train.gm.graph.nodes if "scaled_dot_product" in str(n.target)]
    q = [n.kwargs.get("dropout_p") for n in evaluation.gm.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert set(p) == {0.1} and set(q) == {0.0}


def test_model_mode_is_restored_and_no_attribute_left_on_it() -> None:
    model = Z.SdpaGPT().eval()
    attributes = set(model.__dict__)
    trace_modes(model, example_inputs=(torch.randint(0, 64, (2, 8)),))
    assert not model.training and set(model.__dict__) == attributes


def test_transformer_encoder_is_traced_through_but_attention_stays_a_leaf() -> None:
    traced = trace(Z.EncoderClassifier(), example_inputs=(torch.randint(0, 50, (2, 6)),))
    modules = [str(n.target) for n in traced.gm.graph.nodes if n.op == "call_module"]
    assert "encoder" not in modules
    assert [m for m in modules if m.endswith("self_attn")] == [f"encoder.layers.{i}.self_attn" for i in range(4)]
    assert trace(Z.EncoderClassifier(), ["TransformerEncoder"], (torch.randint(0, 50, (2, 6)),)).gm.graph.find_nodes(op="call_module", target="encoder")


@pytest.mark.parametrize("cls, kind", [(Z.DictNet, dict), (Z.DataclassNet, Z.NetOutput), (Z.NamedTupleNet, Z.Pair)])
def test_structured_outputs_are_flattened_with_a_spec(cls: type, kind: type) -> None:
    model = cls()
    traced = trace(model, example_inputs=(torch.randn(3, 8),))
    assert traced.out_spec is not None
    flat = traced.gm(torch.randn(3, 8))
    assert type(flat) is tuple
    assert type(torch.utils._pytree.tree_unflatten(list(flat), traced.out_spec)) is kind


def test_plain_outputs_keep_no_spec() -> None:
    assert trace(nn.Linear(2, 2), example_inputs=(torch.randn(1, 2),)).out_spec is None


def test_checkpointed_regions_are_reported_with_their_lines() -> None:
    traced = trace(Z.CheckpointedNet(), example_inputs=(torch.randn(3, 8),))
    lines = [line for _, line in traced.checkpointed]
    assert len(lines) == 2
    assert "torch.utils.checkpoint.checkpoint(self.block" in lines[0] and "checkpoint(self.block2" in lines[1]


class _Cached(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, object]:
        return x * 2, object()


def test_an_output_object_a_graph_cannot_return_is_a_clear_error() -> None:
    with pytest.raises(TraceError, match="returns a builtins.object object among its outputs"):
        trace(_Cached(), example_inputs=(torch.randn(2),))


def test_without_example_inputs_control_flow_still_fails_clearly() -> None:
    with pytest.raises(TraceError, match="control flow"):
        trace(Z.NanoGPT())

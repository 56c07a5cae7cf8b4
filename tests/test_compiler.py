"""The compiler end to end: stages composed == the original model; plans round-trip."""
from __future__ import annotations

import copy

import itertools

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import fxreplay
from fxreplay.compiler import resolve_cost
from fxreplay.errors import PartitionError, PlanError, TraceError, TrainingError
from fxreplay.compiler.loading import load_model
from fxreplay.models import get
from fxreplay.compiler.split import run_chain


def _assert_transparent(model: nn.Module, inputs: tuple[torch.Tensor, ...], K: int) -> fxreplay.Pipeline:
    model.eval()
    with torch.no_grad():
        expected = model(*inputs)
    pipe = fxreplay.compile(model, inputs, K=K, cost="flops")
    assert len(pipe.stages) == K and pipe.plan.K == K
    with torch.no_grad():
        got = pipe(*inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # every fx node in exactly one stage
    names = [n for s in pipe.plan.stages for n in s.nodes]
    assert len(names) == len(set(names))
    return pipe


# ResNet-164 at K=2 and 4 (K=3 is the small models'), the deep ones once each: every K cuts the same way.
@pytest.mark.parametrize(("name", "K"), [(name, K) for name in ("resnet20", "digits_cnn") for K in (2, 3, 4)]
                         + [("resnet164", 2), ("resnet164", 4), ("resnet101", 3), ("resnet152", 4)])
def test_zoo_stages_compose_to_the_model(name: str, K: int) -> None:
    model = get(name)
    x = torch.randn(2, 1, 8, 8) if name == "digits_cnn" else torch.randn(2, 3, 32, 32)
    pipe = _assert_transparent(model, (x,), K)
    if name == "resnet164" and K == 4:
        # FLOPs and boundary bytes both scale with the batch, so the balance at batch 2 is the
        # balance at batch 128 (the README's command profiles at 128).
        assert pipe.plan.balance <= 1.05, pipe.plan.balance


def _small_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )


TORCHVISION = {
    "resnet50": lambda: torchvision.models.resnet50(),
    "densenet121": lambda: torchvision.models.densenet121(),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(),
    "googlenet": lambda: torchvision.models.googlenet(aux_logits=False, init_weights=True),
    "small_vit": _small_vit,
}


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_branches_and_concats(name: str, K: int) -> None:
    size = 64 if name == "googlenet" else 32
    _assert_transparent(TORCHVISION[name](), (torch.randn(2, 3, size, size),), K)


def test_branchy_example_multi_input_and_tuple_boundaries(examples_dir: Path) -> None:
    loaded = load_model(str(examples_dir / "branchy_net.py"))
    assert loaded.example_inputs is not None
    pipe = _assert_transparent(loaded.model, loaded.example_inputs, 4)
    # skip connections cross some cut: some stage returns a tuple
    with torch.no_grad():
        value = loaded.example_inputs
        kinds = []
        for k, stage in enumerate(pipe.stages[:-1]):
            value = stage(*value) if isinstance(value, tuple) else stage(value)
            kinds.append(isinstance(value, tuple))
    assert any(kinds)


def test_training_the_stages_trains_the_model_with_original_keys() -> None:
    model = get("resnet20")
    pipe = fxreplay.compile(model, (torch.randn(2, 3, 32, 32),), K=3, cost="flops")
    keys = [set(s.state_dict()) for s in pipe.stages]
    assert set().union(*keys) == set(model.state_dict())
    assert all(a.isdisjoint(b) for i, a in enumerate(keys) for b in keys[i + 1:])
    sd = pipe.model_state_dict()
    fresh = get("resnet20")
    fresh.load_state_dict(sd)


def test_bp_through_stages_equals_bp_on_model() -> None:
    torch.manual_seed(1)
    model = get("resnet20").double()
    reference = get("resnet20").double()
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 2, 3, 4])
    pipe = fxreplay.compile(model, (x,), K=3, cost="flops")
    nn.functional.cross_entropy(run_chain(pipe.stages, x), y).backward()
    nn.functional.cross_entropy(reference(x), y).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_plan_round_trip(tmp_path: Path, examples_dir: Path) -> None:
    from fxreplay.compiler.plan import ModelSpec

    spec = str(examples_dir / "branchy_net.py")
    loaded = load_model(spec)
    pipe = fxreplay.compile(loaded.model, loaded.example_inputs, K=3, cost="flops", spec=ModelSpec(spec=spec))
    pipe.save(tmp_path / "plan")
    assert sorted(p.name for p in (tmp_path / "plan").iterdir()) == ["plan.yaml", "stage_0.py", "stage_1.py", "stage_2.py", "weights.pt"]
    again = fxreplay.load(tmp_path / "plan")
    assert again.plan == pipe.plan
    for a, b in zip(pipe.stages, again.stages):
        assert a.code == b.code
    loaded.model.eval(), again.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(*loaded.example_inputs), pipe(*loaded.example_inputs))


def test_pinned_boundaries_start_stages() -> None:
    pipe = fxreplay.compile(get("resnet20"), (torch.randn(2, 3, 32, 32),), K=3, cost="flops", boundaries=["layer2", "layer3.1"])
    firsts = [s.nodes[0] for s in pipe.plan.stages]
    assert firsts[1].startswith("layer2_0") and firsts[2].startswith("layer3_1")


def test_unknown_boundary_names_close_matches() -> None:
    with pytest.raises(PartitionError, match="'layer9' names no module.*layer"):
        fxreplay.compile(get("resnet20"), (torch.randn(2, 3, 32, 32),), K=2, cost="flops", boundaries=["layer9"])


def test_two_names_for_one_boundary_are_refused() -> None:
    # layer2 and layer2.0 start at the same node: pinning both would silently pin one cut
    with pytest.raises(PartitionError, match=r"'layer2' and 'layer2.0' start at the same place"):
        fxreplay.compile(get("resnet20"), (torch.randn(2, 3, 32, 32),), K=3, cost="flops", boundaries=["layer2", "layer2.0"])


def test_K_above_possible_cuts() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(PartitionError, match="K=5 stages need 4 cuts but this model allows only 2"):
        fxreplay.compile(model, (torch.randn(2, 4),), K=5, cost="flops")


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 8, bias=False)
        self.mid = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 8, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.embed(x)))


def _bp_matches_the_model(model: nn.Module, x: torch.Tensor, K: int, steps: int = 5) -> fxreplay.Pipeline:
    """BP through the K stages takes the model's own SGD steps (shared weights included)."""
    whole = copy.deepcopy(model)
    pipe = fxreplay.compile(model, (x,), K=K, cost="flops")
    sgd = lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)  # noqa: E731
    opt = sgd(whole.parameters())
    trainer = fxreplay.Trainer(pipe, method="bp", optimizer=sgd, loss_fn=lambda out, y: (out - y).pow(2).mean())
    g = torch.Generator().manual_seed(2)
    width = whole(x).shape[1]
    for _ in range(steps):
        xb, yb = torch.randn(x.shape, generator=g), torch.randn(x.shape[0], width, generator=g)
        opt.zero_grad()
        (whole(xb) - yb).pow(2).mean().backward()
        opt.step()
        trainer.step(xb, yb)
    trained = trainer.model_state_dict()
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(trained[name], value, atol=1e-6, rtol=0, msg=name)
    return pipe


def test_tied_weights_are_copied_into_each_stage_that_uses_them() -> None:
    model = _Tied()
    pipe = _bp_matches_the_model(model, torch.randn(3, 8), K=2)
    assert [s.replicas for s in pipe.plan.stages] == [("embed.weight",), ("embed.weight",)]
    assert pipe.stages[0].embed.weight is model.embed.weight  # the first holder keeps the original
    assert pipe.stages[1].head.weight is not model.embed.weight
    assert torch.equal(pipe.stages[1].head.weight, pipe.stages[0].embed.weight)


class _TiedMiddle(nn.Module):
    """Two different Linear modules sharing one weight, with room for cuts around them."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.tie_a = nn.Linear(8, 8)
        self.tie_b = nn.Linear(8, 8)
        self.tie_b.weight = self.tie_a.weight
        self.post = nn.Sequential(nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.tie_b(torch.tanh(self.tie_a(self.pre(x)))))


@pytest.mark.parametrize("K", [2, 3, 4])
def test_tied_weights_in_the_middle_give_one_tensor_per_stage(K: int) -> None:
    model = _TiedMiddle()
    x = torch.randn(3, 8)
    pipe = _assert_transparent(model, (x,), K)
    users = {k for k, s in enumerate(pipe.plan.stages) for n in s.nodes if n.startswith("tie_")}
    for k, stage in enumerate(pipe.stages):
        held = {id(p) for name, p in stage.named_parameters(remove_duplicate=False) if name in ("tie_a.weight", "tie_b.weight")}
        assert len(held) == (1 if k in users else 0)  # within a stage the two uses stay one tensor
    assert {s.index for s in pipe.plan.stages if s.replicas} == (users if len(users) > 1 else set())
    _bp_matches_the_model(_TiedMiddle(), x, K)


class _Reused(nn.Module):
    """One Linear called twice, with a cut possible between the calls only outside them."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(8, 8)
        self.shared = nn.Linear(8, 8)
        self.post = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.shared(torch.relu(self.shared(self.pre(x)))))


def test_a_module_reused_across_stages_gets_its_gradients_summed() -> None:
    pipe = _bp_matches_the_model(_Reused(), torch.randn(3, 8), K=3)
    owners = {k for k, s in enumerate(pipe.plan.stages) for n in s.nodes if n.startswith("shared")}
    assert len(owners) == 2  # the two calls went to different stages: each holds a copy
    assert all(s.replicas == ("shared.bias", "shared.weight") for s in pipe.plan.stages if s.index in owners)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Branchy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return x * 2
        return x


def test_untraceable_model_names_module_and_line() -> None:
    """With strict=True (the automatic opaque fallback off: tests/test_any_model_round3.py)."""
    with pytest.raises(TraceError, match=r"module 'block' \(_Branchy\) at .*test_compiler.py:\d+: `if x.sum\(\) > 0:.*--leaf _Branchy"):
        fxreplay.compile(_Untraceable(), (torch.randn(2, 2),), K=1, cost="flops", strict=True)


def test_leaf_module_makes_it_traceable() -> None:
    model = nn.Sequential(nn.Linear(2, 2), _Branchy(), nn.Linear(2, 2))
    x = torch.randn(2, 2)
    pipe = fxreplay.compile(model, (x,), K=2, cost="flops", leaf_modules=["_Branchy"])
    # the leaf is one opaque call of the module (its data-dependent `if` runs at call time) ...
    calls = [n for s in pipe.stages for n in s.graph.nodes if n.op == "call_module"]
    assert [str(n.target) for n in calls if str(n.target).startswith("1")] == ["1"]
    assert not any(n.op == "call_method" and n.target == "sum" for s in pipe.stages for n in s.graph.nodes)
    # ... and takes either branch, like the model, for inputs that go either way
    g = torch.Generator().manual_seed(0)
    inputs = [10 * torch.randn(2, 2, generator=g) for _ in range(12)]
    assert {bool(model[0](inp).sum() > 0) for inp in inputs} == {True, False}
    with torch.no_grad():
        for inp in inputs:
            torch.testing.assert_close(pipe(inp), model(inp))


def test_memory_caps_infeasible() -> None:
    with pytest.raises(PartitionError, match="memory"):
        fxreplay.compile(get("resnet20"), (torch.randn(2, 3, 32, 32),), K=2, cost="flops", devices=["cpu/1KiB", "cpu/1KiB"])


def test_heterogeneous_devices_give_faster_device_more_work() -> None:
    pipe = fxreplay.compile(get("resnet20"), (torch.randn(2, 3, 32, 32),), K=2, cost="flops", method="bp", devices=["cpu", "cuda:0@3"])
    by_device = {s.device: s.flops_fwd + s.flops_bwd for s in pipe.plan.stages}
    assert by_device["cuda:0"] > 2 * by_device["cpu"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(K=5), "K is 5 but 3 stages are listed"),
        (lambda d: d.update(colour="red"), "unknown key.*'colour'"),
        (lambda d: d["stages"][0].update(nodez=[]), r"stages\[0\]: unknown key.*'nodez'"),
        (lambda d: d["stages"][0]["nodes"].pop(), "nodes of the model in no stage"),
        (lambda d: d["stages"][1]["nodes"].append("ghost"), "the model does not have: ghost"),
        (lambda d: d["stages"].reverse(), "index is 2"),
        (lambda d: d["stages"][0].update(flops_fwd="many"), r"flops_fwd: expected int, got 'many'"),
    ],
)
def test_hand_edited_plan_is_validated(tmp_path: Path, examples_dir: Path, edit, message: str) -> None:
    import yaml

    from fxreplay.compiler.plan import ModelSpec

    spec = str(examples_dir / "branchy_net.py")
    loaded = load_model(spec)
    fxreplay.compile(loaded.model, loaded.example_inputs, K=3, cost="flops", spec=ModelSpec(spec=spec)).save(tmp_path)
    data = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    edit(data)
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(PlanError, match=message):
        fxreplay.load(tmp_path)


def test_malformed_yaml(tmp_path: Path) -> None:
    (tmp_path / "plan.yaml").write_text("K: [1,\n")
    with pytest.raises(PlanError, match="not valid YAML"):
        fxreplay.load(tmp_path)


def test_time_cost_on_a_chosen_device_leaves_the_model_alone() -> None:
    model = get("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pipe = fxreplay.compile(model, (torch.randn(2, 3, 32, 32),), K=2, cost="time", repeats=2, profile_device="cpu")
    assert pipe.plan.bottleneck > 0 and all(s.predicted_cost > 0 for s in pipe.plan.stages)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats restored


def test_profile_on_a_missing_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(TraceError, match="cannot profile on cuda:3"):
        fxreplay.compile(get("resnet20"), (torch.randn(2, 3, 32, 32),), K=2, cost="flops", profile_device="cuda:3")


def test_a_cut_right_before_an_inplace_op_clones_the_stage_input() -> None:
    # FR stores a stage's input and replays it; ReLU(inplace=True) as a stage's first op
    # would otherwise overwrite the history (or fail on a leaf that requires grad).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    pipe = fxreplay.compile(model, (x,), K=2, cost="flops", boundaries=["1"])
    assert pipe.plan.stages[1].nodes[0] == "_1"
    assert "clone" in pipe.stages[1].code
    # The same model with an out-of-place ReLU is the reference: FR must train both alike,
    # which it would not if the in-place op overwrote the stored input it replays.
    reference = nn.Sequential(model[0], nn.ReLU(), model[2])
    ref_pipe = fxreplay.compile(copy.deepcopy(reference), (x,), K=2, cost="flops", boundaries=["1"])
    trainer = fxreplay.Trainer(pipe, method="fr", loss_fn=nn.CrossEntropyLoss())
    ref = fxreplay.Trainer(ref_pipe, method="fr", loss_fn=nn.CrossEntropyLoss())
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        xb = torch.randn(5, 4, generator=g)
        assert trainer.step(xb, y) == ref.step(xb, y)
    for a, b in zip(trainer.model_state_dict().values(), ref.model_state_dict().values()):
        assert torch.equal(a, b)


def test_auto_cost_measures_time_where_the_stages_run() -> None:
    assert resolve_cost("auto", ["cpu", "cpu"]) == "time"
    assert resolve_cost("auto", ["cuda:0", "cuda:1"]) == "flops"  # this CPU's times say nothing about a GPU
    assert resolve_cost("auto", ["cuda:0", "cuda:1"], profile_device="cuda:0") == "time"
    assert resolve_cost("flops", ["cpu"]) == "flops"
    model = get("resnet20")
    assert fxreplay.compile(model, (torch.randn(2, 3, 32, 32),), K=2).plan.cost == "time"
    assert fxreplay.compile(model, (torch.randn(2, 3, 32, 32),), K=2, devices=["cpu", "cuda:0"]).plan.cost == "flops"


def test_profiling_reports_progress_node_by_node() -> None:
    calls: list[tuple[int, int]] = []
    pipe = fxreplay.compile(get("resnet20"), (torch.randn(2, 3, 32, 32),), K=2, cost="flops", progress=lambda d, t: calls.append((d, t)))
    total = len(pipe.graph_module.graph.nodes)
    assert calls == [(i, total) for i in range(1, total + 1)]


def test_a_compiled_plan_saves_to_a_str_path_and_loads_with_just_the_model(tmp_path: Path) -> None:
    model = get("resnet20")
    x = torch.randn(4, 3, 32, 32)
    pipe = fxreplay.compile(model, (x,), K=2, cost="flops")
    pipe.save(str(tmp_path / "r20"))  # the README's snippet passes a str
    again = fxreplay.load(str(tmp_path / "r20"), model=model)  # input shape and batch come from the plan
    assert again.plan.model.input_shape == (3, 32, 32) and again.plan.model.batch_size == 4
    torch.testing.assert_close(again(x), pipe(x))


def test_time_is_measured_with_the_threads_a_stage_will_have(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = fxreplay.compiler.profile

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fxreplay.compiler, "profile", spy)
    monkeypatch.setattr(fxreplay.compiler.os, "cpu_count", lambda: 8)
    before = torch.get_num_threads()
    x = (torch.randn(2, 3, 32, 32),)
    fxreplay.compile(get("resnet20"), x, K=4, cost="time", repeats=1, refine=0)  # the refinement: in test_model_families
    fxreplay.compile(get("resnet20"), x, K=2, cost="time", repeats=1, threads=3, refine=0)
    fxreplay.compile(get("resnet20"), x, K=4, cost="flops")
    assert seen == [2, 3, before] and torch.get_num_threads() == before


def test_measured_refinement_moves_the_cuts_toward_the_true_balance() -> None:
    from fxreplay.compiler.refine import refined as _refined
    from fxreplay.partition import Device, Problem, solve

    # 12 nodes that the per-node profile says cost 1 each; really the first 4 cost 3 each.
    true = [3.0] * 4 + [1.0] * 8
    n = len(true)
    problem = Problem(fwd=(1.0,) * n, bwd=(0.0,) * n, cut_bytes=(0.0,) * (n + 1), static_bytes=(0.0,) * n,
                      act_bytes=(0.0,) * n, allowed=(False,) + (True,) * (n - 1) + (False,))
    devs = [Device()] * 2
    measured_calls = []

    def measure(part, known):  # type: ignore[no-untyped-def]
        measured_calls.append(part.cuts)
        return [sum(true[a:b]) for a, b in part.ranges]

    first = solve(problem, 2, devs)
    assert measure(first, [False, False]) == [14.0, 6.0]  # the per-node split, 6 | 6 nodes, is far off
    reported: list[int] = []
    refined = _refined(first, problem, 2, devs, measure, rounds=2, progress=lambda done, total: reported.append(done))
    assert max(sum(true[a:b]) for a, b in refined.ranges) <= 11.0  # the true optimum is 10 | 10
    assert reported == sorted(set(reported)) and reported[-1] == 3  # each round once, and complete


def test_the_refinement_reports_its_rounds() -> None:
    """compile(refine_progress=...) hears each round of timing the stages whole (the CLI's bar)."""
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(6)])
    rounds: list[tuple[int, int]] = []
    fxreplay.compile(model, (torch.randn(16, 32),), K=2, cost="time", repeats=1, refine=2,
                     refine_progress=lambda done, total: rounds.append((done, total)))
    assert rounds[0] == (1, 3) and rounds[-1] == (3, 3) and all(t == 3 for _, t in rounds)  # complete, also when it stops early
    assert [d for d, _ in rounds] == sorted(set(d for d, _ in rounds))  # in order, each once


def test_a_model_that_reads_self_training_round_trips_both_graphs(tmp_path: Path) -> None:
    import zoo_external as Z

    torch.manual_seed(0)
    model = Z.SdpaGPT()
    ids = torch.randint(0, 64, (3, 16))
    pipe = fxreplay.compile(model, (ids,), K=2, cost="flops")
    pipe.save(tmp_path / "plan")
    source = (tmp_path / "plan" / "stage_0.py").read_text()
    assert "def forward(" in source and "def forward_eval(" in source and "dropout_p = 0.0" in source
    again = fxreplay.load(tmp_path / "plan", model=model)
    assert again.eval_graph_module is not None
    again.eval()
    model.eval()
    torch.testing.assert_close(again(ids), model(ids))


def test_stage_and_module_modes_must_agree() -> None:
    import zoo_external as Z

    model = Z.SdpaGPT()
    ids = torch.randint(0, 64, (2, 8))
    pipe = fxreplay.compile(model, (ids,), K=2, cost="flops")
    model.eval()  # the model's modules, not the stages
    with pytest.raises(TrainingError, match=r"pipe.train\(\) / pipe.eval\(\)"):
        pipe(ids)
    pipe.eval()
    torch.testing.assert_close(pipe(ids), model(ids))


class _Recurrent(nn.Module):
    """nn.LSTM returns (out, (h, c)): a tuple of tensors that no cut may carry whole."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.side = nn.Linear(8, 8)
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.lstm(self.inp(x))
        side = torch.relu(self.side(self.inp(x)))  # work between the LSTM and its unpacking
        seq, (h, _) = state
        return self.out(torch.cat([seq[:, -1] + side[:, -1], h[0]], dim=-1))


def test_no_cut_carries_a_tuple_of_tensors() -> None:
    x = torch.randn(3, 5, 4)
    model = _Recurrent()
    for K in (2, 3, 4):
        pipe = fxreplay.compile(model, (x,), K=K, cost="uniform")
        crossing = [pipe.cost_graph.crossing(b) for b in itertools.accumulate(len(s.nodes) for s in pipe.plan.stages[:-1])]
        assert not [n.name for c in crossing for n in c if n.meta.get("is_container")], K
        y = torch.randint(0, 2, (3,))
        trainer = fxreplay.Trainer(pipe, method="fr", loss_fn=nn.functional.cross_entropy)
        for _ in range(K + 1):
            trainer.step(x, y)
        assert all(p.grad is not None for p in model.inp.parameters())  # δ reached the first stage


def test_plan_weights_missing_or_foreign_are_refused(tmp_path: Path, examples_dir: Path) -> None:
    from fxreplay.compiler.plan import ModelSpec

    spec = str(examples_dir / "branchy_net.py")
    loaded = load_model(spec)
    fxreplay.compile(loaded.model, loaded.example_inputs, K=2, cost="flops", spec=ModelSpec(spec=spec)).save(tmp_path / "p")
    weights = tmp_path / "p" / "weights.pt"
    torch.save({"fc.weight": torch.zeros(1)}, weights)  # another model's
    with pytest.raises(PlanError, match="holds another model's weights"):
        fxreplay.load(tmp_path / "p")
    weights.unlink()
    with pytest.raises(PlanError, match="has no weights.pt"):
        fxreplay.load(tmp_path / "p")

"""benchmarks/stage_norms.py: each stage's weight norm against the first run's, the stages as the run's plan builds them."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from benchtools import benchmark
from clitools import run_cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two finished runs of the offline default (a BN CNN), K = 2, at different rates."""
    root = tmp_path_factory.mktemp("norms")
    for name, lr in (("slow", "0.01"), ("fast", "1.0")):
        assert run_cli("train", "--K", "2", "--max-steps", "20", "--lr", lr, "--out", str(root / name)).exit_code == 0
    return root / "slow", root / "fast"


def test_each_stage_is_the_plan_s_tensors(runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    script = benchmark("stage_norms")
    slow, fast = runs
    stages = script.stages_of(slow)
    assert len(stages) == 2 and not set(stages[0]) & set(stages[1])
    states = [torch.load(run / "model.pt", weights_only=True) for run in runs]
    assert set(stages[0]) | set(stages[1]) == set(states[0])  # every tensor of the model, in one stage
    expected = [[math.sqrt(sum(float(s[n].double().square().sum()) for n in names if s[n].ndim >= 2)) for names in stages]
                for s in states]
    script.main([str(slow), str(fast)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "stage", "0", "stage", "1"]
    assert [float(v) for v in lines[1].split()[1:3]] == pytest.approx(expected[0], abs=0.005)
    ratios = [f / s for f, s in zip(expected[1], expected[0])]
    assert [float(v) for v in lines[2].split()[1:3]] == pytest.approx(ratios, abs=0.005)
    assert ratios[0] > 1.2  # a rate 100x higher grows the weights: the ratio shows it


def test_bad_input_is_refused_with_what_to_do(runs: tuple[Path, Path], tmp_path: Path) -> None:
    script = benchmark("stage_norms")
    slow, _ = runs
    with pytest.raises(SystemExit, match="no model.pt"):
        script.main([str(slow), str(tmp_path / "missing")])
    other = tmp_path / "other"
    shutil.copytree(slow, other)
    torch.save({"fc.weight": torch.ones(2, 2)}, other / "model.pt")
    with pytest.raises(SystemExit, match="other tensors"):
        script.main([str(slow), str(other)])
    shutil.rmtree(other / "plan")
    with pytest.raises(SystemExit, match="plan/ does not rebuild the stages"):
        script.main([str(other), str(slow)])


def test_activity_counts_each_stage_s_relus(runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = benchmark("stage_norms")
    slow, fast = runs
    script.main(["--activity", "64", str(slow), str(fast)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ReLU outputs above 0") and lines[1].split() == ["run", "stage", "0", "stage", "1"]
    assert [line.split()[0] for line in lines[2:]] == [f"{r.parent.name}/{r.name}" for r in runs]
    base, images = script.relu_activity(slow, 64)
    assert images == 64
    assert len(base) == 2 and all(v is not None and 0 < v[0] < 1 and 0 <= v[1] < 1 for v in base)
    # switch the stem's first channel off for good: its BatchNorm's shift far below anything the input reaches
    off = tmp_path / "off"
    shutil.copytree(slow, off)
    state = torch.load(off / "model.pt", weights_only=True)
    state["bn1.bias"][0] = -1e4
    torch.save(state, off / "model.pt")
    dead, _ = script.relu_activity(off, 64)
    assert dead[0][1] > base[0][1] and dead[0][0] < base[0][0]  # one more channel never on, fewer outputs on
    state["bn1.bias"][:] = -1e4  # every stem channel off: its ReLU is all zeros, the next conv sees zeros
    torch.save(state, off / "model.pt")
    assert script.relu_activity(off, 64)[0][0][0] < dead[0][0]
    with pytest.raises(SystemExit, match="--activity takes"):
        script.main(["--activity", "-1", str(slow)])
    torch.save({"fc.weight": torch.ones(2, 2)}, off / "model.pt")
    with pytest.raises(SystemExit, match="model.pt and plan/ are of different models"):
        script.main(["--activity", "8", str(off)])
    shutil.rmtree(off / "plan")
    with pytest.raises(SystemExit, match="does not rebuild the run"):
        script.main(["--activity", "8", str(off)])


def test_sharpness_is_the_top_eigenvalue_of_each_stage_s_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A small MLP, K = 2: each stage's η·λ_max equals the largest eigenvalue of the dense Hessian of the loss with
    respect to that stage's parameters only (torch.autograd.functional.hessian, eigvalsh), on the same batch."""
    script = benchmark("stage_norms")
    (tmp_path / "net.py").write_text(
        "import torch.nn as nn\n"
        "def net():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 10))\n")
    run = tmp_path / "run"
    result = run_cli("train", "--model", f"{tmp_path / 'net.py'}:net", "--K", "2", "--lr", "0.3", "--max-steps", "15",
                     "--out", str(run))
    assert result.exit_code == 0, result.output
    measured, lr = script.stage_sharpness(run, 64)
    assert lr == pytest.approx(0.3)
    pipe, data = script._pipeline(run)
    from fxreplay.data import make_loader
    from fxreplay.data.sets import build_datasets
    x, y = next(iter(make_loader(build_datasets(data)[0], 64, shuffle=True, seed=1000, epoch=0)))
    pipe.train()
    for k, stage in enumerate(pipe.stages):
        names = [n for n, p in stage.named_parameters()]
        flat = torch.cat([p.detach().reshape(-1) for p in stage.parameters()])
        shapes = [p.shape for p in stage.parameters()]

        def loss(theta: torch.Tensor) -> torch.Tensor:
            parts, i = {}, 0
            for n, shape in zip(names, shapes):
                parts[n] = theta[i: i + shape.numel()].reshape(shape)
                i += shape.numel()
            h = x
            for j, s in enumerate(pipe.stages):
                h = torch.func.functional_call(s, parts, (h,)) if j == k else s(h)
            return torch.nn.functional.cross_entropy(h, y)

        top = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat)).max())
        assert measured[k] == pytest.approx(top, rel=5e-3)
    assert measured[0] != pytest.approx(measured[1], rel=0.05)  # two different blocks
    script.main(["--sharpness", "64", str(run), str(run)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["run", "stage", "0", "stage", "1"]
    assert [float(v) for v in lines[2].split()[1:]] == pytest.approx([0.3 * m for m in measured], abs=1.5e-3)
    with pytest.raises(SystemExit, match="not with --activity"):
        script.main(["--sharpness", "8", "--activity", "8", str(run)])

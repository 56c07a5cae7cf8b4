"""A plan someone sent does not run their code unless asked.

``plan.yaml``'s ``model.spec`` may name a Python file inside the plan directory; ``show``,
``train --plan`` and ``fxreplay.load`` would import it to rebuild the model. They refuse (one
paragraph, naming the file and ``--trust-plan-code`` / ``trust_code=True`` / ``model=``) and
nothing is imported; a zoo, torchvision or importable model, or a model file elsewhere (the
flow of ``fxreplay partition my_model.py --out plans/x`` then ``train --plan plans/x``), needs
no trust.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import fxreplay
from clitools import assert_user_error, run_cli
from fxreplay.errors import PlanError

MODEL = '''
from pathlib import Path

import torch

# What a plan's own code could do when imported: here, leave a mark next to the plan.
Path(__file__).resolve().parent.parent.joinpath("imported").write_text("ran")


def build_model(num_classes=10):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))
'''


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plan whose model file lies in the plan directory, as a plan someone sent could."""
    sent = tmp_path_factory.mktemp("made") / "sent"
    sent.mkdir()
    (sent / "model.py").write_text(MODEL)
    result = run_cli("partition", str(sent / "model.py"), "--K", "2", "--input-shape", "1,8,8", "--batch-size", "16",
                     "--cost", "flops", "--out", str(sent))
    assert result.exit_code == 0, result.output  # named on the command line: the user's own choice
    return sent


@pytest.fixture
def sent(made: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "sent"
    shutil.copytree(made, copy)
    data = yaml.safe_load((copy / "plan.yaml").read_text())
    data["model"]["spec"] = str(copy / "model.py")
    (copy / "plan.yaml").write_text(yaml.safe_dump(data))
    return copy


def _imported(sent: Path) -> bool:
    return (sent.parent / "imported").exists()


def test_show_refuses_a_plans_own_code_unless_trusted(sent: Path) -> None:
    assert_user_error(run_cli("show", str(sent)), f"importing {sent / 'model.py'}", "came with the plan", "--trust-plan-code")
    assert not _imported(sent) and not (sent / "graph.png").exists()
    assert run_cli("show", str(sent), "--no-png").exit_code == 0  # the table needs no model
    assert not _imported(sent)
    shown = run_cli("show", str(sent), "--trust-plan-code", "--png", str(sent.parent / "graph.png"))
    assert shown.exit_code == 0, shown.output
    assert _imported(sent)


def test_train_refuses_a_plans_own_code_unless_trusted(sent: Path, tmp_path: Path) -> None:
    for extra in ([], ["--nproc", "2"]):
        assert_user_error(run_cli("train", "--plan", str(sent), "--max-steps", "2", "--out", str(tmp_path / "run"), *extra),
                          "came with the plan", "--trust-plan-code")
    assert not _imported(sent) and not (tmp_path / "run").exists()
    result = run_cli("train", "--plan", str(sent), "--max-steps", "2", "--out", str(tmp_path / "run"), "--trust-plan-code")
    assert result.exit_code == 0, result.output
    assert _imported(sent)


def test_load_refuses_a_plans_own_code_unless_trusted_or_given_the_model(sent: Path) -> None:
    with pytest.raises(PlanError, match=r"trust_code=True.*model=\.\.\."):
        fxreplay.load(sent)
    assert not _imported(sent)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    assert fxreplay.load(sent, model=model).K == 2
    assert not _imported(sent)
    assert fxreplay.load(sent, trust_code=True).K == 2
    assert _imported(sent)


def test_what_counts_as_the_plans_own_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, examples_dir: Path) -> None:
    from fxreplay.compiler.loading import code_inside

    plan = tmp_path / "plan"
    plan.mkdir()
    (plan / "model.py").write_text("")
    (plan / "planmod.py").write_text("")
    (tmp_path / "elsewhere.py").write_text("")
    (plan / "link.py").symlink_to(tmp_path / "elsewhere.py")  # the path as sent lies in the plan
    os.symlink(plan, tmp_path / "alias")  # the plan directory reached through a link
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(plan))
    inside = ["plan/model.py", "plan/model.py:build_model", str(plan / "model.py"), "./plan/../plan/model.py",
              "alias/model.py", "plan/link.py", "planmod:build_model"]
    for spec in inside:
        assert code_inside(spec, plan) is not None, spec
        assert code_inside(spec, tmp_path / "alias") is not None, spec
    outside = ["resnet20", "zoo:mlp", "torchvision:resnet18", "elsewhere.py", str(examples_dir / "branchy_net.py"),
               "fxreplay.models:get", "no_such_module:x", "nowhere/model.py"]
    for spec in outside:
        assert code_inside(spec, plan) is None, spec

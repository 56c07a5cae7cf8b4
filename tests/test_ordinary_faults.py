"""Ordinary events in the user's own code, data and files end with one paragraph, not a traceback.

A ``build_model()`` that raises, a data set whose ``__getitem__`` raises mid-run, an input
shape too large for memory, a plan or config that is not UTF-8, a plan device that is not one,
and NaN/inf in the data (named as the data's fault, not the learning rate's). Each runs the CLI
in this process on tiny models and data sets (a few seconds each).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from clitools import assert_user_error, run_cli
from fxreplay.compiler.plan import Plan
from fxreplay.errors import ConfigError, PlanError

TINY = ("--model", "mlp", "--K", "2", "--batch-size", "16", "--epochs", "1")

DATA = '''
import torch
from torch.utils.data import Dataset, TensorDataset


def _examples(n):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def nan_input():
    x, y = _examples(64)
    x[37, 0, 2, 3] = float("nan")
    return TensorDataset(x, y), TensorDataset(x[:16].clone(), y[:16])


def inf_in_test():
    x, y = _examples(64)
    test = x[:16].clone()
    test[5, 0, 0, 0] = float("inf")
    return TensorDataset(x, y), TensorDataset(test, y[:16])


class Breaks(Dataset):
    """Reads fine until example 40."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        if i == 40:
            raise ValueError("corrupt record 40")
        return torch.zeros(1, 8, 8), i % 10


def breaks():
    x, y = _examples(16)
    return Breaks(), TensorDataset(x, y)
'''


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "userdata.py"
    path.write_text(DATA)
    return path


# ------------------------------------------------------------------ the user's code raises


def test_a_build_model_that_raises_is_one_paragraph(tmp_path: Path) -> None:
    model = tmp_path / "broken_model.py"
    model.write_text("def build_model(num_classes=10):\n    raise RuntimeError('broken on purpose')\n")
    for args in (["partition", str(model), "--K", "2", "--input-shape", "1,8,8", "--out", str(tmp_path / "plan")],
                 ["train", "--model", str(model), "--K", "2", "--max-steps", "2", "--out", str(tmp_path / "run")]):
        assert_user_error(run_cli(*args), f"{model}:build_model() raised RuntimeError: broken on purpose",
                          "not in fxreplay")
    assert not (tmp_path / "plan").exists() and not (tmp_path / "run").exists()


def test_example_inputs_that_raise_and_a_model_file_that_exits_are_one_paragraph(tmp_path: Path) -> None:
    inputs = tmp_path / "bad_inputs.py"
    inputs.write_text("import torch\nmodel = torch.nn.Linear(4, 2)\ndef example_inputs():\n    raise KeyError('shape')\n")
    assert_user_error(run_cli("partition", str(inputs), "--K", "1", "--out", str(tmp_path / "p")),
                      "example_inputs() raised KeyError")
    exits = tmp_path / "exits.py"
    exits.write_text("import sys\nsys.exit(3)\n")
    assert_user_error(run_cli("partition", str(exits), "--K", "1", "--out", str(tmp_path / "q")), "failed with SystemExit: 3")


@pytest.mark.parametrize("workers", [0, 1])
def test_a_data_set_that_raises_mid_run_names_the_example(tmp_path: Path, data_file: Path, workers: int) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"data: {{num_workers: {workers}}}\n")
    out = tmp_path / "run"
    result = run_cli("train", "--config", str(config), *TINY, "--data", f"{data_file}:breaks", "--out", str(out))
    assert_user_error(result, f"reading example 40 of the training set of '{data_file}:breaks' failed: ValueError: corrupt "
                      "record 40", "dataset[40]", "There is no checkpoint yet", str(out))


def test_the_same_command_starts_again_after_a_failure_before_the_first_checkpoint(tmp_path: Path, data_file: Path) -> None:
    out = tmp_path / "run"
    command = ("train", *TINY, "--data", f"{data_file}:breaks", "--out", str(out))
    assert_user_error(run_cli(*command), "corrupt record 40", f"the same command starts it afresh in {out}")
    assert not (out / "checkpoint.pt").exists() and (out / "config.yaml").is_file()  # the half-made run is kept
    assert_user_error(run_cli(*command, "--lr", "0.01"), "not this run's", "--overwrite")  # other settings: refused
    data_file.write_text(DATA.replace('raise ValueError("corrupt record 40")', "pass"))  # the data set fixed
    again = run_cli(*command)
    assert again.exit_code == 0, again.output
    assert "holds an earlier start of this run" in " ".join(again.output.split()) and (out / "checkpoint.pt").is_file()


# ------------------------------------------------------------------------------ resources


def test_an_input_shape_too_large_for_memory_says_so(tmp_path: Path) -> None:
    out = tmp_path / "plan"
    result = run_cli("partition", "mlp", "--K", "2", "--input-shape", "1,100000,100000", "--out", str(out))
    assert_user_error(result, "the example input of shape (128, 1, 100000, 100000) (float32) is too large for this machine's "
                      "memory", "4.7 TiB", "--input-shape", "--batch-size")
    assert not out.exists()


# ------------------------------------------------------------------- undecodable files


def _tiny_plan(directory: Path, device: str = "cpu", spec: str = "mlp") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "plan.yaml").write_text(yaml.safe_dump(
        {"K": 1, "stages": [{"nodes": ["x", "flatten", "output"], "device": device}], "model": {"spec": spec}}))
    return directory


def test_a_plan_or_config_that_is_not_utf8_is_one_paragraph(tmp_path: Path) -> None:
    plan = _tiny_plan(tmp_path / "plan")
    text = (plan / "plan.yaml").read_text()
    (plan / "plan.yaml").write_bytes(b"# caf\xe9 plan\n" + text.encode())
    assert_user_error(run_cli("show", str(plan), "--no-png"), "plan.yaml is not UTF-8 text (byte 0xe9 at line 1, column 6")
    assert_user_error(run_cli("train", "--plan", str(plan), "--out", str(tmp_path / "run")), "is not UTF-8 text")
    config = tmp_path / "config.yaml"
    config.write_bytes(b"train:\n  epochs: 1  # \xff\n")
    assert_user_error(run_cli("train", "--config", str(config), "--out", str(tmp_path / "run")),
                      "config.yaml is not UTF-8 text (byte 0xff at line 2, column 16", "save it in that encoding")
    with pytest.raises(ConfigError, match="not UTF-8"):
        from fxreplay.config import load_config

        load_config(config)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------- plan devices


@pytest.mark.parametrize("device, why", [
    ("../../x", "not a device name (a stage runs on cpu, cuda, cuda:N or mps)"),
    ("cpu@fast", "a speed or memory (@2, /16GiB) goes in `fxreplay partition --devices`"),
    ("meta", "the meta device holds shapes without values"),
    ("cuda:one", "not a device name"),
])
def test_a_plan_device_that_is_not_one_is_refused_on_load(tmp_path: Path, device: str, why: str) -> None:
    plan = _tiny_plan(tmp_path / "plan", device)
    assert_user_error(run_cli("show", str(plan), "--no-png"), f"stages[0].device {device!r}", why)
    assert_user_error(run_cli("train", "--plan", str(plan), "--out", str(tmp_path / "run")), why)
    with pytest.raises(PlanError, match="device"):
        Plan.load(plan)
    assert not (tmp_path / "run").exists()


def test_partition_refuses_the_meta_device(tmp_path: Path) -> None:
    assert_user_error(run_cli("partition", "mlp", "--K", "1", "--input-shape", "1,8,8", "--devices", "meta",
                              "--out", str(tmp_path / "p")), "device 'meta'", "holds shapes without values")


# ---------------------------------------------------------------------- non-finite data


def test_nan_in_the_training_data_is_named_as_the_datas_fault(tmp_path: Path, data_file: Path) -> None:
    result = run_cli("train", *TINY, "--data", f"{data_file}:nan_input", "--out", str(tmp_path / "run"))
    text = assert_user_error(result, "the training data holds non-finite values: example 37 (NaN in its input) of the "
                             f"training set of '{data_file}:nan_input'", "The data is at fault, not the learning rate")
    assert "lower the learning rate" not in text


def test_inf_in_the_test_data_is_named_as_the_datas_fault(tmp_path: Path, data_file: Path) -> None:
    result = run_cli("train", *TINY, "--data", f"{data_file}:inf_in_test", "--out", str(tmp_path / "run"))
    text = assert_user_error(result, "the test data holds non-finite values: example 5 (inf in its input) of the test set",
                             "So the test loss after epoch 1 is nan", "The data is at fault")
    assert "lower the learning rate" not in text and "BatchNorm statistics" not in text


def test_non_finite_finds_inputs_and_float_targets() -> None:
    from torch.utils.data import Subset, TensorDataset

    from fxreplay.data import non_finite

    x, y = torch.zeros(6, 2), torch.zeros(6)
    x[1, 0], y[4] = float("inf"), float("nan")
    data = Subset(TensorDataset(x, y), [5, 4, 3, 2, 1])  # index i of the subset is example 5 - i
    assert non_finite(data, range(5)) == ["example 4 (NaN in its target)", "example 1 (inf in its input)"]
    assert non_finite(data, [0, 2]) == []

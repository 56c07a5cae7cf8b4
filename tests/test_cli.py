"""Every command through typer's CliRunner: outputs, files, and one-paragraph errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from clitools import assert_user_error, run_cli
from fxreplay.checkpoint import load_checkpoint
from fxreplay.methods import METHODS

UNTRACEABLE = '''
import torch
from torch import nn

class Gate(nn.Module):
    def forward(self, x):
        if x.mean() > 0:
            return x
        return -x

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.fc(x))

def build_model():
    return Net()

def example_inputs():
    return (torch.randn(2, 4),)
'''


_run = run_cli
_assert_user_error = assert_user_error


def test_partition_json(tmp_path: Path, examples_dir: Path) -> None:
    result = _run("partition", str(examples_dir / "branchy_net.py"), "--K", "3", "--out", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["K"] == 3 and plan["cost"] == "time" and plan["method"] == "fr" and plan["bottleneck"] > 0
    for stage in plan["stages"]:
        assert {"index", "nodes", "flops_fwd", "flops_bwd", "param_bytes", "boundary_bytes", "device"} <= set(stage)
    assert (tmp_path / "plan.yaml").is_file() and (tmp_path / "stage_2.py").is_file()


def test_partition_table_and_show(tmp_path: Path) -> None:
    result = _run("partition", "resnet20", "--K", "4", "--input-shape", "3,32,32", "--batch-size", "4",
                  "--out", str(tmp_path), "--boundary", "layer2")
    assert result.exit_code == 0, result.output
    assert "bottleneck / mean" in result.output and "layer2_0" in result.output
    shown = _run("show", str(tmp_path))
    assert shown.exit_code == 0 and "bottleneck / mean" in shown.output


def test_partition_torchvision_with_devices(tmp_path: Path) -> None:
    result = _run("partition", "torchvision:mobilenet_v3_small", "--K", "2", "--input-shape", "3,32,32",
                  "--batch-size", "2", "--devices", "cpu,cpu@2", "--json", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert [s["device"] for s in json.loads(result.stdout)["stages"]] == ["cpu", "cpu"]


def test_missing_file(tmp_path: Path) -> None:
    _assert_user_error(_run("partition", str(tmp_path / "nope.py"), "--K", "2"), "does not exist")


def test_missing_attribute(examples_dir: Path) -> None:
    _assert_user_error(_run("partition", f"{examples_dir / 'branchy_net.py'}:Nope", "--K", "2"), "has no attribute 'Nope'", "build_model")


def test_unknown_zoo_and_torchvision_names() -> None:
    _assert_user_error(_run("partition", "resnet7", "--K", "2", "--input-shape", "3,32,32"), "resnet20")
    _assert_user_error(_run("partition", "torchvision:resnet7", "--K", "2", "--input-shape", "3,32,32"), "torchvision has no model 'resnet7'")


def test_no_input_shape(tmp_path: Path) -> None:
    path = tmp_path / "plain.py"
    path.write_text("from torch import nn\nmodel = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))\n")
    _assert_user_error(_run("partition", str(path), "--K", "2"), "--input-shape")
    ok = _run("partition", str(path), "--K", "2", "--input-shape", "4", "--out", str(tmp_path / "p"))
    assert ok.exit_code == 0, ok.output


def test_zoo_models_know_their_input_shape(tmp_path: Path) -> None:
    result = _run("partition", "resnet20", "--K", "2", "--batch-size", "2", "--json", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"]["input_shape"] == [3, 32, 32]


def test_K_too_large(examples_dir: Path) -> None:
    _assert_user_error(_run("partition", str(examples_dir / "branchy_net.py"), "--K", "500"), "K=500 stages need 499 cuts but this model allows only")


def test_untraceable(tmp_path: Path) -> None:
    path = tmp_path / "gated.py"
    path.write_text(UNTRACEABLE)
    # --strict: by default the module is kept opaque instead (tests/test_opaque.py)
    _assert_user_error(_run("partition", str(path), "--K", "2", "--strict", "--out", str(tmp_path / "strict")),
                       "module 'gate' (Gate)", "gated.py:7", "--leaf Gate")
    ok = _run("partition", str(path), "--K", "2", "--leaf", "Gate", "--out", str(tmp_path / "p"))
    assert ok.exit_code == 0, ok.output


def test_infeasible_memory(examples_dir: Path) -> None:
    _assert_user_error(_run("partition", str(examples_dir / "branchy_net.py"), "--K", "2", "--devices", "cpu/1KiB,cpu/1KiB"), "memory")


def test_bad_device_string(examples_dir: Path) -> None:
    _assert_user_error(_run("partition", str(examples_dir / "branchy_net.py"), "--K", "2", "--devices", "gpu0,cpu"), "NAME[@SPEED][/MEMORY]")


def test_malformed_plan(tmp_path: Path) -> None:
    (tmp_path / "plan.yaml").write_text("K: 2\nstages: [{nodes: [x]}]\n")
    _assert_user_error(_run("show", str(tmp_path)), "K is 2 but 1 stages are listed")
    _assert_user_error(_run("show", str(tmp_path / "nowhere")), "no plan at")


def test_train_default_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _run("train", "--max-steps", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and (out / "checkpoint.pt").is_file()
    again = _run("train", "--resume", str(out), "--max-steps", "5")
    assert again.exit_code == 0, again.output
    assert "5 / 0" in again.output  # steps / completed epochs


def test_warmup_steps_override_the_config_and_ramp_the_rate(tmp_path: Path) -> None:
    """--warmup-steps N: optim.warmup_steps in the run's config, and the rate rises linearly over N iterations."""
    out = tmp_path / "run"
    result = _run("train", "--max-steps", "4", "--warmup-steps", "8", "--lr", "0.08", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["warmup_steps"] == 8
    last = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "epoch"][-1]
    assert last["step"] == 4 and last["lr"] == pytest.approx(0.08 * 3 / 8)  # the 4th iteration's rate: 3/8 of the way up


def test_an_unstable_start_is_warned_about_once_with_the_remedy(tmp_path: Path) -> None:
    """A run whose loss climbs at its full rate in the first iterations says so (once) and names the warm-up; at a
    sane rate, or warmed up, it says nothing. The offline CNN climbs 1.8x under FR + lookahead+lr+predict+stretch at lr 3
    (auto's rules without its synchronous start, which would train these 22 iterations as BP)."""
    rules = "lookahead+lr+predict+stretch"
    hot = _run("train", "--method", "fr", "--compensation", rules, "--lr", "3", "--max-steps", "22", "--out", str(tmp_path / "hot"))
    assert hot.exit_code == 0, hot.output
    text = " ".join(hot.output.split())
    assert text.count("the start is unstable") == 1 and "--warmup-steps 100" in text, hot.output
    calm = _run("train", "--method", "fr", "--compensation", rules, "--max-steps", "22", "--out", str(tmp_path / "calm"))
    warm = _run("train", "--method", "fr", "--compensation", rules, "--lr", "3", "--warmup-steps", "10", "--max-steps", "22",
                "--out", str(tmp_path / "warm"))
    for result in (calm, warm):
        assert result.exit_code == 0 and "start is unstable" not in " ".join(result.output.split()), result.output


def test_unstable_start_reads_the_first_iterations_only() -> None:
    from fxreplay.run import START_WINDOW, unstable_start

    assert unstable_start([2.0, 2.1, 2.0, 1.9] * 6) is None  # noise around the first loss
    assert unstable_start([2.0, 4.0, 5.0, 3.0, 2.0]) == (2.0, 4.0, 3)  # median of (4, 5, 3) at iterations 1-3; (2, 4, 5): 4 at 0-2
    assert unstable_start([2.0, 2.0, 9.0, 2.0, 2.0]) is None  # one bad batch is not a climb
    assert unstable_start([2.0] * (START_WINDOW + 1) + [9.0] * 3) is None  # after the start: not this check's business
    assert unstable_start([2.0, 5.0]) is None and unstable_start([float("nan"), 9.0, 9.0, 9.0]) is None
    assert unstable_start([-1.0, 5.0, 5.0, 5.0]) is None  # a loss that is not positive has no scale to rise against


def test_a_new_run_never_writes_over_an_old_one(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _run("train", "--max-steps", "3", "--out", str(out)).exit_code == 0
    def files() -> dict[str, bytes]:  # the run's files (.lock records who holds the directory now)
        return {f.name: f.read_bytes() for f in out.iterdir() if f.is_file() and f.name != ".lock"}

    before = files()
    again = _run("train", "--max-steps", "2", "--method", "bp", "--out", str(out))
    _assert_user_error(again, "already holds a run", "--resume", "--overwrite")
    assert files() == before  # nothing touched
    _assert_user_error(_run("train", "--nproc", "2", "--max-steps", "2", "--out", str(out)), "already holds a run")
    forced = _run("train", "--max-steps", "2", "--method", "bp", "--out", str(out), "--force")
    assert forced.exit_code == 0, forced.output
    assert "bp / 2" in forced.output
    assert load_checkpoint(out)["method"] == "bp"  # the old run's state is gone


def test_a_plan_for_other_inputs_is_refused_before_the_run_starts(tmp_path: Path, examples_dir: Path) -> None:
    assert _run("partition", str(examples_dir / "branchy_net.py"), "--K", "2", "--out", str(tmp_path / "p")).exit_code == 0
    result = _run("train", "--plan", str(tmp_path / "p"), "--max-steps", "2", "--out", str(tmp_path / "run"))
    _assert_user_error(result, "takes 2 inputs", "data set 'digits' gives one input of shape (1, 8, 8)")
    assert not (tmp_path / "run").exists()


def test_train_on_a_plan(tmp_path: Path) -> None:
    assert _run("partition", "digits_cnn", "--K", "3", "--input-shape", "1,8,8", "--batch-size", "64", "--out", str(tmp_path / "p")).exit_code == 0
    result = _run("train", "--plan", str(tmp_path / "p"), "--method", "dni", "--max-steps", "4", "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert "dni / 3" in result.output


def test_train_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  methd: fr\n")
    _assert_user_error(_run("train", "--config", str(bad)), "train.methd")
    _assert_user_error(_run("train", "--method", "sgd"), "train.method")
    _assert_user_error(_run("train", "--config", str(tmp_path / "none.yaml")), "cannot read config file")
    _assert_user_error(_run("train", "--resume", str(tmp_path)), "no config.yaml")


@pytest.mark.parametrize(
    "command, says",
    [
        ("partition", ["fxreplay partition [OPTIONS]", "cut MODEL into K", "--K", "--out", "--cost", "--boundary", "--input-shape", "balanced stages"]),
        ("train", ["fxreplay train [OPTIONS]", "--method", "--resume", "--nproc", "--plan", "--force", " | ".join(METHODS)]),
        ("compare", ["fxreplay compare [OPTIONS]", "--methods", "--K", "--sigma-every", "--force"]),
        ("show", ["fxreplay show [OPTIONS]", "plan_dir", "--png", "--no-png", "stage table"]),
    ],
)
def test_help(command: str, says: list[str]) -> None:
    # each command's own usage line, its options and what it does (not a generic page)
    result = _run(command, "--help")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for needle in says:
        assert needle in text, (needle, text)


def test_python_dash_m() -> None:
    done = subprocess.run([sys.executable, "-m", "fxreplay", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "partition" in done.stdout and "train" in done.stdout


def test_api_example_runs(examples_dir: Path) -> None:
    done = subprocess.run([sys.executable, str(examples_dir / "api_quickstart.py"), "--steps", "20", "--method", "ddg", "--K", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ddg K=2: test accuracy" in done.stdout


def test_train_with_two_ranks_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # --cost time: rank 0 measures and partitions, the other rank trains on its plan.
    result = _run("train", "--nproc", "2", "--K", "2", "--max-steps", "6", "--out", str(out), "--method", "ddg", "--cost", "time")
    assert result.exit_code == 0, result.output
    assert "ddg / 2" in result.output
    assert "cost: time" in (out / "plan" / "plan.yaml").read_text()
    assert {"timeline.json", "timeline.png", "checkpoint.pt", "model.pt"} <= {p.name for p in out.iterdir()}

    state = load_checkpoint(out)
    assert len(state["trainer"]["ranks"]) == 2  # one checkpoint holds every stage
    again = _run("train", "--resume", str(out), "--nproc", "2", "--max-steps", "9")
    assert again.exit_code == 0, again.output
    assert "9 / 0" in again.output


def test_nproc_must_match_K(tmp_path: Path) -> None:
    _assert_user_error(_run("train", "--nproc", "3", "--K", "2", "--out", str(tmp_path)), "--nproc 3 but K=2")


def test_untraceable_names_the_cause(tmp_path: Path) -> None:
    path = tmp_path / "gated.py"
    path.write_text(UNTRACEABLE)
    # --strict: by default the module is kept opaque instead (tests/test_opaque.py)
    _assert_user_error(_run("partition", str(path), "--K", "2", "--strict", "--out", str(tmp_path / "plan")),
                       "data-dependent control flow", "torch.where")


def test_partition_models_written_elsewhere(tmp_path: Path) -> None:
    """nanoGPT as written (token ids given by --input-dtype), a checkpointed model (a warning,
    not an error), and a Hugging Face GPT-2 from an example file."""
    zoo = Path(__file__).parent / "zoo_external.py"
    gpt = _run("partition", f"{zoo}:NanoGPT", "--K", "4", "--input-shape", "16", "--input-dtype", "int64",
               "--batch-size", "4", "--cost", "flops", "--out", str(tmp_path / "gpt"))
    assert gpt.exit_code == 0, gpt.output
    assert "input_dtype: int64" in (tmp_path / "gpt" / "plan.yaml").read_text()
    ckpt = _run("partition", f"{zoo}:CheckpointedNet", "--K", "2", "--input-shape", "8", "--batch-size", "4",
                "--cost", "flops", "--out", str(tmp_path / "ckpt"))
    assert ckpt.exit_code == 0, ckpt.output
    assert "warning: torch.utils.checkpoint regions are traced through" in " ".join(ckpt.output.split())
    pytest.importorskip("transformers")
    hf = _run("partition", str(Path(__file__).parents[1] / "examples" / "hf_gpt2.py"), "--K", "4", "--cost", "flops",
              "--out", str(tmp_path / "hf"))
    assert hf.exit_code == 0, hf.output
    assert sorted(p.name for p in (tmp_path / "hf").glob("stage_*.py")) == [f"stage_{k}.py" for k in range(4)]


def test_a_plan_for_token_inputs_is_refused_by_image_data(tmp_path: Path) -> None:
    zoo = Path(__file__).parent / "zoo_external.py"
    assert _run("partition", f"{zoo}:NanoGPT", "--K", "2", "--input-shape", "16", "--input-dtype", "int64",
                "--batch-size", "4", "--cost", "flops", "--out", str(tmp_path / "gpt")).exit_code == 0
    _assert_user_error(_run("train", "--plan", str(tmp_path / "gpt"), "--max-steps", "1", "--out", str(tmp_path / "run")),
                       "is for a model that takes inputs of shape (16,)")
    assert not (tmp_path / "run").exists()


def test_partition_a_hugging_face_model_by_module_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    (tmp_path / "my_hf_models.py").write_text(
        "import torch, transformers\n"
        "def bert():\n"
        "    return transformers.BertForSequenceClassification(transformers.BertConfig(vocab_size=64, hidden_size=32,\n"
        "        num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, max_position_embeddings=16, num_labels=3))\n"
        "def example_inputs():\n"
        "    return (torch.randint(0, 64, (4, 16)),)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = _run("partition", "my_hf_models:bert", "--K", "4", "--cost", "flops", "--out", str(tmp_path / "plan"))
    assert result.exit_code == 0, result.output
    assert "input_dtype: int64" in (tmp_path / "plan" / "plan.yaml").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--threads", "0"], "--threads 0: give a positive number"),
        (["train", "--threads", "-2"], "--threads -2: give a positive number"),
        (["train", "--nproc", "0"], "--nproc 0: give the number of ranks"),
        (["partition", "resnet20", "--threads", "0"], "--threads 0: give a positive number"),
    ],
)
def test_bad_process_options_are_refused(args: list[str], message: str, tmp_path: Path) -> None:
    _assert_user_error(_run(*args, "--out", str(tmp_path / "out")), message)
    assert not (tmp_path / "out").exists()


def test_train_takes_the_model_the_data_and_its_root(tmp_path: Path) -> None:
    text = " ".join(_run("train", "--help").output.split())
    for needle in ("--model", "--data ", "--data-root", "torchvision:NAME", "imagefolder:DIR", "text:PATH", "file.py:fn"):
        assert needle in text, needle
    out = tmp_path / "run"
    result = _run("train", "--model", "zoo:digits_cnn", "--data", "digits", "--data-root", str(tmp_path / "d"),
                  "--max-steps", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "zoo:digits_cnn / digits" in " ".join(result.output.split())
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["model"]["name"], saved["data"]["name"], saved["data"]["root"]) == ("zoo:digits_cnn", "digits", str(tmp_path / "d"))
    # a resume may move the data (--data-root), not change it (--data) or the model (--model)
    _assert_user_error(_run("train", "--resume", str(out), "--data", "text:"), "cannot change data.name ('digits' -> 'text:')")
    _assert_user_error(_run("train", "--resume", str(out), "--model", "gpt_tiny"), "cannot change model.name")
    moved = _run("train", "--resume", str(out), "--data-root", str(tmp_path / "e"), "--max-steps", "2")
    assert moved.exit_code == 0, moved.output


def test_every_option_of_every_command_has_help() -> None:
    import typer.main

    from cli.app import app

    group = typer.main.get_command(app)
    missing = [f"{name} {param.opts[0]}" for name, command in group.commands.items()  # type: ignore[attr-defined]
               for param in command.params if not getattr(param, "help", None) and param.opts[0] != "--help"
               and param.param_type_name == "option"]
    assert missing == []  # e.g. train --epochs, --seed had none


def test_train_measures_sigma_as_compare_does(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _run("train", "--max-steps", "4", "--sigma-every", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "sigma" in r] == [2, 4]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["sigma_every"] == 2

"""Config loading: shipped files, error messages that name the key, overrides, round trips."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fxreplay.config import (
    Config,
    apply_overrides,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from fxreplay.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_the_expected_configs_ship() -> None:
    names = {p.relative_to(ROOT / "configs").as_posix() for p in SHIPPED}
    assert {"resnet20_cifar10.yaml", "resnet56_cifar10.yaml"} <= names
    assert {p.name for p in PAPER} == {
        f"{m}_{d}.yaml"
        for m in ("resnet164", "resnet101", "resnet152")
        for d in ("cifar10", "cifar100")
    }
    assert (ROOT / "configs" / "paper" / "README.md").is_file()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path: Path) -> None:
    cfg = load_config(path)
    assert from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg
    from fxreplay.models import ZOO

    assert cfg.model.name in ZOO


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_configs_use_the_papers_setting(path: Path) -> None:
    cfg = load_config(path)
    assert (cfg.train.epochs, cfg.data.batch_size) == (300, 128)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.01, 0.9, 5e-4)
    assert cfg.optim.milestones == (0.5, 0.75) and cfg.optim.gamma == 0.1
    assert not cfg.optim.double_first_stage_lr
    assert cfg.data.augment and cfg.data.name in path.name
    assert cfg.model.num_classes == (100 if "cifar100" in path.name else 10)


def test_cifar10_configs_read_the_offline_copy() -> None:
    for name in ("resnet20_cifar10.yaml", "resnet56_cifar10.yaml"):
        cfg = load_config(ROOT / "configs" / name)
        assert (cfg.data.root, cfg.data.verify, cfg.data.download) == ("data/cifar10", False, False)
        assert "CIFAR10('data/cifar10', download=True)" in (ROOT / "configs" / name).read_text()  # how to get it


def test_no_user_facing_file_points_outside_the_repository() -> None:
    """Configs, their README and the data errors say how to get a data set from the repository
    alone (torchvision's download, the official archive); the workspace's shared folder is the
    benchmarks' business (docs/accuracy.md, where they are)."""
    files = [*ROOT.glob("configs/**/*.yaml"), *ROOT.glob("configs/**/*.md"), *ROOT.glob("fxreplay/**/*.py"),
             *ROOT.glob("cli/*.py"), *ROOT.glob("examples/*"), ROOT / "README.md",
             *(p for p in ROOT.glob("docs/*.md") if p.name not in ("measured.md", "accuracy.md"))]
    assert [str(f.relative_to(ROOT)) for f in files if f.is_file() and "../shared" in f.read_text()] == []


def test_the_language_model_config_runs_offline() -> None:
    cfg = load_config(ROOT / "configs" / "gpt_text.yaml")
    assert (cfg.model.name, cfg.data.name, cfg.data.block_size, cfg.data.batch_size) == ("gpt_tiny", "text:default", 64, 32)
    assert (cfg.partition.K, cfg.partition.cost, cfg.train.method) == (2, "flops", "fr")
    assert cfg.train.epochs <= 3 and not cfg.data.download


def test_default_config_is_the_offline_quick_start() -> None:
    cfg = load_config(None)
    assert (cfg.model.name, cfg.data.name) == ("digits_cnn", "digits")
    assert (cfg.partition.K, cfg.train.method, cfg.data.batch_size) == (2, "fr", 64)
    assert cfg.optim.lr == 0.05 and cfg.train.epochs <= 5
    assert not cfg.data.download


def test_missing_keys_take_the_papers_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "model: {name: resnet20}\n"))
    assert cfg == apply_overrides(Config(), {"model.name": "resnet20"})
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.train.epochs) == (0.01, 128, 300)
    assert load_config(write(tmp_path, "")) == Config()


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "optim:\n  lr: 0.1\n  learning_rate: 0.1\n"))
    message = str(info.value)
    assert "optim.learning_rate: unknown key" in message and "config.yaml" in message
    assert "lr" in message  # lists the valid keys


def test_unknown_section_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError, match=r"optimizer: unknown key \(did you mean 'optim'\?\)"):
        from_dict({"optimizer": {"lr": 0.1}})


@pytest.mark.parametrize(
    "data,message",
    [
        ({"optim": {"lr": "abc"}}, "optim.lr: expected a number, got 'abc'"),
        ({"train": {"epochs": 2.5}}, "train.epochs: expected an integer, got 2.5 (float)"),
        ({"train": {"epochs": True}}, "train.epochs: expected an integer, got True (bool)"),
        ({"data": {"verify": "maybe"}}, "data.verify: expected true or false, got 'maybe'"),
        ({"train": {"method": "sgd"}}, "train.method: expected one of 'bp', 'gpipe', '1f1b', 'ddg', 'dni'"),
        ({"optim": {"lr": float("inf")}}, "optim.lr: must be a finite number, got inf"),
        ({"optim": {"momentum": float("nan")}}, "optim.momentum: must be a finite number, got nan"),
        ({"partition": {"boundaries": "layer2"}}, None),  # a single name is fine
        ({"partition": {"boundaries": [1]}}, "partition.boundaries[0]: expected a string, got 1"),
        ({"model": {"name": 3}}, "model.name: expected a string, got 3 (int)"),
        ({"optim": 0.1}, "optim: expected a mapping"),
        ({"optim": {"milestones": [150, 225]}}, "optim.milestones: must be increasing fractions"),
        ({"data": {"batch_size": 0}}, "data.batch_size: must be >= 1, got 0"),
        ({"data": {"block_size": 0}}, "data.block_size: must be >= 1, got 0"),
        ({"data": {"name": ""}}, "data.name: must not be empty"),
        ({"data": {"name": 10}}, "data.name: expected a string, got 10 (int)"),
        ({"data": {"name": "torchvision:FashionMNIST"}}, None),  # a spec: fxreplay.data resolves it
        ({"partition": {"K": 2, "boundaries": ["a", "b"]}}, "partition.boundaries: 2 pinned"),
    ],
)
def test_wrong_types_and_values_name_the_key(data: dict[str, object], message: str | None) -> None:
    if message is None:
        from_dict(data)
        return
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    assert message in str(info.value)


def test_yaml_scientific_notation_without_a_dot_is_a_number(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-4 as the string "1e-4"
    assert load_config(write(tmp_path, "optim: {synth_lr: 1e-4}\n")).optim.synth_lr == 1e-4


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "optim: [1,\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_yaml_is_never_executed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: !!python/object/apply:os.system ['true']\n"))


def test_overrides_return_a_new_config() -> None:
    cfg = load_config(None)
    new = apply_overrides(
        cfg,
        {
            "train.method": "ddg",
            "optim.lr": 0.1,
            "partition.K": "3",  # strings, as typed on a command line
            "data.verify": "false",
            "model.num_classes": "null",
            "partition.boundaries": "layer1,layer2",
            "optim.milestones": "[0.3, 0.6]",
        },
    )
    assert (new.train.method, new.optim.lr) == ("ddg", 0.1)
    assert (new.partition.K, new.data.verify, new.model.num_classes) == (3, False, None)
    assert new.partition.boundaries == ("layer1", "layer2")
    assert new.optim.milestones == (0.3, 0.6)
    assert new.model == cfg.model and new.train.epochs == cfg.train.epochs
    assert cfg == load_config(None)  # the original is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        new.optim.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"optim.lr": "abc"}, "optim.lr: expected a number, got 'abc'"),
        ({"optim.lrr": 1}, "optim.lrr: unknown key (did you mean 'lr'?)"),
        ({"trian.epochs": 1}, "trian: unknown key (did you mean 'train'?)"),
        ({"optim": 1}, "optim: expected section.key"),
        ({"partition.K": 0}, "partition.K: must be >= 1, got 0"),
        ({"data.subset": 0}, "data.subset: must be >= 1 (or null for the whole training set), got 0"),
        ({"partition.cost": "speed"}, "partition.cost"),
    ],
)
def test_bad_overrides_name_the_key(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), overrides)
    assert message in str(info.value)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    overrides = {"partition.devices": ["cpu", "cpu"], "model.input_shape": [1, 8, 8]}
    cfg = apply_overrides(load_config(None), overrides)
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert to_dict(cfg)["partition"]["devices"] == ["cpu", "cpu"]  # plain lists for YAML


@settings(max_examples=50, deadline=None)
@given(
    lr=st.floats(1e-6, 10, allow_nan=False),
    K=st.integers(1, 8),
    epochs=st.integers(1, 1000),
    seed=st.integers(0, 2**31),
    method=st.sampled_from(["bp", "fr", "ddg", "dni"]),
    milestones=st.lists(st.floats(0.01, 1.0), max_size=3, unique=True).map(sorted),
)
def test_round_trip_property(
    lr: float, K: int, epochs: int, seed: int, method: str, milestones: list[float]
) -> None:
    cfg = apply_overrides(
        Config(),
        {
            "optim.lr": lr,
            "partition.K": K,
            "train.epochs": epochs,
            "train.seed": seed,
            "train.method": method,
            "optim.milestones": milestones,
        },
    )
    assert from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg

"""Data sets named the way models are (``torchvision:NAME``, ``imagefolder:DIR``, ``text:PATH``,
``file.py:fn``): each read from small files of the exact on-disk format its real loader reads,
checked against the bytes written here, then trained a few steps through ``fxreplay train``.
Never downloaded; the errors are one paragraph and leave no run directory behind."""
from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import Subset, TensorDataset

from clitools import assert_user_error, run_cli
from fxreplay.config import DataConfig
from fxreplay.data import (
    DEFAULT_CORPUS_BYTES,
    IMAGE_MEAN,
    IMAGE_STD,
    TextBytes,
    build_datasets,
    default_corpus,
    example_batch,
    image_folders,
    labels_only,
    make_loader,
    num_classes_of,
    parse_spec,
    text_datasets,
    torchvision_dataset,
    user_datasets,
)
from fxreplay.errors import DataError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CNN = str(EXAMPLES / "mnist_cnn.py")
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# A 3-channel model for any image size, small enough to compile in a blink.
TINY_RGB = '''
import torch
from torch import nn

def build_model(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))
'''

# (train, test) of 4-feature vectors; root= is passed when the function takes it.
USER_DATA = '''
import torch
from torch.utils.data import TensorDataset

SEEN = []

def make(root):
    SEEN.append(root)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()   # 4 classes
    return TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:])

def broken():
    raise OSError("the share is not mounted")

def not_a_pair():
    return [1, 2, 3]
'''

MLP = '''
from torch import nn

def build_model(num_classes=10):
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, num_classes))
'''


# ------------------------------------------------------------------- on-disk formats


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format torchvision's MNIST family reads: a big-endian magic 0x0000 08 NDIM
    (08 = unsigned bytes), one big-endian uint32 per dimension, then the bytes."""
    header = struct.pack(">I", (0x08 << 8) | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_fashion_mnist(root: Path, n_train: int = 24, n_test: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """ROOT/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, tiny; returns what was written."""
    rng = np.random.default_rng(seed)
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    written = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 7 % 10).astype(np.uint8)  # every class, not in order
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        written[f"{prefix}_images"], written[f"{prefix}_labels"] = images, labels
    return written


def make_image_folder(directory: Path) -> dict[str, np.ndarray]:
    """DIR/{train,val}/{cat,dog}/*.png; the first training image is 12 wide and 10 high, one
    other is 20 x 16 (it must be resized to 12 x 10); val has no dog. Returns the pixels."""
    from PIL import Image

    rng = np.random.default_rng(1)
    pixels = {}
    layout = {("train", "cat"): [(10, 12), (10, 12)], ("train", "dog"): [(16, 20), (10, 12)], ("val", "cat"): [(10, 12)]}
    for (split, label), sizes in layout.items():
        (directory / split / label).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            array = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(array).save(directory / split / label / f"{i}.png")
            pixels[f"{split}/{label}/{i}"] = array
    (directory / "val" / "dog").mkdir()  # an empty class folder
    return pixels


def normalised(pixels: np.ndarray) -> torch.Tensor:
    """What image_transform makes of uint8 pixels (H, W) or (H, W, C): (C, H, W) floats."""
    x = torch.from_numpy(pixels).float() / 255
    x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
    return (x - IMAGE_MEAN) / IMAGE_STD


# ------------------------------------------------------------------------ torchvision


def test_fashion_mnist_is_read_from_torchvisions_own_files(tmp_path: Path) -> None:
    written = make_fashion_mnist(tmp_path)
    train = torchvision_dataset("FashionMNIST", tmp_path, train=True)
    test = torchvision_dataset("FashionMNIST", tmp_path, train=False)
    assert (len(train), len(test)) == (24, 10)  # type: ignore[arg-type]
    for dataset, prefix in ((train, "train"), (test, "t10k")):
        for i in (0, 3, len(dataset) - 1):  # type: ignore[arg-type]
            x, y = dataset[i]
            assert x.shape == (1, 28, 28) and x.dtype == torch.float32
            torch.testing.assert_close(x, normalised(written[f"{prefix}_images"][i]), rtol=0, atol=1e-6)
            assert y == written[f"{prefix}_labels"][i]
    assert num_classes_of(train) == 10  # FashionMNIST.classes
    assert num_classes_of(Subset(train, [0, 1])) == 10  # a subset answers for its whole set


def test_torchvision_errors_name_the_files_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no data set 'FashionMnist' \(did you mean 'torchvision:FashionMNIST'\?\)"):
        torchvision_dataset("FashionMnist", tmp_path, train=True)
    with pytest.raises(DataError, match=r"torchvision:SVHN is built as SVHN\(root.*split.*not with root / train.*my_data.py:fn"):
        torchvision_dataset("SVHN", tmp_path, train=True)
    with pytest.raises(DataError) as info:
        torchvision_dataset("KMNIST", tmp_path / "nowhere", train=True)
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "KMNIST" / "raw") in message and "does not exist" in message
    assert all(name in message for name in FASHION_FILES) and "download: true" in message and "\n" not in message

    make_fashion_mnist(tmp_path)
    (tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="that folder lacks t10k-labels-idx1-ubyte"):
        torchvision_dataset("FashionMNIST", tmp_path, train=True)  # torchvision checks both splits' files
    (tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataError, match="unreadable"):
        torchvision_dataset("FashionMNIST", tmp_path, train=False)


# ------------------------------------------------------------------------ imagefolder


def test_image_folders_keep_the_training_classes_and_one_size(tmp_path: Path) -> None:
    pixels = make_image_folder(tmp_path / "pets")
    train, test = image_folders(str(tmp_path / "pets"))
    assert (len(train), len(test)) == (4, 1)  # type: ignore[arg-type]
    assert num_classes_of(train) == 2 and [y for _, y in (train[i] for i in range(4))] == [0, 0, 1, 1]
    x0, _ = train[0]
    torch.testing.assert_close(x0, normalised(pixels["train/cat/0"]), rtol=0, atol=1e-6)
    assert train[2][0].shape == (3, 10, 12)  # the 20 x 16 dog, resized to the first image's size
    x, y = test[0]
    assert y == 0 and x.shape == (3, 10, 12)  # val has no dog: cat keeps index 0
    torch.testing.assert_close(x, normalised(pixels["val/cat/0"]), rtol=0, atol=1e-6)

    (tmp_path / "pets" / "val" / "bird").mkdir()
    with pytest.raises(DataError, match=r"val has classes the training split lacks \(bird\)"):
        image_folders(str(tmp_path / "pets"))
    with pytest.raises(DataError, match=r"no directory .*nowhere/train or .*nowhere/val"):
        image_folders(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------- text


def test_text_examples_are_the_bytes_shifted_by_one(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4 + b"the end\n"  # 1032 bytes: the last 103 are validation
    (tmp_path / "a.txt").write_bytes(data)
    train, val = text_datasets(str(tmp_path / "a.txt"), block_size=16)
    split = len(data) - len(data) // 10
    assert (len(train), len(val)) == ((split - 1) // 16, (len(data) - split - 1) // 16)
    for dataset, stream in ((train, data[:split]), (val, data[split:])):
        for i in (0, 5, len(dataset) - 1):
            x, y = dataset[i]
            assert x.dtype == y.dtype == torch.int64
            assert bytes(x.tolist()) == stream[i * 16 : i * 16 + 16] and bytes(y.tolist()) == stream[i * 16 + 1 : i * 16 + 17]
        assert torch.equal(dataset.targets.long(), torch.stack([dataset[i][1] for i in range(len(dataset))]))
    with pytest.raises(IndexError):
        train[len(train)]
    assert num_classes_of(train) == 256 and num_classes_of(Subset(train, [1])) == 256

    # a rank that reads only labels gets the very same batches of targets
    full = [y for _, y in make_loader(Subset(train, [3, 1, 4]), 2, shuffle=True, seed=0, epoch=0)]
    labels = [y for _, y in make_loader(labels_only(Subset(train, [3, 1, 4])), 2, shuffle=True, seed=0, epoch=0)]
    assert all(torch.equal(a, b) and b.dtype == torch.int64 for a, b in zip(full, labels, strict=True))


def test_a_text_directory_is_its_files_in_path_order(tmp_path: Path) -> None:
    (tmp_path / "corpus" / "b").mkdir(parents=True)
    (tmp_path / "corpus" / "b" / "2.txt").write_bytes(b"B" * 600)
    (tmp_path / "corpus" / "a.txt").write_bytes(b"A" * 600)
    (tmp_path / "corpus" / ".hidden").write_bytes(b"H" * 600)
    train, val = text_datasets(str(tmp_path / "corpus"), block_size=8)
    assert bytes(train.stream.tolist()) == b"A" * 600 + b"B" * 480 and bytes(val.stream.tolist()) == b"B" * 120


def test_the_default_corpus_is_the_standard_librarys_source() -> None:
    folder = Path(os.__file__).parent
    expected = b"".join(p.read_bytes() for p in sorted(folder.glob("*.py"), key=lambda p: p.name))[:DEFAULT_CORPUS_BYTES]
    corpus = default_corpus()
    assert corpus == expected and len(corpus) == DEFAULT_CORPUS_BYTES  # every CPython's top-level source is > 1 MiB
    assert corpus.startswith((folder / sorted(p.name for p in folder.glob("*.py"))[0]).read_bytes()[:100])
    train, val = build_datasets(DataConfig(name="text:"))
    again, _ = build_datasets(DataConfig(name="text:default"))
    assert isinstance(train, TextBytes) and torch.equal(train.stream, again.stream)  # type: ignore[attr-defined]
    assert len(val) == (DEFAULT_CORPUS_BYTES // 10 - 1) // 64  # type: ignore[arg-type]


def test_text_errors(tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_bytes(b"x" * 600)
    with pytest.raises(DataError, match=r"600 bytes; its validation split \(the last tenth, 60 bytes\) needs at least "
                                         r"data.block_size \+ 1 = 65 bytes.*at least 650 bytes"):
        text_datasets(str(tmp_path / "short.txt"), block_size=64)
    with pytest.raises(DataError, match="no such file or directory"):
        text_datasets(str(tmp_path / "missing.txt"), block_size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no files"):
        text_datasets(str(tmp_path / "empty"), block_size=8)


# ------------------------------------------------------------- functions, spec names


def test_a_users_function_gives_the_data_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fxt_data.py").write_text(USER_DATA)
    train, test = user_datasets(f"{tmp_path}/fxt_data.py:make", root="somewhere")
    assert (len(train), len(test)) == (32, 8) and num_classes_of(train) == 4  # type: ignore[arg-type]
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fxt_data", raising=False)
    import fxt_data  # type: ignore[import-not-found]

    user_datasets("fxt_data:make", root="elsewhere")
    assert fxt_data.SEEN == ["elsewhere"]  # root= is data.root
    for spec, message in [
        (f"{tmp_path}/nope.py:make", "there is no file"),
        ("fxt_data:mkae", r"fxt_data has no 'mkae' \(its functions and classes: .*make"),
        ("fxt_data:broken", r"fxt_data:broken\(\) failed with OSError: the share is not mounted"),
        ("fxt_data:not_a_pair", r"returned list of 3, not \(train, test\)"),
        ("no_such_module:make", "cannot import module 'no_such_module'"),
    ]:
        with pytest.raises(DataError, match=message):
            user_datasets(spec, root="data")


@pytest.mark.parametrize("name, kind", [("digits", ("digits", "")), ("torchvision:MNIST", ("torchvision", "MNIST")),
                                        ("imagefolder:d/x", ("imagefolder", "d/x")), ("text:", ("text", "")),
                                        ("a/b.py:fn", ("function", "a/b.py:fn")), ("pkg.mod:fn", ("function", "pkg.mod:fn"))])
def test_spec_names(name: str, kind: tuple[str, str]) -> None:
    assert parse_spec(name) == kind


@pytest.mark.parametrize("name, message", [("mnist", "did you mean 'torchvision:MNIST'"), ("cifar-10", "did you mean 'cifar10'"),
                                           ("torchvision:", "names no class"), ("imagefolder:", "names no directory")])
def test_unknown_spec_names(name: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_spec(name)


def test_class_counts_and_example_batches() -> None:
    labels = torch.tensor([0, 4, 2])
    assert num_classes_of(TensorDataset(torch.zeros(3, 2), labels)) == 5
    assert num_classes_of(TensorDataset(torch.zeros(3, 2), labels.float())) is None  # regression targets
    declared = TensorDataset(torch.zeros(3, 2), labels)
    declared.num_classes = 7  # type: ignore[attr-defined]
    assert num_classes_of(declared) == 7
    x, y = example_batch(TensorDataset(torch.arange(6).view(3, 2), labels), 2, "d")
    assert torch.equal(x, torch.tensor([[0, 1], [2, 3]])) and torch.equal(y, torch.tensor([0, 4]))
    with pytest.raises(DataError, match="inputs of different shapes"):
        example_batch([(torch.zeros(2), 0), (torch.zeros(3), 1)], 2, "d")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="inputs of type list, not tensors"):
        example_batch([([0.0], 0)], 2, "d")  # type: ignore[arg-type]


# ----------------------------------------------------------- fxreplay train, each kind


def _train(tmp_path: Path, *args: str, steps: str = "2", batch: str = "8") -> Path:
    out = tmp_path / "run"
    result = run_cli("train", *args, "--max-steps", steps, "--batch-size", batch, "--cost", "flops", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def _epoch(out: Path) -> dict:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"][-1]


def test_train_a_cnn_on_fashion_mnist_from_torchvisions_files(tmp_path: Path) -> None:
    make_fashion_mnist(tmp_path / "data")
    out = _train(tmp_path, "--model", CNN, "--data", "torchvision:FashionMNIST", "--data-root", str(tmp_path / "data"))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["model"]["name"], saved["data"]["name"], saved["data"]["root"]) == (CNN, "torchvision:FashionMNIST", str(tmp_path / "data"))
    plan = yaml.safe_load((out / "plan" / "plan.yaml").read_text())["model"]
    assert (plan["input_shape"], plan["num_classes"]) == ([1, 28, 28], 10)
    assert 0 <= _epoch(out)["test_accuracy"] <= 1


def test_train_gpt_on_a_text_file(tmp_path: Path) -> None:
    (tmp_path / "tiny.txt").write_bytes(b"def f(x):\n    return x + 1\n" * 200)
    out = _train(tmp_path, "--model", "gpt_tiny", "--data", f"text:{tmp_path / 'tiny.txt'}", batch="4")
    record = _epoch(out)
    assert record["test_perplexity"] == pytest.approx(np.exp(record["test_loss"]))
    assert 0 <= record["test_accuracy"] <= 1
    plan = yaml.safe_load((out / "plan" / "plan.yaml").read_text())["model"]
    assert (plan["input_shape"], plan["input_dtype"], plan["num_classes"]) == ([64], "int64", 256)
    summary = run_cli("train", "--resume", str(out), "--max-steps", "3")
    assert summary.exit_code == 0, summary.output
    text = " ".join(summary.output.split())
    assert "test perplexity" in text and "test accuracy (per token)" in text


def test_a_language_model_is_built_for_the_data_sets_block_size(tmp_path: Path) -> None:
    # gpt_tiny's own context is 64 tokens; data.block_size 96 builds it with 96 positions
    # (a user's builder with a block_size argument gets it the same way).
    (tmp_path / "tiny.txt").write_bytes(b"def f(x):\n    return x + 1\n" * 200)
    (tmp_path / "fxt_lm.py").write_text(
        "from fxreplay.models.gpt import GPT\n"
        "def build_model(num_classes, block_size):\n"
        "    return GPT(vocab=num_classes, block_size=block_size, layers=1, heads=2, width=16, dropout=0.0, tie=True)\n")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"data": {"block_size": 96}}))
    for i, model in enumerate(("gpt_tiny", str(tmp_path / "fxt_lm.py"))):
        out = _train(tmp_path / str(i), "--config", str(tmp_path / "cfg.yaml"), "--model", model, "--data", f"text:{tmp_path / 'tiny.txt'}",
                     batch="4")
        weights = torch.load(out / "model.pt")
        assert weights["pos_emb.weight"].shape[0] == 96, model
        assert yaml.safe_load((out / "plan" / "plan.yaml").read_text())["model"]["input_shape"] == [96]


@pytest.mark.parametrize("kind", ["imagefolder", "function", "module", "default text", "cifar10"])
def test_train_on_every_kind_of_data_set(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tiny_rgb.py").write_text(TINY_RGB)
    (tmp_path / "fxt_data.py").write_text(USER_DATA)
    (tmp_path / "fxt_mlp.py").write_text(MLP)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("fxt_data", "fxt_mlp"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    args = {
        "imagefolder": ["--model", str(tmp_path / "tiny_rgb.py"), "--data", f"imagefolder:{tmp_path / 'pets'}"],
        "function": ["--model", str(tmp_path / "fxt_mlp.py"), "--data", f"{tmp_path / 'fxt_data.py'}:make"],
        "module": ["--model", "fxt_mlp:build_model", "--data", "fxt_data:make"],
        "default text": ["--model", "gpt_tiny", "--data", "text:"],
        "cifar10": ["--config", str(tmp_path / "cifar.yaml"), "--model", str(tmp_path / "tiny_rgb.py")],
    }[kind]
    if kind == "imagefolder":
        make_image_folder(tmp_path / "pets")
    if kind == "cifar10":
        from test_data import make_cifar10

        make_cifar10(tmp_path / "cifar")
        (tmp_path / "cifar.yaml").write_text(f"data: {{name: cifar10, root: {tmp_path / 'cifar'}, verify: false}}\npartition: {{K: 2}}\n")
    out = _train(tmp_path, *args, batch="4")
    plan = yaml.safe_load((out / "plan" / "plan.yaml").read_text())["model"]
    expected = {"imagefolder": 2, "function": 4, "module": 4, "default text": 256, "cifar10": 10}[kind]
    assert plan["num_classes"] == expected
    assert "test_loss" in _epoch(out)


# ------------------------------------------------------------------- what does not fit


def test_data_that_does_not_fit_the_model_is_refused_before_the_run_directory(tmp_path: Path) -> None:
    make_fashion_mnist(tmp_path / "data")
    (tmp_path / "tiny.txt").write_bytes(b"print('hello')\n" * 100)
    (tmp_path / "three.py").write_text(
        "from torch import nn\n"
        "def build_model():  # ignores num_classes: always 3 classes\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 3))\n")
    (tmp_path / "pooled.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Pooled(nn.Module):  # tokens in, one score vector per sequence out\n"
        "    def __init__(self, num_classes=256):\n"
        "        super().__init__()\n"
        "        self.emb, self.fc = nn.Embedding(256, 8), nn.Linear(8, num_classes)\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.emb(x).mean(1))\n"
        "def build_model(num_classes=256):\n"
        "    return Pooled(num_classes)\n")
    fashion = ["--data", "torchvision:FashionMNIST", "--data-root", str(tmp_path / "data")]
    text = ["--data", f"text:{tmp_path / 'tiny.txt'}"]
    cases = [
        (["--model", "resnet20", *fashion], ["model 'resnet20' cannot take the inputs of data set 'torchvision:FashionMNIST'",
                                             "examples of shape (1, 28, 28), float32", "made for examples of shape (3, 32, 32)",
                                             "to have 3 channels, but got 1"]),
        (["--model", str(tmp_path / "three.py"), *fashion], ["training set has labels 0..9, but the model predicts 3 classes"]),
        (["--model", CNN, *text], ["cannot take the inputs of data set", "examples of shape (64,), int64"]),
        (["--model", str(tmp_path / "pooled.py"), *text], ["does not fit the targets of data set", "output is (2, 256)",
                                                           "targets are shape (2, 64), int64"]),
        (["--model", CNN, "--data", "torchvision:FashionMNIST", "--data-root", str(tmp_path / "nowhere")],
         ["torchvision:FashionMNIST not found", "train-images-idx3-ubyte", "download: true"]),
        (["--data", "mnist"], ["unknown data set 'mnist' (did you mean 'torchvision:MNIST'?)"]),
        (["--data", "torchvision:SVHN"], ["torchvision:SVHN is built as SVHN(", "split"]),
    ]
    for args, needles in cases:
        out = tmp_path / "run"
        assert_user_error(run_cli("train", *args, "--max-steps", "1", "--cost", "flops", "--out", str(out)), *needles)
        assert not out.exists(), args


# --------------------------------------------------------------- one rank per stage


def test_fashion_mnist_with_two_ranks(tmp_path: Path) -> None:
    make_fashion_mnist(tmp_path / "data")
    out = _train(tmp_path, "--model", CNN, "--data", "torchvision:FashionMNIST", "--data-root", str(tmp_path / "data"),
                 "--nproc", "2", "--K", "2", steps="3")
    assert {"timeline.json", "checkpoint.pt", "model.pt"} <= {p.name for p in out.iterdir()}
    assert "test_accuracy" in _epoch(out)


def test_text_with_two_ranks(tmp_path: Path) -> None:
    (tmp_path / "tiny.txt").write_bytes(b"for i in range(10):\n    print(i)\n" * 100)
    out = _train(tmp_path, "--model", "gpt_tiny", "--data", f"text:{tmp_path / 'tiny.txt'}", "--nproc", "2", "--K", "2",
                 steps="3", batch="4")
    assert {"timeline.json", "checkpoint.pt", "model.pt"} <= {p.name for p in out.iterdir()}
    assert "test_perplexity" in _epoch(out)


@pytest.mark.parametrize("where", ["raw", "flat"])
def test_fashion_mnist_is_read_from_gzipped_idx_files_as_they_come(tmp_path: Path, where: str) -> None:
    # a Debian package or a download folder: *.gz, in torchvision's folder or directly in data.root
    import gzip

    written = make_fashion_mnist(tmp_path / "made")
    folder = tmp_path / "root" / ("FashionMNIST/raw" if where == "raw" else "")
    folder.mkdir(parents=True, exist_ok=True)
    for name in FASHION_FILES:
        (folder / f"{name}.gz").write_bytes(gzip.compress((tmp_path / "made" / "FashionMNIST" / "raw" / name).read_bytes()))
    for train, prefix in ((True, "train"), (False, "t10k")):
        dataset = torchvision_dataset("FashionMNIST", tmp_path / "root", train=train)
        assert type(dataset).__name__ == "FashionMNIST" and len(dataset) == len(written[f"{prefix}_labels"])  # type: ignore[arg-type]
        for i in (0, len(dataset) - 1):  # type: ignore[arg-type]
            x, y = dataset[i]
            torch.testing.assert_close(x, normalised(written[f"{prefix}_images"][i]), rtol=0, atol=1e-6)
            assert y == written[f"{prefix}_labels"][i]
        assert num_classes_of(dataset) == 10
    # a damaged .gz is one paragraph naming the file
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8bnot gzip")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        torchvision_dataset("FashionMNIST", tmp_path / "root", train=False)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_the_debian_packages_fashion_mnist_files_read_as_they_are() -> None:
    test = torchvision_dataset("FashionMNIST", "/usr/share/datasets/fashion-mnist", train=False)
    assert len(test) == 10_000 and test.targets.bincount().tolist() == [1000] * 10  # type: ignore[arg-type, attr-defined]
    x, y = test[0]
    assert x.shape == (1, 28, 28) and y == 9  # the first test image is an ankle boot

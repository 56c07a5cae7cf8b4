"""Data sets and loaders, on tiny CIFAR archives built here (never downloaded, never the
shared full copy: these tests must be fast and self-contained)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from fxreplay.config import DataConfig
from fxreplay.data import (
    LabelsOnly,
    labels_only,
    replica_shard,
    NUM_CLASSES,
    SeededBatchSampler,
    build_datasets,
    cifar,
    digits,
    make_loader,
)
from fxreplay.errors import DataError

PER_BATCH = 4  # images per CIFAR-10 training batch file in the tiny archive


def _dump(path: Path, obj: object) -> None:
    # The official files are Python 2 pickles whose keys torchvision reads (encoding
    # "latin1") as str: "data", "labels"/"fine_labels", "label_names". A Python 3 pickle
    # with str keys loads identically.
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)  # N x (3 x 32 x 32), CHW


def make_cifar10(root: Path, seed: int = 0) -> Path:
    """ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}, tiny."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        labels = rng.integers(0, 10, PER_BATCH).tolist()
        _dump(folder / f"data_batch_{i}", {"data": _images(rng, PER_BATCH), "labels": labels})
    _dump(folder / "test_batch", {"data": _images(rng, 6), "labels": list(range(6))})
    _dump(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    return root


def make_cifar100(root: Path, seed: int = 0) -> Path:
    """ROOT/cifar-100-python/{train, test, meta}, tiny."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", 12), ("test", 5)):
        fine = rng.integers(0, 100, n).tolist()
        coarse = [f // 5 for f in fine]
        entry = {"data": _images(rng, n), "fine_labels": fine, "coarse_labels": coarse}
        _dump(folder / name, entry)
    meta = {
        "fine_label_names": [f"fine{i}" for i in range(100)],
        "coarse_label_names": [f"coarse{i}" for i in range(20)],
    }
    _dump(folder / "meta", meta)
    return root


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_loads_without_verification(tmp_path: Path) -> None:
    root = make_cifar10(tmp_path)
    train = cifar("cifar10", root, train=True, augment=True, verify=False)
    test = cifar("cifar10", root, train=False, augment=False, verify=False)
    assert (len(train), len(test)) == (5 * PER_BATCH, 6)
    image, label = test[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label == 3
    assert train.classes[0] == "class0"  # type: ignore[attr-defined]


def test_cifar100_loads_fine_labels(tmp_path: Path) -> None:
    root = make_cifar100(tmp_path)
    train = cifar("cifar100", root, train=True, verify=False)
    test = cifar("cifar100", root, train=False, augment=False, verify=False)
    assert (len(train), len(test)) == (12, 5)
    assert len(train.classes) == 100  # type: ignore[attr-defined]
    image, label = train[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 100


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_verify_rejects_non_official_files(tmp_path: Path, name: str) -> None:
    root = make_cifar10(tmp_path) if name == "cifar10" else make_cifar100(tmp_path)
    with pytest.raises(DataError) as info:
        cifar(name, root, train=True, verify=True)
    message = str(info.value)
    assert "md5" in message and "verify: false" in message
    assert str(tmp_path) in message


def test_missing_root_says_where_it_looked_and_what_to_do(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        cifar("cifar10", root, train=True, verify=False)
    message = str(info.value)
    assert str(root / "cifar-10-batches-py") in message
    for expected in ("data_batch_1", "data_batch_5", "test_batch", "batches.meta"):
        assert expected in message
    assert "download: true" in message and "verify: false" in message
    assert "tar xzf cifar-10-python.tar.gz -C" in message and "../shared" not in message
    assert "\n" not in message  # one paragraph


def test_missing_file_is_named(tmp_path: Path) -> None:
    root = make_cifar10(tmp_path)
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match="lacks test_batch"):
        cifar("cifar10", root, train=False, verify=False)


def test_unreadable_file_is_a_data_error(tmp_path: Path) -> None:
    root = make_cifar10(tmp_path)
    # bytes keys (a Python 3 re-pickle gone wrong) are not what torchvision reads
    _dump(root / "cifar-10-batches-py" / "test_batch", {b"data": b"", b"labels": []})
    with pytest.raises(DataError, match="unreadable"):
        cifar("cifar10", root, train=False, verify=False)


def test_unknown_cifar_name() -> None:
    with pytest.raises(DataError, match="cifar10"):
        cifar("cifar1000", "data")


def test_augmentation_only_on_training(tmp_path: Path) -> None:
    root = make_cifar10(tmp_path)
    augmented = cifar("cifar10", root, train=True, augment=True, verify=False)
    plain = cifar("cifar10", root, train=True, augment=False, verify=False)
    test = cifar("cifar10", root, train=False, augment=True, verify=False)

    def kinds(ds: object) -> list[str]:
        return [type(t).__name__ for t in ds.transform.transforms]  # type: ignore[attr-defined]

    assert kinds(augmented) == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert kinds(plain) == kinds(test) == ["ToTensor", "Normalize"]
    crops = torch.stack([augmented[0][0] for _ in range(8)])
    assert crops.shape == (8, 3, 32, 32)
    assert not all(torch.equal(crops[0], c) for c in crops[1:])  # random crops differ
    # without augmentation an image is exactly the file's pixels, scaled and normalised
    raw = torch.from_numpy(plain.data[0]).permute(2, 0, 1).float() / 255  # type: ignore[attr-defined]
    mean, std = (torch.tensor(v)[:, None, None] for v in ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)))
    torch.testing.assert_close(plain[0][0], (raw - mean) / std)
    torch.testing.assert_close(test[0][0], (torch.from_numpy(test.data[0]).permute(2, 0, 1).float() / 255 - mean) / std)  # type: ignore[attr-defined]


def test_augmented_batches_are_a_function_of_seed_and_epoch(tmp_path: Path) -> None:
    train = cifar("cifar10", make_cifar10(tmp_path), train=True, augment=True, verify=False)

    def images(seed: int, epoch: int, skip: int = 0, workers: int = 0) -> torch.Tensor:
        loader = make_loader(
            train, 4, shuffle=True, seed=seed, epoch=epoch, skip=skip, num_workers=workers
        )
        return torch.cat([x for x, _ in loader])

    full = images(0, 1)
    torch.manual_seed(123)  # whatever else used the global RNG must not matter
    assert torch.equal(images(0, 1), full)
    assert torch.equal(images(0, 1, workers=2), full)
    assert torch.equal(images(0, 1, skip=2), full[8:])
    assert not torch.equal(images(0, 2), full)


def test_build_datasets_cifar(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    config = DataConfig(name="cifar10", root=str(tmp_path), verify=False)
    train, test = build_datasets(config)
    assert (len(train), len(test)) == (5 * PER_BATCH, 6)  # type: ignore[arg-type]
    assert len(test.transform.transforms) == 2  # type: ignore[attr-defined]  # never augmented


# -------------------------------------------------------------------------- digits


def test_digits_split_and_scaling() -> None:
    train, test = digits(train=True), digits(train=False)
    x, y = train.tensors
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(test) == 360 and len(train) + len(test) == 1797
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    # stratified: every class is ~20% test
    test_counts = torch.bincount(test.tensors[1], minlength=10)
    assert test_counts.min() >= 35 and test_counts.max() <= 37
    assert torch.equal(digits(train=False).tensors[0], test.tensors[0])
    assert not torch.equal(digits(train=False, seed=1).tensors[1], test.tensors[1])


def test_the_cached_split_is_sklearns_and_a_damaged_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    module = importlib.import_module("fxreplay.data.digits")  # the module (the package's ``digits`` is the function)

    def both() -> list[TensorDataset]:
        return [digits(train=True), digits(train=False)]

    monkeypatch.setenv("FXREPLAY_CACHE_DIR", "")  # off: sklearn's split, computed now
    fresh = both()
    monkeypatch.setenv("FXREPLAY_CACHE_DIR", str(tmp_path / "cache"))
    assert both()[0].tensors[0].shape == (1437, 1, 8, 8)
    (cached,) = (tmp_path / "cache").iterdir()
    assert cached.name.startswith("digits-split0-sklearn") and cached.suffix == ".npz"

    def same(got: list[TensorDataset]) -> bool:
        return all(torch.equal(a, b) for g, f in zip(got, fresh) for a, b in zip(g.tensors, f.tensors))

    def no_sklearn(seed: int) -> None:
        raise AssertionError("the cache was not used")

    with monkeypatch.context() as m:  # a cache hit never calls sklearn, and gives its arrays bit for bit
        m.setattr(module, "_split_with_sklearn", no_sklearn)
        assert same(both())
    good = cached.read_bytes()
    for damage in (good[: len(good) // 2], b"", b"not an npz"):  # a killed writer, an empty file, garbage
        cached.write_bytes(damage)
        assert same(both()) and cached.read_bytes() == good  # recomputed and rewritten
    arrays = dict(np.load(cached))  # a well-formed file with the wrong contents is not trusted either
    np.savez(cached, arrays["arr_0"][:10], arrays["arr_1"][:10], arrays["arr_2"], arrays["arr_3"])
    assert same(both()) and cached.read_bytes() == good
    (tmp_path / "a file").write_text("")  # a cache directory that cannot be made: no cache, the same data
    monkeypatch.setenv("FXREPLAY_CACHE_DIR", str(tmp_path / "a file" / "cache"))
    assert same(both())


def test_the_offline_default_loads_neither_torchvision_nor_matplotlib_nor_sklearn(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each costs seconds in every process of a run (every rank): only what needs them loads them.
    import os
    import subprocess
    import sys

    monkeypatch.setenv("FXREPLAY_CACHE_DIR", str(tmp_path))
    digits()  # the split cached, as the first process of a run leaves it
    env = {**os.environ, "FXREPLAY_CACHE_DIR": str(tmp_path)}
    code = ("import sys, fxreplay.run, fxreplay.executor.distributed, cli.app\n"
            "from fxreplay.config import DataConfig\n"
            "from fxreplay.data import build_datasets\n"
            "build_datasets(DataConfig(name='digits'))\n"
            "print(sorted(m for m in ('torchvision', 'matplotlib', 'sklearn') if m in sys.modules))")
    root = str(Path(__file__).resolve().parents[1])
    again = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    assert again.stdout.split() == ["[]"], again.stdout


def test_build_datasets_digits() -> None:
    train, test = build_datasets(DataConfig(name="digits"))
    assert (len(train), len(test)) == (1437, 360)  # type: ignore[arg-type]
    assert NUM_CLASSES["digits"] == 10


def test_a_subset_is_fixed_by_its_seed_and_leaves_the_test_set_whole(tmp_path: Path) -> None:
    full, _ = build_datasets(DataConfig(name="digits"))
    train, test = build_datasets(DataConfig(name="digits", subset=100))
    again, _ = build_datasets(DataConfig(name="digits", subset=100))
    other, _ = build_datasets(DataConfig(name="digits", subset=100, subset_seed=1))
    assert len(train) == 100 and len(test) == 360  # type: ignore[arg-type]
    assert train.indices == again.indices == sorted(train.indices)  # type: ignore[attr-defined]
    assert train.indices != other.indices  # type: ignore[attr-defined]
    assert torch.equal(train[5][0], full[train.indices[5]][0])  # type: ignore[attr-defined]
    make_cifar10(tmp_path)
    cifar_train, _ = build_datasets(DataConfig(name="cifar10", root=str(tmp_path), verify=False, subset=7))
    assert len(cifar_train) == 7  # type: ignore[arg-type]
    with pytest.raises(DataError, match="data.subset is 2000 but the training set has 1437"):
        build_datasets(DataConfig(name="digits", subset=2000))


def test_labels_only_batches_match_the_full_loader(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    cifar_train, _ = build_datasets(DataConfig(name="cifar10", root=str(tmp_path), verify=False, subset=20))
    digits_train, _ = build_datasets(DataConfig(name="digits"))
    for dataset in (cifar_train, digits_train):
        view = labels_only(dataset)
        assert isinstance(view, LabelsOnly) and len(view) == len(dataset)  # type: ignore[arg-type]
        full = list(make_loader(dataset, 8, shuffle=True, seed=3, epoch=1))
        light = list(make_loader(view, 8, shuffle=True, seed=3, epoch=1))
        assert [torch.equal(a[1], b[1]) for a, b in zip(full, light)] == [True] * len(full)
        assert light[0][0].shape == (8, 0)  # no input decoded
    opaque = torch.utils.data.ConcatDataset([digits_train])  # labels not readable without loading
    assert labels_only(opaque) is opaque


def test_each_replica_reads_its_shard_of_the_very_batches_of_the_full_loader(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    cifar_train, _ = build_datasets(DataConfig(name="cifar10", root=str(tmp_path), verify=False, subset=20))
    digits_train, _ = build_datasets(DataConfig(name="digits"))
    for dataset in (cifar_train, digits_train):  # CIFAR's training split is augmented (crop, flip)
        full = list(make_loader(dataset, 8, shuffle=True, seed=3, epoch=1, skip=1))
        for D in (2, 3):
            for d in range(D):
                shard = list(make_loader(replica_shard(dataset, d, D), 8, shuffle=True, seed=3, epoch=1, skip=1))
                assert len(shard) == len(full)
                for (x, y), (xs, ys) in zip(full, shard):
                    assert torch.equal(xs, torch.tensor_split(x, D)[d])  # its rows, augmented alike
                    assert torch.equal(ys, y)                              # every label of the batch
    opaque = torch.utils.data.ConcatDataset([digits_train])  # labels not readable without loading
    assert replica_shard(opaque, 1, 2) is opaque and replica_shard(digits_train, 0, 1) is digits_train
    with pytest.raises(DataError, match="at least 3 examples"):
        list(make_loader(replica_shard(digits_train, 0, 3), 2, shuffle=False, seed=0, epoch=0))


# ------------------------------------------------------------------------- loaders


def _indices(n: int, **kwargs: object) -> list[int]:
    dataset = TensorDataset(torch.arange(n))
    loader = make_loader(dataset, **kwargs)  # type: ignore[arg-type]
    return torch.cat([x for (x,) in loader]).tolist() if len(loader) else []


def test_order_is_a_function_of_seed_and_epoch() -> None:
    a = _indices(50, batch_size=8, shuffle=True, seed=3, epoch=7)
    assert sorted(a) == list(range(50))
    torch.manual_seed(999)
    assert _indices(50, batch_size=8, shuffle=True, seed=3, epoch=7) == a
    assert _indices(50, batch_size=8, shuffle=True, seed=3, epoch=8) != a
    assert _indices(50, batch_size=8, shuffle=True, seed=4, epoch=7) != a
    assert _indices(50, batch_size=8, shuffle=False, seed=3, epoch=7) == list(range(50))


def test_seed_and_epoch_do_not_collide() -> None:
    # seed * 1000 + epoch would make these equal
    assert _indices(30, batch_size=30, shuffle=True, seed=0, epoch=1000) != _indices(
        30, batch_size=30, shuffle=True, seed=1, epoch=0
    )


def test_loader_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _indices(20, batch_size=4, shuffle=True, seed=0, epoch=0)
    assert torch.equal(torch.rand(3), expected)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    batch_size=st.integers(1, 12),
    skip=st.integers(0, 6),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_skip_resumes_on_the_same_batches(
    n: int, batch_size: int, skip: int, drop_last: bool, seed: int
) -> None:
    common = dict(batch_size=batch_size, shuffle=True, seed=seed, epoch=2, drop_last=drop_last)
    full = _indices(n, **common)
    resumed = _indices(n, skip=skip, **common)
    assert resumed == full[skip * batch_size :]
    sampler = SeededBatchSampler(n, batch_size, True, seed, 2, drop_last, skip)
    whole = n // batch_size if drop_last else -(-n // batch_size)
    assert len(sampler) == max(0, whole - skip) == len(list(sampler))
    assert all(len(b) == batch_size for b in sampler) or not drop_last


def test_bad_loader_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        SeededBatchSampler(10, 0, True, 0, 0)
    with pytest.raises(ValueError, match="skip"):
        SeededBatchSampler(10, 2, True, 0, 0, skip=-1)

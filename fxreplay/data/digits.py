"""sklearn's 8x8 handwritten digits: the offline default's data set (no torchvision needed).

The split is sklearn's (``train_test_split``, stratified), and importing sklearn costs about
3 s (it loads scipy) in every process that builds the data set: each rank of a distributed
run, every ``fxreplay`` command. The split arrays are therefore kept in a cache file, one per
(sklearn version, split seed), written atomically the first time and checked on every read;
a missing, damaged or unwritable cache only means sklearn is imported as before. The cache
lives in ``$FXREPLAY_CACHE_DIR`` (set it empty to turn the cache off), else
``$XDG_CACHE_HOME/fxreplay``, else ``~/.cache/fxreplay``.
"""
from __future__ import annotations

import io
import os
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fxreplay.checkpoint import replace_file

_COUNTS = (1437, 360)  # training and test examples of the 80/20 split of the 1,797 digits


def digits(train: bool = True, seed: int = 0) -> TensorDataset:
    """sklearn's 1,797 8x8 handwritten digits, split 80/20 stratified by class.

    Pixels (0..16) are scaled to [0, 1], then standardised with the training split's mean
    and std (so test data never leaks into the statistics). Inputs are float32 (N, 1, 8, 8),
    labels int64. The split depends only on ``seed``: keep it fixed across runs you compare.
    """
    x_train, y_train, x_test, y_test = _split(seed)
    mean, std = float(x_train.mean()), float(x_train.std())
    xs, ys = (x_train, y_train) if train else (x_test, y_test)
    inputs = torch.from_numpy((xs - mean) / std).reshape(-1, 1, 8, 8)
    return TensorDataset(inputs, torch.from_numpy(ys))


def cache_dir() -> Path | None:
    """Where the split is cached (None: the cache is off)."""
    chosen = os.environ.get("FXREPLAY_CACHE_DIR")
    if chosen is not None:
        return Path(chosen).expanduser() if chosen else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fxreplay"


def _split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): pixels in [0, 1] as float32, labels int64."""
    where = cache_dir()
    path = None
    if where is not None:
        try:
            path = where / f"digits-split{seed}-sklearn{metadata.version('scikit-learn')}.npz"
        except metadata.PackageNotFoundError:
            path = None  # the import below says what is missing
    if path is not None:
        cached = _read(path)
        if cached is not None:
            return cached
    arrays = _split_with_sklearn(seed)
    if path is not None:
        buffer = io.BytesIO()
        np.savez(buffer, *arrays)
        try:
            replace_file(path, lambda f: f.write(buffer.getvalue()))
        except OSError:
            pass  # a read-only home: no cache, the same arrays
    return arrays


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The cached split, or None when it is missing, unreadable or not a well-formed split
    (shapes, dtypes, pixel and label ranges; the file name carries the seed and sklearn's version)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            x_train, y_train, x_test, y_test = (f[f"arr_{i}"] for i in range(4))
    except Exception:  # missing, truncated, not an npz: recomputed and rewritten
        return None
    for x, y, n in ((x_train, y_train, _COUNTS[0]), (x_test, y_test, _COUNTS[1])):
        if x.shape != (n, 64) or x.dtype != np.float32 or y.shape != (n,) or y.dtype != np.int64:
            return None
        if not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1 and y.min() >= 0 and y.max() <= 9):
            return None
    return x_train, y_train, x_test, y_test


def _split_with_sklearn(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    return x_train, y_train, x_test, y_test

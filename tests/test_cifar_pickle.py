"""CIFAR files read with ``verify: false`` cannot run code: a restricted unpickler
(``fxreplay.data.cifar_pickle``) rebuilds only what CIFAR files hold.

Tiny archives of the exact format are built here (``test_data.make_cifar10``: protocol-2
pickles of dicts of numpy arrays and lists, as a Python 3 re-pack writes them), plus the
official files' own form (Python 2 strings, numpy 1's ``numpy.core`` names), plus files
crafted to run code when unpickled.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from fxreplay.data import cifar
from fxreplay.errors import DataError
from test_data import make_cifar10, make_cifar100


class _Payload:
    """Unpickled, it creates the file ``marker``: what a crafted file would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (os.system, (f"touch {self.marker}",))


def _craft(path: Path, marker: Path, where: str) -> None:
    entry: dict[str, object] = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]}
    entry[where] = _Payload(marker)
    path.write_bytes(pickle.dumps(entry, protocol=2))


@pytest.mark.parametrize("name, file, where", [
    ("cifar10", "data_batch_3", "data"),
    ("cifar10", "test_batch", "labels"),
    ("cifar10", "batches.meta", "label_names"),
    ("cifar100", "train", "data"),
])
def test_a_crafted_cifar_file_is_refused_and_its_code_does_not_run(tmp_path: Path, name: str, file: str, where: str) -> None:
    root = make_cifar10(tmp_path / "root") if name == "cifar10" else make_cifar100(tmp_path / "root")
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    marker = tmp_path / "ran"
    _craft(folder / file, marker, where)
    train = file != "test_batch"
    with pytest.raises(DataError) as info:
        cifar(name, root, train=train, verify=False)
    message = str(info.value)
    assert f"refused to read {folder / file}" in message and "posix.system" in message and "did not run it" in message
    assert "\n" not in message
    assert not marker.exists()


def test_the_cli_refuses_a_crafted_file_in_one_paragraph(tmp_path: Path) -> None:
    from clitools import assert_user_error, run_cli

    root = make_cifar10(tmp_path / "root")
    marker = tmp_path / "ran"
    _craft(root / "cifar-10-batches-py" / "data_batch_1", marker, "data")
    config = tmp_path / "cifar.yaml"
    config.write_text(f"data: {{name: cifar10, root: {root}, verify: false}}\npartition: {{K: 2}}\n")
    assert_user_error(run_cli("train", "--config", str(config), "--max-steps", "1", "--out", str(tmp_path / "run")),
                      "refused to read", "data_batch_1")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_the_official_form_still_loads(tmp_path: Path) -> None:
    """The official files (and ../shared/data/cifar10/build.py's re-pack) are Python 2 pickles:
    keys and strings as Python 2 ``str``, arrays rebuilt through ``numpy.core.multiarray``."""
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    py2 = (b"\x80\x02}q\x00(U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03K\x00\x85"
           b"U\x01b\x87Rq\x04(K\x01K\x02M\x00\x0c\x86cnumpy\ndtype\nq\x05U\x02u1K\x00K\x01\x87Rq\x06(K\x03U\x01|NNNJ\xff\xff"
           b"\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T\x00\x18\x00\x00" + data.tobytes() + b"tbU\x06labelsq\x07]q\x08(K\x03K\x07e"
           b"U\x0bbatch_labelq\tU\x05batchq\nu.")
    path = tmp_path / "data_batch_1"
    path.write_bytes(py2)
    from fxreplay.data import cifar_pickle

    entry = cifar_pickle.load(path)
    assert entry["labels"] == [3, 7] and entry["batch_label"] == "batch"
    np.testing.assert_array_equal(entry["data"], data)


def test_numpy_scalars_and_protocol_5_arrays_load(tmp_path: Path) -> None:
    entry = {"data": np.ones((2, 3072), np.uint8), "labels": [np.int64(4), np.int64(9)], "filenames": [b"a.png", b"b.png"]}
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(entry, protocol=5))
    from fxreplay.data import cifar_pickle

    loaded = cifar_pickle.load(path)
    assert [int(v) for v in loaded["labels"]] == [4, 9] and loaded["filenames"] == [b"a.png", b"b.png"]
    np.testing.assert_array_equal(loaded["data"], entry["data"])


def test_object_arrays_and_other_codecs_are_refused(tmp_path: Path) -> None:
    from fxreplay.data import cifar_pickle

    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({"data": np.array([1, "x"], dtype=object)}, protocol=2))
    with pytest.raises(DataError, match="numpy array of Python objects"):
        cifar_pickle.load(path)
    # _codecs.encode with another codec than latin-1 (what Python 3 pickles bytes with)
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(DataError, match="_codecs.encode with encoding 'rot13'"):
        cifar_pickle.load(path)

"""fxreplay.compiler.loading: model specs (file, file:attr, pkg.module:attr, zoo, torchvision)
and example inputs; every bad spec is a ModelLoadError that says what to do."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fxreplay.compiler.loading import load_model, make_example_inputs
from fxreplay.errors import ModelLoadError

MODEL_FILE = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(x)

def build_model():
    return Net(3)

model = Net(5)
instance = Net(6)
fixed = lambda: Net(2)
NUMBER = 3

def not_a_model():
    return {"fc": 1}

def needs_args(width):
    return Net(width)

def example_inputs():
    return [torch.ones(2, 4), 7]
'''


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "net.py"
    path.write_text(MODEL_FILE)
    return path


def _classes(model: nn.Module) -> int:
    return model.fc.out_features  # type: ignore[return-value]


# -- make_example_inputs ------------------------------------------------------------------

def test_example_inputs_have_the_batch_shape_and_dtype() -> None:
    (x,) = make_example_inputs([3, 5], 4)
    assert x.shape == (4, 3, 5) and x.dtype == torch.float32
    (y,) = make_example_inputs((2,), 3, dtype="float64")
    assert y.shape == (3, 2) and y.dtype == torch.float64
    (h,) = make_example_inputs((2,), 3, dtype="float16")
    assert h.dtype == torch.float16
    assert make_example_inputs(["3", "2"], 1)[0].shape == (1, 3, 2)  # sizes as parsed from a CLI string


def test_example_inputs_are_reproducible_by_seed_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(1)
    a = make_example_inputs((8,), 16, seed=5)[0]
    after_a = torch.rand(3)
    torch.manual_seed(2)
    b = make_example_inputs((8,), 16, seed=5)[0]
    assert torch.equal(a, b)  # whatever the global seed
    c = make_example_inputs((8,), 16, seed=6)[0]
    assert not torch.equal(a, c)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_a)  # the global stream was not drawn from
    assert a.std() > 0.5  # random normal values, not a constant


def test_integer_inputs_are_zeros() -> None:
    (ids,) = make_example_inputs((16,), 4, seed=3, dtype="int64")
    assert ids.dtype == torch.int64 and ids.shape == (4, 16) and not ids.any()


@pytest.mark.parametrize(
    "shape, batch, dtype, message",
    [
        ((), 4, None, r"bad input shape \[\] / batch size 4: give positive sizes"),
        ((3, 0), 4, None, r"bad input shape \[3, 0\] / batch size 4"),
        ((3, -1), 4, None, r"bad input shape \[3, -1\]"),
        ((3,), 0, None, r"bad input shape \[3\] / batch size 0.*--input-shape 3,32,32 --batch-size 128"),
        ((3,), 2, "float33", "unknown input dtype 'float33': use a torch dtype name such as float32 or int64"),
        ((3,), 2, "nn", "unknown input dtype 'nn'"),  # an attribute of torch that is not a dtype
    ],
)
def test_bad_example_input_requests(shape: tuple[int, ...], batch: int, dtype: str | None, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        make_example_inputs(shape, batch, dtype=dtype)


# -- model files --------------------------------------------------------------------------

def test_a_file_prefers_build_model_and_gives_its_example_inputs(model_file: Path) -> None:
    loaded = load_model(str(model_file))
    assert _classes(loaded.model) == 3 and loaded.spec == str(model_file)
    assert loaded.input_shape is None
    assert loaded.example_inputs is not None and len(loaded.example_inputs) == 2  # a list becomes a tuple
    assert isinstance(loaded.example_inputs, tuple)
    assert torch.equal(loaded.example_inputs[0], torch.ones(2, 4)) and loaded.example_inputs[1] == 7


def test_a_file_without_build_model_uses_model(tmp_path: Path) -> None:
    path = tmp_path / "plain.py"
    path.write_text("import torch\nfrom torch import nn\nmodel = nn.Linear(2, 3)\nexample_inputs = torch.zeros(1, 2)\n")
    loaded = load_model(str(path))
    assert isinstance(loaded.model, nn.Linear) and loaded.model.out_features == 3
    assert loaded.example_inputs is not None and torch.equal(loaded.example_inputs[0], torch.zeros(1, 2))


@pytest.mark.parametrize("attr, classes", [("Net", 10), ("instance", 6), ("fixed", 2), ("model", 5)])
def test_a_named_attribute_class_instance_or_builder(model_file: Path, attr: str, classes: int) -> None:
    assert _classes(load_model(f"{model_file}:{attr}").model) == classes


def test_num_classes_goes_to_builders_that_take_it(model_file: Path) -> None:
    assert _classes(load_model(f"{model_file}:Net", num_classes=4).model) == 4
    assert _classes(load_model(f"{model_file}:fixed", num_classes=4).model) == 2  # takes no num_classes: not passed
    assert _classes(load_model(f"{model_file}:instance", num_classes=4).model) == 6  # already built


def test_a_model_file_may_import_its_siblings(tmp_path: Path) -> None:
    (tmp_path / "blocks_for_fxreplay_test.py").write_text("from torch import nn\nclass Block(nn.Linear):\n    pass\n")
    (tmp_path / "main.py").write_text("from blocks_for_fxreplay_test import Block\nmodel = Block(2, 2)\n")
    path_before = list(sys.path)
    try:
        loaded = load_model(str(tmp_path / "main.py"))
        assert type(loaded.model).__name__ == "Block"
        assert sys.path == path_before  # the file's folder is on the path only while it is imported
    finally:
        sys.modules.pop("blocks_for_fxreplay_test", None)


def test_a_module_path_spec() -> None:
    loaded = load_model("fxreplay.models.small:digits_cnn", num_classes=4)
    assert loaded.model.fc.out_features == 4 and loaded.example_inputs is None


# -- errors -------------------------------------------------------------------------------

def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model file '.*nope.py' does not exist\. Give the path of a Python file "
                                             r"that defines build_model\(\) or model"):
        load_model(str(tmp_path / "nope.py"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(f"{tmp_path}/models/net")  # a path, even without .py


def test_a_missing_attribute_lists_what_the_file_defines(model_file: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"net.py has no attribute 'Nope'\. It defines: .*Net.*build_model.*"
                                             r"Name a module instance"):
        load_model(f"{model_file}:Nope")
    with pytest.raises(ModelLoadError, match=r"has no attribute 'Net.head'"):
        load_model(f"{model_file}:Net.head")


@pytest.mark.parametrize(
    "attr, message",
    [
        ("NUMBER", r"net.py:NUMBER is a int, not an nn.Module or a callable that builds one"),
        ("not_a_model", r"net.py:not_a_model returned dict, not an nn.Module"),
        ("needs_args", r"calling .*net.py:needs_args with no arguments failed: .*width.* It must build the model without required arguments"),
    ],
)
def test_an_attribute_that_is_not_a_model(model_file: Path, attr: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model(f"{model_file}:{attr}")


def test_a_file_that_defines_no_model(tmp_path: Path) -> None:
    path = tmp_path / "empty.py"
    path.write_text("X = 1\n")
    with pytest.raises(ModelLoadError, match=r"empty.py defines neither build_model\(\) nor model.*'.*empty.py:MyNet'"):
        load_model(str(path))


def test_a_file_that_fails_to_import(tmp_path: Path) -> None:
    path = tmp_path / "broken.py"
    path.write_text("import torch\nraise ValueError('no weights here')\n")
    modules_before, path_before = set(sys.modules), list(sys.path)
    with pytest.raises(ModelLoadError, match=r"importing '.*broken.py' failed with ValueError: no weights here\. Fix the file"):
        load_model(str(path))
    assert set(sys.modules) == modules_before and sys.path == path_before


def test_a_module_that_cannot_be_imported() -> None:
    with pytest.raises(ModelLoadError, match=r"cannot import module 'no_such_package_fxr' \(.*\)\. Install it"):
        load_model("no_such_package_fxr:Net")
    with pytest.raises(ModelLoadError, match=r"fxreplay.models.small has no attribute 'resnet7'"):
        load_model("fxreplay.models.small:resnet7")


# -- the zoo and torchvision --------------------------------------------------------------

@pytest.mark.parametrize(
    "spec, shape",
    [("resnet20", (3, 32, 32)), ("zoo:digits_cnn", (1, 8, 8)), ("digits_cnn", (1, 8, 8)), ("mlp", None)],
)
def test_zoo_models_know_their_input_shape(spec: str, shape: tuple[int, ...] | None) -> None:
    loaded = load_model(spec)
    assert loaded.input_shape == shape and loaded.example_inputs is None and loaded.spec == spec


def test_zoo_num_classes_and_unknown_names() -> None:
    assert load_model("digits_cnn", num_classes=3).model.fc.out_features == 3
    with pytest.raises(ModelLoadError, match="unknown model 'resnet7'; the zoo has: digits_cnn, gpt_tiny, mlp, resnet101"):
        load_model("zoo:resnet7")


def test_a_torchvision_architecture_without_weights() -> None:
    loaded = load_model("torchvision:resnet18", num_classes=5)
    assert loaded.model.fc.out_features == 5 and loaded.input_shape == (3, 224, 224)
    assert loaded.example_inputs is None

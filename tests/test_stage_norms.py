"""benchmarks/stage_norms.py: each block's weight norm against the first run's, per pinned stage."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from benchtools import benchmark


def _run(folder: Path, scale: dict[str, float], boundaries: list[str] | None = None) -> Path:
    """A finished run's files: model.pt with weights of norm ``scale[block]`` in blocks stem, body.0, body.1, head."""
    folder.mkdir(parents=True)
    state = {}
    for block, name in [("stem", "stem.weight"), ("body.0", "body.0.conv.weight"), ("body.1", "body.1.conv.weight"),
                        ("head", "head.weight")]:
        w = torch.ones(2, 2)
        state[name] = w * scale[block] / w.norm()
        state[name.replace("weight", "bias")] = torch.full((2,), 100.0)  # 1-D: left out
    state["body.0.bn.running_mean"] = torch.zeros(2)
    state["body.0.bn.num_batches_tracked"] = torch.tensor(3)  # not floating point: left out
    torch.save(state, folder / "model.pt")
    if boundaries is not None:
        (folder / "config.yaml").write_text("partition:\n  K: 2\n  boundaries: [" + ", ".join(boundaries) + "]\n")
    return folder


def test_norms_per_block_and_ratios_per_pinned_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = benchmark("stage_norms")
    bp = _run(tmp_path / "lr0.1" / "bp", {"stem": 2, "body.0": 4, "body.1": 8, "head": 1}, ["body.1"])
    fr = _run(tmp_path / "lr0.1" / "fr", {"stem": 6, "body.0": 4, "body.1": 4, "head": 3})
    assert script.block_norms(bp) == pytest.approx({"stem": 2, "body.0": 4, "body.1": 8, "head": 1})
    script.main([str(bp), str(fr)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "stem..body.0", "body.1..head"]  # the stages bp's config pins
    assert lines[1].split()[:3] == ["lr0.1/bp", "3.00", "4.50"]  # mean norm over each stage's blocks
    row = lines[2].split()
    assert row[0] == "lr0.1/fr"
    assert float(row[1]) == pytest.approx((3 + 1) / 2, abs=0.005) and float(row[2]) == pytest.approx((0.5 + 3) / 2, abs=0.005)
    script.main([str(fr), str(bp), "--group", "3"])  # fr pins nothing: three blocks a column
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "stem..body.1", "head"]
    assert float(lines[2].split()[1]) == pytest.approx((1 / 3 + 1 + 2) / 3, abs=0.005)
    assert float(lines[2].split()[2]) == pytest.approx(1 / 3, abs=0.005)
    script.main([str(bp), str(fr), "--group", "2"])  # --group overrides the pinned stages
    assert capsys.readouterr().out.splitlines()[0].split() == ["run", "stem..body.0", "body.1..head"]
    cut = _run(tmp_path / "cut", {"stem": 1, "body.0": 1, "body.1": 1, "head": 1}, ["body"])  # a boundary over blocks
    script.main([str(cut), str(bp)])
    assert capsys.readouterr().out.splitlines()[0].split() == ["run", "stem", "body.0..head"]


def test_bad_input_is_refused_with_what_to_do(tmp_path: Path) -> None:
    script = benchmark("stage_norms")
    bp = _run(tmp_path / "bp", {"stem": 1, "body.0": 1, "body.1": 1, "head": 1})
    with pytest.raises(SystemExit, match="no model.pt"):
        script.main([str(bp), str(tmp_path / "missing")])
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"fc.weight": torch.ones(2, 2)}, other / "model.pt")
    with pytest.raises(SystemExit, match="other blocks"):
        script.main([str(bp), str(other)])
    with pytest.raises(SystemExit, match="--group"):
        script.main([str(bp), "--group", "0"])
    inside = _run(tmp_path / "inside", {"stem": 1, "body.0": 1, "body.1": 1, "head": 1}, ["body.1.conv"])
    with pytest.raises(SystemExit, match="'body.1.conv' is no block of the model.*--group"):
        script.main([str(inside), str(bp)])

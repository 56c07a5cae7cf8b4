"""benchmarks/recalibrate_bn.py: a run is rebuilt exactly from its directory (its stored-statistics test error is
the one the run recorded) and its BatchNorm statistics are recomputed at the final weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from benchtools import benchmark
from clitools import run_cli


def _script():
    return benchmark("recalibrate_bn")


def test_a_run_is_rebuilt_and_its_statistics_recomputed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert run_cli("train", "--max-steps", "30", "--out", str(out)).exit_code == 0  # the offline default: a BN CNN
    recorded = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in recorded if r.get("test_accuracy") is not None][-1]
    script = _script()
    script.main([str(out)])
    row = [c.strip() for c in capsys.readouterr().out.splitlines()[-1].strip("|").split("|")]
    assert row[0] == "run" and float(row[1]) == pytest.approx(100 * (1 - last["test_accuracy"]), abs=0.01)
    assert int(row[3]) > 0 and abs(float(row[2]) - float(row[1])) > 0.01  # 30 steps in: the statistics lag
    # the first BatchNorm's running mean is the average of its batches' means over one pass (a cumulative
    # average: an exponential one would weigh the last batches more)
    cfg, pipe, train_set, _ = script.rebuilt(out)
    norm = next(m for stage in pipe.stages for m in stage.modules() if isinstance(m, script.NORMS))
    means = []
    hook = norm.register_forward_hook(lambda module, args, output: means.append(args[0].mean(dim=(0, 2, 3))))
    script.recalibrate(pipe, train_set, cfg.data.batch_size)
    hook.remove()
    assert len(means) > 2 and torch.allclose(norm.running_mean, torch.stack(means).mean(0), atol=1e-6)
    assert not torch.allclose(norm.running_mean, means[-1], atol=1e-3)
    with pytest.raises(SystemExit, match="no checkpoint"):
        script.main([str(tmp_path / "nowhere")])

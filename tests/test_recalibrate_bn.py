"""benchmarks/recalibrate_bn.py: a run is rebuilt exactly from its directory (its stored-statistics test error is
the one the run recorded) and its BatchNorm statistics are recomputed at the final weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
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
    # recomputing twice gives the same statistics (a cumulative average over one pass, not an EMA)
    cfg, pipe, train_set, _ = script.rebuilt(out)
    script.recalibrate(pipe, train_set, cfg.data.batch_size)
    first = {k: v.clone() for k, v in pipe.model_state_dict().items() if "running" in k}
    script.recalibrate(pipe, train_set, cfg.data.batch_size)
    assert first and all(v.allclose(pipe.model_state_dict()[k]) for k, v in first.items())
    with pytest.raises(SystemExit, match="config"):
        script.main([str(tmp_path / "nowhere")])

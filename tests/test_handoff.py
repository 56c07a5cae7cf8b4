"""benchmarks/handoff.py: one run's weights and momentum, another run's training from there on."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from benchtools import benchmark
from clitools import run_cli

from fxreplay.checkpoint import load_checkpoint

STEPS = 12


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Runs of the offline default (a BN CNN), K = 3, stopped after STEPS iterations: BP, and FR with
    predict+stretch (stretched horizons 3^1.5 and 2^1.5 on the two delayed stages)."""
    root = tmp_path_factory.mktemp("handoff")
    made = {"bp": root / "bp", "fr": root / "fr"}
    assert run_cli("train", "--K", "3", "--method", "bp", "--max-steps", str(STEPS), "--out", str(made["bp"])).exit_code == 0
    assert run_cli("train", "--K", "3", "--method", "fr", "--compensation", "predict+stretch", "--max-steps", str(STEPS),
                   "--out", str(made["fr"])).exit_code == 0
    return made


def _workers(run: Path) -> list[dict]:
    return load_checkpoint(run)["trainer"]["executor"]["workers"]


def test_bp_weights_under_stretched_fr(runs: dict[str, Path], tmp_path: Path) -> None:
    script = benchmark("handoff")
    out = tmp_path / "swapped"
    assert script.main(["--weights", str(runs["bp"]), "--dynamics", str(runs["fr"]), "--out", str(out)]) == 0
    bp, fr, swapped = _workers(runs["bp"]), _workers(runs["fr"]), _workers(out)
    rate = [json.loads(line) for line in (runs["bp"] / "metrics.jsonl").read_text().splitlines()][-1]["lr"]
    for k, (a, b, c) in enumerate(zip(bp, fr, swapped)):
        delay = 2 - k
        assert c["module"].keys() == a["module"].keys()
        assert all(torch.equal(c["module"][n], a["module"][n]) for n in a["module"])  # BN statistics too
        assert not all(torch.equal(b["module"][n], a["module"][n]) for n in a["module"])  # the two runs differ
        s = (delay + 1) ** 1.5 if delay else 1.0
        for i, state in a["optimizer"]["state"].items():
            v = state["momentum_buffer"]
            torch.testing.assert_close(c["optimizer"]["state"][i]["momentum_buffer"], v * s, rtol=1e-6, atol=0)
            torch.testing.assert_close(c["compensation"]["last_step"][i], -rate * v, rtol=1e-6, atol=0)
        assert c["method"].keys() == b["method"].keys()  # FR's own state goes on
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "handoff" and records[-1]["step"] == STEPS
    result = run_cli("train", "--resume", str(out), "--max-steps", str(STEPS + 4))
    assert result.exit_code == 0, result.output
    after = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert after[: len(records)] == records and after[-1]["step"] == STEPS + 4


def test_displacement_conversion_keeps_what_the_momentum_still_moves(runs: dict[str, Path], tmp_path: Path) -> None:
    """--velocity displacement: the distance the velocity alone would still move the weights, Σ_{n≥1} η_X·μ_X^n·v,
    is A's under B's stretched horizon (η/s, 1 − (1−μ)/s), both ways; the last step predict needs is A's."""
    script = benchmark("handoff")
    rate = [json.loads(line) for line in (runs["bp"] / "metrics.jsonl").read_text().splitlines()][-1]["lr"]

    def still_to_move(v: torch.Tensor, s: float, mu: float) -> torch.Tensor:
        eta, mu_s = rate / s, 1.0 - (1.0 - mu) / s
        return sum(eta * mu_s ** n * v for n in range(1, 4000))  # summed out, not the closed form under test

    for weights, dynamics in (("bp", "fr"), ("fr", "bp")):
        out = tmp_path / f"{weights}@{dynamics}"
        assert script.main(["--weights", str(runs[weights]), "--dynamics", str(runs[dynamics]), "--out", str(out),
                            "--velocity", "displacement"]) == 0
        for k, (a, c) in enumerate(zip(_workers(runs[weights]), _workers(out))):
            s = (2 - k + 1) ** 1.5 if k < 2 else 1.0
            s_a, s_c = (1.0, s) if weights == "bp" else (s, 1.0)
            mu = a["optimizer"]["param_groups"][0]["momentum"]
            assert mu > 0
            for i, state in a["optimizer"]["state"].items():
                va, vc = state["momentum_buffer"].double(), c["optimizer"]["state"][i]["momentum_buffer"].double()
                torch.testing.assert_close(still_to_move(vc, s_c, mu), still_to_move(va, s_a, mu), rtol=1e-5, atol=1e-12)
                if k < 2:
                    assert not torch.allclose(vc, va)  # a delayed stage's velocity is converted
                if dynamics == "fr":
                    torch.testing.assert_close(c["compensation"]["last_step"][i], -rate / s_a * state["momentum_buffer"],
                                               rtol=1e-6, atol=0)
        assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["velocity"] == "displacement"
        assert run_cli("train", "--resume", str(out), "--max-steps", str(STEPS + 2)).exit_code == 0


def test_stretched_fr_weights_under_bp(runs: dict[str, Path], tmp_path: Path) -> None:
    script = benchmark("handoff")
    out = tmp_path / "swapped"
    assert script.main(["--weights", str(runs["fr"]), "--dynamics", str(runs["bp"]), "--out", str(out)]) == 0
    fr, swapped = _workers(runs["fr"]), _workers(out)
    for k, (a, c) in enumerate(zip(fr, swapped)):
        s = (2 - k + 1) ** 1.5 if k < 2 else 1.0
        assert all(torch.equal(c["module"][n], a["module"][n]) for n in a["module"])
        for i, state in a["optimizer"]["state"].items():  # the stretched velocity makes a step 1/s as large: BP's is v/s
            torch.testing.assert_close(c["optimizer"]["state"][i]["momentum_buffer"], state["momentum_buffer"] / s,
                                       rtol=1e-6, atol=0)
    assert run_cli("train", "--resume", str(out), "--max-steps", str(STEPS + 2)).exit_code == 0


def test_a_run_handed_to_itself_goes_on_exactly(runs: dict[str, Path], tmp_path: Path) -> None:
    """BP, whose velocity is taken as it is (a stretched one is scaled by s/s and predict's step recomputed: not bit for bit)."""
    script = benchmark("handoff")
    same, swapped = tmp_path / "same", tmp_path / "swapped"
    shutil.copytree(runs["bp"], same)
    assert script.main(["--weights", str(runs["bp"]), "--dynamics", str(runs["bp"]), "--out", str(swapped)]) == 0
    for run in (same, swapped):
        assert run_cli("train", "--resume", str(run), "--max-steps", str(STEPS + 3)).exit_code == 0
    a, b = torch.load(same / "model.pt", weights_only=True), torch.load(swapped / "model.pt", weights_only=True)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_what_cannot_be_swapped_is_refused(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = benchmark("handoff")
    later = tmp_path / "later"
    shutil.copytree(runs["bp"], later)
    assert run_cli("train", "--resume", str(later), "--max-steps", str(STEPS + 2)).exit_code == 0
    assert script.main(["--weights", str(later), "--dynamics", str(runs["fr"]), "--out", str(tmp_path / "a")]) == 2
    assert "same iteration" in capsys.readouterr().err
    warm = tmp_path / "warm"
    assert run_cli("train", "--K", "3", "--method", "fr", "--compensation", "lr", "--max-steps", str(STEPS),
                   "--out", str(warm)).exit_code == 0
    assert script.main(["--weights", str(runs["bp"]), "--dynamics", str(warm), "--out", str(tmp_path / "b")]) == 2
    assert "warm-up" in capsys.readouterr().err
    spiked = tmp_path / "spiked"
    assert run_cli("train", "--K", "3", "--method", "fr", "--compensation", "predict+spike", "--max-steps", str(STEPS),
                   "--out", str(spiked)).exit_code == 0
    assert script.main(["--weights", str(spiked), "--dynamics", str(runs["bp"]), "--out", str(tmp_path / "c")]) == 2
    assert "cannot convert the state of compensation spike" in capsys.readouterr().err
    other_seed = tmp_path / "seed1"
    assert run_cli("train", "--K", "3", "--method", "bp", "--seed", "1", "--max-steps", str(STEPS),
                   "--out", str(other_seed)).exit_code == 0
    assert script.main(["--weights", str(other_seed), "--dynamics", str(runs["fr"]), "--out", str(tmp_path / "d")]) == 2
    assert "train.seed (1 / 0)" in capsys.readouterr().err
    assert not any(p.name.endswith(".partial") or p.name in "abcd" for p in tmp_path.iterdir())  # nothing left behind
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert script.main(["--weights", str(runs["bp"]), "--dynamics", str(runs["fr"]), "--out", str(busy)]) == 2
    assert "not empty" in capsys.readouterr().err and (busy / "notes.txt").read_text() == "mine"


def _write(run: Path, errors: list[float], swap: int | None = None, losses: list[float] | None = None,
           epochs: int | None = None) -> None:
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"train:\n  epochs: {epochs or len(errors)}\n")
    records = []
    for i, e in enumerate(errors):
        if i == swap:
            records.append({"kind": "handoff", "step": 10 * i})
        records.append({"kind": "epoch", "epoch": i, "step": 10 * (i + 1), "train_loss": (losses or errors)[i] / 10,
                        "test_accuracy": 1 - e / 100, "test_loss": 1.0, "lr": 0.1 if i < 2 else 0.01, "wall": float(i)})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_table_pairs_the_swapped_runs_with_the_kept_ones(tmp_path: Path) -> None:
    script = benchmark("handoff")
    kept, swapped = tmp_path / "kept", tmp_path / "swapped"
    swapped.mkdir()
    for seed, shift in ((0, 0.0), (1, 2.0)):
        _write(kept / f"bp-K2-s{seed}", [60 + shift, 50 + shift, 40 + shift, 38 + shift, 37 + shift])
        _write(kept / f"fr-K4-s{seed}", [62 + shift, 51 + shift, 45 + shift, 44 + shift, 40 + shift])
        # FR's first two epochs, then BP's weights trained on by FR: the second epoch after the swap 1 point
        # behind BP's (both seeds), the best 1 and 2 points behind (seed 1's last epoch is not its best)
        _write(swapped / f"bp@fr-s{seed}", [62 + shift, 51 + shift, 41 + shift, 39 + shift, 38 + shift + 2 * seed], swap=2)
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:6]]
            for line in script.table(swapped, kept).splitlines()[2:]}
    assert rows[("bp", "bp")] == ["38.00", "+0.00 ± 0.00 (n=2)", "+0.00 ± 0.00 (n=2)"]
    assert rows[("fr", "fr")] == ["41.00", "+3.00 ± 0.00 (n=2)", "+6.00 ± 0.00 (n=2)"]
    assert rows[("bp", "fr")] == ["39.50", "+1.50 ± 0.71 (n=2)", "+1.00 ± 0.00 (n=2)"]
    _write(swapped / "bp@fr-s3", [62, 51, 41], swap=2, epochs=5)  # still training: not in the table, not checked
    _write(swapped / "bp@fr-s2", [63, 51, 41, 39, 38], swap=2)  # its first epoch is not the kept FR run's
    _write(kept / "fr-K4-s2", [62, 51, 45, 44, 40])
    _write(kept / "bp-K2-s2", [60, 50, 40, 38, 37])
    with pytest.raises(script.HandoffError, match="fr run of seed 2 before the swap in .* differs from .*fr-K4-s2"):
        script.table(swapped, kept)
    # FR's first half of seed 2 trained on to the end in the folder stands for the unswapped run: compared with it
    _write(swapped / "fr-s2", [63, 51, 44, 43, 41])
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:6]]
            for line in script.table(swapped, kept).splitlines()[2:]}
    assert rows[("fr", "fr")][1] == "+3.33 ± 0.58 (n=3)"  # 3, 3 and 41 - 37 = 4
    # the first half whose weights were carried over is checked too, where the folder holds it
    _write(swapped / "bp-s0", [61, 50], epochs=5)  # stopped at the swap
    with pytest.raises(script.HandoffError, match="bp run of seed 0 before the swap in .*bp@fr-s0 differs from .*bp-K2-s0"):
        script.table(swapped, kept)


def test_keep_copies_finished_swapped_runs_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = benchmark("handoff")
    kept, swapped, dest = tmp_path / "kept", tmp_path / "swapped", tmp_path / "dest"
    _write(kept / "bp-K2-s0", [60, 50, 40, 38])
    _write(kept / "fr-K4-s0", [62, 51, 45, 44])
    for name, errors in (("bp@fr-s0", [62, 51, 41, 39]), ("bp@fr-s1", [62, 51, 41])):  # the second still training
        _write(swapped / name, errors, swap=2, epochs=4)
        (swapped / name / "checkpoint.pt").write_bytes(b"big")
    (swapped / "bp-s0").mkdir()  # a first half, not trained on to its end
    _write(swapped / "fr-s0", [62, 51, 45, 44])  # one trained on to its end: the unswapped run, kept too
    assert script.main(["--table", str(swapped), "--kept", str(kept), "--keep", str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["bp@fr-s0", "fr-s0"]
    assert sorted(p.name for p in (dest / "bp@fr-s0").iterdir()) == ["config.yaml", "metrics.jsonl"]
    out = capsys.readouterr().out
    assert "| bp | fr | 39.00 | +1.00 (n=1) | +1.00 (n=1) |" in out

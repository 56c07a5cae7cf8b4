"""benchmarks/compensation_generality.py: its table pairs every gap to BP by seed and counts a diverged run at
chance; a run trains each family through the public API; an interrupted screen resumes without redoing runs."""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchtools import benchmark

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return benchmark("compensation_generality")


def _row(model: str, method: str, seed: int, error: float, diverged: bool = False) -> dict:
    return {"model": model, "method": method, "K": 4, "optim": "sgd", "lr": 0.1, "seed": seed, "epochs": 10,
            "error": error, "train_loss": 0.1, "diverged": diverged}


def test_table_pairs_gaps_by_seed_and_marks_divergence():
    gen = _script()
    rows = [_row("relu_mlp", "bp", 0, 2.0), _row("relu_mlp", "bp", 1, 4.0),
            _row("relu_mlp", "fr", 0, 90.0, diverged=True), _row("relu_mlp", "fr", 1, 10.0),
            _row("relu_mlp", "fr+auto", 0, 3.0), _row("relu_mlp", "fr+auto", 1, 7.0)]
    text = gen.table(rows, ["bp", "fr", "fr+auto"])
    line = next(l for l in text.splitlines() if l.startswith("| relu_mlp"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "3.00"                      # BP's mean
    assert cells[2] == "50.00† (+47.00 ± 57.98, 2)"  # gaps 88 and 6, one diverged
    assert cells[3] == "5.00 (+2.00 ± 1.41, 2)"    # gaps 1 and 3: paired, not 5 − 3 of the means by chance
    # an unpaired seed (no BP run for it) is left out of the gap, not compared with another seed's BP
    text = gen.table(rows + [_row("relu_mlp", "fr+auto", 2, 50.0)], ["bp", "fr+auto"])
    line = next(l for l in text.splitlines() if l.startswith("| relu_mlp"))
    assert "(+2.00 ± 1.41, 2)" in line
    # the mean gap weighs every model alike: relu_mlp's +2.00 and tanh_mlp's +6.00 (one seed) give +4.00
    text = gen.table(rows + [_row("tanh_mlp", "bp", 0, 1.0), _row("tanh_mlp", "fr+auto", 0, 7.0)], ["bp", "fr+auto"])
    line = next(l for l in text.splitlines() if l.startswith("| mean gap"))
    assert [c.strip() for c in line.strip("|").split("|")] == ["mean gap", "", "+4.00 (2 models)"]


@pytest.mark.parametrize("model", ["relu_mlp", "row_transformer"])
def test_one_run_trains_through_the_public_api(model):
    gen = _script()
    bp = gen.train_once(model, "bp", K=2, optim="sgd", lr=0.05, seed=0, epochs=1)
    fr = gen.train_once(model, "fr+lookahead+predict+stretch", K=2, optim="sgd", lr=0.05, seed=0, epochs=1)  # delayed throughout
    for row in (bp, fr):
        assert not row["diverged"] and 0 <= row["error"] < 90 and row["train_loss"] > 0
    assert bp["train_loss"] != fr["train_loss"]  # the two methods' updates differ (FR's stage 0 is one step late)


def test_screen_resumes_from_its_file(tmp_path):
    out = tmp_path / "g.jsonl"
    done = _row("relu_mlp", "bp", 0, 12.5) | {"K": 2, "epochs": 1, "lr": 0.05}
    out.write_text(json.dumps(done) + "\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compensation_generality.py"), "--models", "relu_mlp",
           "--methods", "bp,fr+auto", "--K", "2", "--seeds", "0", "--epochs", "1", "--lr", "0.05", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["bp", "fr+auto"]  # BP kept as it was, not trained again
    assert rows[0]["error"] == 12.5
    assert "[1/1] relu_mlp fr+auto" in result.stderr
    assert "| relu_mlp | 12.50 |" in result.stdout
    only = subprocess.run(cmd[:2] + ["--table-only", "--seeds", "7", "--methods", "bp", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert only.returncode == 0 and "12.50" not in only.stdout  # --seeds tables only those seeds
    bad = subprocess.run(cmd[:2] + ["--models", "resnet9000", "--out", str(out)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert bad.returncode != 0 and "unknown model" in bad.stderr and "relu_mlp" in bad.stderr


def test_a_kept_auto_run_counts_as_the_rules_it_ran():
    """``auto`` changes between versions: a kept ``fr+auto`` run of other rules is tabled (and reused) under
    its own rules, never as today's ``auto``; today's rules spelled out are ``auto``'s."""
    from fxreplay.methods.compensation import AUTO, AUTO_DDG

    gen = _script()
    old = _row("relu_mlp", "fr+auto", 0, 5.0) | {"rules": "lr+predict+spike"}
    assert gen.as_run_now(old)["method"] == "fr+lr+predict+spike"
    now = _row("relu_mlp", "fr+auto", 0, 5.0) | {"rules": AUTO}
    assert gen.as_run_now(now)["method"] == "fr+auto"
    spelled = _row("relu_mlp", "fr+" + "+".join(reversed(AUTO.split("+"))), 0, 5.0)
    assert gen.as_run_now(spelled)["method"] == "fr+auto" and gen.as_run_now(spelled)["rules"] == AUTO
    adam = _row("relu_mlp", "fr+auto", 0, 5.0) | {"optim": "adam", "rules": gen.auto_rules("fr+auto", "adam")}
    assert gen.as_run_now(adam)["method"] == "fr+auto"
    assert gen.auto_rules("ddg+auto", "sgd") == AUTO_DDG


def test_signals_show_adapt_releasing_a_stage_that_descends_consistently():
    """benchmarks/compensation_signals.py: per stage and window, ā / σ / relative step; at a low rate on the
    ReLU MLP the delayed stage's ā rises and σ falls below 1, the last stage (d = 0) keeps σ = 1."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compensation_signals.py"), "--model", "relu_mlp", "--K", "2",
           "--lr", "0.01", "--iterations", "30"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    first = next(l for l in result.stdout.splitlines() if "stage 0 (d = 1)" in l)
    windows = [w.split(": ", 1)[1].split(" / ") for w in first.split(": ", 1)[1].split("   ")]
    assert float(windows[0][0]) > 0.1 and float(windows[0][1]) < 0.9 and float(windows[0][2]) > 0
    assert "stage 1 (d = 0): 0-" in result.stdout and "+0.00 / 1.00" in result.stdout.split("stage 1 (d = 0)")[1]
    bad = subprocess.run(cmd[:2] + ["--model", "resnet9000"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode != 0 and "unknown model" in bad.stderr


def test_first_losses_start_from_the_same_weights_and_batches(capsys):
    """``--losses``: every method starts from the same weights and batches (its first loss is the same), FR at K = 1
    is BP iteration by iteration, and a compensation changes the losses once the stages have stepped."""
    signals = benchmark("compensation_signals")
    model, train, batch, split, optim = signals._data("relu_mlp", 2)
    assert optim is None  # a digits family: the benchmarks' SGD
    run = functools.partial(signals.first_losses, model, train, batch, split, iterations=6, seed=0)
    # auto's rules after a one-iteration synchronous start (auto's own, 200 iterations, is BP for all six)
    bp, fr, comp = run("bp", K=2, lr=0.1), run("none", K=2, lr=0.1), run("sync=1+lookahead+predict+stretch", K=2, lr=0.1)
    assert len(bp) == 6 and bp[0] == fr[0] == comp[0]
    assert fr != bp and comp != fr and comp != bp  # the delay, then the compensation, change what the next iterations see
    assert run("auto", K=2, lr=0.1) == bp  # inside auto's synchronous start: BP's losses
    assert run("none", K=1, lr=0.1) == run("bp", K=1, lr=0.1)
    signals.losses_report(model, train, batch, split, None, argparse.Namespace(
        model="relu_mlp", K=2, lr=0.1, seed=0, iterations=3, rules="bp, auto", warmup_steps=0))
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].endswith("training loss at iterations 0-2") and [r.split()[0] for r in rows[1:]] == ["bp", "auto"]
    assert "from the first iteration" in rows[0]
    assert len(rows[1].split()) == 1 + 3 + 2 and float(rows[1].split()[-1]) == pytest.approx(max(bp[:3]), abs=0.005)


def test_first_losses_warm_up_as_fxreplay_does():
    """``--losses --warmup-steps N``: the lr rises linearly from 0 as ``optim.warmup_steps`` makes it; under a warm-up
    too long to move the weights, every loss is the untrained model's on that batch, and without one it is not."""
    signals = benchmark("compensation_signals")
    model, train, batch, split, _ = signals._data("relu_mlp", 2)
    still = signals.first_losses(model, train, batch, split, "auto", 2, 0.1, 5, 0, warmup=10**9)
    moving = signals.first_losses(model, train, batch, split, "auto", 2, 0.1, 5, 0)
    with torch.no_grad():
        fresh = [float(torch.nn.functional.cross_entropy(model(x), y))
                 for _, (x, y) in zip(range(5), signals.endless(train, batch, 0))]
    assert still == pytest.approx(fresh, rel=1e-5) and moving[2:] != pytest.approx(fresh[2:], rel=1e-3)
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compensation_signals.py"), "--losses",
                          "--warmup-steps", "-1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode != 0 and "--warmup-steps takes" in bad.stderr
    alone = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compensation_signals.py"), "--warmup-steps", "5"],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert alone.returncode != 0 and "applies to --losses only" in alone.stderr


def test_pinned_splits_are_the_driver_s(tmp_path):
    """The ResNet models' splits are read from benchmarks/compensation.sh, the one place that pins them."""
    signals = benchmark("compensation_signals")
    text = (ROOT / "benchmarks" / "compensation.sh").read_text()
    from fxreplay import models

    for model, (_, K) in signals.PINNED.items():
        split = signals.pinned_split(K)
        assert f"SPLIT{K}={K}={','.join(split)}" in text and len(split) == K - 1, model
        names = dict(getattr(models, model)().named_modules())
        assert all(name in names for name in split), (model, split)  # every boundary is one of the model's blocks
    other = tmp_path / "compensation.sh"
    other.write_text("SPLIT4=4=a,b,c\n")
    assert signals.pinned_split(4, other) == ["a", "b", "c"]
    with pytest.raises(SystemExit, match="no split for K = 8"):
        signals.pinned_split(8, other)


def test_fashion_families_read_torchvision_files_and_train(tmp_path, monkeypatch):
    """``--data fashion`` reads Fashion-MNIST's own IDX files through torchvision's reader (written here, tiny),
    standardises them, and every one of its families trains with FR + auto, its stages cut in four."""
    from test_datasets import make_fashion_mnist

    gen = _script()
    written = make_fashion_mnist(tmp_path, n_train=70, n_test=20)
    x, y = gen.fashion(str(tmp_path), True).tensors
    expected = (torch.from_numpy(written["train_images"]).float() / 255 - gen.FASHION_MEAN) / gen.FASHION_STD
    assert x.shape == (70, 1, 28, 28) and torch.allclose(x[:, 0], expected) and y.tolist() == written["train_labels"].tolist()
    assert len(gen.fashion(str(tmp_path), False)) == 20
    compiled = []
    real_compile = gen.fxreplay.compile

    def compile_and_count(*args, **kwargs):
        pipe = real_compile(*args, **kwargs)
        compiled.append(pipe.K)
        return pipe

    monkeypatch.setattr(gen.fxreplay, "compile", compile_and_count)
    for name in gen.FASHION_MODELS:
        row = gen.train_once(name, "fr+lookahead+predict+stretch", K=4, optim="sgd", lr=0.01, seed=0, epochs=1, data="fashion",
                             root=str(tmp_path))
        assert not row["diverged"] and 0 <= row["error"] <= 100 and row["train_loss"] > 0, name
    assert compiled == [4] * len(gen.FASHION_MODELS)


def test_fashion_rows_are_tabled_apart_from_digits(tmp_path):
    gen = _script()
    rows = [_row("relu_mlp", "bp", 0, 2.0), _row("relu_mlp", "fr+auto", 0, 3.0),
            _row("vit", "bp", 0, 20.0) | {"data": "fashion", "epochs": 3},
            _row("vit", "fr+auto", 0, 19.0) | {"data": "fashion", "epochs": 3}]
    text = gen.table(rows, ["bp", "fr+auto"])
    digits, fashion = text.split("on Fashion-MNIST")
    assert "| relu_mlp | 2.00 | 3.00 (+1.00, 1) |" in digits and "vit" not in digits
    assert "| vit | 20.00 | 19.00 (-1.00, 1) |" in fashion and "relu_mlp" not in fashion
    missing = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compensation_generality.py"), "--data", "fashion",
                              "--data-root", str(tmp_path / "nowhere"), "--models", "vit", "--seeds", "0",
                              "--out", str(tmp_path / "f.jsonl")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert missing.returncode != 0 and "FashionMNIST" in missing.stderr and "--data-root" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "f.jsonl").exists()


def test_sharpness_is_the_hessians_top_eigenvalue_and_the_report_shows_it_rising():
    """compensation_signals.sharpness: power iteration with Hessian-vector products gives λ_max of the loss's
    Hessian (checked against the full Hessian's eigenvalues) and leaves BatchNorm's statistics alone; at lr 0.1
    the ReLU MLP's η·λ_max climbs far above its starting value within 40 BP iterations."""
    signals = benchmark("compensation_signals")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.2),
                                torch.nn.Linear(4, 3))
    x, y = torch.randn(16, 3), torch.randint(0, 3, (16,))
    params = list(model.parameters())
    shapes = [p.shape for p in params]

    def loss_of(flat):
        chunks, at = [], 0
        for shape in shapes:
            n = int(torch.Size(shape).numel())
            chunks.append(flat[at:at + n].reshape(shape))
            at += n
        names = [n for n, _ in model.named_parameters()]
        out = torch.func.functional_call(model, dict(zip(names, chunks)), (x,))
        return torch.nn.functional.cross_entropy(out, y)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    stats = model[2].running_mean.clone()
    model[3].p = 0.0  # a deterministic function for the reference (BatchNorm on the batch's statistics, as trained)
    eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat))
    model[2].running_mean.copy_(stats)
    assert signals.sharpness(model, x, y) == pytest.approx(float(eigenvalues.max()), rel=1e-2)
    model[3].p = 0.2  # with a dropout mask drawn: neither the statistics nor the global random state move
    rng = torch.get_rng_state()
    signals.sharpness(model, x, y)
    assert torch.equal(model[2].running_mean, stats) and torch.equal(torch.get_rng_state(), rng)
    # an operator whose largest-magnitude eigenvalue is negative: the largest one is still found (a shifted pass)
    basis, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    H = basis @ torch.diag(torch.tensor([-5.0, 1.5, 0.5, -1.0], dtype=torch.float64)) @ basis.T
    top = signals.top_eigenvalue(lambda v: [H.float() @ v[0]], [torch.Size([4])], tolerance=1e-6)
    assert top == pytest.approx(1.5, rel=1e-3)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compensation_signals.py"), "--sharpness", "--model", "relu_mlp",
           "--lr", "0.1", "--iterations", "41"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith("BP, SGD lr 0.1"))
    values = {int(k): float(v) for k, v in (cell.split(": ") for cell in line.split("iteration  ")[1].split("   "))}
    assert sorted(values) == [0, 5, 10, 20, 40]
    assert values[40] > 0.3 and values[40] > 10 * abs(values[0])
    assert "d = 3: BP 3.8   lookahead+predict 0.070" in result.stdout


def test_driver_rules_mode_pins_each_K_s_split(tmp_path):
    """`compensation.sh rules LR` runs the listed rules at each K of KS (2 and 4 by default) with that K's pinned
    split, seed by seed; `k4` at K = 4 only; a K without a pinned split is refused before anything runs."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    (repo / "data" / "cifar10" / "cifar-10-batches-py").mkdir(parents=True)
    (repo / "benchmarks" / "compensation.sh").write_text((ROOT / "benchmarks" / "compensation.sh").read_text())
    (repo / "benchmarks" / "converged_summary.py").write_text("")  # the kept runs' restore and summary: not tested here
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    (bin_dir / "fxreplay").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (bin_dir / "fxreplay").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RULES": "fr+auto fr+lr", "SEEDS": "0 1"}

    def driver(*args, **extra):
        log.unlink(missing_ok=True)
        done = subprocess.run(["bash", str(repo / "benchmarks" / "compensation.sh"), *args], env={**env, **extra},
                              capture_output=True, text=True, timeout=60)
        return done, log.read_text().splitlines() if log.exists() else []

    done, calls = driver("rules", "0.01")
    assert done.returncode == 0, done.stderr
    text = (ROOT / "benchmarks" / "compensation.sh").read_text()
    split = {k: next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"SPLIT{k}=")) for k in (2, 4)}
    expected = [f"--methods fr+auto,fr+lr --K {k} --seeds {s} --lr 0.01 --boundaries {split[k]} "
                f"--out benchmarks/runs/converged-lr0.01" for s in (0, 1) for k in (2, 4)]
    assert [c.split("resnet20_cifar10_5k.yaml ", 1)[1] for c in calls] == expected
    done, calls = driver("k4", "0.1", KS="2")  # k4 ignores KS
    assert done.returncode == 0 and [c.split(" --K ")[1][0] for c in calls] == ["4", "4"]
    done, calls = driver("rules", KS="8")
    assert done.returncode == 2 and "KS lists 2 and/or 4" in done.stderr and calls == []

"""`compare` and `show`: the report's tables hold the runs' numbers, figures are PNGs,
diverged runs are marked, finished runs reused, interrupted ones resumed; the CLI commands."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from cli.compare_cmd import compare as compare_cmd
from cli.compare_cmd import show as show_cmd
from fxreplay import plots
from fxreplay.compare import compare, run_dir
from fxreplay.compiler.plan import Plan
from fxreplay.config import apply_overrides, load_config
from fxreplay.errors import ConfigError
from fxreplay.methods import METHODS
from fxreplay.run import train_run
from reporttools import markdown_table, recording_figures

# digits: 23 iterations of 64 per epoch, so 30 steps are one complete epoch and a part.
SMALL = {"train.epochs": 2, "train.max_steps": 30, "train.log_every": 5, "train.sigma_every": 10}


def _cfg(**overrides: object):
    return apply_overrides(load_config(None), {**SMALL, **overrides})


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.verify()
        assert 600 <= im.size[0] <= 900, (path, im.size)  # sized to read at ~700 px wide


DRAWN: dict[str, list[dict[str, Any]]] = {}
"""What each figure of the ``compared`` report plots, by file name (see :func:`reporttools.drawn`)."""


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with recording_figures() as figures:
        out = _compare_fixture(tmp_path_factory)
    DRAWN.update(figures)
    return out


def _compare_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cmp")
    cfg = _cfg()
    # bp K=2 is interrupted by a crash after its first epoch's checkpoint: compare resumes it.
    def crash(step: int, loss: float) -> None:
        if step == 25:
            raise RuntimeError("killed")

    bp_cfg = apply_overrides(cfg, {"train.method": "bp", "partition.K": 2, "train.out": str(run_dir(out, "bp", 2))})
    with pytest.raises(RuntimeError):
        train_run(bp_cfg, on_step=crash)
    # a timeline as the distributed executor would leave it
    fr = run_dir(out, "fr", 2)
    fr.mkdir(parents=True)
    result = compare(cfg, ["fr", "bp"], [2], out)
    (fr / "timeline.json").write_text(json.dumps({"ranks": [[["compute", 0.0, 0.01, "0F0", 0]], [["wait", 0.0, 0.01, "act 0", 0]]]}))
    assert {(r.method, r.action) for r in result.runs} == {("bp", "resumed"), ("fr", "trained")}
    assert [r.method for r in result.runs] == ["bp", "fr"]  # the paper's order, whatever was asked
    again = compare(cfg, ["bp", "fr"], [2], out)  # everything finished: reused, report redrawn with the timeline
    assert [r.action for r in again.runs] == ["reused", "reused"]
    return out


def test_report_tables_hold_the_runs_numbers(compared: Path) -> None:
    report = (compared / "report.md").read_text()
    errors, memory = markdown_table(report, "Test error (%)"), markdown_table(report, "Memory")
    peaks = {}
    for method in ("bp", "fr"):
        records = _records(run_dir(compared, method, 2))
        steps = [r for r in records if r["kind"] == "step"]
        assert steps[-1]["step"] == 30
        best = 100 * (1 - max(r["test_accuracy"] for r in records if r["kind"] == "epoch" and "test_accuracy" in r))
        assert float(errors[(method, 2)]) == pytest.approx(best, abs=0.006)
        peaks[method] = max(sum(r["memory_bytes"]) for r in steps)
        mib, ratio = re.fullmatch(r"([\d.]+) MiB \(([\d.]+)×\)", memory[(method, 2)]).groups()
        assert float(mib) == pytest.approx(peaks[method] / 2**20, abs=0.006)
    assert float(re.search(r"\(([\d.]+)×", memory[("fr", 2)]).group(1)) == pytest.approx(peaks["fr"] / peaks["bp"], abs=0.006)
    assert "O(L + K²)" in report and "O(L)" in report
    # the resumed run's metrics hold each step once
    bp_steps = [r["step"] for r in _records(run_dir(compared, "bp", 2)) if r["kind"] == "step"]
    assert bp_steps == sorted(set(bp_steps))


def test_every_figure_is_a_png(compared: Path) -> None:
    report = (compared / "report.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"loss_epochs.png", "loss_time.png", "memory.png", "sigma.png", "timeline-fr-K2.png"} <= set(figures)
    for name in figures:
        _assert_png(compared / name)


def test_every_figure_plots_the_runs_numbers(compared: Path) -> None:
    runs = {m: _records(run_dir(compared, m, 2)) for m in ("bp", "fr")}
    steps = {m: [r for r in records if r["kind"] == "step"] for m, records in runs.items()}
    per_epoch = 23  # digits: 1437 training examples in batches of 64 (drop_last off: 23 batches)
    # loss against epochs: each method's logged losses at step / steps-per-epoch
    (epochs_panel,) = DRAWN["loss_epochs.png"]
    assert epochs_panel["title"] == "K = 2" and set(epochs_panel["legend"]) == {"BP", "FR"}
    for m, label in (("bp", "BP"), ("fr", "FR")):
        xs, ys = epochs_panel["lines"][label]
        assert ys == [r["loss"] for r in steps[m]] and len(ys) == 6
        assert xs == pytest.approx([r["step"] / per_epoch for r in steps[m]])
    # loss against time: both panels have every run, at increasing, non-zero times
    measured, modelled = DRAWN["loss_time.png"]
    for panel in (measured, modelled):
        for m, label in (("bp", "BP"), ("fr", "FR")):
            xs, ys = panel["lines"][label]
            assert ys == [r["loss"] for r in steps[m]]
            assert xs == sorted(xs) and xs[0] > 0, (panel["title"], label, xs)
    # memory: one bar per method, stacked by module (2 segments), its peak held memory in MiB
    (bars,) = DRAWN["memory.png"]
    totals = [a + b for a, b in zip(bars["bars"][::2], bars["bars"][1::2])]
    assert totals == pytest.approx([max(sum(r["memory_bytes"]) for r in steps[m]) / 2**20 for m in ("bp", "fr")])
    assert bars["legend"] == ["BP", "FR"]
    # σ: FR only (BP's is 1 by definition), one curve per module, the logged values
    (sigma_panel,) = DRAWN["sigma.png"]
    assert sigma_panel["title"] == "FR, K = 2" and set(sigma_panel["lines"]) == {"module 1", "module 2"}
    logged = [(r["step"], r["sigma"]) for r in runs["fr"] if "sigma" in r]
    for k in range(2):
        finite = [v[k] for _, v in logged if v[k] == v[k]]
        assert sigma_panel["lines"][f"module {k + 1}"][1] == finite and finite
    # the timeline: both stages' lanes have bars, the legend names the kinds of interval
    (gantt_panel,) = DRAWN["timeline-fr-K2.png"]
    assert gantt_panel["segments"] >= 2 and {"compute", "wait"} <= set(gantt_panel["legend"])


def test_changed_config_is_not_reused(compared: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.epochs: 2 -> 3.*--force"):
        compare(_cfg(**{"train.epochs": 3}), ["bp"], [2], compared)


def test_diverged_run_is_marked_not_dropped(tmp_path: Path) -> None:
    cfg = _cfg(**{"optim.lr": 1e6, "train.max_steps": 10, "train.log_every": 2, "train.sigma_every": 0})
    result = compare(cfg, ["bp"], [2], tmp_path)
    assert result.runs[0].diverged and "nan" in result.runs[0].diverged
    report = (tmp_path / "report.md").read_text()
    assert "†" in markdown_table(report, "Test error (%)")[("bp", 2)]
    assert "diverged at step" in report
    assert "sigma.png" not in report and "σ was not measured" in report
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        _assert_png(tmp_path / name)
    # a diverged run is finished: it is reused, not re-run
    assert compare(cfg, ["bp"], [2], tmp_path).runs[0].action == "reused"


def test_unknown_method_or_bad_K(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=", ".join(METHODS)):
        compare(_cfg(), ["bp", "sgd"], [2], tmp_path)
    with pytest.raises(ConfigError, match=">= 1"):
        compare(_cfg(), ["bp"], [0], tmp_path)


# -- stage boundaries pinned per K ---------------------------------------------------------

# digits_cnn's own split is stage 1 at layer1.conv2 (K=2) and layer1.bn1, layer2.0 (K=3), for
# BP and FR alike at these FLOPs: these pins are elsewhere.
PINNED = {2: ["layer2"], 3: ["pool", "layer2.1"]}
FIRST_NODES = {2: ["layer2_0"], 3: ["pool", "layer2_1"]}  # the fx nodes those modules begin with
TINY = {"train.epochs": 1, "train.max_steps": 1, "train.log_every": 1, "train.sigma_every": 0}


@pytest.fixture(scope="module")
def pinned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pinned")
    result = compare(_cfg(**TINY), ["bp", "fr"], [2, 3], out, boundaries=PINNED)
    assert [(r.method, r.K, r.action) for r in result.runs] == [
        ("bp", 2, "trained"), ("fr", 2, "trained"), ("bp", 3, "trained"), ("fr", 3, "trained")]
    return out


def test_pinned_boundaries_start_every_methods_stages(pinned: Path) -> None:
    for K, names in PINNED.items():
        for method in ("bp", "fr"):
            run = run_dir(pinned, method, K)
            plan = Plan.load(run / "plan")
            assert [s.nodes[0] for s in plan.stages[1:]] == FIRST_NODES[K], (method, K)
            assert list(plan.boundaries) == names
            assert load_config(run / "config.yaml").partition.boundaries == tuple(names)


def test_changed_split_is_not_reused(pinned: Path) -> None:
    before = {p: p.read_bytes() for p in pinned.rglob("*") if p.is_file() and p.suffix != ".png"}
    with pytest.raises(ConfigError, match=r"partition\.boundaries: \['layer2'\] -> \['pool'\].*--force"):
        compare(_cfg(**TINY), ["bp"], [2], pinned, boundaries={2: ["pool"]})
    with pytest.raises(ConfigError, match=r"partition\.boundaries: \['layer2'\] -> \[\]"):
        compare(_cfg(**TINY), ["bp"], [2], pinned)  # the partitioner's own split is another split
    assert {p: p.read_bytes() for p in before} == before
    # the same split (a tuple this time) is the same config: reused
    again = compare(_cfg(**TINY), ["fr"], [3], pinned, boundaries={3: ("pool", "layer2.1")})
    assert [r.action for r in again.runs] == ["reused"]


@pytest.mark.parametrize("boundaries, Ks, message", [
    ({4: ["a", "b", "c"]}, [2], r"given for K=4, which is not compared \(K = 2\): add 4 to --K"),
    ({2: []}, [2], r"K=2 name 0 module\(s\) \(none\).*exactly 1 different"),
    ({3: ["pool", "layer2", "fc"]}, [2, 3], r"K=3 name 3 module\(s\) \(pool, layer2, fc\).*exactly 2 different"),
    ({3: ["pool", "pool"]}, [3], r"exactly 2 different names"),
    ({2: "layer2"}, [2], r"expected a list of module names, got 'layer2'"),
])
def test_bad_boundaries_are_refused_before_anything(tmp_path: Path, boundaries: Any, Ks: list[int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compare(_cfg(), ["bp"], Ks, tmp_path / "cmp", boundaries=boundaries)
    assert not (tmp_path / "cmp").exists()


# -- CLI ----------------------------------------------------------------------------------

def _app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False, rich_markup_mode=None)
    app.command()(compare_cmd)
    app.command()(show_cmd)
    return app


runner = CliRunner()


def _assert_user_error(result, needle: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and needle in " ".join(result.output.split()), result.output


def test_cli_compare(tmp_path: Path) -> None:
    result = runner.invoke(_app(), ["compare", "--methods", "bp", "--K", "2", "--out", str(tmp_path),
                                    "--epochs", "1", "--max-steps", "4", "--sigma-every", "2"])
    assert result.exit_code == 0, result.output
    assert "report.md" in result.output and (tmp_path / "report.md").is_file()
    assert json.loads((tmp_path / "bp-K2" / "metrics.jsonl").read_text().splitlines()[0])["kind"] in ("step", "sigma")
    _assert_user_error(runner.invoke(_app(), ["compare", "--methods", "bp,sgd", "--out", str(tmp_path)]), ", ".join(METHODS))
    _assert_user_error(runner.invoke(_app(), ["compare", "--K", "2,x", "--out", str(tmp_path)]), "comma-separated")


def test_cli_compare_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fxreplay.compare

    seen: dict[str, Any] = {}

    def fake_compare(cfg: Any, methods: Any, Ks: Any, out: Path, **kwargs: Any) -> fxreplay.compare.CompareResult:
        seen.update(Ks=Ks, **kwargs)
        return fxreplay.compare.CompareResult(out=out, report=out / "report.md")

    monkeypatch.setattr(fxreplay.compare, "compare", fake_compare)
    args = ["compare", "--methods", "bp", "--K", "2,4", "--out", str(tmp_path)]
    result = runner.invoke(_app(), [*args, "--boundaries", "2=layer2", "--boundaries", "4=layer1.2, layer2,layer3"])
    assert result.exit_code == 0, result.output
    assert seen["boundaries"] == {2: ["layer2"], 4: ["layer1.2", "layer2", "layer3"]}
    _assert_user_error(runner.invoke(_app(), [*args, "--boundaries", "layer2"]), "expected K=NAME,NAME")
    _assert_user_error(runner.invoke(_app(), [*args, "--boundaries", "2=a", "--boundaries", "2=b"]), "K=2 is given twice")
    monkeypatch.undo()
    _assert_user_error(runner.invoke(_app(), [*args, "--boundaries", "3=layer2,fc"]), "K=3, which is not compared")
    assert list(tmp_path.iterdir()) == []


def test_cli_show(tmp_path: Path, examples_dir: Path) -> None:
    from cli.app import app

    plan = tmp_path / "plan"
    assert runner.invoke(app, ["partition", str(examples_dir / "branchy_net.py"), "--K", "3", "--out", str(plan)]).exit_code == 0
    png = tmp_path / "graph.png"
    result = runner.invoke(_app(), ["show", str(plan), "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert "K=3" in result.output and "bottleneck" in result.output and str(png) in " ".join(result.output.split())
    _assert_png(png)
    _assert_user_error(runner.invoke(_app(), ["show", str(tmp_path / "nowhere")]), "nowhere")


def test_modelled_time_is_not_drawn_at_zero_when_every_logged_step_measured_sigma(tmp_path: Path) -> None:
    from fxreplay.runlog import RunMetrics

    def run(method: str, sigma_everywhere: bool) -> RunMetrics:
        steps = [{"step": s, "loss": 2.0 / s, "wall": 0.1 * s, "stage_time": [0.01, 0.02],
                  **({"sigma": [1.0, 1.0]} if sigma_everywhere or s % 2 == 0 else {})} for s in range(1, 7)]
        return RunMetrics(method=method, K=2, path=tmp_path, steps=steps)

    with recording_figures() as drawn:
        plots.loss_vs_time([run("fr", True), run("bp", False)], tmp_path / "loss_time.png")
    measured, modelled = drawn["loss_time.png"]
    texts = modelled["texts"]
    assert set(measured["lines"]) == {"FR", "BP"}
    # BP has plain logged steps: its modelled times are the sums of its stage times (0.03 s)
    xs, _ = modelled["lines"]["BP"]
    assert xs == pytest.approx([0.03 * s for s in range(1, 7)])
    # FR measured σ at every logged step: not drawn, and the panel says why
    assert "FR" not in modelled["lines"]
    assert any("not drawn: FR" in t and "σ measured at every logged step" in t for t in texts)


def test_a_language_model_report_has_a_perplexity_table(tmp_path: Path) -> None:
    from fxreplay.report import perplexity_table
    from fxreplay.runlog import RunMetrics

    def run(method: str, loss: float) -> RunMetrics:
        epochs = [{"epoch": 0, "step": 10, "test_loss": loss + 1, "test_perplexity": 2.718281828 ** (loss + 1)},
                  {"epoch": 1, "step": 20, "test_loss": loss, "test_perplexity": 2.718281828 ** loss}]
        return RunMetrics(method=method, K=2, path=tmp_path, epochs=epochs)

    table = perplexity_table([run("bp", 2.0), run("fr", 2.5)])
    assert table[2] == "| BP | 2.000 / 7.389 |" and table[3] == "| FR | 2.500 / 12.18 |"  # the last evaluation
    assert perplexity_table([RunMetrics(method="bp", K=2, path=tmp_path, epochs=[{"test_loss": 1.0}])]) == []

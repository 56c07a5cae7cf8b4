"""Swap two runs' weights mid-training: where the weights are, or how they are trained?

Compensated FR is level with BP on the converged benchmark until the first lr drop and falls
behind after it (docs/compensation.md, "Where auto's lr 0.01 gap opens"). Two explanations
predict different things. If the high-rate phase left FR's weights somewhere that gains less
from the drop, BP trained on from FR's weights falls behind as FR does. If FR's own training
after the drop is what gains less, FR trained on from BP's weights falls behind and BP from
FR's weights does not. This tool makes the swapped runs.

Two runs of the same config but the method (and compensation), the same K and split, stopped at
the same iteration (``fxreplay train ... --max-steps N``): ``--weights A --dynamics B --out C``
writes run C, B's checkpoint and run directory with A's model state (every parameter and buffer,
BatchNorm statistics included) and A's momentum, converted to B's convention, then

    fxreplay train --resume C --max-steps M      # B's method from A's weights

What is carried over, per stage (the plan's stages must hold the same tensors):

- the module's state: A's, exactly;
- heavy-ball momentum, converted one of two ways (``--velocity``):
  ``step`` (the default): v_B = v_A·s_B/s_A (s the stage's stretched horizon under ``stretch``, 1 without),
  so that it makes the same next step η·v/s; what is left of it then plays out over B's horizon, s_B/s_A
  times as long, which at a high rate kicks the weights (BP's velocity into a stage stretched by 8 moves
  them 8× as far as BP would have);
  ``displacement``: v_B = v_A·μ_A/μ_B (μ_X = 1 − (1−μ)/s_X, the stage's momentum under X), so that what the
  velocity alone would still move the weights, η_X·μ_X·v/(1−μ_X) = η·μ_X·v/(1−μ), is A's: the weights go
  where A's momentum was taking them, at B's pace (into a longer horizon: a first step ~s_B/s_A smaller);
- ``predict``/``lookahead`` need the stage's last update: −η·v_A/s_A with η the rate of A's last step.

B keeps its own lr schedule (the same config), its random state and its in-flight batches (FR's
stashed stage inputs, DDG's stored outputs): the first d_k iterations replay features B computed,
a transient of K−1 iterations. Refused: other stage contents, optimizers other than heavy-ball
SGD (Nesterov, Adam, several parameter groups), rules whose state it does not convert (``spike``,
``adapt``, ``release``, ``official``), a scaled stage rate, runs of other settings or seeds, a warm-up still
running on either side, and a non-empty --out.

The run's metrics.jsonl is B's up to the swap, then a ``{"kind": "handoff"}`` record, then what
the resumed run writes.

    python benchmarks/handoff.py --table DIR --kept benchmarks/results/converged-runs/lr0.01

prints the table of the swapped runs in DIR (named ``A@B-sS``: A's weights, B's training) next to the
unswapped runs: best test error and the gap to BP paired by seed, and the test error two epochs after
the swap (at the first lr drop: the second epoch at the lower rate). An unswapped run is the first half in DIR (``METHOD-sS``) trained on to the end, or else the
converged benchmark's kept run (``METHOD-K4-sS``; BP's ``bp-K2-sS``). Each swapped run's epochs before
the swap must equal those of B's unswapped run, record for record (losses, test accuracy: the same
computation, so that a kept run stands for the continuation); a run that differs is refused. ``--keep DEST`` first
copies each finished run's config.yaml and metrics.jsonl into DEST (the run directories hold
checkpoints and are not committed; the table can be made from DEST alone).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from converged_summary import finished_at, keep as keep_run  # noqa: E402
from fxreplay.checkpoint import load_checkpoint, save_atomic  # noqa: E402
from fxreplay.identity import RESUME_MAY_CHANGE  # noqa: E402
from fxreplay.methods.compensation import lr_multiplier, parse  # noqa: E402


class HandoffError(ValueError):
    """Two runs whose states cannot be swapped."""


HANDLED = {"predict", "lookahead", "replayahead", "lr", "stretch", "shrink"}
"""Rules whose state the swap converts (``spike`` steps on a mix of velocity and gradient, ``adapt`` and ``release``
move the horizon, ``official`` is Nesterov's: refused)."""


def _stage_scale(worker: dict[str, Any], delay: int, step: int, name: str) -> float:
    """s: the factor between a stage's velocity and the displacement it makes, in units of the rate (s = 1 without
    ``stretch``; refused while ``lr``'s warm-up scales the displacement)."""
    comp = worker.get("compensation")
    if not comp or comp.get("rules") in (None, "none"):
        return 1.0
    rules = parse(comp["rules"])
    other = sorted(set(rules.rules) - HANDLED)
    if other:
        raise HandoffError(f"{name}: the swap cannot convert the state of compensation {', '.join(other)} "
                           f"(it converts {', '.join(sorted(HANDLED))}).")
    momentum = float(worker["optimizer"]["param_groups"][0]["momentum"])
    if "lr" in rules and any(lr_multiplier(delay, t, momentum) != 1.0 for t in (step - 1, step)):
        raise HandoffError(f"{name}: the lr warm-up of the stage {delay} iterations late is still running at iteration "
                           f"{step}: swap after it ends (the velocity's scale would follow it).")
    return float(comp.get("horizon") or 1.0)


def _heavy_ball(worker: dict[str, Any], name: str) -> None:
    groups = worker["optimizer"]["param_groups"]
    if len(groups) != 1:
        raise HandoffError(f"{name}: the stage's optimizer has {len(groups)} parameter groups (optim.no_decay); the swap "
                           "handles one.")
    for group in groups:
        if group.get("nesterov") or "momentum" not in group or group["momentum"] <= 0:
            raise HandoffError(f"{name}: the swap converts heavy-ball SGD velocities; this stage's optimizer is {group!r}.")


def _same_settings(src: dict[str, Any], dst: dict[str, Any], weights: Path, dynamics: Path) -> None:
    """The two runs differ only in their method and compensation (and what a resume may change)."""
    free = set(RESUME_MAY_CHANGE) | {"train.method", "train.compensation"}
    a, b = src["run"]["config"], dst["run"]["config"]
    differ = sorted(k for k in set(a) | set(b) if k not in free and a.get(k) != b.get(k))
    if differ:
        raise HandoffError(f"{weights} and {dynamics} differ in {', '.join(f'{k} ({a.get(k)!r} / {b.get(k)!r})' for k in differ)}: "
                           "swap runs of the same settings and seed, differing only in the method and compensation.")
    if src["run"]["data"] != dst["run"]["data"]:
        raise HandoffError(f"{weights} and {dynamics} were trained on other data.")
    scales = src["trainer"].get("lr_scales"), dst["trainer"].get("lr_scales")
    if any(x is not None and any(v != 1.0 for v in x) for x in scales):
        raise HandoffError("a stage's rate is scaled (optim.double_first_stage_lr): the swap takes every stage's rate to be "
                           "the schedule's.")


def _last_lr(run: Path, step: int) -> float:
    """The rate of the run's update number ``step`` (its metrics' record at that step)."""
    rate = None
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("step") == step and "lr" in record:
            rate = float(record["lr"])
    if rate is None:
        raise HandoffError(f"{run}/metrics.jsonl has no record of step {step} with its rate: stop runs at an epoch's end.")
    return rate


VELOCITY = ("step", "displacement")
"""How a velocity is converted between two horizons: the same next step, or the same displacement still to come."""


def handoff(weights: Path, dynamics: Path, out: Path, velocity: str = "step") -> dict[str, Any]:
    """Write run ``out``: ``dynamics``'s run with ``weights``'s model and momentum (see the module)."""
    if velocity not in VELOCITY:
        raise HandoffError(f"velocity must be one of {', '.join(VELOCITY)}, got {velocity!r}.")
    src, dst = load_checkpoint(weights), load_checkpoint(dynamics)
    if src["step"] != dst["step"] or src["K"] != dst["K"]:
        raise HandoffError(f"{weights} is at step {src['step']} with K={src['K']}, {dynamics} at step {dst['step']} with "
                           f"K={dst['K']}: stop both at the same iteration of the same split.")
    _same_settings(src, dst, weights, dynamics)
    if out.exists() and any(out.iterdir()):
        raise HandoffError(f"{out} is not empty: give a new directory.")
    step, K = int(dst["step"]), int(dst["K"])
    rate = _last_lr(weights, step)
    workers_src, workers_dst = src["trainer"]["executor"]["workers"], dst["trainer"]["executor"]["workers"]
    for k, (a, b) in enumerate(zip(workers_src, workers_dst)):
        delay = K - 1 - k
        if a["module"].keys() != b["module"].keys() or any(a["module"][n].shape != b["module"][n].shape for n in a["module"]):
            raise HandoffError(f"stage {k} holds other tensors in the two runs: use the same split (--boundaries).")
        _heavy_ball(a, f"stage {k} of {weights}")
        _heavy_ball(b, f"stage {k} of {dynamics}")
        scale_a = _stage_scale(a, delay, step, f"stage {k} of {weights}")
        scale_b = _stage_scale(b, delay, step, f"stage {k} of {dynamics}")
        if velocity == "step":
            convert = scale_b / scale_a
        else:  # μ_X = 1 − (1−μ)/s_X (the same μ in both runs: _same_settings)
            mu = float(a["optimizer"]["param_groups"][0]["momentum"])
            convert = (1.0 - (1.0 - mu) / scale_a) / (1.0 - (1.0 - mu) / scale_b)
        for name, tensor in a["module"].items():
            b["module"][name] = tensor.clone()
        state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
        steps: list[torch.Tensor | None] = []  # in the order of the stage's parameters, as the compensator holds them
        for i in b["optimizer"]["param_groups"][0]["params"]:
            if (i in state_a) != (i in state_b):
                raise HandoffError(f"stage {k}: parameter {i} has momentum in one run only.")
            if i not in state_b:
                steps.append(None)
                continue
            va, vb = state_a[i]["momentum_buffer"], state_b[i]["momentum_buffer"]
            if va.shape != vb.shape:
                raise HandoffError(f"stage {k}'s optimizer orders its parameters differently in the two runs.")
            # the displacement A's velocity makes, −η·va/scale_a, made by B's velocity in B's convention
            state_b[i]["momentum_buffer"] = va * convert if convert != 1.0 else va.clone()
            steps.append(va * (-rate / scale_a))
        comp = b.get("compensation")
        if comp and comp.get("last_step") is not None:
            if len(comp["last_step"]) != len(steps):
                raise HandoffError(f"stage {k}: its compensation holds {len(comp['last_step'])} parameters, its optimizer "
                                   f"{len(steps)}.")
            comp["last_step"] = steps
    record = {"kind": "handoff", "step": step, "epoch": dst["epoch"], "weights": str(weights), "dynamics": str(dynamics)}
    if velocity != "step":  # the records of the default conversion stay as they were written
        record["velocity"] = velocity
    # Made beside ``out`` and renamed into place: an interrupted swap leaves no half-made run to resume.
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(dynamics, partial, ignore=shutil.ignore_patterns(".lock", "model.pt", "checkpoint.pt"))
    lines = (partial / "metrics.jsonl").read_text().splitlines()[: dst["metrics_lines"]]
    (partial / "metrics.jsonl").write_text("\n".join(lines + [json.dumps(record)]) + "\n")
    dst["metrics_lines"] += 1
    save_atomic(dst, partial / "checkpoint.pt", checksum=True)
    if out.exists():
        out.rmdir()  # empty (checked above)
    partial.rename(out)
    return record


SWAPPED = re.compile(r"^(?P<weights>[a-z0-9+.=]+)@(?P<dynamics>[a-z0-9+.=]+)-s(?P<seed>\d+)$")
UNSWAPPED = re.compile(r"^(?P<method>[a-z0-9+.=]+)-s(?P<seed>\d+)$")


def _epochs(run: Path) -> tuple[list[dict[str, Any]], int | None]:
    """A run's evaluated epoch records and the index of the first one after a swap (None: not swapped)."""
    epochs, swap = [], None
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "handoff":
            swap = len(epochs)
        elif record.get("kind") == "epoch" and record.get("test_accuracy") is not None:
            epochs.append(record)
    return epochs, swap


def _unswapped(folder: Path, kept: Path, method: str, seed: int) -> Path:
    """The unswapped run of ``method``: its first half in ``folder`` trained on to the end, or else the
    converged benchmark's kept run (BP's at K = 2: the same algorithm at any K)."""
    own = folder / f"{method}-s{seed}"
    if finished_at(own):
        return own
    name = f"bp-K2-s{seed}" if method == "bp" else f"{method}-K4-s{seed}"
    if not (kept / name / "metrics.jsonl").is_file():
        raise HandoffError(f"neither {own} trained to its end nor a kept run {kept / name}: the unswapped {method} of "
                           f"seed {seed} is needed.")
    return kept / name


def _computed(record: dict[str, Any]) -> tuple[Any, ...]:
    """What an epoch record says of the computation (not its timing)."""
    return record["step"], record["train_loss"], record["test_accuracy"], record.get("test_loss"), record.get("lr")


def _error(record: dict[str, Any]) -> float:
    return 100 * (1 - record["test_accuracy"])


def keep(folder: Path, dest: Path) -> list[str]:
    """Copy the config.yaml and metrics.jsonl of each finished run in ``folder`` (swapped, or a first half
    trained on to the end) into ``dest``."""
    copied = []
    for run in sorted(p for p in folder.iterdir() if SWAPPED.match(p.name) or UNSWAPPED.match(p.name)):
        if finished_at(run) and keep_run(run, dest / run.name):
            copied.append(run.name)
    return copied


def table(folder: Path, kept: Path) -> str:
    """The markdown table of the swapped runs in ``folder`` and the kept unswapped ones (see the module)."""
    rows: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
    for run in sorted(p for p in folder.iterdir() if SWAPPED.match(p.name)):
        m = SWAPPED.match(run.name)
        assert m is not None
        seed = int(m["seed"])
        if not finished_at(run):
            continue  # still training (or diverged: no row)
        epochs, swap = _epochs(run)
        if swap is None:
            raise HandoffError(f"{run} has no handoff record: make it with --weights/--dynamics.")
        # B's first half is the swapped run's own; A's, where the folder still holds it, is where the weights came from
        first_halves = [(m["dynamics"], epochs)]
        if (folder / f"{m['weights']}-s{seed}" / "metrics.jsonl").is_file():
            first_halves.append((m["weights"], _epochs(folder / f"{m['weights']}-s{seed}")[0]))
        for method, half in first_halves:
            reference = _unswapped(folder, kept, method, seed)
            if [_computed(r) for r in half[:swap]] != [_computed(r) for r in _epochs(reference)[0][:swap]]:
                raise HandoffError(f"the {method} run of seed {seed} before the swap in {run} differs from {reference}, the "
                                   f"unswapped run it is compared with: another computation (config, split, threads or "
                                   f"release). Train {folder / f'{method}-s{seed}'} on to the end (fxreplay train --resume "
                                   "DIR --max-steps N): it stands for the unswapped run then.")
        for method in (m["weights"], m["dynamics"], "bp"):
            unswapped = _unswapped(folder, kept, method, seed)
            diagonal, _ = _epochs(unswapped)
            if len(diagonal) != len(epochs):
                raise HandoffError(f"{unswapped} has {len(diagonal)} evaluated epochs and {run} {len(epochs)}: the "
                                   "unswapped run must be of the same schedule.")
            rows.setdefault((method, method), {})[seed] = (min(map(_error, diagonal)), _error(diagonal[swap + 1]))
        rows.setdefault((m["weights"], m["dynamics"]), {})[seed] = (min(map(_error, epochs)), _error(epochs[swap + 1]))
    if not rows:
        return f"no finished swapped runs in {folder}"

    def cell(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:+.2f} (n=1)"
        return f"{statistics.fmean(values):+.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"

    bp = rows[("bp", "bp")]
    lines = ["| weights until the swap | trained on by | best test error (%) | gap to BP | two epochs after the swap, gap to BP |",
             "|---|---|---:|---:|---:|"]
    for (weights, dynamics), by_seed in sorted(rows.items(), key=lambda kv: (kv[0][0] != kv[0][1], kv[0])):
        seeds = sorted(by_seed)
        best = statistics.fmean(by_seed[s][0] for s in seeds)
        lines.append(f"| {weights} | {dynamics} | {best:.2f} | {cell([by_seed[s][0] - bp[s][0] for s in seeds])} | "
                     f"{cell([by_seed[s][1] - bp[s][1] for s in seeds])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, help="the run whose weights and momentum are carried over")
    parser.add_argument("--dynamics", type=Path, help="the run whose method, compensation and state go on")
    parser.add_argument("--out", type=Path, help="the new run directory (resume it with fxreplay train --resume)")
    parser.add_argument("--velocity", choices=VELOCITY, default="step",
                        help="convert the momentum to keep its next step (default) or the displacement still to come")
    parser.add_argument("--table", type=Path, help="print the table of the swapped runs in this folder")
    parser.add_argument("--kept", type=Path, default=Path("benchmarks/results/converged-runs/lr0.01"),
                        help="the kept unswapped runs (with --table)")
    parser.add_argument("--keep", type=Path, help="with --table: first copy the finished swapped runs' config.yaml and "
                        "metrics.jsonl here")
    args = parser.parse_args(argv)
    try:
        if args.table is not None:
            if args.keep is not None:
                for name in keep(args.table, args.keep):
                    print(f"kept {args.keep / name}")
                args.table = args.keep
            print(table(args.table, args.kept))
            return 0
        if args.weights is None or args.dynamics is None or args.out is None:
            parser.error("--weights, --dynamics and --out make a swapped run (or --table DIR prints the table)")
        record = handoff(args.weights, args.dynamics, args.out, args.velocity)
    except HandoffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} at step {record['step']}: resume it with fxreplay train --resume {args.out} --max-steps N")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

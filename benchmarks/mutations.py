"""Mutation testing on a curated list: is each plausible one-line bug caught by a test?

Not part of CI (a run takes tens of minutes). Each entry of :data:`MUTATIONS` is a change a
plausible bug would make at a line that decides correctness, and the tests that should catch
it. The script copies the working tree (uncommitted changes included; ``.gitignore``d files
left out) into a scratch directory, runs the named tests there once unchanged (the baseline:
a mutation is judged only against tests that pass), then for each mutation replaces the exact
original text, runs only its tests (``python -m pytest -x -q -p no:cacheprovider``) and puts
the text back. Each ends as

- ``caught``: a named test failed; the table shows where the first failure was raised: by
  the test (it compared values), by the outcome (the code raised its own error where the test
  expected a result), or -- caught, but only by luck -- by an assert inside the library or by
  torch raising;
- ``survived``: every named test passed -- the bug would ship;
- ``stale``: the original text is not in the file (the code moved on: update the entry), or
  ``ambiguous``: it occurs more than once (quote more of it); never silently skipped;
- ``baseline fails`` (its tests fail unchanged: no verdict), ``broken`` (pytest could not
  collect or run them), ``timeout``.

Score: caught / (caught + survived). Run it before resolving an issue that touches these lines,
and add an entry for each feature that adds such lines (see the placeholder below).

Usage, from the repository root with the venv active (it lowers its own priority)::

    python benchmarks/mutations.py                       # everything: a table and the score
    python benchmarks/mutations.py --only fr-replay-rng,lr-epoch-in-run-loop
    python benchmarks/mutations.py --list                # the entries, checked against the files
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    """One plausible bug: ``original`` (exact text, found exactly once in ``file``) becomes
    ``replacement``; ``tests`` (files or pytest node ids) should catch it; ``bug`` says what
    a user would get."""

    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    bug: str


G = "tests/test_mutation_guards.py::"
C = "tests/test_compensation.py::"

MUTATIONS: list[Mutation] = [
    # ---- features replay (fxreplay/methods/fr.py): history, RNG, BatchNorm, own buffers
    Mutation("fr-replays-newest-input", "fxreplay/methods/fr.py",
             "inputs = self.leaf_inputs(stored)", "inputs = self.leaf_inputs(self.history[-1][1])",
             ("tests/test_methods.py::test_fr_equals_handwritten_algorithm_1",),
             "the replay recomputes the newest stored input, not the batch its δ belongs to"),
    Mutation("fr-replay-rng", "fxreplay/methods/fr.py",
             "with restored_rng(rng, self.device)", "with restored_rng(capture_rng(self.device), self.device)",
             ("tests/test_methods.py::test_fr_replayed_dropout_mask_equals_the_played_one",),
             "the replay draws a new dropout mask instead of the play's"),
    Mutation("fr-replay-updates-bn", "fxreplay/methods/fr.py",
             "norms = frozen_norm_stats(self.norms) if freeze", "norms = frozen_norm_stats([]) if freeze",
             ("tests/test_methods.py::test_batchnorm_running_stats_advance_once_per_step",
              "tests/test_methods.py::test_fr_running_stats_come_from_the_play_only"),
             "BatchNorm running statistics updated twice per step (play and replay)"),
    Mutation("fr-replay-writes-ema", "fxreplay/methods/fr.py",
             "self._kept = [(b, b.detach().clone()) for b in self.written]", "self._kept = []",
             ("tests/test_any_model.py::test_buffer_written_in_forward_updates_once_per_step",),
             "an EMA the model keeps in a buffer is updated by the replay a second time"),
    # ---- DDG (fxreplay/methods/ddg.py): the graph rebuilt after a resume
    Mutation("ddg-rebuild-writes-buffers", "fxreplay/methods/ddg.py",
             "with kept_buffers(self.written if stored.result is None else ()):", "with kept_buffers(()):",
             (G + "test_a_resumed_run_updates_the_models_own_buffers_once_per_step",),
             "after a resume, rebuilding each kept graph updates an EMA / spectral norm a second time"),
    Mutation("ddg-rebuild-rng", "fxreplay/methods/ddg.py",
             "with restored_rng(stored.rng, self.device)", "with restored_rng(capture_rng(self.device), self.device)",
             ("tests/test_executor_local.py::test_resume_is_bitwise_identical",),
             "a graph rebuilt after a resume draws other dropout masks than its forward did"),
    Mutation("ddg-rebuild-updates-bn", "fxreplay/methods/ddg.py",
             "frozen_norm_stats(self.norms), self.recording() as saved:", "frozen_norm_stats([]), self.recording() as saved:",
             ("tests/test_executor_local.py::test_resume_is_bitwise_identical",),
             "a graph rebuilt after a resume updates BatchNorm statistics a second time"),
    # ---- every method (fxreplay/methods/base.py)
    Mutation("gradients-accumulate", "fxreplay/methods/base.py",
             "p.grad = None  # the gradient of this batch only (and None stays None in warm-up)",
             "pass  # p.grad kept",
             ("tests/test_methods.py::test_fr_equals_handwritten_algorithm_1",
              "tests/test_methods.py::test_bp_through_stages_equals_bp_on_the_unsplit_model"),
             "a stage's gradients accumulate over batches instead of being the gradient of one"),
    # ---- shared parameters and the K x D mesh (executor/)
    Mutation("tied-copies-last-holder-only", "fxreplay/executor/local.py",
             "total = g.clone() if total is None else total.add_(g.to(total.device))", "total = g.clone()",
             ("tests/test_shared.py::test_bp_through_tied_stages_equals_bp_on_the_model",
              "tests/test_shared.py::test_fr_and_ddg_with_a_tied_weight_equal_the_handwritten_reference"),
             "a tied weight's copies get one holder's gradient instead of the sum"),
    Mutation("mesh-gradients-summed", "fxreplay/executor/distributed.py",
             "bucket.flat /= self.ex.dp", "bucket.flat /= 1",
             ("tests/test_mesh.py::test_k2_by_d2_equals_the_local_executor_on_the_whole_batch",),
             "the D replicas' gradients are summed, not averaged (D times the step)"),
    Mutation("mesh-bn-statistics-summed", "fxreplay/executor/distributed.py",
             "buffer /= self.ex.dp", "buffer /= 1",
             ("tests/test_mesh.py::test_the_replicas_are_one_model_in_evaluation_and_each_its_own_in_training",),
             "the merged model's BatchNorm statistics are the replicas' sum, not their mean"),
    Mutation("mesh-replica-loads-stage-0-optimizer", "fxreplay/executor/distributed.py",
             '"optimizer": first["optimizer"]}}', '"optimizer": state["ranks"][0]["worker"]["optimizer"]}}',
             (G + "test_a_mesh_resumed_from_its_job_state_equals_a_straight_run",),
             "on resume, a replica > 0 takes rank 0's optimizer state, not its own stage's"),
    # ---- partitioning (fxreplay/partition.py)
    Mutation("partition-cap-exclusive", "fxreplay/partition.py",
             'last = np.searchsorted(D, cap + S, side="right")', 'last = np.searchsorted(D, cap + S, side="left")',
             ("tests/test_partition.py",),
             "a stage that needs exactly the device's memory is refused"),
    Mutation("partition-strict-feasibility", "fxreplay/partition.py",
             "(best >= step.end - B)", "(best > step.end - B)",
             (G + "test_an_infeasible_split_suggests_the_least_memory_split",),
             "the split an infeasible problem's error suggests needs a byte more than the least-memory split"),
    # ---- stages (fxreplay/compiler/split.py)
    Mutation("stage-input-not-cloned", "fxreplay/compiler/split.py",
             "if value in written:", "if False:",
             ("tests/test_compiler.py::test_a_cut_right_before_an_inplace_op_clones_the_stage_input",),
             "an in-place op first in a stage overwrites the input FR stored for its replay"),
    Mutation("eval-cut-drops-pass-through", "fxreplay/compiler/split.py",
             "[n for n in order if stage[n] <= k and any(", "[n for n in order if stage[n] == k and any(",
             ("tests/test_split.py",),
             "in eval mode a value that skips a stage is not passed through it"),
    # ---- checkpoints and resume (checkpoint.py, identity.py, executor/local.py)
    Mutation("checksum-not-compared", "fxreplay/checkpoint.py",
             "if header_end < 0 or hashlib.sha256(payload).hexdigest() != expected:", "if header_end < 0:",
             ("tests/test_checkpoint.py",),
             "a damaged checkpoint is resumed from"),
    Mutation("resume-may-change-gamma", "fxreplay/identity.py",
             '    "optim.lr",\n})', '    "optim.lr", "optim.gamma",\n})',
             ("tests/test_rundir.py::test_resume_refuses_overrides_that_change_the_computation",),
             "a resume may change the lr decay, so it no longer continues the run exactly"),
    Mutation("resume-keeps-current-rng", "fxreplay/executor/local.py",
             "        torch.set_rng_state(cpu)\n", "        pass  # torch.set_rng_state(cpu)\n",
             ("tests/test_executor_local.py::test_resume_is_bitwise_identical",),
             "a resumed run draws other dropout masks than the uninterrupted one"),
    # ---- the learning-rate schedule (fxreplay/run.py)
    Mutation("lr-milestone-rounded", "fxreplay/run.py",
             "return [math.ceil(Fraction(repr(m)) * epochs) for m in milestones]",
             "return [round(Fraction(repr(m)) * epochs) for m in milestones]",
             ("tests/test_run.py::test_lr_schedule_is_the_papers", "tests/test_run.py::test_lr_milestones_by_exact_arithmetic"),
             "milestones rounded to nearest: a 1-epoch run decays, a 3-epoch one decays twice"),
    Mutation("lr-epoch-in-run-loop", "fxreplay/run.py",
             "[e * steps_per_epoch for e in milestone_epochs(", "[(e - 1) * steps_per_epoch for e in milestone_epochs(",
             (G + "test_each_epoch_of_a_run_uses_the_scheduled_learning_rate",),
             "the run decays the learning rate one epoch early"),
    # ---- divergence (executor/)
    Mutation("local-loss-not-checked", "fxreplay/executor/local.py",
             "if not math.isfinite(loss):", "if False:",
             ("tests/test_methods.py::test_divergence_raises_before_any_update",
              "tests/test_methods.py::test_an_infinite_loss_is_a_divergence_too"),
             "a NaN loss is applied to every stage and the run goes on"),
    Mutation("distributed-update-before-loss-check", "fxreplay/executor/distributed.py",
             '            if action.op == "U" and self._out is not None:\n                self._check_loss(t)\n',
             '            if action.op == "U" and self._out is not None:\n                pass\n',
             (G + "test_a_distributed_run_whose_loss_becomes_nan_applies_no_update_of_that_batch",),
             "the last rank applies the NaN step before it reports the divergence"),
    # ---- staleness compensation (fxreplay/methods/compensation.py and the `compensation` option of
    # fr.py, ddg.py, base.py): one per rule, the tied copies and the checkpoint. Then one for each
    # feature that adds lines deciding correctness: schedulers, clipping, precision.
    Mutation("spike-missed-terms-off-by-one", "fxreplay/methods/compensation.py",
             "    a = momentum ** delay\n", "    a = momentum ** (delay + 1)\n",
             (C + "test_fr_with_each_rule_equals_its_handwritten_reference",),
             "spike compensation scales the velocity by μ^(d+1): a late gradient's weight is wrong"),
    Mutation("lr-by-delay-ignores-delay", "fxreplay/methods/compensation.py",
             "return float((delay + 1) ** -(1.0 - min(iteration / horizon, 1.0)))",
             "return float((delay + 1) ** -(1.0 - min(iteration / horizon, 1.0)) if delay > 1 else 1.0)",
             (C + "test_fr_with_each_rule_equals_its_handwritten_reference",),
             "the stage with delay 1 keeps the full learning rate under `lr`"),
    Mutation("shrink-at-stage-0", "fxreplay/methods/compensation.py",
             'return self.comp.beta if "shrink" in self.comp and self.stage > 0 else 1.0',
             'return self.comp.beta if "shrink" in self.comp and self.stage > 1 else 1.0',
             (C + "test_fr_with_each_rule_equals_its_handwritten_reference",),
             "stage 1 sends δ down unshrunk: stage 0's gradient carries β^(d-1)"),
    Mutation("predict-one-step-ahead", "fxreplay/methods/compensation.py",
             "return [p.detach() + self.delay * s if s is not None",
             "return [p.detach() + s if s is not None",
             (C + "test_fr_with_each_rule_equals_its_handwritten_reference", C + "test_ddg_with_prediction_takes_its_gradient_at_the_predicted_weights"),
             "the prediction looks one update ahead instead of d_k"),
    Mutation("predict-weights-not-restored", "fxreplay/methods/compensation.py",
             "                for p, w in zip(self.params, saved):\n                    p.copy_(w)\n",
             "                pass\n",
             (C + "test_fr_with_each_rule_equals_its_handwritten_reference",),
             "the play leaves the predicted weights in place: the update is applied to ŵ, not w"),
    Mutation("tied-copies-compensated", "fxreplay/methods/compensation.py",
             "if rewrite and self._own[i]:", "if rewrite:",
             (C + "test_tied_copies_stay_identical_under_every_rule",),
             "the copies of a tied weight take steps compensated by their holders' delays and drift apart"),
    Mutation("compensation-not-checkpointed", "fxreplay/methods/base.py",
             "            self.compensator.load_state_dict(saved_comp)\n",
             "            self.compensator.load_state_dict({**saved_comp, 'last_step': None} if saved_comp else None)\n",
             (C + "test_resume_with_compensation_is_exact_and_a_changed_rule_is_refused",),
             "a resume forgets the last update the prediction extrapolates"),
]


# ------------------------------------------------------------------------------- running
@dataclass
class Outcome:
    status: str
    seconds: float = 0.0
    detail: str = ""


def snapshot(dst: Path) -> None:
    """Copy the working tree (tracked and untracked files, without what .gitignore excludes)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the working tree is left out
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def pytest(work: Path, tests: list[str], timeout: float, first_failure_only: bool) -> tuple[int | None, str, float]:
    """Run the tests in ``work`` (imports resolve there first); returns (exit code or None on
    timeout, output, seconds). A timeout ends the whole process group (distributed ranks too)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", "--tb=line"]
    cmd += (["-x"] if first_failure_only else []) + tests
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(work), os.environ.get("PYTHONPATH", "")]))}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        code = None
    return code, out, time.perf_counter() - start


LOCATION = re.compile(r"^(/\S+?\.py):(\d+): (.*)$", re.M)


def where_it_failed(work: Path, out: str) -> str:
    """The first failure (``--tb=line``) and what raised it: ``by test`` (its assert, or the
    comparison helpers of torch or pytest it called), ``by outcome`` (the code raised its own
    documented error where the test expected a result), or -- caught only by luck -- ``by code
    assert`` (an assert inside the library) or ``by torch`` (torch raising, e.g. on a shape)."""
    failed = re.search(r"^FAILED (\S+)", out, re.M)
    test = failed.group(1) if failed else "?"
    m = LOCATION.search(out)
    if m is None:
        return test
    path, line, message = m.groups()
    rel = os.path.relpath(path, work)
    if rel.startswith("tests" + os.sep) or "/torch/testing/" in path or "/_pytest/" in path:
        origin = "test"
    elif rel.startswith("fxreplay" + os.sep) and message.startswith("fxreplay.errors."):
        origin = "outcome"
    elif rel.startswith("fxreplay" + os.sep) and message.startswith("AssertionError"):
        origin = "code assert"
    elif "/torch/" in path:
        origin = "torch"
    else:
        origin = "code"
    place = rel if not rel.startswith("..") else "/".join(Path(path).parts[-3:])
    return f"by {origin} ({place}:{line}: {message[:70]}) in {test}"


WEAK = ("by code assert", "by torch", "by code (")


def failing_specs(out: str, specs: list[str]) -> set[str]:
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    return {s for s in specs if any(f == s or f.startswith(s + "::") or f.startswith(s + "[") for f in failed)}


def run(mutations: list[Mutation], timeout: float, baseline: bool, keep: bool) -> list[tuple[Mutation, Outcome]]:
    work = Path(tempfile.mkdtemp(prefix="fxreplay-mutations-"))
    results: list[tuple[Mutation, Outcome]] = []
    try:
        snapshot(work)
        bad: set[str] = set()
        if baseline:
            specs = sorted({t for m in mutations for t in m.tests})
            print(f"baseline: {len(specs)} test files / ids, unchanged ...", flush=True)
            code, out, seconds = pytest(work, specs, timeout * 2, first_failure_only=False)
            bad = failing_specs(out, specs) if code == 1 else (set(specs) if code != 0 else set())
            print(f"baseline: {'passed' if not bad else 'FAILED: ' + ', '.join(sorted(bad))} ({seconds:.0f} s)\n", flush=True)
        for m in mutations:
            path = work / m.file
            text = path.read_text() if path.is_file() else ""
            found = text.count(m.original)
            if found != 1:
                outcome = Outcome("stale" if found == 0 else "ambiguous",
                                  detail=f"original text found {found} times in {m.file}")
            elif bad & set(m.tests):
                outcome = Outcome("baseline fails", detail=", ".join(sorted(bad & set(m.tests))))
            else:
                path.write_text(text.replace(m.original, m.replacement))
                try:
                    code, out, seconds = pytest(work, list(m.tests), timeout, first_failure_only=True)
                finally:
                    path.write_text(text)
                if code is None:
                    outcome = Outcome("timeout", seconds, f"after {timeout:.0f} s")
                elif code == 0:
                    outcome = Outcome("survived", seconds)
                elif code == 1:
                    outcome = Outcome("caught", seconds, where_it_failed(work, out))
                else:
                    tail = " | ".join(out.strip().splitlines()[-2:])
                    outcome = Outcome("broken", seconds, f"pytest exit {code}: {tail[:150]}")
            results.append((m, outcome))
            print(f"{m.name:40s} {outcome.status:10s} {outcome.seconds:6.0f} s  {outcome.detail}", flush=True)
    finally:
        if keep:
            print(f"scratch copy kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated mutation names")
    parser.add_argument("--list", action="store_true", help="list the mutations (and whether their text is found) and exit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation's test run (default 900)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unchanged run of the named tests")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = parser.parse_args()
    chosen = MUTATIONS
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {m.name for m in MUTATIONS})
        if unknown:
            parser.error(f"unknown mutation(s): {', '.join(unknown)}")
        chosen = [m for m in MUTATIONS if m.name in names]
    if args.list:
        for m in chosen:
            path = ROOT / m.file
            found = path.read_text().count(m.original) if path.is_file() else 0
            state = "ok" if found == 1 else ("stale" if found == 0 else "ambiguous")
            print(f"{m.name:40s} {state:9s} {m.file:34s} {m.bug}")
        return 0
    os.nice(10)  # the machine is shared: the tests run at low priority (children inherit it)
    start = time.perf_counter()
    results = run(chosen, args.timeout, not args.no_baseline, args.keep)
    caught = [m.name for m, o in results if o.status == "caught"]
    survived = [m.name for m, o in results if o.status == "survived"]
    other = [f"{m.name} ({o.status})" for m, o in results if o.status not in ("caught", "survived")]
    weak = [m.name for m, o in results if o.status == "caught" and o.detail.startswith(WEAK)]
    print(f"\nscore: {len(caught)}/{len(caught) + len(survived)} caught"
          f"{' (' + str(len(weak)) + ' only by an assert in the code or torch raising: ' + ', '.join(weak) + ')' if weak else ''}; "
          f"survived: {', '.join(survived) or 'none'}; not judged: {', '.join(other) or 'none'}; "
          f"{(time.perf_counter() - start) / 60:.1f} min")
    return 1 if survived or other else 0


if __name__ == "__main__":
    sys.exit(main())

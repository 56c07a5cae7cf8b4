"""The training recipe (issue 27): any torch optimizer by name with weight-decay groups, torch's
lr schedulers stepped per iteration, global-norm gradient clipping and autocast precision --
through the stages equal to the plain PyTorch loop on the model, the same one rank per stage
and on a K x D mesh, from a config file, and across a resume."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn
from torch.optim import lr_scheduler as torch_schedules

import fxreplay
from fxreplay.checkpoint import load_checkpoint, save_atomic
from fxreplay.config import apply_overrides, load_config
from fxreplay.errors import ConfigError, TrainingError
from fxreplay.lr_schedule import scheduler_factory
from fxreplay.metrics import default_loss
from fxreplay.models.gpt import gpt_tiny
from fxreplay.optimizers import decay_groups, optimizer_factory, undecayed_names
from fxreplay.run import lr_factor, lr_schedule, train_run

LR, WD, CLIP, WARMUP, STEPS = 3e-3, 0.1, 0.5, 3, 12


def gpt() -> nn.Module:
    """A GPT whose head is tied to its token embedding: at K = 3 the first and last stage hold it."""
    torch.manual_seed(0)
    return gpt_tiny(layers=2, width=32, heads=2, block_size=16)


def tokens(n: int = STEPS, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (batch, 16), generator=g), torch.randint(0, 256, (batch, 16), generator=g)) for _ in range(n)]


def adamw(groups: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=LR, weight_decay=WD)


def recipe_trainer(method: str, precision: str, K: int = 3, **kw: Any) -> fxreplay.Trainer:
    pipe = fxreplay.compile(gpt(), (tokens(1)[0][0],), K=K, cost="uniform")
    return fxreplay.Trainer(pipe, method=method, optimizer=adamw, no_decay="auto", loss_fn=default_loss, precision=precision,
                            scheduler=scheduler_factory("cosine", STEPS, WARMUP), clip_grad_norm=CLIP, **kw)


def plain_loop(precision: str, data: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[nn.Module, list[float], list[float]]:
    """The recipe as nanoGPT writes it: AdamW without decay on biases, norms and embeddings,
    linear warm-up from 0 then cosine, clip_grad_norm_, forward and loss under autocast."""
    model = gpt()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decayed = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings]
    kept = [p for p in model.parameters() if not (p.dim() >= 2 and id(p) not in embeddings)]
    opt = torch.optim.AdamW([{"params": decayed}, {"params": kept, "weight_decay": 0.0}], lr=LR, weight_decay=WD)
    sched = torch_schedules.SequentialLR(opt, [torch_schedules.LambdaLR(opt, lambda i: i / WARMUP),
                                               torch_schedules.CosineAnnealingLR(opt, T_max=STEPS - WARMUP)], milestones=[WARMUP])
    losses, norms = [], []
    for x, y in data:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = default_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return model, losses, norms


# fp32: every step to 1e-5. bf16: the stages and the plain loop sum the tied embedding's gradient in another
# order (float32 rounding, ~1e-7); a bf16 cast of an activation that lands on the other side of a rounding
# boundary turns that into a bf16-sized difference, which AdamW then carries (seen on a CPU with AMX-BF16:
# the losses equal for 5 steps, then up to 5e-5 apart, the weights up to 5e-3 after 12 steps). So the first
# steps are held to fp32's tolerance (a stage outside autocast, or a boundary tensor cast back to fp32, is
# ~1e-2 off at step 0) and the rest to bf16's rounding.
@pytest.mark.parametrize("precision, tol, drift", [("fp32", 1e-5, 1e-5), ("bf16", 1e-5, 2e-2)])
def test_bp_with_the_whole_recipe_through_three_stages_is_the_plain_loop(precision: str, tol: float, drift: float) -> None:
    data = tokens()
    trainer = recipe_trainer("bp", precision)
    losses, norms, lrs = [], [], []
    for x, y in data:
        lrs.append(trainer.lr)
        losses.append(trainer.step(x, y))
        norms.append(trainer.grad_norm)
    model, want_losses, want_norms = plain_loop(precision, data)
    assert lrs[:WARMUP + 1] == pytest.approx([0, LR / 3, 2 * LR / 3, LR]) and lrs[-1] < lrs[WARMUP + 1]
    assert min(want_norms) > CLIP  # every step clipped: the tied embedding's gradient counted once, or the norms differ
    first = WARMUP + 1  # the warm-up and the first full-rate step: before rounding differences can compound
    assert norms[:first] == pytest.approx(want_norms[:first], rel=tol)
    assert losses[:first] == pytest.approx(want_losses[:first], abs=tol)
    assert norms == pytest.approx(want_norms, rel=max(tol, drift / 10))
    assert losses == pytest.approx(want_losses, abs=max(tol, drift / 10))
    got, want = trainer.model_state_dict(), model.state_dict()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=drift, rtol=0, msg=name)


def test_weight_decay_groups_follow_the_original_names_and_tied_copies_agree() -> None:
    pipe = fxreplay.compile(gpt(), (tokens(1)[0][0],), K=3, cost="uniform")
    exempt = undecayed_names(pipe.model, ("auto",))
    assert {"tok_emb.weight", "head.weight", "pos_emb.weight", "ln_f.weight", "blocks.0.attn.qkv.bias"} <= exempt
    assert "blocks.0.attn.qkv.weight" not in exempt
    trainer = fxreplay.Trainer(pipe, method="bp", optimizer=adamw, no_decay="auto")

    def decay_of(k: int, source: str) -> float:
        """The weight decay stage k's optimizer gives its copy of the model's parameter ``source``."""
        stage = pipe.stages[k]
        local = next(n for n, _ in stage.named_parameters() if getattr(stage, "replicas", {}).get(n, n) == source)
        p = dict(stage.named_parameters())[local]
        return next(g["weight_decay"] for g in trainer.executor.optimizers[k].param_groups if any(p is q for q in g["params"]))

    # the tied embedding: stage 0's token embedding and stage 2's head, both undecayed
    assert decay_of(0, "tok_emb.weight") == decay_of(2, "tok_emb.weight") == 0.0
    assert decay_of(0, "blocks.0.attn.qkv.weight") == WD and decay_of(2, "ln_f.weight") == 0.0
    patterned = decay_groups(optimizer_factory("sgd", 0.1, 0.01), pipe, ("*.bias",))
    opt = patterned(list(pipe.stages[1].parameters()))
    assert [len(g["params"]) for g in opt.param_groups] == [6, 6] and opt.param_groups[1]["weight_decay"] == 0.0
    with pytest.raises(TrainingError, match="matches no parameter"):
        decay_groups(optimizer_factory("sgd", 0.1), pipe, ("*.biass",))


def test_schedules_are_torchs_and_step_is_the_old_epoch_rule() -> None:
    def lrs(make: Any, n: int) -> list[float]:
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        sched, out = make(opt), []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    steps_per_epoch, epochs = 3, 4
    cfg = apply_overrides(load_config(None), {"train.epochs": epochs, "optim.lr": 1.0})
    step = lrs(lr_schedule(cfg, steps_per_epoch), epochs * steps_per_epoch)
    assert step == pytest.approx([lr_factor(e, epochs, (0.5, 0.75), 0.1) for e in range(epochs) for _ in range(steps_per_epoch)])
    cosine = lrs(scheduler_factory("cosine", 10, 2), 10)
    assert cosine[:3] == pytest.approx([0, 0.5, 1.0]) and all(a > b for a, b in zip(cosine[2:], cosine[3:])) and cosine[-1] > 0
    assert lrs(scheduler_factory("linear", 4), 4) == pytest.approx([1, 0.75, 0.5, 0.25])
    assert lrs(scheduler_factory("constant", 5, 2), 5) == pytest.approx([0, 0.5, 1, 1, 1])
    one = lrs(scheduler_factory("onecycle", 10, 4), 10)  # its own warm-up, from lr/25
    assert one[0] == pytest.approx(1 / 25) and max(one) == pytest.approx(1.0) and one[-1] < one[0]
    with pytest.raises(TrainingError, match="after the first lr decay"):
        scheduler_factory("step", 100, 50, milestones=[30])


def test_config_refuses_what_torch_would_refuse_naming_the_key() -> None:
    base = load_config(None)
    for overrides, message in (
        ({"optim.name": "adamw", "optim.args": "{foo: 1}"}, "optim.args: AdamW takes no argument 'foo'; its parameters are lr, betas"),
        ({"optim.name": "adamw", "optim.args": "{betas: [2, 0.9]}"}, "optim.args: AdamW refuses these arguments"),
        ({"optim.name": "adamz"}, "optim.name: unknown optimizer 'adamz'"),
        ({"optim.name": "adamw", "optim.momentum": 0.5}, "optim.momentum: AdamW has no momentum"),
        ({"optim.name": "adamw", "train.compensation": "spike"}, "train.compensation: compensation 'spike' corrects SGD's momentum"),
        ({"optim.schedule": "cos"}, "optim.schedule: expected one of constant, step, cosine"),
        ({"optim.clip_grad_norm": 0}, "optim.clip_grad_norm: must be a number > 0"),
        ({"train.precision": "fp16", "partition.devices": "cpu,cpu"}, "train.precision: precision fp16 needs every stage on a CUDA"),
    ):
        with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
            apply_overrides(base, overrides)
    # auto compensation adapts to the optimizer (predict only for AdamW), and the keys round-trip
    cfg = apply_overrides(base, {"optim.name": "AdamW", "optim.args": "{betas: [0.9, 0.95]}", "train.compensation": "auto",
                                 "optim.no_decay": "auto", "optim.schedule": "cosine", "optim.warmup_steps": 5})
    from fxreplay.config import from_dict, to_dict

    assert from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg
    with pytest.raises(TrainingError, match="fp16 needs every stage on a CUDA device"):
        recipe_trainer("bp", "fp16", K=2)


def test_spike_compensation_steps_with_the_lr_of_its_iteration() -> None:
    """The scheduler steps after the compensated update: stage 0 of FR at K = 2 (d = 1) moves at
    iteration t by spike's -lr_t (a v + b g), lr_t the scheduled lr of t, not of t+1."""
    from fxreplay.executor import LocalExecutor
    from fxreplay.methods.compensation import spike_coefficients

    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Linear(8, 3)]
    wd, mu = 1e-3, 0.9
    ex = LocalExecutor(stages, "fr", optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=mu, weight_decay=wd),
                       loss_fn=nn.functional.cross_entropy, compensation="spike")
    factors = [1.0, 0.5, 0.25, 0.5, 1.0, 0.75]
    for w in ex.workers:
        w.scheduler = torch_schedules.LambdaLR(w.optimizer, lambda i: factors[min(i, len(factors) - 1)])
    a, b = spike_coefficients(mu, 1)
    first = ex.workers[0]
    g = torch.Generator().manual_seed(2)
    for t in range(len(factors)):
        before = [p.detach().clone() for p in first.params]
        lr = first.optimizer.param_groups[0]["lr"]
        assert lr == pytest.approx(0.05 * factors[t])
        ex.step(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))
        if t == 0:
            assert all(torch.equal(p, w) for p, w in zip(first.params, before))  # warm-up: no update, the schedule steps
            continue
        for p, w in zip(first.params, before):
            grad = p.grad + wd * w
            v = first.optimizer.state[p]["momentum_buffer"]
            torch.testing.assert_close(p.detach(), w - lr * (a * v + b * grad), atol=1e-7, rtol=0)


RUNS = {1: (("bp", "bf16"), ("fr", "bf16"), ("ddg", "fp32")), 2: (("bp", "fp32"), ("fr", "fp32"), ("fr", "bf16"), ("gpipe", "bf16"))}
"""(method, precision) per D. On the mesh each replica computes on half the batch (GPipe: on
microbatches), which rounds otherwise: equal to float rounding, which Adam's normalised step
amplifies for the gradients that are rounding noise (an attention key's bias has none), so
bf16 there is compared by its losses and norms (GPipe's against BP's)."""


def _rank_recipe(K: int, dp: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method, precision in RUNS[dp]:
        trainer = recipe_trainer(method, precision, K=K, dp=dp)
        losses = [trainer.step(x, y) for x, y in tokens(8, batch=4)]
        own = trainer.pipe.stages[trainer.executor.stage]
        out[method + precision] = (losses, trainer.grad_norm, {k: v.clone() for k, v in own.state_dict().items()},
                                   trainer.last_step_lr)
        trainer.close()
    return out


@pytest.mark.parametrize("K, dp", [(3, 1), (2, 2)])
def test_one_rank_per_stage_and_the_mesh_equal_the_local_executor(K: int, dp: int) -> None:
    """The global norm is an all-reduce over the ranks (each stage once, tied copies once, the
    replicas' averaged gradients once); the schedulers step in lockstep; autocast on every rank."""
    from fxreplay.launch import run_distributed

    results = run_distributed(_rank_recipe, nproc=K * dp, args=(K, dp), threads=1, timeout=120.0)
    torch.set_num_threads(1)
    for method, precision in RUNS[dp]:
        key = method + precision
        exact = method != "gpipe" and (dp == 1 or precision == "fp32")
        trainer = recipe_trainer(method if method != "gpipe" else "bp", precision, K=K)
        losses = [trainer.step(x, y) for x, y in tokens(8, batch=4)]
        tol = 1e-3 if not exact else 1e-6 if dp == 1 else 1e-5
        assert results[K * dp - 1][key][0] == pytest.approx(losses, abs=tol), key
        for rank in range(K * dp):
            got_losses, norm, weights, lr = results[rank][key]
            assert norm == pytest.approx(trainer.grad_norm, rel=tol) and lr == trainer.last_step_lr, (key, rank)
            if exact:
                for name, value in trainer.pipe.stages[rank % K].state_dict().items():
                    torch.testing.assert_close(weights[name], value, atol=tol, rtol=0, msg=f"{key} rank {rank} {name}")


RECIPE_YAML = """\
model: {name: digits_cnn}
data: {name: digits, batch_size: 128}
optim:
  name: adamw
  lr: 0.003
  weight_decay: 0.05
  args: {betas: [0.9, 0.95]}
  no_decay: auto
  schedule: cosine
  warmup_steps: 6
  clip_grad_norm: 1.0
partition: {K: 2}
train:
  method: fr
  epochs: 2
  log_every: 1
  precision: bf16
  eval_every_epoch: false
  timeline: false
"""


def test_the_recipe_from_a_config_file_trains_fr_with_warmup_then_decay(tmp_path: Path) -> None:
    config = tmp_path / "recipe.yaml"
    config.write_text(RECIPE_YAML + f"  out: {tmp_path / 'run'}\n")
    result = train_run(load_config(config))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    lrs = [r["lr"] for r in steps]
    assert len(steps) == result.steps == 24  # 1,437 images in batches of 128: 12 an epoch
    assert lrs[:7] == pytest.approx([0.003 * i / 6 for i in range(6)] + [0.003])  # warm-up from 0 rises
    assert all(a > b for a, b in zip(lrs[6:], lrs[7:])) and lrs[-1] < 0.0001  # cosine falls to ~0 at the horizon
    assert all(r["grad_norm"] > 0 for r in steps)  # the global norm is logged
    assert result.final["test_accuracy"] > 0.5 and steps[-1]["loss"] < steps[0]["loss"]


@pytest.mark.parametrize("drop_scheduler_state", [False, True])
def test_resume_with_a_scheduler_is_bit_identical(tmp_path: Path, drop_scheduler_state: bool) -> None:
    """Stopped mid-warm-up and resumed: the same losses and weights, bit for bit. A checkpoint
    without scheduler states (written before they were saved) restarts the schedule at its
    iteration, which stepping makes the same lrs. In fp32: bf16 autocast keeps no state to resume
    (the distributed == local tests below train in bf16), and on this CPU it is 7x slower."""
    def cfg(run: str, **more: Any) -> Any:
        return apply_overrides(load_config(None), {
            "train.out": str(tmp_path / run), "train.method": "fr", "train.epochs": 2, "data.batch_size": 256,
            "data.subset": 768,  # 3 iterations an epoch
            "optim.name": "adamw", "optim.lr": 0.003, "optim.schedule": "cosine", "optim.warmup_steps": 4,
            "optim.clip_grad_norm": 1.0, "optim.no_decay": "auto", **more})

    full = train_run(cfg("a"))
    first = train_run(cfg("b", **{"train.max_steps": 2}))  # in the warm-up, in the first epoch
    if drop_scheduler_state:
        ckpt_file = tmp_path / "b" / "checkpoint.pt"
        ckpt = load_checkpoint(tmp_path / "b")
        for worker in ckpt["trainer"]["executor"]["workers"]:
            del worker["scheduler"]
        del ckpt["schedule"]
        save_atomic(ckpt, ckpt_file, checksum=True)  # as the run writes it
    rest = train_run(cfg("b"), resume=tmp_path / "b")
    assert first.losses + rest.losses == full.losses
    a, b = torch.load(tmp_path / "a" / "model.pt"), torch.load(tmp_path / "b" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_version_and_the_top_level_help_lists_every_method() -> None:
    from tests.clitools import assert_user_error, run_cli
    from fxreplay.methods import METHODS

    result = run_cli("--version")
    assert result.exit_code == 0 and result.output.startswith(f"fxreplay {fxreplay.__version__} (torch {torch.__version__}")
    help_text = run_cli("--help").output
    for name, spec in METHODS.items():
        assert f"  {name} " in help_text and spec.summary in " ".join(help_text.split()), name
    assert_user_error(run_cli("train", "--config", "/nonexistent.yaml"), "cannot read config file")


def test_a_bad_optimizer_argument_is_one_paragraph_naming_the_key(tmp_path: Path) -> None:
    from tests.clitools import assert_user_error, run_cli

    config = tmp_path / "c.yaml"
    config.write_text("optim: {name: adamw, args: {momentum: 0.9}}\n")
    assert_user_error(run_cli("train", "--config", str(config), "--out", str(tmp_path / "run")),
                      "optim.args: momentum is set by optim.momentum")


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # the plain loop's skipped steps
def test_fp16_scales_the_loss_as_torchs_grad_scaler_for_the_whole_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 (CUDA-only in use; its mechanics checked here on the CPU, whose autocast and
    GradScaler also take float16): BP through 3 stages with a scale that first overflows --
    every stage skips those updates and halves its scale, as GradScaler does for the model --
    equals the plain loop with torch.amp.GradScaler."""
    import fxreplay.methods.base as base
    import fxreplay.trainer as trainer_module

    monkeypatch.setattr(base, "check_precision", lambda name, devices=(): name)
    monkeypatch.setattr(trainer_module, "check_precision", lambda name, devices=(): name)
    init, data = 2.0 ** 22, tokens()
    sgd = lambda params: torch.optim.SGD(params, lr=0.3, momentum=0.9)  # noqa: E731
    pipe = fxreplay.compile(gpt(), (data[0][0],), K=3, cost="uniform")
    trainer = fxreplay.Trainer(pipe, method="bp", optimizer=sgd, loss_fn=default_loss, precision="fp16", clip_grad_norm=CLIP,
                               scheduler=scheduler_factory("cosine", STEPS, WARMUP))
    for w in trainer.executor.workers:
        w.loss_scale.scale = init
    losses, scales = [], []
    for x, y in data:
        losses.append(trainer.step(x, y))
        scales.append([w.loss_scale.scale for w in trainer.executor.workers])

    model = gpt()
    opt = sgd(model.parameters())
    sched = torch_schedules.SequentialLR(opt, [torch_schedules.LambdaLR(opt, lambda i: i / WARMUP),
                                               torch_schedules.CosineAnnealingLR(opt, T_max=STEPS - WARMUP)], milestones=[WARMUP])
    scaler = torch.amp.GradScaler("cpu", init_scale=init)
    want_losses, want_scales = [], []
    for x, y in data:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = default_loss(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        scaler.step(opt)
        scaler.update()
        sched.step()
        want_losses.append(float(loss.detach()))
        want_scales.append(scaler.get_scale())
    assert want_scales[0] < init and want_scales[-1] == want_scales[3]  # it overflowed, then did not
    assert scales == [[s] * 3 for s in want_scales]
    assert losses == pytest.approx(want_losses, abs=1e-4)
    got = trainer.model_state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(got[name], value, atol=1e-4, rtol=0, msg=name)
    with pytest.raises(TrainingError, match="synthetic gradients that carry no loss scale"):
        fxreplay.Trainer(pipe, method="dni", optimizer=sgd, precision="fp16")


def _tensorboard_cfg(tmp_path: Path, **more: Any) -> Any:
    return apply_overrides(load_config(None), {"train.out": str(tmp_path / "run"), "train.epochs": 1, "train.max_steps": 4,
                                               "train.log_every": 2, "data.batch_size": 256, "train.tensorboard": True, **more})


def test_tensorboard_gets_the_metrics_scalars_and_a_missing_package_is_one_clear_error(tmp_path: Path,
                                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    from tests.clitools import assert_user_error, run_cli

    try:
        import tensorboard  # noqa: F401
    except ImportError:  # this machine: the message, before anything is built or written
        config = tmp_path / "c.yaml"
        config.write_text("train: {tensorboard: true}\n")
        assert_user_error(run_cli("train", "--config", str(config), "--out", str(tmp_path / "none")),
                          "tensorboard package is not installed", "pip install 'fxreplay[tensorboard]'")
        assert not (tmp_path / "none").exists()
    written: list[tuple[str, float, int]] = []

    class Writer:  # torch.utils.tensorboard's SummaryWriter, as far as the run uses it
        def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
            written.append(("open " + Path(log_dir).name, float(purge_step or 0), 0))

        def add_scalar(self, tag: str, value: float, global_step: int) -> None:
            written.append((tag, value, global_step))

        def flush(self) -> None: ...

        def close(self) -> None: ...

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    train_run(_tensorboard_cfg(tmp_path, **{"optim.clip_grad_norm": 5.0}))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert written[0] == ("open tensorboard", 0.0, 0)
    for record in steps:
        for key in ("loss", "lr", "grad_norm"):
            assert (f"step/{key}", record[key], record["step"]) in written
        assert ("step/stage_time/1", record["stage_time"][1], record["step"]) in written
    epoch = next(r for r in records if r["kind"] == "epoch")
    assert ("epoch/test_accuracy", epoch["test_accuracy"], epoch["step"]) in written


class _ReadsDtype(nn.Module):
    """Code that turns a dtype into a constant (``torch.finfo(h.dtype)``), as attention masks do."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = h.masked_fill(h > 1, torch.finfo(h.dtype).min / 4)
        return self.b(torch.relu(h))


@pytest.mark.parametrize("method", ["bp", "fr"])
def test_the_dtype_guard_accepts_autocast_in_play_and_replay(method: str) -> None:
    """The trace read float32; under autocast the same code reads bfloat16: the guard takes it
    for the same function in mixed precision (a cast after compiling is still refused)."""
    torch.manual_seed(0)
    model, x = _ReadsDtype(), torch.randn(8, 8)
    pipe = fxreplay.compile(model, (x,), K=2, cost="uniform")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(pipe(x), model(x), atol=0, rtol=0)
    trainer = fxreplay.Trainer(pipe, method=method, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), precision="bf16")
    for _ in range(3):  # FR: stage 0 replays from the second step on, under the play's autocast
        assert math.isfinite(trainer.step(x, torch.randint(0, 4, (8,))))
    from fxreplay.errors import ShapeGuardError

    with pytest.raises(ShapeGuardError, match="compiled for inputs where it gave torch.float32"):
        pipe.stages[0].double()(x.double())

"""Decoupled neural interfaces with synthetic gradients (Jaderberg et al., 2016).

Stages 0..K-2 each own one synthesizer per floating boundary tensor (see
:mod:`~fxreplay.methods.synthesizer`). At iteration t, for 0-based stage k < K-1:

- ``kF0``: forward of batch t with graph; send h_k^t up.
- ``kS0``: δ̂_k = S_k(h_k^t) (on the detached output); backpropagate δ̂_k through the
  stage and send the gradient w.r.t. the stage input down -- that is the "true" δ_{k-1}
  stage k-1's synthesizer learns from (bootstrapped, as in the paper).
- ``kU0``: update the stage at once (no waiting for the layers above).
- ``kT0``: when stage k+1 has sent the true δ_k of batch t (computed from its own δ̂ or,
  at the last stage, from the loss), train S_k by MSE(δ̂_k, δ_k.detach()) with its own
  optimizer (Adam by default: SGD often fails to converge for DNI).

The last stage runs F, B, U exactly like BP. With a perfect synthesizer this is BP.

**Scale.** The true δ of a batch-mean loss is tiny (of order 1/batch per element, smaller
still deep in a network), while an optimizer's first steps move a fresh synthesizer's
output by about its learning rate: unscaled, the first synthetic gradients were orders of
magnitude larger than the true ones and blew the stages up (the offline default trained to
66% at K=2, chance at K=4, where BP reaches 98%). The built-in synthesizers therefore work
in units of the true δ's running RMS σ_k (an exponential average over the T steps, per
boundary tensor): S_k is trained on δ_k / σ_k and the stage receives δ̂_k = σ_k · S_k(h_k).
Until a true δ has been seen (σ_k unknown) the synthetic gradient is zero: the stage waits,
as FR's stages wait in warm-up. A synthesizer given as a callable (an oracle in tests)
predicts δ itself, unscaled.

Options:
    synthesizer: ``"auto"`` | ``"conv"`` | ``"mlp"``, or a callable
        ``(stage, example_tensor) -> nn.Module`` (e.g. an oracle in tests).
    synth_hidden: hidden channels/features of the built-in synthesizers.
    synth_optimizer: factory ``params -> Optimizer``; default ``Adam(lr=1e-3)`` (on the
        scaled targets).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..measure import StorageMap, storages_of
from ..partition import MethodCost
from ..schedule import Action, Schedule, check_K
from .base import Link, OptimizerFactory, StageWorker, _is_diff, as_tuple
from .spec import MethodSpec
from .synthesizer import check_conditionable, make_synthesizer

__all__ = ["DNIWorker", "schedule", "SPEC"]


def schedule(K: int) -> Schedule:
    """Stage k runs F at tick k, S at k+1, U at k+2, and T at k+3 (after stage k+1's S/B at
    tick k+2 produced the true δ_k); the last stage runs F, B, U."""
    check_K(K)
    table: dict[int, list[Action]] = {}
    for k in range(K):
        ops = ["F", "B", "U"] if k == K - 1 else ["F", "S", "U", "T"]
        for i, op in enumerate(ops):
            table.setdefault(k + i, []).append(Action(k, op, 0))
    return tuple(tuple(sorted(table[c])) for c in sorted(table))


def _default_synth_optimizer(params: list[Any]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


SCALE_DECAY = 0.95
"""Weight of the past in the running mean square of the true δ (about 20 iterations)."""


class DNIWorker(StageWorker):
    """A stage trained from synthetic gradients.

    Attributes:
        synths: boundary position -> synthesizer module (built at the first S).
        last_synth_loss: the synthesizer MSE of the last T (None before any).
    """

    method = "dni"

    option_names = frozenset({"synthesizer", "synth_hidden", "synth_optimizer"})
    conditioned = False  # cDNI: the synthesizers also see the labels (methods/cdni.py)
    loss_scaled = False  # synthetic gradients: fp16's loss scale does not reach them

    def _apply_options(self, options: dict[str, Any]) -> None:
        super()._apply_options(options)
        self.synth_kind: str | Callable[[int, torch.Tensor], nn.Module] = options.get("synthesizer", "auto")
        self.synth_hidden: int | None = options.get("synth_hidden")
        self.synth_optimizer: OptimizerFactory = options.get("synth_optimizer") or _default_synth_optimizer
        self.synths: dict[int, nn.Module] = {}
        self.synth_opts: dict[int, torch.optim.Optimizer | None] = {}
        self._spec: dict[int, tuple[tuple[int, ...], torch.dtype]] = {}
        self._pred: tuple[int, dict[int, torch.Tensor], StorageMap] | None = None
        self.last_synth_loss: float | None = None
        # Built-in synthesizers predict δ / σ (see the module docstring); a callable predicts δ.
        self.scaled = not callable(self.synth_kind)
        self.mean_square: dict[int, float] = {}  # boundary position -> running mean of δ², once seen
        self.num_classes: int = 0  # > 0: label-conditioned synthesizers (cDNI)

    def _synth(self, position: int, example: torch.Tensor, labels: torch.Tensor | None = None) -> nn.Module:
        if position not in self.synths:
            if self.num_classes and labels is not None and not callable(self.synth_kind):
                check_conditionable(example, labels, self.synth_kind)
            # Initialise from a generator of its own: drawing from the global stream here
            # would shift the dropout masks of every later stage and of every later step.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((torch.initial_seed() + 7919 * (self.stage + 1) + position) % 2**63)
                if callable(self.synth_kind):
                    module = self.synth_kind(self.stage, example)
                else:
                    module = make_synthesizer(example, self.synth_kind, self.synth_hidden, self.num_classes)
            params = list(module.parameters())
            if self.meter is not None:
                self.meter.exclude(params)  # synthesizer weights are not activations
            self.synths[position] = module
            # A parameter-free synthesizer (an oracle) has nothing to train.
            self.synth_opts[position] = self.synth_optimizer(params) if params else None
            self._spec[position] = (tuple(example.shape), example.dtype)
        return self.synths[position]

    def op_F(self, batch: int, link: Link) -> None:
        """Forward of batch t with graph; send h_k^t up (last stage: compute the loss)."""
        self._live = self.graph_forward(batch, self.leaf_inputs(self.recv_inputs(batch, link)), link)

    def op_S(self, batch: int, link: Link) -> None:
        """Backpropagate the synthetic δ̂_k = S_k(h_k) and send δ_{k-1} down."""
        entry = self._live
        assert entry is not None and entry[0] == batch, f"DNI stage {self.stage}: no forward of batch {batch}"
        _, inputs, out, _ = entry
        outs = as_tuple(out)
        positions = [i for i, o in enumerate(outs) if _is_diff(o) and o.requires_grad]
        labels = self._labels(batch, link)
        synths = {i: self._synth(i, outs[i].detach(), labels) for i in positions}
        with self.recording() as saved, self.autocast():
            preds = {i: synths[i](outs[i].detach(), *(() if labels is None else (labels,))) for i in positions}
        self._pred = (batch, preds, saved)
        self.observe_memory()  # the peak: stage graph and synthesizer graph both alive
        self._live = None
        for p in self.params:
            p.grad = None
        synthetic = {i: (pred.detach() * self._scale(i)).to(outs[i].dtype) for i, pred in preds.items()}
        if synthetic:
            torch.autograd.backward([outs[i] for i in synthetic], list(synthetic.values()))
        self.grad_batch = batch
        self.send_input_grads(batch, inputs, link)

    def _labels(self, batch: int, link: Link) -> torch.Tensor | None:
        """The labels of the batch for label-conditioned built-in synthesizers, else None."""
        if not self.num_classes or callable(self.synth_kind):
            return None
        y = link.recv("target", batch)
        return y.to(self.device) if isinstance(y, torch.Tensor) else torch.as_tensor(y, device=self.device)

    def op_B(self, batch: int, link: Link) -> None:
        """Last stage only: backpropagate the loss, send the true δ down."""
        self.observe_memory()
        entry, self._live = self._live, None
        assert entry is not None and entry[0] == batch
        self.backprop(entry, link)

    def op_T(self, batch: int, link: Link) -> None:
        """Train S_k on the true δ_k of this batch, sent by stage k+1 (detached)."""
        assert self._pred is not None and self._pred[0] == batch, f"DNI stage {self.stage}: no prediction for batch {batch}"
        _, preds, _ = self._pred
        self._pred = None
        true = as_tuple(link.recv("grad", batch))
        known = {i: true[i].to(pred.device).detach() for i, pred in preds.items() if true[i] is not None}
        if self.scaled:
            for i, delta in known.items():
                square = float(delta.double().pow(2).mean())
                past = self.mean_square.get(i)
                self.mean_square[i] = square if past is None else SCALE_DECAY * past + (1 - SCALE_DECAY) * square
        # In fp32 whatever the stage's precision (a no-op without autocast).
        terms = [F.mse_loss(preds[i].float(), (delta / self._scale(i)).float()) for i, delta in known.items() if self._scale(i) > 0]
        if not terms:
            return
        loss = torch.stack(terms).sum()
        self.last_synth_loss = float(loss.detach())
        if loss.requires_grad:
            opts = [o for o in self.synth_opts.values() if o is not None]
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()

    def _scale(self, position: int) -> float:
        """σ of boundary ``position``: what the synthesizer's output is multiplied by (1 for a
        callable synthesizer; 0 before any true δ was seen)."""
        if not self.scaled:
            return 1.0
        return math.sqrt(self.mean_square.get(position, 0.0))

    def held_storages(self) -> list[StorageMap]:
        maps = super().held_storages()
        if self._pred is not None:
            maps += [self._pred[2], storages_of(self._pred[1].values())]
        return maps

    def extra_state(self) -> dict[str, Any]:
        return {
            "spec": dict(self._spec),
            "synths": {i: m.state_dict() for i, m in self.synths.items()},
            "synth_opts": {i: (o.state_dict() if o is not None else None) for i, o in self.synth_opts.items()},
            "last_synth_loss": self.last_synth_loss,
            "mean_square": dict(self.mean_square),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.synths, self.synth_opts, self._spec, self._pred = {}, {}, {}, None
        for i, (shape, dtype) in state["spec"].items():
            self._synth(i, torch.zeros(shape, dtype=dtype, device=self.device))
            self.synths[i].load_state_dict(state["synths"][i])
            opt = self.synth_opts[i]
            if opt is not None and state["synth_opts"][i] is not None:
                opt.load_state_dict(state["synth_opts"][i])
        self.last_synth_loss = state["last_synth_loss"]
        self.mean_square = {int(i): float(v) for i, v in state.get("mean_square", {}).items()}


SPEC = MethodSpec(
    name=DNIWorker.method, label="DNI", summary="decoupled neural interfaces with synthetic gradients (Jaderberg et al., 2016)",
    worker=DNIWorker, schedule=schedule, cost=MethodCost(DNIWorker.method), color="#4dac26", complexity="O(L + K·L_s)",
)

"""cDNI: DNI whose synthesizers also see the labels (Jaderberg et al., 2016, Sec. 3.2).

Everything is :mod:`~fxreplay.methods.dni`'s (schedule, scaling, bootstrapped targets),
except that stage k's synthesizer predicts δ̂_k = S_k(h_k, y) from the boundary tensor and
a one-hot code of the batch's labels (:class:`~fxreplay.methods.synthesizer.LabelConditioned`):
the paper found conditioning on the labels makes synthetic gradients far more accurate,
since the true δ of the last layers is mostly a function of the label. Every stage
therefore needs the labels of its batch (``wants_targets``: the executors hand each stage
the batch's targets, as they hand the last stage its own). Labels must be integer classes
(``num_classes``, from the plan): (N,) for images, (B, T) for tokens.

Options: DNI's, plus ``num_classes`` (required, set by the trainer from the plan).
"""
from __future__ import annotations

from typing import Any

from ..errors import TrainingError
from ..partition import MethodCost
from .dni import DNIWorker, schedule
from .spec import MethodSpec

__all__ = ["CDNIWorker", "SPEC"]


class CDNIWorker(DNIWorker):
    """A DNI stage with label-conditioned synthesizers."""

    method = "cdni"
    option_names = DNIWorker.option_names | {"num_classes"}
    wants_targets = True
    conditioned = True

    def _apply_options(self, options: dict[str, Any]) -> None:
        num_classes = options.pop("num_classes", None)
        super()._apply_options(options)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise TrainingError(
                f"cDNI conditions its synthesizers on class labels and needs their number (num_classes), got "
                f"{num_classes!r}: set model.num_classes in the config, or train with --method dni."
            )
        self.num_classes = num_classes


SPEC = MethodSpec(
    name=CDNIWorker.method, label="cDNI", summary="DNI with label-conditioned synthesizers (Jaderberg et al., 2016)",
    worker=CDNIWorker, schedule=schedule, cost=MethodCost(DNIWorker.method), color="#1b7837", complexity="O(L + K·L_s)",
)

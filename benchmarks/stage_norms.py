"""How large each block's weights ended up, run against run: the norm of the convolution and linear weights
(every tensor of two or more dimensions) per block, divided by the first run's (BP's).

Behind a BatchNorm the scale of a convolution's weights does not change what the network computes, only
how fast it learns: the effective learning rate of such a tensor is η/‖w‖². So two runs with the same
optimizer can train their lower blocks at very different effective rates, and this table shows it::

    python benchmarks/stage_norms.py benchmarks/runs/deep10-lr0.1/bp-K8-s0 benchmarks/runs/deep10-lr0.1/fr-K8-s0 ...

Each RUN is a finished run directory (its model.pt: the trained model's state_dict). A block is the
parameter name up to its second dot (``layer1.3`` in ResNets; ``conv1`` for a stem). The columns are the
first run's pipeline stages where its config.yaml pins the split (``partition.boundaries``: a stage starts at
each boundary's first block), else, or with ``--group N``, N consecutive blocks; each cell is the mean ratio over
its blocks. ``model.pt`` is not among the files benchmarks/converged_summary.py keeps: the runs themselves are
needed.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch


def block_norms(run: Path) -> dict[str, float]:
    """The root-sum-square norm of each block's weight tensors (``ndim >= 2``), in model order."""
    path = run / "model.pt"
    if not path.is_file():
        raise SystemExit(f"{run}: no model.pt — is it a finished run directory (fxreplay train / compare writes "
                         "model.pt when the run ends)?")
    state = torch.load(path, map_location="cpu", weights_only=True)
    sums: dict[str, float] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or tensor.ndim < 2 or not tensor.is_floating_point():
            continue
        block = ".".join(name.split(".")[:2]) if name.count(".") >= 2 else name.split(".")[0]
        sums[block] = sums.get(block, 0.0) + float(tensor.double().square().sum())
    return {block: math.sqrt(total) for block, total in sums.items()}


def pinned_boundaries(run: Path) -> list[str]:
    """The split the run's config.yaml pins (``partition.boundaries``), or ``[]``."""
    config = run / "config.yaml"
    if not config.is_file():
        return []
    import yaml  # fxreplay reads its configs with it

    data = yaml.safe_load(config.read_text()) or {}
    return [str(b) for b in (data.get("partition") or {}).get("boundaries") or []]


def spans_of(blocks: list[str], boundaries: list[str], group: int) -> list[list[str]]:
    """Consecutive blocks per column: a new column at each boundary's block, else every ``group`` blocks.

    >>> spans_of(["conv1", "layer1.0", "layer1.1", "layer2.0", "fc"], ["layer1.1", "layer2"], 1)
    [['conv1', 'layer1.0'], ['layer1.1'], ['layer2.0', 'fc']]
    >>> spans_of(["a", "b", "c"], [], 2)
    [['a', 'b'], ['c']]
    """
    if not boundaries:
        return [blocks[i:i + group] for i in range(0, len(blocks), group)]
    starts = set()
    for boundary in boundaries:  # a stage starts at the first block that is the boundary or lies inside it
        first = next((b for b in blocks if b == boundary or b.startswith(boundary + ".")), None)
        if first is None:
            raise SystemExit(f"the split's boundary {boundary!r} is no block of the model (blocks are names up to "
                             "their second dot, e.g. layer1.3; a boundary inside a block cannot be tabled per stage): "
                             "pass --group N for columns of N blocks instead.")
        starts.add(first)
    spans: list[list[str]] = [[]]
    for block in blocks:
        if block in starts and spans[-1]:
            spans.append([])
        spans[-1].append(block)
    return spans


def table(runs: list[Path], group: int | None) -> list[str]:
    """One line per run: its blocks' norms over the first run's, averaged per stage (or group of blocks)."""
    norms = [block_norms(run) for run in runs]
    reference = norms[0]
    blocks = list(reference)
    for run, found in zip(runs[1:], norms[1:]):
        if list(found) != blocks:
            raise SystemExit(f"{run} has other blocks than {runs[0]} ({len(found)} against {len(blocks)}): "
                             "compare runs of the same model.")
    spans = spans_of(blocks, [] if group else pinned_boundaries(runs[0]), group or 1)
    heads = [span[0] if len(span) == 1 else f"{span[0]}..{span[-1]}" for span in spans]
    names = [f"{run.parent.name}/{run.name}" for run in runs]
    width = max(len(name) for name in names)
    lines = [f"{'run':<{width}}  " + "  ".join(heads),
             f"{names[0]:<{width}}  " + "  ".join(
                 f"{sum(reference[b] for b in span) / len(span):>{len(h)}.2f}" for span, h in zip(spans, heads)) + "  (norm)"]
    for name, found in zip(names[1:], norms[1:]):
        cells = [sum(found[b] / reference[b] for b in span) / len(span) for span in spans]
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c:>{len(h)}.2f}" for c, h in zip(cells, heads)) + "  (x first run)")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run directories; the first is the reference (BP)")
    ap.add_argument("--group", type=int, default=None,
                    help="N blocks per column instead of the first run's pinned stages (default: its stages, else 1)")
    args = ap.parse_args(argv)
    if args.group is not None and args.group < 1:
        raise SystemExit("--group must be at least 1")
    print("\n".join(table(args.runs, args.group)))


if __name__ == "__main__":
    main(sys.argv[1:])

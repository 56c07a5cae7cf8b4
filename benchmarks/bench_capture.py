"""Capture: fxreplay's tracer (both modes) against torch.export (non-strict, both modes).

For each model: seconds to capture the train and the eval graph, graph nodes, and whether
each captured eval graph equals the model. Models from tests/zoo_external.py (written the
way people write them elsewhere), torchvision and Hugging Face transformers (if installed).

    python benchmarks/bench_capture.py          # -> benchmarks/results/capture.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the external-style models live with the tests

import zoo_external as Z  # noqa: E402

from fxreplay.models import get  # noqa: E402
from fxreplay.compiler.tracing import trace_modes  # noqa: E402


def models() -> list[tuple[str, Callable[[], nn.Module], tuple[Any, ...]]]:
    import torchvision

    ids = torch.randint(0, 64, (8, 16))
    out = [
        ("resnet56 (zoo)", lambda: get("resnet56"), (torch.randn(32, 3, 32, 32),)),
        ("nanoGPT as written", Z.NanoGPT, (ids,)),
        ("SDPA GPT (reads self.training)", Z.SdpaGPT, (ids,)),
        ("nn.TransformerEncoder classifier", Z.EncoderClassifier, (torch.randint(0, 50, (8, 10)),)),
        ("EMA buffer", Z.EMANet, (torch.randn(8, 8),)),
        ("torchvision swin_t", lambda: torchvision.models.swin_t(num_classes=10), (torch.randn(2, 3, 64, 64),)),
    ]
    try:
        import transformers

        def gpt2() -> nn.Module:
            return transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=64, n_positions=16, n_embd=32, n_layer=4, n_head=2, use_cache=False, bos_token_id=0, eos_token_id=0))

        out.append(("HF GPT2LMHeadModel", gpt2, (torch.randint(0, 64, (4, 16)),)))
    except ImportError:
        pass
    return out


def _same(a: Any, b: Any) -> bool:
    la = torch.utils._pytree.tree_leaves(a)
    lb = torch.utils._pytree.tree_leaves(b)
    return len(la) == len(lb) and all(
        torch.allclose(x, y, atol=1e-5) for x, y in zip(la, lb) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor))


def ours(model: nn.Module, inputs: tuple[Any, ...]) -> tuple[float, int, bool]:
    start = time.perf_counter()
    train, evaluation = trace_modes(model, (), inputs)
    seconds = time.perf_counter() - start
    graph = (evaluation or train)
    model.eval()
    with torch.no_grad():
        got = graph.gm(*inputs)
        if graph.out_spec is not None:
            got = torch.utils._pytree.tree_unflatten(list(got), graph.out_spec)
        ok = _same(got, model(*inputs))
    return seconds, len(train.gm.graph.nodes), ok


def export(model: nn.Module, inputs: tuple[Any, ...]) -> tuple[float, int, bool]:
    start = time.perf_counter()
    model.train()
    train = torch.export.export(model, inputs, strict=False)
    model.eval()
    evaluation = torch.export.export(model, inputs, strict=False)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        ok = _same(evaluation.module()(*inputs), model(*inputs))
    return seconds, len(train.graph.nodes), ok


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(2)
    rows = []
    print(f"{'model':<34} {'fxreplay s':>10} {'nodes':>6} {'eq':>3} {'export s':>9} {'nodes':>6} {'eq':>3} {'ratio':>6}")
    for name, build, inputs in models():
        torch.manual_seed(0)
        model = build()
        a = [ours(model, inputs) for _ in range(3)]
        try:
            b = [export(model, inputs) for _ in range(3)]
        except Exception as exc:  # report, do not hide
            b = [(float("nan"), 0, False)]
            print(f"  torch.export failed on {name}: {type(exc).__name__}: {str(exc)[:120]}")
        row = {
            "model": name,
            "fxreplay_s": statistics.median(r[0] for r in a), "fxreplay_nodes": a[0][1], "fxreplay_eval_equal": a[0][2],
            "export_s": statistics.median(r[0] for r in b), "export_nodes": b[0][1], "export_eval_equal": b[0][2],
        }
        row["export_over_fxreplay"] = row["export_s"] / row["fxreplay_s"]
        rows.append(row)
        print(f"{name:<34} {row['fxreplay_s']:>10.3f} {row['fxreplay_nodes']:>6} {'yes' if row['fxreplay_eval_equal'] else 'NO':>3} "
              f"{row['export_s']:>9.3f} {row['export_nodes']:>6} {'yes' if row['export_eval_equal'] else 'NO':>3} {row['export_over_fxreplay']:>6.1f}")
    out = ROOT / "benchmarks" / "results" / "capture.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

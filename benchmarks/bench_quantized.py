"""How much of a ReLoRA* update survives a merge into quantized weights (bitsandbytes NF4 and int8).

A cycle merges ``Δ = s·B·A`` into a quantized ``W`` by dequantizing, adding in float32 and quantizing again.
The requantization rounds every entry back to the grid, so an update that is small against the grid step is
mostly lost. For a weight of fan-in initialisation and a rank-``r`` update of relative size
``‖Δ‖/‖W‖``, this prints ``‖Q(W + Δ) − (W + Δ)‖ / ‖Δ‖`` (0: the update is kept exactly; >= 1: as much
error as update) and the share of the update's direction that survives, ``⟨Q(W+Δ) − W, Δ⟩ / ‖Δ‖²``.

    python benchmarks/bench_quantized.py            # writes the bench_quantized section of RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import context, table, write_section  # noqa: E402

from relora_ext.quantized import dequantize, requantize_  # noqa: E402


def quantized(kind: str, W: torch.Tensor) -> nn.Module:
    import bitsandbytes as bnb

    out, inp = W.shape
    if kind == "nf4":
        q = bnb.nn.Linear4bit(inp, out, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(W.clone(), requires_grad=False, quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(inp, out, bias=False, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(W.clone(), requires_grad=False, has_fp16_weights=False)
    return q.to("cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    d, r = args.dim, args.rank
    W = torch.randn(d, d, generator=g) / d ** 0.5          # fan-in initialisation
    direction = torch.randn(d, r, generator=g) @ torch.randn(r, d, generator=g)
    rows = []
    for kind in ("nf4", "int8"):
        base = quantized(kind, W)
        W0 = dequantize(base)
        grid = float(torch.linalg.matrix_norm(W0 - W) / torch.linalg.matrix_norm(W))
        for rel in (1e-3, 1e-2, 3e-2, 1e-1, 3e-1):
            delta = direction * (rel * torch.linalg.matrix_norm(W0) / torch.linalg.matrix_norm(direction))
            probe = copy.deepcopy(base)
            requantize_(probe, W0 + delta)
            got = dequantize(probe) - W0
            err = float(torch.linalg.matrix_norm(got - delta) / torch.linalg.matrix_norm(delta))
            kept = float((got * delta).sum() / (delta * delta).sum())
            rows.append((kind, f"{grid:.3f}", f"{rel:g}", f"{err:.3f}", f"{kept:.3f}"))
            print(rows[-1], flush=True)
    text = (f"## Merging into quantized weights (`bench_quantized.py`)\n\n"
            f"`python benchmarks/bench_quantized.py` — {context()}.\n"
            f"W ({d}, {d}) with entries N(0, 1/{d}); Δ of rank {r}, scaled to ‖Δ‖/‖W‖; Q = bitsandbytes "
            "quantization (NF4 block 64; int8 row-wise absmax). Quantization error of W itself: ‖Q(W) − W‖/‖W‖.\n\n"
            + table(["format", "‖Q(W)−W‖/‖W‖", "‖Δ‖/‖W‖", "‖Q(W+Δ)−W−Δ‖/‖Δ‖", "share of Δ kept"], rows)
            + "\n\nA merge keeps an update only when it is large against the grid. Read the rows: an NF4 merge "
            "keeps almost nothing of an update below a few percent of ‖W‖ (its grid error is ~9% of ‖W‖), so "
            "ReLoRA* over 4-bit bases is for memory, with cycles long enough for large updates; int8's grid "
            "(~1% of ‖W‖) keeps most of an update's direction from about 1% of ‖W‖ on.\n")
    if not args.no_write:
        write_section("bench_quantized", text)


if __name__ == "__main__":
    main()

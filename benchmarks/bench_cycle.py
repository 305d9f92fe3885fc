"""Overhead of the ReLoRA* cycle (merge + reset + prune of the whole demo model) as a share of training.

    python benchmarks/bench_cycle.py [--quick] [--write]

The model, data and optimizer are the demo's defaults (relora_ext/demo.py): TinyLlama (dim 256, 4 layers,
4 heads, byte vocabulary by default), every projection wrapped with the demo's r, AdamW (lr 3e-3, betas 0.9/0.95) under
ReLoRAOptimizer (magnitude prune, p = 0.99) and JaggedCosineLR, batches of 16 x 128 bytes of the bundled
corpus. One process; training steps (forward, backward, opt.step, sched.step, zero_grad) and cycles
(``ReLoRAOptimizer.restart()``: the non-finite check, merge + reset and prune of every layer) are
interleaved, median of each after a warm-up. The merge + reset part alone (``merge_and_reset_`` on every
layer) is timed too; prune + checks is the difference. Overhead at ``reset_every = T``:
``t_cycle / (T · t_step + t_cycle)``. `--write` replaces the bench_cycle section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# Passive OpenMP waiting: spinning libgomp threads otherwise steal the 2 cores and add ~8 ms stalls.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _report import context, table, write_section  # noqa: E402
from relora_ext.demo import byte_tokens, lm_batch, build_parser, load_austen  # noqa: E402
from relora_ext.model import lora_layers, wrap  # noqa: E402
from relora_ext.optim import ReLoRAOptimizer  # noqa: E402
from relora_ext.schedule import JaggedCosineLR  # noqa: E402
from relora_ext.tiny_llama import TinyLlama, TinyLlamaConfig  # noqa: E402



def setup(reset_every: int, steps_total: int):
    a = build_parser().parse_args([])  # the demo's defaults
    torch.manual_seed(a.seed)
    cfg = TinyLlamaConfig(vocab_size=256, dim=a.dim, n_layers=a.layers, n_heads=a.heads,
                          max_seq_len=max(a.seq_len, 64))
    model = wrap(TinyLlama(cfg), r=a.rank, alpha=a.alpha)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr,
                              weight_decay=a.weight_decay, betas=(0.9, 0.95))
    opt = ReLoRAOptimizer(inner, model, reset_every=reset_every, prune=a.prune, prune_ratio=a.prune_ratio,
                          seed=a.seed)
    sched = JaggedCosineLR(opt, total_steps=steps_total, warmup_steps=a.warmup, cycle_length=reset_every,
                           restart_warmup_steps=a.restart_warmup, min_lr_ratio=a.min_lr_ratio)
    train_b, _ = load_austen()
    data = byte_tokens(train_b)
    gen = torch.Generator().manual_seed(a.seed)

    def step():
        starts = torch.randint(0, len(data) - a.seq_len - 1, (a.batch_size,), generator=gen)
        x, y = lm_batch(data, starts, a.seq_len)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    layers = lora_layers(model)

    @torch.no_grad()
    def merge_reset():
        for i, (_, layer) in enumerate(layers):
            layer.merge_and_reset_(seed=a.seed, offset=i)

    return a, cfg, model, opt, step, merge_reset


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="5 rounds: a smoke run")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (each: 2 training steps, 1 cycle, "
                   "1 merge+reset)")
    p.add_argument("--reset-every", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rounds = 5 if args.quick else args.rounds
    a, cfg, model, opt, step, merge_reset = setup(args.reset_every, 100 * args.reset_every)
    ctx = context()
    print(ctx, flush=True)
    t0 = time.perf_counter()
    for _ in range(3):  # warm-up; the optimizer state of A and B exists from the first step on
        step()
    opt.restart()
    merge_reset()
    fns = {"step": step, "cycle": opt.restart, "merge+reset": merge_reset}
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k in ("step", "cycle", "step", "merge+reset"):
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    # what every step pays to refuse a stale optimizer (a layer unwrapped or replaced): 1000 calls per sample
    attach = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(1000):
            opt._check_layers_attached("bench")
        attach.append((time.perf_counter() - t) / 1000)
    med_attach = statistics.median(attach)
    n_layers = len(lora_layers(model))
    n_adapter = sum(layer.lora_A.numel() + layer.lora_B.numel() for _, layer in lora_layers(model))
    n_frozen = sum(layer.weight.numel() for _, layer in lora_layers(model))
    rows = []
    for T in sorted({args.reset_every, a.reset_every, 100, 1000}):  # a.reset_every: the demo's 50
        share = med["cycle"] / (T * med["step"] + med["cycle"])
        rows.append([T, f"{med['step'] * 1e3:.1f}", f"{med['cycle'] * 1e3:.2f}",
                     f"{med['merge+reset'] * 1e3:.2f}", f"{(med['cycle'] - med['merge+reset']) * 1e3:.2f}",
                     f"**{share:.4%}**" if T == args.reset_every else f"{share:.4%}",
                     "< 1%" if T == args.reset_every else "-"])
        print(" | ".join(map(str, rows[-1])), flush=True)
    breakeven = 99 * med["cycle"] / med["step"]  # reset_every at which the share is exactly 1%
    cmd = " ".join(["python benchmarks/bench_cycle.py"] + sys.argv[1:])
    text = (
        f"## ReLoRA* cycle overhead on the demo model (issue 3)\n\n"
        f"`{cmd}` — {ctx}; {time.perf_counter() - t0:.0f} s.\n\n"
        f"Demo defaults: TinyLlama dim {cfg.dim}, {cfg.n_layers} layers, hidden {cfg.hidden_dim}, "
        f"{n_layers} wrapped projections (r = {a.rank}; {n_frozen / 1e6:.2f}M frozen weights, "
        f"{n_adapter / 1e6:.2f}M adapter entries), AdamW, magnitude prune p = {a.prune_ratio}, batch "
        f"{a.batch_size} x {a.seq_len}. Training step = forward + backward + `opt.step()` + `sched.step()` + "
        "`zero_grad`; cycle = `ReLoRAOptimizer.restart()` (non-finite check, merge + reset, prune of the "
        f"AdamW state of every A and B). Median of {rounds} interleaved rounds after a warm-up. The CPU is "
        "shared with other jobs: the share, from times measured side by side, is the figure that counts. "
        f"The share reaches 1% only at reset_every ≈ {breakeven:.0f}. Every step also checks that the cycled "
        f"layers and their trained parameters are still in the model (a stale optimizer refuses): "
        f"{med_attach * 1e6:.1f} µs for {n_layers} "
        f"layers, {med_attach / med['step']:.4%} of a step.\n\n"
        + table(["reset_every", "step ms", "cycle ms", "merge+reset ms", "prune+checks ms",
                 "cycle share of training", "goal"], rows)
    )
    print(text)
    if args.write:
        write_section("bench_cycle", text)


if __name__ == "__main__":
    main()

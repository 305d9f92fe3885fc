"""Benchmark LoRALinear's forward+backward against PEFT's LoRA layer and full-rank nn.Linear.

    python benchmarks/bench_lora_layer.py [--quick] [--write]

For tokens T = 4096, in = out = d in {1024, 4096}, r in {8, 64, 128}, fp32 and bf16 weights and inputs,
times one training forward+backward (x requires grad; W frozen for the LoRA layers, trained for the
full-rank nn.Linear; no bias, as in LLaMA projections; alpha = r for both LoRA layers) of:

- ours: relora_ext.LoRALinear (its fused autograd Function, lora._LoRALinearFn);
- plain: the same layer through the unfused expression F.linear(x, W) + s·F.linear(F.linear(x, A), B)
  (LoRALinear's forward before the fused Function; the "before" of the change);
- peft: peft.tuners.lora.Linear wrapping an nn.Linear (same r, alpha, dropout 0, base weight frozen);
- full: nn.Linear trained full rank.

All methods of one (dtype, d) run in one process, interleaved round-robin, median of --repeats after one
warm-up call each (on 256 tokens); ratios are ours / baseline (below 1 is better). Activation memory = bytes of the
unique storages autograd saves for backward (saved_tensors_hooks), parameters excluded, the input x
included (every method saves it). Peak RSS: a fresh subprocess per configuration runs one fwd+bwd and
reports VmHWM minus VmRSS just before it (the peak counter reset through /proc/self/clear_refs).
`--write` replaces the bench_lora_layer section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

# Passive OpenMP waiting: spinning libgomp threads otherwise steal the 2 cores and add ~8 ms stalls.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from _report import context, table, write_section  # noqa: E402
from relora_ext import LoRALinear  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = ("ours", "plain", "peft", "full")


def plain_forward(layer: LoRALinear, x):
    """LoRALinear's forward before the fused Function (unfused autograd composition)."""
    lora = F.linear(F.linear(x, layer.lora_A), layer.lora_B)
    if layer.scaling != 1.0:
        lora = lora * layer.scaling
    return F.linear(x, layer.weight, layer.bias) + lora


def build(method: str, d: int, r: int, dtype, seed: int = 0):
    """(forward callable, module) for one method; the frozen/full weight is the same draw for all."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(d, d, bias=False, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d, d, generator=g) / d ** 0.5)
    if method == "full":
        return base, base
    if method == "peft":
        import logging
        logging.disable(logging.WARNING)
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear

        base.weight.requires_grad_(False)
        cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["base"])
        mod = PeftLinear(base, "default", config=cfg, r=r, lora_alpha=r, lora_dropout=0.0).to(dtype)
        with torch.no_grad():
            mod.lora_B["default"].weight.normal_(0, 0.02, generator=g)
        return mod, mod
    layer = LoRALinear.from_linear(base, r=r)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02, generator=g)
    if method == "plain":
        return (lambda x: plain_forward(layer, x)), layer
    return layer, layer


def train_step(fwd, mod, x, g):
    """One forward+backward, gradients set to None first (so every call allocates them alike)."""
    def step():
        x.grad = None
        for p in mod.parameters():
            p.grad = None
        fwd(x).backward(g)
    return step


def saved_bytes(fwd, mod, x) -> int:
    """Bytes of the unique non-parameter storages autograd saves for backward."""
    params = {p.untyped_storage().data_ptr() for p in mod.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fwd(x)
    del y
    return sum(seen.values())


def timeit(fns: dict, repeats: int, warmups: dict) -> dict:
    """Median seconds of each callable, interleaved round-robin after one warm-up call each.

    ``warmups`` holds the same steps on 256 tokens: kernels and thread pools get set up without paying
    for a multi-second fp32 d=4096 call (large buffers are fresh mmaps on every call anyway).
    """
    for f in warmups.values():
        f()
    times = {k: [] for k in fns}
    keys = list(fns)
    for i in range(repeats):
        for k in keys[i % len(keys):] + keys[:i % len(keys)]:  # rotated, so no method always runs first
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    for k, v in times.items():  # the raw samples, for judging the noise (stdout only)
        print(f"  {k}: " + " ".join(f"{x * 1e3:.0f}" for x in v) + " ms", flush=True)
    return {k: statistics.median(v) for k, v in times.items()}


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s*(\d+) kB", f.read()).group(1))


def mem_child(method: str, d: int, r: int, dtype_name: str, tokens: int) -> None:
    """Fresh process: print the peak RSS (MiB) one fwd+bwd adds on top of the inputs and the layer."""
    dtype = DTYPES[dtype_name]
    fwd, mod = build(method, d, r, dtype)
    x = torch.randn(tokens, d, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, d, dtype=dtype)
    step = train_step(fwd, mod, x, g)
    # warm-up on 8 tokens: one-time kernel/thread-pool set-up must not count as the layer's memory
    xs = torch.randn(8, d, dtype=dtype, requires_grad=True)
    train_step(fwd, mod, xs, torch.randn(8, d, dtype=dtype))()
    del xs
    for q in mod.parameters():
        q.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = status_kib("VmRSS")
    step()
    print(f"{(status_kib('VmHWM') - before) / 1024:.1f}")


def rss_of(method, d, r, dtype_name, tokens, threads) -> float:
    out = subprocess.run([sys.executable, __file__, "--mem-child", method, str(d), str(r), dtype_name,
                          str(tokens), "--threads", str(threads)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench(sizes, ranks, dtypes, tokens, repeats, rss_max_d, plain_max_d, threads):
    rows = []
    mib = 2 ** 20
    for dname in dtypes:
        dtype = DTYPES[dname]
        for d in sizes:
            x = torch.randn(tokens, d, dtype=dtype, requires_grad=True)
            g = torch.randn(tokens, d, dtype=dtype)
            xw = torch.randn(256, d, dtype=dtype, requires_grad=True)
            gw = torch.randn(256, d, dtype=dtype)
            fns, warm, saved, rss = {}, {}, {}, {}
            full_fwd, full_mod = build("full", d, 0, dtype)
            fns[("full", 0)] = train_step(full_fwd, full_mod, x, g)
            warm[("full", 0)] = train_step(full_fwd, full_mod, xw, gw)
            saved[("full", 0)] = saved_bytes(full_fwd, full_mod, x)
            for r in ranks:
                for m in ("ours", "plain", "peft") if d <= plain_max_d else ("ours", "peft"):
                    fwd, mod = build(m, d, r, dtype)
                    fns[(m, r)] = train_step(fwd, mod, x, g)
                    warm[(m, r)] = train_step(fwd, mod, xw, gw)
                    saved[(m, r)] = saved_bytes(fwd, mod, x)
            t = timeit(fns, repeats, warm)
            if d <= rss_max_d:
                for (m, r) in fns:
                    rss[(m, r)] = rss_of(m, d, r, dname, tokens, threads)
            for r in ranks:
                tf = t[("full", 0)]
                to, tpe = t[("ours", r)], t[("peft", r)]
                tp = t.get(("plain", r), float("nan"))
                so, spe, sf = saved[("ours", r)], saved[("peft", r)], saved[("full", 0)]
                fmt_rss = (lambda m, rr=r: f"{rss[(m, rr)]:.0f}" if (m, rr) in rss else "-")
                goal_full = "≤0.80" if r <= d // 8 else "-"
                rows.append([dname, d, r, f"{to * 1e3:.1f}", f"{tp * 1e3:.1f}" if tp == tp else "-", f"{tpe * 1e3:.1f}",
                             f"{tf * 1e3:.1f}", f"{to / tp:.3f}" if tp == tp else "-", f"**{to / tpe:.3f}**", f"**{to / tf:.3f}** ({goal_full})",
                             f"{so / mib:.1f}", f"{spe / mib:.1f}", f"{sf / mib:.1f}", f"**{so / spe:.3f}**",
                             fmt_rss("ours"), fmt_rss("plain"), fmt_rss("peft"),
                             fmt_rss("full") if ("full", 0) in rss else "-"])
                if ("full", 0) in rss:
                    rows[-1][-1] = f"{rss[('full', 0)]:.0f}"
                print(" | ".join(map(str, rows[-1])), flush=True)
    head = ["dtype", "d = in = out", "r", "ours ms", "plain ms", "peft ms", "full-rank ms",
            "ours/plain", "ours/peft (goal ≤0.90)", "ours/full (goal)", "saved MiB ours", "saved peft",
            "saved full", "saved ours/peft (goal ≤1)", "peak RSS MiB ours", "plain", "peft", "full"]
    return head, rows


NOTES = (
    "What bounds the ratios (GEMM work in units of T·d multiply-adds, in = out = d): a LoRA layer, ours or "
    "PEFT's, runs the two frozen-weight products `x Wᵀ` and `G W` (2d) plus six rank-r products `x Aᵀ`, "
    "`h Bᵀ`, `G B`, `(G B) A`, `(G B)ᵀ x`, `Gᵀ h` (6r); full rank runs three d-products (3d, adding "
    "`∂W = Gᵀ x`). So (1) ours/peft can only shrink the non-GEMM part (the T×out temporary, the scale and "
    "add passes, the autograd sum of the two ∂x branches): at r = 8 the two frozen-weight GEMMs are 98-99% of the flops of both, "
    "so 0.90 would need PEFT to spend over 10% of its time outside them (ours/plain measures what "
    "removing that part gains) — no formulation that still computes `x Wᵀ` and `G W` gets there; (2) ours/full ≥ "
    "(2d + 6r)/(3d) = 0.917 at r = d/8 and, even with `x (W + s B A)ᵀ` folding (which loses small updates "
    "in bf16 weights), ≥ (2d + 4r)/(3d) = 0.833: the 0.80 goal cannot hold at r = in/8 (d = 1024, r = 128) "
    "when GEMMs run at equal speed; it is met at the smaller ratios r/d.\n"
)








def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T=512, d=256, r=8/32, 3 repeats: a smoke run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 128])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--rss-max-d", type=int, default=1024,
                   help="peak-RSS subprocesses only for d up to this (each costs a process start)")
    p.add_argument("--plain-max-d", type=int, default=1024,
                   help="time the unfused 'plain' forward only for d up to this (fp32 d=4096 GEMMs take seconds)")
    p.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    p.add_argument("--mem-child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.mem_child:
        m, d, r, dn, tok = args.mem_child
        return mem_child(m, int(d), int(r), dn, int(tok))
    if args.quick:
        args.tokens, args.sizes, args.ranks, args.repeats = 512, [256], [8, 32], 3
    try:
        import peft
        ctx = context(f"peft {peft.__version__}")
    except ImportError:
        ctx = context("peft missing")
    print(ctx, flush=True)
    t0 = time.perf_counter()
    head, rows = bench(args.sizes, args.ranks, args.dtypes, args.tokens, args.repeats, args.rss_max_d,
                       args.plain_max_d, args.threads)
    cmd = " ".join(["python benchmarks/bench_lora_layer.py"] + sys.argv[1:])
    text = (
        f"## LoRALinear forward+backward vs PEFT and full-rank nn.Linear (issue 3)\n\n"
        f"`{cmd}` — {ctx}; {time.perf_counter() - t0:.0f} s.\n\n"
        f"T = {args.tokens} tokens, in = out = d, no bias, alpha = r, x requires grad; one forward + "
        "backward. ours = `LoRALinear` (fused `_LoRALinearFn`); plain = the same layer through the unfused "
        "`F.linear(x, W) + F.linear(F.linear(x, A), B)` (the forward before the fused Function); "
        "peft = `peft.tuners.lora.Linear` around an `nn.Linear`, base frozen; full = `nn.Linear` trained "
        f"full rank ('-' for plain: not timed there, see `--plain-max-d`). Median of {args.repeats} repeats after a warm-up (on 256 tokens), all methods of one (dtype, d) "
        "interleaved in one process. The CPU is shared with other jobs: the ratios, measured side by side, "
        "are the figures that count; absolute times are context. Saved MiB: unique storages autograd keeps "
        "for backward (input x included, parameters excluded). Peak RSS: extra VmHWM of one fwd+bwd in a "
        "fresh process (includes grad x and parameter grads; '-' = not measured, see `--rss-max-d`).\n\n"
        + table(head, rows) + "\n\n" + NOTES
    )
    print(text)
    if args.write:
        write_section("bench_lora_layer", text)


if __name__ == "__main__":
    main()

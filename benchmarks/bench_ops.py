"""Benchmark the native ops against the PyTorch expressions they replace, side by side.

    python benchmarks/bench_ops.py [--quick] [--write]

Each comparison runs in one process, interleaving ours and the baselines, median of `--repeats`
after a warm-up; ratios are ours / baseline (below 1 is faster). Peak memory of prune is measured in
a fresh subprocess per method (peak RSS, VmHWM, minus the peak with the input alone).
`--write` replaces the ops section of benchmarks/RESULTS.md with the tables printed.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import time

# On small VMs, OpenMP threads that spin after a parallel region (libgomp's default) steal the
# cores from the next region and add ~8 ms stalls to torch and to us alike; passive waiting avoids
# that. It must be set before libgomp loads, so before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from _report import context, table, write_section  # noqa: E402
from relora_ext import ops  # noqa: E402



def timeit(fns: dict, repeats: int, sync=lambda: None) -> dict:
    """Median seconds of each callable, interleaved round-robin after one warm-up call each."""
    for f in fns.values():
        f()
    sync()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def machine_peaks(repeats: int, device, sync) -> tuple[float, dict]:
    """Memory bandwidth (bytes/s, a 512 MiB copy) and GEMM peaks (flop/s of a 4096^3 torch.mm) for
    fp32 and bf16 inputs; fp16 inputs are held to the fp32 peak (both we and a CPU convert them)."""
    src = torch.empty(128 << 20, device=device)
    dst = torch.empty_like(src)
    a, b = torch.randn(4096, 4096, device=device), torch.randn(4096, 4096, device=device)
    a16, b16 = a.bfloat16(), b.bfloat16()
    t = timeit({"copy": lambda: dst.copy_(src), "mm": lambda: torch.mm(a, b),
                "mm16": lambda: torch.mm(a16, b16)}, repeats, sync)
    peak = {torch.float32: 2 * 4096 ** 3 / t["mm"], torch.bfloat16: 2 * 4096 ** 3 / t["mm16"]}
    peak[torch.float16] = peak[torch.float32] if device == "cpu" else peak[torch.bfloat16]
    return 2 * src.numel() * 4 / t["copy"], peak


# ------------------------------------------------------------------------------------------------
# merge


def bench_merge(shapes, ranks, dtypes, repeats, bandwidth, peak, device, sync):
    rows = []
    for (out, in_) in shapes:
        for dtype in dtypes:
            for r in ranks:
                g = torch.Generator().manual_seed(0)
                W0 = torch.randn(out, in_, generator=g).to(device, dtype)
                A = torch.randn(r, in_, generator=g).to(device, dtype)
                B = (torch.randn(out, r, generator=g) * 1e-2).to(device, dtype)
                s = 1.0 / r
                W = W0.clone()
                fns = {
                    "ours": lambda: ops.merge_(W, A, B, s),
                    "addmm_": lambda: W.addmm_(B, A, alpha=s),
                    "+= s*(B@A)": lambda: W.add_(s * (B @ A)),
                }
                t = timeit(fns, repeats, sync)
                # Error of one merge against float64, ours vs torch's addmm_ in W's dtype.
                exact = W0.double() + s * (B.double() @ A.double())
                Wo, Wt, Wp = W0.clone(), W0.clone(), W0.clone()
                ops.merge_(Wo, A, B, s)
                Wt.addmm_(B, A, alpha=s)
                Wp.add_(s * (B @ A))
                err = {k: (v.double() - exact).abs().max().item()
                       for k, v in (("ours", Wo), ("addmm_", Wt), ("+=", Wp))}
                # Share of entries that differ from the correctly rounded exact result.
                rne = exact.to(dtype)
                wrong = {k: (v != rne).double().mean().item()
                         for k, v in (("ours", Wo), ("addmm_", Wt), ("+=", Wp))}
                nbytes = 2 * W.numel() * W.element_size() + (A.numel() + B.numel()) * A.element_size()
                bound = max(nbytes / bandwidth, 2 * out * in_ * r / peak[dtype])
                best = min(t["addmm_"], t["+= s*(B@A)"])
                rows.append([f"{out}x{in_}", str(dtype).replace("torch.", ""), r,
                             f"{t['ours'] * 1e3:.2f}", f"{t['addmm_'] * 1e3:.2f}",
                             f"{t['+= s*(B@A)'] * 1e3:.2f}", f"{t['ours'] / best:.2f}",
                             f"{bound / t['ours']:.0%}", f"{err['ours']:.2e}", f"{err['addmm_']:.2e}",
                             f"{err['+=']:.2e}", f"{wrong['ours']:.3%}",
                             f"{wrong['addmm_']:.3%}", f"{wrong['+=']:.3%}"])
                print(" | ".join(map(str, rows[-1])), flush=True)
    head = ["W", "dtype", "r", "ours ms", "addmm_ ms", "+= s*(B@A) ms", "ours/best torch",
            "roofline reached", "max err ours", "max err addmm_", "max err +=",
            "misrounded ours", "misrounded addmm_", "misrounded +="]
    return head, rows


# ------------------------------------------------------------------------------------------------
# prune


def quantile_prune_(x, ratio):
    """The reference ReLoRA code's magnitude pruning: a torch.quantile threshold."""
    thr = torch.quantile(x.abs().flatten(), ratio)
    x.mul_(x.abs() > thr)


def kthvalue_prune_(x, ratio):
    """A torch.kthvalue threshold (exact count only without ties)."""
    n = x.numel()
    k = n - math.floor(ratio * n)
    thr = torch.kthvalue(x.abs().flatten(), n - k + 1).values
    x.mul_(x.abs() >= thr)


PRUNERS = {"ours": lambda x: ops.prune_(x, 0.99), "kthvalue": lambda x: kthvalue_prune_(x, 0.99),
           "quantile": lambda x: quantile_prune_(x, 0.99)}


def peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: a child started from this big
    benchmark process inherits the parent's ru_maxrss across fork+exec, VmHWM starts anew at exec."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s*(\d+) kB", f.read()).group(1)) / 1024


def prune_child(method: str, n: int) -> None:
    """Run in a fresh process: print the extra peak RSS (MiB) that one prune needs."""
    x = torch.randn(n)
    base = peak_rss_mib()
    try:
        PRUNERS[method](x)
        print(f"{peak_rss_mib() - base:.1f}")
    except RuntimeError as e:
        print("refused: " + str(e).splitlines()[0][:60])


def bench_prune(sizes, repeats, device, sync):
    rows = []
    for n in sizes:
        x0 = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)
        x = x0.clone()
        fns = {}
        for name, f in PRUNERS.items():
            try:
                f(x0.clone())
                fns[name] = (lambda f=f: (x.copy_(x0), f(x)))
            except RuntimeError:
                pass
        fns["copy only"] = lambda: x.copy_(x0)  # subtracted: every call restores x first
        t = timeit(fns, repeats, sync)
        ms = {k: (t[k] - t["copy only"]) * 1e3 for k in fns if k != "copy only"}
        mem = {}
        for name in PRUNERS:
            if device == "cpu":
                mem[name] = subprocess.run(
                    [sys.executable, __file__, "--prune-child", name, str(n)],
                    capture_output=True, text=True, check=True).stdout.strip()
            elif name in ms:
                x.copy_(x0)
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                PRUNERS[name](x)
                mem[name] = f"{(torch.cuda.max_memory_allocated() - base) / 2 ** 20:.1f}"
            else:
                mem[name] = "-"
        fmt = lambda k: f"{ms[k]:.1f}" if k in ms else "refused"
        ratio = lambda k: f"{ms['ours'] / ms[k]:.3f}" if k in ms else "-"
        rows.append([f"{n / 2 ** 20:.0f}M", fmt("ours"), fmt("kthvalue"), fmt("quantile"),
                     ratio("kthvalue"), ratio("quantile"), mem["ours"], mem["kthvalue"],
                     mem["quantile"]])
        print(" | ".join(rows[-1]), flush=True)
    head = ["n (fp32)", "ours ms", "kthvalue ms", "quantile ms", "ours/kthvalue", "ours/quantile",
            "extra peak MiB ours", "kthvalue", "quantile"]
    return head, rows


# ------------------------------------------------------------------------------------------------
# reset


def bench_reset(shapes, repeats, device, sync):
    rows = []
    for (out, in_, r) in shapes:
        A, B = torch.empty(r, in_, device=device), torch.empty(out, r, device=device)
        t = timeit({"ours": lambda: ops.reset_(A, B, std=0.02, seed=0, offset=1),
                    "normal_+zero_": lambda: (A.normal_(0, 0.02), B.zero_())}, repeats, sync)
        rows.append([f"A ({r}, {in_}), B ({out}, {r})", f"{t['ours'] * 1e3:.3f}",
                     f"{t['normal_+zero_'] * 1e3:.3f}", f"{t['ours'] / t['normal_+zero_']:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    return ["shapes (fp32)", "ours ms", "A.normal_(); B.zero_() ms", "ours/torch"], rows


# ------------------------------------------------------------------------------------------------






def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the portable ATen path")
    p.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    p.add_argument("--prune-child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.prune_child:
        return prune_child(args.prune_child[0], int(args.prune_child[1]))

    if args.quick:
        shapes, ranks, sizes, reps = [(512, 768)], [8, 64], [1 << 20], 3
    else:
        shapes, ranks, sizes, reps = [(4096, 4096), (2048, 5632)], [8, 64, 256], \
            [1 << 20, 16 << 20, 64 << 20], args.repeats
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    bandwidth, peak = machine_peaks(reps, device, sync)
    ctx = context(*([torch.cuda.get_device_name()] if device != "cpu" else []))
    peaks = (f"memory bandwidth {bandwidth / 1e9:.1f} GB/s (a 512 MiB copy), GEMM peak "
             f"{peak[torch.float32] / 1e9:.0f} GFLOP/s fp32 and {peak[torch.bfloat16] / 1e9:.0f} "
             "GFLOP/s bf16 (a 4096³ `torch.mm`)")
    print(f"{ctx}\n{peaks}")
    merge = bench_merge(shapes, ranks, [torch.float32, torch.bfloat16, torch.float16], reps,
                        bandwidth, peak, device, sync)
    prune = bench_prune(sizes, reps, device, sync)
    reset = bench_reset([(4096, 4096, 64), (2048, 5632, 256)] if not args.quick
                        else [(512, 768, 8)], reps, device, sync)
    cmd = " ".join(["python benchmarks/bench_ops.py"] + sys.argv[1:])
    text = "\n\n".join([
        f"## Native ops (issue 2), {device}\n\n`{cmd}` — {ctx}.\n"
        f"Measured in the same run: {peaks}. Median of {reps} interleaved repeats.",
        "### merge: `W += s·B·A` (A, B in W's dtype)\n\n"
        "Roofline reached = max(bytes moved / bandwidth, flops / GEMM peak of the dtype) / our time. "
        "Errors: max |W − exact| after one merge, exact in float64; misrounded: share of entries "
        "that differ from the exact result rounded once to nearest.\n\n" + table(*merge),
        "### prune: magnitude, p = 0.99, fp32\n\nTimes exclude restoring the input. Extra peak "
        "MiB: peak RSS of a fresh process minus its RSS with the input alone.\n\n" + table(*prune),
        "### reset: `B ← 0, A ← N(0, σ²)`\n\n" + table(*reset),
    ])
    print(text)
    if args.write:
        write_section(f"bench_ops:{device}", text)  # one section of RESULTS.md per device


if __name__ == "__main__":
    main()

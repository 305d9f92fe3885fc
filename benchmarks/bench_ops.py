"""Benchmark the native ops against the PyTorch expressions they replace, side by side.

    python benchmarks/bench_ops.py [--quick] [--write] [--levels default,avx2,...]

On CPU, every instruction-set level this machine can run (relora_ext.cpu_capability(); default: all of
them) is measured in its own process, started with RELORA_CPU_CAPABILITY=<level> and torch held to the
same instructions (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS), as on a CPU of
that level. Each comparison runs in one process, interleaving ours and the baselines, median of
`--repeats` after a warm-up; ratios are ours / baseline (below 1 is faster). A baseline whose first
call (timed on a slice of W) projects to more than `--budget` seconds is not repeated. Peak memory of
prune is measured in a fresh subprocess per method (peak RSS, VmHWM, minus the peak with the input
alone), except with --quick. `--write` replaces the ops section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

import relora_ext
from _report import context, cpu_model, table, write_section
from relora_ext import _C_testing, ops  # _C_testing: the level / merge-path switches (test-only module)

# torch held to a level's instructions, as on a CPU that has no more. MKL ignores MKL_ENABLE_INSTRUCTIONS
# on AMD CPUs; MKL_CBWR=COMPATIBLE holds it to its SSE2 code on any x86 CPU (a 2048^3 fp32 mm: 2.3x
# slower on a Zen 5; MKL_CBWR=AVX2 or SSE4_2 changed nothing there, so avx2 and up need no such hold).
TORCH_CAPS = {
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                "MKL_CBWR": "COMPATIBLE"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx512_bf16": {},
}


def timeit(fns: dict, repeats: int, sync=lambda: None) -> dict:
    """Median seconds of each callable, interleaved round-robin after one warm-up call each."""
    for f in fns.values():
        f()
    sync()
    if not fns:
        return {}
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def machine_peaks(repeats: int, device, sync, small=False) -> tuple[float, dict]:
    """Memory bandwidth (bytes/s, a 512 MiB copy; 64 MiB if small) and GEMM peaks (flop/s of a 4096^3
    torch.mm; 1024^3 if small) for fp32 and bf16 inputs; fp16 inputs are held to the fp32 peak (both we
    and a CPU convert them). The bf16 product uses fp32 when torch's own bf16 GEMM is slower (a level
    without bf16 instructions: oneDNN's fallback is a reference loop)."""
    n = 1024 if small else 4096
    src = torch.empty((16 if small else 128) << 20, device=device)
    dst = torch.empty_like(src)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a16, b16 = a[:256, :256].bfloat16(), b[:256, :256].bfloat16()
    t0 = time.perf_counter()
    torch.mm(a16, b16)
    slow16 = (time.perf_counter() - t0) * (n / 256) ** 3 > 2.0
    a16, b16 = a.bfloat16(), b.bfloat16()
    t = timeit({"copy": lambda: dst.copy_(src), "mm": lambda: torch.mm(a, b),
                **({} if slow16 else {"mm16": lambda: torch.mm(a16, b16)})}, repeats, sync)
    peak = {torch.float32: 2 * n ** 3 / t["mm"], torch.bfloat16: 2 * n ** 3 / t.get("mm16", t["mm"])}
    peak[torch.float16] = peak[torch.float32] if device == "cpu" else peak[torch.bfloat16]
    return 2 * src.numel() * 4 / t["copy"], peak


# ------------------------------------------------------------------------------------------------
# merge


def bench_merge(shapes, ranks, dtypes, repeats, bandwidth, peak, device, sync, budget):
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
                path = merge_path(dtype, r) if device == "cpu" else "portable"

                def forced(p):
                    def f(W=W):
                        _C_testing.set_merge_path(p)
                        try:
                            ops.merge_(W, A, B, s)
                        finally:
                            _C_testing.set_merge_path("auto")
                    return f

                torch_exprs = {
                    "addmm_": lambda W=W, B=B: W.addmm_(B, A, alpha=s),
                    "+= s*(B@A)": lambda W=W, B=B: W.add_(s * (B @ A)),
                }
                if dtype != torch.float32:  # one rounding through fp32 (torch's BLAS in fp32)
                    torch_exprs["fp32 round trip"] = lambda W=W, B=B: W.copy_(
                        torch.addmm(W.float(), B.float(), A.float(), alpha=s))
                fns = {"ours": lambda: ops.merge_(W, A, B, s)}
                if device == "cpu":
                    fns["other path"] = forced("blas" if path == "kernel" else "kernel")
                skipped = {}
                for name, f in torch_exprs.items():  # project the first call from a slice of W
                    m = min(out, 128)
                    Ws, Bs = W0[:m].clone(), B[:m]
                    t0 = time.perf_counter()
                    f(Ws, Bs)
                    sync()
                    est = (time.perf_counter() - t0) * out / m
                    if est > budget:
                        skipped[name] = est
                    else:
                        fns[name] = f
                t = timeit(fns, repeats, sync)
                # Error of one merge against float64, ours vs torch's expressions in W's dtype.
                exact = W0.double() + s * (B.double() @ A.double())
                rne = exact.to(dtype)
                err, wrong = {}, {}
                for name, f in [("ours", lambda W: ops.merge_(W, A, B, s)),
                                *[(k, v) for k, v in torch_exprs.items() if k not in skipped]]:
                    Wx = W0.clone()
                    f(Wx) if name == "ours" else f(Wx, B)
                    err[name] = (Wx.double() - exact).abs().max().item()
                    wrong[name] = (Wx != rne).double().mean().item()
                nbytes = 2 * W.numel() * W.element_size() + (A.numel() + B.numel()) * A.element_size()
                bound = max(nbytes / bandwidth, 2 * out * in_ * r / peak[dtype])
                timed = [k for k in torch_exprs if k not in skipped]
                best = min(timed, key=lambda k: t[k]) if timed else None
                ms = lambda k: (f"{t[k] * 1e3:.2f}" if k in t else
                                f"> {budget:.0f} s (≈{skipped[k]:.0f} s)" if k in skipped else "-")
                pct = lambda k: f"{wrong[k]:.3%}" if k in wrong else "-"
                rows.append([f"{out}x{in_}", str(dtype).replace("torch.", ""), r, path, ms("ours"),
                             ms("other path"), ms("addmm_"), ms("+= s*(B@A)"), ms("fp32 round trip"),
                             f"{t['ours'] / t['addmm_']:.2f}" if "addmm_" in t else "-",
                             f"{t['ours'] / t[best]:.2f} ({best})" if best else "-",
                             f"{bound / t['ours']:.0%}", f"{err['ours']:.2e}",
                             f"{err['addmm_']:.2e}" if "addmm_" in err else "-",
                             pct("ours"), pct("addmm_"), pct("+= s*(B@A)"), pct("fp32 round trip")])
                print(" | ".join(map(str, rows[-1])), flush=True)
    head = ["W", "dtype", "r", "path", "ours ms", "other path ms", "addmm_ ms", "+= s*(B@A) ms",
            "fp32 round trip ms", "ours/addmm_", "ours/best torch", "roofline reached", "max err ours",
            "max err addmm_", "misrounded ours", "misrounded addmm_", "misrounded +=",
            "misrounded fp32 round trip"]
    return head, rows


def merge_path(dtype, r) -> str:
    """The path merge_ takes on CPU at the level that runs (csrc/ops/cpu/cycle_kernels.cpp)."""
    return "blas" if _C_testing.merge_takes_blas(r) else "kernel"


# ------------------------------------------------------------------------------------------------
# prune


def quantile_prune_(x, ratio):
    """The reference ReLoRA code's magnitude pruning: a torch.quantile threshold."""
    thr = torch.quantile(x.abs().flatten(), ratio)
    x.mul_(x.abs() > thr)


def kthvalue_prune_(x, ratio):
    """A torch.kthvalue threshold (exact count only without ties)."""
    n = x.numel()
    k = ops.keep_count(n, ratio)
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


def bench_prune(sizes, repeats, device, sync, memory=True):
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
            if not memory:
                mem[name] = "-"
            elif device == "cpu":
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






def run_level(args, device) -> dict:
    """Every benchmark at the level that runs in this process; the tables and the context."""
    if args.quick:
        shapes, ranks, sizes, reps = [(512, 768)], [8, 64], [1 << 20], 3
        reset_shapes = [(512, 768, 8)]
    else:
        shapes, ranks, sizes, reps = [(4096, 4096), (2048, 5632)], [8, 64, 256], \
            [1 << 20, 16 << 20, 64 << 20], args.repeats
        reset_shapes = [(4096, 4096, 64), (2048, 5632, 256)]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    bandwidth, peak = machine_peaks(reps, device, sync, small=args.quick)
    level = relora_ext.cpu_capability()
    extra = [torch.cuda.get_device_name()] if device != "cpu" else [
        f"relora level {level} (torch: ATen {torch.backends.cpu.get_cpu_capability()}"
        + "".join(f", {k}={v}" for k, v in TORCH_CAPS.get(level, {}).items() if k != "ATEN_CPU_CAPABILITY")
        + ")"]
    ctx = context(*extra)
    size = 1024 if args.quick else 4096
    peaks = (f"memory bandwidth {bandwidth / 1e9:.1f} GB/s (a copy), GEMM peak "
             f"{peak[torch.float32] / 1e9:.0f} GFLOP/s fp32 and {peak[torch.bfloat16] / 1e9:.0f} "
             f"GFLOP/s bf16 (a {size}³ `torch.mm`)")
    print(f"{ctx}\n{peaks}", flush=True)
    return {
        "level": level, "ctx": ctx, "peaks": peaks, "reps": reps,
        "merge": bench_merge(shapes, ranks, [torch.float32, torch.bfloat16, torch.float16], reps,
                             bandwidth, peak, device, sync, args.budget),
        "prune": bench_prune(sizes, reps, device, sync, memory=not args.quick),
        "reset": bench_reset(reset_shapes, reps, device, sync),
    }


def level_text(res) -> str:
    return "\n\n".join([
        f"### level `{res['level']}`\n\n{res['ctx']}.\nMeasured in the same run: {res['peaks']}. "
        f"Median of {res['reps']} interleaved repeats.",
        "#### merge: `W += s·B·A` (A, B in W's dtype)\n\n" + table(*res["merge"]),
        "#### prune: magnitude, p = 0.99, fp32\n\n" + table(*res["prune"]),
        "#### reset: `B ← 0, A ← N(0, σ²)`\n\n" + table(*res["reset"]),
    ])


def summary(results) -> str:
    """One line per level: the worst ratios of the goals (issue 10)."""
    head = ["level", "merge fp32: worst ours/addmm_", "merge bf16: worst ours/best torch",
            "bf16 misrounded ours (max)", "prune/kthvalue (largest n)", "reset/normal_ (worst)"]
    rows = []
    for res in results:
        h, m = res["merge"]
        col = {k: i for i, k in enumerate(h)}
        f32 = [float(r[col["ours/addmm_"]]) for r in m if r[1] == "float32" and r[col["ours/addmm_"]] != "-"]
        b16 = [float(r[col["ours/best torch"]].split()[0]) for r in m
               if r[1] == "bfloat16" and r[col["ours/best torch"]] != "-"]
        mis = [float(r[col["misrounded ours"]].rstrip("%")) for r in m if r[1] == "bfloat16"]
        p = res["prune"][1][-1][4]
        rs = max(float(r[3]) for r in res["reset"][1])
        rows.append([res["level"], f"{max(f32):.2f}" if f32 else "-", f"{max(b16):.2f}" if b16 else "-",
                     f"{max(mis):.3f}%" if mis else "-", p, f"{rs:.2f}"])
    return table(head, rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes, for a smoke run (under a minute)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the portable ATen path")
    p.add_argument("--levels", default=None, help="comma-separated CPU levels (default: all this CPU runs)")
    p.add_argument("--budget", type=float, default=3.0, help="seconds: slower baselines are not repeated")
    p.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    p.add_argument("--prune-child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    p.add_argument("--level-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.prune_child:
        return prune_child(args.prune_child[0], int(args.prune_child[1]))
    device = args.device
    if args.level_child:
        print("RESULT " + json.dumps(run_level(args, device)), flush=True)
        return

    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    if device == "cpu":
        levels = args.levels.split(",") if args.levels else list(_C_testing.cpu_capabilities())
        results = []
        for level in levels:
            env = dict(os.environ, RELORA_CPU_CAPABILITY=level, **TORCH_CAPS[level])
            child = [a for a in sys.argv[1:] if a != "--write"]
            proc = subprocess.Popen([sys.executable, __file__, "--level-child", *child], env=env,
                                    stdout=subprocess.PIPE, text=True)
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    results.append(json.loads(line[7:]))
                else:
                    print(line, end="", flush=True)
            if proc.wait() != 0:
                raise SystemExit(f"bench_ops: level {level} failed")
    else:
        results = [run_level(args, device)]
    cmd = " ".join(["python benchmarks/bench_ops.py"] + sys.argv[1:])
    cpu = cpu_model()
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            have = set(next(line for line in f if line.startswith("flags")).split()[2:])
        flags = ", ".join(x for x in ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                                      "avx512_bf16", "amx_bf16"] if x in have)
    except (OSError, StopIteration):
        pass
    paths = ("Merge path on CPU (`path` column, csrc/ops/cpu/cycle_kernels.cpp), chosen from these "
             "measurements: `kernel` (our fused product + one-rounding epilogue) for every dtype and rank "
             "from avx2 up, and at the `default` level (SSE2 mul + add, no FMA) wherever torch's BLAS has no wider vectors than ours, as here with MKL "
             "held to SSE2; `blas` (torch's BLAS product on 256×256 tiles + our one-rounding epilogue) at "
             "the `default` level for r ≥ 32 on a CPU with AVX whose MKL is not held (`MKL_CBWR=COMPATIBLE`), where "
             "torch's BLAS outruns our SSE2 product (about 2x on this CPU with MKL unheld: `addmm_` 41 ms against our kernel's 81 ms at 4096², r = 256). At levels "
             "without FMA (`default`), an fp32 W with a power-of-two scale of magnitude ≤ 1 (alpha/r, both powers of "
             "two; every case here, s = 1/r) has A packed already scaled (exact while every product stays a normal "
             "float) and the micro-kernel adds its sums into W, one add; any other scale: an fp32 mul + add where "
             "exact, else double. "
             "`other path ms` is the path not taken, forced, for comparison.")
    text = "\n\n".join([
        f"## Native ops (issues 2, 10), {device}\n\n`{cmd}` — {cpu} ({flags}); "
        f"{time.perf_counter() - t0:.0f} s; 1-min load average at start {load0:.2f} (2 cores shared with "
        "other jobs: a parallel region can wait a scheduler tick, ~8 ms, for a descheduled worker).\n" + (
            "Each level runs in its own process with `RELORA_CPU_CAPABILITY=<level>`, torch held to the "
            "same instructions (`ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`, `MKL_ENABLE_INSTRUCTIONS`, and "
            "at `default` `MKL_CBWR=COMPATIBLE`, MKL's SSE2 code: MKL ignores `MKL_ENABLE_INSTRUCTIONS` on "
            "this AMD CPU; `MKL_CBWR=AVX2` measured the same as MKL unheld, so no hold is needed from avx2 "
            "up). Roofline reached = max(bytes moved / "
            "bandwidth, flops / GEMM peak of the dtype) / our time. Errors: max |W − exact| after one merge, "
            "exact in float64; misrounded: share of entries that differ from the exact result rounded once "
            "to nearest. Prune times exclude restoring the input; extra peak MiB: peak RSS of a fresh "
            "process minus its RSS with the input alone." if device == "cpu" else ""),
        "### Summary per level\n\n" + summary(results),
        paths,
        *[level_text(r) for r in results],
    ])
    print(text)
    if args.write:
        write_section(f"bench_ops:{device}", text)  # one section of RESULTS.md per device


if __name__ == "__main__":
    main()

"""One whole training step of a LLaMA-shaped model: full rank vs LoRA (PEFT) vs ReLoRA* (relora_ext), eager
and torch.compile, with peak memory; and ReLoRAOptimizer.step()'s own overhead over the wrapped AdamW.

    python benchmarks/bench_step.py --device cuda            # LLaMA-130M shape (dim 768, 12 layers, 12 heads)
    python benchmarks/bench_step.py --preset cpu --write     # a small CPU shape (dim 256, 4 layers)

A step = forward (bf16 autocast by default; ``--dtype fp32`` for none) + cross-entropy + backward +
optimizer step + zero_grad, on a fixed batch of ``--batch`` x ``--seq`` tokens (vocab 32000 as LLaMA's).
Methods (every one trains the embeddings, norms and head; the seven projections of every block are):

- ``full``: trained full rank (AdamW on every parameter);
- ``peft``: PEFT LoRA adapters (r, alpha = r), base weights frozen (fp32);
- ``relora``: relora_ext.wrap + ReLoRAOptimizer(AdamW) (cycle every ``--reset-every`` steps: not inside
  the timed steps, its cost is bench_cycle's), frozen weights fp32;
- ``relora_bf16w``: the same with ``weight_dtype=torch.bfloat16`` (frozen weights stored in bf16);
- ``sst`` / ``sst_bf16w``: SST (``wrap(method="sst")``: Σ, r sampled singular-vector pairs trained, per-step
  renormalisation in ReLoRAOptimizer.step), the frozen singular vectors in fp32 / bf16 (opt-in methods).

Timing: every configuration is built first; then rounds of ``--steps`` steps per configuration, interleaved
(rotated order), ``--repeats`` rounds; the median per-step time of each, the ratio to ``full`` of the same
mode. Peak memory: CUDA: ``torch.cuda.max_memory_allocated`` during the configuration's own warm-up steps
minus what was allocated before it was built (so: its weights, gradients, optimizer state, activations);
CPU: not measured ('-'). ``--compile`` adds torch.compile'd models (fullgraph for ``full`` and ``relora*``;
PEFT is compiled without fullgraph).

The optimizer overhead table: for the ReLoRA* model, with gradients in place, the median time of
``ReLoRAOptimizer.step()`` vs the wrapped ``AdamW.step()`` alone (interleaved, same parameters; no cycle).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

# No OMP_WAIT_POLICY here: the default policy is what users run, and PASSIVE (workers asleep between
# parallel regions) taxes a step of many small ops, SST's, the more (README: one OpenMP runtime).
import torch
import torch.nn.functional as F

from _report import context, table, write_section
import relora_ext
from relora_ext.tiny_llama import TinyLlama, TinyLlamaConfig

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRESETS = {
    "llama130m": dict(dim=768, layers=12, heads=12, seq=256, batch=32, vocab=32000),
    "cpu": dict(dim=256, layers=4, heads=4, seq=128, batch=4, vocab=32000),
    "tiny": dict(dim=64, layers=2, heads=2, seq=32, batch=2, vocab=512),
}


def build(method, cfg, r, device, seed=0):
    """(model, optimizer) for one method, all from the same initial weights."""
    torch.manual_seed(seed)
    mcfg = TinyLlamaConfig(vocab_size=cfg["vocab"], dim=cfg["dim"], n_layers=cfg["layers"], n_heads=cfg["heads"],
                           max_seq_len=cfg["seq"])
    model = TinyLlama(mcfg).to(device)
    adamw = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    if method == "full":
        return model, torch.optim.AdamW(model.parameters(), **adamw)
    if method == "peft":
        import logging

        logging.disable(logging.WARNING)
        from peft import LoraConfig, inject_adapter_in_model

        model = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=PROJ), model)
        for name, p in model.named_parameters():  # train what relora_ext trains: all but the adapted weights
            p.requires_grad_("lora_" in name or "base_layer" not in name)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **adamw)
    if method in ("sst", "sst_bf16w"):  # SST: an iteration every --reset-every steps, not inside the timed ones
        relora_ext.wrap(model, r=r, method="sst", weight_dtype=torch.bfloat16 if method == "sst_bf16w" else None)
        inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **adamw)
        return model, relora_ext.ReLoRAOptimizer(inner, model, reset_every=10**6, seed=seed)
    relora_ext.wrap(model, r=r)
    if method == "relora_bf16w":
        # what LoRALinear(weight_dtype=torch.bfloat16) / from_linear(..., weight_dtype=...) store
        for _, layer in relora_ext.lora_layers(model):
            layer.weight.data = layer.weight.data.to(torch.bfloat16)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **adamw)
    return model, relora_ext.ReLoRAOptimizer(inner, model, reset_every=10**6, seed=seed)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(model, opt, ids, amp, compiled):
    fwd = model
    if compiled:
        peft_model = any("lora_A" in n and "default" in n for n, _ in model.named_parameters())
        fwd = torch.compile(model, fullgraph=not peft_model)
    dev = ids.device.type

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
            logits = fwd(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def bench(args, cfg, device):
    amp = args.dtype == "bf16-autocast"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"] + 1), generator=g).to(device)
    modes = ["eager"] + (["compile"] if args.compile else [])
    steps, mem, info = {}, {}, {}
    for mode in modes:
        for m in args.methods:
            if mode == "compile" and args.compile_methods and m not in args.compile_methods:
                continue
            key = (m, mode)
            sync(device)
            before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            model, opt = build(m, cfg, args.r, device)
            n = sum(p.numel() for p in model.parameters())
            nt = sum(p.numel() for p in model.parameters() if p.requires_grad)
            info[key] = (n, nt)
            st = make_step(model, opt, ids, amp, mode == "compile")
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                st()
            sync(device)
            print(f"  built+warmed {m}/{mode}: {n / 1e6:.1f}M params, {nt / 1e6:.1f}M trainable, "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
            if device.type == "cuda":
                mem[key] = (torch.cuda.max_memory_allocated() - before) / 2**20
            steps[key] = (st, model, opt)
    times = {k: [] for k in steps}
    keys = list(steps)
    for i in range(args.repeats):
        for k in keys[i % len(keys):] + keys[:i % len(keys)]:
            st = steps[k][0]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                st()
            sync(device)
            times[k].append((time.perf_counter() - t0) / args.steps)
    for k, v in times.items():
        print(f"  {k[0]}/{k[1]}: " + " ".join(f"{x * 1e3:.1f}" for x in v) + " ms/step", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for mode in modes:
        full = med.get(("full", mode))
        for m in args.methods:
            k = (m, mode)
            if k not in med:
                continue
            fm = mem.get(("full", mode))
            rel = times.get(("relora", mode))
            # rounds are interleaved, so the per-round ratio cancels most of a shared machine's drift
            per_round = statistics.median(a / b for a, b in zip(times[k], rel)) if rel else None
            rows.append([m, mode, f"{info[k][0] / 1e6:.1f}", f"{info[k][1] / 1e6:.1f}", f"{med[k] * 1e3:.2f}",
                         f"{min(times[k]) * 1e3:.2f}",
                         f"**{med[k] / full:.3f}**" if full else "-",
                         f"{per_round:.3f}" if per_round else "-",
                         f"{mem[k]:.0f}" if k in mem else "-",
                         f"{mem[k] / fm:.3f}" if k in mem and fm else "-"])
    head = ["method", "mode", "params M", "trainable M", "ms/step", "min ms/step (other jobs only add time)",
            "step / full-rank step (goal < 1)",
            "step / ReLoRA* step (median per round; SST goal <= 1.1)", "peak MiB", "peak / full"]
    overhead = optimizer_overhead(args, steps, device)
    return head, rows, overhead


def optimizer_overhead(args, steps, device):
    """ReLoRAOptimizer.step() vs the wrapped AdamW.step(), gradients in place, interleaved."""
    out = []
    for (m, mode), (st, model, opt) in steps.items():
        if mode != "eager" or not isinstance(opt, relora_ext.ReLoRAOptimizer):
            continue
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p) * 1e-3
        inner = opt.optimizer if hasattr(opt, "optimizer") else None
        if inner is None:
            continue
        fns = {"ReLoRAOptimizer.step": opt.step, "AdamW.step": inner.step}
        for f in fns.values():
            f()
        ts = {k: [] for k in fns}
        n = max(3, args.steps)
        for i in range(max(5, args.repeats)):
            for k, f in (list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]):
                sync(device)
                t0 = time.perf_counter()
                for _ in range(n):
                    f()
                sync(device)
                ts[k].append((time.perf_counter() - t0) / n)
        a, b = statistics.median(ts["ReLoRAOptimizer.step"]), statistics.median(ts["AdamW.step"])
        # the wrapper's own cost, exactly: the inner step replaced by a no-op (instance attribute)
        inner.step = lambda *a_, **k_: None
        try:
            wrap_t, noop_t = [], []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(20000):
                    opt.step()
                wrap_t.append((time.perf_counter() - t0) / 20000)
                t0 = time.perf_counter()
                for _ in range(20000):
                    inner.step()
                noop_t.append((time.perf_counter() - t0) / 20000)
        finally:
            del inner.step
        own = statistics.median(wrap_t) - statistics.median(noop_t)
        out.append([m, f"{a * 1e3:.3f}", f"{b * 1e3:.3f}", f"{(a - b) * 1e6:.0f}", f"{a / b:.3f}",
                    f"{own * 1e6:.2f}"])
        for p in model.parameters():
            p.grad = None
    return out


def equivalence(args):
    """Eager vs torch.compile(fullgraph=True) training of the same model, full rank and ReLoRA* (a cycle
    included): the largest difference of the per-step losses and of the final parameters."""
    cfg = dict(dim=128, layers=2, heads=4, seq=64, batch=4, vocab=256)
    steps, rows = 20, []
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"] + 1), generator=g) for _ in range(steps)]
    for method in ("full", "relora"):
        runs = {}
        for compiled in (False, True):
            model, opt = build(method, cfg, 16, torch.device("cpu"))
            if method == "relora":
                opt = relora_ext.ReLoRAOptimizer(opt.optimizer, model, reset_every=10, seed=0)
            fwd = torch.compile(model, fullgraph=True) if compiled else model
            losses = []
            for ids in batches:
                loss = F.cross_entropy(fwd(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
            runs[compiled] = (losses, [p.detach().clone() for p in model.parameters()])
        dl = max(abs(a - b) for a, b in zip(runs[False][0], runs[True][0]))
        dp = max((a - b).abs().max().item() for a, b in zip(runs[False][1], runs[True][1]))
        rows.append([method, f"{runs[False][0][-1]:.5f}", f"{dl:.2e}", f"{dp:.2e}"])
        print(rows[-1], flush=True)
        torch._dynamo.reset()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="model shape (default: llama130m on cuda, cpu on cpu)")
    p.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--dtype", choices=("bf16-autocast", "fp32"), default="bf16-autocast")
    p.add_argument("--methods", nargs="+", default=["full", "peft", "relora", "relora_bf16w"],
                   choices=["full", "peft", "relora", "relora_bf16w", "sst", "sst_bf16w"])
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    p.add_argument("--compile-methods", nargs="+", default=None,
                   help="compile only these methods (default: every one of --methods)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed round (default 10 cuda, 2 cpu)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    p.add_argument("--section", default=None,
                   help="the RESULTS.md section to write (default bench_step_cpu / bench_step_cuda)")
    p.add_argument("--equivalence", action="store_true",
                   help="only: eager vs compiled training, full rank vs ReLoRA* (CPU, fp32, 20 steps)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.equivalence:
        t0 = time.perf_counter()
        rows = equivalence(args)
        text = ("## torch.compile vs eager training: full rank vs ReLoRA* (issue 8)\n\n"
                f"`python benchmarks/bench_step.py {' '.join(sys.argv[1:])}` — {context()}; "
                f"{time.perf_counter() - t0:.0f} s.\n\n"
                "TinyLlama dim 128, 2 layers, 4 heads, vocab 256, batch 4 x seq 64, fp32, AdamW lr 1e-3, 20 steps on "
                "the same batches; ReLoRA*: r = 16 on every projection, cycle every 10 steps (one merge + reset + "
                "prune inside the run). Eager vs `torch.compile(model, fullgraph=True)`: the largest difference of "
                "the 20 losses and of the final parameters. The goal: ReLoRA* agrees as closely as full rank does.\n\n"
                + table(["method", "final loss (eager)", "max abs. loss difference", "max abs. parameter difference"], rows) + "\n")
        print(text)
        if args.write:
            write_section("compile_equivalence", text)
        return
    device = torch.device(args.device)
    cfg = dict(PRESETS[args.preset or ("llama130m" if device.type == "cuda" else "cpu")])
    if args.batch:
        cfg["batch"] = args.batch
    args.steps = args.steps or (10 if device.type == "cuda" else 2)
    try:
        import peft
        extra = [f"peft {peft.__version__}"]
    except ImportError:
        extra = ["peft missing"]
        args.methods = [m for m in args.methods if m != "peft"]
    if device.type == "cuda":
        extra.insert(0, torch.cuda.get_device_name())
    ctx = context(*extra)
    print(ctx, flush=True)
    t0 = time.perf_counter()
    head, rows, overhead = bench(args, cfg, device)
    cmd = " ".join(["python benchmarks/bench_step.py"] + sys.argv[1:])
    name = args.section or ("bench_step_cuda" if device.type == "cuda" else "bench_step_cpu")
    text = (
        f"## A whole training step: full rank vs LoRA (PEFT) vs ReLoRA* ({device.type}, issue 8)\n\n"
        f"`{cmd}` — {ctx}; {time.perf_counter() - t0:.0f} s.\n\n"
        f"TinyLlama dim {cfg['dim']}, {cfg['layers']} layers, {cfg['heads']} heads, vocab {cfg['vocab']}, "
        f"batch {cfg['batch']} x seq {cfg['seq']}, {args.dtype}, r = {args.r} (alpha = r) on the seven projections "
        f"of every block, AdamW. Median of {args.repeats} interleaved rounds of {args.steps} steps after "
        f"{args.warmup} warm-up steps. relora_bf16w = ReLoRA* with the frozen weights stored in bf16 "
        "(`weight_dtype=torch.bfloat16`). Peak MiB: CUDA peak allocated by the configuration (weights, grads, "
        "optimizer state, activations); '-' on CPU.\n\n"
        + table(head, rows)
        + "\n\nReLoRAOptimizer.step()'s own cost on top of the wrapped AdamW (gradients in place, no cycle; "
        "median of interleaved rounds):\n\n"
        + table(["model", "ReLoRAOptimizer.step ms", "AdamW.step ms", "difference µs (noisy)", "ratio",
                 "wrapper's own µs/step (inner step a no-op)"], overhead) + "\n"
    )
    print(text)
    if args.write:
        write_section(name, text)


if __name__ == "__main__":
    main()

"""Distributed ReLoRA*: gradient bytes all-reduced per step (DDP) and peak memory per rank (FSDP2 vs DDP).

    nice -n 10 python benchmarks/bench_distributed.py                 # 2 gloo ranks on 127.0.0.1
    python benchmarks/bench_distributed.py --mem-dim 1024 --mem-layers 4 --no-write

1. **Bytes per step**: the demo model (TinyLlama dim 192, 4 layers, byte vocab; ``relora_ext.demo``'s
   defaults) under DDP with 2 ranks, ReLoRA* (r = 48) vs full rank. A DDP communication hook adds up the
   size of every gradient bucket it is handed, then runs the default all-reduce; bytes per step is that sum
   over the timed steps divided by the steps. This is the all-reduce *payload* per rank; a ring all-reduce
   sends about ``2 (N−1)/N`` times the payload per rank over the wire.
2. **Peak memory per rank**: a larger TinyLlama (``--mem-dim``, ``--mem-layers``) trained for a few steps
   (one ReLoRA* cycle included) by each configuration {DDP, FSDP2} × {full rank, ReLoRA*} in fresh processes;
   each rank reads ``VmHWM`` (peak resident set) from ``/proc/self/status``. The baseline ``VmRSS`` after
   importing torch and relora_ext (before the model is built) is reported too, and the peak above it.

Writes ``benchmarks/results/bench_distributed.json`` and the section ``bench_distributed`` of
``benchmarks/RESULTS.md`` (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # _workers: the gloo launch helper the distributed tests use too

from _workers import init_gloo, start_workers  # noqa: E402

WORLD = 2


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _worker(rank, port, cfg, out_dir):
    import relora_ext
    from relora_ext.tiny_llama import TinyLlama, TinyLlamaConfig

    base_rss = _status_kib("VmRSS")
    init_gloo(rank, port, WORLD, timeout_s=300)
    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaConfig(vocab_size=256, dim=cfg["dim"], n_layers=cfg["layers"], n_heads=4,
                                      max_seq_len=max(cfg["seq"], 64)))
    if cfg["mode"] == "relora":
        relora_ext.wrap(model, r=cfg["rank"])
    comm = {"bytes": 0, "calls": 0}
    if cfg["parallel"] == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model)

        def counting_hook(state, bucket):
            buf = bucket.buffer()
            state["bytes"] += buf.numel() * buf.element_size()
            state["calls"] += 1
            return default_hooks.allreduce_hook(None, bucket)

        model.register_comm_hook(comm, counting_hook)
    else:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    inner = torch.optim.AdamW(params, lr=1e-3)
    opt = relora_ext.ReLoRAOptimizer(inner, model, reset_every=cfg["reset_every"]) if cfg["mode"] == "relora" else inner
    g = torch.Generator().manual_seed(1)
    per = cfg["batch"] // WORLD
    setup_hwm = _status_kib("VmHWM")
    times = []
    for step in range(cfg["steps"]):
        if step == cfg["warmup"]:
            comm["bytes"], comm["calls"] = 0, 0
        ids = torch.randint(0, 256, (cfg["batch"], cfg["seq"] + 1), generator=g)[rank * per:(rank + 1) * per]
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    timed = cfg["steps"] - cfg["warmup"]

    def local_bytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    held = sum(local_bytes(p) for p in model.parameters())
    held += sum(local_bytes(v) for st in inner.state.values() for v in st.values() if torch.is_tensor(v))
    res = {
        "rank": rank, "bytes_per_step": comm["bytes"] / timed, "buckets_per_step": comm["calls"] / timed,
        "trainable": sum(p.numel() for p in params), "params": sum(p.numel() for p in model.parameters()),
        "base_rss_mib": base_rss / 1024, "held_mib": held / 2**20, "vmhwm_mib": _status_kib("VmHWM") / 1024, "setup_hwm_mib": setup_hwm / 1024,
        "step_s_median": sorted(times[cfg["warmup"]:])[timed // 2] if timed else None,
        "cycles": getattr(opt, "cycles_done", 0),
    }
    with open(os.path.join(out_dir, f"{cfg['name']}.{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def run_config(cfg, out_dir):
    """Two fresh ranks for one configuration; returns the per-rank result dicts."""
    start_workers(_worker, cfg, out_dir, world=WORLD, join=True)
    return [json.loads(Path(out_dir, f"{cfg['name']}.{r}.json").read_text()) for r in range(WORLD)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[48, 8],
                    help="LoRA ranks of ReLoRA* for the bytes table (48: the demo's default)")
    ap.add_argument("--steps", type=int, default=6, help="steps per configuration (the first 2 are warm-up)")
    ap.add_argument("--mem-dim", type=int, default=768)
    ap.add_argument("--mem-layers", type=int, default=4)
    ap.add_argument("--mem-rank", type=int, default=64)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    import tempfile

    from _report import provenance, provenance_lines, write_section

    prov = provenance()
    out = {"provenance": prov, "bytes": {}, "memory": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, r in [("full", 0)] + [("relora", r) for r in args.ranks]:
            key = "full" if mode == "full" else f"relora_r{r}"
            cfg = dict(name=f"bytes_{key}", parallel="ddp", mode=mode, dim=192, layers=4, seq=128, batch=16,
                       rank=r, steps=args.steps, warmup=2, reset_every=3)
            out["bytes"][key] = run_config(cfg, tmp)
            print(key, out["bytes"][key][0], flush=True)
        for parallel in ("ddp", "fsdp"):
            for mode in ("full", "relora"):
                cfg = dict(name=f"mem_{parallel}_{mode}", parallel=parallel, mode=mode, dim=args.mem_dim,
                           layers=args.mem_layers, seq=64, batch=4, rank=args.mem_rank, steps=3, warmup=1,
                           reset_every=2)
                out["memory"][f"{parallel}/{mode}"] = run_config(cfg, tmp)
                print(parallel, mode, out["memory"][f"{parallel}/{mode}"], flush=True)

    b_full = out["bytes"]["full"][0]
    lines = [
        "## Distributed: DDP gradient traffic and peak memory per rank (`bench_distributed.py`)", "",
        provenance_lines(prov),
        f"2 gloo ranks on 127.0.0.1, 1 thread each. **Bytes per step**: demo TinyLlama (dim 192, 4 layers, vocab "
        f"256, {b_full['params'] / 1e6:.2f}M parameters), global batch 16×128; bytes handed to the all-reduce "
        "by a DDP comm hook (payload per rank per step; a ring all-reduce sends ≈2(N−1)/N × that per rank). "
        "ReLoRA* all-reduces the gradients of A, B and of the parameters it leaves full rank (embeddings, norms, "
        "lm_head); the merge/reset sends nothing (each rank draws the same A), the first cycle's consistency check "
        "one small all_gather_object.", "",
        "| training | trainable params | all-reduce payload / step | buckets / step | ratio to full rank |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = [("full rank", b_full)] + [(f"ReLoRA* r={r}", out["bytes"][f"relora_r{r}"][0]) for r in args.ranks]
    for name, r in rows:
        lines.append(f"| {name} | {r['trainable'] / 1e6:.3f}M | {r['bytes_per_step'] / 2**20:.2f} MiB | "
                     f"{r['buckets_per_step']:.0f} | {r['bytes_per_step'] / b_full['bytes_per_step']:.3f} |")
    m0 = out["memory"]["ddp/full"][0]
    lines += ["", f"**Peak memory per rank** (`VmHWM`): TinyLlama dim {args.mem_dim}, {args.mem_layers} layers "
              f"({m0['params'] / 1e6:.1f}M parameters, fp32), batch 4×64 global, 3 AdamW steps, ReLoRA* r="
              f"{args.mem_rank} with a cycle at step 2; each configuration in 2 fresh processes. \"above base\" "
              "subtracts the RSS after importing torch + relora_ext. \"held\" is what the rank keeps between steps: "
              "its parameters (local shards under FSDP2) and optimizer state.", "",
              "| parallel | training | rank 0 peak | rank 1 peak | peak above base (mean) | ratio to DDP full rank "
              "| peak before the first step (rank 0) | held: params + optimizer state |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    ref = sum(r["vmhwm_mib"] - r["base_rss_mib"] for r in out["memory"]["ddp/full"]) / WORLD
    for key, rs in out["memory"].items():
        parallel, mode = key.split("/")
        above = sum(r["vmhwm_mib"] - r["base_rss_mib"] for r in rs) / WORLD
        lines.append(f"| {'DDP' if parallel == 'ddp' else 'FSDP2'} | {'full rank' if mode == 'full' else 'ReLoRA*'} | "
                     f"{rs[0]['vmhwm_mib']:.0f} MiB | {rs[1]['vmhwm_mib']:.0f} MiB | {above:.0f} MiB | "
                     f"{above / ref:.2f} | {rs[0]['setup_hwm_mib']:.0f} MiB | {rs[0]['held_mib']:.0f} MiB |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        res_dir = ROOT / "benchmarks" / "results"
        res_dir.mkdir(exist_ok=True)
        tmpf = res_dir / "bench_distributed.json.tmp"
        tmpf.write_text(json.dumps(out, indent=2))
        os.replace(tmpf, res_dir / "bench_distributed.json")
        write_section("bench_distributed", text)


if __name__ == "__main__":
    main()

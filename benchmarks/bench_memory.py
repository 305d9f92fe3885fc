"""Memory and step time of one training step at LLaMA shapes: full rank, ReLoRA*, ReLoRA* with the output
head and the token embeddings adapted, SST (issue 22).

    python benchmarks/bench_memory.py                      # LLaMA-130M and LLaMA-350M shapes, CPU
    python benchmarks/bench_memory.py --shapes 130m --write
    python benchmarks/bench_memory.py --lookup             # only: how LoRAEmbedding gathers A's columns

Shapes (relora_ext.tiny_llama.TinyLlama, LLaMA's layout, vocab 32000): ``130m`` dim 768, 12 layers, 12 heads,
SwiGLU 2048; ``350m`` dim 1024, 24 layers, 16 heads, SwiGLU 2736. A step: forward under bf16 autocast on
``--batch`` x ``--seq`` tokens (1 x 256), cross-entropy, backward, optimizer step, zero_grad.

Configurations (AdamW, betas 0.9/0.95, no weight decay; ReLoRA*/SST through ReLoRAOptimizer, no cycle inside
the measured steps), r = ``--r`` on the seven projections of every block:

- ``full``: every parameter trained full rank;
- ``relora``: ReLoRA*, frozen weights fp32; embeddings and head trained full rank;
- ``relora_bf16w``: the same, frozen weights stored in bf16 (``weight_dtype=torch.bfloat16``);
- ``relora_bf16w_io``: and the head (``lm_head`` in ``target_modules``) and the token embeddings
  (:class:`relora_ext.embedding.LoRAEmbedding`, table in bf16) adapted at the same r (2 steps: the same
  memory with ReLoRA*'s cycle, which does not run inside the measured steps);
- ``sst``: SST (``method="sst"``), frozen singular vectors fp32.

Each configuration runs in a fresh process (``--steps`` steps). Memory: peak RSS (``VmHWM``) minus the RSS
after ``import torch, relora_ext`` — over the whole process (building the model included: it is built in
fp32 first) and over the training steps only (``VmHWM`` reset through ``/proc/self/clear_refs`` once the model
and the optimizer are built); on CUDA ``torch.cuda.max_memory_allocated``. AdamW state: bytes in the optimizer's
state after the steps (:func:`relora_ext.analysis.optimizer_state_bytes`). Step time: the median of the steps
after the first (which allocates the gradients and the state).
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

SHAPES = {
    "130m": dict(dim=768, layers=12, heads=12, hidden=2048),
    "350m": dict(dim=1024, layers=24, heads=16, hidden=2736),
}
CONFIGS = ("full", "relora", "relora_bf16w", "relora_bf16w_io", "sst")
LABELS = {"full": "full rank", "relora": "ReLoRA*", "relora_bf16w": "ReLoRA*, frozen W bf16",
          "relora_bf16w_io": "ReLoRA*, frozen W bf16, head + embeddings adapted", "sst": "SST"}
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 32000


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s*(\d+) kB", f.read()).group(1))


def build(config: str, shape: dict, r: int, seq: int, device):
    """(model, optimizer) for one configuration."""
    import relora_ext
    from relora_ext.embedding import LoRAEmbedding
    from relora_ext.tiny_llama import TinyLlama, TinyLlamaConfig

    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaConfig(vocab_size=VOCAB, dim=shape["dim"], n_layers=shape["layers"],
                                      n_heads=shape["heads"], hidden_dim=shape["hidden"], max_seq_len=seq)).to(device)
    adamw = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    if config == "full":
        return model, torch.optim.AdamW(model.parameters(), **adamw)
    if config == "sst":
        relora_ext.wrap(model, r=r, method="sst")
    elif config == "relora_bf16w_io":
        # the embedding adapted by hand (what naming "embed_tokens" in target_modules does; the recorded runs
        # were made this way), the head by target_modules
        relora_ext.wrap(model, r=r, target_modules=PROJ + ["lm_head"], weight_dtype=torch.bfloat16)
        model.embed_tokens = LoRAEmbedding.from_embedding(model.embed_tokens, r=r, weight_dtype=torch.bfloat16)
    else:
        relora_ext.wrap(model, r=r, weight_dtype=torch.bfloat16 if config == "relora_bf16w" else None)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **adamw)
    return model, relora_ext.ReLoRAOptimizer(inner, model, reset_every=10**6)


def child(args) -> None:
    """One configuration in this fresh process: print one JSON line of figures."""
    import torch.nn.functional as F

    import relora_ext  # noqa: F401  (imported before the baseline, like torch)
    from relora_ext.analysis import optimizer_state_bytes
    from relora_ext.memory import memory_report

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    base = status_kib("VmRSS")
    model, opt = build(args.child, SHAPES[args.shapes[0]], args.r, args.seq, device)
    built_hwm = status_kib("VmHWM")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM <- the RSS now: the steps' own peak from here
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(args.steps):
        ids = torch.randint(0, VOCAB, (args.batch, args.seq + 1), generator=g).to(device)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steps_hwm = status_kib("VmHWM")
    rep = memory_report(model, opt)
    print(json.dumps({
        "trainable": rep.trainable,
        "params": rep.total.params,
        "state_bytes": optimizer_state_bytes(opt),
        "report_state_bytes": rep.total.state_bytes,
        "groups": {k: g.state_bytes for k, g in rep.groups.items()},
        "grad_bytes": rep.total.grad_bytes,
        "param_bytes": rep.total.param_bytes,
        "peak_mib": (max(built_hwm, steps_hwm) - base) / 1024,
        "steps_peak_mib": (steps_hwm - base) / 1024,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "loss": loss.item(),
    }))


def run_child(args, shape: str, config: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", config, "--shapes", shape, "--r", str(args.r),
           "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
           "--threads", str(args.threads), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench_memory: {shape}/{config} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def lookup_alternatives(repeats: int = 9):
    """Median ms of the LoRA path of an embedding (gather A's columns, (N, r) @ (r, d), backward) at the
    130M shape, three ways of gathering, interleaved."""
    import torch.nn.functional as F

    V, d, r, N = VOCAB, 768, 128, 256
    g = torch.Generator().manual_seed(0)
    A = (torch.randn(r, V, generator=g) * 0.01).requires_grad_(True)
    B = torch.randn(d, r, generator=g).requires_grad_(True)
    ids = torch.randint(0, V, (N,), generator=g)
    grad = torch.randn(N, d, generator=g)
    ways = {
        "A.index_select(1, ids) (LoRAEmbedding)": lambda: A.index_select(1, ids).t(),
        "F.embedding(ids, A.t()) (strided view)": lambda: F.embedding(ids, A.t()),
        "A[:, ids] (advanced indexing)": lambda: A[:, ids].t(),
    }
    times = {k: [] for k in ways}
    for i in range(repeats + 2):
        for k, f in ways.items():
            A.grad = B.grad = None
            t0 = time.perf_counter()
            (f() @ B.t()).backward(grad)
            if i >= 2:
                times[k].append(time.perf_counter() - t0)
    return [[k, f"{statistics.median(v) * 1e3:.2f}"] for k, v in times.items()]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--r", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--lookup", action="store_true", help="only time LoRAEmbedding's gather alternatives")
    p.add_argument("--write", action="store_true", help="record a section in benchmarks/RESULTS.md")
    p.add_argument("--section", default="bench_memory")
    p.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _report import context, table, write_section

    torch.set_num_threads(args.threads)
    cmd = "python benchmarks/bench_memory.py " + " ".join(sys.argv[1:])
    ctx = context()
    if args.lookup:
        rows = lookup_alternatives()
        text = ("## LoRAEmbedding: gathering the looked-up columns of A (issue 22)\n\n"
                f"`{cmd}` — {ctx}.\n\nvocab 32000, d 768, r 128, 256 tokens, fp32: gather, `(N, r) @ (r, d)`, backward "
                "into A and B; median ms of 9 interleaved runs.\n\n" + table(["gather", "ms fwd+bwd"], rows) + "\n")
        print(text)
        if args.write:
            write_section(args.section + "_lookup", text)
        return
    print(ctx, flush=True)
    t0 = time.perf_counter()
    sections = []
    for shape in args.shapes:
        res = {}
        for config in args.configs:
            res[config] = run_child(args, shape, config)
            print(shape, config, json.dumps(res[config]), flush=True)
        ref = res.get("full")
        rows = []
        for config, x in res.items():
            ratio = (lambda k: f" ({x[k] / ref[k]:.2f})" if ref and ref[k] else "")
            rows.append([LABELS[config], f"{x['trainable'] / 1e6:.1f}M", f"{x['state_bytes'] / 2**20:,.0f}{ratio('state_bytes')}",
                         f"{x['groups']['embeddings_head'] / 2**20:,.0f}",
                         f"{x['grad_bytes'] / 2**20:,.0f}{ratio('grad_bytes')}",
                         f"{x['peak_mib']:,.0f}{ratio('peak_mib')}", f"{x['steps_peak_mib']:,.0f}{ratio('steps_peak_mib')}",
                         f"{x['step_s']:.2f}{ratio('step_s')}"]
                        + ([f"{x['cuda_peak_mib']:,.0f}{ratio('cuda_peak_mib')}"] if args.device == "cuda" else []))
        s = SHAPES[shape]
        head = ["configuration", "trainable", "AdamW state MiB (/ full)", "of which emb. + head full rank",
                "grads MiB (/ full)", "peak RSS MiB, whole process (/ full)", "peak RSS MiB, steps only (/ full)",
                "step s (/ full)"] + (["CUDA peak MiB (/ full)"] if args.device == "cuda" else [])
        sections.append(f"### LLaMA-{shape} shape: dim {s['dim']}, {s['layers']} layers, {s['heads']} heads, SwiGLU "
                        f"{s['hidden']}, vocab {VOCAB}, r = {args.r}\n\n" + table(head, rows) + "\n")
    text = (f"## Memory: embeddings and output head adapted (issue 22)\n\n`{cmd}` — {ctx}; "
            f"{time.perf_counter() - t0:.0f} s.\n\n"
            f"One process per configuration; {args.steps} steps of {args.batch} x {args.seq} tokens, bf16 autocast "
            f"on {args.device}, AdamW. Peak RSS: VmHWM minus the RSS after `import torch, relora_ext`, over the whole "
            "process (the model is built in fp32 first, then wrapped) and over the training steps only. "
            "'of which emb. + head full rank': the AdamW state of the embeddings and head when trained full rank (MiB). "
            "Step time: median of the steps after the first, on a CPU shared with other jobs (context, not a "
            "benchmark of speed).\n\n" + "\n".join(sections))
    print(text)
    if args.write:
        write_section(args.section, text)


if __name__ == "__main__":
    main()

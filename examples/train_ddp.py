"""Multi-process ReLoRA* training with torchrun: DDP or FSDP2, on CPU (gloo) or GPUs (nccl).

    torchrun --nproc_per_node=2 examples/train_ddp.py --steps 20                 # DDP, 2 processes
    torchrun --nproc_per_node=2 examples/train_ddp.py --steps 20 --parallel fsdp  # FSDP2 (fully_shard)
    torchrun --nproc_per_node=8 examples/train_ddp.py --steps 2000 --reset-every 500 --dim 768 --layers 12

Trains the demo's TinyLlama (byte-level, vocab 256) on the bundled Jane Austen corpus (Persuasion held out).
Every rank draws the same global batch of ``--batch-size`` windows and trains on its own slice, so the run
computes the same updates as one process with that batch. The three rules of distributed ReLoRA*:

1. the same ``seed`` on every rank (the resets draw ``A`` from a counter-based stream keyed by seed, layer
   and cycle, so every rank draws the same ``A`` without communicating);
2. ``relora_ext.wrap`` the model *before* DDP / ``fully_shard``;
3. build the optimizer *after* DDP / ``fully_shard``, from the wrapped module's parameters.

At the first cycle ``ReLoRAOptimizer`` checks that the ranks agree (seed, settings, adapter layout, the new
``A``) and raises on every rank if not. ``--save DIR`` writes a sharded checkpoint at the end
(``torch.distributed.checkpoint``), ``--resume DIR`` continues from one.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import relora_ext  # noqa: E402
from relora_ext.demo import byte_tokens, lm_batch, load_austen  # noqa: E402
from relora_ext.checkpoint import load_sharded, save_sharded  # noqa: E402
from relora_ext.tiny_llama import TinyLlama, TinyLlamaConfig  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp", help="DistributedDataParallel or FSDP2")
    p.add_argument("--mode", choices=("relora", "full"), default="relora", help="ReLoRA* or full-rank training")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--reset-every", type=int, default=None,
                   help="ReLoRA* cycle length (default: min(50, steps // 4), so that short runs see cycles)")
    p.add_argument("--rank", type=int, default=48, help="LoRA rank r")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--restart-warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16, help="global batch (windows), split over the ranks")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="model init, data order and ReLoRA* draws: same on every rank")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-windows", type=int, default=32, help="validation windows at the end (0: none)")
    p.add_argument("--save", type=Path, default=None, help="write a sharded checkpoint directory at the end")
    p.add_argument("--resume", type=Path, default=None, help="load a sharded checkpoint directory first")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / ranks)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.reset_every is None:
        args.reset_every = max(1, min(50, args.steps // 4))
    if args.batch_size < 1 or args.steps < 1 or args.reset_every < 1:
        raise SystemExit("train_ddp: --batch-size, --steps and --reset-every must be >= 1")
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    if args.batch_size % world:
        raise SystemExit(f"train_ddp: --batch-size ({args.batch_size}) must be a multiple of the world size ({world})")
    per_rank = args.batch_size // world

    train_b, val_b = load_austen()
    train_data, val_data = byte_tokens(train_b), byte_tokens(val_b)

    torch.manual_seed(args.seed)                     # same initial model on every rank
    cfg = TinyLlamaConfig(vocab_size=256, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                          max_seq_len=max(args.seq_len, 64))
    model = TinyLlama(cfg)
    if args.mode == "relora":
        relora_ext.wrap(model, r=args.rank)          # rule 2: wrap first
    model.to(device)
    if args.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[local_rank] if use_cuda else None)
    else:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)

    params = [p for p in model.parameters() if p.requires_grad]      # rule 3: after DDP / fully_shard
    inner = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    if args.mode == "relora":
        opt = relora_ext.ReLoRAOptimizer(inner, model, reset_every=args.reset_every, seed=args.seed)  # rule 1
        cycle = args.reset_every
    else:
        opt, cycle = inner, args.steps + 1
    sched = relora_ext.JaggedCosineLR(opt, total_steps=args.steps,
                                      warmup_steps=min(args.warmup, args.steps - 1, cycle),
                                      cycle_length=cycle,
                                      restart_warmup_steps=min(args.restart_warmup, cycle // 2),
                                      min_lr_ratio=0.1)
    start = 0
    gen = torch.Generator().manual_seed(args.seed)   # the same global batches on every rank
    if args.resume is not None:
        extra = load_sharded(args.resume, model=model, optimizer=opt, scheduler=sched)
        start = int(extra.get("step", 0))
        gen.set_state(extra["data_rng"])

    n_params = sum(p.numel() for p in model.parameters())            # global sizes (DTensor.numel is global)
    n_train = sum(p.numel() for p in params)
    if rank == 0:
        print(f"train_ddp: {args.parallel} x{world} ({dist.get_backend()}), mode={args.mode}, TinyLlama dim={args.dim} "
              f"layers={args.layers} params={n_params / 1e6:.2f}M trainable={n_train / 1e6:.2f}M, global batch "
              f"{args.batch_size}x{args.seq_len} ({per_rank} per rank), steps {start}..{args.steps}", flush=True)

    model.train()
    t0 = time.perf_counter()
    window = []
    for step in range(start + 1, args.steps + 1):
        starts = torch.randint(0, len(train_data) - args.seq_len - 1, (args.batch_size,), generator=gen)
        x, y = lm_batch(train_data, starts[rank * per_rank:(rank + 1) * per_rank], args.seq_len)
        loss = F.cross_entropy(model(x.to(device)).flatten(0, 1), y.to(device).flatten())
        loss.backward()
        lr = opt.param_groups[0]["lr"]   # the rate this step trains with (after sched.step() it is the next one's,
        opt.step()                       # 0 right after each reset)
        sched.step()
        opt.zero_grad(set_to_none=True)
        g = loss.detach().clone()
        dist.all_reduce(g)
        window.append(g.item() / world)
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            print(f"step {step:5d} | loss {sum(window) / len(window):.4f} | lr {lr:.2e} | "
                  f"cycles {getattr(opt, 'cycles_done', 0)} | {time.perf_counter() - t0:.1f} s", flush=True)
            window = []

    if args.eval_windows > 0:  # every rank evaluates the same windows (FSDP2's forward is collective)
        model.eval()
        with torch.no_grad():
            starts = torch.linspace(0, len(val_data) - args.seq_len - 2, args.eval_windows).long()
            x, y = lm_batch(val_data, starts, args.seq_len)
            v = F.cross_entropy(model(x.to(device)).flatten(0, 1).float(), y.to(device).flatten()).item()
        if rank == 0:
            print(f"validation ({args.eval_windows} windows of Persuasion): loss {v:.4f}, ppl {math.exp(v):.2f}")
    if args.save is not None:
        save_sharded(args.save, model=model, optimizer=opt, scheduler=sched,
                     extra={"step": args.steps, "data_rng": gen.get_state()})
        if rank == 0:
            print(f"saved sharded checkpoint to {args.save}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

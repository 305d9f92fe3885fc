"""Train a small LLaMA-style model with ReLoRA* on Jane Austen, on CPU, in a few minutes.

    python -m relora_ext.demo                       # defaults: 3.3M parameters, 4 cycles, 2 threads
    python -m relora_ext.demo --steps 600 --reset-every 150 --rank 64 --threads 4
    python -m relora_ext.demo --mode full           # the same model trained full-rank, for comparison

Byte-level tokens (vocab 256). Data: the package's copy of ``austen.txt.gz`` (six novels), checked against
its sha256; *Persuasion* is held out for validation, the five other novels are the training text.
Prints train/validation loss and perplexity (per byte), cycles done and peak memory, and writes a JSON
summary to ``--out-dir`` (default ``runs/demo``).

The training loop is the library's ten lines::

    model = relora_ext.wrap(TinyLlama(cfg), r=args.rank)
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=args.lr), model, reset_every=args.reset_every)
    sched = JaggedCosineLR(opt, total_steps=args.steps, warmup_steps=..., cycle_length=args.reset_every, ...)
    for step in range(args.steps):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward(); opt.step(); sched.step(); opt.zero_grad()
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .model import lora_layers, wrap
from .optim import ReLoRAOptimizer
from .schedule import JaggedCosineLR
from .tiny_llama import TinyLlama, TinyLlamaConfig

__all__ = ["DATA_PATH", "DATA_SHA256", "load_austen", "byte_tokens", "lm_batch", "evaluate", "main"]

#: The bundled corpus and the sha256 of the .gz file (see ``relora_ext/data/README.md``).
DATA_PATH = Path(__file__).resolve().parent / "data" / "austen.txt.gz"
DATA_SHA256 = "a5e8dcacf9f381467044ee551fd71c6ae7acf976d04b31101461482efb33169d"

_TITLES = {"emma", "mansfield park", "northanger abbey", "persuasion", "pride and prejudice",
           "sense and sensibility"}
VAL_TITLE = "Persuasion"


def load_austen(path: Optional[os.PathLike] = None, *, sha256: Optional[str] = DATA_SHA256) -> Tuple[bytes, bytes]:
    """Read the corpus, check its sha256, and split it: returns ``(train_bytes, val_bytes)`` (UTF-8).

    Validation is *Persuasion*: from its title line to the next novel's title line (the shortest of the six
    novels, about 470 kB); training is the rest. ``sha256`` is that of the ``.gz`` file (``None`` skips the
    check). Raises :class:`ValueError` on a checksum mismatch or if the title lines cannot be found.

    Example::

        >>> train, val = load_austen()
        >>> len(train) > 3_000_000 and val.startswith(b"Persuasion")
        True
    """
    path = Path(path) if path is not None else DATA_PATH
    if not path.is_file():
        raise FileNotFoundError(f"load_austen: corpus not found at {str(path)!r} (the package ships data/austen.txt.gz)")
    raw = path.read_bytes()
    if sha256 is not None:
        got = hashlib.sha256(raw).hexdigest()
        if got != sha256:
            raise ValueError(
                f"load_austen: sha256 mismatch for {str(path)!r}: expected {sha256}, got {got}; the corpus file is "
                "corrupt or not the bundled one (reinstall the package or pass the right file)"
            )
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    titles = [i for i, line in enumerate(lines) if line.strip().lower() in _TITLES]
    starts = [i for i in titles if lines[i].strip() == VAL_TITLE]
    if not starts:
        raise ValueError(f"load_austen: no title line {VAL_TITLE!r} in {str(path)!r}")
    start = starts[0]
    later = [i for i in titles if i > start and lines[i].strip().lower() != VAL_TITLE.lower()]
    end = later[0] if later else len(lines)
    val = "\n".join(lines[start:end]).encode("utf-8")
    train = "\n".join(lines[:start] + lines[end:]).encode("utf-8")
    return train, val


def byte_tokens(b: bytes) -> torch.Tensor:
    """Byte-level tokens: ``b`` as an int64 tensor ``(len(b),)`` of values 0..255 (vocab 256).

    Example: ``byte_tokens(b"Emma")`` is ``tensor([69, 109, 109, 97])``.
    """
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).long()


def lm_batch(data: torch.Tensor, starts: torch.Tensor, seq_len: int):
    """Next-token windows: inputs ``x (B, seq_len)`` and targets ``y (B, seq_len)`` (``x`` shifted by one)
    from the token stream ``data`` at the ``B`` offsets ``starts``.

    Example: ``x, y = lm_batch(byte_tokens(b"abcdef"), torch.tensor([0, 2]), 3)`` gives
    ``x[0] = b"abc"`` and ``y[0] = b"bcd"``.
    """
    idx = starts[:, None] + torch.arange(seq_len + 1)
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq_len: int, n_windows: int, batch_size: int) -> float:
    """Mean next-byte cross-entropy (nats) over ``n_windows`` evenly spaced windows of ``data``."""
    was_training = model.training
    model.eval()
    starts = torch.linspace(0, len(data) - seq_len - 2, n_windows).long()
    total, count = 0.0, 0
    for i in range(0, n_windows, batch_size):
        x, y = lm_batch(data, starts[i:i + batch_size], seq_len)
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), reduction="sum")
        total += loss.item()
        count += y.numel()
    model.train(was_training)
    return total / count


def _peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return kib / 1024 / (1024 if sys.platform == "darwin" else 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m relora_ext.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--reset-every", type=int, default=75, help="ReLoRA* cycle length (steps between merges)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: r, i.e. scale 1)")
    p.add_argument("--mode", choices=("relora", "lora", "full"), default="relora",
                   help="relora: ReLoRA*; lora: the same adapters never merged; full: full-rank training")
    p.add_argument("--prune", choices=("magnitude", "random", "reset"), default="magnitude")
    p.add_argument("--prune-ratio", type=float, default=0.99)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=20, help="first warmup steps")
    p.add_argument("--restart-warmup", type=int, default=10, help="re-warmup steps after each reset")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=60, help="validation every this many steps (and at 0, end)")
    p.add_argument("--eval-windows", type=int, default=64, help="validation windows of --seq-len bytes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--data", type=Path, default=None, help="corpus .txt.gz (default: the bundled copy)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/demo"), help="where summary.json goes")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the demo with command-line ``argv`` (``None``: ``sys.argv``); returns the summary dict.

    Example: ``main(["--steps", "20", "--reset-every", "10", "--out-dir", "/tmp/demo"])``.
    """
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.reset_every < 1:
        raise SystemExit(f"demo: --steps and --reset-every must be >= 1, got {args.steps} and {args.reset_every}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)

    train_b, val_b = load_austen(args.data)
    train_data, val_data = byte_tokens(train_b), byte_tokens(val_b)

    cfg = TinyLlamaConfig(vocab_size=256, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                          max_seq_len=max(args.seq_len, 64))
    model = TinyLlama(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    if args.mode != "full":
        wrap(model, r=args.rank, alpha=args.alpha)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                              weight_decay=args.weight_decay, betas=(0.9, 0.95))
    reset_every = args.reset_every if args.mode == "relora" else args.steps + 1
    if args.mode == "full":
        opt = inner
    else:
        opt = ReLoRAOptimizer(inner, model, reset_every=reset_every, prune=args.prune,
                              prune_ratio=args.prune_ratio, seed=args.seed)
    with warnings.catch_warnings():
        if args.mode != "relora":  # no resets by design: the schedule's "plain LoRA training" warning is moot
            warnings.filterwarnings("ignore", message="JaggedCosineLR: total_steps=")
        # the re-warmups follow the resets: cycle_length = reset_every, the first warmup done by the first reset
        sched = JaggedCosineLR(opt, total_steps=args.steps, warmup_steps=min(args.warmup, args.steps - 1, reset_every),
                               cycle_length=reset_every, restart_warmup_steps=min(args.restart_warmup, reset_every),
                               min_lr_ratio=args.min_lr_ratio)

    print(f"relora_ext demo: TinyLlama dim={cfg.dim} layers={cfg.n_layers} heads={cfg.n_heads} "
          f"params={n_params / 1e6:.2f}M trainable={n_trainable / 1e6:.2f}M | mode={args.mode} r={args.rank} "
          f"reset_every={args.reset_every} steps={args.steps} batch={args.batch_size}x{args.seq_len} "
          f"threads={torch.get_num_threads()}")
    print(f"data: train {len(train_data) / 1e6:.2f} MB (5 novels), validation {len(val_data) / 1e6:.2f} MB ({VAL_TITLE})")

    gen = torch.Generator().manual_seed(args.seed)
    history = []

    def log_eval(step, train_loss):
        v = evaluate(model, val_data, args.seq_len, args.eval_windows, 32)
        cycles = getattr(opt, "cycles_done", 0)
        history.append({"step": step, "train_loss": train_loss, "val_loss": v, "val_ppl": math.exp(v),
                        "cycles_done": cycles, "lr": opt.param_groups[0]["lr"],
                        "elapsed_s": time.perf_counter() - t_start})
        tl = "   -  " if train_loss is None else f"{train_loss:.3f} (ppl {math.exp(train_loss):6.2f})"
        msg = (f"step {step:5d} | train {tl} | val {v:.3f} (ppl {math.exp(v):6.2f}) | cycles {cycles} | "
               f"peak RSS {_peak_rss_mib():.0f} MiB")
        if bar is not None:
            bar.write(msg)
        else:
            print(msg)
        return v

    bar = None
    if not args.no_progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=args.steps, desc="training", unit="step", dynamic_ncols=True, file=sys.stdout)
        except ImportError:  # pragma: no cover
            bar = None
    v0 = log_eval(0, None)
    model.train()
    ema = None
    window_losses = []
    t_train = time.perf_counter()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(train_data) - args.seq_len - 1, (args.batch_size,), generator=gen)
        x, y = lm_batch(train_data, starts, args.seq_len)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        li = loss.item()
        window_losses.append(li)
        ema = li if ema is None else 0.9 * ema + 0.1 * li
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}",
                            cycles=getattr(opt, "cycles_done", 0))
        if step % args.eval_every == 0 or step == args.steps:
            log_eval(step, sum(window_losses) / len(window_losses))
            window_losses = []
    train_s = time.perf_counter() - t_train
    if bar is not None:
        bar.close()

    final = history[-1]
    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"dim": cfg.dim, "layers": cfg.n_layers, "heads": cfg.n_heads, "hidden_dim": cfg.hidden_dim,
                  "params": n_params, "trainable_params": n_trainable,
                  "lora_layers": len(lora_layers(model))},
        "val_loss_start": v0,
        "val_loss_end": final["val_loss"],
        "val_ppl_end": final["val_ppl"],
        "train_loss_end": final["train_loss"],
        "cycles_done": getattr(opt, "cycles_done", 0),
        "last_prune_kept": getattr(opt, "last_prune_kept", None),
        "train_seconds": train_s,
        "wall_seconds": time.perf_counter() - t_start,
        "peak_rss_mib": _peak_rss_mib(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "history": history,
    }
    out = args.out_dir / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out)
    print(f"done: val loss {v0:.3f} -> {final['val_loss']:.3f} (ppl {math.exp(v0):.1f} -> {final['val_ppl']:.2f}), "
          f"{summary['cycles_done']} cycles, {train_s:.0f} s training, peak RSS {summary['peak_rss_mib']:.0f} MiB; "
          f"summary: {out}")
    return summary


if __name__ == "__main__":
    main()

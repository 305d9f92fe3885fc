"""Rank teacher: a regression task with a known answer where the rank of the update is the limit.

A student linear layer ``y = W x`` (``W₀`` drawn like :class:`torch.nn.Linear`'s init) learns a full-rank
linear teacher ``y = T x + ε`` with ``x ~ N(0, I_d)``, ``T ~ N(0, 1/d)`` entrywise and label noise
``ε ~ N(0, σ²)``. The population loss (mean squared error per output) is known in closed form,

    L(W) = ‖W − T‖²_F / d + σ²,

and so are the floors:

- **full rank** can reach ``σ²`` (the noise);
- **LoRA at rank r** can at best add the best rank-``r`` approximation of ``T − W₀`` (Eckart–Young), so
  ``L ≥ Σ_{i>r} σᵢ(T − W₀)² / d + σ²``;
- **ReLoRA\\*** at rank ``r`` merges a rank-``r`` update every cycle and can reach rank ``k·r`` after ``k``
  cycles: it can break through LoRA's floor towards full rank's;
- **GaLore** trains ``W`` itself with Adam's moments kept in a rank-``r`` projection of the gradient,
  refreshed every period (galore-torch's ``GaLoreAdamW``, scale 0.25 as in train_lm);
- **SST** (Sparse Spectral Training) trains every singular value and ``r`` sampled singular vector pairs
  at a time (a new sample every cycle), so it is not bound to rank ``r`` either.

Every method gets the same LR sweep (AdamW, the same jagged-cosine schedule, re-warmups only for ReLoRA* and SST),
and the methods with a period (ReLoRA*'s cycle, GaLore's projection refresh, SST's iteration) the same sweep of
its length; the best setting on seed 0 is rerun on every seed, and the loss and the spectrum / effective rank of
``W − W₀`` are recorded over training. Writes a JSON summary, a PNG plot and a section of
``benchmarks/RESULTS.md``.

    python benchmarks/rank_teacher.py                 # the documented run (~1-2 min on 2 cores), into runs/
    python benchmarks/rank_teacher.py --write         # the same, recorded: results/, plots/, RESULTS.md
    python benchmarks/rank_teacher.py --quick         # a few seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import relora_ext  # noqa: E402
from relora_ext.analysis import UpdateTracker, _effective_weight, effective_rank, optimizer_state_bytes  # noqa: E402

HERE = Path(__file__).resolve().parent
METHODS = ("full", "lora", "relora", "galore", "sst")
LABELS = {"full": "full-rank", "lora": "LoRA (no resets)", "relora": "ReLoRA*", "galore": "GaLore", "sst": "SST"}
CYCLED = ("relora", "galore", "sst")  # the methods with a period: ReLoRA* cycle, GaLore projection, SST iteration


def make_problem(dim: int, seed: int):
    """Teacher ``T (d, d)`` and student init ``W₀ (d, d)``, both from ``seed`` (the same for every method)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    teacher = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
    bound = 1.0 / math.sqrt(dim)  # nn.Linear's default init: U(-1/sqrt(in), 1/sqrt(in))
    w0 = (torch.rand(dim, dim, generator=g) * 2 - 1) * bound
    return teacher, w0


def population_loss(w: torch.Tensor, teacher: torch.Tensor, noise: float) -> float:
    """Exact expected MSE per output for ``x ~ N(0, I)``: ``‖W − T‖²_F / d_out + σ²``."""
    return float(((w.double() - teacher.double()) ** 2).sum() / w.shape[0]) + noise ** 2


def lora_floor(teacher: torch.Tensor, w0: torch.Tensor, r: int, noise: float) -> float:
    """LoRA's best possible population loss at rank ``r`` (Eckart–Young on ``T − W₀``)."""
    s = torch.linalg.svdvals((teacher - w0).double())
    return float((s[r:] ** 2).sum() / teacher.shape[0]) + noise ** 2


def train_one(method: str, lr: float, seed: int, args, *, record: bool = False, period: int = 0) -> dict:
    """Train one student; returns final loss and (if ``record``) the curves and spectra. ``period``: the
    ReLoRA* cycle / GaLore refresh / SST iteration in steps (default ``args.reset_every``)."""
    period = period or args.reset_every
    torch.manual_seed(seed)
    teacher, w0 = make_problem(args.dim, seed)
    layer = nn.Linear(args.dim, args.dim, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w0)
    model = nn.Sequential(layer)
    if method == "full":
        tracker = UpdateTracker(layers=[("0", layer)])
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        cycle = args.steps + 1
    elif method == "galore":
        from galore_torch import GaLoreAdamW

        tracker = UpdateTracker(layers=[("0", layer)])
        opt = GaLoreAdamW([{"params": [layer.weight], "rank": args.rank, "update_proj_gap": period,
                            "scale": 0.25, "proj_type": "std"}], lr=lr, weight_decay=0.0)
        cycle = args.steps + 1  # one cosine, no re-warmups (as in train_lm)
    else:
        relora_ext.wrap(model, r=args.rank, target_modules=["0"], method="sst" if method == "sst" else "relora")
        tracker = UpdateTracker(model)
        inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        cycle = period if method in ("relora", "sst") else args.steps + 1
        opt = relora_ext.ReLoRAOptimizer(inner, model, reset_every=cycle, seed=seed)
    # a period shorter than the warmup shortens the warmup (the first reset must come after it), so that
    # the re-warmups follow the resets at every period of the sweep
    sched = relora_ext.JaggedCosineLR(opt, total_steps=args.steps, warmup_steps=min(args.warmup, cycle),
                                      cycle_length=cycle,
                                      restart_warmup_steps=min(args.restart_warmup, cycle),
                                      min_lr_ratio=args.min_lr_ratio)
    g = torch.Generator().manual_seed(seed)
    student = model[0]

    def w_eff():
        return _effective_weight(student)

    curve, ranks, snapshots = [], [], {}
    diverged = False
    t0 = time.perf_counter()
    for step in range(args.steps + 1):
        if record and (step % args.eval_every == 0 or step == args.steps):
            s = tracker.spectra()["0"]
            curve.append((step, population_loss(w_eff(), teacher, args.noise)))
            ranks.append((step, effective_rank(s), effective_rank(s, method="threshold", rtol=args.rtol)))
        # the spectrum after a cycle / iteration: about 20 of them a run (every one at long periods)
        if (record and method in ("relora", "sst") and step > 0 and step % period == 0
                and (step // period) % max(1, args.steps // period // 20) == 0):
            snapshots[step // period] = tracker.spectra()["0"].tolist()
        if step == args.steps:
            break
        x = torch.randn(args.batch_size, args.dim, generator=g)
        y = x @ teacher.T + args.noise * torch.randn(args.batch_size, args.dim, generator=g)
        loss = ((model(x) - y) ** 2).mean()
        if not math.isfinite(loss.item()):
            diverged = True
            break
        loss.backward()
        try:
            opt.step()
        except ValueError:  # ReLoRAOptimizer refuses to merge NaN/Inf factors: the LR is too high
            diverged = True
            break
        sched.step()
        opt.zero_grad(set_to_none=True)
    final = math.inf if diverged else population_loss(w_eff(), teacher, args.noise)
    out = {"method": method, "lr": lr, "period": period if method in CYCLED else None, "seed": seed,
           "final_loss": final, "diverged": diverged,
           "seconds": time.perf_counter() - t0,
           "optimizer_state_bytes": optimizer_state_bytes(opt),
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "cycles": getattr(opt, "cycles_done", 0)}
    if record:
        s = tracker.spectra()["0"]
        out.update(curve=curve, ranks=ranks, final_spectrum=s.tolist(), cycle_spectra=snapshots,
                   final_rank_entropy=effective_rank(s),
                   final_rank_threshold=effective_rank(s, method="threshold", rtol=args.rtol))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dim", type=int, default=64, help="d: the teacher and student are (d, d)")
    p.add_argument("--rank", type=int, default=8, help="LoRA / ReLoRA* rank r")
    p.add_argument("--noise", type=float, default=0.1, help="label noise std σ (full-rank floor σ²)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--reset-every", type=int, default=200, help="ReLoRA* cycle length (period) without a sweep")
    p.add_argument("--periods", type=int, nargs="+", default=[10, 25, 50, 200],
                   help="the period sweep (ReLoRA* cycle, GaLore refresh, SST iteration), with the LR sweep")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--restart-warmup", type=int, default=20)
    p.add_argument("--min-lr-ratio", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2],
                   help="the LR sweep, the same for every method (selection on seed 0)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--rtol", type=float, default=1e-2, help="threshold of the numerical rank (σ > rtol·σ_max)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", action="store_true",
                   help="record the run: benchmarks/results/rank_teacher.json, benchmarks/plots/rank_teacher.png and "
                        "the rank_teacher section of benchmarks/RESULTS.md (tracked files; without it, runs/rank_teacher/)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where rank_teacher.json goes (default: benchmarks/results with --write, else runs/rank_teacher)")
    p.add_argument("--plot", type=Path, default=None,
                   help="the PNG (default: benchmarks/plots/rank_teacher.png with --write, else in --out-dir)")
    p.add_argument("--quick", action="store_true",
                   help="tiny run for tests: d=32, r=4, 1200 steps, 2 LRs, 1 seed, no RESULTS.md")
    return p


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    from _report import provenance

    prov = provenance()
    t_start = time.perf_counter()
    sweep = {m: {} for m in METHODS}
    for m in METHODS:
        for period in (args.periods if m in CYCLED else [0]):
            for lr in args.lrs:
                sweep[m][(lr, period)] = train_one(m, lr, args.seeds[0], args, period=period)["final_loss"]
                print(f"sweep {m:7s} lr={lr:g} period={period}: final loss {sweep[m][(lr, period)]:.5f}", flush=True)
    best = {m: min(sweep[m], key=lambda k: (not math.isfinite(sweep[m][k]), sweep[m][k])) for m in METHODS}
    best_lr = {m: best[m][0] for m in METHODS}
    best_period = {m: best[m][1] or None for m in METHODS}
    runs = {m: [train_one(m, best[m][0], s, args, record=True, period=best[m][1]) for s in args.seeds]
            for m in METHODS}
    floors = []
    for s in args.seeds:
        teacher, w0 = make_problem(args.dim, s)
        floors.append(lora_floor(teacher, w0, args.rank, args.noise))
        target_spec = torch.linalg.svdvals(teacher - w0)
        if s == args.seeds[0]:
            target = {"spectrum": target_spec.tolist(), "rank_entropy": effective_rank(target_spec),
                      "rank_threshold": effective_rank(target_spec, method="threshold", rtol=args.rtol)}

    def mean(xs):
        return sum(xs) / len(xs)

    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "provenance": prov,
        "sweep": {m: {f"lr={lr:g} period={pe}": v for (lr, pe), v in d.items()} for m, d in sweep.items()},
        "best_lr": best_lr,
        "best_period": best_period,
        "lora_floor": floors,
        "noise_floor": args.noise ** 2,
        "target": target,
        "runs": runs,
        "final": {m: mean([r["final_loss"] for r in runs[m]]) for m in METHODS},
        "wall_seconds": None,
    }
    fl = mean(floors)
    f = summary["final"]
    summary["goals"] = {
        "relora_vs_lora_floor": fl / f["relora"],          # >= 10 wanted
        "relora_vs_full": f["relora"] / f["full"],         # <= 2 wanted
        "lora_vs_lora_floor": f["lora"] / fl,              # ~1: LoRA reaches its floor
        "sst_vs_relora": f["sst"] / f["relora"],           # <= 1 wanted (issue 12)
    }
    summary["goals"]["met"] = bool(summary["goals"]["relora_vs_lora_floor"] >= 10 and summary["goals"]["relora_vs_full"] <= 2)
    summary["wall_seconds"] = time.perf_counter() - t_start
    return summary


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = summary["config"]
    colors = {"full": "black", "lora": "tab:blue", "relora": "tab:red", "galore": "tab:orange", "sst": "tab:green"}
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    for m in METHODS:
        for i, r in enumerate(summary["runs"][m]):
            st, lo = zip(*r["curve"])
            ax[0].plot(st, lo, color=colors[m], alpha=0.9 if i == 0 else 0.35,
                       label=f"{LABELS[m]} (lr {summary['best_lr'][m]:g})" if i == 0 else None)
            st, ent, thr = zip(*r["ranks"])
            ax[1].plot(st, thr, color=colors[m], alpha=0.9 if i == 0 else 0.35, label=LABELS[m] if i == 0 else None)
    fl = sum(summary["lora_floor"]) / len(summary["lora_floor"])
    ax[0].axhline(fl, color="tab:blue", ls="--", lw=1, label=f"LoRA floor at r={cfg['rank']} (Eckart–Young)")
    ax[0].axhline(summary["noise_floor"], color="gray", ls=":", lw=1, label="noise floor σ² (best possible)")
    ax[0].set_yscale("log")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("population loss ‖W−T‖²/d + σ²")
    ax[0].set_title(f"Rank teacher d={cfg['dim']}, r={cfg['rank']}")
    ax[0].legend(fontsize=8)
    ax[1].axhline(cfg["rank"], color="tab:blue", ls="--", lw=1, label=f"r = {cfg['rank']}")
    ax[1].axhline(summary["target"]["rank_threshold"], color="gray", ls=":", lw=1, label="rank of T − W₀")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel(f"numerical rank of W − W₀ (σ > {cfg['rtol']:g}·σ_max)")
    ax[1].set_title("rank of the accumulated update")
    ax[1].legend(fontsize=8)
    idx = range(1, len(summary["target"]["spectrum"]) + 1)
    ax[2].plot(idx, summary["target"]["spectrum"], color="gray", ls=":", label="target T − W₀")
    rel = summary["runs"]["relora"][0]
    cyc = sorted(int(k) for k in rel["cycle_spectra"])
    show = [c for c in (1, 2, 4, 8) if c in cyc]
    cmap = plt.get_cmap("Reds")
    for j, c in enumerate(show):
        ax[2].plot(idx, rel["cycle_spectra"][c] if c in rel["cycle_spectra"] else rel["cycle_spectra"][str(c)],
                   color=cmap(0.35 + 0.5 * j / max(1, len(show) - 1)), lw=1, label=f"ReLoRA* after {c} cycle(s)")
    for m in METHODS:
        ax[2].plot(idx, summary["runs"][m][0]["final_spectrum"], color=colors[m], lw=1.8, label=f"{LABELS[m]} (end)")
    ax[2].set_yscale("log")
    ax[2].set_ylim(1e-4, None)
    ax[2].set_xlabel("index i")
    ax[2].set_ylabel("σᵢ(W − W₀)")
    ax[2].set_title("spectrum of the accumulated update (seed 0)")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_markdown(summary: dict, plot_path: Path) -> str:
    from _report import provenance_lines

    cfg, f, g = summary["config"], summary["final"], summary["goals"]
    fl = sum(summary["lora_floor"]) / len(summary["lora_floor"])
    rel = plot_path.resolve().relative_to(HERE) if plot_path.resolve().is_relative_to(HERE) else plot_path
    lines = [
        "## Rank teacher: LoRA's floor, ReLoRA* and SST breaking through it",
        "",
        f"Student `W (d, d)` learns `y = T x + ε`, d = {cfg['dim']}, r = {cfg['rank']}, σ = {cfg['noise']}, "
        f"{cfg['steps']} AdamW steps of batch {cfg['batch_size']}, jagged cosine LR (floor {cfg['min_lr_ratio']}; "
        f"restart warmup {cfg['restart_warmup']} after each ReLoRA* cycle / SST iteration). LR picked per method from "
        f"{cfg['lrs']} and the period (ReLoRA* cycle, GaLore projection refresh, SST iteration) from {cfg['periods']} "
        f"steps, on seed {cfg['seeds'][0]}; the table is the mean over seeds {cfg['seeds']} of the "
        "exact population loss `‖W−T‖²/d + σ²` at the end.",
        "",
        "| method | best LR | best period | final loss (mean) | per seed | rank of W−W₀ (σ>1%·σ_max) | eff. rank (entropy) | trainable | optimizer state |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in METHODS:
        rs = summary["runs"][m]
        lines.append(
            f"| {LABELS[m]} | {summary['best_lr'][m]:g} | {summary['best_period'][m] or '—'} | {f[m]:.5f} | {', '.join(format(r['final_loss'], '.5f') for r in rs)} | "
            f"{rs[0]['final_rank_threshold']:.0f} | {rs[0]['final_rank_entropy']:.1f} | {rs[0]['trainable']} | "
            f"{rs[0]['optimizer_state_bytes']} B |")
    lines += [
        f"| *reference: LoRA floor (Eckart–Young, r={cfg['rank']})* | | | {fl:.5f} | | {cfg['rank']} | | | |",
        f"| *reference: noise floor σ²* | | | {summary['noise_floor']:.5f} | | {summary['target']['rank_threshold']:.0f} (T−W₀) | "
        f"{summary['target']['rank_entropy']:.1f} (T−W₀) | | |",
        "",
        "Goals (issue 4): ReLoRA* at least 10× below LoRA's floor: "
        f"**{g['relora_vs_lora_floor']:.1f}×** ({'met' if g['relora_vs_lora_floor'] >= 10 else 'NOT met'}); "
        f"within 2× of full rank: **{g['relora_vs_full']:.2f}×** ({'met' if g['relora_vs_full'] <= 2 else 'NOT met'}). "
        f"LoRA ends at {g['lora_vs_lora_floor']:.3f}× its theoretical floor. Goal (issue 12): SST at or below "
        f"ReLoRA*'s final loss: SST / ReLoRA* = **{g['sst_vs_relora']:.4f}** ({'met' if g['sst_vs_relora'] <= 1 else 'NOT met'}); "
        f"excess over the noise floor: SST {f['sst'] - summary['noise_floor']:.2e}, ReLoRA* {f['relora'] - summary['noise_floor']:.2e}. "
        "(Rank and spectrum columns: seed 0. Optimizer state: AdamW's `exp_avg`/`exp_avg_sq` of the trained tensors.)",
        "",
        f"The period sweep (seed {cfg['seeds'][0]}, final loss at the best LR for each period):",
        "",
        "| method | " + " | ".join(f"period {pe}" for pe in cfg["periods"]) + " |",
        "| --- |" + " --- |" * len(cfg["periods"]),
    ]
    for m in (m for m in CYCLED if m in summary["sweep"]):
        best_at = {pe: min(v for k, v in summary["sweep"][m].items() if k.endswith(f" period={pe}"))
                   for pe in cfg["periods"]}
        lines.append(f"| {LABELS[m]} | " + " | ".join(f"{best_at[pe]:.5f}" for pe in cfg["periods"]) + " |")
    lines += [
        "",
        f"![rank teacher]({rel})",
        "",
        provenance_lines(summary["provenance"]) + f"- wall time: {summary['wall_seconds']:.0f} s",
    ]
    return "\n".join(lines)


def output_paths(args) -> None:
    """Fill in ``args.out_dir``/``args.plot``: the tracked files only with ``--write`` (a plain run must not
    rewrite recorded results), else ``runs/rank_teacher/``."""
    scratch = Path("runs") / "rank_teacher"
    if args.out_dir is None:
        args.out_dir = HERE / "results" if args.write else scratch
    if args.plot is None:
        args.plot = HERE / "plots" / "rank_teacher.png" if args.write else args.out_dir / "rank_teacher.png"


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.dim, args.rank, args.steps, args.reset_every = 32, 4, 1200, 100
        args.lrs, args.seeds, args.eval_every, args.periods = [1e-2, 3e-2], [0], 100, [100]
        args.write = False
    output_paths(args)
    summary = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "rank_teacher.json").write_text(json.dumps(summary, indent=1))
    plot(summary, args.plot)
    g = summary["goals"]
    print("final loss: " + ", ".join(f"{LABELS[m]} {v:.5f}" for m, v in summary["final"].items())
          + f" | LoRA floor {sum(summary['lora_floor']) / len(summary['lora_floor']):.5f} | noise {summary['noise_floor']:.5f}")
    print(f"ReLoRA* is {g['relora_vs_lora_floor']:.1f}x below LoRA's floor (goal >= 10) and "
          f"{g['relora_vs_full']:.2f}x full rank's loss (goal <= 2); wall {summary['wall_seconds']:.0f} s")
    if args.write:
        from _report import write_section

        write_section("rank_teacher", results_markdown(summary, args.plot))
        print("wrote the rank_teacher section of benchmarks/RESULTS.md")
    return summary


if __name__ == "__main__":
    main()

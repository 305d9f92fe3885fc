"""How the period (ReLoRA* cycle, SST iteration) changes the language model's validation perplexity.

The LM benchmark (``train_lm.py``) runs every method at one ``--reset-every``. SST samples ``r`` of its ``m``
singular directions per iteration and needs ``m / r`` iterations for one round, so a short run with a long
period leaves it less than one round (150 steps at period 50, r = 32, m = 128: 3 iterations, 3/4 of a round).
This program reruns ReLoRA* and SST at several periods (not shorter than the first warmup, which the
schedule requires; the restart warmup a fixed share of the period),
the same model, data, LR and seeds as ``train_lm.py``, and writes one table to RESULTS.md:

    python benchmarks/train_lm_periods.py                                    # 150 steps, periods 15 25 50
    python benchmarks/train_lm_periods.py --steps 600 --warmup 30 --periods 30 50 150 --seeds 0 \\
        --restart-share 0.1 --section train_lm_periods_long
    python benchmarks/train_lm_periods.py --steps 3000 --warmup 60 --periods 100 500 --seeds 0 1 \\
        --restart-share 0.1 --section train_lm_periods_3k      # 6.1M tokens: ~2 h of one core
    python benchmarks/train_lm_periods.py --steps 3000 --warmup 60 --periods 100 500 --seeds 0 1 \\
        --restart-share 0.1 --methods relora relora_io --section train_lm_io_3k   # issue 22: head + embeddings adapted

Runs are cached with train_lm's own cache (the same JSON per configuration), so a period that equals the one
in train_lm's section reuses those runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import train_lm  # noqa: E402
from _report import table, write_section  # noqa: E402


def restart_warmup_for(period: int, share: float) -> int:
    return max(1, round(share * period))


def provenance_of(provs, argv) -> str:
    """One command (this program's; the runs are cached per configuration, some made by train_lm.py) and the
    range of commits, dates and loads the runs were made at."""
    cmd = " ".join(["python benchmarks/train_lm_periods.py", *(sys.argv[1:] if argv is None else argv)])
    commits = sorted({p["commit"] for p in provs})
    dates = sorted(p["date"] for p in provs)
    loads = [p["load_avg_at_start"] for p in provs]
    return (f"- command: `{cmd}`\n- runs made {dates[0]} … {dates[-1]} at commit(s) {', '.join(commits)}; "
            f"torch {provs[0]['torch']}; {provs[0]['threads']} thread(s) per run\n- machine: {provs[0]['machine']}; "
            f"1-min load average at the start of the runs {min(loads):.1f}–{max(loads):.1f} (CPU shared with other "
            f"jobs)\n")


def gap_closed(means, periods, full_ppl) -> str:
    """The issue-12 measure: the share of ReLoRA*'s perplexity gap to full rank that SST closes, per period
    and best against best; '' unless both ran."""
    if not any(k[0] == "sst" for k in means) or not any(k[0] == "relora" for k in means):
        return ""

    def closed(rl, sst):
        return f"{(rl - sst) / (rl - full_ppl):.0%}" if rl > full_ppl else "- (ReLoRA* not above full rank)"

    per = "; ".join(f"period {q}: {closed(means['relora', q], means['sst', q])}" for q in periods)
    best_rl = min(means["relora", q] for q in periods)
    best_sst = min(means["sst", q] for q in periods)
    return (f"Share of ReLoRA*'s gap to full rank that SST closes (issue 12's goal: at least 50%): {per}; "
            f"best period against best period: {closed(best_rl, best_sst)} (ReLoRA* {best_rl:.3f}, SST "
            f"{best_sst:.3f}, full rank {full_ppl:.3f}).\n\n")


def io_cost(means, periods) -> str:
    """Issue 22's measure: ReLoRA* with the head and embeddings adapted against ReLoRA* with them full rank
    (validation perplexity ratio per period); '' unless both ran."""
    if not any(k[0] == "relora_io" for k in means) or not any(k[0] == "relora" for k in means):
        return ""
    per = "; ".join(f"period {q}: {means['relora_io', q] / means['relora', q]:.3f}" for q in periods)
    return (f"Head and embeddings adapted, against ReLoRA* with them full rank (perplexity ratio; issue 22's goal: "
            f"at most 1.01): {per}.\n\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--periods", type=int, nargs="+", default=[15, 25, 50])
    p.add_argument("--methods", nargs="+", choices=("relora", "sst", "relora_io"), default=["relora", "sst"],
                   help="relora_io: ReLoRA* with the output head and the token embeddings adapted too (issue 22)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--restart-share", type=float, default=0.16,
                   help="restart warmup as a share of the period (train_lm's 150-step section: 8/50; 600-step: 15/150)")
    p.add_argument("--section", default="train_lm_periods")
    p.add_argument("--write-results", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    if min(args.periods) < args.warmup:
        p.error(f"--periods: each must be at least --warmup ({args.warmup}), got {args.periods}")

    base = train_lm.build_parser().parse_args(["--steps", str(args.steps), "--warmup", str(args.warmup)])
    if args.steps != 150:  # train_lm's long section evaluates every 50 steps; keep its cached runs usable
        base.eval_every = 50

    def runs(method, period):
        base.reset_every, base.restart_warmup = period, restart_warmup_for(period, args.restart_share)
        return [train_lm.get_run(base, train_lm.run_config(base, method, args.rank, args.lr, s)) for s in args.seeds]

    # full rank ignores the period, but its cache key holds one: train_lm's 150-step default (50/8), else the
    # 600-step section's 150/15 (so those cached runs are reused; longer runs keep the same convention)
    base.reset_every = train_lm.build_parser().get_default("reset_every") if args.steps == 150 else 150
    base.restart_warmup = train_lm.build_parser().get_default("restart_warmup") if args.steps == 150 else 15
    full = train_lm.run_config(base, "full", 0, args.lr, 0)
    full_ppl = train_lm._mean([train_lm.get_run(base, {**full, "seed": s})["val_ppl"] for s in args.seeds])

    rows, provs, means = [], [], {}
    for m in args.methods:
        row = [train_lm.LABELS[m]]
        for period in args.periods:
            rs = runs(m, period)
            provs += [r["provenance"] for r in rs]
            ppl = means[m, period] = train_lm._mean([r["val_ppl"] for r in rs])
            spread = (max(r["val_ppl"] for r in rs) - min(r["val_ppl"] for r in rs)) / 2
            pm = f" ± {spread:.3f}" if len(rs) > 1 else ""
            row.append(f"{ppl:.3f}{pm} ({ppl / full_ppl:.3f})")
        rows.append(row)

    m_dirs = base.dim  # every adapted projection here has min(out, in) = dim
    head = ["method"] + [f"period {q} ({args.steps // q} iterations; SST rounds {args.steps / q / (m_dirs / args.rank):.1f})"
                         for q in args.periods]
    md = (f"## Language model, {args.steps} steps: the period of ReLoRA* and SST\n\n"
          f"The model, data and token budget of train_lm ({args.steps} steps), r = {args.rank}, LR {args.lr:g}, seeds "
          f"{args.seeds}; the period is ReLoRA*'s cycle and SST's iteration (a new sample of r = {args.rank} of "
          f"m = {m_dirs} singular directions; a round is m / r = {m_dirs // args.rank} iterations), the restart warmup "
          f"{args.restart_share:.0%} of it. Each cell: validation perplexity per byte, mean ± half the range over seeds "
          f"(ppl / full rank's {full_ppl:.3f}).\n\n"
          + table(head, rows) + "\n\n" + gap_closed(means, args.periods, full_ppl) + io_cost(means, args.periods)
          + provenance_of(provs, argv) + "\n")
    print(md)
    if args.write_results:
        write_section(args.section, md)
    return rows


if __name__ == "__main__":
    main()

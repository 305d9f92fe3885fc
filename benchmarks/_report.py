"""Shared by the benchmark programs: provenance (command, commit, machine, date) and writing one delimited
section of ``benchmarks/RESULTS.md`` without touching the others."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.rstrip()
    except Exception:  # pragma: no cover - not a git checkout
        return "unknown"


# AMD's x86 families by CPU family number (cpuid): a virtual machine may report only "AMD EPYC"
AMD_FAMILIES = {23: "Zen/Zen 2", 25: "Zen 3/Zen 4", 26: "Zen 5"}


def cpu_model() -> str:
    """The CPU's model name, with its family and model numbers (and AMD's core generation) where lscpu
    gives them: the name alone may not tell the microarchitecture."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        name = fields.get("Model name", "").strip()
        family, model = fields.get("CPU family", "").strip(), fields.get("Model", "").strip()
        if name and family.isdigit():
            gen = AMD_FAMILIES.get(int(family), "") if "AMD" in name else ""
            return f"{name} (family {family}, model {model}{', ' + gen if gen else ''})"
        if name:
            return name
    except Exception:  # pragma: no cover
        pass
    return platform.processor() or "unknown"


def provenance() -> dict:
    """The facts every figure in RESULTS.md comes with."""
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "commit": _git("describe", "--always", "--dirty", "--abbrev=7"),
        # tracked files with uncommitted changes when the run started (others may be editing the tree)
        "dirty_files": [ln[3:] for ln in _git("status", "--porcelain", "--untracked-files=no").splitlines() if ln],
        "machine": f"{cpu_model()}, {os.cpu_count()} logical cores",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def provenance_lines(prov: dict) -> str:
    dirty = prov.get("dirty_files") or []
    note = f" (uncommitted changes in: {', '.join(dirty)})" if dirty else ""
    return (f"- command: `{prov['command']}`\n- commit: `{prov['commit']}`{note}; torch {prov['torch']}; "
            f"{prov['threads']} thread(s)\n- machine: {prov['machine']}; 1-min load average at start "
            f"{prov['load_avg_at_start']:.2f} (CPU shared with other jobs)\n- date: {prov['date']}\n")


def table(head, rows) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def context(*extra: str) -> str:
    """One line of provenance for a table: date, commit, machine, threads, versions (+ ``extra``)."""
    import relora_ext

    prov = provenance()  # the commit reads "<sha>-dirty" when tracked files had changes
    parts = [prov["date"], f"commit {prov['commit']}", prov["machine"], f"{prov['threads']} threads",
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}", f"torch {prov['torch']}",
             f"relora_ext {relora_ext.__version__}", *extra]
    return ", ".join(parts)


def write_section(name: str, text: str, path: Path = RESULTS_MD) -> None:
    """Replace (or append) the block between ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    new = pat.sub(lambda _: block, old) if pat.search(old) else old.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)

"""Run the demo as `make demo` does (`python -m relora_ext.demo`, default settings) and record its figures in
the `demo` section of benchmarks/RESULTS.md, with the machine, date and commit.

    python benchmarks/demo_results.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import provenance, provenance_lines, write_section  # noqa: E402


def main() -> None:
    prov = provenance()
    out = Path(tempfile.mkdtemp(prefix="relora_demo."))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "relora_ext.demo", "--out-dir", str(out), "--no-progress"], check=True)
    wall = time.perf_counter() - t0
    s = json.loads((out / "summary.json").read_text())
    print(json.dumps(s, indent=1)[:3000])
    keys = {k: s.get(k) for k in s if not isinstance(s.get(k), (list, dict))}
    rows = "\n".join(f"| {k} | {v} |" for k, v in keys.items())
    text = ("## The demo (`make demo`)\n\n"
            "`python -m relora_ext.demo` with its defaults, run by `python benchmarks/demo_results.py` "
            f"(wall time of the whole command, start-up included: {wall:.0f} s).\n\n"
            "| summary.json field | value |\n| --- | --- |\n" + rows + "\n\n" + provenance_lines(prov))
    write_section("demo", text)


if __name__ == "__main__":
    main()

"""Every ```python block of the README runs as written (each in a fresh process, in a scratch directory)."""

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_has_snippets():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index, tmp_path):
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"README block {index} failed:\n{BLOCKS[index]}\n{proc.stderr[-3000:]}"


def test_quickstart_block_shows_its_progress(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", BLOCKS[0]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 4 and "cycles 4" in lines[-1], proc.stdout     # a line per cycle: loss, lr, cycles


def test_readme_points_to_the_notebook():
    text = README.read_text()
    assert "examples/quickstart.ipynb" in text and (README.parent / "examples" / "quickstart.ipynb").exists()


def test_benchmark_run_as_shown_rewrites_no_tracked_file():
    sys.path.insert(0, str(README.parent / "benchmarks"))
    try:
        import rank_teacher
    finally:
        sys.path.pop(0)
    tracked = README.parent / "benchmarks"
    plain = rank_teacher.build_parser().parse_args([])
    rank_teacher.output_paths(plain)                 # `python benchmarks/rank_teacher.py`, as the README shows it
    assert tracked not in plain.out_dir.resolve().parents and tracked not in plain.plot.resolve().parents
    assert not plain.write
    recorded = rank_teacher.build_parser().parse_args(["--write"])
    rank_teacher.output_paths(recorded)
    assert recorded.out_dir == tracked / "results" and recorded.plot == tracked / "plots" / "rank_teacher.png"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_after_make_demo_does_not_build_again(tmp_path):
    shutil.copy(README.parent / "Makefile", tmp_path)
    shutil.copy(README.parent / "pyproject.toml", tmp_path)
    for f in ("setup.py", "csrc/kernels/levels.txt", "csrc/kernels/merge.c"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("")
    for f in ("setup.py", "pyproject.toml", "csrc/kernels/levels.txt", "csrc/kernels/merge.c"):
        os.utime(tmp_path / f, (1e9, 1e9))
    (tmp_path / ".venv").mkdir()
    for marker, t in ((".deps", 2e9), (".built", 2e9 + 1)):       # what `make demo` left: the package built
        (tmp_path / ".venv" / marker).write_text("")
        os.utime(tmp_path / ".venv" / marker, (t, t))
    plan = subprocess.run(["make", "-n", "test"], cwd=tmp_path, capture_output=True, text=True, timeout=60).stdout
    assert "-m pip install" in plan and "pytest" in plan                # the test extras, then the tests
    assert "--no-build-isolation -e" not in plan, plan                  # no second build of the extension

"""The demo: corpus checks and a tiny smoke run (a few steps, seconds)."""

import gzip
import json
import subprocess
import sys
import warnings

import pytest
import torch

from relora_ext import demo
from relora_ext import wrap
from relora_ext.tiny_llama import TinyLlama, TinyLlamaConfig

TINY = ["--steps", "6", "--reset-every", "3", "--dim", "32", "--layers", "1", "--heads", "2", "--rank", "4",
        "--seq-len", "32", "--batch-size", "4", "--eval-windows", "8", "--eval-every", "3", "--warmup", "1",
        "--restart-warmup", "1", "--no-progress", "--threads", "0"]


def test_corpus_checksum_and_split():
    train, val = demo.load_austen()
    assert val.startswith(b"Persuasion\n") and b"PRIDE AND PREJUDICE" not in val
    assert 400_000 < len(val) < 550_000 and b"Persuasion\n" not in train
    assert train.startswith(b"EMMA") and b"PRIDE AND PREJUDICE" in train
    assert len(train) + len(val) + 1 == 4_025_034  # every byte of the corpus, one joining newline less


def test_corrupt_corpus_is_a_clear_error(tmp_path):
    bad = tmp_path / "austen.txt.gz"
    bad.write_bytes(gzip.compress(b"EMMA\n\nnot the corpus\n"))
    with pytest.raises(ValueError, match=r"sha256 mismatch for .*austen.txt.gz.*expected a5e8dcac.*got "):
        demo.load_austen(bad)
    with pytest.raises(ValueError, match="no title line 'Persuasion'"):
        demo.load_austen(bad, sha256=None)


def test_tiny_llama_wrap_selection():
    model = wrap(TinyLlama(TinyLlamaConfig(dim=32, n_layers=2, n_heads=2)), r=4)
    names = [n for n, m in model.named_modules() if type(m).__name__ == "LoRALinear"]
    assert len(names) == 2 * 7 and "lm_head" not in names
    assert model(torch.randint(0, 256, (2, 16))).shape == (2, 16, 256)


def test_demo_smoke_run(tmp_path, capsys):
    summary = demo.main(TINY + ["--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "val" in out and "cycles 2" in out and "peak RSS" in out
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["cycles_done"] == 2 == summary["cycles_done"]
    assert saved["val_loss_end"] < saved["val_loss_start"]
    assert [h["step"] for h in saved["history"]] == [0, 3, 6]


def test_demo_runs_as_module(tmp_path):
    r = subprocess.run([sys.executable, "-m", "relora_ext.demo", *TINY, "--mode", "full", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "done: val loss" in r.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["cycles_done"] == 0


@pytest.mark.parametrize("mode, reset_every", [("full", "3"), ("lora", "3"), ("relora", "2")])
def test_demo_schedule_follows_its_resets_without_a_stray_warning(tmp_path, mode, reset_every):
    args = TINY + ["--mode", mode, "--reset-every", reset_every, "--warmup", "5", "--out-dir", str(tmp_path)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = demo.main(args)
    assert not [str(w.message) for w in caught if "JaggedCosineLR" in str(w.message)]
    if mode == "relora":      # --reset-every 2 < --warmup 5: the re-warmups still follow the resets
        assert summary["cycles_done"] == 3
        lrs = {h["step"]: h["lr"] for h in summary["history"]}
        assert lrs[6] == 0.0  # step 6 ends a cycle: the LR restarts from 0 there

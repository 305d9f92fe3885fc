"""transformers.Trainer under torchrun (issue 21): two gloo processes with the README's recipe
(examples/train_trainer.py) train and cycle identically on both ranks, print each cycle on the console,
keep the unmerged training state in the Trainer's checkpoints, resume bit-identically and save the merged
model at the end."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent


def torchrun(out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "train_trainer.py"), "--out", str(out), "--steps", "8", "--reset-every", "3",
           "--save-steps", "4", *extra]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_two_process_trainer_cycles_identically_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    import relora_ext

    out = torchrun(tmp_path / "a")
    # each cycle once on the console (rank 0 only), in the Trainer's own format
    assert out.count("{'relora/cycle': 0, 'relora/kept': ") == 1 and out.count("{'relora/cycle': 1, ") == 1
    resumed = torchrun(tmp_path / "b", "--resume", str(tmp_path / "a" / "checkpoint-4"))
    assert "{'relora/cycle': 0" not in resumed and "{'relora/cycle': 1, " in resumed
    runs = [torch.load(tmp_path / d / f"final-rank{r}.pt") for d in "ab" for r in (0, 1)]
    ref = runs[0]["model"]
    for run in runs:
        assert run["cycles_done"] == 2 and run["model"].keys() == ref.keys()
        assert all(torch.equal(v, ref[k]) for k, v in run["model"].items())    # bit-identical: ranks and resume
    assert any("lora_A" in k for k in load_file(tmp_path / "a" / "checkpoint-4" / "model.safetensors"))
    final = tmp_path / "a" / "final"                            # trainer.save_model: the merged model
    plain, info = transformers.LlamaForCausalLM.from_pretrained(final, output_loading_info=True)
    assert not any(info.values()), info
    cfg = transformers.LlamaConfig.from_pretrained(final)
    wrapped = relora_ext.wrap(transformers.LlamaForCausalLM(cfg), r=4)
    wrapped.load_state_dict(ref)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(plain.eval()(ids).logits, wrapped.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_two_process_trainer_cycles_a_peft_model_identically(tmp_path):
    pytest.importorskip("peft")
    out = torchrun(tmp_path, "--peft")
    assert out.count("{'relora/cycle': 0, 'relora/kept': ") == 1 and out.count("{'relora/cycle': 1, ") == 1
    ranks = [torch.load(tmp_path / f"final-rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["cycles_done"] == ranks[1]["cycles_done"] == 2
    assert any("lora_A" in k for k in ranks[0]["model"])
    assert all(torch.equal(v, ranks[1]["model"][k]) for k, v in ranks[0]["model"].items())
    _, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "final", output_loading_info=True)
    assert not any(info.values()), info


def test_train_ddp_logs_the_rate_each_step_trained_with():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "train_ddp.py"), "--steps", "20", "--reset-every", "5", "--log-every", "5",
           "--dim", "32", "--layers", "1", "--heads", "2", "--rank", "4", "--seq-len", "16", "--batch-size", "4",
           "--warmup", "2", "--restart-warmup", "2", "--eval-windows", "0", "--threads", "1"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lrs = [float(line.split("| lr ")[1].split()[0]) for line in run.stdout.splitlines() if "| lr " in line]
    assert len(lrs) == 4 and all(lr > 0 for lr in lrs), run.stdout    # each line ends a cycle: not its next LR, 0

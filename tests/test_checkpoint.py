"""Checkpoints: atomic writes and bit-identical resume mid-cycle."""

import os

import pytest
import torch
from torch import nn

from relora_ext import JaggedCosineLR, ReLoRAOptimizer, atomic_save, load_checkpoint, save_checkpoint, wrap

RESET_EVERY = 6


def build(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(32, 16), nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 16),
                          nn.LayerNorm(16), nn.Linear(16, 32))
    wrap(model, r=2, dropout=0.1, target_modules=["1", "4"])
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), model, reset_every=RESET_EVERY)
    sched = JaggedCosineLR(opt, total_steps=40, warmup_steps=3, cycle_length=RESET_EVERY, restart_warmup_steps=2)
    return model, opt, sched


def run(model, opt, sched, gen, steps):
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 32, (8, 5), generator=gen)  # data order from a generator we checkpoint
        logits = model(ids)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(1, 1).flatten())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_resume_mid_cycle_is_bit_identical(tmp_path):
    model, opt, sched = build(0)
    gen = torch.Generator().manual_seed(1)
    full = run(model, opt, sched, gen, 20)

    model, opt, sched = build(0)
    gen = torch.Generator().manual_seed(1)
    first = run(model, opt, sched, gen, 9)  # 9 = 1.5 cycles: mid-cycle
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model=model, optimizer=opt, scheduler=sched, extra={"step": 9, "gen": gen.get_state()})
    torch.rand(100)  # disturb the global RNG; the checkpoint restores it

    model2, opt2, sched2 = build(123)  # fresh objects, different init
    extra = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert extra["step"] == 9 and opt2.cycles_done == 1 and opt2.steps_taken == 9
    gen2 = torch.Generator()
    gen2.set_state(extra["gen"])
    rest = run(model2, opt2, sched2, gen2, 11)
    assert first + rest == full  # bit-identical floats
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert a.shape == b.shape


def test_atomic_save_replaces_and_cleans_up(tmp_path):
    path = tmp_path / "sub" / "x.pt"
    atomic_save({"a": torch.ones(2)}, path)
    atomic_save({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path)["a"], torch.zeros(2))
    with pytest.raises(Exception):
        atomic_save({"bad": lambda: 0}, path)  # unpicklable: the write fails
    assert torch.equal(torch.load(path)["a"], torch.zeros(2))  # old file intact
    assert os.listdir(path.parent) == ["x.pt"]  # no temporary left behind


def test_load_rejects_foreign_file_and_missing_state(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"model": {}}, path)
    model, opt, sched = build(0)
    with pytest.raises(ValueError, match="is not a relora_ext.checkpoint/2 checkpoint"):
        load_checkpoint(path, model=model)
    save_checkpoint(tmp_path / "m.pt", model=model)
    with pytest.raises(ValueError, match="optimizer given but .* holds no optimizer state"):
        load_checkpoint(tmp_path / "m.pt", model=model, optimizer=opt)


def test_safetensors_checkpoint_resumes_like_torch_save(tmp_path):
    """save_checkpoint(safetensors=True): same content (digest-checked), same bit-identical resume."""
    model, opt, sched = build(0)
    gen = torch.Generator().manual_seed(1)
    run(model, opt, sched, gen, 9)
    for name, st in (("a.pt", False), ("a.safetensors", True)):
        save_checkpoint(tmp_path / name, model=model, optimizer=opt, scheduler=sched,
                        extra={"gen": gen.get_state(), "t": (1, None)}, safetensors=st)
    with open(tmp_path / "a.safetensors", "rb") as f:
        assert f.read(4) != b"PK\x03\x04"           # not a pickle archive
    runs = []
    for name in ("a.pt", "a.safetensors"):
        m, o, s = build(1)
        extra = load_checkpoint(tmp_path / name, model=m, optimizer=o, scheduler=s)
        assert extra["t"] == (1, None) and o.steps_taken == 9
        g = torch.Generator()
        g.set_state(extra["gen"])
        runs.append(run(m, o, s, g, 6))
    assert runs[0] == runs[1]

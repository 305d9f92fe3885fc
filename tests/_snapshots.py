"""What the all-or-nothing tests share: a small wrapped model, a few training steps, and a bit-exact
snapshot of everything a refused call must leave as it was (weights, module types, optimizer state,
counters, hyper-parameters)."""

import torch
from torch import nn

from relora_ext import ReLoRAOptimizer, wrap

COUNTERS = ("steps_taken", "cycles_done", "last_cycle_step", "last_prune_kept", "last_prune_total")


def make_model(n_layers=3, seed=0, r=2, alpha=None, d=8):
    """``n_layers`` × (Linear(d, d), Tanh), every linear layer wrapped."""
    torch.manual_seed(seed)
    mods = []
    for _ in range(n_layers):
        mods += [nn.Linear(d, d), nn.Tanh()]
    return wrap(nn.Sequential(*mods), r=r, alpha=alpha, target_modules=lambda n, m: True)


def trained(model, steps=3, reset_every=100, opt_cls=torch.optim.AdamW, **opt_kw):
    """A ReLoRAOptimizer over ``model`` after ``steps`` steps (so that it holds state)."""
    opt = ReLoRAOptimizer(opt_cls(model.parameters(), lr=1e-2, **opt_kw), model, reset_every=reset_every)
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        model(torch.randn(5, 8, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def _bits(t):
    t = t.detach()
    return t.cpu().contiguous().reshape(-1).view(torch.uint8).clone() if t.device.type != "meta" else t.shape


def snapshot(model, opt=None):
    snap = {f"model.{k}": _bits(v) for k, v in model.state_dict().items()}
    snap["types"] = [type(m).__name__ for m in model.modules()]
    if opt is not None:
        for i, (p, s) in enumerate(opt.state.items()):
            for k, v in s.items():
                snap[f"state{i}.{k}"] = _bits(v) if isinstance(v, torch.Tensor) else v
        for k in COUNTERS:
            snap[k] = getattr(opt, k)
        snap["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return snap


def assert_unchanged(before, after):
    assert before.keys() == after.keys()
    for k in before:
        a, b = before[k], after[k]
        same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        assert same, f"{k} changed"

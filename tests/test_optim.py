"""ReLoRAOptimizer: the merge/reset/prune cycle, optimizer protocol, schedulers, GradScaler, errors."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import relora_ext
from relora_ext import JaggedCosineLR, LoRALinear, ReLoRAOptimizer, lora_layers, wrap
from relora_ext.optim import prune_offset, reset_offset


def make_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 24), nn.GELU(), nn.LayerNorm(24), nn.Linear(24, 6))
    return wrap(model, r=3, dropout=dropout, target_modules=["0", "2"])


TEACHER = torch.randn(6, 12, generator=torch.Generator().manual_seed(1234)) * 0.5


def batches(n, seed=1, bs=16):
    """n batches (x (bs, 12), y (bs, 6)) of one fixed smooth teacher; the seed picks the inputs."""
    g = torch.Generator().manual_seed(seed)
    teacher = TEACHER
    for _ in range(n):
        x = torch.randn(bs, 12, generator=g)
        yield x, torch.sin(x @ teacher.T)


def train(model, opt, n, sched=None, seed=1):
    losses = []
    for x, y in batches(n, seed):
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
}


@pytest.mark.parametrize("guard", [False, True])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cycle_prunes_adapter_state_only(name, guard):
    model = make_model()
    inner = OPTIMIZERS[name](model.parameters())
    opt = ReLoRAOptimizer(inner, model, reset_every=3, prune_ratio=0.9, prune_guard=guard)
    layers = [m for _, m in lora_layers(model)]
    adapters = {id(p) for m in layers for p in (m.lora_A, m.lora_B)}
    snap = {}

    def snapshot(o, args, kwargs):  # inner post-hook: after the inner step, before the cycle
        snap.clear()
        for p, st in o.state.items():
            snap[p] = {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in st.items()}

    inner.register_step_post_hook(snapshot)
    train(model, opt, 2)
    assert opt.cycles_done == 0
    train(model, opt, 1, seed=2)
    assert opt.cycles_done == 1 and opt.steps_taken == 3
    expected_kept = 0
    n_pruned = 0
    for p, st in inner.state.items():
        for k, v in st.items():
            before = snap[p][k]
            if id(p) in adapters and torch.is_tensor(v) and v.shape == p.shape:
                n = v.numel()
                keep = n - math.floor(0.9 * n)
                n_pruned += 1
                top = torch.sort(before.abs().flatten(), descending=True, stable=True).indices[:keep]
                if guard and k == "exp_avg":  # zeroed where the second moment was zeroed, else the top-k
                    second = st["exp_avg_sq"] if "max_exp_avg_sq" not in st else st["exp_avg_sq"].abs() + st["max_exp_avg_sq"]
                    expect = torch.zeros_like(before).flatten()
                    expect[top] = before.flatten()[top]
                    expect[second.flatten() == 0] = 0
                    assert torch.equal(v.flatten(), expect)
                    expected_kept += int(torch.count_nonzero(expect))
                    continue
                expected_kept += keep
                assert torch.count_nonzero(v) == keep, (k, p.shape)
                # the kept entries are the largest magnitudes, with unchanged values
                assert torch.equal(v.flatten()[top], before.flatten()[top])
            elif torch.is_tensor(v):
                assert torch.equal(v, before), (k, p.shape)  # other params and scalar state bit-identical
            else:
                assert v == before
    assert n_pruned == len(layers) * 2 * (3 if name == "adam_amsgrad" else 1 if name == "sgd_momentum" else 2)
    assert opt.last_prune_kept == expected_kept
    for m in layers:
        assert torch.count_nonzero(m.lora_B) == 0


def test_cycle_preserves_function_and_is_per_layer_per_cycle():
    model = make_model()
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=2, seed=7)
    x = torch.randn(5, 12)
    outs = []
    opt.optimizer.register_step_post_hook(lambda o, a, k: outs.append(model(x).detach()))
    train(model, opt, 2)
    assert_close(model(x), outs[-1], rtol=1e-5, atol=1e-6)
    l0, l1 = (m for _, m in lora_layers(model))
    A0_c0 = l0.lora_A.detach().clone()
    train(model, opt, 2)
    assert not torch.equal(l0.lora_A, A0_c0)
    # the draws are exactly those of (seed, reset_offset(layer, cycle))
    for li, m in enumerate((l0, l1)):
        A = torch.empty_like(m.lora_A)
        B = torch.empty_like(m.lora_B)
        from relora_ext import ops

        ops.reset_(A, B, std=m.init_std, seed=7, offset=reset_offset(li, 1))
        assert torch.equal(A, m.lora_A)
    assert reset_offset(2, 5) == 2 * 2**32 + 5 and prune_offset(1, 2, 3) == 2**62 + 18 * 2**32 + 3


def test_saddle_after_reset_and_rank_growth():
    torch.manual_seed(0)
    d, r, k = 16, 2, 4
    layer = LoRALinear(d, d, r=r, bias=False)
    W0 = layer.weight.detach().double().clone()
    target = torch.randn(d, d) / d**0.5
    opt = ReLoRAOptimizer(torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.0), layer, reset_every=25)
    sched = JaggedCosineLR(opt, total_steps=25 * k, warmup_steps=5, cycle_length=25, restart_warmup_steps=5)
    for step in range(25 * k):
        x = torch.randn(32, d)
        loss = (layer(x) - x @ target.T).square().mean()
        loss.backward()
        if step > 0 and step % 25 == 0:  # first backward after a reset
            assert torch.count_nonzero(layer.lora_A.grad) == 0
            assert torch.count_nonzero(layer.lora_B.grad) > 0
        opt.step()
        sched.step()
        opt.zero_grad()
    assert opt.cycles_done == k
    rank = torch.linalg.matrix_rank(layer.weight.detach().double() - W0, rtol=1e-6).item()
    assert r < rank <= k * r


def test_reset_every_longer_than_run_equals_plain_lora():
    m1, m2 = make_model(dropout=0.1), make_model(dropout=0.1)
    torch.manual_seed(3)
    l1 = train(m1, torch.optim.AdamW(m1.parameters(), lr=1e-2), 20)
    torch.manual_seed(3)
    opt = ReLoRAOptimizer(torch.optim.AdamW(m2.parameters(), lr=1e-2), m2, reset_every=21)
    l2 = train(m2, opt, 20)
    assert l1 == l2
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def test_training_loop_reduces_validation_loss():
    model = make_model()
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=40)
    sched = JaggedCosineLR(opt, total_steps=200, warmup_steps=10, cycle_length=40, restart_warmup_steps=5)
    xv, yv = next(iter(batches(1, seed=99, bs=256)))
    with torch.no_grad():
        v0 = (model(xv) - yv).square().mean().item()
    train(model, opt, 200, sched)
    with torch.no_grad():
        v1 = (model(xv) - yv).square().mean().item()
    assert opt.cycles_done == 5
    assert v1 < 0.7 * v0


@pytest.mark.parametrize("mode", ["random", "reset"])
def test_other_prune_modes(mode):
    runs = []
    for _ in range(2):
        model = make_model()
        opt = ReLoRAOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model, reset_every=2, prune=mode,
                              prune_ratio=0.5, seed=11, prune_guard=False)
        train(model, opt, 2)
        runs.append([st["exp_avg"].clone() for p, st in opt.state.items() if p.dim() == 2 and p.requires_grad])
        if mode == "reset":
            assert opt.last_prune_kept == 0
            assert all(torch.count_nonzero(t) == 0 for t in runs[-1][:4])
        else:
            assert 0.35 < opt.last_prune_kept / opt.last_prune_total < 0.65
    for a, b in zip(*runs):
        assert torch.equal(a, b)  # deterministic from the seed


def test_optimizer_protocol_and_state_dict():
    model = make_model()
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=3)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.optimizer.param_groups and opt.state is opt.optimizer.state
    assert opt.defaults["lr"] == 1e-2
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    train(model, opt, 4)
    assert calls == ["pre", "post"] * 4
    sd = opt.state_dict()
    assert sd["relora"]["steps_taken"] == 4 and sd["relora"]["cycles_done"] == 1
    model2 = copy.deepcopy(model)
    opt2 = ReLoRAOptimizer(torch.optim.AdamW(model2.parameters(), lr=1e-2), model2, reset_every=3)
    opt2.load_state_dict(copy.deepcopy(sd))
    assert (opt2.steps_taken, opt2.cycles_done, opt2.last_prune_kept) == (4, 1, opt.last_prune_kept)
    assert train(model, opt, 4, seed=5) == train(model2, opt2, 4, seed=5)
    extra = nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert len(opt.param_groups) == 2 and opt.optimizer.param_groups[1]["lr"] == 0.5
    extra.grad = torch.ones(3)
    opt.zero_grad()
    assert extra.grad is None
    assert "ReLoRAOptimizer(reset_every=3" in repr(opt)


def test_torch_lr_schedulers_work():
    model = make_model()
    opt = ReLoRAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, reset_every=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        train(model, opt, 4, sched)
    assert sched.get_last_lr() == [0.025]
    assert opt.optimizer.param_groups[0]["lr"] == 0.025


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_skipped_step_does_not_count(fused):
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    opt = ReLoRAOptimizer(inner, model, reset_every=3)
    sched = JaggedCosineLR(opt, total_steps=50, warmup_steps=0, cycle_length=3, restart_warmup_steps=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    layer0 = lora_layers(model)[0][1]
    lrs = []
    for i, (x, y) in enumerate(batches(6)):
        loss = (model(x) - y).square().mean()
        scaler.scale(loss).backward()
        if i == 1:
            layer0.lora_A.grad[0, 0] = float("inf")
        before = layer0.lora_B.detach().clone()
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad()
        if i == 1:
            assert torch.equal(layer0.lora_B, before)  # skipped
        lrs.append(opt.param_groups[0]["lr"])
    assert opt.steps_taken == 5 and opt.cycles_done == 1
    assert scaler.get_scale() < 2.0**8
    assert lrs[1] == lrs[0]  # the schedule did not advance on the skipped step


def test_errors():
    model = make_model()
    adamw = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="reset_every must be >= 1, got 0"):
        ReLoRAOptimizer(adamw, model, reset_every=0)
    with pytest.raises(TypeError, match="reset_every must be an int, got float"):
        ReLoRAOptimizer(adamw, model, reset_every=2.0)
    with pytest.raises(ValueError, match=r"prune_ratio must be a finite number in \[0.0, 1.0\], got 1.5"):
        ReLoRAOptimizer(adamw, model, reset_every=2, prune_ratio=1.5)
    with pytest.raises(ValueError, match="prune must be one of"):
        ReLoRAOptimizer(adamw, model, reset_every=2, prune="topk")
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        ReLoRAOptimizer(adamw, model, reset_every=2, seed=-1)
    no_adapters = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora" not in n])
    with pytest.raises(ValueError, match=r"does not hold 0.lora_A \(shape \(3, 12\)\)"):
        ReLoRAOptimizer(no_adapters, model, reset_every=2)
    plain = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="has no LoRALinear layer"):
        ReLoRAOptimizer(torch.optim.SGD(plain.parameters(), lr=0.1), plain, reset_every=2)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        ReLoRAOptimizer("adamw", model, reset_every=2)
    wrapped = ReLoRAOptimizer(adamw, model, reset_every=2)
    with pytest.raises(TypeError, match="already a ReLoRAOptimizer"):
        ReLoRAOptimizer(wrapped, model, reset_every=2)


def test_nonfinite_adapter_names_the_layer():
    model = make_model()
    opt = ReLoRAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, reset_every=1)
    train(model, opt, 1)
    with torch.no_grad():
        model[2].lora_A[0, 0] = float("nan")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cycle 1 refused.*layer '2'.*non-finite"):
        opt.restart()
    for k, v in model.state_dict().items():  # the cycle is all-or-nothing: layer '0' was not merged either
        assert torch.equal(v, state[k]) or (k == "2.lora_A")
    assert opt.cycles_done == 1


@pytest.mark.parametrize("guard", [True, False])
def test_prune_guard_prevents_adam_blowup_after_reset(guard):
    """Pruned independently, a kept exp_avg entry can lose its exp_avg_sq; with dL/dA = 0 right after a
    reset Adam then moves A by lr * m / eps. The guard (default) zeroes those exp_avg entries."""
    torch.manual_seed(0)
    d = 64
    layer = LoRALinear(d, d, r=8, bias=False)
    target = torch.randn(d, d) / d**0.5
    opt = ReLoRAOptimizer(torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.0), layer, reset_every=30,
                          prune_guard=guard)
    sched = JaggedCosineLR(opt, total_steps=60, warmup_steps=5, cycle_length=30, restart_warmup_steps=5)
    a_max = []
    for step in range(34):
        x = torch.randn(32, d)
        (layer(x) - x @ target.T).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        a_max.append(layer.lora_A.abs().max().item())
    st = opt.state[layer.lora_A]
    orphans = int(((st["exp_avg"] != 0) & (st["exp_avg_sq"] == 0)).sum())
    if guard:
        assert orphans == 0 and max(a_max[30:]) < 3 * max(a_max[:29])
    else:
        assert max(a_max[30:]) > 10 * max(a_max[:29])  # the hazard the guard exists for


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_bf16_model_cycle(rounding):
    torch.manual_seed(0)
    model = wrap(nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8)).to(torch.bfloat16), r=4,
                 target_modules=["0", "2"])
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=3, rounding=rounding)
    x = torch.randn(16, 32, dtype=torch.bfloat16)
    outs = []
    opt.optimizer.register_step_post_hook(lambda o, a, k: outs.append(model(x).detach().float()))
    for _ in range(3):
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert opt.cycles_done == 1 and model[0].weight.dtype == torch.bfloat16
    assert_close(model(x).float(), outs[-1], rtol=0.05, atol=0.05)
    assert opt.state_dict()["relora"]["rounding"] == rounding


# ------------------------------------------------------------------------------------------------
# load_state_dict refuses another configuration; float64 layers are refused before any cycle


def _tiny_relora(**kw):
    torch.manual_seed(0)
    model = relora_ext.wrap(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)),
                            r=2, target_modules=["0", "2"])
    return model, relora_ext.ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, **kw)


def test_load_state_dict_refuses_other_settings_and_keeps_state():
    model, opt = _tiny_relora(reset_every=3, seed=1)
    for _ in range(2):
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    saved = opt.state_dict()
    _, other = _tiny_relora(reset_every=5, seed=1)
    with pytest.raises(ValueError, match="saved with reset_every=3 but this optimizer has reset_every=5"):
        other.load_state_dict(saved)
    assert other.steps_taken == 0 and len(other.state) == 0
    _, same = _tiny_relora(reset_every=3, seed=1)
    same.load_state_dict(saved)
    assert same.steps_taken == 2
    same.load_state_dict(same.optimizer.state_dict())  # a plain inner state dict: counters restart
    assert same.steps_taken == 0 and same.cycles_done == 0


def test_float64_layers_refused_at_construction():
    model = relora_ext.wrap(torch.nn.Sequential(torch.nn.Linear(8, 8)).double(), r=2, target_modules=["0"])
    with pytest.raises(TypeError, match="weight is torch.float64"):
        relora_ext.ReLoRAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, reset_every=2)

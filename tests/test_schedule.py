"""JaggedCosineLR against the jagged-cosine formula of the reference ReLoRA code (README, the schedule)."""

import math

import pytest
import torch
from torch import nn

from relora_ext import JaggedCosineLR, ReLoRAOptimizer, wrap
from relora_ext.schedule import jagged_cosine


def reference_lambda(current_step, *, num_training_steps, first_warmup_steps, restart_warmup_steps,
                     restart_every, min_lr_ratio, adjust_step=0):
    """The reference ReLoRA code's `_get_cosine_schedule_with_multiple_warmups_lambda`, transcribed."""
    if current_step < first_warmup_steps:
        return float(current_step) / float(max(1, first_warmup_steps))
    _current_step = current_step + adjust_step
    restart_step = _current_step % restart_every
    restart_number = _current_step // restart_every
    if restart_step < restart_warmup_steps and current_step >= restart_every:
        end_of_warmup_progress = (float(restart_number * restart_every + restart_warmup_steps - first_warmup_steps)
                                  / float(max(1, num_training_steps - first_warmup_steps)))
        _cosine_decay = 0.5 * (1.0 + math.cos(math.pi * end_of_warmup_progress))
        warmup_lr_multiplier = min_lr_ratio + (1.0 - min_lr_ratio) * _cosine_decay
        return float(restart_step) / float(max(1, restart_warmup_steps)) * warmup_lr_multiplier
    progress = float(_current_step - first_warmup_steps) / float(max(1, num_training_steps - first_warmup_steps))
    cosine_decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine_decay


def guide_formula(t, N, W0, R, Wr, m):
    """The reference formula written out literally."""
    cos = lambda s: m + (1 - m) * 0.5 * (1 + math.cos(math.pi * (s - W0) / (N - W0)))  # noqa: E731
    if t < W0:
        return t / W0
    if t >= R and (t % R) < Wr:
        return ((t % R) / Wr) * cos((t // R) * R + Wr)
    return cos(t)


CONFIGS = [(1000, 100, 250, 50, 0.1), (300, 0, 70, 10, 0.0), (500, 20, 100, 0, 0.2), (97, 5, 13, 4, 0.5),
           (50, 10, 10, 10, 1.0)]


@pytest.mark.parametrize("N,W0,R,Wr,m", CONFIGS)
def test_function_matches_guide_and_reference(N, W0, R, Wr, m):
    for t in range(N + 1):
        f = jagged_cosine(t, total_steps=N, warmup_steps=W0, cycle_length=R, restart_warmup_steps=Wr, min_lr_ratio=m)
        assert f == pytest.approx(guide_formula(t, N, W0, R, Wr, m), abs=1e-15)
        if W0 > 0 and Wr > 0:
            ref = reference_lambda(t, num_training_steps=N, first_warmup_steps=W0, restart_warmup_steps=Wr,
                                   restart_every=R, min_lr_ratio=m)
            assert f == pytest.approx(ref, abs=1e-15)
    # past the planned end the factor holds the floor
    assert jagged_cosine(N + 1, total_steps=N, warmup_steps=W0, cycle_length=R, restart_warmup_steps=Wr,
                         min_lr_ratio=m) == m


def test_shape_of_schedule():
    kw = dict(total_steps=1000, warmup_steps=100, cycle_length=250, restart_warmup_steps=50, min_lr_ratio=0.1)
    f = [jagged_cosine(t, **kw) for t in range(1001)]
    assert f[0] == 0 and f[50] == 0.5 and f[100] == 1.0
    assert f[250] == 0.0 and f[500] == 0.0 and f[750] == 0.0  # restarts
    assert f[275] == pytest.approx(0.5 * f[300])  # linear re-warmup up to the envelope
    assert f[999] == pytest.approx(0.1, abs=1e-4) and f[1000] == 0.0  # N is a multiple of R: a restart


def test_scheduler_with_plain_optimizer_uses_step_calls():
    p1, p2 = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p1], "lr": 0.1}, {"params": [p2], "lr": 0.02}], lr=0.1)
    kw = dict(total_steps=60, warmup_steps=5, cycle_length=20, restart_warmup_steps=3, min_lr_ratio=0.1)
    sched = JaggedCosineLR(opt, **kw)
    for t in range(61):
        f = jagged_cosine(t, **kw)
        assert sched.get_last_lr() == pytest.approx([0.1 * f, 0.02 * f], abs=1e-15)
        opt.step()
        sched.step()


def test_scheduler_follows_relora_steps_and_resumes():
    torch.manual_seed(0)
    model = wrap(nn.Sequential(nn.Linear(4, 4)), r=1)
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, reset_every=10)
    kw = dict(total_steps=40, warmup_steps=4, cycle_length=10, restart_warmup_steps=2)
    sched = JaggedCosineLR(opt, **kw)
    for t in range(15):
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * jagged_cosine(t, min_lr_ratio=0.1, **kw))
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    sd = sched.state_dict()
    sched2 = JaggedCosineLR(opt, **kw)
    sched2.load_state_dict(sd)
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_errors_and_warning():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    ok = dict(total_steps=100, warmup_steps=10, cycle_length=20, restart_warmup_steps=5)
    with pytest.raises(ValueError, match=r"warmup_steps must be < total_steps \(100\), got 100"):
        JaggedCosineLR(opt, **{**ok, "warmup_steps": 100, "cycle_length": 100})
    with pytest.raises(ValueError, match=r"warmup_steps must be <= cycle_length \(20\).*got 30"):
        JaggedCosineLR(opt, **{**ok, "warmup_steps": 30})
    with pytest.raises(ValueError, match=r"restart_warmup_steps must be <= cycle_length \(20\), got 21"):
        JaggedCosineLR(opt, **{**ok, "restart_warmup_steps": 21})
    with pytest.raises(ValueError, match="cycle_length must be >= 1, got 0"):
        JaggedCosineLR(opt, **{**ok, "cycle_length": 0})
    with pytest.raises(TypeError, match="total_steps must be an int, got float"):
        JaggedCosineLR(opt, **{**ok, "total_steps": 100.0})
    with pytest.raises(ValueError, match=r"min_lr_ratio must be a finite number in \[0.0, 1.0\], got 1.5"):
        JaggedCosineLR(opt, **ok, min_lr_ratio=1.5)
    model = wrap(nn.Sequential(nn.Linear(4, 4)), r=1)
    ropt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters()), model, reset_every=30)
    with pytest.warns(UserWarning, match="cycle_length=20 differs from the optimizer's reset_every=30"):
        JaggedCosineLR(ropt, **ok)

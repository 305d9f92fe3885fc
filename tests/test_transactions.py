"""A refused operation changes nothing: the cycle, merge_and_reset_, unwrap, wrap and checkpoints as
transactions, version counters, meta tensors and torch.compile of the ops (issue 11)."""

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import relora_ext
from _snapshots import assert_unchanged, make_model, snapshot, trained
from relora_ext import CycleRefused, JaggedCosineLR, LoRALinear, ReLoRAOptimizer, lora_layers, ops, unwrap, wrap
from relora_ext.checkpoint import load_checkpoint, save_checkpoint
from relora_ext.cycle import prune_offset


# -- the cycle ---------------------------------------------------------------------------------------


def _noncontiguous_A(layer):
    with torch.no_grad():
        layer.lora_A.data = layer.lora_A.data.t().contiguous().t()


def _float64_state(opt, layer):
    st = opt.state[layer.lora_B]
    st["exp_avg"] = st["exp_avg"].double()


def _nan_B(layer):
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")


def _meta_weight(layer):
    layer.weight = nn.Parameter(torch.empty(layer.weight.shape, device="meta"), requires_grad=False)


def _many_state_tensors(opt, layer):
    st = opt.state[layer.lora_A]
    for i in range(16):
        st[f"extra{i}"] = torch.zeros_like(layer.lora_A)


def _A_of_another_shape(layer):
    layer.lora_A.data = torch.randn(3, layer.in_features)  # the merge would refuse it after earlier layers


def _expanded_weight(layer):
    layer.weight.data = torch.randn(1, layer.in_features).expand(layer.out_features, -1)


PLANTS = {
    "noncontiguous lora_A": (lambda opt, layer: _noncontiguous_A(layer), "must be contiguous"),
    "lora_A of another shape": (lambda opt, layer: _A_of_another_shape(layer), r"expected weight \(out, in\)"),
    "expanded weight": (lambda opt, layer: _expanded_weight(layer), "overlap"),
    "float64 optimizer state": (_float64_state, "torch.float64"),
    "NaN in lora_B": (lambda opt, layer: _nan_B(layer), "non-finite"),
    "meta weight": (lambda opt, layer: _meta_weight(layer), "different devices|meta"),
    "17 state tensors": (_many_state_tensors, "at most 16"),
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_refused_cycle_changes_nothing(plant):
    model = make_model()
    opt = trained(model)
    name, layer = lora_layers(model)[1]
    fn, match = PLANTS[plant]
    fn(opt, layer)
    before = snapshot(model, opt)
    with pytest.raises(CycleRefused, match=f"cycle 0 refused.*layer '{name}'.*({match})"):
        opt.restart()
    assert_unchanged(before, snapshot(model, opt))


def test_refused_cycle_keeps_counters_streams_and_schedule_consistent():
    """A cycle refused at its step: the step counts, the cycle does not, no LR re-warm; the next cycle draws
    the streams of cycle 0, as an uninterrupted run's first cycle does."""
    model, ref = make_model(), make_model()
    opt, opt_ref = trained(model, steps=0, reset_every=4), trained(ref, steps=0, reset_every=4)
    sched = JaggedCosineLR(opt, total_steps=40, warmup_steps=2, restart_warmup_steps=2)
    g = torch.Generator().manual_seed(3)
    for step in range(1, 5):
        model(torch.randn(5, 8, generator=g)).square().mean().backward()
        if step == 4:
            _nan_B(lora_layers(model)[2][1])
            with pytest.raises(CycleRefused):
                opt.step()
        else:
            opt.step()
        sched.step()
        opt.zero_grad()
    assert (opt.steps_taken, opt.cycles_done, opt.last_cycle_step) == (4, 0, 0)
    # no re-warm for the refused cycle: the factor is the cosine envelope, not 0
    assert sched.factor(4) == pytest.approx(relora_ext.schedule.jagged_cosine(
        4, total_steps=40, warmup_steps=2, cycle_length=4, restart_warmup_steps=2, restarted=False))
    assert sched.factor(4) > 0.5
    # the next cycle (after fixing the layer) draws cycle 0's A for every layer
    with torch.no_grad():
        lora_layers(model)[2][1].lora_B.zero_()
    opt.restart()
    opt_ref.restart()
    for (_, a), (_, b) in zip(lora_layers(model), lora_layers(ref)):
        assert torch.equal(a.lora_A, b.lora_A)
    assert opt.cycles_done == 1


@settings(max_examples=25, deadline=None)
@given(n_layers=st.integers(2, 5), bad=st.data(), plant=st.sampled_from(sorted(PLANTS)))
def test_property_one_bad_layer_anywhere_refuses_everything(n_layers, bad, plant):
    model = make_model(n_layers=n_layers, seed=n_layers)
    opt = trained(model, steps=2)
    position = bad.draw(st.integers(0, n_layers - 1))
    name, layer = lora_layers(model)[position]
    PLANTS[plant][0](opt, layer)
    before = snapshot(model, opt)
    with pytest.raises(CycleRefused, match=f"layer '{name}'"):
        opt.restart()
    assert_unchanged(before, snapshot(model, opt))


def test_layers_wrapped_after_the_optimizer_are_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    wrap(model, r=2, target_modules=["0"])
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=2)
    wrap(model, r=2, target_modules=["2"])
    model(torch.randn(3, 8)).sum().backward()
    before = snapshot(model, opt)
    with pytest.raises(CycleRefused, match=r"\['2'\] were wrapped after"):
        opt.step()
    assert_unchanged(before, snapshot(model, opt))


def test_prune_offset_refuses_tensor_index_16():
    prune_offset(0, 15, 0)
    with pytest.raises(ValueError, match="tensor_index"):
        prune_offset(0, 16, 0)


# -- one layer, unwrap, wrap ---------------------------------------------------------------------------


def test_merge_and_reset_refused_on_noncontiguous_B_changes_nothing():
    layer = LoRALinear(8, 6, r=2)
    with torch.no_grad():
        layer.lora_B.data = torch.randn(2, 6).t()  # non-contiguous (6, 2)
    x = torch.randn(4, 8)
    y = layer(x)
    before = snapshot(layer)
    with pytest.raises(CycleRefused, match="lora_B must be contiguous"):
        layer.merge_and_reset_(seed=0, offset=0)
    assert_unchanged(before, snapshot(layer))
    assert torch.equal(layer(x), y)


def test_unwrap_with_nan_in_a_later_layer_changes_nothing():
    model = make_model()
    trained(model)
    name, layer = lora_layers(model)[2]
    _nan_B(layer)
    before = snapshot(model)
    with pytest.raises(CycleRefused, match=f"unwrap.*layer '{name}'.*non-finite"):
        unwrap(model)
    assert_unchanged(before, snapshot(model))
    assert len(lora_layers(model)) == 3


def test_wrap_adapts_a_module_used_twice_once():
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    wrap(model, r=2, target_modules=["0"])
    assert isinstance(model[0], LoRALinear) and model[2] is model[0]
    opt = trained(model, steps=3)
    x = torch.randn(4, 8)
    y = model(x)
    opt.restart()
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)


def test_wrap_refuses_explicitly_targeted_tied_weights_and_changes_nothing():
    torch.manual_seed(0)
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    model = nn.Sequential(a, nn.Tanh(), b)
    with pytest.raises(ValueError, match=r"layer '0'.*shares memory with \['2'\]"):
        wrap(model, r=2, target_modules=["0", "2"])
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear and model[0].weight.requires_grad


def test_wrap_refused_for_one_layer_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="cannot adapt layer '1'"):
        wrap(model, r=4, target_modules=["0", "1"])
    assert type(model[0]) is nn.Linear and model[0].weight.requires_grad


def test_wrap_of_a_bare_linear_returns_its_adapter():
    lin = nn.Linear(4, 4)
    out = wrap(lin, r=2)
    assert isinstance(out, LoRALinear) and out.weight is lin.weight


# -- version counters, meta, torch.compile --------------------------------------------------------------


def test_stale_graph_after_merge_and_reset_raises():
    layer = LoRALinear(6, 6, r=2)
    with torch.no_grad():
        layer.lora_B.fill_(0.5)
    loss = layer(torch.randn(3, 6)).square().sum()
    layer.merge_and_reset_(seed=0, offset=0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("op", ["merge_", "reset_", "prune_"])
def test_ops_bump_the_version_of_what_they_write(op):
    W, A, B = torch.zeros(5, 4), torch.ones(2, 4), torch.ones(5, 2)
    versions = [t._version for t in (W, A, B)]
    if op == "merge_":
        ops.merge_(W, A, B, 1.0)
        written = [True, False, False]
    elif op == "reset_":
        ops.reset_(A, B, std=1.0, seed=0)
        written = [False, True, True]
    else:
        ops.prune_(W, 0.5)
        written = [True, False, False]
    for t, v, w in zip((W, A, B), versions, written):
        assert (t._version > v) == w


def test_ops_on_meta_tensors():
    W, A, B = (torch.empty(s, device="meta") for s in ((5, 4), (2, 4), (5, 2)))
    ops.merge_(W, A, B, 1.0)
    ops.reset_(A, B, std=0.1, seed=0, offset=1)
    kept = ops.prune_(W, 0.5)
    assert kept.device.type == "meta" and kept.dtype == torch.int64


def test_direct_ops_refuse_a_mix_of_meta_and_real_tensors():
    W, A, B = torch.randn(6, 5), torch.randn(2, 5), torch.randn(6, 2)
    W0, A0 = W.clone(), A.clone()
    with pytest.raises(ValueError, match="merge_: W, A and B must be on one device"):
        torch.ops.relora.merge_(W, A.to("meta"), B, 1.0, "nearest", 0)
    with pytest.raises(ValueError, match="reset_: A and B must be on one device"):
        torch.ops.relora.reset_(A, B.to("meta"), 1.0, 0, 0)
    with pytest.raises(ValueError, match="merge_: expected W"):
        torch.ops.relora.merge_(W.to("meta"), A.to("meta"), B[:5].to("meta"), 1.0, "nearest", 0)
    assert torch.equal(W, W0) and torch.equal(A, A0)


def test_lora_scalars_beyond_float32_are_refused_at_construction():
    for kw in ({"alpha": 1e39}, {"init_std": 1e39}):
        with pytest.raises(ValueError, match=f"LoRALinear: {next(iter(kw))} must be a finite number"):
            LoRALinear(8, 8, r=2, **kw)
        with pytest.raises(ValueError, match="must be a finite number"):
            relora_ext.ReLoRAConfig(r=2, **{("lora_alpha" if "alpha" in kw else "init_std"): 1e39})


def test_ops_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="eager")
    def cycle(W, A, B, s):
        ops.merge_(W, A, B, 0.5, seed=0)
        ops.reset_(A, B, std=0.1, seed=3, offset=2)
        ops.prune_(s, 0.5, mode="random", seed=1, offset=4)
        return ops.prune_(s, 0.5)

    W, A, B, s = torch.zeros(5, 4), torch.ones(2, 4), torch.ones(5, 2), torch.randn(16)
    W2, A2, B2, s2 = W.clone(), A.clone(), B.clone(), s.clone()
    kept = cycle(W, A, B, s)
    ops.merge_(W2, A2, B2, 0.5, seed=0)
    ops.reset_(A2, B2, std=0.1, seed=3, offset=2)
    ops.prune_(s2, 0.5, mode="random", seed=1, offset=4)
    assert int(kept) == ops.prune_(s2, 0.5)
    for a, b in ((W, W2), (A, A2), (B, B2), (s, s2)):
        assert torch.equal(a, b)


# -- checkpoints --------------------------------------------------------------------------------------


def _saved(tmp_path, **kw):
    model = make_model(**kw)
    opt = trained(model, steps=3, reset_every=2)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model=model, optimizer=opt, extra={"step": 3})
    return path


REFUSALS = {
    "other reset_every": (dict(), dict(reset_every=3), "reset_every"),
    "other seed": (dict(), dict(seed=5), "seed"),
    "other prune": (dict(), dict(prune="random"), "prune"),
    "other r": (dict(r=3), dict(), "r=3|shape"),
    "other alpha": (dict(alpha=8.0), dict(), "alpha=8.0"),
    "extra layer": (dict(n_layers=4), dict(), "not in the checkpoint|missing keys"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_load_changes_nothing(tmp_path, case):
    model_kw, opt_kw, match = REFUSALS[case]
    path = _saved(tmp_path)
    model = make_model(seed=1, **model_kw)
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model,
                          **{"reset_every": 2, **opt_kw})
    before = snapshot(model, opt)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path, model=model, optimizer=opt)
    assert_unchanged(before, snapshot(model, opt))
    assert torch.equal(torch.get_rng_state(), rng)


def test_adamw_checkpoint_into_sgd_is_refused(tmp_path):
    path = _saved(tmp_path)
    model = make_model(seed=1)
    opt = ReLoRAOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9), model, reset_every=2)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="AdamW.*SGD"):
        load_checkpoint(path, model=model, optimizer=opt)
    assert_unchanged(before, snapshot(model, opt))


def test_corrupted_and_truncated_checkpoints_are_refused(tmp_path):
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    model = make_model(seed=1)
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=2)
    before = snapshot(model, opt)
    # flip one bit inside a stored tensor (the data records of the zip archive hold the raw bytes)
    sd = torch.load(path, weights_only=True)
    needle = sd["model"]["0.weight"].numpy().tobytes()[:16]
    pos = bytes(data).find(needle)
    assert pos > 0
    flipped = bytearray(data)
    flipped[pos + 3] ^= 0x10
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupted"):
        load_checkpoint(bad, model=model, optimizer=opt)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_checkpoint(cut, model=model, optimizer=opt)
    assert_unchanged(before, snapshot(model, opt))
    load_checkpoint(path, model=model, optimizer=opt)  # the intact file loads


def test_unloadable_extra_is_refused_before_writing(tmp_path):
    model = make_model()
    path = tmp_path / "ckpt.pt"

    class Custom:
        pass

    with pytest.raises(TypeError, match=r"extra\['obj'\] \(Custom\)"):
        save_checkpoint(path, model=model, extra={"step": 1, "obj": Custom()})
    assert not path.exists() and not list(tmp_path.iterdir())


def test_killed_save_leaves_no_temporary_behind(tmp_path):
    path = tmp_path / "ckpt.pt"
    # a child process starts a save and is killed mid-write (SIGKILL: no cleanup runs)
    code = f"""
import os, signal, torch
from relora_ext import checkpoint
real = torch.save
def dying_save(obj, f):
    with open(f, "wb") as fh:
        fh.write(b"x" * 4096); fh.flush(); os.kill(os.getpid(), signal.SIGKILL)
checkpoint.torch.save = dying_save
checkpoint.atomic_save({{"a": torch.ones(3)}}, {str(path)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=False)
    stale = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1 and not path.exists()
    model = make_model()
    save_checkpoint(path, model=model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_optimizer_state_dict_hooks_run():
    model = make_model()
    opt = trained(model)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "tag": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    sd = opt.state_dict()
    assert sd["tag"] == 1 and calls == ["pre"]
    opt.load_state_dict(sd)
    assert calls == ["pre", "load_pre", "load_post"]

"""Every refused call changes nothing, and each layer kind owns its rules (issue 20).

One test per trigger the adversarial review found on the landed main (each failed there), and a property
test that plants one bad layer at a random position and checks the all-or-nothing rule of ``restart``,
``merge_and_reset_``, ``unwrap`` and ``load_checkpoint``.
"""

import ast
import os
import pathlib
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import relora_ext
from _snapshots import assert_unchanged, make_model, snapshot, trained
from relora_ext import CycleRefused, LoRALinear, ReLoRAOptimizer, lora_layers, unwrap, wrap
from relora_ext.checkpoint import _digest, atomic_save, load_checkpoint, save_checkpoint


# -- triggers planted in one layer: each makes the merge or the reset refuse ----------------------------


def _A_other_shape(layer):
    layer.lora_A.data = torch.randn(3, layer.in_features)


def _B_other_shape(layer):
    layer.lora_B.data = torch.randn(layer.out_features + 1, layer.r)


def _expanded_weight(layer):
    layer.weight.data = torch.randn(1, layer.in_features).expand(layer.out_features, -1)


def _weight_over_B(layer):
    # W (out, in) shares memory with B (out, r): a merge would read what it writes
    big = torch.randn(layer.out_features, layer.in_features)
    layer.weight.data = big
    layer.lora_B.data = big[:, : layer.r]


def _nan_A(layer):
    with torch.no_grad():
        layer.lora_A[0, 0] = float("nan")


def _A_of_another_dtype(layer):
    layer.lora_A.data = layer.lora_A.data.half()


TRIGGERS = {
    "lora_A of another shape": _A_other_shape,
    "lora_B of another shape": _B_other_shape,
    "expanded weight": _expanded_weight,
    "weight over lora_B": _weight_over_B,
    "NaN in lora_A": _nan_A,
    "lora_A of another dtype": _A_of_another_dtype,
}


@pytest.mark.parametrize("trigger", sorted(TRIGGERS))
def test_layer_check_names_the_trigger_and_merge_and_reset_changes_nothing(trigger):
    model = make_model(n_layers=1)
    layer = model[0]
    TRIGGERS[trigger](layer)
    assert layer.check() is not None
    before = snapshot(model)
    with pytest.raises(CycleRefused, match="LoRALinear.merge_and_reset_: refused, nothing was changed"):
        layer.merge_and_reset_(seed=0, offset=0)
    assert_unchanged(before, snapshot(model))


@settings(max_examples=30, deadline=None)
@given(n_layers=st.integers(2, 4), data=st.data(), trigger=st.sampled_from(sorted(TRIGGERS)))
def test_property_one_bad_layer_anywhere_changes_nothing(tmp_path_factory, n_layers, data, trigger):
    """restart, merge_and_reset_ of that layer, unwrap and load_checkpoint: all or nothing."""
    model = make_model(n_layers=n_layers, seed=n_layers)
    opt = trained(model)
    path = tmp_path_factory.mktemp("ckpt") / "good.pt"
    save_checkpoint(path, model=model, optimizer=opt)  # before the plant: a good checkpoint of this model
    position = data.draw(st.integers(0, n_layers - 1))
    name, layer = lora_layers(model)[position]
    TRIGGERS[trigger](layer)
    before = snapshot(model, opt)
    with pytest.raises(CycleRefused, match=f"cycle 0 refused, nothing was changed: layer '{name}'"):
        opt.restart()
    assert_unchanged(before, snapshot(model, opt))
    with pytest.raises(CycleRefused, match=f"unwrap: refused, nothing was changed: layer '{name}'"):
        unwrap(model)
    assert_unchanged(before, snapshot(model, opt))
    with pytest.raises(CycleRefused):
        layer.merge_and_reset_(seed=1, offset=2)
    assert_unchanged(before, snapshot(model, opt))
    try:  # the good checkpoint into the bad model: refused with nothing changed, or loaded whole
        load_checkpoint(path, model=model, optimizer=opt)
    except ValueError:
        assert_unchanged(before, snapshot(model, opt))
    else:
        saved = torch.load(path, weights_only=True)["model"]
        for k, v in model.state_dict().items():
            assert torch.equal(v, saved[k].to(v.dtype)), k


# -- settings: one source, checked when set -------------------------------------------------------------


@pytest.mark.parametrize("attr,value,error", [("init_std", True, TypeError), ("alpha", True, TypeError),
                                              ("init_std", 1e39, ValueError), ("alpha", -1.0, ValueError),
                                              ("alpha", float("nan"), ValueError)])
def test_bad_settings_are_refused_when_set(attr, value, error):
    layer = LoRALinear(8, 6, r=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 8)
    y = layer(x)
    old = getattr(layer, attr)
    with pytest.raises(error, match=attr):
        setattr(layer, attr, value)
    assert getattr(layer, attr) == old
    layer.merge_and_reset_(seed=0, offset=0)  # still a working layer; B·A counted once
    torch.testing.assert_close(layer(x), y)


def test_init_std_bounded_by_the_factor_dtype():
    layer = LoRALinear(8, 6, r=2, dtype=torch.float16)
    with pytest.raises(ValueError, match="init_std"):
        layer.init_std = 1e5  # a float16 draw would overflow to Inf
    with pytest.raises(ValueError, match="init_std"):
        LoRALinear(8, 6, r=2, dtype=torch.float16, init_std=1e5)


def test_scaling_follows_alpha_and_cannot_drift():
    layer = LoRALinear(8, 6, r=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 8)
    layer.alpha = 6.0
    assert layer.scaling == 3.0
    ref = x @ layer.weight.t() + layer.bias + 3.0 * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(layer(x), ref)
    with pytest.raises(AttributeError):
        layer.scaling = 1.0


def test_checkpoint_of_another_alpha_is_refused(tmp_path):
    model = make_model(n_layers=2)
    lora_layers(model)[1][1].alpha = 5.0  # set after construction: saved as it acts
    save_checkpoint(tmp_path / "c.pt", model=model)
    other = make_model(n_layers=2)
    before = snapshot(other)
    with pytest.raises(ValueError, match="alpha=5.0"):
        load_checkpoint(tmp_path / "c.pt", model=other)
    assert_unchanged(before, snapshot(other))


# -- unwrap ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trigger", ["expanded weight", "lora_A of another shape", "NaN in lora_A"])
def test_unwrap_with_a_bad_later_layer_leaves_the_model_wrapped(trigger):
    model = make_model(n_layers=2)
    TRIGGERS[trigger](model[2])
    before = snapshot(model)
    with pytest.raises(CycleRefused, match="layer '2'"):
        unwrap(model)
    assert [type(m).__name__ for m in (model[0], model[2])] == ["LoRALinear", "LoRALinear"]
    assert_unchanged(before, snapshot(model))


# -- wrap -----------------------------------------------------------------------------------------------


class TiedThroughStorage(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 6)
        self.dec = nn.Linear(6, 4)
        self.dec.weight = nn.Parameter(self.enc.weight.t())  # another Parameter over the same memory


@pytest.mark.parametrize("target", [["enc"], ["dec"], None])
def test_weights_tied_through_storage_are_not_adapted(target):
    model = TiedThroughStorage()
    if target is None:  # the default selection leaves tied layers alone: nothing else to adapt
        with pytest.raises(ValueError, match="no linear layer"):
            wrap(model, r=2)
    else:
        with pytest.raises(ValueError, match="shares memory with"):
            wrap(model, r=2, target_modules=target)
    assert type(model.enc) is nn.Linear and type(model.dec) is nn.Linear


@pytest.mark.parametrize("name", ["0", "2"])
def test_a_module_used_twice_can_be_targeted_by_either_name(name):
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    wrap(model, r=2, target_modules=[name])
    assert isinstance(model[0], LoRALinear) and model[0] is model[2]


def test_a_named_target_that_cannot_be_adapted_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"'1' \(LayerNorm\), which cannot be adapted"):
        wrap(model, r=2, target_modules=["0", "1"])
    assert type(model[0]) is nn.Linear


def test_wrap_with_a_positional_rank_suggests_the_keyword():
    with pytest.raises(TypeError, match=r"wrap\(model, r=8\)"):
        wrap(nn.Sequential(nn.Linear(4, 4)), 8)


# -- a stale optimizer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["unwrap", "replace"])
def test_a_stale_optimizer_refuses_to_step(how):
    model = make_model(n_layers=2)
    opt = trained(model, steps=1, reset_every=2)
    if how == "unwrap":
        unwrap(model)
    else:
        model[2] = nn.Linear(8, 8)
    model(torch.randn(3, 8)).sum().backward()
    before = snapshot(model, opt)
    with pytest.raises(CycleRefused, match=r"\['2'\] are no longer in the model" if how == "replace" else
                       r"\['0', '2'\] are no longer in the model"):
        opt.step()
    assert_unchanged(before, snapshot(model, opt))


# -- load_checkpoint --------------------------------------------------------------------------------------


def _resave(path, edit):
    ckpt = torch.load(path, weights_only=True)
    ckpt.pop("sha256")
    edit(ckpt)
    ckpt["sha256"] = _digest(ckpt)  # a digest-valid file: only the content is wrong
    atomic_save(ckpt, path)


def _bad_lr(ck):
    ck["optimizer"]["param_groups"][0]["lr"] = "0.01"


def _float64_adam(ck):
    st0 = next(iter(ck["optimizer"]["state"].values()))
    st0["exp_avg"] = st0["exp_avg"].double()


def _junk_scheduler(ck):
    ck["scheduler"] = {"junk": 1}


def _bad_torch_rng(ck):
    ck["rng"]["torch"] = torch.zeros(7, dtype=torch.uint8)


def _bad_python_rng(ck):
    ck["rng"]["python"] = (3, (1, 2), None)


def _non_tensor_model_value(ck):
    key = next(iter(ck["model"]))
    ck["model"][key] = 1.5


def _no_adapters(ck):
    del ck["adapters"]


def _disabled_scaler(ck):
    ck["scaler"] = {}  # what a disabled GradScaler saves


def _first_state(ck):
    return next(iter(ck["optimizer"]["state"].values()))


def _set(path, value):
    def edit(ck):
        *head, last = path
        d = ck
        for k in head:
            d = d[k] if not callable(k) else k(d)
        d[last] = value(d[last]) if callable(value) else value
    return edit


CHECKPOINT_TRIGGERS = {
    "string step": (_set([_first_state, "step"], "x"), "'step' of parameter"),
    "negative step": (_set([_first_state, "step"], torch.tensor(-3.0)), "'step' of parameter"),
    "scalar exp_avg": (_set([_first_state, "exp_avg"], torch.tensor(0.5)), "'exp_avg' is shaped like its parameter"),
    "NaN lr": (_set(["optimizer", "param_groups", 0, "lr"], float("nan")), "'lr' is nan"),
    "empty base_lrs": (_set(["scheduler", "base_lrs"], []), "'base_lrs' has 0 entries"),
    "emptied adapter settings": (_set(["adapters", "0"], {}), "layer '0' has the settings"),
    "complex model entry": (_set(["model", "0.bias"], lambda t: t.to(torch.complex64)), "complex64 in the checkpoint"),
    "types as a list": (_set(["types"], []), "'types' entry"),
    "string lr": (_bad_lr, "'lr' is '0.01'"),
    "float64 Adam state": (_float64_adam, "torch.float64"),
    "junk scheduler state": (_junk_scheduler, "scheduler state has keys"),
    "bad torch RNG": (_bad_torch_rng, "RNG state"),
    "bad python RNG": (_bad_python_rng, "RNG state"),
    "non-tensor model value": (_non_tensor_model_value, "is a float in the checkpoint"),
    "no adapters": (_no_adapters, "no adapter settings"),
    "disabled scaler into an enabled one": (_disabled_scaler, "scaler state is empty"),
}


def _training_objects(seed=0):
    model = make_model(n_layers=2, seed=seed)
    opt = trained(model, steps=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    return model, opt, sched, scaler


@pytest.mark.parametrize("setting,value", [("cycle_length", 0), ("min_lr_ratio", float("nan")), ("total_steps", 0),
                                           ("base_lrs", [0.1, 0.2]), ("last_epoch", -5)])
def test_a_jagged_cosine_state_with_bad_settings_is_refused_everywhere(tmp_path, setting, value):
    model = make_model(n_layers=2)
    opt = trained(model, steps=2, reset_every=4)
    sched = relora_ext.JaggedCosineLR(opt, total_steps=40, warmup_steps=2, restart_warmup_steps=1)
    path = tmp_path / "c.pt"
    save_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
    _resave(path, _set(["scheduler", setting], value))
    sd = dict(sched.state_dict(), **{setting: value})
    before, sched_before = snapshot(model, opt), sched.state_dict()
    with pytest.raises(ValueError, match=setting.rstrip("s")):
        sched.load_state_dict(sd)
    with pytest.raises(ValueError, match=setting.rstrip("s")):
        load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
    assert_unchanged(before, snapshot(model, opt))
    assert sched.state_dict() == sched_before


def test_a_refused_optimizer_load_changes_nothing():
    model = make_model(n_layers=2)
    sd = trained(model, steps=3).state_dict()
    sd["state"][next(iter(sd["state"]))]["step"] = "x"
    other = make_model(n_layers=2, seed=1)
    opt = trained(other, steps=1)
    before = snapshot(other, opt)
    with pytest.raises(ValueError, match="'step' of parameter"):
        opt.load_state_dict(sd)
    assert_unchanged(before, snapshot(other, opt))
    other(torch.randn(2, 8)).sum().backward()
    opt.step()  # still a working optimizer


@pytest.mark.parametrize("trigger", sorted(CHECKPOINT_TRIGGERS))
def test_load_checkpoint_refuses_a_bad_entry_before_loading_anything(tmp_path, trigger):
    model, opt, sched, scaler = _training_objects(seed=1)
    path = tmp_path / "c.pt"
    save_checkpoint(path, model=model, optimizer=opt, scheduler=sched, scaler=scaler)
    edit, match = CHECKPOINT_TRIGGERS[trigger]
    _resave(path, edit)
    model2, opt2, sched2, scaler2 = _training_objects(seed=2)
    before = snapshot(model2, opt2)
    sched_before, scaler_before = sched2.state_dict(), scaler2.state_dict()
    rng_before = torch.get_rng_state(), random.getstate()
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2, scaler=scaler2)
    assert_unchanged(before, snapshot(model2, opt2))
    assert sched2.state_dict() == sched_before and scaler2.state_dict() == scaler_before
    assert torch.equal(torch.get_rng_state(), rng_before[0]) and random.getstate() == rng_before[1]


def test_a_save_keeps_the_temporary_file_of_a_concurrent_save_of_another_name(tmp_path):
    # ".ckpt.1000.pt.<pid>.<random>.tmp" is a temporary of "ckpt.1000.pt", not of "ckpt" with PID 1000
    other = tmp_path / f".ckpt.1000.pt.{os.getpid()}.abcd1234.tmp"
    other.write_bytes(b"in progress")
    gone = tmp_path / ".ckpt.999999999.abcd1234.tmp"  # a killed save of "ckpt" (no such process)
    gone.write_bytes(b"left behind")
    atomic_save({"x": 1}, tmp_path / "ckpt")
    assert other.exists() and not gone.exists()


# -- the package's shape -------------------------------------------------------------------------------


def _imports():
    pkg = pathlib.Path(relora_ext.__file__).parent
    mods = {p.stem: p for p in pkg.glob("*.py")}
    graph, local = {m: set() for m in mods}, []
    for m, p in mods.items():
        tree = ast.parse(p.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("relora_ext")):
                base = (node.module or "").split(".")[-1] if node.module not in (None, "relora_ext") else ""
                targets = [base] if base else [a.name for a in node.names]
                for t in targets:
                    if t in mods and t != m:
                        graph[m].add(t)
                        if id(node) not in top:
                            local.append((m, t))
    return graph, local


def test_no_import_cycles_among_the_modules():
    graph, _ = _imports()
    graph.pop("__init__")
    state = {}

    def visit(m, path):
        state[m] = "open"
        for t in graph.get(m, ()):
            if state.get(t) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(path + [m, t])}")
            if t not in state:
                visit(t, path + [m])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [])


def test_no_function_level_imports_of_package_modules():
    # __init__'s lazy hf import is the only one: transformers is loaded on first use of the HF helpers
    _, local = _imports()
    assert [(m, t) for m, t in local if m != "__init__"] == []


def test_is_this_an_sst_layer_is_asked_one_way():
    pkg = pathlib.Path(relora_ext.__file__).parent
    for p in pkg.glob("*.py"):
        text = p.read_text()
        for probe in ('hasattr(layer, "sigma")', 'hasattr(layer, "weight_sst")', "hasattr(m, \"sigma\")"):
            assert probe not in text, f"{p.name} asks {probe}"


def test_a_named_embedding_is_adapted_cycled_checkpointed_and_unwrapped(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 8))
    wrap(model, r=2, target_modules=["0", "1"])
    assert type(model[0]).__name__ == "LoRAEmbedding"
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=2)
    tokens = torch.randint(0, 50, (6,))
    for _ in range(5):
        model(tokens).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert opt.cycles_done == 2
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt)
    other = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 8))
    wrap(other, r=2, alpha=4.0, target_modules=["0", "1"])
    with pytest.raises(ValueError, match="layer '0' was saved with alpha=2.0"):
        load_checkpoint(tmp_path / "c.pt", model=other)
    y = model(tokens)
    unwrap(model)
    assert [type(m) for m in model] == [nn.Embedding, nn.Linear]
    torch.testing.assert_close(model(tokens), y)


def test_embeddings_are_adapted_only_when_named():
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 8))
    wrap(model, r=2, target_modules=lambda n, m: True)  # a predicate selects among linear layers
    assert type(model[0]) is nn.Embedding and isinstance(model[1], LoRALinear)


@pytest.mark.parametrize("targets", [["wte"], ["lm_head"], ["wte", "lm_head"]])
def test_a_tied_embedding_and_head_are_refused_not_merged_twice(targets):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40,
                                                                 n_positions=16))
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as GPT-2 ships
    with pytest.raises(ValueError, match="shares memory with .*tied weights"):
        wrap(model, r=2, target_modules=targets)
    assert type(model.lm_head) is nn.Linear and type(model.transformer.wte) is nn.Embedding


def test_sst_refuses_a_named_embedding():
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match="method='sst'.*Embedding"):
        wrap(model, r=2, method="sst", target_modules=["0", "1"])
    assert type(model[0]) is nn.Embedding and type(model[1]) is nn.Linear


def test_a_stale_optimizer_of_a_peft_model_names_the_replaced_layer_only():
    pytest.importorskip("peft")
    from _hf_models import tiny_peft_llama

    model = tiny_peft_llama()
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=5)
    ids = torch.randint(0, 32, (1, 6))
    model(ids, labels=ids).loss.backward()
    opt.step()
    attn = model.base_model.model.model.layers[0].self_attn
    attn.v_proj = attn.v_proj.base_layer  # the adapter taken out by hand
    before = snapshot(model, opt)
    with pytest.raises(CycleRefused, match=r"\['base_model.model.model.layers.0.self_attn.v_proj'\] are no longer"):
        opt.step()
    assert_unchanged(before, snapshot(model, opt))


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_merged_state_dict_of_a_module_used_twice_merges_every_name(kind):
    torch.manual_seed(0)
    mod = nn.Linear(8, 8) if kind == "linear" else nn.Embedding(8, 8)
    model = nn.Sequential(mod, nn.Tanh(), mod)
    plain = nn.Sequential(*(type(mod)(8, 8) for _ in range(1)), nn.Tanh())
    plain.append(plain[0])
    x = torch.randn(3, 8) if kind == "linear" else torch.arange(3)
    wrap(model, r=2, target_modules=["0"])
    with torch.no_grad():
        model[0].lora_B.normal_()
        model[0].lora_A.normal_()
    y = model(x) if kind == "linear" else model[0](x)
    sd = relora_ext.merged_state_dict(model)
    plain.load_state_dict(sd)  # strict: no lora_A/lora_B left under the second name
    torch.testing.assert_close(plain(x) if kind == "linear" else plain[0](x), y)
    assert torch.equal(sd["0.weight"], sd["2.weight"])


@pytest.mark.parametrize("case", ["init_std beyond fp16", "int table with weight_dtype"])
def test_a_wrap_refused_at_a_later_layer_puts_the_adopted_weights_back(case):
    torch.manual_seed(0)
    if case == "init_std beyond fp16":
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).half())
        kwargs = dict(target_modules=["0", "1"], init_std=1e5, weight_dtype=torch.bfloat16)
    else:
        model = nn.Sequential(nn.Linear(8, 8), nn.Embedding(10, 8))
        model[1].weight = nn.Parameter(torch.zeros(10, 8, dtype=torch.int32), requires_grad=False)
        kwargs = dict(target_modules=["0", "1"], weight_dtype=torch.bfloat16)
    before = snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises((TypeError, ValueError), match="wrap: cannot adapt layer '1'"):
        wrap(model, r=2, **kwargs)
    assert_unchanged(before, snapshot(model))
    assert [p.dtype for p in model[0].parameters()] == [torch.float32, torch.float32]
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("how", ["assign", "new Parameter"])
def test_an_optimizer_whose_factors_were_replaced_refuses_to_step(how):
    model = make_model(n_layers=2)
    opt = trained(model, steps=1, reset_every=3)
    if how == "assign":
        model.load_state_dict(model.state_dict(), assign=True)  # new Parameter objects everywhere
    else:
        model[0].lora_A = nn.Parameter(model[0].lora_A.detach().clone())
    model(torch.randn(3, 8)).sum().backward()
    before = snapshot(model, opt)
    with pytest.raises(CycleRefused, match=r"'0.lora_A'.* are no longer in the model"):
        opt.step()
    assert_unchanged(before, snapshot(model, opt))


def test_a_regex_naming_an_embedding_adapts_it():
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 8))
    wrap(model, r=2, target_modules=r"0|1")
    assert type(model[0]).__name__ == "LoRAEmbedding" and isinstance(model[1], LoRALinear)


def test_a_modules_to_save_typo_is_refused_before_anything_changes():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    before = snapshot(model)
    with pytest.raises(ValueError, match="modules_to_save entry '11' matches no module"):
        wrap(model, r=2, target_modules=["0"], freeze_others=True, modules_to_save=["11"])
    assert_unchanged(before, snapshot(model))
    assert all(p.requires_grad for p in model.parameters())


def test_a_bad_padding_idx_written_by_hand_is_a_reason_not_a_crash():
    layer = relora_ext.LoRAEmbedding(10, 4, r=2, padding_idx=1)
    layer.padding_idx = 12
    assert "padding_idx must be None or an int in [0, 10)" in layer.check()
